"""Export one consolidated fp32 `model.safetensors` + `config.yaml` from a run or checkpoint.

    python launch/export.py runs/kl                                       # newest checkpoint -> runs/kl/export/
    python launch/export.py runs/kl/checkpoints/step_5000                 # -> runs/kl/export-step_5000/
    python launch/export.py runs/kl/checkpoints/step_5000 --out kl_f8/    # also from a ZeRO-3 checkpoint
    python launch/export.py runs/kl --ema --out kl_f8_ema/                # the EMA weights
    python launch/export.py runs/kl --format diffusers --out kl_f8_diffusers/   # AutoencoderKL / VQModel folder
    python launch/export.py runs/kl --format diffusers --latent-stats 10000      # + scaling_factor, shift_factor
    torchrun --nproc_per_node 8 launch/export.py runs/kl --latent-stats 100000  # the statistics on 8 ranks

Works offline in one CPU process, whatever wrote the checkpoint (one process, DDP, ZeRO-1/2/3).
The exported folder loads with launch/sample.py and launch/evaluate.py, or with
`safetensors.torch.load_file` + `models.build_model(config.model)`. DeepSpeed's shards hold Python
objects besides tensors and DeepSpeed loads them with pickle: export only checkpoints you trust.

--format diffusers writes `config.json` + `diffusion_pytorch_model.safetensors`, which
`diffusers.AutoencoderKL.from_pretrained(OUT)` (kind=kl) or `VQModel.from_pretrained(OUT)` (kind=vq)
loads; a model diffusers cannot express is refused in one line (harness/diffusers_io.py). Where
diffusers is installed, the export is loaded with it and its reconstruction compared with ours.

--latent-stats N measures the latent over the first N images of the training data (or --data;
center crop at the training size): per-channel mean and std, shift_factor (the mean) and
scaling_factor (1 / std), as diffusion training normalises latents (harness/latents.py). They are
printed and written to latent_stats.json; a diffusers config.json gets scaling_factor and shift_factor
(not the per-channel ones: SDXL pipelines would apply them on top of the scale). Under torchrun every
rank measures its share and the sums are all-reduced; rank 0 writes the export.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
import yaml  # noqa: E402

from harness import checkpoint as ckpt  # noqa: E402
from harness import diffusers_io  # noqa: E402
from harness.config import Config, ConfigError, to_dict  # noqa: E402
from harness.data import DataSourceError, condition_field, eval_batches  # noqa: E402
from harness.dist import all_reduce_sum, world  # noqa: E402
from harness.export import ExportError, save_safetensors  # noqa: E402
from harness.inference import (  # noqa: E402
    RUN_PARTS,
    LoadError,
    build_from,
    cannot_write,
    check_finite,
    find_weights_dir,
    is_run_folder,
    load_model,
    read_weights,
    run_storage,
    try_create,
    with_prior_vq_hint,
)
from harness.latents import latent_stats  # noqa: E402
from harness.tasks import prior_vq_of  # noqa: E402
from shards.atomic import fsync_dir  # noqa: E402

STATS_NAME = "latent_stats.json"  # beside our own export's model.safetensors
STAGE_PREFIX = ".tmp-export-"  # an export being written and checked, inside --out


# defer: a stop while the files are moved into --out waits until all are (handlers run in the main thread,
# but a blocked signal mask would not hold off torch's threads); done: the export is whole in --out
STOP = {"defer": False, "pending": False, "done": False}


def _terminated(signum, frame):
    if STOP["defer"]:
        STOP["pending"] = True
        return
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the staging folder goes in write_export's finally


def main(argv: list[str] | None = None) -> int:
    """The export, stopped cleanly by Ctrl-C or SIGTERM too: --out is left as it was (the staging folder
    of a half-written export removed), one line, exit 130."""
    previous = {s: signal.signal(s, _terminated) for s in (signal.SIGTERM, signal.SIGINT)}
    STOP.update(defer=False, pending=False, done=False)
    try:
        return export(argv)
    except KeyboardInterrupt:
        if STOP["done"]:
            print("export: stopped by a signal after the export was in place (it is whole)", file=sys.stderr)
        else:
            print("export: stopped by a signal; --out is as it was (nothing half-written is left)", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def export(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", help="output folder, never a run, a folder of runs or inside a checkpoint (default: "
                                 "<run>/export; for a checkpoint runs/x/checkpoints/step_N: runs/x/export-step_N)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--prior-vq", default=None, metavar="PATH",
                   help="a prior: its VQ model is at PATH now (e.g. an export of the VQ step it was trained on, "
                        "after the VQ run pruned that step); the export's model.prior_vq names it")
    p.add_argument("--overwrite", action="store_true", help="replace the export already in --out")
    p.add_argument("--format", choices=["safetensors", "diffusers"], default="safetensors",
                   help="safetensors: ours (model.safetensors + config.yaml); diffusers: config.json + "
                        "diffusion_pytorch_model.safetensors (default --out: <run>/diffusers, or "
                        "runs/x/diffusers-step_N for a checkpoint)")
    p.add_argument("--latent-stats", type=int, default=0, metavar="N",
                   help="measure latent mean/std and scaling_factor over N training images (0 = off)")
    p.add_argument("--data", help="--latent-stats: images to measure on (default: the run's data.train)")
    p.add_argument("--batch-size", type=int, help="--latent-stats: images per batch and rank (default 32)")
    p.add_argument("--workers", type=int,
                   help="--latent-stats: loader workers (default 2; at most one per rank under torchrun)")
    args = p.parse_args(argv)
    if args.latent_stats < 0:
        p.error("--latent-stats: need N >= 0 images")
    if not args.latent_stats and (given := [f"--{k.replace('_', '-')}" for k in ("data", "batch_size", "workers")
                                            if getattr(args, k) is not None]):
        p.error(f"{given[0]}: only read with --latent-stats N (without it the export reads no images)")
    args.batch_size = 32 if args.batch_size is None else args.batch_size
    args.workers = 2 if args.workers is None else args.workers
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: need at least 1 image per batch")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: need 0 (read in this process) or more")
    default = default_out(args.model, "diffusers" if args.format == "diffusers" else "export")
    args.out = Path(args.out) if args.out else default
    w = world()
    if w.world_size > 1 and not args.latent_stats and not w.is_main:
        return 0  # torchrun without statistics to share out: rank 0 exports alone
    stats = None
    try:
        check_out(args.out, args.overwrite, default)  # before any work: --latent-stats may read many images
        source = read_source(args, w)  # once: a run still training moves on, the export and its statistics do not
        if args.latent_stats:
            stats = measure_latents(args, source)
    except (ExportError, LoadError, DataSourceError, ConfigError, diffusers_io.DiffusersError, ValueError) as e:
        if w.is_main:
            print(f"export: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file of the source that could not be read
        if w.is_main:
            print(f"export: cannot read {e.filename or args.model}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    if not w.is_main:
        return 0
    if stats is not None:
        print(stats)
    return write_export(args, source, stats)


@dataclass
class Source:
    """What is exported, read once: the folder the weights came from, its config, the fp32 weights and
    the model holding them."""

    folder: Path
    cfg: Config
    state: dict[str, torch.Tensor]
    model: torch.nn.Module


def read_source(args, w) -> Source:
    """The weights and config of `args.model`, checked before anything is measured or written: they are
    finite, fit the config, and the config's model is one the requested format can express. Under
    torchrun (--latent-stats) rank 0 picks the checkpoint and every rank reads that one."""
    path = args.model
    if w.world_size > 1 and args.latent_stats:  # (without, rank 0 exports alone)
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        found: list = [None, None]
        if w.is_main:
            try:
                found = [str(find_weights_dir(path)), None]
            except LoadError as e:
                found = [None, str(e)]
        tdist.broadcast_object_list(found, src=0)
        if found[1] is not None:
            raise LoadError(found[1])
        path = found[0]
    error = None
    try:
        prior_vq = None if args.prior_vq is None else str(Path(args.prior_vq).absolute())  # (the export may move)
        try:
            folder, cfg, state = read_weights(path, args.ema, prior_vq)  # (retried if a training run prunes it)
        except LoadError as e:
            raise LoadError(with_prior_vq_hint(e, prior_vq)) from None
        state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        check_finite(folder, state)
        source = Source(folder, cfg, state, build_from(folder, cfg, state).eval())
        if args.prior_vq is not None and cfg.model.kind != "prior":
            raise ExportError(f"--prior-vq: applies to a prior (model.kind=prior); {folder} holds a "
                              f"model.kind={cfg.model.kind} model")
        if cfg.model.kind == "prior" and args.latent_stats:
            raise ExportError("--latent-stats: a prior (model.kind=prior) models codes and has no latents of its "
                              "own: measure its VQ model's (model.prior_vq) when you export that")
        if args.format == "diffusers":
            diffusers_io.check_exportable(cfg.model, source.model)
    except Exception as e:  # noqa: BLE001 -- the other ranks must hear of it before the next collective
        error = e
    if all_reduce_sum([float(error is not None)])[0] > 0:
        raise error or LoadError("another rank could not read the model")
    return source


def write_export(args, source: Source, stats) -> int:
    """Every file of the export is written and checked in a folder of its own inside --out, then moved
    into place: a failed export leaves --out as it was (an earlier export in it too)."""
    out, stage, held = args.out, None, None
    made = [d for d in [out, *out.absolute().parents] if not d.exists()]  # the folders this export creates
    try:
        if out.resolve() == source.folder.resolve():  # its files would replace (or, as stale, remove) the source's
            raise ExportError(f"--out {out}: is the folder exported from; write the export elsewhere")
        out.mkdir(parents=True, exist_ok=True)
        held = hold(out, args.overwrite)
        drop_dead_stages(out)
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=out))
        if args.format == "diffusers":
            written, lines = write_diffusers(stage, out, source, stats)
        else:
            written, lines = write_ours(stage, out, args.ema, source, stats, args.prior_vq)
        # all of the export or none: a stop between two renames would leave weights beside another config
        STOP["defer"] = True
        try:
            for name in written:
                os.replace(stage / name, out / name)
            fsync_dir(out)
            drop_stale(out, set(written))
            STOP["done"] = True
        finally:
            STOP["defer"] = False
        if STOP["pending"]:
            raise KeyboardInterrupt
    except (ExportError, LoadError, ConfigError, diffusers_io.DiffusersError) as e:
        print(f"export: {str(e).replace(str(stage), str(out)) if stage else e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled, or the folder went away meanwhile
        print(f"export: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in made:  # nothing exported: no empty folder left behind (nor the parents it made)
            try:
                folder.rmdir()
            except OSError:  # not empty (the export is in it), or gone
                break
        if held is not None:
            os.close(held)
    for line in lines:
        print(line)
    return 0


def hold(out: Path, overwrite: bool) -> int:
    """An exclusive lock on the --out folder itself (no file of ours in it) for the rest of the export: a
    second export into it at the same time is refused, and what --out holds is looked at again under it
    (an export that finished meanwhile is one to --overwrite)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ExportError(f"--out {out}: another export is writing into it right now") from None
    except OSError:  # a file system without flock: go on unlocked
        pass
    if not overwrite and (held := [n for n in EXPORT_FILES if (out / n).exists()]):
        os.close(fd)
        raise ExportError(f"--out {out}: holds {held[0]} already (an export?); pass --overwrite to replace it")
    return fd


