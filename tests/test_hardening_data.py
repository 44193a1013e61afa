"""Hostile data (issue 12, the data side): every input here is built by the test itself.

What the data does wrong is a skipped, counted, named bad sample; a stream with nothing readable
stops with one line; `shards verify` reports everything the loader would skip (same decoder);
a resume after bad samples replays the uninterrupted stream exactly.
"""

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from shardgen import forged_tar_header, image_bytes

from harness import tario
from harness.config import DataConfig
from harness.data import DataStalledError, TrainLoader, decode
from shards.check import verify
from shards.decode import MAX_PIXELS, BadSample, DecodeSpec, guarded
from shards.index import write_index

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Hostile inputs
# ---------------------------------------------------------------------------------------------


def jpeg_with_malformed_exif() -> bytes:
    """A JPEG whose EXIF block claims BigTIFF but is cut short: PIL's EXIF parser raises struct.error.
    The JFIF density (dpi) keeps PIL from reading the EXIF while opening, so the error comes later,
    in exif_transpose, which is where it used to kill training."""
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buf, "JPEG", exif=b"Exif\x00\x00II+\x00\x08\x00\x00\x00",
                                                    dpi=(72, 72))
    return buf.getvalue()


def png_with_a_flipped_byte() -> bytes:
    """A PNG of noise with one byte of its compressed pixels flipped: zlib's stream breaks mid-image."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def png_header_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid greyscale PNG of width x height black pixels (100 megapixels: about 100 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    z, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


GOOD = 24  # good samples per shard


def write_set(out: Path, evil: list[dict], *, shards: int = 2, label_names=(), extra_files: dict = None) -> Path:
    """`shards` shards of GOOD good samples (cls i % 4); the `evil` samples go into shard 0."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for n in range(shards):
        name = f"{n:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for i in range(GOOD):
                k = n * GOOD + i
                s = {"__key__": f"s{k:05d}", "jpg": image_bytes(k, 40), "cls": str(k % 4)}
                if label_names:
                    s["json"] = json.dumps({"labels": [k % len(label_names)]})
                w.write(s)
                if n == 0 and i % 5 == 2 and evil:
                    w.write(evil[(i // 5) % len(evil)] | {"__key__": f"evil{i:02d}"})
        entries.append({"name": name, "num_samples": GOOD})
    for name, content in (extra_files or {}).items():
        (out / name).write_bytes(content)
        entries.append({"name": name, "num_samples": 1})
    write_index(out, source={"kind": "test"}, shards=entries, classes=[f"c{i}" for i in range(4)],
                label_names=list(label_names))
    return out


def cfg(path, **kw):
    return DataConfig(**{"train": str(path), "image_size": 32, "num_workers": 0, "shuffle_buffer": 16, **kw})


def read_batches(loader, n, start=0):
    it = loader.batches(start)
    return [next(it) for _ in range(n)]


CASES = {
    "cls outside the model's classes": ({"jpg": image_bytes(1), "cls": b"9"}, {"num_classes": 4}, "cls 9 outside 0..3"),
    "negative cls": ({"jpg": image_bytes(1), "cls": b"-1"}, {"num_classes": 4}, "cls -1 outside 0..3"),
    "cls not a number": ({"jpg": image_bytes(1), "cls": b"\xff\xfe"}, {}, "is not an integer"),
    "no cls in a conditional run": ({"jpg": image_bytes(1)}, {"num_classes": 4}, "no cls"),
    "json syntax": ({"jpg": image_bytes(1), "cls": b"1", "json": b"{oops"}, {"labels": 3}, "json does not parse"),
    "json labels not a list": ({"jpg": image_bytes(1), "cls": b"1", "json": b'{"labels": "1"}'}, {"labels": 3},
                               "no labels list"),
    "json labels out of range": ({"jpg": image_bytes(1), "cls": b"1", "json": b'{"labels": [7]}'}, {"labels": 3},
                                 "outside 0..2"),
    "json not utf-8": ({"jpg": image_bytes(1), "cls": b"1", "json": b"\xff\xfe\xfa"}, {"labels": 3},
                       "json does not parse"),
    "100 megapixel png": ({"png": png_header_bomb(), "cls": b"1"}, {}, "100 megapixels, over data.max_pixels"),
    "no image": ({"txt": b"a caption", "cls": b"1"}, {}, "no image"),
    "truncated jpeg": ({"jpg": image_bytes(3)[:200], "cls": b"1"}, {}, "jpg does not decode"),
    # PIL decodes a PNG's pixels to look for its EXIF: an error there must not pass for "no EXIF"
    "png with a broken pixel stream": ({"png": png_with_a_flipped_byte(), "cls": b"1"}, {}, "broken data stream"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_samples_are_skipped_counted_and_named(tmp_path, case):
    evil, opts, reason = CASES[case]
    labels = [f"l{i}" for i in range(opts.get("labels", 0))]
    out = write_set(tmp_path / "set", [evil], shards=1, label_names=labels)
    loader = TrainLoader(cfg(out, shuffle_buffer=0), rank=0, world_size=1, batch_size=4,
                         num_classes=opts.get("num_classes", 0))
    batches = read_batches(loader, loader.batches_per_epoch)
    keys = [k for b in batches for k in b["key"]]
    assert not any(k.startswith("evil") for k in keys)
    assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)  # batches stay full
    assert sum(b["bad"] for b in batches) >= 1
    errors = [b["bad_error"] for b in batches if b["bad"]]
    assert any("evil" in e and reason in e and "000000.tar" in e for e in errors), errors
    assert all("\n" not in e for e in errors)
    if opts.get("num_classes"):
        assert all(0 <= c < 4 for b in batches for c in b["cls"].tolist())  # nothing reaches nn.Embedding


def test_the_pixel_limit_is_read_from_the_header_before_any_decoding(monkeypatch):
    from PIL import ImageFile

    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")  # raised in a test frame: a bug, it would propagate

    bomb = {"__key__": "bomb", "__url__": "x.tar", "png": png_header_bomb()}
    assert len(bomb["png"]) < 200_000
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decoding)
        out = guarded(bomb, DecodeSpec(32), random.Random(0))
    assert isinstance(out, BadSample) and "100 megapixels" in out.reason
    small = {"__key__": "small", "png": image_bytes(0, 40, fmt="PNG")}
    assert isinstance(guarded(small, DecodeSpec(32, max_pixels=1000), random.Random(0)), BadSample)
    assert not isinstance(guarded(small, DecodeSpec(32, max_pixels=0), random.Random(0)), BadSample)
    assert DataConfig().max_pixels == MAX_PIXELS  # the loader's and verify's defaults agree


def test_a_bug_of_ours_is_not_a_bad_sample(monkeypatch):
    import shards.decode as dec

    def buggy(*a, **k):
        raise KeyError("a bug in our own code")

    monkeypatch.setattr(dec, "parse_cls", buggy)
    with pytest.raises(KeyError, match="a bug"):
        guarded({"__key__": "k", "jpg": image_bytes(0), "cls": b"1"}, DecodeSpec(32), random.Random(0))


@pytest.mark.parametrize("bad_file, reason", [
    (b"", "empty tar"),
    (forged_tar_header(b"k0.jpg", b"\x80" + b"\xff" * 11) + b"x" * 512, "runs past the end"),
    (forged_tar_header(b"k0.jpg", b"77777777777\0") + b"x" * 512, "runs past the end"),
    (b"this is no tar file " * 40, "checksum"),
])
def test_a_broken_or_empty_shard_among_good_ones_is_counted(tmp_path, bad_file, reason):
    out = write_set(tmp_path / "set", [], extra_files={"000009.tar": bad_file})
    loader = TrainLoader(cfg(out), rank=0, world_size=1, batch_size=4)
    batches = read_batches(loader, 3 * loader.batches_per_epoch)
    errors = [b["bad_error"] for b in batches if b["bad"]]
    assert errors and all("000009.tar" in e and reason in e for e in errors), errors


# ---------------------------------------------------------------------------------------------
# Nothing readable: one line, within seconds, signals still work
# ---------------------------------------------------------------------------------------------


def empty_set(out: Path, n: int = 3) -> Path:
    out.mkdir(parents=True)
    for i in range(n):
        (out / f"{i:06d}.tar").write_bytes(b"")
    write_index(out, source={"kind": "test"}, shards=[{"name": f"{i:06d}.tar", "num_samples": 8} for i in range(n)])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_all_empty_shards_stop_with_one_line(tmp_path, workers):
    loader = TrainLoader(cfg(empty_set(tmp_path / "empty"), num_workers=workers), rank=0, world_size=1, batch_size=4)
    with pytest.raises(DataStalledError) as e:
        next(loader.batches())
    msg = str(e.value)
    assert "\n" not in msg and "in a row could not be read" in msg and "empty tar" in msg, msg


def trainer(shards, run, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "launch/train.py"), "--config",
                             str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_over_empty_shards_exits_2_with_one_line(tmp_path, workers):
    p = trainer(empty_set(tmp_path / "empty"), tmp_path / "run", f"data.num_workers={workers}")
    out, err = p.communicate(timeout=180)
    assert p.returncode == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and "in a row could not be read" in lines[-1], err[-2000:]


@pytest.mark.slow
def test_sigterm_ends_a_run_over_empty_shards(tmp_path):
    p = trainer(empty_set(tmp_path / "empty"), tmp_path / "run", "data.num_workers=2")
    time.sleep(5)  # start-up, then the loader is reading empty shards (or has already given up)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)  # a hang fails here
    assert p.returncode in (2, 75, -signal.SIGTERM), p.returncode  # gave up, stopped, or killed while starting


# ---------------------------------------------------------------------------------------------
# verify: the loader's own decoder
# ---------------------------------------------------------------------------------------------


def loader_bad_keys(loader, out: Path) -> set[str]:
    """Keys the training loader skips, read with its own reader and decoder over every shard once."""
    bad = set()
    for url in sorted(str(p) for p in out.glob("*.tar")):
        for item in tario.shard_samples(url):
            got = decode(item, loader.dataset.decoder, random.Random(0))
            if isinstance(got, BadSample) and got.key:
                bad.add(got.key)
    return bad


def verify_report(out: Path, capsys) -> tuple[int, str]:
    n = verify(str(out))
    return n, capsys.readouterr().out


@pytest.mark.slow
def test_verify_fails_on_everything_the_loader_skips(tmp_path, capsys):
    evil = [CASES[c][0] for c in CASES if not CASES[c][1].get("num_classes")]
    out = write_set(tmp_path / "set", evil, label_names=["a", "b", "c"])
    loader = TrainLoader(cfg(out), rank=0, world_size=1, batch_size=4)
    skipped = loader_bad_keys(loader, out)
    assert len(skipped) >= 5
    n, report = verify_report(out, capsys)
    assert n > 0 and "FAILED" in report
    flagged = {line.split()[1].rstrip(":") for line in report.splitlines() if line.startswith("  000000.tar ")}
    assert skipped <= flagged, skipped - flagged


def test_a_malformed_exif_block_leaves_a_good_picture_good(tmp_path, capsys):
    """PIL's EXIF parser raises on the block (exif_transpose would): the picture decodes as stored,
    in verify and in the loader alike (it used to be a bad sample every epoch)."""
    import random

    from shards.decode import load_image

    pixels = load_image(jpeg_with_malformed_exif(), 32, "center", False, random.Random(0))
    assert pixels.shape == (32, 32, 3) and abs(int(pixels[16, 16, 0]) - 200) < 8
    out = write_set(tmp_path / "set", [{"jpg": jpeg_with_malformed_exif(), "cls": b"1"}], shards=1)
    _, report = verify_report(out, capsys)  # (the set's index does not count the planted sample)
    assert "evil" not in report and "does not decode" not in report, report
    loader = TrainLoader(cfg(out), rank=0, world_size=1, batch_size=4)
    assert loader_bad_keys(loader, out) == set()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_loader_turns_pictures_upright_as_pil_does(orientation):
    import io
    import random

    from PIL import ImageOps

    from shards.decode import load_image

    im = Image.new("RGB", (64, 32), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 16, 8))  # a corner mark: every orientation moves it elsewhere
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    data = buf.getvalue()
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    side = min(want.size)
    x0, y0 = (want.width - side) // 2, (want.height - side) // 2
    want = np.asarray(want.crop((x0, y0, x0 + side, y0 + side)).resize((16, 16), Image.BICUBIC), dtype=int)
    got = load_image(data, 16, "center", False, random.Random(0))
    assert np.abs(got - want).max() <= 2  # PIL's filter, computed by torch (fixed-point rounding); the mark is 255


def test_verify_and_the_loader_share_one_decoder(tmp_path, capsys, monkeypatch):
    """Change the decoder and both change: the same function, not two that happen to agree."""
    import shards.decode as dec

    out = write_set(tmp_path / "set", [], shards=1)
    real = dec.decode_sample

    def picky(sample, spec, rng, out=None):
        if sample["__key__"] == "s00003":
            raise dec.BadData("refused by the test")
        return real(sample, spec, rng, out)

    monkeypatch.setattr(dec, "decode_sample", picky)
    n, report = verify_report(out, capsys)
    assert n == 1 and "s00003: refused by the test" in report
    loader = TrainLoader(cfg(out), rank=0, world_size=1, batch_size=4)
    assert loader_bad_keys(loader, out) == {"s00003"}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_samples_pixels_never_reach_a_batch(tmp_path, monkeypatch, workers):
    """Images decode straight into their batch slot, so a sample whose image decodes and whose cls then
    fails leaves its pixels there. Runs of 0-6 such samples (whole windows bad: the look-ahead fill) with
    random crops and flips: every batch, and every resume, equals the stream that decodes each image into
    an array of its own."""
    from harness.data import _Positions
    from shards.index import write_index

    out = tmp_path / "set"
    out.mkdir()
    k, entries = 0, []
    for n in range(2):
        with wds.TarWriter(str(out / f"{n:06d}.tar")) as w:
            for run in (6, 0, 5, 1, 4, 2, 3, 0):
                w.write({"__key__": f"g{k:05d}", "jpg": image_bytes(k, 40), "cls": str(k % 4).encode()})
                k += 1
                for _ in range(run):  # decodes, then its cls fails
                    w.write({"__key__": f"b{k:05d}", "jpg": image_bytes(5000 + k, 40), "cls": b"\xff"})
                    k += 1
        entries.append({"name": f"{n:06d}.tar", "num_samples": 8})
    write_index(out, source={"kind": "test"}, shards=entries, classes=[f"c{i}" for i in range(4)], label_names=[])
    c = cfg(out, num_workers=workers, crop="random", hflip=True, shuffle_buffer=0)
    loader = TrainLoader(c, rank=0, world_size=1, batch_size=3)
    n = 2 * loader.batches_per_epoch + 2
    got = read_batches(loader, n)
    real = _Positions.take
    monkeypatch.setattr(_Positions, "take", lambda self, into: real(self, np.empty_like(into)))
    want = read_batches(TrainLoader(c, rank=0, world_size=1, batch_size=3), n)
    monkeypatch.undo()
    assert sum(b["bad"] for b in got) > n and any(b["bad"] == 3 for b in got)  # all-bad windows too
    for a, b in zip(got, want):
        assert list(a["key"]) == list(b["key"]) and torch.equal(a["image"], b["image"])
    for start in (1, 3, loader.batches_per_epoch + 1):
        again = read_batches(TrainLoader(c, rank=0, world_size=1, batch_size=3), n - start, start=start)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got[start:], again))


