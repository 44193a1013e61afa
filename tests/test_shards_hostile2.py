"""Hostile inputs to the shard builders, second round: file names that are not UTF-8, a folder link
loop, unreadable and empty class folders, a stray image beside class folders, malformed EXIF,
images over the loader's pixel limit, float images, a truncated shard in `inspect`, SIGTERM during
a build, and COCO annotation files that contradict themselves or point outside --images.

Each test fails on the code before its fix: it checks what the user gets (exit code, one line,
bad_files.txt, the shards), never only that nothing raised.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageOps
from shards_helpers import ROOT, decode, jpeg_bytes, meta, picture, read_set, save, tiny_coco

import shards.decode as dec
import shards.images as images_mod
from shards.__main__ import main
from shards.build import make_key, unique_keys
from shards.decode import BadSample, DecodeSpec, guarded
from shards.index import read_index

Q = ["--quiet", "--workers", "1"]


def bad_files(out) -> dict[str, str]:
    text = (out / "bad_files.txt").read_bytes().decode("utf-8")  # UTF-8, whatever the input's names were
    return dict(line.split("\t") for line in text.splitlines())


def one_line_error(err: str, *needles: str):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], err


# ----------------------------------------------------------------------------------------------
# 1. file names that are not UTF-8


def test_file_names_that_are_not_utf8_build_and_are_reported_readably(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    raw = os.fsencode(src)
    try:
        for name, seed in ((b"caf\xe9.jpg", 1), (b"x" * 90 + b"\xe9.jpg", 2), (b"x" * 90 + b"\xe8.jpg", 3)):
            picture(seed=seed).save(raw + b"/" + name, "JPEG")
        with open(raw + b"/broken\xe9.jpg", "wb") as f:
            f.write(b"not a picture")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0

    samples = read_set(out)
    assert len(samples) == 3 and len(set(samples)) == 3  # long names cut to a hash stay distinct
    sources = sorted(meta(s)["source"] for s in samples.values())
    assert "caf\\xe9.jpg" in sources  # the undecodable byte, written out as text
    assert bad_files(out) == {f"{src}/broken\\xe9.jpg": "not an image PIL can read"}
    assert read_index(out)["num_bad"] == 1


def test_keys_of_names_that_are_not_utf8():
    a, b = "x" * 100 + "\udce9", "x" * 100 + "\udce8"  # how Python holds the bytes \xe9 / \xe8 of a file name
    assert make_key(a) != make_key(b) and len(make_key(a)) <= 80
    assert len(set(unique_keys(["caf\udce9", "caf\udce8", "caf"]))) == 3


# ----------------------------------------------------------------------------------------------
# 2. a link back up the tree


def test_a_folder_link_loop_is_read_once_with_a_note(tmp_path, capsys):
    src = tmp_path / "src"
    for c in ("a", "b"):
        for j in range(2):
            save(picture(seed=j), src / c / "sub" / f"{j}.jpg")
    (src / "a" / "sub" / "up").symlink_to("..")  # src/a/sub/up/sub/up/... : the same folder again and again
    outside = tmp_path / "elsewhere" / "c"  # a class folder kept elsewhere and linked in: still read
    save(picture(seed=5), outside / "0.jpg")
    (src / "c").symlink_to(outside)
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    index = read_index(out)
    assert index["num_samples"] == 5 and index["classes"] == ["a", "b", "c"]
    assert sorted(meta(s)["source"] for s in read_set(out).values()) == [
        "a/sub/0.jpg", "a/sub/1.jpg", "b/sub/0.jpg", "b/sub/1.jpg", "c/0.jpg"]
    err = capsys.readouterr().err
    assert "skipped 1 links to folders already read" in err and "a/sub/up" in err


# ----------------------------------------------------------------------------------------------
# 3. malformed EXIF


def jpeg_with_malformed_exif() -> bytes:
    """EXIF that claims BigTIFF and is cut short: PIL's EXIF parser raises (struct.error) on it."""
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buf, "JPEG", exif=b"Exif\x00\x00II+\x00\x08\x00\x00\x00",
                                                    dpi=(72, 72))
    return buf.getvalue()


