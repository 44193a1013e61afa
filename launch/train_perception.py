"""Train the perception network of the perceptual loss: a small conv classifier on the shards'
`cls` labels (models/perception.py). Nothing is downloaded; the network learns from your data.

This is a shorthand for the one training loop: it runs `launch/train.py` with `model.kind=classifier`
(launch/configs/perception.yaml), so it has checkpoints, `--resume`, TensorBoard, DDP and SLURM
like every other run. These two commands do the same:

    python launch/train_perception.py --data data/demo --out runs/perception --channels 32,64,128,256
    python launch/train.py --config launch/configs/perception.yaml data.train=data/demo run.dir=runs/perception

    # no class labels (img2dataset / LAION shards): learn to tell the four rotations of each image apart
    python launch/train_perception.py --data shards/laion --labels rotation --out runs/perception-rot

    # two CPU processes (gloo), or N GPUs with DDP: only the launcher changes
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 launch/train_perception.py --data data/demo

At the end it writes, atomically, into --out (the run folder):
    perception.safetensors   weights + architecture + info (what loss.perceptual_net points at)
    perception.json          the same architecture and info, for people: classes, accuracy, steps
    train.log, tb/, checkpoints/   as every run
Accuracy is measured on the first --eval-samples samples of --val (held-out shards) when given,
else of --data (then it is training accuracy, and perception.json says so).

Then train an autoencoder with it:
    python launch/train.py --config launch/configs/perceptual_demo.yaml \
        loss.perceptual_net=runs/perception/perception.safetensors

Exit codes: 0 done, 2 bad arguments or data (one line on stderr), 75 stopped by a signal after a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from harness.config import ConfigError, load_config  # noqa: E402
from launch.train import main as train_main  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training shards (pattern, folder or comma list); with `cls` labels "
                   "unless --labels rotation")
    p.add_argument("--labels", choices=["cls", "rotation"], default="cls",
                   help="cls: classify the shards' classes; rotation: predict the rotation of each image (no labels "
                        "needed: any shards, img2dataset/LAION included)")
    p.add_argument("--val", default="", help="held-out shards for the accuracy in perception.json ('' = --data)")
    p.add_argument("--out", default="runs/perception", help="output folder (the run folder)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="samples per process per step")
    p.add_argument("--image-size", type=int, default=64, help="training resolution (use the autoencoder's)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warmup, then cosine to 10%%)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--channels", default="32,64,128,256",
                   help="channels per stage, each a multiple of the first; each stage after the first halves the size")
    p.add_argument("--norm-groups", type=int, default=8, help="GroupNorm groups (channels must be divisible)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    p.add_argument("--num-workers", type=int, default=2, help="loader worker processes per rank")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="samples in each worker's shuffle buffer")
    p.add_argument("--num-samples", type=int, default=0, help="dataset size for shards without an index (0 = read it)")
    p.add_argument("--eval-samples", type=int, default=512, help="samples the final accuracy is measured on")
    p.add_argument("--log-every", type=int, default=50, help="log loss and accuracy every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    p.add_argument("--resume", default=None, metavar="latest|PATH", help="continue an interrupted run in --out")
    args = p.parse_args(argv)
    try:
        channels = [int(c) for c in args.channels.split(",")]
    except ValueError:
        p.error(f"--channels: expected comma-separated integers, got {args.channels!r}")
    if not channels or min(channels) < 1 or any(c % channels[0] for c in channels):
        p.error(f"--channels: each stage's channels must be a positive multiple of the first; got {args.channels}")
    args.ch, args.ch_mult = channels[0], [c // channels[0] for c in channels]
    return args


def settings(a) -> list[tuple[str, str, object]]:
    """The command line above as (flag, config key, value) for launch/configs/perception.yaml."""
    def listed(spec: str) -> str:
        return f"[{spec}]" if "," in spec and "{" not in spec else spec

    kind = {"cls": "classifier", "rotation": "rotnet"}[a.labels]
    return [("--labels", "model.kind", kind), ("--data", "data.train", listed(a.data)),
            ("--val", "data.val", listed(a.val)), ("--out", "run.dir", a.out), ("--steps", "train.max_steps", a.steps),
            ("--batch-size", "train.batch_size", a.batch_size), ("--image-size", "data.image_size", a.image_size),
            ("--lr", "optim.lr", a.lr), ("--weight-decay", "optim.weight_decay", a.weight_decay),
            ("--warmup", "optim.warmup_steps", a.warmup), ("--channels", "model.ch", a.ch),
            ("--channels", "model.ch_mult", a.ch_mult), ("--norm-groups", "model.norm_groups", a.norm_groups),
            ("--hflip", "data.hflip", str(a.hflip).lower()), ("--num-workers", "data.num_workers", a.num_workers),
            ("--shuffle-buffer", "data.shuffle_buffer", a.shuffle_buffer),
            ("--num-samples", "data.num_samples", a.num_samples),
            ("--eval-samples", "log.eval_samples", a.eval_samples),
            ("--log-every", "log.every_steps", a.log_every), ("--seed", "train.seed", a.seed),
            ("--seed", "data.seed", a.seed)]


def overrides(a) -> list[str]:
    """The command line above as config overrides of launch/configs/perception.yaml."""
    return [f"{key}={value}" for _, key, value in settings(a)]


def flag_error(a, error: str) -> str | None:
    """A config error about a key this script sets, told by its flag (`--steps: 0 is out of range ...`)."""
    return next((f"{flag}: {error.split(': ', 1)[1]}" for flag, key, _ in settings(a)
                 if error.startswith((f"{key}: ", f"{key}[")) and ": " in error), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = ROOT / "launch/configs/perception.yaml"
    try:  # the flags' values, checked as the trainer will: an error names the flag, not the config key
        load_config([config], overrides(args))
    except ConfigError as e:
        if (said := flag_error(args, str(e))) is not None:
            print(f"error: {said}", file=sys.stderr)
            return 2
    resume = ["--resume", args.resume] if args.resume else []
    return train_main(["--config", str(config), *resume, *overrides(args)])


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as launch/train.py: no C++ teardown after a finished run