# ---------------------------------------------------------------------------------------------
# Resume after bad samples
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_bad(tmp_path_factory):
    evil = [CASES["truncated jpeg"][0], CASES["no image"][0], CASES["cls not a number"][0]]
    return write_set(tmp_path_factory.mktemp("bad") / "set", evil, shards=4,
                     extra_files={"000009.tar": b""})


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_bad_samples_replays_the_uninterrupted_stream(with_bad, workers):
    c = cfg(with_bad, num_workers=workers)
    loader = TrainLoader(c, rank=0, world_size=1, batch_size=5)
    n = loader.batches_per_epoch + 4  # crosses an epoch
    straight = read_batches(loader, n)
    assert sum(b["bad"] for b in straight) >= 3
    for start in (3, 7, loader.batches_per_epoch - 1, loader.batches_per_epoch + 1):
        resumed = read_batches(TrainLoader(c, rank=0, world_size=1, batch_size=5), n - start, start=start)
        for a, b in zip(straight[start:], resumed):
            assert a["key"] == b["key"] and a["bad"] == b["bad"], f"replay from batch {start} differs"
            assert torch.equal(a["image"], b["image"])


@pytest.mark.slow
def test_training_resumed_after_bad_samples_is_bitwise_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from launch.train import main

    evil = [CASES["truncated jpeg"][0], CASES["cls not a number"][0]]
    with_bad = write_set(tmp_path / "set", evil, shards=1, extra_files={"000009.tar": b""})

    def run(path, *extra):
        return main(["--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={with_bad}", f"run.dir={path}",
                     "checkpoint.every_steps=0", "train.max_steps=10", "data.shuffle_buffer=8", *extra])

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight) == 0
    assert run(split, "train.stop_after_steps=5") == 0
    assert run(split, "--resume", "latest") == 0
    wa = load_file(straight / "checkpoints/step_10/model.safetensors")
    wb = load_file(split / "checkpoints/step_10/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log = (straight / "train.log").read_text()
    assert "bad samples skipped" in log and "last: " in log  # bad samples were met, counted and named


def test_a_bad_samples_reason_carries_no_memory_address():
    """PIL names an in-memory file by its address: a different reason in every run, meaningless in a log."""
    import io

    from PIL import Image

    from shards.decode import one_line

    with pytest.raises(Exception) as caught:  # noqa: PT011 - PIL's own type
        Image.open(io.BytesIO(b"not an image"))
    assert "BytesIO" in str(caught.value)
    assert one_line(caught.value) == "PIL.UnidentifiedImageError: cannot identify image file"
