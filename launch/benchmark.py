"""Benchmarks that print ratios against a baseline measured in the same run (never timed tests).

    # loader: harness TrainLoader vs plain PIL decode + crop + resize of the same JPEGs, same cores
    python launch/benchmark.py loader --data data/imagenet-sample-shards --image-size 256 --workers 2
    # step: one harness training step vs the same model in a plain PyTorch loop (data excluded)
    python launch/benchmark.py step --config launch/configs/demo.yaml [key=value ...]
    # scale: per-rank state, activation memory, peak RSS and step time, DDP vs ZeRO-2 vs ZeRO-3,
    # with and without gradient checkpointing, 2 processes (CPU here; GPUs where there are some)
    python launch/benchmark.py scale --config launch/configs/kl_f8.yaml --image-size 64 model.ch=64

Both print a small table and the ratio; add `--json FILE` to keep the numbers.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------


def _raw_images(spec: str, limit: int) -> list[bytes]:
    import webdataset as wds

    from harness.data import IMAGE_KEYS
    from shards.sources import DataSourceError, resolve_sources

    urls = [u for s in resolve_sources(spec, require_count=False) for u in s.urls]
    out = []
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        out.append(next(sample[k] for k in IMAGE_KEYS if k in sample))
        if len(out) == limit:
            break
    if not out:
        raise DataSourceError(f"{spec}: no images in these shards")
    return out


def _decode_chunk(args) -> int:
    import random

    from shards.decode import load_image

    images, size = args
    rng = random.Random(0)
    for data in images:
        load_image(data, size, "random", False, rng)
    return len(images)


def bench_loader(a) -> dict:
    from harness.config import DataConfig
    from harness.data import TrainLoader

    images = _raw_images(a.data, a.images)
    n_target = max(a.images, len(images))
    reps = math.ceil(n_target / len(images))
    work = (images * reps)[:n_target]
    chunks = [(work[i:: a.workers], a.image_size) for i in range(a.workers)]
    # A long epoch, as on a real dataset: a 100-image sample set would otherwise make an epoch of 3
    # batches, each refilling the whole shuffle buffer (6x the tar reading of steady state).
    cfg = DataConfig(train=a.data, image_size=a.image_size, num_workers=a.workers, shuffle_buffer=a.shuffle_buffer,
                     num_samples=len(images), epoch_samples=max(100_000, 10 * n_target))
    batches = max(1, n_target // a.batch_size)
    raw, harness = 0.0, 0.0
    for _ in range(a.rounds):  # interleaved rounds, best of each: machine noise hits both sides alike
        # Baseline: the same decode + crop + resize, on the same number of processes, bytes in memory.
        t0 = time.perf_counter()
        if a.workers == 1:
            _decode_chunk(chunks[0])
        else:
            with mp.get_context("fork").Pool(a.workers) as pool:
                pool.map(_decode_chunk, chunks)
        raw = max(raw, len(work) / (time.perf_counter() - t0))

        loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=a.batch_size)
        it = loader.batches()
        # Warm up until every worker has started and filled its shuffle buffer: steady state only.
        for _ in range((math.ceil(a.shuffle_buffer / a.batch_size) + 2) * max(a.workers, 1)):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        harness = max(harness, batches * a.batch_size / (time.perf_counter() - t0))
        del it
    res = {"bench": "loader", "image_size": a.image_size, "workers": a.workers, "images": n_target,
           "raw_decode_img_s": round(raw, 1), "harness_loader_img_s": round(harness, 1),
           "ratio": round(harness / raw, 3)}
    print(f"loader  {a.workers} worker(s), {a.image_size}px: plain PIL decode {raw:.0f} img/s, "
          f"harness TrainLoader {harness:.0f} img/s, ratio {harness / raw:.2f}")
    return res


# ---------------------------------------------------------------------------------------------
# step
# ---------------------------------------------------------------------------------------------


def _timed(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_step(a) -> dict:
    """Harness train_step (accelerate, loss terms, guards, EMA off) vs a hand-written loop, same model."""
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    try:
        return _bench_step(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench_step(a, tmp: Path) -> dict:
    from harness.config import load_config
    from harness.data import to_model_input
    from harness.losses import AutoencoderLoss
    from harness.trainer import Trainer
    from models import build_model
    from shards.__main__ import main as shards_main

    shards = tmp / "shards"  # a few demo shards, only so that the Trainer can start
    shards_main(["demo", str(shards), "--num-samples", "64", "--image-size", str(a.image_size), "--quiet"])
    cfg = load_config([a.config] if a.config else [], [f"data.train={shards}", f"run.dir={tmp / 'run'}",
                                                       f"data.image_size={a.image_size}", f"train.batch_size={a.batch_size}",
                                                       "log.progress=false", "data.num_workers=0", *a.overrides])
    trainer = Trainer(cfg)
    device = trainer.device
    images = torch.randint(0, 255, (a.batch_size, a.image_size, a.image_size, 3), dtype=torch.uint8)
    batch = {"image": images, "cls": torch.zeros(a.batch_size, dtype=torch.long), "bad": 0, "bad_error": "",
             "labels": torch.zeros(a.batch_size, max(1, cfg.model.num_classes))}
    batches = iter(lambda: batch, None)
    from collections import defaultdict

    from harness.signals import StopFlag

    stop, acc = StopFlag(), defaultdict(float)
    harness_step = lambda: trainer.train_step(batches, stop, acc)  # noqa: E731

    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    loss_fn = AutoencoderLoss(cfg.loss).to(device)
    cond = batch["cls"].to(device) if model.condition == "class" else None

    def plain():
        x = to_model_input(images, device)
        out = model(x, cond=cond)
        loss = loss_fn(x, out).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Interleaved rounds, best of each: neither side profits from going second.
    harness, base = float("inf"), float("inf")
    for _ in range(a.rounds):
        harness = min(harness, _timed(harness_step, a.steps, a.warmup, device))
        base = min(base, _timed(plain, a.steps, a.warmup, device))
    res = {"bench": "step", "device": str(device), "batch_size": a.batch_size, "image_size": a.image_size,
           "plain_ms": round(base * 1e3, 2), "harness_ms": round(harness * 1e3, 2),
           "overhead_pct": round(100 * (harness / base - 1), 2)}
    print(f"step    {device}, batch {a.batch_size}, {a.image_size}px: plain PyTorch {base * 1e3:.1f} ms, "
          f"harness {harness * 1e3:.1f} ms, overhead {100 * (harness / base - 1):+.1f}%")
    trainer.tracker.close()
    return res


# ---------------------------------------------------------------------------------------------
# scale
# ---------------------------------------------------------------------------------------------

SCALE_BACKENDS = {"ddp": "launch/accelerate/cpu2.yaml", "zero2": "launch/accelerate/zero2.yaml",
                  "zero3": "launch/accelerate/zero3.yaml"}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def scale_worker(a) -> None:
    """Runs under `accelerate launch`: a Trainer on synthetic batches; writes one JSON per rank."""
    import resource
    import tempfile
    from collections import defaultdict

    from harness import scale
    from harness.config import load_config
    from harness.signals import StopFlag
    from harness.trainer import Trainer
    from shards.__main__ import main as shards_main

    tmp = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, tmp, True)
    shards_main(["demo", str(tmp / "s"), "--num-samples", "64", "--image-size", str(a.image_size), "--quiet"])
    cfg = load_config([a.config] if a.config else [], [f"data.train={tmp / 's'}", f"run.dir={tmp / 'run'}",
                                                       f"data.image_size={a.image_size}", f"train.batch_size={a.batch_size}",
                                                       "log.progress=false", "data.num_workers=0", *a.overrides])
    tr = Trainer(cfg)
    images = torch.randint(0, 255, (a.batch_size, a.image_size, a.image_size, 3), dtype=torch.uint8)
    batch = {"image": images, "cls": torch.zeros(a.batch_size, dtype=torch.long), "bad": 0, "bad_error": ""}
    batches = iter(lambda: batch, None)
    stop, acc = StopFlag(), defaultdict(float)
    step_s = _timed(lambda: tr.train_step(batches, stop, acc), a.steps, a.warmup, tr.device)

    # What this rank holds: Adam's moments (exp_avg, exp_avg_sq: the optimizer state ZeRO
    # partitions; a whole copy under DDP) and the model parameters resident (ZeRO-3: its slice).
    opt = tr.base_optimizer
    moments = _tensor_bytes(v for st in opt.state.values() for k, v in st.items() if k.startswith("exp_avg"))
    resident = _tensor_bytes(getattr(p, "ds_tensor", p) for p in tr.model.parameters())
    # Activations kept for backward in one forward (a saved-tensors hook sees what autograd keeps).
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    x = torch.zeros(a.batch_size, 3, a.image_size, a.image_size, dtype=tr.input_dtype, device=tr.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tr.model(x)
    out.recon.float().mean().backward()  # ZeRO-3 expects every forward to be followed by a backward
    tr.model.zero_grad() if hasattr(tr.model, "zero_grad") else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB
    res = {"rank": tr.world.rank, "zero": scale.zero_stage(tr.model), "step_ms": step_s * 1e3,
           "optimizer_state_mib": moments / 2**20, "params_resident_mib": resident / 2**20,
           "activations_mib": saved[0] / 2**20, "peak_rss_mib": rss, "num_params": tr.num_params}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{tr.world.rank}.json").write_text(json.dumps(res))
    tr.tracker.close()


def bench_scale(a) -> list[dict]:
    import socket
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    rows = []
    for name, config in SCALE_BACKENDS.items():
        for ckpt in (False, True):
            out = Path(tempfile.mkdtemp())
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                   "--main_process_port", str(port), str(root / "launch/benchmark.py"), "_scale_worker",
                   "--out", str(out), "--image-size", str(a.image_size), "--batch-size", str(a.batch_size),
                   "--steps", str(a.steps), "--warmup", str(a.warmup), *(["--config", a.config] if a.config else []),
                   *a.overrides, f"model.gradient_checkpointing={str(ckpt).lower()}"]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
            ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
            shutil.rmtree(out, ignore_errors=True)
            row = {"backend": name, "grad_ckpt": ckpt, **{k: max(rk[k] for rk in ranks) for k in ranks[0] if k != "rank"}}
            rows.append(row)
    base = rows[0]
    print(f"scale   2 processes, batch {a.batch_size}/rank, {a.image_size}px, {base['num_params'] / 1e6:.2f}M parameters "
          "(per rank, max over ranks; ratios against DDP without checkpointing)")
    print(f"{'backend':<8}{'ckpt':<6}{'Adam state MiB':>22}{'params MiB':>13}{'activations MiB':>18}"
          f"{'peak RSS MiB':>15}{'step ms':>12}")
    for r in rows:
        print(f"{r['backend']:<8}{'yes' if r['grad_ckpt'] else 'no':<6}"
              f"{r['optimizer_state_mib']:>12.1f} ({r['optimizer_state_mib'] / base['optimizer_state_mib']:.2f}x)"
              f"{r['params_resident_mib']:>7.1f} ({r['params_resident_mib'] / base['params_resident_mib']:.2f}x)"
              f"{r['activations_mib']:>9.1f} ({r['activations_mib'] / base['activations_mib']:.2f}x)"
              f"{r['peak_rss_mib']:>9.0f} ({r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x)"
              f"{r['step_ms']:>7.0f} ({r['step_ms'] / base['step_ms']:.2f}x)")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    lo = sub.add_parser("loader", help="TrainLoader throughput vs plain PIL decoding on the same cores")
    lo.add_argument("--data", required=True, help="shards (folder, pattern)")
    lo.add_argument("--image-size", type=int, default=256)
    lo.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    lo.add_argument("--batch-size", type=int, default=32)
    lo.add_argument("--images", type=int, default=2000, help="images decoded by each side")
    lo.add_argument("--shuffle-buffer", type=int, default=500)
    lo.add_argument("--rounds", type=int, default=3)
    st = sub.add_parser("step", help="harness train_step vs a plain PyTorch loop (same model, no data loading)")
    st.add_argument("--config", default=None)
    st.add_argument("--image-size", type=int, default=64)
    st.add_argument("--batch-size", type=int, default=16)
    st.add_argument("--steps", type=int, default=20)
    st.add_argument("--warmup", type=int, default=3)
    st.add_argument("--rounds", type=int, default=3)
    st.add_argument("overrides", nargs="*", metavar="key.sub=value")
    sc = sub.add_parser("scale", help="DDP vs ZeRO-2 vs ZeRO-3, with/without gradient checkpointing, 2 processes")
    wk = sub.add_parser("_scale_worker")  # what `scale` runs under accelerate launch
    for x in (sc, wk):
        x.add_argument("--config", default=None)
        x.add_argument("--image-size", type=int, default=64)
        x.add_argument("--batch-size", type=int, default=8)
        x.add_argument("--steps", type=int, default=5)
        x.add_argument("--warmup", type=int, default=2)
        x.add_argument("overrides", nargs="*", metavar="key.sub=value")
    wk.add_argument("--out", required=True)
    for s in (lo, st, sc):
        s.add_argument("--json", default=None, help="append the result as one JSON line")
    a = p.parse_args(argv)
    if a.bench == "_scale_worker":
        scale_worker(a)
        return 0
    from harness.config import ConfigError
    from shards.sources import DataSourceError

    try:
        res = {"loader": bench_loader, "step": bench_step, "scale": bench_scale}[a.bench](a)
    except (ConfigError, DataSourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
