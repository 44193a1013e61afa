"""Resume cost of the training stream: time to the first batch, and bytes read, when a run resumes
at 10%, 50% and 90% of an epoch, with the header-only fast-forward and with every skipped member
read (what the loader did before). A benchmark, not a test: numbers depend on the storage.

    python launch/bench_resume.py                      # builds 100k samples (about 3 GB) in a temp folder
    python launch/bench_resume.py --shards DIR         # an existing shard folder instead

`rchar` (/proc/self/io) counts the bytes read through read(), page cache hits included.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import tario  # noqa: E402
from harness.config import DataConfig  # noqa: E402
from harness.data import TrainLoader  # noqa: E402


def build(out: Path, samples: int, per_shard: int = 1000, image_kb: int = 30) -> None:
    """`samples` samples of one of 16 noise JPEGs (about image_kb KB each) and a cls, in ustar shards."""
    import numpy as np
    from PIL import Image

    from shards.index import write_index

    rng = np.random.default_rng(0)
    side = int((image_kb * 1000 / 1.2) ** 0.5)  # noise at quality 95: about 1.2 bytes per pixel
    images = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        images.append(buf.getvalue())
    entries = []
    for s in range(0, samples, per_shard):
        name = f"{s // per_shard:06d}.tar"
        n = min(per_shard, samples - s)
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for k in range(s, s + n):
                for ext, data in (("jpg", images[k % 16]), ("cls", str(k % 10).encode())):
                    info = tarfile.TarInfo(f"s{k:07d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        entries.append({"name": name, "num_samples": n})
    write_index(out, source={"kind": "bench"}, shards=entries, classes=[f"c{i}" for i in range(10)])


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


class _ReadAll(tario.Skipping):
    """The loader before the header-only fast-forward: every skipped member is read."""

    on = property(lambda self: False, lambda self, value: None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="an existing shard folder (default: build one)")
    p.add_argument("--samples", type=int, default=100_000, help="samples to build (default 100000)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    a = p.parse_args(argv)
    tmp = None
    if a.shards:
        target = a.shards
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_resume_"))
        t = time.perf_counter()
        build(tmp, a.samples)
        print(f"built {a.samples} samples in {tmp} ({time.perf_counter() - t:.0f} s)")
        target = str(tmp)
    try:
        cfg = DataConfig(train=target, image_size=32, num_workers=0, shuffle_buffer=a.shuffle_buffer)
        real = tario.Skipping
        for mode, skipping in (("headers only", real), ("read all", _ReadAll)):
            tario.Skipping = skipping
            for frac in (0.0, 0.1, 0.5, 0.9):
                loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=a.batch_size)
                start = int(frac * loader.batches_per_epoch)
                t, r = time.perf_counter(), rchar()
                next(loader.batches(start))
                print(f"{mode:12s} resume at {frac:4.0%} ({start * a.batch_size:7d} samples skipped): first batch "
                      f"after {time.perf_counter() - t:6.2f} s, {(rchar() - r) / 1e6:8.1f} MB read", flush=True)
        tario.Skipping = real
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
