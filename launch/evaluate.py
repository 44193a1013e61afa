"""Evaluate a trained autoencoder on held-out shards: PSNR, SSIM, L1, KL, codebook use.

    python launch/evaluate.py runs/demo                          # the run's data.val
    python launch/evaluate.py runs/demo --data data/demo-val --max-samples 2000 --json eval.json
    python launch/evaluate.py runs/vq/checkpoints/step_5000 --ema --data data/imagenet/val

Every sample is read once (center crop at the training resolution), reconstructed from the
posterior mean (VQ: the quantized latent). Prints a table; `--json` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.data import eval_batches, to_model_input  # noqa: E402
from harness.inference import LoadError, load_model  # noqa: E402
from harness.metrics import psnr, ssim  # noqa: E402
from shards.sources import DataSourceError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder, checkpoint folder or exported folder")
    p.add_argument("--data", default=None, help="held-out shards (default: the run's data.val)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0 = all)")
    p.add_argument("--image-size", type=int, default=None, help="default: the training data.image_size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(args) -> dict:
    model, cfg, folder = load_model(args.model, ema=args.ema, device=args.device)
    data = args.data or cfg.data.val
    if not data:
        raise DataSourceError("no held-out data: give --data SHARDS (the run has no data.val)")
    size = args.image_size or cfg.data.image_size
    loader, _ = eval_batches(data, image_size=size, batch_size=args.batch_size, num_workers=args.workers,
                             max_samples=args.max_samples)
    cond_key = {"class": "cls", "multilabel": "labels"}.get(model.condition)
    sums = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0, "mse": 0.0}
    model_terms: dict[str, float] = {}
    codes = None
    n, bad, t0 = 0, 0, time.perf_counter()
    for batch in loader:
        bad += batch["bad"]
        if batch["image"] is None:
            continue
        x = to_model_input(batch["image"], args.device)
        cond = batch[cond_key].to(args.device) if cond_key else None
        out = model(x, cond=cond, sample_posterior=False)
        b = x.shape[0]
        recon = out.recon.float().clamp(-1, 1)
        sums["psnr"] += float(psnr(x, recon, reduction="none").sum())
        sums["ssim"] += float(ssim(x, recon, reduction="none").sum())
        sums["l1"] += float((recon - x).abs().flatten(1).mean(1).sum())
        sums["mse"] += float((recon - x).pow(2).flatten(1).mean(1).sum())
        for k, v in out.losses.items():
            model_terms[k] = model_terms.get(k, 0.0) + float(v) * b
        if hasattr(model, "encode_indices"):
            idx = model.encode_indices(x, cond).flatten()
            size_ = model.quantizer.codebook_size
            counts = torch.bincount(idx, minlength=size_).cpu()
            codes = counts if codes is None else codes + counts
        n += b
    if n == 0:
        raise DataSourceError(f"{data}: no readable samples")
    result = {"checkpoint": str(folder), "data": data, "samples": n, "bad_samples": bad, "image_size": size,
              "ema": args.ema, **{k: v / n for k, v in sums.items()}, **{k: v / n for k, v in model_terms.items()}}
    if codes is not None:
        p = codes.double() / codes.sum()
        result["codebook_perplexity"] = math.exp(-float((p[p > 0] * p[p > 0].log()).sum()))
        result["codebook_used"] = float((codes > 0).double().mean())
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate(args)
    except (LoadError, DataSourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
