"""Train the perception network of the perceptual loss: a small conv classifier on the shards'
`cls` labels (models/perception.py). Nothing is downloaded; the network learns from your data.

    # one process (CPU or one GPU)
    python launch/train_perception.py --data data/demo --out runs/perception
    # two CPU processes (gloo), or N GPUs with DDP: only the launcher changes
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 launch/train_perception.py --data data/demo
    accelerate launch --multi_gpu --num_processes 8 launch/train_perception.py --data DIR --image-size 128

It writes, atomically, into --out:
    perception.safetensors   weights + architecture + info (what loss.perceptual_net points at)
    perception.json          the same architecture and info, for people: classes, accuracy, steps
    train.log, tb/           the training curve (loss, accuracy, lr)
Accuracy is measured on the first --eval-samples samples of --val (held-out shards) when given,
else of --data (then it is training accuracy, and perception.json says so).

Then train an autoencoder with it:
    python launch/train.py --config launch/configs/perceptual_demo.yaml \
        loss.perceptual_net=runs/perception/perception.safetensors

Exit codes: 0 done, 2 bad arguments or data (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harness.config import DataConfig  # noqa: E402
from harness.dist import DistEnvError  # noqa: E402
from shards.sources import DataSourceError  # noqa: E402


class PerceptionDataError(ValueError):
    """The shards cannot train a classifier (no labels): one line why."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training shards with `cls` labels (pattern, folder or comma list)")
    p.add_argument("--val", default="", help="held-out shards for the accuracy in perception.json ('' = --data)")
    p.add_argument("--out", default="runs/perception", help="output folder")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="samples per process per step")
    p.add_argument("--image-size", type=int, default=64, help="training resolution (use the autoencoder's)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warmup, then cosine to 10%%)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--channels", default="32,64,128,256", help="channels per stage; each stage after the first halves the size")
    p.add_argument("--norm-groups", type=int, default=8, help="GroupNorm groups (channels must be divisible)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    p.add_argument("--num-workers", type=int, default=2, help="loader worker processes per rank")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="samples in each worker's shuffle buffer")
    p.add_argument("--num-samples", type=int, default=0, help="dataset size for shards without an index (0 = read it)")
    p.add_argument("--eval-samples", type=int, default=512, help="samples the final accuracy is measured on")
    p.add_argument("--log-every", type=int, default=50, help="log loss and accuracy every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    args = p.parse_args(argv)
    try:
        args.channels = [int(c) for c in args.channels.split(",")]
    except ValueError:
        p.error(f"--channels: expected comma-separated integers, got {args.channels!r}")
    for name in ("steps", "batch_size", "image_size", "log_every", "eval_samples", "norm_groups"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.image_size < 8:
        p.error("--image-size: must be >= 8")
    return args


def _sources(spec: str) -> str | list[str]:
    return spec.split(",") if "," in spec and "{" not in spec else spec


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train(args) -> int:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from harness.data import TrainLoader, fixed_batch, to_model_input
    from harness.dist import RankLogger, all_reduce_sum, world
    from models.perception import FORMAT, PerceptionNet, save_perception

    accelerator = Accelerator()  # DDP / mixed precision come from `accelerate launch` and its config
    w = world()  # from torch.distributed once accelerate has set it up
    out = Path(args.out)
    data = DataConfig(train=_sources(args.data), image_size=args.image_size, crop="random", hflip=args.hflip,
                      num_workers=args.num_workers, shuffle_buffer=args.shuffle_buffer, seed=args.seed,
                      num_samples=args.num_samples)
    # Not passed through accelerator.prepare(): the loader already splits shards by rank.
    loader = TrainLoader(data, rank=w.rank, world_size=w.world_size, batch_size=args.batch_size,
                         pin_memory=accelerator.device.type == "cuda")
    classes = loader.info.classes
    if len(classes) < 2:
        raise PerceptionDataError(f"--data {args.data}: the shards name {len(classes)} class(es) in index.json; "
                                  "a classifier needs `cls` labels of at least 2 classes")
    log = RankLogger(w.is_main, out / "train.log")
    tb = None
    if w.is_main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))

    set_seed(args.seed)  # identical initial weights on every rank
    try:
        net = PerceptionNet(in_channels=3, channels=args.channels, num_classes=len(classes), norm_groups=args.norm_groups)
    except ValueError as e:
        raise PerceptionDataError(f"--channels/--norm-groups: {e}") from None
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model, optimizer = accelerator.prepare(net, optimizer)
    log.info(f"perception net: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, stages {args.channels}, "
             f"{len(classes)} classes, {loader.info.num_samples} samples, {w.world_size} process(es), "
             f"{args.steps} steps of {args.batch_size}/process at {args.image_size} px")

    batches = loader.batches()
    model.train()
    run_loss, run_correct, run_seen, t0 = 0.0, 0.0, 0.0, time.perf_counter()
    last_loss = float("nan")
    for step in range(1, args.steps + 1):
        batch = next(batches)
        x = to_model_input(batch["image"], accelerator.device)
        y = batch["cls"].to(accelerator.device)
        if (y < 0).any() or (y >= len(classes)).any():
            raise PerceptionDataError(f"--data {args.data}: a sample has no `cls` label or one outside the "
                                      f"{len(classes)} classes of index.json (keys {batch['key'][:2]})")
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run_loss += float(loss.detach()) * len(y)
        run_correct += float((logits.argmax(1) == y).sum())
        run_seen += len(y)
        if step % args.log_every == 0 or step == args.steps:
            total_loss, correct, seen = all_reduce_sum([run_loss, run_correct, run_seen], accelerator.device)
            last_loss = total_loss / seen
            values = {"perception/loss": last_loss, "perception/train_accuracy": correct / seen,
                      "perception/lr": scheduler.get_last_lr()[0],
                      "perception/images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
            if tb is not None:
                for k, v in values.items():
                    tb.add_scalar(k, v, step)
            log.info(f"step {step}/{args.steps} " + " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in values.items()))
            run_loss, run_correct, run_seen, t0 = 0.0, 0.0, 0.0, time.perf_counter()

    # Every rank holds the same weights (DDP); the main process measures and writes.
    if w.is_main:
        net = accelerator.unwrap_model(model).float().eval()
        eval_on = args.val or args.data
        ref = fixed_batch(_sources(eval_on), args.eval_samples, args.image_size)
        if ref is None:
            raise PerceptionDataError(f"{eval_on}: no readable samples to measure the accuracy on")
        correct = 0
        with torch.no_grad():
            for images, labels in zip(ref["image"].split(args.batch_size), ref["cls"].split(args.batch_size)):
                pred = net(to_model_input(images, accelerator.device)).argmax(1).cpu()
                correct += int((pred == labels).sum())
        n = len(ref["cls"])
        info = {
            "classes": list(classes),
            "num_classes": len(classes),
            "accuracy": correct / n,
            "accuracy_on": "val" if args.val else "train",
            "eval_samples": n,
            "chance": 1 / len(classes),
            "final_train_loss": last_loss,
            "image_size": args.image_size,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "world_size": w.world_size,
            "data": args.data,
            "val": args.val,
        }
        path = save_perception(net, out / "perception.safetensors", info)
        _write_json_atomic(out / "perception.json", {"format": FORMAT, "arch": asdict(net.arch), **info})
        log.info(f"accuracy {info['accuracy']:.3f} on {n} {info['accuracy_on']} samples (chance {info['chance']:.3f}); "
                 f"wrote {path} and {out / 'perception.json'}")
        log.info(f"use it: python launch/train.py --config launch/configs/perceptual_demo.yaml loss.perceptual_net={path}")
    accelerator.wait_for_everyone()
    if tb is not None:
        tb.close()
    log.close()
    return 0


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # accelerate imports DeepSpeed, which would warn that it guessed
    try:
        return train(args)
    except (DataSourceError, DistEnvError, PerceptionDataError) as e:
        _say(f"error: {e}")
        return 2
    finally:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
