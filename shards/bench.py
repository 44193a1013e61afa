"""Benchmark: shard builder throughput against plain PIL decode+encode on the same files and cores.

    python -m shards.bench                                   # the 100 ImageNet photos x 10
    python -m shards.bench --src /path/to/imagenet/train --repeat 1 --workers 1 2 4 --json out.json

For each worker count N it times, end to end (listing, encoding, writing tars, index):
  - `python -m shards imagenet SRC OUT --workers N`                (keeps the original JPEG bytes,
    after checking that each one decodes), against PIL open + convert("RGB") + JPEG encode (q95)
    of every file in N processes;
  - the same with `--max-size 256` (decode at reduced DCT scale, resize, re-encode), against PIL
    open + convert + resize to 256 + encode in N processes;
and the bytes on disk with and without `--max-size 256`. Besides images per wall-clock second it
reports CPU milliseconds per image (this process and its workers): on a machine shared with
other jobs the wall-clock numbers move with the load, the CPU cost much less. The input is SRC repeated `--repeat`
times through symlinks (each copy a separate sample), read once before timing so that every run
finds it in the page cache. Each number is the best of `--trials` runs: other work on a shared
machine only ever makes a run slower.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

DEFAULT_SRC = "/work/shared/data/imagenet-sample/train"


def _plain(path: str, max_size: int = 0, resample: int = Image.BICUBIC, quality: int = 95) -> int:
    """What a straightforward script does per image: decode, to RGB, (resize), encode."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if max_size and max(im.size) > max_size:
            s = max_size / max(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), resample)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return len(buf.getvalue())


def _plain_job(args):
    return _plain(*args)


class Clock:
    """Wall time and CPU time of this process plus its reaped children (pool workers)."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = self._cpu() - self.c0

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def plain_rate(files: list[str], workers: int, max_size: int, resize_filter: str) -> tuple[float, float]:
    """(images per wall second, CPU milliseconds per image)."""
    from shards.images import RESIZE_FILTERS

    jobs = [(f, max_size, RESIZE_FILTERS[resize_filter]) for f in files]
    with Clock() as c:
        if workers == 1:
            for j in jobs:
                _plain_job(j)
        else:
            pool = multiprocessing.get_context("fork").Pool(workers)
            pool.map(_plain_job, jobs, chunksize=8)
            pool.close()
            pool.join()
    return len(files) / c.wall, 1000 * c.cpu / len(files)


def builder_rate(src: Path, out: Path, workers: int, max_size: int, resize_filter: str) -> tuple[float, float, int]:
    """(images per wall second, CPU milliseconds per image, bytes of shards)."""
    from shards.__main__ import main
    from shards.index import read_index

    if out.exists():
        shutil.rmtree(out)
    args = ["imagenet", str(src), str(out), "--workers", str(workers), "--quiet", "--shard-size", "500"]
    if max_size:
        args += ["--max-size", str(max_size), "--resize-filter", resize_filter]
    with open(os.devnull, "w") as null, Clock() as c:  # the builder's own summary line would clutter the table
        stderr, sys.stderr = sys.stderr, null
        try:
            rc = main(args)
        finally:
            sys.stderr = stderr
    if rc != 0:
        raise SystemExit(f"builder failed with exit code {rc}")
    index = read_index(out)
    n = index["num_samples"]
    return n / c.wall, 1000 * c.cpu / n, sum(s["bytes"] for s in index["shards"])


def make_input(src: Path, dst: Path, repeat: int) -> list[str]:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"{src}: no images")
    out = []
    for r in range(repeat):
        for f in files:
            rel = f.relative_to(src)
            link = dst / rel.parent / f"{f.stem}_r{r}{f.suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), link)
            out.append(str(link))
    for f in files:  # warm the page cache
        f.read_bytes()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=DEFAULT_SRC, help="ImageNet-layout folder (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=10, help="copies of the input (default %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--max-size", type=int, default=256, help="(default %(default)s)")
    p.add_argument("--resize-filter", default="bicubic", help="for the --max-size runs, builder and plain PIL alike "
                   "(default %(default)s)")
    p.add_argument("--trials", type=int, default=3, help="best of this many runs (default %(default)s)")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)

    # Import webdataset (and torch with it) and the builders before any timing.
    import webdataset  # noqa: F401

    import shards.__main__  # noqa: F401

    tmp = Path(tempfile.mkdtemp(prefix="shards-bench-"))
    try:
        src = tmp / "train"
        files = make_input(Path(a.src), src, a.repeat)
        in_bytes = sum(os.path.getsize(f) for f in files)
        print(f"input: {len(files)} images ({len(files) // a.repeat} files x {a.repeat}), {in_bytes / 1e6:.1f} MB; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
        rows = []
        sizes = {}
        for max_size in (0, a.max_size):
            for w in a.workers:
                plain, plain_ms, best, ms, size = 0.0, 1e9, 0.0, 1e9, 0
                for _ in range(a.trials):  # interleaved, so drifting load hits both alike
                    r, m = plain_rate(files, w, max_size, a.resize_filter)
                    plain, plain_ms = max(plain, r), min(plain_ms, m)
                    r, m, size = builder_rate(src, tmp / "out", w, max_size, a.resize_filter)
                    best, ms = max(best, r), min(ms, m)
                sizes[max_size] = size
                mode = f"--max-size {max_size} ({a.resize_filter})" if max_size else "original bytes"
                base = "decode+resize+encode" if max_size else "decode+encode"
                rows.append({"mode": mode, "workers": w, "builder_img_s": round(best, 1),
                             "builder_cpu_ms": round(ms, 2),
                             "plain_pil": base, "plain_img_s": round(plain, 1), "plain_cpu_ms": round(plain_ms, 2),
                             "ratio_wall": round(best / plain, 2), "ratio_cpu": round(plain_ms / ms, 2)})
                print(f"{mode:>24s}  workers={w}:  builder {best:6.1f} img/s ({ms:5.2f} CPU ms/img)   "
                      f"plain PIL {base} {plain:6.1f} img/s ({plain_ms:5.2f} CPU ms/img)   "
                      f"ratio {best / plain:.2f} wall, {plain_ms / ms:.2f} CPU", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        reduction = 1 - sizes[a.max_size] / sizes[0]
        print(f"shard bytes: original {sizes[0] / 1e6:.1f} MB, "
              f"--max-size {a.max_size} {sizes[a.max_size] / 1e6:.1f} MB "
              f"({reduction:.0%} smaller, {sizes[0] / sizes[a.max_size]:.1f}x)")
        if a.json:
            Path(a.json).write_text(json.dumps({"images": len(files), "cores": os.cpu_count(), "rows": rows,
                                                "bytes_original": sizes[0], "bytes_max_size": sizes[a.max_size],
                                                "max_size": a.max_size, "reduction": round(reduction, 3)}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