def drop_dead_stages(out: Path) -> None:
    """The stage folders of exports into `out` that were killed (their process is gone) go."""
    for p in out.glob(f"{STAGE_PREFIX}*"):
        pid = p.name[len(STAGE_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and Path("/proc/self").exists():
            shutil.rmtree(p, ignore_errors=True)


def write_ours(stage: Path, out: Path, ema: bool, source: Source, stats,
               given: str | None = None) -> tuple[list[str], list[str]]:
    n = sum(v.numel() for v in source.state.values())
    meta = {"source": source.folder.resolve(), "parameters": n, "ema": ema, **prior_vq_record(source, given)}
    save_safetensors(source.state, stage / "model.safetensors", meta)
    (stage / ckpt.CONFIG_NAME).write_text(yaml.safe_dump(to_dict(source.cfg), sort_keys=False))
    load_model(stage)  # the export must rebuild: fail here, not in the user's hands
    written = ["model.safetensors", ckpt.CONFIG_NAME]
    if stats is not None:
        (stage / STATS_NAME).write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
        written.append(STATS_NAME)
    return written, [f"wrote {out / 'model.safetensors'} ({len(source.state)} tensors, {n / 1e6:.2f}M values) and "
                     f"{out / ckpt.CONFIG_NAME}" + (f" and {out / STATS_NAME}" if stats is not None else "")
                     + f", from {source.folder}"]


def prior_vq_record(source: Source, given: str | None = None) -> dict:
    """A prior's export keeps `model.prior_vq` as it was trained (a VQ run folder that may move on,
    or a checkpoint the VQ run may prune: pinning one would break the export), or as --prior-vq `given`
    names it, and records the digest of the VQ weights it was trained on, which launch/sample.py compares
    with what the path gives then. A VQ model that already differs now is noted here, or refused when
    --prior-vq named it: an export would hand on a prior beside a VQ model whose codes it never learned."""
    if source.cfg.model.kind != "prior":
        return {}
    from harness.tasks import PRIOR_VQ_DIGEST, trained_vq_digest, weights_digest

    override = None if given is None else source.cfg.model.prior_vq  # (its absolute form, set at reading)
    vq, _, vq_folder = prior_vq_of(source.cfg, source.folder, "cpu", override, "--prior-vq", note=False)
    now, then = weights_digest(vq), trained_vq_digest(source.folder)
    if then is not None and then != now and given is not None:
        raise ExportError(f"--prior-vq {given}: gives other weights ({vq_folder}) than this prior was trained on; "
                          "name the VQ model it learned (the step_N it was trained with, or an export of it)")
    if then is not None and then != now:
        print(f"note: model.prior_vq now gives other weights ({vq_folder}) than this prior was trained on: the "
              "export records the digest of the ones it learned; name the step_N the prior was trained with "
              "(--prior-vq PATH)", file=sys.stderr)
    return {PRIOR_VQ_DIGEST: then or now}


def default_out(model: str, name: str) -> Path:
    """`<run>/<name>` for a run folder; `<run>/<name>-step_N` for a checkpoint folder: never inside a
    checkpoint (a file added there breaks its manifest, so a resume would pass it over)."""
    path = Path(model)
    if path.name in ("", ".", ".."):  # `export.py .` inside a checkpoint: its own name
        path = path.resolve()
    if not ckpt.is_complete(path):
        return path / name
    base = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return base / f"{name}-{path.name}"


EXPORT_FILES = ("model.safetensors", ckpt.CONFIG_NAME, STATS_NAME, diffusers_io.WEIGHTS_NAME, diffusers_io.CONFIG_NAME)


def drop_stale(out: Path, written: set[str]) -> None:
    """After an export (over an earlier one, with --overwrite): the earlier one's files this one did not
    write (a latent_stats.json of other weights, the other format's files) go, once the new ones are in."""
    for name in EXPORT_FILES:
        if name not in written:
            (out / name).unlink(missing_ok=True)


def run_inside(folder: Path) -> Path | None:
    """The first run folder directly inside `folder` (`runs/` holding runs/kl, runs/vq), or None."""
    try:
        with os.scandir(folder) as entries:
            return next((Path(e.path) for e in entries if e.is_dir() and is_run_folder(Path(e.path))), None)
    except OSError:  # not a folder we may list: nothing found in it
        return None


def check_out(out: Path, overwrite: bool = False, default: Path | None = None) -> None:
    """`_check_out`; an OSError on the way (a name too long to look up) is an ExportError too."""
    try:
        _check_out(out, overwrite, default)
    except OSError as e:
        raise ExportError(f"--out {out}: {cannot_write(e, out / STAGE_PREFIX)}") from None


def _check_out(out: Path, overwrite: bool = False, default: Path | None = None) -> None:
    """An ExportError when `out` is a file, a run folder or one of its own folders (its config.yaml would
    be replaced), a folder that holds run folders (runs/: the export's files would lie among them; an
    earlier export there may be replaced with `overwrite`), lies inside a run's checkpoints/ or a
    checkpoint folder (harness/inference.py:run_storage: files written there break the checkpoint's
    manifest, and resume abandons it), holds an export already (unless `overwrite`), or cannot be
    written. `default`: the --out to suggest instead."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; give a folder")
    if out.is_symlink() and not out.exists():
        raise ExportError(f"--out {out}: a link to {os.readlink(out)}, which does not exist")
    where = out.resolve()
    if is_run_folder(where) or where.name in RUN_PARTS and is_run_folder(where.parent):
        run = where if is_run_folder(where) else where.parent
        what = "a run folder itself (its config.yaml, checkpoints and logs)" if run == where else \
            f"the run's own {where.name}/ folder"
        raise ExportError(f"--out {out}: is {what}: write the export into a folder of its own (as the default, "
                          f"{run / 'export'})")
    held = [n for n in EXPORT_FILES if (out / n).exists()] if out.is_dir() else []
    if (run := run_inside(where)) is not None and not (held and overwrite):
        raise ExportError(f"--out {out}: holds run folders ({run.name}/): write the export into a folder of its own"
                          + (f" (as the default, {default})" if default is not None else ""))
    if held and not overwrite:
        raise ExportError(f"--out {out}: holds {held[0]} already (an export?); pass --overwrite to replace it")
    if (why := run_storage(where)) is not None:
        run = next((f.parent for f in where.parents if f.name == "checkpoints" and is_run_folder(f.parent)), None)
        raise ExportError(f"--out {out}: {why}: write the export elsewhere"
                          + (f" (as the default, {run / 'export'})" if run is not None else ""))
    if (file := next((f for f in where.parents if f.exists() and not f.is_dir()), None)) is not None:
        raise ExportError(f"--out {out}: {file} is a file, not a folder")
    try_create(where / STAGE_PREFIX)  # the folders to make, and a file in --out (removed again)


def measure_latents(args, source: Source):
    """Latent statistics of `source`'s model over the first --latent-stats images, each rank its share
    (see harness/latents.py)."""
    w = world()
    device = torch.device(f"cuda:{w.local_rank}" if torch.cuda.is_available() else "cpu")
    model, cfg = source.model.to(device), source.cfg
    data = args.data or cfg.data.train
    size = cfg.data.image_size
    shares = {"rank": w.rank, "world_size": w.world_size} if w.world_size > 1 else {}
    batches, _ = eval_batches(data, image_size=size, batch_size=args.batch_size, num_workers=args.workers,
                              max_samples=args.latent_stats, cfg=cfg, **shares)
    cond_key = condition_field(model.condition)
    stats = latent_stats(model, batches, image_size=size, device=device, cond_key=cond_key)
    source.model = model.cpu()
    if stats.num_images < args.latent_stats and w.is_main:
        print(f"export: {data} holds {stats.num_images} readable images, fewer than --latent-stats "
              f"{args.latent_stats}: measured on those", file=sys.stderr)
    return stats


def write_diffusers(stage: Path, out: Path, source: Source, stats) -> tuple[list[str], list[str]]:
    model, cfg = source.model, source.cfg
    size = cfg.model.resolution or cfg.data.image_size
    # config.json gets the global factors only: SD reads scaling_factor, SD3/FLUX also shift_factor, but
    # SDXL-style pipelines read latents_mean/latents_std as a per-channel normalisation on top of
    # scaling_factor, which would then no longer give unit variance; VQModel knows scaling_factor only
    keep = ("scaling_factor", "shift_factor")
    norm = {k: v for k, v in stats.to_dict().items() if k in keep} if stats is not None else {}
    _, dcfg = diffusers_io.save_folder(model, cfg.model, stage, sample_size=size, **norm)
    written = [diffusers_io.WEIGHTS_NAME, diffusers_io.CONFIG_NAME]
    if stats is not None:  # all of them, also what the diffusers class has no field for (VQModel: the shift)
        (stage / STATS_NAME).write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
        written.append(STATS_NAME)
    # a small image: the check is about names and layouts, not about the model's resolution
    diff = diffusers_io.check_loads(stage, model, 2 ** (len(cfg.model.ch_mult) - 1) * 4)
    if diff is not None and math.isnan(diff):
        raise diffusers_io.DiffusersError(f"{source.folder}: the model's reconstruction of a test image is not finite "
                                          "(NaN or inf) although its weights are: it diverged; export an earlier "
                                          "checkpoint")
    if diff is not None and not diff <= 1e-3:
        raise diffusers_io.DiffusersError(f"{out}: diffusers reconstructs differently from ours (largest "
                                          f"difference {diff:.2e}): a mapping error, please report it")
    n = sum(v.numel() for v in diffusers_io.state_to_diffusers(model.state_dict()).values())
    lines = [f"wrote {out / diffusers_io.WEIGHTS_NAME} ({n / 1e6:.2f}M values) and {out / diffusers_io.CONFIG_NAME} "
             f"({dcfg['_class_name']}, from {source.folder})"]
    if stats is None:
        lines.append("scaling_factor 1.0 written: measure the latents with --latent-stats N for the real one")
    else:
        left = [k for k in ("shift_factor",) if k not in dcfg]
        lines.append(f"the latent statistics are in {out / STATS_NAME}; per-channel latents_mean/latents_std there "
                     "only" + (f" ({dcfg['_class_name']}'s config has no {', '.join(left)}: read it there)"
                               if left else ""))
    if diff is None:
        lines.append("diffusers is not installed here: the export was not loaded back (pip install diffusers to "
                     "check)")
    else:
        lines.append(f"diffusers {dcfg['_class_name']}.from_pretrained loads it; largest reconstruction difference "
                     f"{diff:.2e}")
    return written, lines


if __name__ == "__main__":
    sys.exit(main())
