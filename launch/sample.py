"""Use a trained autoencoder: prior samples, reconstructions, latent interpolations, per-class samples.

    python launch/sample.py runs/demo sample --n 16 --out samples.png
    python launch/sample.py runs/demo reconstruct --data data/demo --n 8 --out recon.png
    python launch/sample.py runs/demo interpolate --data data/demo --rows 4 --steps 10 --out interp.png
    python launch/sample.py runs/cond classes --rows 10 --n 8 --out classes.png
    python launch/sample.py runs/cond sample --cls 3 --n 8                  # one class
    python launch/sample.py runs/vq_prior sample --temperature 0.9 --top-k 50  # a VQ model's prior run
    python launch/sample.py runs/kl decode --latents z.npy --stats latents/in256/latents.json  # a diffusion model's
    python launch/sample.py runs/kl decode --latents latents/in256                 # encoded shards, decoded back

MODEL is a run folder (newest checkpoint), a checkpoint folder or an exported folder. `--ema` uses
the EMA weights. Output: one PNG grid (inputs above reconstructions for `reconstruct`).
`decode` turns latents back into images: a .npy/.safetensors/.pt file (`b c h w`, or integer codes
`b h w` of a VQ/FSQ model) or a folder of latent shards (launch/encode.py), --n per row, --rows rows.
Latents a diffusion model made are normalised, (z - shift_factor) * scaling_factor: --stats names the
latents.json (or export's latent_stats.json) their factors come from, or give --scaling-factor and
--shift-factor. A VQ model's float latents are quantized first, as diffusers' VQModel.decode does.
A VQ/FSQ model samples through a prior trained on its codes (launch/configs/vq_prior.yaml): give the
prior's run; its VQ model is read from the prior's `model.prior_vq`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness import grids  # noqa: E402
from harness.config import ConfigError  # noqa: E402
from harness.data import condition_field, fixed_batch, to_model_input  # noqa: E402
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
    with_prior_vq_hint,
)
from harness.tasks import prior_sampler  # noqa: E402
from harness.tracking import make_grid, save_png  # noqa: E402
from models import NoPriorError  # noqa: E402
from shards.sources import DataSourceError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder, checkpoint folder or exported folder")
    p.add_argument("mode", choices=["sample", "reconstruct", "interpolate", "classes", "decode"])
    p.add_argument("--out", default=None, help="PNG to write (default: <mode>.png)")
    p.add_argument("--n", type=int, default=8, help="images per row")
    p.add_argument("--rows", type=int, default=4, help="rows (interpolate, classes)")
    p.add_argument("--steps", type=int, default=8, help="images along each interpolation")
    p.add_argument("--data", default=None,
                   help="shards for reconstruct/interpolate (default: the run's data.val or data.train)")
    p.add_argument("--cls", type=int, default=None, help="class index for `sample` with a class-conditional model")
    p.add_argument("--image-size", type=int, default=None, help="default: the training data.image_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--temperature", type=float, default=None,
                   help="a VQ prior run: softmax temperature of each code draw (default 1; 0 = most likely code)")
    p.add_argument("--top-k", type=int, default=None,
                   help="a VQ prior run: draw each code among the k most likely (default 0 = all)")
    p.add_argument("--prior-vq", default=None, metavar="PATH",
                   help="a prior: its VQ model from PATH instead of its model.prior_vq (e.g. an export of the "
                        "VQ step it was trained on, after the VQ run pruned that step)")
    p.add_argument("--latents", default=None, help="decode: a .npy/.safetensors/.pt file or a folder of latent shards")
    p.add_argument("--stats", default=None, help="decode: latents.json or latent_stats.json of normalised latents")
    p.add_argument("--scaling-factor", type=float, default=None, help="decode: the latents are z * this (and ...)")
    p.add_argument("--shift-factor", type=float, default=None, help="decode: ... (z - this) * scaling factor")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def null_condition_trained(model, cfg) -> bool:
    """Whether unconditional samples read a trained null condition (model.cond_dropout > 0). A prior over a
    class-conditional VQ model draws a class per sample where either null never trained (models/prior.py)."""
    if cfg.model.kind == "prior":
        return model.condition == "class" or getattr(getattr(model.vq, "cond_embed", None), "dropout", 0) > 0
    return cfg.model.kind != "kl" or bool(cfg.model.cond_dropout)  # (a VQ/FSQ run alone samples through a prior)


def load(args):
    """The model to sample from: a prior run comes with its VQ model, as one model that samples."""
    try:
        model, cfg, folder = load_model(args.model, ema=args.ema, device=args.device, prior_vq=args.prior_vq)
    except LoadError as e:
        raise LoadError(with_prior_vq_hint(e, args.prior_vq)) from None
    refuse_perception_net(cfg, folder, "sample.py")
    if cfg.model.kind == "prior":
        temperature, top_k = 1.0 if args.temperature is None else args.temperature, args.top_k or 0
        if not (0 <= temperature < math.inf) or top_k < 0:  # nan and inf too: softmax of nan is no draw
            raise RequestError(f"--temperature {temperature}: need a finite number >= 0; --top-k {top_k}: >= 0")
        if args.image_size and args.image_size != cfg.data.image_size and args.mode in ("sample", "classes"):
            # (reconstruct and interpolate run the VQ model alone, at any size it takes)
            raise RequestError(f"--image-size: the prior models the code grid at {cfg.data.image_size} px "
                             f"(its data.image_size); leave it out")
        model, cfg, folder = prior_sampler(args.model, ema=args.ema, device=args.device, temperature=temperature,
                                           top_k=top_k, prior_vq=args.prior_vq)
    elif given := [flag for flag, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                        ("--prior-vq", args.prior_vq)) if v is not None]:
        raise RequestError(f"{'/'.join(given)} appl{'ies' if len(given) == 1 else 'y'} to a prior run "
                           f"(model.kind=prior); {args.model} is a model.kind={cfg.model.kind} model")
    return model, cfg, folder


def no_prior_hint(args, error: NoPriorError) -> str:
    """What to do when a VQ/FSQ model is asked for samples: train a prior over its codes."""
    _, cfg, folder = load_model(args.model, device="cpu")
    if cfg.model.kind not in ("vq", "fsq"):
        return str(error)
    # its checkpoint (or export) folder, not the run: the prior reads the VQ model again at each start
    return (f"{args.model}: a model.kind={cfg.model.kind} run samples through a prior over its codes; train one: "
            f"python launch/train.py --config launch/configs/vq_prior.yaml model.prior_vq={folder} "
            f"data.train=SHARDS data.image_size={cfg.data.image_size} run.dir=runs/prior, then sample from runs/prior")


def writable_png(out: Path) -> Path:
    """--out: a file PIL can write (its extension names the format) whose folder exists or can be made."""
    from PIL import Image

    check_output_file("--out", out)
    Image.init()
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        what = f"{out.suffix} is not an image format PIL writes" if out.suffix else "no extension to name the format"
        raise RequestError(f"--out {out}: {what} (use .png, .jpg, ...)")
    return out


def check_request(args) -> Path:
    """The counts, sizes, device and output of the request, before the model is read. Returns --out."""
    for name in ("n", "rows", "steps"):
        if getattr(args, name) < 1:
            raise RequestError(f"--{name} {getattr(args, name)}: need at least 1")
    if args.mode == "interpolate" and args.steps < 2:  # one image is the first end alone: no path between two
        raise RequestError(f"--steps {args.steps}: an interpolation needs at least 2 (both ends)")
    if args.image_size is not None and args.image_size < 1:
        raise RequestError(f"--image-size {args.image_size}: need a positive number of pixels")
    if not 0 <= args.seed < 2**63:
        raise RequestError(f"--seed {args.seed}: need 0 <= seed < 2^63")
    if args.cls is not None and args.mode not in ("sample", "decode"):  # it would be left unused without a word
        raise RequestError(f"--cls: for `sample`; `{args.mode}` "
                           + ("draws a row per class" if args.mode == "classes" else "conditions each image on its "
                              "own class from the shards"))
    decoding = [o for o, v in (("--latents", args.latents), ("--stats", args.stats),
                               ("--scaling-factor", args.scaling_factor), ("--shift-factor", args.shift_factor))
                if v is not None]
    if decoding and args.mode != "decode":
        raise RequestError(f"{decoding[0]}: for `decode`")
    if args.mode == "decode":
        if args.latents is None:
            raise RequestError("decode: give --latents (a .npy/.safetensors/.pt file, or a folder of latent shards)")
        if args.stats and (args.scaling_factor is not None or args.shift_factor is not None):
            raise RequestError("--stats, or --scaling-factor/--shift-factor: one or the other")
        if args.scaling_factor is not None and not (math.isfinite(args.scaling_factor) and args.scaling_factor > 0):
            raise RequestError(f"--scaling-factor {args.scaling_factor}: need a finite number > 0")
        if args.shift_factor is not None and not math.isfinite(args.shift_factor):
            raise RequestError(f"--shift-factor {args.shift_factor}: need a finite number")
        if args.data or args.image_size:
            raise RequestError(f"{'--data' if args.data else '--image-size'}: `decode` reads --latents; their size "
                               "gives the images'")
    draws = [o for o, v in (("--temperature", args.temperature), ("--top-k", args.top_k)) if v is not None]
    if draws and args.mode in ("reconstruct", "interpolate", "decode"):  # as --cls: left unused without a word
        raise RequestError(f"{draws[0]}: for `sample` and `classes`, where a prior run draws codes; `{args.mode}` "
                           + ("decodes the latents it is given" if args.mode == "decode" else
                              "encodes and decodes the images it is given") + ", drawing none")
    check_device(args.device)
    return writable_png(Path(args.out or f"{args.mode}.png"))


def unscaling(args) -> tuple[float, float] | None:
    """(scaling_factor, shift_factor) the latents were normalised with, or None (raw latents)."""
    if args.stats:
        import json

        try:
            found = json.loads(Path(args.stats).read_text())
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or e
            raise RequestError(f"--stats {args.stats}: not readable JSON ({why})") from None
        found = found.get("latent_stats", found) if isinstance(found, dict) else {}
        scale, shift = found.get("scaling_factor"), found.get("shift_factor")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not (number(scale) and number(shift)) or scale <= 0:
            raise RequestError(f"--stats {args.stats}: no finite scaling_factor > 0 and shift_factor in it (give the "
                               "latents.json of launch/encode.py or the latent_stats.json of export --latent-stats; "
                               "a diffusers VQModel's config.json has no shift_factor)")
        return float(scale), float(shift)
    if args.scaling_factor is None and args.shift_factor is None:
        return None
    return (1.0 if args.scaling_factor is None else args.scaling_factor), (args.shift_factor or 0.0)


def decode_rows(args, model, cfg) -> list[torch.Tensor]:
    """--n x --rows latents of --latents decoded, one grid row per --n (the last filled with white)."""
    from harness.encode import EncodeError, read_latents
    from harness.tasks import weights_digest

    try:
        found = read_latents(args.latents, args.n * args.rows)
    except EncodeError as e:
        raise RequestError(f"--latents {e}") from None
    z, codes = found.z, not found.z.is_floating_point()
    factors = unscaling(args)
    vq = getattr(model, "kind", "") in ("vq", "fsq")
    if found.manifest is not None:
        if factors is not None:
            raise RequestError(f"--stats/--scaling-factor: {args.latents} holds latents as the model made them; the "
                               "factors undo the normalisation of a diffusion model's samples")
        made_by = found.manifest["model"]
        kind = getattr(model, "kind", cfg.model.kind)
        if made_by.get("kind") not in (None, kind):  # FSQ codes read as VQ indices, a KL mean quantized, ...
            raise RequestError(f"--latents {args.latents}: encoded by a model.kind={made_by['kind']} model "
                               f"({made_by.get('folder')}); {args.model} is model.kind={kind}: decode them with the "
                               "model that encoded them")
        if made_by.get("weights_digest") not in (None, weights_digest(model)):
            print(f"note: --latents {args.latents} were encoded by other weights ({made_by.get('folder')}); decoding "
                  f"them with {args.model}'s", file=sys.stderr)
    if codes and not hasattr(model, "decode_indices"):
        raise RequestError(f"--latents {args.latents}: integer codes, but model.kind={cfg.model.kind} has no codebook "
                           "(a KL model decodes float latents `b c h w`)")
    channels = model.latent_shape(cfg.data.image_size)[0]
    if not codes and vq and (found.single or z.shape[1] != channels) and torch.equal(z, z.round()):
        # `b h w` code indices saved as floats read as one `c h w` latent (or as the wrong channels)
        raise RequestError(f"--latents {args.latents}: whole numbers stored as floats, shape "
                           f"{tuple(z.shape[1:] if found.single else z.shape)}: code indices are read as integers "
                           "(.astype(int64)); one float latent needs its batch axis (`1 c h w`)")
    if not codes and z.shape[1] != channels:
        raise RequestError(f"--latents {args.latents}: {z.shape[1]} latent channels, the model's latent has "
                           f"{channels} (shape {tuple(z.shape)}: `b c h w` expected)")
    if not codes and not torch.isfinite(z).all():
        raise RequestError(f"--latents {args.latents}: holds NaN or inf")
    if codes and (z.min() < 0 or z.max() >= model.quantizer.codebook_size):
        raise RequestError(f"--latents {args.latents}: codes {int(z.min())}..{int(z.max())}, outside the codebook "
                           f"(0..{model.quantizer.codebook_size - 1})")
    if factors is not None:
        if codes:
            raise RequestError("--stats/--scaling-factor: integer codes are not normalised")
        scale, shift = factors
        z = z / scale + shift
        if not torch.isfinite(z).all():
            raise RequestError(f"--scaling-factor/--shift-factor ({scale:g}, {shift:g}): the unscaled latents overflow")
    z = z.to(args.device)
    cond = None
    if model.condition == "class":
        num = cfg.model.num_classes
        if args.cls is not None:
            if not 0 <= args.cls < num:
                raise RequestError(f"--cls {args.cls}: the model has model.num_classes={num}")
            cond = torch.full((len(z),), args.cls, dtype=torch.long, device=args.device)
        elif found.cls is None:
            raise RequestError("a class-conditional model decodes with a class: give --cls N")
        elif (bad := [c for c in found.cls if not 0 <= c < num]):
            what = "have no class (cls)" if min(bad) < 0 else f"have classes outside 0..{num - 1} ({max(bad)})"
            raise RequestError(f"--latents {args.latents}: {len(bad)} of the latents read {what}; give --cls N")
        else:
            cond = torch.tensor(found.cls, dtype=torch.long, device=args.device)
    elif model.condition == "multilabel":
        raise RequestError("decode: a multilabel-conditional model needs each latent's labels, which --latents "
                           "does not carry; decode through its own code (model.decode(z, labels))")
    elif args.cls is not None:
        raise RequestError("--cls needs a class-conditional model")
    if codes:
        images = model.decode_indices(z, cond)
    else:
        if vq:
            z = model.quantizer(z).quantized  # diffusers' VQModel.decode quantizes what it is given, as here
        images = model.decode(z, cond)
    if len(z) < args.n * args.rows:
        print(f"note: --latents {args.latents} holds {len(z)} latents, fewer than --n x --rows", file=sys.stderr)
    images = images.float()
    pad = -len(images) % args.n
    if pad:
        images = torch.cat([images, torch.ones(pad, *images.shape[1:], device=images.device)])
    return list(images.split(args.n))


class WriteError(Exception):
    """The images were made but --out could not be written: one line, exit 1 (not a bad request)."""


def run(args) -> Path:
    out = check_request(args)
    model, cfg, folder = load(args)
    if args.image_size and cfg.model.kind != "prior":
        check_image_size(cfg, args.image_size)
    size = args.image_size or cfg.data.image_size
    cond_key = condition_field(model.condition)
    if args.mode == "decode":
        if cfg.model.kind == "prior":
            raise RequestError(f"{args.model}: a prior run models codes; decode them with its VQ model "
                               f"({cfg.model.prior_vq})")
        rows = decode_rows(args, model, cfg)
    elif args.mode == "sample":
        cond = None
        if args.cls is not None:
            if model.condition != "class":
                raise RequestError("--cls needs a class-conditional model")
            if not 0 <= args.cls < cfg.model.num_classes:
                raise RequestError(f"--cls {args.cls}: the model has model.num_classes={cfg.model.num_classes} "
                                   f"(classes 0..{cfg.model.num_classes - 1}; leave --cls out for unconditional "
                                   "samples)")
            cond = torch.full((args.n,), args.cls, dtype=torch.long, device=args.device)
        elif model.condition in ("class", "multilabel") and not null_condition_trained(model, cfg):
            # Unconditional samples read the null condition, which only model.cond_dropout trains: without it
            # the images come from a random embedding, silently.
            raise RequestError("the model was trained with model.cond_dropout=0, so its null (unconditional) "
                               "condition never trained: " + ("give --cls N" if model.condition == "class" else
                                                              "use `classes`") + " for conditional samples")
        rows = [model.sample(args.n, size, cond=cond, generator=grids.generator(args.device, args.seed))]
    elif args.mode == "classes":
        conds = grids.class_conditions(model.condition, cfg.model.num_classes, args.rows, args.n, args.device)
        if conds is None:
            raise RequestError("`classes` needs a conditional model (model.condition = class or multilabel)")
        rows = grids.class_rows(model, size, conds, args.n, args.seed)
        if args.rows > cfg.model.num_classes:
            print(f"note: --rows {args.rows}: the model has model.num_classes={cfg.model.num_classes}, "
                  f"one row each", file=sys.stderr)
    else:
        need = args.n if args.mode == "reconstruct" else 2 * args.rows
        batch = fixed_batch(args.data or cfg.data.val or cfg.data.train, need, size, cfg=cfg)
        if batch is None:
            raise DataSourceError("no readable samples in the data")
        x = to_model_input(batch["image"], args.device)
        cond = batch[cond_key].to(args.device) if cond_key else None
        if args.mode == "reconstruct":
            rows = grids.reconstruction_rows(model, x, cond)
            if x.shape[0] < args.n:
                print(f"note: --n {args.n}: the data held {x.shape[0]} readable images, all shown", file=sys.stderr)
        else:
            rows = grids.interpolation_rows(model, x, cond, args.steps, args.rows)
            if not rows:
                raise DataSourceError(f"interpolate needs 2 images, and the data held {x.shape[0]} readable one")
            if len(rows) < args.rows:
                print(f"note: --rows {args.rows}: the data held {x.shape[0]} readable images, enough for "
                      f"{len(rows)} pair{'s' * (len(rows) != 1)}", file=sys.stderr)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(make_grid(rows), out)
    except OSError as e:  # checked before the work; the disk filled, or the folder went away meanwhile
        raise WriteError(f"--out {out}: {cannot_write(e, out)}") from None
    print(f"{out}: {args.mode} from {folder}")
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with torch.no_grad():
            run(args)
    except NoPriorError as e:
        print(f"error: {no_prior_hint(args, e)}", file=sys.stderr)
        return 2
    except (LoadError, DataSourceError, ConfigError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:
        if (oom := out_of_memory(e)) is None:
            raise
        print(f"error: {oom}: fewer or smaller images (--n, --rows, --image-size) need less", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
