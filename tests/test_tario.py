"""The fast tar reader yields exactly what webdataset's tarfile-based reader yields."""

import io
import os
import tarfile

import pytest
import webdataset as wds
from shardgen import forged_tar_header, image_bytes

from harness import tario
from shards.decode import BadSample


def write_tar(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)


def samples(reader, path):
    return [{k: v for k, v in s.items()} for s in wds.DataPipeline(wds.SimpleShardList([str(path)]), reader())]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_webdataset(tmp_path, fmt):
    long = "x" * 90 + "/" + "deep" * 10 + "/k1"  # > 100 chars: pax path, GNU longname or ustar prefix
    if fmt == tarfile.USTAR_FORMAT:
        long = "p" * 120 + "/k1"
    members = [("k0.jpg", image_bytes(0)), ("k0.cls", b"3"), ("k0.json", b'{"a": 1}'), ("__meta__", b"skip"),
               (long + ".jpg", image_bytes(1)), (long + ".txt", "a caption é".encode()), ("k2.seg.png", b"\x89PNG")]
    write_tar(tmp_path / "a.tar", members, fmt)
    ours = samples(tario.tarfile_to_samples, tmp_path / "a.tar")
    theirs = samples(wds.tarfile_to_samples, tmp_path / "a.tar")
    assert ours == theirs and len(ours) == 3 and ours[1]["__key__"] == long