def test_a_malformed_exif_block_is_stripped_by_the_builder(tmp_path, capsys):
    data = jpeg_with_malformed_exif()
    with pytest.raises(struct.error):  # what every reader that honours EXIF (the loader too) does with it
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.jpg").write_bytes(data)
    save(picture(seed=1), src / "y.jpg")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    stored = read_set(out)["x"]["jpg"]
    assert stored != data and not Image.open(io.BytesIO(stored)).getexif()  # re-encoded, without EXIF
    assert decode(read_set(out)["x"]).size == (48, 40)
    sample = {"__key__": "x", "jpg": stored}
    assert not isinstance(guarded(sample, DecodeSpec(32), random.Random(0)), BadSample)  # the loader reads it
    capsys.readouterr()
    assert main(["verify", str(out), "--workers", "1"]) == 0, capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# 4. the loader's pixel limit


def test_the_builder_skips_what_the_loader_would_skip_for_its_size(tmp_path, monkeypatch):
    assert dec.MAX_PIXELS is images_mod.MAX_PIXELS  # one limit, not two that happen to agree
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 40 * 30 - 1)  # as a 12000x12000 picture against 64 Mpx
    src = tmp_path / "src"
    save(picture(40, 30, seed=1), src / "big.png")
    save(picture(20, 10, seed=2), src / "small.png")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    assert sorted(read_set(out)) == ["small"]
    (reason,) = bad_files(out).values()
    assert "40x30" in reason and "data.max_pixels" in reason and "--max-size" in reason
    # With --max-size the stored picture is small: kept.
    assert main(["folder", str(src), str(tmp_path / "o2"), "--max-size", "20", *Q]) == 0
    assert decode(read_set(tmp_path / "o2")["big"]).size == (20, 15)


# ----------------------------------------------------------------------------------------------
# 5. an image beside the class folders


def test_a_stray_image_beside_class_folders_is_skipped_not_unlabelling_the_set(tmp_path, capsys):
    src = tmp_path / "src"
    for c in ("cat", "dog"):
        for j in range(2):
            save(picture(seed=j), src / c / f"{j}.jpg")
    save(picture(seed=9), src / "stray.jpg")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    index = read_index(out)
    assert index["classes"] == ["cat", "dog"] and index["class_counts"] == [2, 2] and index["num_bad"] == 1
    assert all(int(s["cls"]) in (0, 1) for s in read_set(out).values())
    assert bad_files(out) == {str(src / "stray.jpg"): "not inside a class sub-folder"}
    assert "1 images lie beside the class sub-folders" in capsys.readouterr().err
    # --no-labels keeps every image, unlabelled
    assert main(["folder", str(src), str(tmp_path / "o2"), "--no-labels", *Q]) == 0
    assert read_index(tmp_path / "o2")["num_samples"] == 5 and read_index(tmp_path / "o2")["classes"] == []


# ----------------------------------------------------------------------------------------------
# 6. unreadable and empty class folders


def test_an_unreadable_folder_is_skipped_named_and_listed(tmp_path, capsys, monkeypatch):
    """`lost+found` on a disk's root, read by a user: the build goes on without it, says so in a note and
    lists it in bad_files.txt (the user may not be able to move it or change its permissions)."""
    src = tmp_path / "src"
    for c in ("a", "c", "n01440764", "n01443537"):
        save(picture(seed=1), src / c / "0.jpg")
    (src / "b").mkdir()
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith(f"{os.sep}b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for command, classes in ((["folder", str(src)], ["a", "c", "n01440764", "n01443537"]),
                             (["imagenet", str(src)], ["n01440764", "n01443537"])):
        out = tmp_path / command[0]
        assert main([*command, str(out), *Q]) == 0
        err = capsys.readouterr().err
        assert f"1 folders cannot be read: skipped, listed in bad_files.txt ({src / 'b'})" in err, err
        assert "hold no images" not in err  # said once, as unreadable
        assert read_index(out)["classes"] == classes
        assert f"{src / 'b'}\tcannot read this folder (Permission denied)" in (out / "bad_files.txt").read_text()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_folder_for_real(tmp_path, capsys):
    src = tmp_path / "src"
    for c in ("a", "b", "c"):
        save(picture(seed=1), src / c / "0.jpg")
    (src / "b").chmod(0)
    try:
        assert main(["folder", str(src), str(tmp_path / "out"), *Q]) == 0
    finally:
        (src / "b").chmod(0o755)
    assert "1 folders cannot be read" in capsys.readouterr().err
    assert read_index(tmp_path / "out")["classes"] == ["a", "c"]


