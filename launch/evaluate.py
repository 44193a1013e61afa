"""Evaluate a trained autoencoder on held-out shards: PSNR, SSIM, L1, KL, codebook use, and with
reference weights LPIPS, rFID and fd_<net> (harness/evaluation.py: the code validation runs).

    python launch/evaluate.py runs/demo                          # the run's data.val
    python launch/evaluate.py runs/demo --data data/demo-val --max-samples 2000 --json eval.json
    python launch/evaluate.py runs/vq/checkpoints/step_5000 --ema --data data/imagenet/val
    python launch/evaluate.py runs/kl --fid-weights pt_inception-2015-12-05-6726825d.pth --lpips \
        --fd-net runs/perception/perception.safetensors

Every sample is read once (center crop at the training resolution), reconstructed from the
posterior mean (VQ: the quantized latent). Prints a table; `--json` also writes the numbers.

What the pass computed is printed (and written) before anything about it is refused: a metric that
cannot be formed (a Frechet distance of 1 image) is left out with a `note:`; reconstructions that are
not finite (a diverged model) are counted in nonfinite_samples, left out of the metrics, and make
the exit status 2, as does --save-ref-stats of fewer than 2 images. --ref-stats record the image size
and the Inception file they were made with (--save-ref-stats): another of either is refused before
the pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.config import ConfigError  # noqa: E402
from harness.data import condition_field, eval_batches, unread_note  # noqa: E402
from harness.evaluation import Evaluator, fid_net, perception_fd_net  # noqa: E402
from harness.fid import Gaussian, StatsFileError, load_stats  # noqa: E402
from harness.inference import (  # noqa: E402
    LoadError,
    RequestError,
    cannot_write,
    check_device,
    check_image_size,
    check_output_file,
    load_model,
    out_of_memory,
    refuse_perception_net,
)
from harness.losses import file_digest  # noqa: E402
from models.lpips import LPIPS  # noqa: E402
from models.lpips import MIN_SIZE as LPIPS_MIN_SIZE  # noqa: E402
from shards.atomic import write_atomic  # noqa: E402
from shards.sources import DataSourceError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder, checkpoint folder or exported folder")
    p.add_argument("--data", default=None, help="held-out shards (default: the run's data.val)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0 = all)")
    p.add_argument("--image-size", type=int, default=None, help="default: the training data.image_size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--fid-weights", default=None, metavar="PTH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth: adds rfid (FID of reconstructions)")
    p.add_argument("--ref-stats", default=None, metavar="NPZ",
                   help="reference statistics for rfid (pytorch-fid .npz or ours) instead of the inputs' own")
    p.add_argument("--save-ref-stats", default=None, metavar="NPZ", help="write the inputs' Inception statistics")
    p.add_argument("--fd-net", default=None, metavar="FILE",
                   help="a perception.safetensors: adds fd_<stem>, the Frechet distance in its feature space")
    p.add_argument("--lpips", action="store_true", help="add LPIPS(vgg) (weights: --lpips-vgg/--lpips-lin or defaults)")
    p.add_argument("--lpips-vgg", default=None, help="torchvision's vgg16-397923af.pth (default: torch hub cache)")
    p.add_argument("--lpips-lin", default=None, help="lpips' weights/v0.1/vgg.pth (default: the installed package)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def check_request(args) -> None:
    """Counts, sizes, device and output files, before the model is read: a bad one loses no work."""
    for name, least in (("batch_size", 1), ("workers", 0), ("max_samples", 0)):
        if getattr(args, name) < least:
            raise RequestError(f"--{name.replace('_', '-')} {getattr(args, name)}: need at least {least}")
    if args.image_size is not None and args.image_size < 1:
        raise RequestError(f"--image-size {args.image_size}: need a positive number of pixels")
    check_device(args.device)
    for option, path in (("--json", args.json), ("--save-ref-stats", args.save_ref_stats)):
        if path:
            check_output_file(option, path)
    for option, path in (("--ref-stats", args.ref_stats), ("--save-ref-stats", args.save_ref_stats)):
        if path and not args.fid_weights:  # Inception statistics: nothing to compare or write without it
            raise RequestError(f"{option}: Inception statistics for rfid, which needs --fid-weights too")
    if args.ref_stats and args.save_ref_stats:  # rfid's statistics of the data are not computed against a file
        raise RequestError("--ref-stats and --save-ref-stats: one or the other (compare against saved statistics, "
                           "or save these images' statistics)")
    if args.max_samples == 1 and (args.fid_weights or args.fd_net):
        raise RequestError("--max-samples 1: a Frechet distance needs the covariance of at least 2 images")
    if args.save_ref_stats and Path(args.save_ref_stats).suffix not in (".npz", ".safetensors"):
        raise RequestError(f"--save-ref-stats {args.save_ref_stats}: statistics are written as .npz or .safetensors")
    for option, path in (("--lpips-vgg", args.lpips_vgg), ("--lpips-lin", args.lpips_lin)):
        if path and not args.lpips:  # weights for a metric that is off: it would be left out without a word
            raise RequestError(f"{option}: weights for LPIPS, which needs --lpips too")


@torch.no_grad()
def evaluate(args) -> tuple[dict, Gaussian | None, list[str], list[str]]:
    """The metrics; the inputs' Inception statistics for --save-ref-stats (None without it), written by
    `main` after the metrics are printed, so a failed write loses neither; the notes (metrics left out);
    and the errors found in the result (non-finite reconstructions, too few images to save statistics
    of), said by `main` after the numbers and the files, with exit status 2."""
    check_request(args)
    model, cfg, folder = load_model(args.model, ema=args.ema, device=args.device)
    refuse_perception_net(cfg, folder, "evaluate.py")
    if cfg.model.kind == "prior":  # no reconstructions of its own: its loss/ce is in the run's log
        raise LoadError(f"{folder}: a model.kind=prior run has no reconstructions to evaluate; evaluate its VQ model "
                        f"({cfg.model.prior_vq})")
    if args.image_size:
        check_image_size(cfg, args.image_size)
    data = args.data or cfg.data.val
    if not data:
        raise DataSourceError("no held-out data: give --data SHARDS (the run has no data.val)")
    size = args.image_size or cfg.data.image_size
    if args.lpips and size < LPIPS_MIN_SIZE:
        raise RequestError(f"--lpips: LPIPS(vgg) needs images of at least {LPIPS_MIN_SIZE} px a side; this "
                           f"evaluation reads {size} px (--image-size)")
    loader, sources = eval_batches(data, image_size=size, batch_size=args.batch_size, num_workers=args.workers,
                                   max_samples=args.max_samples, cfg=cfg)
    cond_key = condition_field(model.condition)
    if note := unread_note(sources, args.max_samples):
        print(f"note: {note}", file=sys.stderr)
    try:  # the reference networks, read before any image
        nets = [fid_net(args.fid_weights, args.device)] if args.fid_weights else []
        nets += [perception_fd_net(args.fd_net, args.device)] if args.fd_net else []
        lpips = LPIPS.from_files(args.lpips_vgg, args.lpips_lin, device=args.device) if args.lpips else None
    except (ValueError, OSError) as e:
        raise LoadError(str(e)) from None
    try:
        ref = {"rfid": load_stats(args.ref_stats)} if args.ref_stats else None
    except StatsFileError as e:  # its own line names the file; the option says what it was given as
        raise LoadError(f"--ref-stats {e}") from None
    if ref and ref["rfid"].mu.shape[0] != nets[0].dim:  # found now, not after the whole pass
        raise LoadError(f"--ref-stats {args.ref_stats}: {ref['rfid'].mu.shape[0]}-d statistics, but the FID Inception "
                        f"gives {nets[0].dim}-d features (pytorch-fid --dims {ref['rfid'].mu.shape[0]}?): make them "
                        "with --save-ref-stats, or pytorch-fid's --save-stats at its default --dims 2048")
    if ref:
        check_ref_stats(args, ref["rfid"], size)
    quantizer = getattr(model, "quantizer", None)
    ev = Evaluator(device=args.device, class_names=sources[0].classes if cond_key == "cls" else [], lpips=lpips,
                   feature_nets=nets, ref_stats=ref, codebook_size=getattr(quantizer, "codebook_size", 0))
    t0 = time.perf_counter()
    for batch in loader:
        ev.update(model, batch, cond_key)
    metrics = ev.result()
    if metrics["samples"] == 0:
        raise DataSourceError(f"{data}: no readable samples")
    result = {"checkpoint": str(folder), "data": data, "image_size": size, "ema": args.ema, **metrics}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    stats, errors = None, []
    if metrics["nonfinite_samples"]:
        n, bad = metrics["samples"], metrics["nonfinite_samples"]
        errors.append(f"{bad} of {n} reconstructions are not finite (NaN or inf): the model diverged; "
                      + ("the metrics above leave them out" if bad < n else "no reconstruction metric could be formed"))
    if args.save_ref_stats and "rfid" in ev.real:
        if (count := ev.real["rfid"].count) < 2:
            errors.append(f"--save-ref-stats {args.save_ref_stats}: a covariance needs at least 2 images, {count} "
                          f"{'was' if count == 1 else 'were'} read; nothing written")
        else:
            stats = ev.real_stats()["rfid"]
            stats.image_size, stats.net_digest = size, file_digest(args.fid_weights)
    return result, stats, ev.notes, errors


def check_ref_stats(args, ref: Gaussian, size: int) -> None:
    """Statistics of another image size or Inception file do not compare: refused before the pass. A file
    that does not record them (pytorch-fid's --save-stats) is used, with a note that it cannot be checked."""
    if ref.image_size and ref.image_size != size:
        raise LoadError(f"--ref-stats {args.ref_stats}: statistics of {ref.image_size} px images, but this evaluation "
                        f"reads {size} px (--image-size): make them at {size} px with --save-ref-stats")
    if ref.net_digest and ref.net_digest != (digest := file_digest(args.fid_weights)):
        raise LoadError(f"--ref-stats {args.ref_stats}: made with the Inception file of digest {ref.net_digest}, but "
                        f"--fid-weights {args.fid_weights} has digest {digest}: features of another network "
                        "do not compare")
    unknown = [what for what, known in (("network", ref.net_digest), ("image size", ref.image_size)) if not known]
    if unknown:
        print(f"note: --ref-stats {args.ref_stats} does not record its {' and '.join(unknown)} (pytorch-fid's "
              f"--save-stats?): {'they' if len(unknown) > 1 else 'it'} cannot be checked", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result, stats, notes, errors = evaluate(args)
    except (LoadError, DataSourceError, RequestError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        if (oom := out_of_memory(e)) is None:
            raise
        print(f"error: {oom}: a smaller --batch-size needs less", file=sys.stderr)
        return 1
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    writes = [("--save-ref-stats", args.save_ref_stats, stats.save)] if stats is not None else []
    if args.json:
        writes.append(("--json", args.json, lambda p: write_atomic(p, json.dumps(result, indent=1))))
    failed = 0
    for option, path, write in writes:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write(Path(path))
        except OSError as e:  # checked before the work (the disk filled meanwhile?): the numbers are printed above
            print(f"error: {option} {path}: {cannot_write(e, Path(path))}", file=sys.stderr)
            failed = 1
        else:
            if option == "--save-ref-stats":
                print(f"wrote {path} (Inception statistics of {stats.n} images at {stats.image_size} px)",
                      file=sys.stderr)
    for error in errors:  # after the numbers and the files: a refusal here loses nothing computed
        print(f"error: {error}", file=sys.stderr)
    return 2 if errors else failed


if __name__ == "__main__":
    sys.exit(main())