def test_truncated_tar_yields_what_it_can_then_one_bad_sample(tmp_path):
    write_tar(tmp_path / "a.tar", [(f"k{i}.jpg", image_bytes(i)) for i in range(4)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
    got = list(tario.shard_samples(str(tmp_path / "b.tar")))
    good, bad = got[:-1], got[-1]
    assert 0 < len(good) < 4 and all(isinstance(s, dict) for s in good)
    assert isinstance(bad, BadSample) and bad.shard == str(tmp_path / "b.tar") and "runs past the end" in bad.reason


@pytest.mark.parametrize("size_field, reason", [
    (b"\x80" + b"\xff" * 11, "runs past the end"),  # base-256: 2**88 bytes (OverflowError/MemoryError before)
    (b"77777777777\0", "runs past the end"),  # 8 GiB in octal, in a 1 KB file
    (b"12x45\0      ", "not an octal number"),
    (b"\xff" + b"\0" * 11, "not an octal number"),  # base-256, negative
    (b"-0000007\0   ", "not an octal number"),
])
def test_absurd_size_fields_are_one_bad_sample_not_a_crash(tmp_path, size_field, reason):
    path = tmp_path / "forged.tar"
    path.write_bytes(forged_tar_header(b"k0.jpg", size_field) + b"x" * 512 + b"\0" * 1024)
    got = list(tario.shard_samples(str(path)))
    assert len(got) == 1 and isinstance(got[0], BadSample) and reason in got[0].reason, got


@pytest.mark.parametrize("content", [b"", b"\0" * 1024, b"not a tar file at all " * 50])
def test_empty_or_foreign_files_are_one_bad_sample_each(tmp_path, content):
    path = tmp_path / "x.tar"
    path.write_bytes(content)
    got = list(tario.shard_samples(str(path)))
    assert len(got) == 1 and isinstance(got[0], BadSample), got
    assert ("empty" in got[0].reason) if content.strip(b"\0") == b"" else ("checksum" in got[0].reason)


def test_a_fast_forward_reads_headers_only_and_yields_the_same_items(tmp_path):
    """Skipping on: members are Refs (seek, no read) that read back to the very bytes; a forged size
    is the same bad sample either way."""
    members = [(f"k{i}.{ext}", image_bytes(i) if ext == "jpg" else str(i).encode())
               for i in range(5) for ext in ("jpg", "cls")]
    write_tar(tmp_path / "a.tar", members)
    plain = list(tario.shard_samples(str(tmp_path / "a.tar")))
    lazy = list(tario.shard_samples(str(tmp_path / "a.tar"), tario.Skipping(on=True)))
    assert all(isinstance(v, tario.Ref) for s in lazy for k, v in s.items() if not k.startswith("__"))
    assert [tario.materialize(s) for s in lazy] == plain and len(plain) == 5
    forged = tmp_path / "forged.tar"
    forged.write_bytes(forged_tar_header(b"k0.jpg", b"77777777777\0") + b"x" * 512 + b"\0" * 1024)
    assert list(tario.shard_samples(str(forged), tario.Skipping(on=True))) == list(tario.shard_samples(str(forged)))


def test_a_fast_forward_that_ends_mid_shard_reads_no_data_and_then_reads_on(tmp_path, monkeypatch):
    """Skipping for the first samples, then not (a resume's fast-forward ending inside a shard): the
    skipped part reads headers alone at their offsets, and the buffered reading resumes right after."""
    members = [(f"k{i}.{ext}", image_bytes(i) if ext == "jpg" else str(i).encode())
               for i in range(6) for ext in ("jpg", "cls")]
    write_tar(tmp_path / "a.tar", members)
    plain = list(tario.shard_samples(str(tmp_path / "a.tar")))
    pread, read_at = os.pread, []
    monkeypatch.setattr(tario.os, "pread", lambda fd, n, at: (read_at.append(n), pread(fd, n, at))[1])
    skipping = tario.Skipping(on=True)
    got = []
    for sample in tario.shard_samples(str(tmp_path / "a.tar"), skipping):
        got.append(sample)
        skipping.on = len(got) < 3  # the fast-forward ends after 3 samples (one member of the 4th is read ahead)
    assert all(isinstance(v, tario.Ref) for s in got[:3] for k, v in s.items() if not k.startswith("__"))
    assert not any(isinstance(v, tario.Ref) for s in got[4:] for v in s.values())
    assert [tario.materialize(s) for s in got] == plain
    assert read_at and set(read_at) == {512}  # headers only, while skipping


def test_a_pax_record_of_length_zero_does_not_loop(tmp_path):
    pax = b"0 path=x\n"
    h = bytearray(forged_tar_header(b"PaxHeader", b"%011o\0" % len(pax)))
    h[156:157] = b"x"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    path = tmp_path / "pax.tar"
    path.write_bytes(bytes(h) + pax.ljust(512, b"\0") + b"\0" * 1024)
    got = list(tario.shard_samples(str(path)))
    assert len(got) == 1 and "malformed pax" in got[0].reason


def test_the_last_pax_path_record_wins_as_in_tarfile(tmp_path):
    pax = b"18 path=first.jpg\n19 path=second.jpg\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("PaxHeaders/x")
        info.type, info.size = tarfile.XHDTYPE, len(pax)
        tf.addfile(info, io.BytesIO(pax))
        info = tarfile.TarInfo("orig.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    ours = samples(tario.tarfile_to_samples, tmp_path / "a.tar")
    assert ours == samples(wds.tarfile_to_samples, tmp_path / "a.tar") and ours[0]["__key__"] == "second"


def _sparse_tar(path, kind):
    """k0.jpg, then a sparse k1.bin (an old GNU 'S' member, or pax GNU.sparse 1.0 records), then k2.jpg."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT) as tf:
        members = [("k0.jpg", image_bytes(0)), ("k1.bin", b"evil.jpg".ljust(512, b"\0")), ("k2.jpg", image_bytes(2))]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "k1.bin" and kind == "gnu":
                info.type = tarfile.GNUTYPE_SPARSE
            elif name == "k1.bin":
                info.name = "GNUSparseFile.0/k1.bin"
                info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                    "GNU.sparse.name": "k1.bin", "GNU.sparse.realsize": "65536"}
            tf.addfile(info, io.BytesIO(data))


def _gnu_tar_sparse(path, fmt, tmp_path):
    """What GNU tar --sparse writes: 12 data chunks, so the old GNU header needs an extension block."""
    import shutil
    import subprocess

    tar = shutil.which("tar")
    if tar is None or "--sparse" not in subprocess.run([tar, "--help"], capture_output=True, text=True).stdout:
        pytest.skip("no GNU tar with --sparse")
    src = tmp_path / "src"
    src.mkdir()
    (src / "k0.jpg").write_bytes(image_bytes(0))
    with open(src / "k1.bin", "wb") as f:
        for i in range(12):
            f.seek(i * 65536)
            f.write(b"evil.jpg".ljust(100, b"\0") if i == 11 else b"D" * 100)
    (src / "k2.jpg").write_bytes(image_bytes(2))
    subprocess.run([tar, "--sparse", f"--format={fmt}", "-cf", str(path), "-C", str(src), "k0.jpg", "k1.bin", "k2.jpg"],
                   check=True)


@pytest.mark.parametrize("how", ["gnu", "pax", "gnutar-gnu", "gnutar-posix"])
@pytest.mark.parametrize("skip", [False, True])
def test_a_sparse_member_is_the_rest_of_the_shard_bad_never_a_made_up_sample(tmp_path, how, skip):
    path = tmp_path / "s.tar"
    if how.startswith("gnutar-"):
        _gnu_tar_sparse(path, how.split("-")[1], tmp_path)
    else:
        _sparse_tar(path, how)
    got = list(tario.shard_samples(str(path), tario.Skipping(on=True) if skip else None))
    assert len(got) == 1 and isinstance(got[0], BadSample), got  # k0 is cut off with the rest, k2 never read
    assert got[0].shard == str(path) and "sparse member" in got[0].reason and "not supported" in got[0].reason
    assert not any(isinstance(s, dict) and s["__key__"] in ("evil", "k1", "GNUSparseFile.0/k1") for s in got)


def test_two_samples_under_one_key_keep_the_first_and_count_the_second_once(tmp_path):
    """webdataset raises on a key repeated in a row; we keep the first sample and say the second is skipped
    (it used to vanish without a word)."""
    members = [("a.jpg", b"first"), ("a.cls", b"1"), ("a.jpg", b"second"), ("a.cls", b"2"), ("b.jpg", b"b")]
    write_tar(tmp_path / "d.tar", members)
    items = list(tario.shard_samples(str(tmp_path / "d.tar")))
    bad = [i for i in items if isinstance(i, BadSample)]
    good = [i for i in items if not isinstance(i, BadSample)]
    assert [(g["__key__"], g["jpg"], g.get("cls")) for g in good] == [("a", b"first", b"1"), ("b", b"b", None)]
    assert len(bad) == 1 and "a second a.jpg in the shard" in bad[0].reason


def test_members_we_write_read_back_in_tarfile_webdataset_and_our_reader(tmp_path):
    long_key = "k" * 120  # past ustar's 100-byte name field: a GNU long-name record
    with open(tmp_path / "w.tar", "wb") as f:
        for key in ("a", long_key):
            f.write(tario.member_bytes(f"{key}.latent.npy", b"x" * 700, 1_600_000_000))
            f.write(tario.member_bytes(f"{key}.cls", b"3", 1_600_000_000))
        f.write(tario.END_OF_ARCHIVE)
    with tarfile.open(tmp_path / "w.tar") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["a.latent.npy", "a.cls", f"{long_key}.latent.npy", f"{long_key}.cls"]
        assert all(m.isreg() and m.mtime == 1_600_000_000 and m.mode == 0o644 for m in members)
        assert tf.extractfile("a.latent.npy").read() == b"x" * 700
    ours = samples(tario.tarfile_to_samples, tmp_path / "w.tar")
    assert ours == samples(wds.tarfile_to_samples, tmp_path / "w.tar")
    assert [(s["__key__"], s["cls"]) for s in ours] == [("a", b"3"), (long_key, b"3")]


def test_after_a_repeated_member_the_rest_of_that_key_is_skipped(tmp_path):
    """The second sample's members the first one lacks (here its cls) never join the first sample."""
    write_tar(tmp_path / "d.tar", [("a.jpg", b"first"), ("a.jpg", b"second"), ("a.cls", b"7"), ("b.jpg", b"b")])
    items = list(tario.shard_samples(str(tmp_path / "d.tar")))
    good = [i for i in items if not isinstance(i, BadSample)]
    assert [{k: v for k, v in g.items() if k != "__url__"} for g in good] == [{"__key__": "a", "jpg": b"first"},
                                                                           {"__key__": "b", "jpg": b"b"}]
    assert sum(isinstance(i, BadSample) for i in items) == 1