def test_empty_class_folders_keep_every_later_class_index(tmp_path, capsys):
    syn = ["n01440764", "n01443537", "n01484850"]
    src = tmp_path / "train"
    for s in (syn[0], syn[2]):
        save(picture(seed=1), src / s / f"{s}_0.JPEG")
    (src / syn[1]).mkdir()
    out = tmp_path / "out"
    assert main(["imagenet", str(src), str(out), *Q]) == 0
    index = read_index(out)
    assert index["classes"] == syn and index["class_counts"] == [1, 0, 1]
    assert {meta(s)["synset"]: int(s["cls"]) for s in read_set(out).values()} == {syn[0]: 0, syn[2]: 2}
    assert "1 of 3 classes have no images" in capsys.readouterr().err

    # any folder: a sub-folder without images (a zip's __MACOSX, annotations/) is no class, with a note;
    # a --classes file that names it keeps it, with 0 samples
    folder = tmp_path / "folder"
    for c in ("a", "c"):
        save(picture(seed=1), folder / c / "0.jpg")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "readme.txt").write_text("not an image")
    assert main(["folder", str(folder), str(tmp_path / "o2"), *Q]) == 0
    assert read_index(tmp_path / "o2")["classes"] == ["a", "c"]
    assert "1 sub-folders hold no images and are not classes (__MACOSX)" in capsys.readouterr().err
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    assert main(["folder", str(folder), str(tmp_path / "o3"), "--classes", str(tmp_path / "classes.txt"), *Q]) == 0
    assert read_index(tmp_path / "o3")["classes"] == ["a", "b", "c"]
    assert read_index(tmp_path / "o3")["class_counts"] == [1, 0, 1]


# ----------------------------------------------------------------------------------------------
# 7. inspect on a shard cut at a member boundary


def test_inspect_reports_a_shard_cut_at_a_member_boundary(tmp_path, capsys):
    src = tmp_path / "src"
    for j in range(3):
        save(picture(seed=j), src / f"{j}.jpg")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    shard = out / "000000.tar"
    with tarfile.open(shard) as tf:
        cut = tf.getmembers()[2].offset  # a member boundary: tarfile itself sees nothing wrong
    shard.write_bytes(shard.read_bytes()[:cut])
    capsys.readouterr()
    assert main(["inspect", str(shard)]) == 0
    assert "000000.tar: broken tar after" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# 8. SIGTERM


@pytest.mark.parametrize("workers, kind", [("1", "term"), ("2", "term"), ("2", "term-group")])
def test_sigterm_stops_a_build_like_ctrl_c(tmp_path, workers, kind):
    """term: SIGTERM to the writer only (kill PID); term-group: to every process of the build (SLURM)."""
    src = tmp_path / "src"
    for j in range(24):
        save(picture(seed=j), src / f"{j:02d}.jpg")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SHARDS_FAULT_AFTER=f"9:{kind}")
    cmd = [sys.executable, "-m", "shards", "folder", str(src), str(out), "--shard-size", "4", "--quiet",
           "--workers", workers]
    # A session of its own: the signal to the process group must not reach pytest.
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=str(ROOT),
                       start_new_session=True)
    assert r.returncode == 75, r.stderr  # as launch/train.py after SIGTERM: stopped, run again to go on
    assert r.stderr.strip() == "shards folder: interrupted; run the same command again to resume", r.stderr
    assert sorted(p.name for p in out.glob("*.tar*")) == ["000000.tar", "000001.tar"]  # no half-written shard
    env.pop("SHARDS_FAULT_AFTER")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=str(ROOT))
    assert r.returncode == 0 and read_index(out)["num_samples"] == 24, r.stderr


# ----------------------------------------------------------------------------------------------
# 9. COCO annotation files that contradict themselves or point elsewhere


