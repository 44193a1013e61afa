"""Encode a shard set into latent shards, once, for training a diffusion model on the latents.

    python launch/encode.py runs/kl-f8 --data data/imagenet/train --out latents/imagenet-256
    python launch/encode.py runs/kl-f8 --out latents/in256 --flip --dtype float32   # + mirrored images
    torchrun --nproc_per_node 8 launch/encode.py runs/kl-f8 --data data/imagenet/train --out latents/in256

MODEL is a run folder (its newest checkpoint), a checkpoint folder or an exported folder; `--ema`
takes the EMA weights. Each input shard becomes one latent shard (same order, same keys): `latent.npy`
(KL: the posterior mean, with `std.npy`; VQ: the latent before quantization, with `codes.npy`; FSQ:
the codes), and the input's `cls`, `json` and `txt`. Images are center-cropped at the model's training
size (or --image-size). `latents.json`, written last, records the model, the settings, every shard and
the latents' scaling_factor/shift_factor. Run again after an interruption: finished shards are kept.
Read them with plain webdataset (harness/encode.py explains each field):

    ds = wds.WebDataset("latents/in256/{000000..000099}.tar", shardshuffle=False).decode()
    for latent, std, cls in ds.to_tuple("latent.npy", "std.npy", "cls"): ...
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from harness.config import ConfigError  # noqa: E402
from harness.dist import DistEnvError, world  # noqa: E402
from harness.encode import MANIFEST, EncodeError, EncodeOptions, Model, encode_shards, init_group, now, rate  # noqa: E402
from harness.inference import (  # noqa: E402
    LoadError,
    RequestError,
    check_device,
    check_image_size,
    load_model,
    out_of_memory,
    refuse_perception_net,
)
from harness.tasks import weights_digest  # noqa: E402
from shards.sources import DataSourceError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder, checkpoint folder or exported folder")
    p.add_argument("--out", required=True, help="folder for the latent shards (new, empty, or an earlier encoding's)")
    p.add_argument("--data", default=None, help="shards to encode (default: the run's data.train)")
    p.add_argument("--image-size", type=int, default=None,
                   help="center crop size (default: the training data.image_size)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (and rank)")
    p.add_argument("--workers", type=int, default=2, help="loader processes (and rank)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="of latent.npy and std.npy")
    p.add_argument("--flip", action="store_true", help="also encode each image mirrored (latent_flip.npy, ...)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast of the encoder")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace latents of another model, data or settings in --out")
    p.add_argument("--verify", action="store_true",
                   help="check every finished shard against the sha256 recorded for it (a run checks sizes only) "
                        "and write the ones that differ again")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK where CUDA is, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: need at least 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: need 0 or more")
    return args


def _terminated(signum, frame):
    # Once: under SLURM a rank gets the signal twice (srun's, then torchrun's as it shuts the workers down), and
    # a second KeyboardInterrupt raised in a finalizer on the way out only prints "Exception ignored in ...".
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the half-written shards are dropped on the way


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: what sbatch --signal=USR1@120 sends before the limit


def main(argv: list[str] | None = None) -> int:
    previous = {s: signal.signal(s, _terminated) for s in STOP_SIGNALS}
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print("encode: stopped by a signal; the finished shards are kept (run the same command again to go on), "
              "nothing half-written is left", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if tdist.is_initialized():
            tdist.destroy_process_group()


def run(args) -> int:
    try:
        w = world()
    except DistEnvError as e:
        print(f"encode: {e}", file=sys.stderr)
        return 2

    def say(message: str) -> None:
        if w.is_main:
            print(message, file=sys.stderr)

    try:
        init_group(w)
        device = args.device or (f"cuda:{w.local_rank}" if torch.cuda.is_available() else "cpu")
        check_device(device)
        module, cfg, folder = load_model(args.model, ema=args.ema, device=device)
        refuse_perception_net(cfg, folder, "encode.py")
        if cfg.model.kind == "prior":
            raise RequestError(f"{args.model}: a prior (model.kind=prior) models codes and makes no latents; encode "
                               "with its VQ model (model.prior_vq), whose codes.npy are what it trains on")
        size = cfg.data.image_size if args.image_size is None else args.image_size
        check_image_size(cfg, size)
        opts = EncodeOptions(image_size=size, batch_size=args.batch_size, workers=args.workers, dtype=args.dtype,
                             flip=args.flip, ema=args.ema, precision=args.precision)
        data = args.data or cfg.data.train
        start = now()  # (the rate counts what this run encoded)
        manifest = encode_shards(Model(module, cfg, folder, weights_digest(module)), data, Path(args.out), opts, w,
                                 torch.device(device), overwrite=args.overwrite, progress=not args.no_progress,
                                 verify=args.verify)
    except EncodeError as e:  # one that a single rank met (a NaN latent) is said by that rank
        if w.is_main or not e.shared:
            print(f"encode{'' if w.is_main else f' (rank {w.rank})'}: {e}", file=sys.stderr)
        return 2
    except (LoadError, RequestError, DataSourceError, ConfigError) as e:
        say(f"encode: {e}")
        return 2
    except (RuntimeError, MemoryError) as e:
        if (oom := out_of_memory(e)) is None:
            raise
        print(f"encode{'' if w.is_main else f' (rank {w.rank})'}: {oom}: a smaller --batch-size (or --image-size) "
              "needs less; the finished shards are kept, run again to go on", file=sys.stderr)
        return 1
    except OSError as e:  # a write that failed (disk full, permissions) after the checks: said by the rank that met it
        print(f"encode{'' if w.is_main else f' (rank {w.rank})'}: {e.filename or args.out}: {e.strerror or e}; the "
              "finished shards are kept, run the same command again to go on", file=sys.stderr)
        return 1
    if w.is_main:
        out = Path(args.out)
        stats = manifest["latent_stats"]
        if manifest.get("already_complete"):
            print(f"{out}: already complete ({manifest['num_samples']} latents in {len(manifest['shards'])} shards); "
                  "nothing to do", file=sys.stderr)
        shape = "x".join(map(str, manifest["latent_shape"]))
        bad = f"; {manifest['num_bad']} bad samples skipped (named in {out / MANIFEST})" if manifest["num_bad"] else ""
        listed = manifest.get("num_listed")
        if listed is not None and listed > manifest["num_samples"]:
            bad += (f"; {listed - manifest['num_samples']} of the {listed} samples the inputs' index.json lists are "
                    "not in them (bad, or lost from a shard cut off or emptied since it was built)")
        print(f"{out}: {manifest['num_samples']} latents ({shape} {manifest['dtype']}) in {len(manifest['shards'])} "
              f"shards{'' if manifest.get('already_complete') else ', ' + rate(manifest['encoded_now'], now() - start)}"
              f"; scaling_factor={stats['scaling_factor']:.5f} shift_factor={stats['shift_factor']:.5f}{bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
