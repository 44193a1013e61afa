"""Latent shards (launch/encode.py): what is written equals the model on the same images, read back with
plain webdataset; an interrupted encoding goes on and ends byte-identical to a straight one; hostile
folders, inputs and models are one line each; 2 ranks write what 1 does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from shardgen import image_bytes, make_shards

from harness.config import load_config, to_dict
from harness.data import eval_batches, to_model_input
from harness.encode import FAULT_ENV, MANIFEST, file_sha256
from harness.export import save_safetensors
from launch.encode import main as encode_main
from launch.export import main as export_main
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.norm_groups=8", "model.z_channels=4",
        "model.embed_dim=4", "model.attn_type=none", "data.image_size=32"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=30, per_shard=8, size=40,
                       label_names=["a", "b", "c"])


def save_model(folder: Path, cfg, model) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return folder


def tiny(shards, tmp_path_factory, *extra, name="m"):
    cfg = load_config([], [*TINY, f"data.train={shards}", *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    return save_model(tmp_path_factory.mktemp(name), cfg, model), model


@pytest.fixture(scope="module")
def kl(shards, tmp_path_factory):
    return tiny(shards, tmp_path_factory)


def images(shards, n=30):
    loader, _ = eval_batches(str(shards), image_size=32, batch_size=64, max_samples=n)
    batch = next(iter(loader))
    return batch["key"], to_model_input(batch["image"], "cpu")


def read(out: Path, *fields):
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("__key__", *fields))


def encode(*args):
    return encode_main([str(a) for a in args] + ["--no-progress", "--workers", "0"])


def test_kl_latents_equal_the_posterior_and_carry_the_inputs_fields(kl, shards, tmp_path, capsys):
    folder, model = kl
    out = tmp_path / "lat"
    assert encode(folder, "--out", out, "--batch-size", "5", "--dtype", "float32") == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert f"{out}: 30 latents (4x16x16 float32) in 4 shards" in printed
    assert [s["num_samples"] for s in manifest["shards"]] == [8, 8, 8, 6] and manifest["num_samples"] == 30
    assert [s["source"] for s in manifest["shards"]] == [str(shards / f"{i:06d}.tar") for i in range(4)]
    rows = read(out, "latent.npy", "std.npy", "cls", "json")
    keys, x = images(shards)
    with torch.no_grad():
        post = model.posterior(x)
    assert [r[0] for r in rows] == keys  # input order and keys
    for i, (key, latent, std, cls, meta) in enumerate(rows):
        assert latent.dtype == np.float32 and latent.shape == (4, 16, 16)
        assert np.allclose(latent, post.mean[i].numpy(), atol=1e-5) and np.allclose(std, post.std[i].numpy(), atol=1e-5)
        assert cls == int(key[1:]) % 4 and meta == {"labels": [int(key[1:]) % 3]}  # passed through unchanged
    # the statistics are export --latent-stats' over the same images
    assert export_main([str(folder), "--out", str(tmp_path / "exp"), "--latent-stats", "30", "--workers", "0"]) == 0
    ref = json.loads((tmp_path / "exp" / "latent_stats.json").read_text())
    got = manifest["latent_stats"]
    assert got["num_images"] == 30 and abs(got["scaling_factor"] - ref["scaling_factor"]) < 1e-9
    assert np.allclose(got["latents_mean"], ref["latents_mean"], atol=1e-9)
    assert sorted(p.name for p in out.iterdir()) == [".encode.lock", "000000.tar", "000001.tar", "000002.tar",
                                                     "000003.tar", MANIFEST]  # the progress files are gone


def test_float16_is_the_default_and_flip_encodes_the_mirrored_image(kl, shards, tmp_path):
    folder, model = kl
    out = tmp_path / "lat"
    assert encode(folder, "--out", out, "--flip") == 0
    rows = read(out, "latent.npy", "latent_flip.npy", "std_flip.npy")
    _, x = images(shards)
    with torch.no_grad():
        post, flipped = model.posterior(x), model.posterior(x.flip(-1))
    assert rows[0][1].dtype == np.float16
    for i, (_, latent, latent_flip, std_flip) in enumerate(rows):
        assert np.allclose(latent, post.mean[i].numpy(), atol=2e-3, rtol=1e-3)
        assert np.allclose(latent_flip, flipped.mean[i].numpy(), atol=2e-3, rtol=1e-3)
        assert np.allclose(std_flip, flipped.std[i].numpy(), atol=2e-3, rtol=1e-3)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["flip"] and "latent_flip.npy" in manifest["fields"]


@pytest.mark.parametrize("kind", ["vq", "fsq"])
def test_vq_and_fsq_write_the_latent_and_the_codes(kind, shards, tmp_path, tmp_path_factory):
    extra = ["model.kind=vq", "model.vq_codebook_size=64"] if kind == "vq" else ["model.kind=fsq",
                                                                                "model.fsq_levels=[5,5,3,3]"]
    folder, model = tiny(shards, tmp_path_factory, *extra, name=kind)
    out = tmp_path / "lat"
    assert encode(folder, "--out", out, "--dtype", "float32") == 0
    rows = read(out, "latent.npy", "codes.npy")
    _, x = images(shards)
    with torch.no_grad():
        codes = model.encode_indices(x)
        latent = model.encode_unquantized(x) if kind == "vq" else model.encode(x)
    for i, (_, lat, code) in enumerate(rows):
        assert code.dtype == np.int16 and np.array_equal(code, codes[i].numpy())
        assert np.allclose(lat, latent[i].numpy(), atol=1e-5)
    assert "codes.npy" in json.loads((out / MANIFEST).read_text())["fields"]


def test_an_interrupted_encoding_goes_on_and_ends_as_a_straight_one(kl, tmp_path, monkeypatch, capsys):
    folder, _ = kl
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert encode(folder, "--out", straight) == 0
    monkeypatch.setenv(FAULT_ENV, "2")  # stopped (as by SIGTERM) after 2 of 4 shards
    assert encode(folder, "--out", resumed) == 130
    assert "the finished shards are kept" in capsys.readouterr().err
    assert sorted(p.name for p in resumed.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert not (resumed / MANIFEST).exists() and not list(resumed.glob("*.tmp"))
    (resumed / "000002.tar.tmp").write_bytes(b"half a shard")  # what a kill -9 leaves
    monkeypatch.setenv(FAULT_ENV, "1")  # stopped again, after 1 more: the first two stay recorded
    before = (resumed / "000000.tar").stat().st_mtime_ns
    assert encode(folder, "--out", resumed) == 130
    assert len(json.loads((resumed / ".progress.done.json").read_text())["shards"]) == 2  # the earlier run's
    assert len(json.loads((resumed / ".progress.0.json").read_text())["shards"]) == 1  # this one's
    monkeypatch.delenv(FAULT_ENV)
    assert encode(folder, "--out", resumed) == 0
    assert (resumed / "000000.tar").stat().st_mtime_ns == before  # kept, not written again
    for i in range(4):
        assert (straight / f"{i:06d}.tar").read_bytes() == (resumed / f"{i:06d}.tar").read_bytes()
    a, b = (json.loads((d / MANIFEST).read_text()) for d in (straight, resumed))
    assert a["shards"] == b["shards"]
    assert abs(a["latent_stats"]["scaling_factor"] - b["latent_stats"]["scaling_factor"]) < 1e-12
    assert not list(resumed.glob("*.tmp")) and not list(resumed.glob(".progress*"))
    capsys.readouterr()
    assert encode(folder, "--out", resumed) == 0
    assert "already complete (30 latents in 4 shards); nothing to do" in capsys.readouterr().err


def test_a_shard_damaged_after_its_record_is_written_again(kl, tmp_path, monkeypatch):
    folder, _ = kl
    out = tmp_path / "lat"
    monkeypatch.setenv(FAULT_ENV, "2")
    assert encode(folder, "--out", out) == 130
    good = (out / "000001.tar").read_bytes()
    (out / "000001.tar").write_bytes(good[:1000])  # truncated by something else
    monkeypatch.delenv(FAULT_ENV)
    assert encode(folder, "--out", out) == 0
    assert (out / "000001.tar").read_bytes() == good


def test_other_settings_into_the_same_folder_are_refused_until_overwrite(kl, shards, tmp_path, tmp_path_factory,
                                                                        capsys):
    folder, _ = kl
    other, model = tiny(shards, tmp_path_factory, name="other")
    with torch.no_grad():
        model.quant_conv.bias.add_(0.1)
    save_model(other, load_config([], [*TINY, f"data.train={shards}"]), model)
    out = tmp_path / "lat"
    assert encode(folder, "--out", out) == 0
    capsys.readouterr()
    assert encode(folder, "--out", out, "--dtype", "float32") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds latents of other settings (--image-size, --dtype" in err[0], err
    assert "pass --overwrite" in err[0]
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "float16"  # untouched
    assert encode(other, "--out", out) == 2
    assert "holds latents of another model (a run folder gives its newest checkpoint" in capsys.readouterr().err
    assert encode(folder, "--out", out, "--dtype", "float32", "--overwrite") == 0
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "float32"


def test_hostile_output_folders_are_one_line_and_touch_nothing(kl, shards, tmp_path, capsys):
    folder, _ = kl
    before = sorted(p.name for p in shards.iterdir())
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    other = make_shards(tmp_path / "other", num_samples=2, per_shard=2)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train.log").write_text("")
    cases = {shards: "is the folder of the input shards", shards / "sub": "is inside the folder of the input shards",
             other: "holds an image shard set (index.json)",
             tmp_path / "file": "is a file, not a folder",
             run / "checkpoints" / "lat": "inside the run's checkpoints/ folder",
             tmp_path / "mine": "holds other files (notes.txt)"}
    for out, why in cases.items():
        assert encode(folder, "--out", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("encode: ") and why in err[0], (out, err)
    assert sorted(p.name for p in shards.iterdir()) == before and not (shards / "sub").exists()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_second_encoding_into_a_folder_being_written_is_refused(kl, tmp_path, capsys):
    import fcntl

    folder, _ = kl
    out = tmp_path / "lat"
    out.mkdir()
    with open(out / ".encode.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert encode(folder, "--out", out) == 2
    assert "another encoding is writing into this folder right now" in capsys.readouterr().err
    assert not list(out.glob("*.tar"))


def test_bad_samples_and_a_broken_shard_are_counted_and_named(kl, shards, tmp_path, capsys):
    folder, _ = kl
    data = tmp_path / "data"
    data.mkdir()
    for p in shards.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    with wds.TarWriter(str(data / "000001.tar")) as w:  # one good sample, one that is not an image
        w.write({"__key__": "good", "jpg": image_bytes(1, 40), "cls": "1", "json": json.dumps({"labels": [0]})})
        w.write({"__key__": "broken", "jpg": b"not a jpeg", "cls": "2", "json": json.dumps({"labels": [0]})})
    tail = (data / "000002.tar").read_bytes()
    (data / "000002.tar").write_bytes(tail[: len(tail) // 2])  # cut off mid-way
    out = tmp_path / "lat"
    assert encode(folder, "--data", data, "--out", out) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    s = manifest["shards"]
    assert s[1]["num_samples"] == 1 and s[1]["bad"] == 1 and s[1]["bad_examples"][0].startswith("broken: ")
    assert s[2]["bad"] == 1 and "tar" in s[2]["bad_examples"][0] and 0 < s[2]["num_samples"] < 8
    assert manifest["num_bad"] == 2 and "2 bad samples skipped" in printed
    assert [r[0] for r in read(out, "latent.npy")][8] == "good"


def test_a_model_that_gives_nan_or_overflows_float16_is_refused_and_leaves_no_half_shard(shards, tmp_path,
                                                                                        tmp_path_factory, capsys):
    folder, model = tiny(shards, tmp_path_factory, name="big")
    cfg = load_config([], [*TINY, f"data.train={shards}"])
    with torch.no_grad():
        model.quant_conv.bias[:4] = 1e6  # the mean: finite in float32, past float16
    save_model(folder, cfg, model)
    out = tmp_path / "lat"
    assert encode(folder, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "past float16's 65504; encode with --dtype float32" in err[0] and "s00000" in err[0], err
    assert not list(out.glob("*.tar*"))
    assert encode(folder, "--out", out, "--dtype", "float32") == 0  # float32 holds it
    with torch.no_grad():
        model.quant_conv.weight.fill_(3e38)  # finite weights, inf/NaN activations
    save_model(folder, cfg, model)
    capsys.readouterr()
    out2 = tmp_path / "lat2"
    assert encode(folder, "--out", out2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not finite (NaN or inf)" in err[0], err
    assert not list(out2.glob("*.tar*"))


def test_hostile_requests_are_one_line(kl, shards, tmp_path, tmp_path_factory, capsys):
    folder, _ = kl
    cases = [
        ([folder, "--out", tmp_path / "o", "--data", tmp_path / "nowhere"], "nowhere"),
        ([tmp_path / "nomodel", "--out", tmp_path / "o"], "no such run"),
        ([folder, "--out", tmp_path / "o", "--image-size", "31"], "--image-size 31"),
        ([folder, "--out", tmp_path / "o", "--device", "cuda:7"], "--device cuda:7"),
    ]
    for args, why in cases:
        if "cuda" in str(args) and torch.cuda.is_available():
            continue
        assert encode(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("encode: ") and why in err[0], (args, err)
    assert not (tmp_path / "o").exists()


def test_a_class_conditional_model_encodes_with_each_samples_class(shards, tmp_path, tmp_path_factory):
    folder, model = tiny(shards, tmp_path_factory, "model.condition=class", "model.num_classes=4", name="cond")
    out = tmp_path / "lat"
    assert encode(folder, "--out", out, "--dtype", "float32") == 0
    loader, _ = eval_batches(str(shards), image_size=32, batch_size=64, max_samples=30)
    batch = next(iter(loader))
    with torch.no_grad():
        mean = model.posterior(to_model_input(batch["image"], "cpu"), batch["cls"]).mean
        other = model.posterior(to_model_input(batch["image"], "cpu"), (batch["cls"] + 1) % 4).mean
    latents = torch.from_numpy(np.stack([r[1] for r in read(out, "latent.npy")]))
    assert torch.allclose(latents, mean, atol=1e-5) and not torch.allclose(latents, other, atol=1e-3)


@pytest.mark.slow
def test_two_ranks_write_what_one_does(kl, tmp_path):
    folder, _ = kl
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "launch/encode.py"), str(folder), "--out", str(out), "--workers", "1", "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("30 latents") == 1, r.stdout  # rank 0 reports
        outs[nproc] = out
    for i in range(4):
        assert (outs[1] / f"{i:06d}.tar").read_bytes() == (outs[2] / f"{i:06d}.tar").read_bytes()
    a, b = (json.loads((d / MANIFEST).read_text()) for d in outs.values())
    assert a["shards"] == b["shards"]
    assert abs(a["latent_stats"]["scaling_factor"] - b["latent_stats"]["scaling_factor"]) < 1e-12


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_mid_way_keeps_the_finished_shards_and_leaves_nothing_half_written(kl, tmp_path, signum):
    import signal
    import time

    folder, _ = kl
    data = make_shards(tmp_path / "data", num_samples=240, per_shard=20, size=40)
    out = tmp_path / "lat"
    cmd = [sys.executable, str(ROOT / "launch/encode.py"), str(folder), "--data", str(data), "--out", str(out),
           "--batch-size", "2", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (out / "000000.tar").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signum))
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the encoding finished before the signal")
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("encode: stopped by a signal"), err[-2000:]
    assert not list(out.glob("*.tmp")) and not (out / MANIFEST).exists()
    kept = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert kept and len(kept) < 12
    assert encode(folder, "--data", data, "--out", out) == 0
    assert all((out / name).read_bytes() == b for name, b in kept.items())
    assert json.loads((out / MANIFEST).read_text())["num_samples"] == 240


def copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_input_shards_rebuilt_in_place_are_other_inputs(kl, shards, tmp_path, monkeypatch, capsys):
    folder, _ = kl
    data = copy_shards(shards, tmp_path / "data")
    out = tmp_path / "lat"
    monkeypatch.setenv(FAULT_ENV, "2")
    assert encode(folder, "--data", data, "--out", out) == 130
    monkeypatch.delenv(FAULT_ENV)
    make_shards(data, num_samples=30, per_shard=8, size=36, label_names=["a", "b", "c"])  # rebuilt: other images
    capsys.readouterr()
    assert encode(folder, "--data", data, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds latents of other input shards" in err[0], err
    assert encode(folder, "--data", data, "--out", out, "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert encode(folder, "--data", data, "--out", fresh) == 0
    assert all((out / f"{i:06d}.tar").read_bytes() == (fresh / f"{i:06d}.tar").read_bytes() for i in range(4))


def test_a_shard_lost_from_a_complete_set_is_all_that_is_redone(kl, tmp_path, monkeypatch):
    folder, _ = kl
    out = tmp_path / "lat"
    assert encode(folder, "--out", out) == 0
    whole = {i: (out / f"{i:06d}.tar").read_bytes() for i in range(4)}
    manifest = json.loads((out / MANIFEST).read_text())
    (out / "000002.tar").unlink()
    (out / "000003.tar").write_bytes(whole[3][:2000])
    kept = {i: (out / f"{i:06d}.tar").stat().st_mtime_ns for i in (0, 1)}
    monkeypatch.setenv(FAULT_ENV, "1")  # stopped after redoing one: the set is not complete, and says so
    assert encode(folder, "--out", out) == 130
    assert not (out / MANIFEST).exists()
    monkeypatch.delenv(FAULT_ENV)
    assert encode(folder, "--out", out) == 0
    assert all((out / f"{i:06d}.tar").stat().st_mtime_ns == kept[i] for i in (0, 1))  # not written again
    assert all((out / f"{i:06d}.tar").read_bytes() == whole[i] for i in range(4))
    again = json.loads((out / MANIFEST).read_text())
    assert again["shards"] == manifest["shards"]
    assert abs(again["latent_stats"]["scaling_factor"] - manifest["latent_stats"]["scaling_factor"]) < 1e-12


def test_what_a_kill_leaves_is_cleared_and_the_same_command_goes_on(kl, tmp_path):
    folder, _ = kl
    out = tmp_path / "lat"
    out.mkdir()
    (out / "000000.tar.tmp").write_bytes(b"half a shard")  # killed in its first shard: no progress yet
    (out / ".latents.json.123.0123abcd.tmp").write_text("{")  # killed while writing the manifest
    assert encode(folder, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [".encode.lock", *(f"{i:06d}.tar" for i in range(4)), MANIFEST]


def test_records_survive_stops_between_runs(kl, tmp_path, monkeypatch):
    """What an earlier run finished is gathered into one file at the start, so a run that stops before its
    own first record (or writes its own under the same rank's name) loses none of it."""
    folder, _ = kl
    out = tmp_path / "lat"
    monkeypatch.setenv(FAULT_ENV, "2")
    assert encode(folder, "--out", out) == 130
    first = {i: (out / f"{i:06d}.tar").stat().st_mtime_ns for i in (0, 1)}
    monkeypatch.setenv(FAULT_ENV, "1")
    assert encode(folder, "--out", out) == 130
    assert len(json.loads((out / ".progress.done.json").read_text())["shards"]) == 2
    assert len(json.loads((out / ".progress.0.json").read_text())["shards"]) == 1
    third = (out / "000002.tar").stat().st_mtime_ns
    monkeypatch.delenv(FAULT_ENV)
    assert encode(folder, "--out", out) == 0
    assert all((out / f"{i:06d}.tar").stat().st_mtime_ns == first[i] for i in (0, 1))
    assert (out / "000002.tar").stat().st_mtime_ns == third
    assert not list(out.glob(".progress*"))


def test_samples_lost_from_a_cut_off_or_emptied_shard_are_counted_against_the_index(kl, shards, tmp_path, capsys):
    folder, _ = kl
    data = copy_shards(shards, tmp_path / "data")
    (data / "000001.tar").write_bytes(b"")  # emptied: 8 samples gone, one "bad sample" for the reader
    out = tmp_path / "lat"
    assert encode(folder, "--data", data, "--out", out) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["num_listed"] == 30 and manifest["num_samples"] == 22
    assert manifest["shards"][1]["expected"] == 8 and manifest["shards"][1]["num_samples"] == 0
    assert "8 of the 30 samples the inputs' index.json lists are not in them" in capsys.readouterr().out


# --- sample.py decode: latents back into images ----------------------------------------------------


def sample(*args):
    from launch.sample import main as sample_main

    return sample_main([str(a) for a in args])


def png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_decode_of_encoded_shards_is_the_reconstruction(kl, shards, tmp_path):
    folder, _ = kl
    out = tmp_path / "lat"
    assert encode(folder, "--out", out, "--dtype", "float32") == 0
    assert sample(folder, "decode", "--latents", out, "--n", "8", "--rows", "1", "--out", tmp_path / "d.png") == 0
    assert sample(folder, "reconstruct", "--data", shards, "--n", "8", "--out", tmp_path / "r.png") == 0
    decoded, recon = png(tmp_path / "d.png"), png(tmp_path / "r.png")
    row = decoded.shape[0]
    assert np.abs(decoded.astype(int) - recon[row:].astype(int)).max() <= 1  # the reconstructions' row


def test_decode_of_normalised_latents_undoes_the_normalisation(kl, shards, tmp_path):
    folder, model = kl
    out = tmp_path / "lat"
    assert encode(folder, "--out", out, "--dtype", "float32") == 0
    stats = json.loads((out / MANIFEST).read_text())["latent_stats"]
    z = np.stack([r[1] for r in read(out, "latent.npy")])[:8]
    np.save(tmp_path / "raw.npy", z)
    np.save(tmp_path / "norm.npy", (z - stats["shift_factor"]) * stats["scaling_factor"])
    common = ["--n", "4", "--rows", "2"]
    assert sample(folder, "decode", "--latents", tmp_path / "raw.npy", *common, "--out", tmp_path / "a.png") == 0
    assert sample(folder, "decode", "--latents", tmp_path / "norm.npy", "--stats", out / MANIFEST, *common,
                  "--out", tmp_path / "b.png") == 0
    assert sample(folder, "decode", "--latents", tmp_path / "norm.npy", "--scaling-factor", stats["scaling_factor"],
                  "--shift-factor", stats["shift_factor"], *common, "--out", tmp_path / "c.png") == 0
    a, b, c = (png(tmp_path / f"{n}.png").astype(int) for n in "abc")
    assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() <= 1
    assert sample(folder, "decode", "--latents", tmp_path / "norm.npy", *common, "--out", tmp_path / "x.png") == 0
    assert np.abs(a - png(tmp_path / "x.png").astype(int)).max() > 10  # without: other images


def test_decode_of_vq_codes_and_latents(shards, tmp_path, tmp_path_factory):
    folder, model = tiny(shards, tmp_path_factory, "model.kind=vq", "model.vq_codebook_size=64", name="vqd")
    out = tmp_path / "lat"
    assert encode(folder, "--out", out, "--dtype", "float32") == 0
    rows = read(out, "latent.npy", "codes.npy")
    np.save(tmp_path / "codes.npy", np.stack([r[2] for r in rows])[:4])
    torch.save({"latents": torch.from_numpy(np.stack([r[1] for r in rows])[:4])}, tmp_path / "z.pt")
    for latents, name in ((tmp_path / "codes.npy", "c.png"), (tmp_path / "z.pt", "z.png"), (out, "f.png")):
        assert sample(folder, "decode", "--latents", latents, "--n", "4", "--rows", "1", "--out", tmp_path / name) == 0
    c, z, f = (png(tmp_path / n).astype(int) for n in ("c.png", "z.png", "f.png"))
    assert np.abs(c - z).max() <= 1 and np.abs(c - f).max() <= 1  # codes = quantized latents = the shards


class Payload:  # a pickled object of a class weights_only refuses
    pass


def test_decode_requests_that_cannot_work_are_one_line(kl, shards, tmp_path, tmp_path_factory, capsys):
    folder, _ = kl
    np.save(tmp_path / "c3.npy", np.zeros((2, 3, 16, 16), np.float32))
    np.save(tmp_path / "z4.npy", np.zeros((2, 4, 16, 16), np.float32))
    np.save(tmp_path / "nan.npy", np.full((2, 4, 16, 16), np.nan, np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "codes.npy", np.zeros((2, 16, 16), np.int64))
    torch.save({"x": torch.zeros(1), "y": torch.zeros(1)}, tmp_path / "two.pt")
    torch.save(Payload(), tmp_path / "pickle.pt")
    cases = [
        (["decode"], "decode: give --latents"),
        (["reconstruct", "--latents", tmp_path / "c3.npy"], "--latents: for `decode`"),
        (["decode", "--latents", tmp_path / "c3.npy"], "3 latent channels, the model's latent has 4"),
        (["decode", "--latents", tmp_path / "nan.npy"], "holds NaN or inf"),
        (["decode", "--latents", tmp_path / "obj.npy"], "not a readable latent file"),
        (["decode", "--latents", tmp_path / "pickle.pt"], "not a readable latent file"),
        (["decode", "--latents", tmp_path / "two.pt"], "holds 2 tensors (x, y)"),
        (["decode", "--latents", tmp_path / "codes.npy"], "integer codes, but model.kind=kl has no codebook"),
        (["decode", "--latents", tmp_path / "nowhere.npy"], "no such file or folder"),
        (["decode", "--latents", shards], "not a folder of latent shards"),
        (["decode", "--latents", tmp_path / "c3.npy", "--stats", tmp_path / "c3.npy", "--scaling-factor", "2"],
         "one or the other"),
        (["decode", "--latents", tmp_path / "c3.npy", "--scaling-factor", "0"], "--scaling-factor 0.0: need a finite"),
        (["decode", "--latents", tmp_path / "z4.npy", "--cls", "1"], "--cls needs a class-conditional model"),
    ]
    for extra, why in cases:
        assert sample(folder, *extra, "--out", tmp_path / "o.png") == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and why in err[0], (extra, err)
    assert not (tmp_path / "o.png").exists()
    cond, _ = tiny(shards, tmp_path_factory, "model.condition=class", "model.num_classes=4", name="cd")
    assert sample(cond, "decode", "--latents", tmp_path / "z4.npy", "--out", tmp_path / "o.png") == 2
    assert "give --cls N" in capsys.readouterr().err
    assert sample(cond, "decode", "--latents", tmp_path / "z4.npy", "--cls", "2", "--n", "2", "--rows", "1",
                  "--out", tmp_path / "o.png") == 0


def test_a_folder_of_image_shards_without_their_index_is_not_taken_for_latents(kl, shards, tmp_path, capsys):
    folder, _ = kl
    images = copy_shards(shards, tmp_path / "images")
    (images / "index.json").unlink()
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    assert encode(folder, "--out", images) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 .tar files (000000.tar, ...) that no encoding recorded" in err[0], err
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before  # untouched
    assert encode(folder, "--out", images, "--overwrite") == 0  # said to be ours: replaced
    assert json.loads((images / MANIFEST).read_text())["num_samples"] == 30


@pytest.mark.parametrize("kind", ["vq", "fsq"])
def test_decoded_vq_and_fsq_shards_are_the_reconstructions(kind, shards, tmp_path, tmp_path_factory):
    """The shards' codes, not their float16 pre-quantization latents quantized again (a code could flip)."""
    extra = ["model.kind=vq", "model.vq_codebook_size=64"] if kind == "vq" else ["model.kind=fsq",
                                                                                "model.fsq_levels=[5,5,3,3]"]
    folder, _ = tiny(shards, tmp_path_factory, *extra, name=f"{kind}r")
    assert encode(folder, "--out", tmp_path / "lat") == 0
    assert sample(folder, "decode", "--latents", tmp_path / "lat", "--n", "8", "--rows", "1",
                  "--out", tmp_path / "d.png") == 0
    assert sample(folder, "reconstruct", "--data", shards, "--n", "8", "--out", tmp_path / "r.png") == 0
    decoded, recon = png(tmp_path / "d.png").astype(int), png(tmp_path / "r.png").astype(int)
    assert np.abs(decoded - recon[decoded.shape[0]:]).max() <= 1


def test_hostile_latent_shards_and_factors_are_one_line(kl, shards, tmp_path, tmp_path_factory, capsys):
    folder, _ = kl
    out = tmp_path / "lat"
    assert encode(folder, "--out", out) == 0

    def refused(latents, *extra, says):
        assert sample(folder, "decode", "--latents", latents, *extra, "--out", tmp_path / "o.png") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err

    refused(out, "--stats", out / MANIFEST, says="holds latents as the model made them")
    for name, damage, says in [("gone", lambda p: p.unlink(), "missing"),
                               ("cut", lambda p: p.write_bytes(p.read_bytes()[:3000]), "not the size"),
                               ("junk", lambda p: p.write_bytes(os.urandom(p.stat().st_size)), "another sha256"),
                               # same size, other latents (shards 0 and 1 hold 8 each): caught by the sha256
                               ("swapped", lambda p: p.write_bytes((p.parent / "000001.tar").read_bytes()),
                                "not the shard latents.json records (another sha256: damaged or replaced since); "
                                "run launch/encode.py again with --verify to rewrite it")]:
        bad = tmp_path / name
        bad.mkdir()
        for f in out.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        damage(bad / "000000.tar")
        refused(bad, says=says)
    bad = tmp_path / "members"  # a whole tar whose members are broken
    bad.mkdir()
    manifest = json.loads((out / MANIFEST).read_text())
    with wds.TarWriter(str(bad / "000000.tar")) as w:
        w.write({"__key__": "x", "latent.npy": b"garbage"})
    manifest["shards"] = [{**manifest["shards"][0], "bytes": (bad / "000000.tar").stat().st_size,
                           "sha256": file_sha256(bad / "000000.tar")}]
    manifest.update(num_shards=1, num_samples=manifest["shards"][0]["num_samples"])
    (bad / MANIFEST).write_text(json.dumps(manifest))
    refused(bad, says="latent.npy does not read")
    np.save(tmp_path / "z.npy", np.zeros((2, 4, 16, 16), np.float32))
    (tmp_path / "vq.json").write_text(json.dumps({"_class_name": "VQModel", "scaling_factor": 1.2}))
    refused(tmp_path / "z.npy", "--stats", tmp_path / "vq.json", says="no finite scaling_factor > 0 and shift_factor")
    (tmp_path / "bool.json").write_text(json.dumps({"scaling_factor": True, "shift_factor": 0.0}))
    refused(tmp_path / "z.npy", "--stats", tmp_path / "bool.json", says="no finite scaling_factor")
    np.save(tmp_path / "big.npy", np.full((2, 4, 16, 16), 1e30, np.float32))
    refused(tmp_path / "big.npy", "--scaling-factor", "1e-20", says="the unscaled latents overflow")
    torch.save([torch.zeros(4, 16, 16)], tmp_path / "list.pt")
    refused(tmp_path / "list.pt", says="a list of 1 items; save one tensor")
    # latents encoded by another model: decoded, with a note (a fine-tuned decoder is a real use)
    other, model = tiny(shards, tmp_path_factory, name="oth")
    with torch.no_grad():
        model.quant_conv.bias.add_(0.1)
    save_model(other, load_config([], [*TINY, f"data.train={shards}"]), model)
    assert sample(other, "decode", "--latents", out, "--out", tmp_path / "o.png") == 0
    assert "were encoded by other weights" in capsys.readouterr().err


def test_decode_classes_and_codes_stored_as_floats(shards, tmp_path, tmp_path_factory, capsys):
    cond, _ = tiny(shards, tmp_path_factory, "model.condition=class", "model.num_classes=4", name="cls4")
    out = tmp_path / "lat"
    assert encode(cond, "--out", out, "--dtype", "float32") == 0
    assert sample(cond, "decode", "--latents", out, "--n", "4", "--rows", "1", "--out", tmp_path / "o.png") == 0
    three, _ = tiny(shards, tmp_path_factory, "model.condition=class", "model.num_classes=3", name="cls3")
    assert sample(three, "decode", "--latents", out, "--n", "4", "--rows", "1", "--out", tmp_path / "o.png") == 2
    assert "have classes outside 0..2 (3); give --cls N" in capsys.readouterr().err  # not clamped to class 2
    vq, _ = tiny(shards, tmp_path_factory, "model.kind=vq", "model.vq_codebook_size=64", name="vqf")
    np.save(tmp_path / "f.npy", np.random.default_rng(0).integers(0, 64, (4, 16, 16)).astype(np.float32))
    assert sample(vq, "decode", "--latents", tmp_path / "f.npy", "--out", tmp_path / "o.png") == 2
    assert "whole numbers stored as floats" in capsys.readouterr().err
    np.save(tmp_path / "one.npy", np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32))
    assert sample(vq, "decode", "--latents", tmp_path / "one.npy", "--n", "1", "--rows", "1",
                  "--out", tmp_path / "o.png") == 0  # one `c h w` latent: its channels are not cut to --n


def test_the_stop_handler_acts_once():
    """Under SLURM a rank is signalled twice (srun, then torchrun shutting the workers down): the second signal
    must not raise again in a finalizer on the way out ("Exception ignored in ... KeyboardInterrupt")."""
    import signal

    from launch import encode

    previous = {s: signal.getsignal(s) for s in encode.STOP_SIGNALS}
    try:
        with pytest.raises(KeyboardInterrupt):
            encode._terminated(signal.SIGUSR1, None)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in encode.STOP_SIGNALS)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