def _coco(tmp_path, edit_instances=None, edit_captions=None):
    images, inst, caps = tiny_coco(tmp_path)
    for path, edit in ((inst, edit_instances), (caps, edit_captions)):
        if edit is not None:
            data = json.loads(path.read_text())
            edit(data)
            path.write_text(json.dumps(data))
    return ["coco", "--images", str(images), "--instances", str(inst), "--captions", str(caps),
            str(tmp_path / "out"), *Q]


@pytest.mark.parametrize("edit_instances, edit_captions, message", [
    (lambda d: d["categories"].append({"id": 1, "name": "phantom"}), None,
     "category id 1 is listed more than once ('person', 'phantom')"),
    (lambda d: d["images"].append({"id": 9, "file_name": "000000000025.jpg"}), None,
     "image id 9 is listed twice, with different file names"),
    (None, lambda d: d["images"][0].update(file_name="000000000030.jpg"),
     "image id 9 is listed twice, with different file names"),
])
def test_coco_contradictions_are_one_line_errors(tmp_path, capsys, edit_instances, edit_captions, message):
    assert main(_coco(tmp_path, edit_instances, edit_captions)) == 2
    one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()


def test_coco_file_names_outside_the_images_folder_are_not_read(tmp_path, capsys):
    secret = tmp_path / "secret.jpg"  # a readable picture outside --images: it must not end up in a shard
    save(picture(seed=3), secret)

    def edit(d):
        d["images"][0]["file_name"] = "../secret.jpg"
        d["images"][1]["file_name"] = str(secret)
        d["images"][3]["file_name"] = "a\u0000.jpg"  # no file can be called that

    assert main(_coco(tmp_path, edit, edit)) == 0
    assert [meta(s)["image_id"] for s in read_set(tmp_path / "out").values()] == [30]
    reasons = bad_files(tmp_path / "out")
    outside = {k: v for k, v in reasons.items() if "outside --images" in v}
    assert len(outside) == 2 and any("image 9:" in v for v in outside.values())
    assert any("cannot read" in v for v in reasons.values())  # the NUL name: a bad file, not a crash
    assert "skipped 2 images whose file_name names no file inside" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 10. float images


def _tiff_f(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), "F").save(buf, "TIFF")
    return buf.getvalue()


def test_float_images_outside_0_1_are_skipped_not_guessed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ramp = np.linspace(0, 1, 12 * 10).reshape(10, 12)
    (src / "unit.tif").write_bytes(_tiff_f(ramp))
    (src / "over.tif").write_bytes(_tiff_f(ramp * 1.2))
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    a = np.asarray(decode(read_set(out)["unit"])).astype(int)
    assert a.max() > 240 and a.min() < 15  # [0, 1] spans black to white
    assert bad_files(out) == {str(src / "over.tif"): "float image with values outside [0, 1]: its brightness "
                                                     "scale is unknown"}
    # the loader (foreign shards) says the same, as a bad sample, not a crash or a dark picture
    out_ = guarded({"__key__": "f", "jpg": _tiff_f(ramp * 1.2)}, DecodeSpec(8), random.Random(0))
    assert isinstance(out_, BadSample) and "outside [0, 1]" in out_.reason
    assert not isinstance(guarded({"__key__": "g", "jpg": jpeg_bytes(picture())}, DecodeSpec(8), random.Random(0)),
                          BadSample)


def test_a_png_with_a_broken_pixel_stream_is_refused_by_the_builder():
    """PIL decodes a PNG's pixels to look for its EXIF; the orientation check took the decoding error for
    "no EXIF" and the builder re-encoded a half-decoded image."""
    import numpy as np

    from shards.images import BadImage, process_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(BadImage, match="cannot decode: broken data stream"):
        process_image(bytes(data))


# ----------------------------------------------------------------------------------------------
# a hostile review of the builders (helper): the output folder among the inputs, a crash in the first shard


@pytest.mark.parametrize("kind", ["folder", "imagenet"])
def test_an_output_folder_that_holds_input_images_or_is_the_input_is_refused(tmp_path, capsys, kind):
    """`imagenet SRC SRC/n01440764` built without that class (every later class index one lower), silently."""
    src = tmp_path / "src"
    for c in ("n01440764", "n01443537"):
        for j in range(2):
            save(picture(seed=j), src / c / f"{c}_{j}.JPEG")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for out, says in ((src / "n01440764", "lies inside the input folder and holds its images"),
                      (src, "is the input folder")):
        assert main([kind, str(src), str(out), *Q]) == 2
        one_line_error(capsys.readouterr().err, says)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # nothing written among the inputs
    assert main([kind, str(src), str(src / "shards"), *Q]) == 0  # a new folder inside the input: fine
    assert read_index(src / "shards")["num_samples"] == 4


