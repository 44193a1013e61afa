"""Benchmarks that print ratios against a baseline measured in the same run (never timed tests).

    # loader: harness TrainLoader vs plain PIL decode + crop + resize of the same JPEGs, same cores
    python launch/benchmark.py loader --data data/imagenet-sample-shards --image-size 256 --workers 2
    # step: one harness training step vs the same model in a plain PyTorch loop (data excluded)
    python launch/benchmark.py step --config launch/configs/demo.yaml [key=value ...]
    # scale: per-rank state, activation memory, peak RSS and step time, DDP vs ZeRO-2 vs ZeRO-3,
    # with and without gradient checkpointing, 2 processes (CPU here; GPUs where there are some)
    python launch/benchmark.py scale --config launch/configs/kl_f8.yaml --image-size 64 model.ch=64

    # encode: launch/encode.py end to end vs a plain loop (decode, encode, np.save into a tar), one process
    python launch/benchmark.py encode runs/kl --data data/imagenet-sample-shards --workers 2

Each prints a small table and the ratio; add `--json FILE` to keep the numbers.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------


def _raw_images(spec: str, max_bytes: int = 2 << 30) -> dict[str, bytes]:
    """Every image of the shards in `spec`, by sample key (the plain side decodes the loader's images)."""
    import webdataset as wds

    from shards.decode import IMAGE_KEYS
    from shards.sources import DataSourceError, resolve_sources

    urls = [u for s in resolve_sources(spec, require_count=False) for u in s.urls]
    out, size = {}, 0
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is None:
            continue
        key = sample["__key__"]
        if key in out:
            raise DataSourceError(f"{spec}: sample key {key!r} occurs twice; the loader benchmark finds the "
                                  "images the loader delivered by their keys")
        out[key], size = image, size + len(image)
        if size > max_bytes:
            raise DataSourceError(f"{spec}: over {max_bytes >> 30} GB of images; the loader benchmark holds "
                                  "them all in memory: give it a few shards")
    if not out:
        raise DataSourceError(f"{spec}: no images in these shards")
    return out


_PLAIN_WORK: list[bytes] = []  # the baseline's images, inherited by its forked pool (nothing pickled)


def plain_pil_image(data: bytes, size: int, rng) -> np.ndarray:
    """What a plain PIL loop does with one image: decode (at a reduced JPEG scale where that still
    gives >= size, as the loader does), upright, to RGB, square crop + bicubic resize in one PIL call,
    an array. The steps of the loader's own decoder (shards/decode.py `load_image`) before its resize
    moved to torch's uint8 kernel."""
    import io

    from PIL import Image

    from shards.images import UPRIGHT, exif_orientation, to_rgb

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    img.load()
    orient = exif_orientation(img)
    if orient in UPRIGHT:
        img = img.transpose(UPRIGHT[orient])
    img = to_rgb(img)
    w, h = img.size
    side = min(w, h)
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side)))


def _decode_chunk(args) -> int:
    import random

    from shards.decode import load_image

    part, parts, size, how = args
    torch.set_num_threads(1)  # as in a DataLoader worker
    images = _PLAIN_WORK[part::parts]
    rng = random.Random(0)
    for data in images:
        if how == "pil":
            plain_pil_image(data, size, rng)
        else:
            load_image(data, size, "random", False, rng)
    return len(images)


def _plain_decode(images: list[bytes], processes: int, size: int, how: str = "pil") -> tuple[float, float]:
    """Decode + crop + resize `images` split over `processes` forked processes (bytes in memory, in
    them by the fork: neither starting them nor sending the bytes is timed) -> (wall s, CPU s).
    how: "pil" (`plain_pil_image`) or "ours" (the loader's own `load_image`, no loader around it)."""
    _PLAIN_WORK[:] = images
    chunks = [(i, max(processes, 1), size, how) for i in range(max(processes, 1))]
    if processes <= 1:
        threads = torch.get_num_threads()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            _decode_chunk(chunks[0])
        finally:
            torch.set_num_threads(threads)
        return time.perf_counter() - t0, time.process_time() - c0
    with mp.get_context("fork").Pool(processes) as pool:
        pool.map(abs, range(processes))  # started
        t0, c0 = time.perf_counter(), _children_cpu()
        pool.map(_decode_chunk, chunks, chunksize=1)
        return time.perf_counter() - t0, _cpu_spent(c0, _children_cpu())


def _children_cpu() -> dict[str, float]:
    """CPU seconds of each child of this process, all its threads, to the nanosecond (Linux
    /proc/PID/task/TID/schedstat; empty elsewhere). A child that ends meanwhile is left out."""
    out = {}
    try:
        tasks = os.listdir("/proc/self/task")
        pids = {p for t in tasks for p in open(f"/proc/self/task/{t}/children").read().split()}
    except OSError:
        return out
    for p in pids:
        try:
            out[p] = sum(int(open(f"/proc/{p}/task/{t}/schedstat").read().split()[0])
                         for t in os.listdir(f"/proc/{p}/task")) / 1e9
        except OSError:
            pass
    return out


