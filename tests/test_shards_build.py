"""Shard builders end to end: demo, folder, odd images, sizes, resume, output-folder safety."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from shards_helpers import decode, index_without_time, jpeg_bytes, meta, picture, read_set, run_cli, save, shard_bytes

from shards.__main__ import main
from shards.demo import ATTRIBUTES, SHAPES
from shards.index import read_index

Q = ["--quiet"]


# ----------------------------------------------------------------------------------------------
# demo


def test_demo_counts_labels_and_determinism(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["demo", str(a), "--num-samples", "60", "--image-size", "32", "--shard-size", "25",
                 "--workers", "2", *Q]) == 0
    index = read_index(a)
    assert [s["num_samples"] for s in index["shards"]] == [25, 25, 10]
    assert index["classes"] == SHAPES and len(SHAPES) == 10
    assert index["label_names"] == ATTRIBUTES
    assert index["class_counts"] == [6] * 10
    samples = read_set(a)
    label_counts = [0] * len(ATTRIBUTES)
    for key, s in samples.items():
        cls = int(s["cls"])
        assert cls == int(key) % 10
        m = meta(s)
        assert m["shape"] == SHAPES[cls] and SHAPES[cls] in s["txt"].decode()
        assert all(0 <= j < len(ATTRIBUTES) for j in m["labels"]) and m["labels"] == sorted(m["labels"])
        assert (ATTRIBUTES.index("large") in m["labels"]) == (m["radius"] > 0.32) == ("large" in s["txt"].decode())
        assert (ATTRIBUTES.index("outlined") in m["labels"]) == m["outlined"]
        for j in m["labels"]:
            label_counts[j] += 1
        im = decode(s)
        assert im.size == (32, 32) and im.mode == "RGB"
    assert index["label_counts"] == label_counts
    assert 0 < min(label_counts) and max(label_counts) < 60  # attributes vary

    # Same arguments -> byte-identical shards, whatever the number of workers; another seed differs.
    assert main(["demo", str(b), "--num-samples", "60", "--image-size", "32", "--shard-size", "25",
                 "--workers", "1", *Q]) == 0
    assert shard_bytes(a) == shard_bytes(b)
    assert index_without_time(a) == index_without_time(b)
    assert main(["demo", str(c), "--num-samples", "60", "--image-size", "32", "--shard-size", "25",
                 "--seed", "1", *Q]) == 0
    assert shard_bytes(a) != shard_bytes(c)


def test_demo_sample_rerenders_from_its_json(tmp_path):
    """The json holds the whole description of a demo picture: rendering it again gives the same bytes."""
    from shards.build import Item
    from shards.demo import produce_demo

    out = tmp_path / "d"
    assert main(["demo", str(out), "--num-samples", "40", "--image-size", "32", "--format", "png", *Q]) == 0
    samples = read_set(out)
    assert all("png" in s for s in samples.values())

    s0 = samples["000000"]
    item = Item(key="000000", cls=0, meta=meta(s0))
    data, ext, _ = produce_demo(item, size=32, seed=0, fmt="png")
    assert data == s0["png"]


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    out = tmp_path / "d"
    assert main(["demo", str(out), "--num-samples", "30", "--image-size", "16", "--shard-size", "10", *Q]) == 0
    urls = [str(out / s["name"]) for s in read_index(out)["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json", "txt")
    rows = list(ds)
    assert len(rows) == 30
    assert all(im.size == (16, 16) and 0 <= int(c) < 10 and "labels" in j and t for im, c, j, t in rows)


# ----------------------------------------------------------------------------------------------
# folder


def test_folder_labels_from_subfolders(tmp_path):
    src = tmp_path / "src"
    save(picture(seed=1), src / "cat" / "a.jpg", quality=90)
    save(picture(seed=2), src / "cat" / "b.png")
    save(picture(seed=3), src / "dog" / "c.JPG")
    save(picture(seed=4), src / "dog" / "deeper" / "d.jpeg")
    save(picture(seed=5), src / "dog" / ".hidden.jpg")
    (src / "dog" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), "--workers", "2", *Q]) == 0
    index = read_index(out)
    assert index["classes"] == ["cat", "dog"] and index["class_counts"] == [2, 2]
    assert index["source"]["kind"] == "folder" and index["image_policy"] == "original"
    samples = read_set(out)
    assert sorted(samples) == ["cat_a", "cat_b", "dog_c", "dog_deeper_d"]
    assert {k: int(s["cls"]) for k, s in samples.items()} == {"cat_a": 0, "cat_b": 0, "dog_c": 1, "dog_deeper_d": 1}
    # RGB JPEG/PNG inputs within size are stored as they are, byte for byte.
    assert samples["cat_a"]["jpg"] == (src / "cat" / "a.jpg").read_bytes()
    assert samples["cat_b"]["png"] == (src / "cat" / "b.png").read_bytes()
    assert meta(samples["dog_deeper_d"]) == {"source": "dog/deeper/d.jpeg", "class": "dog", "width": 48, "height": 32}
    assert (out / "bad_files.txt").read_text() == ""


def test_folder_unlabelled_and_no_shuffle_order(tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        save(picture(seed=i), src / f"img{i}.jpg")
    save(picture(seed=9), src / "more" / "x.jpg")  # not every image is in a sub-folder -> no labels
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), "--no-shuffle", "--shard-size", "4", "--workers", "1", *Q]) == 0
    index = read_index(out)
    assert index["classes"] == [] and "class_counts" not in index
    keys = [s["__key__"] for s in _in_order(out)]
    assert keys == ["img0", "img1", "img2", "img3", "img4", "more_x"]
    assert all("cls" not in s for s in _in_order(out))
    # Shuffled (the default): same keys, other order, fixed by the seed.
    out2, out3 = tmp_path / "o2", tmp_path / "o3"
    assert main(["folder", str(src), str(out2), "--shuffle-seed", "3", "--workers", "1", *Q]) == 0
    assert main(["folder", str(src), str(out3), "--shuffle-seed", "3", "--workers", "2", *Q]) == 0
    k2 = [s["__key__"] for s in _in_order(out2)]
    assert sorted(k2) == keys and k2 != keys
    assert shard_bytes(out2) == shard_bytes(out3)


def _in_order(out):
    from shards.check import iter_samples

    return [s for sh in read_index(out)["shards"] for s in iter_samples(str(out / sh["name"]))]


def test_odd_images_are_converted_or_reported(tmp_path):
    src = tmp_path / "src"
    base = picture(40, 24, seed=7)
    save(base.convert("L"), src / "gray.jpg")
    save(base.convert("CMYK"), src / "cmyk.jpg")
    rgba = base.convert("RGBA")
    px = np.array(rgba)
    px[:, :10, 3] = 0  # left columns fully transparent -> white after conversion
    save(Image.fromarray(px), src / "rgba.png")
    save(base.convert("P", palette=Image.ADAPTIVE, colors=16), src / "palette.png")
    deep = np.zeros((24, 40), dtype=np.uint16)
    deep[:, :20] = 65535
    deep[:, 20:] = 32896  # 128 * 257
    save(Image.fromarray(deep), src / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    save(base, src / "rotated.jpg", exif=exif.tobytes())
    save(base, src / "plain.webp", fmt="WEBP", quality=90)
    save(base, src / "anim.webp", fmt="WEBP", save_all=True, append_images=[base.rotate(90), base.rotate(180)])
    good = jpeg_bytes(base)
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "notanimage.jpg").write_text("hello, I am text")
    (src / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), "--workers", "2", *Q]) == 0

    samples = read_set(out)
    assert sorted(samples) == ["anim", "cmyk", "deep16", "gray", "palette", "plain", "rgba", "rotated"]
    for s in samples.values():
        assert decode(s).mode == "RGB"
    assert decode(samples["rotated"]).size == (24, 40)
    assert decode(samples["gray"]).size == (40, 24)
    assert meta(samples["rotated"])["width"] == 24
    a = np.asarray(decode(samples["deep16"])).astype(int)
    assert abs(a[:, :15].mean() - 255) < 3 and abs(a[:, 25:].mean() - 128) < 3  # scaled, not clipped
    a = np.asarray(decode(samples["rgba"])).astype(int)
    assert a[:, :8].min() > 245  # transparent -> white
    assert "webp" in samples["plain"]  # a WebP in RGB is kept as it is
    assert "jpg" in samples["anim"]  # an animation becomes its first frame

    report = dict(line.split("\t") for line in (out / "bad_files.txt").read_text().splitlines())
    assert sorted(k.rsplit("/", 1)[1] for k in report) == ["empty.png", "notanimage.jpg", "truncated.jpg"]
    reasons = {k.rsplit("/", 1)[1]: v for k, v in report.items()}
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert "not an image" in reasons["notanimage.jpg"] and "empty" in reasons["empty.png"]
    assert read_index(out)["num_bad"] == 3


def _png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one): IHDR bit depth 16, colour type 2."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_and_transparent_colour_pngs_become_8_bit_rgb(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    deep = np.zeros((16, 24, 3), dtype=np.uint16)
    deep[..., 0], deep[..., 1] = 65535, 32896  # 255 and 128 in 8 bits
    (src / "rgb16.png").write_bytes(_png16_rgb(deep))
    assert Image.open(src / "rgb16.png").mode == "RGB"  # what made the 16-bit bytes look keepable
    dark = np.full((16, 24), 255, dtype=np.uint16)  # 16-bit samples that all fit in 8 bits: still 16-bit, ~1
    save(Image.fromarray(dark), src / "dark16.png")
    keyed = np.array(picture(24, 16, seed=3))
    keyed[:, :8] = (10, 20, 30)
    save(Image.fromarray(keyed), src / "keyed.png", transparency=(10, 20, 30))
    save(picture(24, 16, seed=4), src / "plain.png")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    samples = read_set(out)

    assert "jpg" in samples["rgb16"] and samples["rgb16"].get("png") != (src / "rgb16.png").read_bytes()
    a = np.asarray(decode(samples["rgb16"])).astype(int)
    assert decode(samples["rgb16"]).mode == "RGB"
    assert abs(a[..., 0].mean() - 255) < 3 and abs(a[..., 1].mean() - 128) < 3 and a[..., 2].max() < 4
    a = np.asarray(decode(samples["dark16"])).astype(int)
    assert a.max() < 4  # dark stays dark (255 / 65535 of white), not white
    assert "jpg" in samples["keyed"]
    a = np.asarray(decode(samples["keyed"])).astype(int)
    assert a[:, :6].min() > 245  # the transparent colour -> white, as for RGBA and palettes
    assert samples["plain"]["png"] == (src / "plain.png").read_bytes()  # 8-bit RGB is still kept as it is


def test_max_size_reencodes_only_what_is_too_big(tmp_path):
    src = tmp_path / "src"
    save(picture(120, 80, seed=1), src / "big.jpg", quality=95)
    save(picture(120, 80, seed=2), src / "big.png")
    save(picture(30, 20, seed=3), src / "small.jpg")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), "--max-size", "40", "--quality", "80", *Q]) == 0
    samples = read_set(out)
    assert read_index(out)["image_policy"] == "max_side=40,quality=80,filter=bicubic"
    bigs = [s for s in samples.values() if meta(s)["source"].startswith("big")]
    assert len(bigs) == 2
    for s in bigs:
        assert "jpg" in s and decode(s).size == (40, 27)
        assert meta(s)["orig_width"] == 120 and meta(s)["width"] == 40
    assert samples["small"]["jpg"] == (src / "small.jpg").read_bytes()
    # The area filter gives the same sizes and other pixels.
    out2 = tmp_path / "out2"
    assert main(["folder", str(src), str(out2), "--max-size", "40", "--quality", "80", "--resize-filter", "area",
                 *Q]) == 0
    area = read_set(out2)
    assert decode(area["small"]).size == (30, 20) and area["big"]["jpg"] != samples["big"]["jpg"]
    assert decode(area["big"]).size == (40, 27)


def test_shard_bytes_limit(tmp_path):
    src = tmp_path / "src"
    for i in range(12):
        save(picture(64, 64, seed=i), src / f"{i:02d}.png")
    size = (src / "00.png").stat().st_size
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), "--shard-bytes", str(3 * size), "--shard-size", "100", *Q]) == 0
    shards = read_index(out)["shards"]
    assert len(shards) >= 3 and sum(s["num_samples"] for s in shards) == 12
    assert all(s["num_samples"] <= 4 for s in shards)


# ----------------------------------------------------------------------------------------------
# resume and output-folder safety


def _folder_with_bad(src, n=30):
    for i in range(n):
        save(picture(24, 16, seed=i), src / f"c{i % 3}" / f"{i:03d}.jpg")
    (src / "c0" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (src / "c2" / "aa_text.jpg").write_text("text")


@pytest.mark.slow
def test_interrupted_build_resumes_to_identical_result(tmp_path, capsys):
    src = tmp_path / "src"
    _folder_with_bad(src)
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--shard-size", "5", "--shuffle-seed", "1", "--quiet"]
    assert main(["folder", str(src), str(ref), "--workers", "1", *args]) == 0

    # A hard exit (as abrupt as kill -9) in the middle of the fourth shard.
    r = run_cli("folder", src, out, "--workers", "2", *args, env={"SHARDS_FAULT_AFTER": "17"})
    assert r.returncode == 75, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "000003.tar.tmp" in names and "000003.tar" not in names and "index.json" not in names
    assert [n for n in names if n.endswith(".tar")] == ["000000.tar", "000001.tar", "000002.tar"]
    from shards.sources import DataSourceError, resolve_sources

    with pytest.raises(DataSourceError, match="not finished"):
        resolve_sources(str(out))

    r = run_cli("folder", src, out, "--workers", "1", *args)
    assert r.returncode == 0, r.stderr
    assert "resuming after 3 complete shards" in r.stderr
    assert shard_bytes(out) == shard_bytes(ref)
    assert index_without_time(out) == index_without_time(ref)
    assert (out / "bad_files.txt").read_text() == (ref / "bad_files.txt").read_text() != ""
    assert not list(out.glob("*.tmp"))

    # Complete: a re-run does nothing; a deleted shard is rebuilt from there on.
    capsys.readouterr()
    assert main(["folder", str(src), str(out), *args]) == 0
    assert "nothing to do" in capsys.readouterr().err
    (out / "000004.tar").unlink()
    assert main(["folder", str(src), str(out), *args]) == 0
    assert shard_bytes(out) == shard_bytes(ref)


def test_output_folder_safety(tmp_path, capsys):
    src = tmp_path / "src"
    _folder_with_bad(src, n=6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000.tar").write_bytes(b"someone else's shard")
    (out / "keep.me").write_text("x")
    assert main(["folder", str(src), str(out), *Q]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert main(["folder", str(src), str(out), "--overwrite", *Q]) == 0
    assert (out / "keep.me").exists() and read_index(out)["num_samples"] == 6
    # Other options on a finished build: refused, unless --overwrite.
    assert main(["folder", str(src), str(out), "--shard-size", "2", *Q]) == 2
    assert "other inputs or options" in capsys.readouterr().err
    assert main(["folder", str(src), str(out), "--shard-size", "2", "--overwrite", *Q]) == 0
    assert len(read_index(out)["shards"]) == 3


def test_index_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    import os

    from shards.index import write_index

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_ino)) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", os.stat(a).st_ino)) or replace(a, b))
    write_index(tmp_path, source={"kind": "demo"}, shards=[{"name": "000000.tar", "num_samples": 1, "bytes": 10}])
    inode = (tmp_path / "index.json").stat().st_ino
    # data durable before the rename, and the rename itself made durable (the folder's fsync) after it
    assert events == [("fsync", inode), ("replace", inode), ("fsync", tmp_path.stat().st_ino)]


@pytest.mark.parametrize("content", ["", "{\"format\": \"vae-harness-shards/1\", \"shar"])
def test_finished_build_with_a_broken_index_writes_it_again(tmp_path, capsys, content):
    src = tmp_path / "src"
    _folder_with_bad(src, n=12)
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--shard-size", "5", "--quiet"]
    assert main(["folder", str(src), str(ref), *args]) == 0
    assert main(["folder", str(src), str(out), *args]) == 0
    (out / "index.json").write_text(content)  # as a crash right after an unsynced rename can leave it
    capsys.readouterr()
    assert main(["folder", str(src), str(out), *args]) == 0
    err = capsys.readouterr().err
    assert f"{out / 'index.json'}: " in err and "writing it again" in err and "Traceback" not in err
    assert index_without_time(out) == index_without_time(ref) and shard_bytes(out) == shard_bytes(ref)
    assert (out / "bad_files.txt").read_text() == (ref / "bad_files.txt").read_text() != ""
    assert main(["folder", str(src), str(out), *args]) == 0
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["folder", "{tmp}/nope", "{tmp}/out"], "no such folder"),
    (["imagenet", "{tmp}/nope", "{tmp}/out"], "no such folder"),
    (["coco", "--images", "{tmp}", "--instances", "{tmp}/missing.json", "{tmp}/out"], "not found"),
    (["coco", "--images", "{tmp}/empty", "--require-labels", "{tmp}/out"], "needs --instances"),
    (["folder", "{tmp}/empty", "{tmp}/out"], "no image files"),
    (["demo", "{tmp}/file.txt"], "not a folder"),
    (["verify", "{tmp}/nope"], "no such folder"),
    (["inspect", "{tmp}/empty"], "no .tar shards"),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_bad_option_values_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["folder", "a", "b", "--shard-bytes", "lots"])
    assert e.value.code == 2 and "not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["folder", "a", "b", "--workers", "0"])
    assert "at least 1" in capsys.readouterr().err


def test_cli_error_exit_code_and_no_traceback(tmp_path):
    r = run_cli("folder", tmp_path / "missing", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--help")
    assert r.returncode == 0 and "imagenet" in r.stdout and "coco" in r.stdout and "verify" in r.stdout


def test_max_samples_and_index_contract(tmp_path):
    src = tmp_path / "src"
    for i in range(10):
        save(picture(20, 20, seed=i), src / f"{i}.png")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), "--max-samples", "4", *Q]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "vae-harness-shards/1" and index["num_samples"] == 4
    assert set(index["shards"][0]) == {"name", "num_samples", "bytes"}
    assert index["shards"][0]["bytes"] == (out / "000000.tar").stat().st_size
    assert index["source"]["options"]["max_samples"] == 4


def test_pickle_never_written(tmp_path):
    out = tmp_path / "d"
    assert main(["demo", str(out), "--num-samples", "12", "--image-size", "16", *Q]) == 0
    for s in read_set(out).values():
        assert set(s) <= {"__key__", "jpg", "cls", "json", "txt"}
        json.loads(s["json"])
        int(s["cls"])
        Image.open(io.BytesIO(s["jpg"])).verify()


def test_all_inputs_bad_is_an_error_without_index(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_text("no")
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "none of the 2 inputs is a usable image" in err[-1]
    assert not (out / "index.json").exists() and len((out / "bad_files.txt").read_text().splitlines()) == 2


def test_two_builds_cannot_share_a_folder(tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".build.lock", "w") as held:  # (not `.lock`: a run folder's)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["demo", str(out), "--num-samples", "5", "--image-size", "8", *Q]) == 2
        assert "another build" in capsys.readouterr().err
    assert main(["demo", str(out), "--num-samples", "5", "--image-size", "8", *Q]) == 0


def test_ctrl_c_leaves_no_partial_shard_and_resumes(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    _folder_with_bad(src, n=20)
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--shard-size", "4", "--quiet"]
    assert main(["folder", str(src), str(ref), *args]) == 0
    monkeypatch.setenv("SHARDS_FAULT_AFTER", "10:interrupt")
    assert main(["folder", str(src), str(out), "--workers", "2", *args]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.tar*")) == ["000000.tar", "000001.tar"]
    monkeypatch.delenv("SHARDS_FAULT_AFTER")
    assert main(["folder", str(src), str(out), "--workers", "2", *args]) == 0
    assert shard_bytes(out) == shard_bytes(ref)


def test_folder_single_subfolder_is_not_a_class(tmp_path):
    src = tmp_path / "src"
    save(picture(seed=1), src / "train" / "a" / "x.jpg")
    save(picture(seed=2), src / "train" / "b" / "y.jpg")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    assert read_index(out)["classes"] == []
    assert main(["folder", str(src / "train"), str(tmp_path / "o2"), *Q]) == 0
    assert read_index(tmp_path / "o2")["classes"] == ["a", "b"]
