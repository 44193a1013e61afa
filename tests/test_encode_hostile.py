"""launch/encode.py and sample.py decode against what a second hostile review found: a folder of links
to the input shards named as --out, an input shard with no readable image, a latent shard damaged or
replaced at the same size, latents of another model kind, a hand-edited latents.json, a stop between a
shard's record and its rename, out of memory, and --data that holds no images."""

import json
import re
import shutil

import pytest
from shardgen import make_shards
from test_encode import encode, sample, tiny

import harness.encode as henc
from harness.encode import MANIFEST


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=24, per_shard=8, size=40)


@pytest.fixture(scope="module")
def kl(shards, tmp_path_factory):
    return tiny(shards, tmp_path_factory)


@pytest.fixture(scope="module")
def encoded(kl, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "lat"
    assert encode(kl[0], "--out", out) == 0
    return out


def copy_of(folder, to):
    shutil.copytree(folder, to)
    return to


def one_line(capsys, prefix):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def test_a_folder_of_links_to_the_inputs_is_refused_as_out_and_keeps_its_links(kl, shards, tmp_path, capsys):
    links = tmp_path / "links"
    links.mkdir()
    for f in sorted(shards.glob("*.tar")):
        (links / f.name).symlink_to(f)
    for extra in ((), ("--overwrite",)):  # the links used to be replaced by empty latent shards
        assert encode(kl[0], "--data", links, "--out", links, *extra) == 2
        assert "is the folder of the input shards" in one_line(capsys, "encode: ")
    assert all(p.is_symlink() for p in links.iterdir()) and len(list(links.iterdir())) == 3
    assert sorted(p.name for p in links.iterdir()) == sorted(p.name for p in shards.glob("*.tar"))


def test_an_input_shard_without_images_decodes_around_its_empty_latent_shard(kl, shards, tmp_path, capsys):
    data = copy_of(shards, tmp_path / "data")
    (data / "000000.tar").write_bytes(b"")  # its latent shard holds no sample, as latents.json records
    out = tmp_path / "lat"
    assert encode(kl[0], "--data", data, "--out", out) == 0
    assert json.loads((out / MANIFEST).read_text())["shards"][0]["num_samples"] == 0
    assert sample(kl[0], "decode", "--latents", out, "--n", "4", "--rows", "2", "--out", tmp_path / "o.png") == 0
    capsys.readouterr()


def test_a_shard_replaced_at_the_same_size_is_caught_and_verify_writes_it_again(kl, encoded, tmp_path, capsys):
    out = copy_of(encoded, tmp_path / "lat")
    good = (out / "000000.tar").read_bytes()
    (out / "000000.tar").write_bytes((out / "000001.tar").read_bytes())  # 8 samples each: the same size
    assert sample(kl[0], "decode", "--latents", out, "--out", tmp_path / "o.png") == 2
    assert "run launch/encode.py again with --verify to rewrite it" in one_line(capsys, "error: ")
    assert encode(kl[0], "--out", out) == 0  # sizes only: the set looks complete
    assert "already complete" in capsys.readouterr().err
    assert encode(kl[0], "--out", out, "--verify") == 0
    assert (out / "000000.tar").read_bytes() == good
    assert sample(kl[0], "decode", "--latents", out, "--out", tmp_path / "o.png") == 0
    record = json.loads((out / MANIFEST).read_text())["shards"][0]
    assert record["sha256"] == henc.file_sha256(out / "000000.tar") and record["batch_size"] == 32


@pytest.mark.parametrize("made, decoder", [("fsq", "vq"), ("kl", "vq"), ("kl", "fsq"), ("vq", "kl")])
def test_latents_of_another_model_kind_are_refused(made, decoder, shards, tmp_path, tmp_path_factory, capsys):
    kinds = {"kl": [], "vq": ["model.kind=vq", "model.vq_codebook_size=1024"],
             "fsq": ["model.kind=fsq", "model.fsq_levels=[8,5,5,5]"]}  # FSQ codes 0..999 fit a 1024-code VQ
    a, _ = tiny(shards, tmp_path_factory, *kinds[made], name=made)
    b, _ = tiny(shards, tmp_path_factory, *kinds[decoder], name=decoder)
    out = tmp_path / "lat"
    assert encode(a, "--out", out) == 0
    capsys.readouterr()
    assert sample(b, "decode", "--latents", out, "--out", tmp_path / "o.png") == 2
    line = one_line(capsys, "error: ")
    assert f"encoded by a model.kind={made} model" in line and f"is model.kind={decoder}" in line, line


EDITS = {
    "shards a string": lambda m: m.update(shards="x"),
    "shards null": lambda m: m.update(shards=None),
    "shards of numbers": lambda m: m.update(shards=[5, 6, 7]),
    "no shards": lambda m: m.pop("shards"),
    "model a string": lambda m: m.update(model="x"),
    "a name null": lambda m: m["shards"][0].update(name=None),
    "sums of strings": lambda m: m["shards"][0].update(sums={"images": 8, "n": "x", "s1": [], "s2": []}),
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_hand_edited_latents_json_is_one_line_to_decode_and_written_again_by_encode(edit, kl, encoded, tmp_path,
                                                                                      capsys):
    out = copy_of(encoded, tmp_path / "lat")
    manifest = json.loads((out / MANIFEST).read_text())
    EDITS[edit](manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert sample(kl[0], "decode", "--latents", out, "--out", tmp_path / "o.png") == 2
    assert "not as launch/encode.py writes it" in one_line(capsys, "error: ")
    (out / "000001.tar").unlink()  # and a shard lost: the edited record must not reach .progress.done.json
    assert encode(kl[0], "--out", out) == 0
    for i in range(3):
        assert (out / f"{i:06d}.tar").read_bytes() == (encoded / f"{i:06d}.tar").read_bytes()
    assert json.loads((out / MANIFEST).read_text())["shards"] == json.loads((encoded / MANIFEST).read_text())["shards"]


def test_a_stop_between_a_shards_record_and_its_rename_goes_on_with_the_same_command(kl, encoded, tmp_path,
                                                                                    monkeypatch, capsys):
    real = henc.ShardOut.commit

    def stopped(self):
        if self.path.name == "000001.tar":
            raise KeyboardInterrupt  # the signal, after the progress file has the record
        real(self)

    monkeypatch.setattr(henc.ShardOut, "commit", stopped)
    out = tmp_path / "lat"
    assert encode(kl[0], "--out", out) == 130
    assert sorted(p.name for p in out.glob("0*")) == ["000000.tar"]  # recorded and in place; 000001 dropped
    monkeypatch.setattr(henc.ShardOut, "commit", real)
    capsys.readouterr()
    assert encode(kl[0], "--out", out) == 0  # was refused: "holds .tar files that no encoding recorded"
    for i in range(3):
        assert (out / f"{i:06d}.tar").read_bytes() == (encoded / f"{i:06d}.tar").read_bytes()


def test_out_of_memory_is_one_line_and_keeps_the_finished_shards(kl, tmp_path, monkeypatch, capsys):
    real, calls = henc.latent_fields, []

    def fields(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)")
        return real(*args)

    monkeypatch.setattr(henc, "latent_fields", fields)
    out = tmp_path / "lat"
    assert encode(kl[0], "--out", out, "--batch-size", "8") == 1
    line = one_line(capsys, "encode: out of memory (an allocation of 9663676416 bytes): a smaller --batch-size")
    assert "the finished shards are kept" in line
    assert sorted(p.name for p in out.glob("0*")) == ["000000.tar"]


def test_data_without_images_says_so(kl, encoded, tmp_path, capsys):
    assert encode(kl[0], "--data", encoded, "--out", tmp_path / "lat") == 2
    line = one_line(capsys, "encode: ")
    assert "no image was read from its 3 shards (24 samples without a readable image, e.g. " in line, line
    assert line.endswith("--data must name image shards")


def test_latent_files_numpy_and_torch_write_in_other_ways(tmp_path):
    """Read (a big-endian .npy, a .pt of torch < 1.6), or refused by what they are (random bytes were
    "pickled data", a FIFO "no such file")."""
    import os

    import numpy as np
    import torch

    np.save(tmp_path / "be.npy", np.arange(2 * 4 * 8 * 8, dtype=">f4").reshape(2, 4, 8, 8))
    z = henc.read_latents(tmp_path / "be.npy", 4).z
    assert torch.equal(z, torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).view(2, 4, 8, 8))
    torch.save(torch.ones(2, 4, 8, 8), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert henc.read_latents(tmp_path / "old.pt", 4).z.shape == (2, 4, 8, 8)
    (tmp_path / "junk.npy").write_bytes(os.urandom(300))
    os.mkfifo(tmp_path / "fifo.npy")
    for name, says in (("junk.npy", "not a .npy file (no NUMPY header)"), ("fifo.npy", "not a regular file")):
        with pytest.raises(henc.EncodeError, match=re.escape(f"{name}: {says}")):
            henc.read_latents(tmp_path / name, 4)


def test_a_latents_json_with_a_record_removed_is_not_trusted(kl, encoded, tmp_path, capsys):
    out = copy_of(encoded, tmp_path / "lat")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"].pop()  # the last shard's record: the rest still reads 000000, 000001
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert sample(kl[0], "decode", "--latents", out, "--n", "24", "--out", tmp_path / "o.png") == 2
    assert "not as launch/encode.py writes it" in one_line(capsys, "error: ")
    assert encode(kl[0], "--out", out) == 0  # not "already complete": written again
    assert "already complete" not in capsys.readouterr().err
    assert len(json.loads((out / MANIFEST).read_text())["shards"]) == 3


def test_a_shard_that_fails_verify_goes_before_its_new_record_is_written(kl, encoded, tmp_path, monkeypatch,
                                                                       capsys):
    """A stop between the new record and the rename used to leave the swapped file under a record that
    vouched for it (the same size): a later run without --verify kept it."""
    out = copy_of(encoded, tmp_path / "lat")
    (out / "000000.tar").write_bytes((out / "000001.tar").read_bytes())
    real = henc.ShardOut.commit

    def stopped(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(henc.ShardOut, "commit", stopped)
    assert encode(kl[0], "--out", out, "--verify") == 130
    assert not (out / "000000.tar").exists()
    monkeypatch.setattr(henc.ShardOut, "commit", real)
    capsys.readouterr()
    assert encode(kl[0], "--out", out) == 0
    assert (out / "000000.tar").read_bytes() == (encoded / "000000.tar").read_bytes()