def _cpu_spent(since: dict[str, float], now: dict[str, float]) -> float:
    """CPU seconds the children of `now` spent since `since` (nan without /proc)."""
    return sum(v - since.get(p, 0.0) for p, v in now.items()) if now else math.nan


def _settled_children_cpu() -> dict[str, float]:
    """_children_cpu once the loader's workers are idle (prefetch full), so that the batches they
    make between two such points are exactly the batches read between them."""
    last, deadline = _children_cpu(), time.time() + 20
    while time.time() < deadline:
        time.sleep(0.25)
        now = _children_cpu()
        if _cpu_spent(last, now) < 0.002:
            return now
        last = now
    return {}


def bench_loader(a) -> dict:
    """The loader against plain decoding of *the images it delivered*, on as many processes.

    Each round reads a window of batches from the loader, then decodes exactly the images of that
    window (found by their keys) the plain way. Photos differ in decoding cost (a few percent
    from shard to shard), and a resampled stream reads whole shards: a fixed baseline set would
    compare different photos, by more than the loader's own overhead on short windows."""
    from harness.config import DataConfig
    from harness.data import PREFETCH, TrainLoader

    by_key = _raw_images(a.data)
    n_target = a.images
    # A long epoch, as on a real dataset: a 100-image sample set would otherwise make an epoch of 3
    # batches, each refilling the whole shuffle buffer (6x the tar reading of steady state).
    cfg = DataConfig(train=a.data, image_size=a.image_size, num_workers=a.workers, shuffle_buffer=a.shuffle_buffer,
                     num_samples=len(by_key), epoch_samples=max(100_000, 10 * n_target))
    batches = max(1, n_target // a.batch_size)

    def read(it, n: int, keys: list) -> None:
        for _ in range(n):
            batch = next(it)
            # Delivered = readable here: one byte a page, as the trainer reads them all (a batch in a
            # fresh shared-memory mapping would otherwise count before the reader pays its page faults).
            batch["image"].view(-1)[::4096].sum()
            keys.extend(batch["key"])

    # plain: plain_pil_image (PIL's resize); own: the loader's decoder (load_image) with no loader around it
    raw, own, harness = 0.0, 0.0, 0.0
    cpu = {"plain": [], "own": [], "workers": [], "reader": []}
    for _ in range(a.rounds):  # best (wall) and median (CPU) over rounds: machine noise hits both sides alike
        loader = TrainLoader(cfg, rank=0, world_size=1, batch_size=a.batch_size)
        it = loader.batches()
        # Warm up until every worker has started and filled its shuffle buffer: steady state only.
        read(it, (math.ceil(a.shuffle_buffer / a.batch_size) + 2) * max(a.workers, 1), [])
        window, t0 = [], time.perf_counter()
        read(it, batches, window)
        harness = max(harness, len(window) / (time.perf_counter() - t0))
        counted = []
        if a.workers:  # CPU per image of the workers and of the reader: robust to a busy machine
            # Between two points where the workers are idle (their prefetch full) the reader takes n
            # batches, and the workers make the n that follow the prefetch: read those too, and
            # decode exactly their images on the plain side.
            n, ahead = max(1, batches // 2), PREFETCH * a.workers
            c0, m0 = _settled_children_cpu(), time.process_time()
            read(it, n, counted)
            m1 = time.process_time()
            c1 = _settled_children_cpu()
            read(it, ahead, counted)
            counted = counted[ahead * a.batch_size:]
            cpu["workers"].append(_cpu_spent(c0, c1) / len(counted) if c0 and c1 else math.nan)
            cpu["reader"].append((m1 - m0) / len(counted))
        del it
        loader = None  # its workers end here, before the plain side runs on the same cores
        wall, _ = _plain_decode([by_key[k] for k in window], a.workers, a.image_size, "pil")
        raw = max(raw, len(window) / wall)
        wall, _ = _plain_decode([by_key[k] for k in window], a.workers, a.image_size, "ours")
        own = max(own, len(window) / wall)
        if counted:
            for how, key in (("pil", "plain"), ("ours", "own")):
                _, spent = _plain_decode([by_key[k] for k in counted], a.workers, a.image_size, how)
                cpu[key].append(spent / len(counted))
    res = {"bench": "loader", "image_size": a.image_size, "workers": a.workers, "images": batches * a.batch_size,
           "raw_decode_img_s": round(raw, 1), "own_decode_img_s": round(own, 1),
           "harness_loader_img_s": round(harness, 1), "ratio": round(harness / raw, 3),
           "ratio_to_own_decode": round(harness / own, 3)}
    print(f"loader  {a.workers} worker(s), {a.image_size}px: plain PIL decode {raw:.0f} img/s, "
          f"harness TrainLoader {harness:.0f} img/s, ratio {harness / raw:.2f} (the same images on both sides)")
    print(f"loader  its own decoder alone (load_image, no loader) {own:.0f} img/s: the loader delivers "
          f"{harness / own:.2f} of it")
    counted = [i for i, v in enumerate(cpu["workers"]) if v > 0 and cpu["plain"][i] > 0]  # (nan > 0 is False)
    if a.workers and counted:  # rounds whose workers did not settle (a slow machine) are left out
        plain, mine, workers, reader = (statistics.median(cpu[k][i] for i in counted) * 1e3
                                        for k in ("plain", "own", "workers", "reader"))
        res.update(plain_cpu_ms_per_img=round(plain, 3), own_cpu_ms_per_img=round(mine, 3),
                   worker_cpu_ms_per_img=round(workers, 3), reader_cpu_ms_per_img=round(reader, 3),
                   cpu_ratio=round(plain / workers, 3), cpu_ratio_with_reader=round(plain / (workers + reader), 3),
                   cpu_ratio_to_own_decode=round(mine / workers, 3))
        print(f"loader  CPU per image (median of {len(counted)} rounds): plain {plain:.2f} ms, own decoder "
              f"{mine:.2f} ms, workers {workers:.2f} ms, reader {reader:.2f} ms; ratio {plain / workers:.2f} "
              f"({plain / (workers + reader):.2f} with the reader; {mine / workers:.2f} of the own decoder)")
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
    overrides = [f"data.train={shards}", f"run.dir={tmp / 'run'}", f"data.image_size={a.image_size}",
                 f"train.batch_size={a.batch_size}", "log.progress=false", "data.num_workers=0", *a.overrides]
    cfg = load_config([a.config] if a.config else [], overrides)
    trainer = Trainer(cfg)
    device = trainer.device
    images = torch.randint(0, 255, (a.batch_size, a.image_size, a.image_size, 3), dtype=torch.uint8)
    batch = {"image": images, "cls": torch.zeros(a.batch_size, dtype=torch.long), "bad": 0, "bad_error": "",
             "labels": torch.zeros(a.batch_size, max(1, cfg.model.num_classes))}
    batches = iter(lambda: batch, None)
    from harness.monitor import StepStats

    stats = StepStats()
    harness_step = lambda: trainer.train_step(batches, stats)  # noqa: E731

    # The plain loop computes what the harness's step computes, so that the ratio is the harness's own cost
    # (its host reads, guards, bookkeeping), not a precision or kernel difference: train.mixed_precision as
    # accelerate applies it (autocast around the forward where it autocasts, a GradScaler where it has one;
    # it runs fp16 on a CPU in fp32) and the same AdamW kernel (optim.fused).
    acc = trainer.accelerator
    precision = acc.mixed_precision  # "no" | "fp16" | "bf16" (train.mixed_precision=auto resolved)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if acc.native_amp else None
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused or None)
    scaler = torch.amp.GradScaler(device.type, enabled=acc.scaler is not None)
    loss_fn = AutoencoderLoss(cfg.loss).to(device)
    cond = batch["cls"].to(device) if model.condition == "class" else None

    def plain():
        x = to_model_input(images, device, trainer.channels_last)  # the batch layout the harness's step uses
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x, cond=cond)
        loss = loss_fn(x, out).total
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    # Interleaved rounds, best of each: neither side profits from going second.
    harness, base = float("inf"), float("inf")
    for _ in range(a.rounds):
        harness = min(harness, _timed(harness_step, a.steps, a.warmup, device))
        base = min(base, _timed(plain, a.steps, a.warmup, device))
    res = {"bench": "step", "device": str(device), "batch_size": a.batch_size, "image_size": a.image_size,
           "mixed_precision": precision, "autocast": amp_dtype is not None, "loss_scaler": scaler.is_enabled(),
           "fused": cfg.optim.fused,
           "plain_ms": round(base * 1e3, 2), "harness_ms": round(harness * 1e3, 2),
           "overhead_pct": round(100 * (harness / base - 1), 2)}
    print(f"step    {device}, batch {a.batch_size}, {a.image_size}px, precision {precision}"
          f"{'' if amp_dtype or precision == 'no' else ' (no autocast here)'}, "
          f"{'fused' if cfg.optim.fused else 'default'} AdamW on both sides: plain PyTorch {base * 1e3:.1f} ms, "
          f"harness {harness * 1e3:.1f} ms, overhead {100 * (harness / base - 1):+.1f}%")
    trainer.monitor.close()
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

    from harness import scale
    from harness.config import load_config
    from harness.monitor import StepStats
    from harness.trainer import Trainer
    from shards.__main__ import main as shards_main

    tmp = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, tmp, True)
    shards_main(["demo", str(tmp / "s"), "--num-samples", "64", "--image-size", str(a.image_size), "--quiet"])
    overrides = [f"data.train={tmp / 's'}", f"run.dir={tmp / 'run'}", f"data.image_size={a.image_size}",
                 f"train.batch_size={a.batch_size}", "log.progress=false", "data.num_workers=0", *a.overrides]
    cfg = load_config([a.config] if a.config else [], overrides)
    tr = Trainer(cfg)
    images = torch.randint(0, 255, (a.batch_size, a.image_size, a.image_size, 3), dtype=torch.uint8)
    batch = {"image": images, "cls": torch.zeros(a.batch_size, dtype=torch.long), "bad": 0, "bad_error": ""}
    batches = iter(lambda: batch, None)
    stats = StepStats()
    step_s = _timed(lambda: tr.train_step(batches, stats), a.steps, a.warmup, tr.device)

    # What this rank holds: Adam's moments (exp_avg, exp_avg_sq: the optimizer state ZeRO
    # partitions; a whole copy under DDP) and the model parameters resident (ZeRO-3: its slice).
    opt = tr.base_optimizer
    moments = _tensor_bytes(v for st in opt.state.values() for k, v in st.items() if k.startswith("exp_avg"))
    resident = _tensor_bytes(getattr(p, "ds_tensor", p) for p in tr.engine.model.parameters())
    # Activations kept for backward in one forward (a saved-tensors hook sees what autograd keeps).
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    x = torch.zeros(a.batch_size, 3, a.image_size, a.image_size, dtype=tr.engine.input_dtype, device=tr.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tr.engine.model(x)
    out.recon.float().mean().backward()  # ZeRO-3 expects every forward to be followed by a backward
    tr.engine.model.zero_grad() if hasattr(tr.engine.model, "zero_grad") else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB
    res = {"rank": tr.world.rank, "zero": scale.zero_stage(tr.engine.model), "step_ms": step_s * 1e3,
           "optimizer_state_mib": moments / 2**20, "params_resident_mib": resident / 2**20,
           "activations_mib": saved[0] / 2**20, "peak_rss_mib": rss, "num_params": tr.num_params}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{tr.world.rank}.json").write_text(json.dumps(res))
    tr.monitor.close()


def scale_runs(spec: str) -> list[tuple[str, bool]]:
    """`--runs`: a comma list of backend[+ckpt] (the first is the ratios' base), or all six."""
    if not spec:
        return [(name, ckpt) for name in SCALE_BACKENDS for ckpt in (False, True)]
    runs = []
    for item in spec.split(","):
        name, _, opt = item.strip().partition("+")
        if name not in SCALE_BACKENDS or opt not in ("", "ckpt"):
            raise ValueError(f"--runs: {item!r} is not {'|'.join(SCALE_BACKENDS)}[+ckpt]")
        runs.append((name, opt == "ckpt"))
    return runs


def bench_scale(a) -> list[dict]:
    import socket
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    rows = []
    for name, ckpt in scale_runs(a.runs):
        config = SCALE_BACKENDS[name]
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
        worst = {k: max(rk[k] for rk in ranks) for k in ranks[0] if k != "rank"}
        row = {"backend": name, "grad_ckpt": ckpt, **worst}
        rows.append(row)
    base = rows[0]
    print(f"scale   2 processes, batch {a.batch_size}/rank, {a.image_size}px, "
          f"{base['num_params'] / 1e6:.2f}M parameters "
          f"(per rank, max over ranks; ratios against {base['backend']}{' with' if base['grad_ckpt'] else ' without'} "
          "checkpointing)")
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


# ---------------------------------------------------------------------------------------------
# peer
# ---------------------------------------------------------------------------------------------

PEER_PRESETS = {
    # CPU-sized: three levels of 64/128/256 channels, 2 residual blocks each, mid-block attention.
    "small": dict(ch=64, ch_mult=(1, 2, 4), layers=2, image_size=64, batch_size=8),
    # latent diffusion's kl-f8 (the Stable Diffusion VAE's shape): 83.65M parameters, 256 px -> 4x32x32.
    "kl-f8": dict(ch=128, ch_mult=(1, 2, 4, 4), layers=2, image_size=256, batch_size=8),
}
# Dense bf16 tensor-core peak (TFLOP/s) from the vendors' data sheets (half their "with sparsity" figures), by
# the device's name without "NVIDIA ": the first pattern that matches its start as whole words wins, so a variant
# comes before its family (H100 NVL is not an H100 SXM) and L4 is not L40S. SXM parts are named plainly
# ("NVIDIA H200", "NVIDIA H100 80GB HBM3"). Unknown devices -> None (n/a).
BF16_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("GH200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))
PEER_OPTIONS = ("channels_last", "nhwc", "nchw", "compile", "foreach", "fused", "nokernel")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_peak(name: str) -> float | None:
    name = re.sub(r"^NVIDIA\s+", "", name.strip(), flags=re.IGNORECASE)
    return next((v for k, v in BF16_PEAK_TFLOPS if re.match(re.escape(k) + r"(?!\w)", name, re.IGNORECASE)), None)


def measured_bf16_matmul(device, n: int = 8192, reps: int = 10, tries: int = 3) -> float:
    """TFLOP/s of an n x n x n bf16 matrix product on random data (the best of `tries` means over `reps`
    products, after 3 warm-ups that also lift the clocks): the ceiling this machine reaches, beside the
    data sheet's. 8192: ~1.4 ms a product on an H200, a fraction of a second in all."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b, c = torch.randn_like(a), torch.empty_like(a)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(tries):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


def _peer_models(a, device):
    """Ours (models.AutoencoderKL, arch ldm) and diffusers.AutoencoderKL of the same architecture, same seed."""
    from harness.config import ModelConfig
    from models import build_model

    def ours():
        torch.manual_seed(0)
        cfg = ModelConfig(kind="kl", arch="ldm", ch=a.ch, ch_mult=list(a.ch_mult), num_res_blocks=a.layers,
                          z_channels=a.latent_channels, embed_dim=a.latent_channels, attn_type="vanilla",
                          norm_groups=32)
        with device:  # built where it runs (on meta: shapes only, for FLOP counting)
            return build_model(cfg)

    def peer():
        from diffusers import AutoencoderKL as DiffusersKL

        torch.manual_seed(0)
        n = len(a.ch_mult)
        # diffusers' decoder has layers_per_block + 1 resnets per up block, as latent diffusion's.
        with device:
            return DiffusersKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                               up_block_types=("UpDecoderBlock2D",) * n,
                               block_out_channels=tuple(a.ch * m for m in a.ch_mult),
                               layers_per_block=a.layers, latent_channels=a.latent_channels, norm_num_groups=32,
                               sample_size=a.image_size, mid_block_add_attention=True)

    return ours, peer


def _peer_side(name: str, build, device, dtype, kl_weight: float):
    """One side of the comparison: (step function, model). `name` is ours|diffusers, then +option...
    Ours runs as the trainer does by default (`train.channels_last=auto`: an NHWC batch, the convolutions follow
    it, except on CPU under bf16, where the batch is contiguous NCHW), diffusers as its own examples feed it
    (contiguous); +nhwc / +nchw: an NHWC / contiguous batch whatever the default (weights as built);
    +channels_last: the weights NHWC too, as torch's guide does it; +nokernel: ours without the fused
    GroupNorm+SiLU CPU kernel (`train.cpu_kernels=false`)."""
    from harness.data import use_channels_last
    from models import cpu_kernels

    kind, *opts = name.split("+")
    model = build().train()
    precision = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    channels_last = "channels_last" in opts or "nhwc" in opts or (
        kind == "ours" and "nchw" not in opts and use_channels_last("auto", device.type, precision))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if "channels_last" in opts:
        model = model.to(memory_format=torch.channels_last)
    extra = {"foreach": True} if "foreach" in opts else {"fused": True} if "fused" in opts else {"foreach": False}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **extra)
    fwd = torch.compile(model) if "compile" in opts else model
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(x):
        cpu_kernels.set_enabled("nokernel" not in opts)  # one switch per process: set by each side's step
        x = x.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = _peer_loss(kind, fwd, x, kl_weight)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step, model


def _peer_loss(kind: str, model, x, kl_weight: float):
    """L1 + kl_weight * KL of one batch, through the calls each model's own training code makes."""
    if kind == "ours":
        out = model(x)
        recon, kl = out.recon, out.losses["kl"]
    else:
        posterior = model.encode(x).latent_dist  # the calls diffusers' own training examples make
        recon, kl = model.decode(posterior.sample()).sample, posterior.kl().mean()
    return (recon.float() - x).abs().mean() + kl_weight * kl.float()


def _model_flops(build, kind: str, x, kl_weight: float) -> int:
    """FLOPs of one forward + backward of the model `build` makes (convolutions and matmuls, as executed:
    each model's own, e.g. our fused upsampling conv does fewer), counted on the meta device: shapes only,
    no arithmetic, and the same count in any dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    xm = torch.empty_like(x, device="meta")
    with FlopCounterMode(display=False) as counter:
        _peer_loss(kind, build().train(), xm, kl_weight).backward()
    return counter.get_total_flops()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_peer(a) -> dict:
    """Our AutoencoderKL against diffusers' of the same architecture: fwd + bwd + AdamW on one batch."""
    preset = PEER_PRESETS[a.preset]
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    device = torch.device(a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda" and a.cudnn_benchmark:  # process-wide: every side gets its convolutions tuned alike
        torch.backends.cudnn.benchmark = True
    dtype = DTYPES[a.dtype]
    flags = [o for o in PEER_OPTIONS if getattr(a, o)]
    sides = []
    for s in a.sides.split(","):
        kind, *opts = s.split("+")
        if kind not in ("ours", "diffusers") or any(o not in PEER_OPTIONS for o in opts):
            raise ValueError(f"--sides: {s!r} is not ours|diffusers[+{'|+'.join(PEER_OPTIONS)}]")
        opts = list(dict.fromkeys(opts + flags))  # --fused etc.: every side (an option named twice: once)
        if "nchw" in opts and ("channels_last" in opts or "nhwc" in opts):
            raise ValueError(f"--sides: {s!r} with --nchw/--channels-last/--nhwc asks for both NHWC and NCHW memory")
        if kind == "diffusers" and "nchw" in opts:
            opts.remove("nchw")  # its layout already
        sides.append("+".join([kind, *opts]))
    if a.clock == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu: process time measures CPU runs only; use --clock wall on a GPU")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        if any(s.startswith("diffusers") for s in sides):
            msg = "the peer benchmark needs diffusers: pip install 'diffusers>=0.30' (or -e '.[peer]')"
            raise ValueError(msg) from None
    ours, peer = _peer_models(a, device)
    n_ours = sum(p.numel() for p in ours().parameters())
    n_peer = sum(p.numel() for p in peer().parameters()) if any(s.startswith("diffusers") for s in sides) else None
    print(f"peer    parameters: ours {n_ours:,}" + (f", diffusers {n_peer:,}" if n_peer else ""))
    if n_peer and n_ours != n_peer:
        raise SystemExit(f"error: parameter counts differ (ours {n_ours:,}, diffusers {n_peer:,}): "
                         "not the same architecture")

    torch.manual_seed(1)
    x = torch.rand(a.batch_size, 3, a.image_size, a.image_size, device=device) * 2 - 1
    steps, first = {}, {}
    for s in sides:  # build and warm up each side; the first step of a compiled side is its compile time
        steps[s], _ = _peer_side(s, ours if s.startswith("ours") else peer, device, dtype, a.kl_weight)
        _sync(device)
        t0 = time.perf_counter()
        steps[s](x)
        _sync(device)
        first[s] = time.perf_counter() - t0
        for _ in range(a.warmup):
            steps[s](x)
    times, cpu_times = {s: [] for s in sides}, {s: [] for s in sides}
    for r in range(a.rounds):  # alternating rounds, order reversed every other round: neither side goes second
        for s in sides if r % 2 == 0 else sides[::-1]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                steps[s](x)
            _sync(device)
            times[s].append((time.perf_counter() - t0) / a.steps)
            cpu_times[s].append((time.process_time() - c0) / a.steps)
    wall = {s: statistics.median(v) for s, v in times.items()}
    cpu = {s: statistics.median(v) for s, v in cpu_times.items()}
    # On a shared CPU, process time of a one-thread run (OMP_NUM_THREADS=1) is what other jobs disturb least.
    med = cpu if a.clock == "cpu" else wall

    flops = {}  # per model: each side's TFLOP/s from its own model's count (diffusers' does ~12% more at kl-f8)
    if a.flops:
        builders = dict(zip(("ours", "diffusers"), _peer_models(a, torch.device("meta"))))
        for kind in dict.fromkeys(s.split("+")[0] for s in sides):
            flops[kind] = _model_flops(builders[kind], kind, x, a.kl_weight)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = bf16_peak(name) if device.type == "cuda" else None
    base = next((s for s in sides if s.split("+")[0] == "diffusers"), sides[0])
    rows = []
    print(f"peer    {name}, {a.dtype}, batch {a.batch_size}, {a.image_size}px, ch {a.ch} x {list(a.ch_mult)}, "
          f"{a.layers} layers, {a.rounds} rounds x {a.steps} steps"
          f"{', cudnn.benchmark' if torch.backends.cudnn.benchmark else ''} "
          f"(median {a.clock} ms/step; ratio = {base} ms / side ms)")
    for s in sides:
        row = {"side": s, "ms": round(med[s] * 1e3, 2), "wall_ms": round(wall[s] * 1e3, 2),
               "cpu_ms": round(cpu[s] * 1e3, 2), "img_s": float(f"{a.batch_size / med[s]:.4g}"),
               "ratio": round(med[base] / med[s], 3), "first_step_s": round(first[s], 2)}
        if "compile" in s:  # the first step (wall) less a compiled step: tracing, lowering, C++/Triton builds
            row["compile_s"] = round(first[s] - wall[s], 2)
        if flops:
            row["tflops"] = float(f"{flops[s.split('+')[0]] / med[s] / 1e12:.4g}")
            row["peak_fraction"] = round(row["tflops"] / peak, 3) if peak else None
        rows.append(row)
        extra = (f", compile {row['compile_s']:.1f} s" if "compile_s" in row else "") + (
            f", {row['tflops']:.3g} TFLOP/s" + (f" ({100 * row['peak_fraction']:.0f}% of {peak:.0f} bf16 peak)"
                                                 if peak else " (peak n/a)") if flops else "")
        print(f"  {s:<32} {row['ms']:>10.1f} ms {row['img_s']:>9.3g} img/s   ratio {row['ratio']:.2f}   "
              f"(wall {row['wall_ms']:.1f} ms, cpu {row['cpu_ms']:.1f} ms){extra}")
    return {"bench": "peer", "device": name, "dtype": a.dtype, "clock": a.clock, "threads": torch.get_num_threads(),
            "preset": a.preset, "batch_size": a.batch_size, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "image_size": a.image_size, "ch": a.ch, "ch_mult": list(a.ch_mult), "layers": a.layers,
            "params_ours": n_ours, "params_diffusers": n_peer, "flops_per_step": flops.get("ours"),
            "flops_per_step_diffusers": flops.get("diffusers"), "bf16_peak_tflops": peak,
            "rows": rows, "ratio": rows[0]["ratio"]}


# ---------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------


def _plain_encode(model, urls: list[str], size: int, batch_size: int, out: Path, device) -> int:
    """What one writes by hand: webdataset reads the shards, PIL decodes + center-crops + resizes each image
    (the loader's own function), batches go through the model, and each latent (and std) is np.save'd into
    one tar with tarfile beside the sample's cls/json/txt, in one process. Returns the images encoded."""
    import io
    import itertools
    import random
    import tarfile

    import webdataset as wds

    from harness.data import to_model_input
    from harness.encode import latent_fields
    from shards.decode import IMAGE_KEYS, load_image

    def member(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    rng, done = random.Random(0), 0
    samples = iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    with tarfile.open(out, "w") as tar, torch.no_grad():
        while chunk := list(itertools.islice(samples, batch_size)):
            x = np.stack([load_image(next(s[k] for k in IMAGE_KEYS if k in s), size, "center", False, rng)
                          for s in chunk])
            fields, _ = latent_fields(model, to_model_input(torch.from_numpy(x), device), None)
            arrays = {k: v.float().cpu().numpy().astype(np.float16) for k, v in fields.items()}
            for i, sample in enumerate(chunk):
                for name, a in arrays.items():
                    buf = io.BytesIO()
                    np.save(buf, a[i])
                    member(tar, f"{sample['__key__']}.{name}.npy", buf.getvalue())
                for k in ("cls", "json", "txt"):
                    if k in sample:
                        member(tar, f"{sample['__key__']}.{k}", sample[k])
            done += len(chunk)
    return done


def bench_encode(a) -> dict:
    """launch/encode.py (loader workers decoding beside the model, shards written atomically, statistics)
    against the plain loop on the same images and fields, alternating rounds; images/s and the ratio."""
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    try:
        return _bench_encode(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench_encode(a, tmp: Path) -> dict:
    from harness.dist import World
    from harness.encode import EncodeOptions, Model, encode_shards
    from harness.inference import load_model
    from harness.tasks import weights_digest

    device = torch.device(a.device)
    if a.model.endswith((".yaml", ".yml")):  # a config: its model with fresh weights (the GPU check has no run)
        import yaml

        from harness.config import load_config, to_dict
        from harness.export import save_safetensors
        from models import build_model

        cfg = load_config([a.model], [f"data.train={a.data}"])
        torch.manual_seed(0)
        folder = tmp / "model"
        folder.mkdir()
        save_safetensors(build_model(cfg.model).state_dict(), folder / "model.safetensors")
        (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    else:
        folder = Path(a.model)
    model, cfg, folder = load_model(folder, device=device)
    size = a.image_size or cfg.data.image_size
    from shards.sources import resolve_sources

    urls = [u for src in resolve_sources(a.data, require_count=False) for u in src.urls]
    opts = EncodeOptions(image_size=size, batch_size=a.batch_size, workers=a.workers)
    wrapped = Model(model, cfg, folder, weights_digest(model))
    times: dict[str, list[float]] = {"encode.py": [], "plain loop": []}
    for r in range(a.rounds + 1):  # the first round warms both up, untimed
        for side in times:
            out = tmp / f"{side.split('.')[0].replace(' ', '_')}{r}"
            t0 = time.perf_counter()
            if side == "encode.py":
                count = encode_shards(wrapped, a.data, out, opts, World(), device, progress=False)["num_samples"]
            else:
                out.mkdir()
                plain = _plain_encode(model, urls, size, a.batch_size, out / "latents.tar", device)
                if plain != count:  # both sides must do the same work
                    raise ValueError(f"{a.data}: the plain loop encoded {plain} images, encode.py {count} (bad "
                                     "samples?): give the benchmark shards whose images all decode")
            if r:
                times[side].append(time.perf_counter() - t0)
            shutil.rmtree(out, ignore_errors=True)
    rate = {side: count / statistics.median(t) for side, t in times.items()}
    ratio = rate["encode.py"] / rate["plain loop"]
    print(f"encode {count} images at {size} px, batch {a.batch_size}, {a.workers} loader workers, "
          f"{torch.get_num_threads()} threads, median of {a.rounds} rounds:")
    for side, value in rate.items():
        print(f"  {side:<10} {value:8.1f} img/s")
    print(f"  ratio {ratio:.2f}x (encode.py / plain loop)")
    return {"bench": "encode", "images": count, "image_size": size, "workers": a.workers, "device": str(device),
            "img_per_s": rate, "ratio": ratio}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    sc.add_argument("--runs", default="", help="comma list of ddp|zero2|zero3[+ckpt] (+ckpt: gradient "
                    "checkpointing on); default all six, DDP without checkpointing first (the ratios' base)")
    wk.add_argument("--out", required=True)
    pe = sub.add_parser("peer", help="our AutoencoderKL vs diffusers.AutoencoderKL, same architecture, same step")
    pe.add_argument("--preset", choices=sorted(PEER_PRESETS), default="small",
                    help="small: 64/128/256 channels, 64 px, batch 8; kl-f8: 128 x 1,2,4,4, 256 px")
    pe.add_argument("--ch", type=int, default=None, help="base channels (preset)")
    pe.add_argument("--ch-mult", type=lambda v: tuple(int(c) for c in v.split(",")), default=None, help="e.g. 1,2,4")
    pe.add_argument("--layers", type=int, default=None, help="residual blocks per level (preset)")
    pe.add_argument("--latent-channels", type=int, default=4)
    pe.add_argument("--image-size", type=int, default=None)
    pe.add_argument("--batch-size", type=int, default=None)
    pe.add_argument("--kl-weight", type=float, default=1e-6)
    pe.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    pe.add_argument("--steps", type=int, default=1, help="steps per side per round")
    pe.add_argument("--warmup", type=int, default=1, help="untimed steps per side after the first")
    pe.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    pe.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process time (steadier on a shared machine with OMP_NUM_THREADS=1; CPU runs only)")
    pe.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="bf16/fp16: autocast (fp16 with GradScaler)")
    pe.add_argument("--sides", default="ours,diffusers",
                    help=f"comma list of ours|diffusers[+{'|+'.join(PEER_OPTIONS)}]; ratios against the first "
                    "diffusers side")
    pe.add_argument("--compile", action="store_true",
                    help="torch.compile every side (the first step reports compile time)")
    pe.add_argument("--channels-last", dest="channels_last", action="store_true",
                    help="channels_last weights and batch on every side")
    pe.add_argument("--nhwc", action="store_true",
                    help="an NHWC batch on every side, weights as built (ours has it by default but on CPU under "
                    "bf16: train.channels_last=auto)")
    pe.add_argument("--nchw", action="store_true", help="a contiguous NCHW batch on every side")
    pe.add_argument("--foreach", action="store_true", help="AdamW(foreach=True) on every side (default: foreach=False)")
    pe.add_argument("--fused", action="store_true", help="AdamW(fused=True) on every side")
    pe.add_argument("--nokernel", action="store_true",
                    help="ours without the fused GroupNorm+SiLU CPU kernel (train.cpu_kernels=false)")
    pe.add_argument("--no-tf32", dest="tf32", action="store_false", help="CUDA: keep matmuls/convs in full fp32")
    pe.add_argument("--cudnn-benchmark", dest="cudnn_benchmark", action="store_true",
                    help="CUDA: torch.backends.cudnn.benchmark (each conv shape's fastest kernel, timed at the first "
                    "step; every side alike)")
    pe.add_argument("--flops", action="store_true",
                    help="count each model's FLOPs (torch.utils.flop_counter): TFLOP/s, peak share")
    en = sub.add_parser("encode", help="launch/encode.py vs a plain decode-encode-save loop, same images")
    en.add_argument("model", help="run folder, checkpoint folder, exported folder, or a config .yaml (fresh weights)")
    en.add_argument("--data", required=True, help="shards (folder, pattern): every image is encoded each round")
    en.add_argument("--image-size", type=int, default=None)
    en.add_argument("--batch-size", type=int, default=32)
    en.add_argument("--workers", type=int, default=2)
    en.add_argument("--rounds", type=int, default=3)
    en.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for s in (lo, st, sc, pe, en):
        s.add_argument("--json", default=None, help="append the result as one JSON line")
    a = p.parse_args(argv)
    if a.bench == "_scale_worker":
        scale_worker(a)
        return 0
    from harness.config import ConfigError
    from shards.sources import DataSourceError

    try:
        res = {"loader": bench_loader, "step": bench_step, "scale": bench_scale, "peer": bench_peer,
               "encode": bench_encode}[a.bench](a)
    except (ConfigError, DataSourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