def test_a_build_killed_in_its_first_shard_goes_on_with_the_same_command(tmp_path, capsys):
    src = tmp_path / "src"
    for j in range(6):
        save(picture(seed=j), src / "a" / f"{j}.jpg")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "shards", "folder", str(src), str(out), *Q, "--shard-size", "40"],
                       env=dict(os.environ, SHARDS_FAULT_AFTER="3"), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and (out / "000000.tar.tmp").exists() and not (out / ".progress.json").exists()
    assert main(["folder", str(src), str(out), *Q, "--shard-size", "40"]) == 0  # was "shards not made by this"
    assert read_index(out)["num_samples"] == 6 and not (out / "000000.tar.tmp").exists()


def test_a_shard_size_past_a_float_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", str(tmp_path / "d"), "--shard-bytes", "1e400", *Q])
    assert "not a size: '1e400'" in capsys.readouterr().err


def test_a_demo_past_the_loaders_pixel_limit_a_broken_link_as_out_and_deep_json_are_one_line(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "d"), "--image-size", "8200", *Q]) == 2  # every sample skipped in training
    one_line_error(capsys.readouterr().err, "--image-size must be in 8..8000")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert main(["demo", str(tmp_path / "link"), "--num-samples", "4", "--image-size", "16", *Q]) == 2
    one_line_error(capsys.readouterr().err, "a link to", "which does not exist")
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "index.json").write_text("[" * 100000)
    with pytest.raises(ValueError, match="nested too deep"):
        read_index(deep)


def test_names_with_tabs_and_newlines_are_one_line_each_in_bad_files(tmp_path):
    """bad_files.txt is a line per input, path<TAB>reason: a tab or a newline in a file name used to split
    its line in two (or add a field); now written as \\t, \\n (every non-printable character escaped)."""
    src = tmp_path / "src"
    src.mkdir()
    picture(seed=1).save(src / "good.jpg", "JPEG")
    for name in ("tab\there.jpg", "new\nline.jpg", "ctrl\x1c.jpg"):
        (src / name).write_bytes(b"not a picture")
    out = tmp_path / "out"
    assert main(["folder", str(src), str(out), *Q]) == 0
    text = (out / "bad_files.txt").read_text()
    assert len(text.splitlines()) == 3 and all(line.count("\t") == 1 for line in text.splitlines())
    assert set(bad_files(out)) == {f"{src}/tab\\there.jpg", f"{src}/new\\nline.jpg", f"{src}/ctrl\\x1c.jpg"}


def test_a_brace_range_with_a_digit_too_many_is_refused_before_it_fills_memory(tmp_path, monkeypatch):
    """{000000..99999999} named 100 million shards, all expanded (gigabytes, minutes) before the first
    was checked; now refused past two million (here 1,000), counted from the text before any expansion."""
    import shards.sources as sources

    assert sources.MAX_PATTERN_SHARDS >= 500_000  # LAION-5B's img2dataset shards fit
    monkeypatch.setattr(sources, "MAX_PATTERN_SHARDS", 1000)
    with pytest.raises(sources.DataSourceError, match=r"names more than 1,000 shards \(a range with a digit too many"):
        sources.resolve_sources(str(tmp_path / "{000000..99999999}.tar"))


def test_coco_file_listed_under_two_ids_is_noted(tmp_path, capsys):
    """Two image ids with one file_name: the picture is stored twice (each id its own sample and
    annotations); that used to pass without a word."""
    assert main(_coco(tmp_path, lambda d: d["images"].append({"id": 77, "file_name": "000000000025.jpg"}))) == 0
    err = capsys.readouterr().err
    assert "1 files are listed under more than one image id (first: '000000000025.jpg' as ids 25, 77)" in err, err
    ids = sorted(meta(s)["image_id"] for s in read_set(tmp_path / "out").values())
    assert ids == [9, 25, 30, 77]
