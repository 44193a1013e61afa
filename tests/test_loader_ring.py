"""The loader workers' ring of shared-memory batch buffers (harness/data.py: BatchRing).

What must hold: a batch handed to the trainer is never overwritten while anything refers to it (held
batches equal those of a run without the ring, in whatever order they are let go), a worker never
waits for a buffer (a trainer that keeps many batches gets the rest through the pipe), and neither
side waits forever on the other (a killed worker is the DataLoader's error, a killed reader ends its
workers)."""

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shardgen import _write_shards, make_shards

import harness.data as data
from harness.config import DataConfig
from harness.data import BatchRing, TrainLoader
from shards.index import write_index

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Photos of every size and shape (smaller and larger than image_size), grayscale, palette, RGBA,
    CMYK, a corrupt one, multi-hot labels: what a worker writes into a buffer is always image_size."""
    modes = [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("L", "PNG")]

    def sample(i: int) -> dict:
        rng = np.random.default_rng(i)
        w, h = int(rng.integers(12, 90)), int(rng.integers(12, 90))
        mode, fmt = modes[i % len(modes)]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode).save(buf, format=fmt)
        image = buf.getvalue()[:40] if i % 17 == 5 else buf.getvalue()  # a truncated one now and then
        return {"__key__": f"m{i:05d}", "jpg" if fmt == "JPEG" else "png": image, "cls": str(i % 3),
                "json": json.dumps({"labels": [i % 4, (i + 1) % 4]})}

    out = tmp_path_factory.mktemp("mixed")
    shards = _write_shards(out, 120, 20, sample)
    write_index(out, source={"kind": "test"}, shards=shards, classes=["a", "b", "c"],
                label_names=["w", "x", "y", "z"])
    return out


def held(path, workers: int, n: int, start: int = 0, batch_size: int = 4, image_size: int = 32) -> list[dict]:
    """`n` batches, all held at once (a reused buffer would show as a changed earlier batch)."""
    cfg = DataConfig(train=str(path), image_size=image_size, num_workers=workers, shuffle_buffer=16)
    it = TrainLoader(cfg, rank=0, world_size=1, batch_size=batch_size).batches(start)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:  # PIL names the BytesIO it could not read by its address
                assert re.sub("0x[0-9a-f]+", "", str(x[k])) == re.sub("0x[0-9a-f]+", "", str(y[k])), k


def test_held_batches_equal_those_read_in_process(mixed):
    """1 worker reads the same stream as no worker: 30 batches held while the worker goes round its
    6 buffers 5 times; any buffer handed out as it is, or rewritten too early, differs here."""
    ring = held(mixed, 1, 30)
    assert_same(ring, held(mixed, 0, 30))
    assert all(b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == torch.uint8 for b in ring)
    assert all(b["labels"].shape == (4, 4) for b in ring) and sum(b["bad"] for b in ring) > 0
    assert len({b["image"].data_ptr() for b in ring}) == 30  # every batch in memory of its own


def test_two_workers_through_the_ring_equal_the_pipe(mixed, monkeypatch):
    """2 workers, from a resume point: the same batches through the ring and through the pipe."""
    ring = held(mixed, 2, 24, start=7)
    monkeypatch.setattr(data, "_ring_context", lambda: None)  # no ring: whole batches through the pipe
    assert_same(ring, held(mixed, 2, 24, start=7))


def test_photos_larger_than_the_image_size(tmp_path):
    path = make_shards(tmp_path, num_samples=48, per_shard=12, size=150)
    ring = held(path, 1, 8, batch_size=3, image_size=96)
    assert_same(ring, held(path, 0, 8, batch_size=3, image_size=96))
    assert ring[0]["image"].shape == (3, 96, 96, 3) and ring[0]["image"].float().std() > 5


def test_a_full_ring_sends_through_the_pipe_and_frees_buffers_in_any_order():
    """A worker never waits for a buffer: with both taken (held by the trainer), claim says so and
    the batch goes through the pipe. A buffer is free again when its batch's memory goes, whichever
    goes first, and a held batch is never written (the next claim is the buffer just freed)."""
    import gc
    import multiprocessing

    ring = BatchRing(1, 2, 2, 4, multiprocessing.get_context("fork"))
    for v in (1, 2):
        buffer, images = ring.claim(0)
        images[:] = v
        assert buffer == v - 1
    assert ring.claim(0) is None
    first, second = ring.take(0, 0), ring.take(0, 1)
    assert first.data_ptr() == ring.images[0, 0].ctypes.data  # the buffer itself: no copy
    view = second[1:]  # a view keeps its buffer as much as the batch does
    del second
    gc.collect()
    assert ring.claim(0) is None
    del view
    assert ring.claim(0)[0] == 1 and ring.claim(0) is None  # the second freed first, and only it
    assert (first == 1).all()
    del first
    buffer, images = ring.claim(0)
    assert buffer == 0 and ring.busy[0].tolist() == [1, 1]


def test_batches_held_beyond_the_ring_go_through_the_pipe(mixed, monkeypatch):
    """A trainer that keeps more batches than the ring has buffers: the rest come through the pipe,
    nothing waits and nothing held changes (compared with a run that copies every batch at once)."""
    cfg = DataConfig(train=str(mixed), image_size=32, num_workers=1, shuffle_buffer=16)
    it = TrainLoader(cfg, rank=0, world_size=1, batch_size=4).batches()
    kept = [next(it) for _ in range(3 * (data.PREFETCH + 3))]
    it.close()
    assert len({b["image"].data_ptr() for b in kept}) == len(kept)
    copied = []
    it = TrainLoader(cfg, rank=0, world_size=1, batch_size=4).batches()
    for _ in range(len(kept)):  # each batch copied and dropped at once: every batch through the ring
        copied.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in next(it).items()})
    it.close()
    assert_same(kept, copied)


READER = """
import sys, time
sys.path[:0] = [{root!r}]
from harness.config import DataConfig
from harness.data import TrainLoader
cfg = DataConfig(train={shards!r}, image_size=32, num_workers=2, shuffle_buffer=16)
it = TrainLoader(cfg, rank=0, world_size=1, batch_size=4).batches()
held = [next(it) for _ in range(12)]  # every ring buffer held: the workers go on through the pipe
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_workers_end_when_their_reader_is_killed(mixed, tmp_path):
    script = tmp_path / "reader.py"
    script.write_text(READER.format(root=ROOT, shards=str(mixed)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    workers = [int(p) for t in os.listdir(f"/proc/{proc.pid}/task")
               for p in open(f"/proc/{proc.pid}/task/{t}/children").read().split()]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if _alive(w)]
    for w in alive:
        os.kill(w, 9)
    assert not alive, "loader workers outlived their killed reader"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_killed_worker_is_the_dataloaders_error_not_a_hang(mixed):
    cfg = DataConfig(train=str(mixed), image_size=32, num_workers=2, shuffle_buffer=16)
    def children() -> set[int]:
        tasks = os.listdir("/proc/self/task")
        return {int(p) for t in tasks for p in open(f"/proc/self/task/{t}/children").read().split()}

    before = children()  # in a whole test session, earlier tests may have left children of their own
    it = TrainLoader(cfg, rank=0, world_size=1, batch_size=4).batches()
    next(it)
    workers = sorted(children() - before)
    assert len(workers) == 2
    os.kill(workers[1], 9)
    t0 = time.time()
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        for _ in range(1000):
            next(it)
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_exact_resume_through_the_ring_is_bitwise(tmp_path):
    """tests/test_train.py::test_exact_resume_is_bitwise with 2 loader workers: 8 steps straight
    equal 4 + resume + 4, weights bit for bit."""
    from safetensors.torch import load_file

    from launch.train import main

    shards = make_shards(tmp_path / "shards", num_samples=96, per_shard=12, size=40)
    common = ["--config", f"{ROOT}/tests/configs/tiny.yaml", f"data.train={shards}", "data.num_workers=2",
              "checkpoint.every_steps=0", "train.max_steps=8"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, f"run.dir={straight}"]) == 0
    assert main([*common, f"run.dir={split}", "train.stop_after_steps=4"]) == 0
    assert main([*common, f"run.dir={split}", "--resume", "latest"]) == 0
    wa = load_file(straight / "checkpoints/step_8/model.safetensors")
    wb = load_file(split / "checkpoints/step_8/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_are_replaced_within_their_window(tmp_path, workers, monkeypatch):
    """Images go into the batch as they are decoded; a bad one's row is then a good one of the same
    window in turn, and an all-bad window is the next good sample (decoded once, still used later)."""
    from shardgen import image_bytes

    bad = {1, 2, 4, 5, 6, 7, 10}

    def sample(i: int) -> dict:
        return {"__key__": f"k{i:02d}", "jpg": b"not a jpeg" if i in bad else image_bytes(i, 40), "cls": "0"}

    write_index(tmp_path, source={"kind": "test"}, shards=_write_shards(tmp_path, 12, 12, sample), classes=["a"])
    monkeypatch.setattr(data, "_start_offset", lambda seed, per_shard: 0)  # the epoch from the shard's first sample
    cfg = DataConfig(train=str(tmp_path), image_size=32, num_workers=workers, shuffle_buffer=0, epoch_samples=12)
    it = TrainLoader(cfg, rank=0, world_size=1, batch_size=4).batches()
    batches = [next(it) for _ in range(3)]
    it.close()
    assert [b["key"] for b in batches] == [["k00", "k03", "k00", "k03"], ["k08"] * 4, ["k08", "k09", "k11", "k08"]]
    assert [b["bad"] for b in batches] == [2, 4, 1]
    first, middle, last = (b["image"] for b in batches)
    assert torch.equal(first[2:], first[:2]) and torch.equal(last[3], last[0])
    assert all(torch.equal(m, last[0]) for m in middle) and not torch.equal(first[0], first[1])
