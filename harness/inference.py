"""Load a trained model for sampling, evaluation and export.

`load_model(path)` accepts a run folder (its newest complete checkpoint), a checkpoint folder
(`checkpoints/step_N`, plain or DeepSpeed-sharded), or an exported folder (`model.safetensors` +
`config.yaml` from launch/export.py). The model is rebuilt from the config stored with the weights,
so a spec file edited since training cannot change it.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from harness import checkpoint as ckpt
from harness import diffusers_io
from harness.config import Config, ConfigError, from_dict
from harness.runlock import LOCK_NAME
from models import Autoencoder, build_model
from models.weights import load_reason, state_dict_problem
from shards.atomic import temp_path


class LoadError(RuntimeError):
    """The path holds no loadable model: one line saying why."""


class RequestError(ValueError):
    """A command-line request the scripts cannot honour (a count, size, device or output path): one line."""


def check_device(name: str) -> str:
    """`name` if torch can place tensors there, else a RequestError naming it (no CUDA, unknown type)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RequestError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RequestError(f"--device {name}: CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RequestError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "meta":  # shapes without data: nothing to compute images with
        raise RequestError(f"--device {name}: holds no data (use cpu or cuda)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as e:  # noqa: BLE001 - any failure is the same request error
            raise RequestError(f"--device {name}: not usable here ({load_reason(e)})") from None
    return name


# ---------------------------------------------------------------------------------------------
# Where output may go: never into a run's own files or a checkpoint
# ---------------------------------------------------------------------------------------------

RUN_FILES = (ckpt.CONFIG_NAME, ckpt.LATEST_NAME, LOCK_NAME, "train.log")  # a run folder's own files
RUN_PARTS = ("checkpoints", "tb", "samples")  # ... and its own folders
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", ckpt.CONFIG_NAME, "latent_stats.json",
               diffusers_io.WEIGHTS_NAME, *diffusers_io.OTHER_WEIGHTS, diffusers_io.CONFIG_NAME)  # a model folder's
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", diffusers_io.WEIGHTS_NAME, *diffusers_io.OTHER_WEIGHTS)
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs)


def is_run_folder(folder: Path) -> bool:
    """A training run's folder: it has checkpoints/, `latest`, train.log or the run lock (.lock)."""
    try:
        return (folder / "checkpoints").is_dir() or any((folder / n).is_file()
                                                         for n in (ckpt.LATEST_NAME, "train.log", LOCK_NAME))
    except OSError:  # a name too long, a folder we may not look into: nothing of a run's can be read there
        return False


def run_storage(path: Path) -> str | None:
    """Why `path` (resolved) lies where the trainer keeps its state, or None: inside a run's
    checkpoints/ folder (the trainer cleans and prunes there) or inside a checkpoint (a file added
    there breaks its manifest, so a resume passes the checkpoint over and abandons it)."""
    for folder in [path, *path.parents]:
        if folder.name == "checkpoints" and is_run_folder(folder.parent):
            return "inside the run's checkpoints/ folder, which the trainer cleans and prunes"
        if (folder / ckpt.STATE_NAME).is_file() or (folder / ckpt.MANIFEST_NAME).is_file():
            return f"inside the checkpoint {folder}, whose manifest it would break (a resume would then pass it over)"
    return None


def _owned(where: Path) -> str | None:
    """Why writing the file `where` (its folder resolved) would damage a run or a model, or None."""
    if (why := run_storage(where)) is not None:
        return why
    if where.name in RUN_FILES + RUN_PARTS and is_run_folder(where.parent):
        return f"the run's own {where.name} (of the run {where.parent})"
    if not (where.exists() or where.is_symlink()):
        return None  # a new file beside a run's (eval.json in runs/x) or in its samples/ takes nothing away
    for folder in where.parents:
        if folder.name in RUN_PARTS and is_run_folder(folder.parent):  # TensorBoard's events, the trainer's grids
            return f"a file the trainer wrote in the run's {folder.name}/ folder"
    if where.name in MODEL_FILES and any((where.parent / n).is_file() for n in WEIGHT_NAMES):
        return f"a file of the model in {where.parent}"
    return None


def try_create(where: Path) -> None:
    """Create and remove the temporary file the atomic write of `where` will use, and the folders it
    needs (removed again): the real test of a path, where root passes every access check that /sys,
    /proc, a read-only mount or a name too long then fail."""
    missing = []
    folder = where.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for f in reversed(missing):
            f.mkdir()
            made.append(f)
        tmp = temp_path(where)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(tmp)
    finally:
        for f in reversed(made):
            try:
                f.rmdir()
            except OSError:
                pass


def check_output_file(option: str, path: str | Path) -> Path:
    """A file to write at the end of a run, checked before the work so a bad path loses none of it:
    not a folder; not inside a checkpoint or a run's checkpoints/ folder, not one of a run's own files
    (config.yaml, latest, .lock, train.log, what is in its tb/ and samples/) nor an existing file of a
    model folder; and the temporary file its atomic write uses can be created there."""
    path = Path(path)
    where = path
    try:
        if path.is_dir():
            raise RequestError(f"{option} {path}: is a folder; give a file name")
        where = path.parent.resolve() / path.name  # a link as the name itself is replaced, not followed
        if (why := _owned(where)) is not None:
            raise RequestError(f"{option} {path}: {why}: write it elsewhere")
        folder = where.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise RequestError(f"{option} {path}: {folder} is a file, not a folder")
        try_create(where)
    except OSError as e:
        raise RequestError(f"{option} {path}: {cannot_write(e, where, path)}") from None
    return path


def cannot_write(e: OSError, where: Path, given: Path | None = None) -> str:
    """`cannot write in FOLDER (why)` for an OSError met while checking or writing the file `where`
    (`given`: the path as the user wrote it, whose folder is named when it is that one)."""
    place = Path(e.filename).parent if e.filename else where.parent
    if given is not None and place == where.parent:
        place = given.parent
    reason = e.strerror or str(e)
    extra = len(temp_path(where).name) - len(where.name)  # .<name>.<pid>.<8 hex>.tmp
    if e.errno == errno.ENAMETOOLONG and len(os.fsencode(where.name)) + extra > NAME_MAX:
        reason = (f"{reason}: the name is {len(os.fsencode(where.name))} bytes and is written under a temporary "
                  f"name {extra} longer first; at most {NAME_MAX - extra} fit")
    return f"cannot write in {place} ({reason})"


def check_image_size(cfg: Config, size: int) -> None:
    """A RequestError when the model cannot take `size` px images (e.g. not a multiple of its downsampling)."""
    import copy

    from models import ModelConfigError, check_config

    if size < 1:
        raise RequestError(f"--image-size {size}: need a positive number of pixels")
    try:
        check_config(copy.deepcopy(cfg.model), size)
    except ModelConfigError as e:
        raise RequestError(f"--image-size {size}: {str(e).removeprefix('data.image_size: ')}") from None


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def find_weights_dir(path: str | Path, say: Callable[[str], None] | None = _note) -> Path:
    """Run folder -> its newest complete checkpoint that verifies (a newer one that does not is named
    through `say`, on stderr by default); a checkpoint or export folder -> itself."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such run, checkpoint or export folder")
    if ckpt.is_complete(path):  # a step_N folder (DeepSpeed writes a `latest` file of its own into it)
        if (why := ckpt.verify(path)) is not None:  # the manifest resume checks: a damaged file is named here
            raise LoadError(f"{path}: the checkpoint fails verification ({why})")
        return path
    if (path / "checkpoints").is_dir() or (path / ckpt.LATEST_NAME).is_file():
        try:
            found = ckpt.resolve(path, "latest", say=say, verb="using")
        except ckpt.ResumeError as e:  # `latest` without checkpoints, or none that verifies
            raise LoadError(str(e)) from None
        if found is None:
            raise LoadError(no_checkpoint_yet(path))
        return found
    if is_run_folder(path) and not any((path / n).is_file() for n in WEIGHT_NAMES):  # before its first save
        raise LoadError(no_checkpoint_yet(path))
    if (path / ckpt.CONFIG_NAME).is_file():
        return path
    raise LoadError(f"{path}: not a run folder, a checkpoint (step_N) or an exported model (no {ckpt.CONFIG_NAME})")


def no_checkpoint_yet(run: Path) -> str:
    return (f"{run}: no checkpoint yet (the run has not saved one; wait for checkpoint.every_steps or use a "
            "finished run)")


def load_config_of(folder: Path, prior_vq: str | None = None) -> Config:
    """The config stored with the weights; a LoadError (one line) when it cannot be read or describes no
    model this code builds (hand-edited, truncated, another project's). `prior_vq`: a prior's VQ model
    is there instead of where its model.prior_vq says (sample.py/export.py --prior-vq)."""
    path = folder / ckpt.CONFIG_NAME
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise LoadError(f"{path}: not valid YAML" + (f" (line {where.line + 1})" if where else "")) from None
    if not isinstance(raw, dict):
        raise LoadError(f"{path}: holds {type(raw).__name__ if raw is not None else 'nothing'}, not a config mapping")
    if prior_vq is not None and isinstance(raw.get("model"), dict) and raw["model"].get("kind") == "prior":
        raw["model"]["prior_vq"] = prior_vq
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise LoadError(f"{path}: cannot be loaded ({e})") from None


def build_from(folder: Path, cfg: Config, state: dict[str, torch.Tensor]) -> Autoencoder:
    """The model `cfg` describes, holding `state`; a LoadError naming the first key that does not fit
    (weights beside a config of another model)."""
    model = build_model(cfg.model)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise LoadError(f"{folder}: weights do not fit the stored config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise LoadError(f"{folder}: weights do not fit the stored config ({k} is {tuple(state[k].shape)} in the "
                            f"weights, {tuple(v.shape)} in the model the config describes)")
    model.load_state_dict(state)
    return model


def _ema_state(folder: Path) -> dict[str, torch.Tensor] | None:
    """The EMA shadow weights saved by the trainer (a registered accelerate custom object)."""
    for f in sorted(folder.glob("custom_checkpoint_*.pkl")):
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
            raise LoadError(f"{f}: cannot read the EMA weights ({load_reason(e)})") from None
        if isinstance(state, dict) and "shadow" in state:
            if (why := state_dict_problem(state["shadow"])) is not None:
                raise LoadError(f"{f}: its EMA weights ('shadow'): {why}")
            return state["shadow"]
    return None


def state_dict_of(folder: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """fp32 model weights from a checkpoint or export folder (DeepSpeed shards are consolidated)."""
    if (folder / "model.safetensors").is_file():
        try:
            state = load_file(folder / "model.safetensors")
        except (SafetensorError, OSError) as e:  # truncated or not safetensors: one line naming the file
            raise LoadError(f"{folder / 'model.safetensors'}: cannot read the weights ({load_reason(e)})") from None
    elif (folder / "pytorch_model.bin").is_file():
        try:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
            raise LoadError(f"{folder / 'pytorch_model.bin'}: cannot read the weights ({load_reason(e)})") from None
        if (why := state_dict_problem(state)) is not None:
            raise LoadError(f"{folder / 'pytorch_model.bin'}: {why}")
    elif any(p.is_dir() for p in folder.glob("pytorch_model*")):  # DeepSpeed: one shard per rank
        from harness.export import consolidate

        state = consolidate(folder)
    else:
        raise LoadError(f"{folder}: no model weights (model.safetensors, pytorch_model.bin or DeepSpeed shards)")
    if ema:
        shadow = _ema_state(folder)
        if shadow is None:
            raise LoadError(f"{folder}: no EMA weights (was train.ema_decay > 0?)")
        state.update(shadow)  # EMA covers trainable parameters; buffers (codebooks, norms) stay as saved
    return {k: v for k, v in state.items() if not k.startswith(NOT_WEIGHTS)}  # the learned loss.logvar


WEIGHT_FILES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LDM_PREFIX = "first_stage_model."  # the autoencoder inside a latent-diffusion / Stable Diffusion checkpoint
NOT_WEIGHTS = ("loss.", "model_ema.")  # latent-diffusion's LPIPS + discriminator, and LitEma's counters


class _Inert:
    """Stands in for a class a foreign checkpoint pickled beside its tensors (PyTorch Lightning's
    ModelCheckpoint callback, optimizer or hyper-parameter objects): built and filled, never run."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _torch_load(path: Path):
    """`torch.load(weights_only=True)`, where the globals it would refuse load as inert stand-ins.

    Latent-diffusion and Stable Diffusion `.ckpt` files are Lightning checkpoints: next to the
    state dict they pickle a callback object, which weights_only refuses. We never need those
    objects, so each refused global becomes an _Inert subclass; the unpickler stays weights_only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not a torch.save file at all: the first error says so
            names = []
        if not names:
            raise e from None
    stand_ins = [(type(name.rsplit(".", 1)[-1], (_Inert,), {"__module__": __name__}), name) for name in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)


def out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (CUDA or CPU: a model or images too big for the
    machine), or None for any other error."""
    text = str(e)
    if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text):
        return None
    tried = re.search(r"(?:tried|Tried) to allocate ([0-9.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    return "out of memory" + (f" (an allocation of {tried.group(1)})" if tried else "")


def weights_from(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Model weights from a folder `load_model` accepts, or from a single weights file, and the
    folder or file they came from (a run folder resolves to its newest checkpoint).

    A folder gives the trained weights (export with --ema for the EMA ones). A file is read with
    safetensors, or `torch.load(weights_only=True)` (never our trainer's pickle): a plain state
    dict, or a latent-diffusion checkpoint (`state_dict`, the autoencoder under
    `first_stage_model.` in a full Stable Diffusion one). The training loss's tensors (`loss.*`:
    LPIPS, discriminator) and LitEma's counters (`model_ema.*`) are not model weights: dropped.
    A diffusers AutoencoderKL / VQModel folder (or a pipeline, its vae/) or a lone
    diffusion_pytorch_model file is converted to our names (harness/diffusers_io.py)."""
    from harness.export import ExportError

    path = Path(path)
    if diffusers_io.is_diffusers_folder(path):  # config.json (or a pipeline's vae/): converted to our names
        try:
            state, _, folder = diffusers_io.load_folder(path)
        except diffusers_io.DiffusersError as e:
            raise LoadError(str(e)) from None
        return state, folder
    if path.is_dir():
        folder = find_weights_dir(path)
        try:
            return state_dict_of(folder), folder
        except (ExportError, OSError) as e:
            raise LoadError(f"{folder}: cannot read its weights ({load_reason(e)})") from None
    if not path.is_file():
        raise LoadError(f"{path}: no such weights file or folder")
    if path.suffix not in WEIGHT_FILES:
        raise LoadError(f"{path}: expected a run, checkpoint or export folder, or a {'/'.join(WEIGHT_FILES)} file")
    try:
        state = load_file(path) if path.suffix == ".safetensors" else _torch_load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise LoadError(f"{path}: cannot read weights ({load_reason(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if (why := state_dict_problem(state, tensors_only=False)) is not None:  # other values are dropped below
        raise LoadError(f"{path}: {why}")
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    if diffusers_io.is_diffusers_state(state):  # a lone diffusion_pytorch_model.safetensors
        try:
            state = diffusers_io.state_from_diffusers({k: v for k, v in state.items() if torch.is_tensor(v)})
        except diffusers_io.DiffusersError as e:
            raise LoadError(f"{path}: {e}") from None
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith(NOT_WEIGHTS)}, path


def weights_source(path: str | Path) -> Path:
    """Where `weights_from(path)` would read: a run folder's newest checkpoint, else the path."""
    path = Path(path)
    if diffusers_io.is_diffusers_folder(path):
        try:
            return diffusers_io.resolve_folder(path).resolve()
        except diffusers_io.DiffusersError as e:
            raise LoadError(str(e)) from None
    if path.is_dir():
        return find_weights_dir(path).resolve()
    if not path.is_file():
        raise LoadError(f"{path}: no such weights file or folder")
    return path.resolve()


def _diffusers_hint(source: Path) -> str:
    """For a diffusers folder: the model keys that build its network, to put on the command line."""
    if not diffusers_io.is_diffusers_folder(source):
        return ""
    try:
        keys = diffusers_io.model_keys(diffusers_io.read_config(source))
        return f"; its config.json builds {diffusers_io.overrides(keys)}"
    except diffusers_io.DiffusersError as e:
        return f"; {e}"


# model keys that change what the same tensors compute (no shape tells them apart): GroupNorm over other
# groups, a cosine codebook lookup
SAME_SHAPES = ("norm_groups", "vq_cosine")


def _computes_otherwise(model_cfg, source: Path) -> str | None:
    """Where the source's own config (a diffusers config.json, our config.yaml) builds the same tensors into
    another network than `model_cfg` (latent-diffusion architecture only): what differs, as a reason."""
    if model_cfg is None or model_cfg.arch != "ldm":
        return None
    if diffusers_io.is_diffusers_folder(source):
        try:
            theirs = diffusers_io.model_keys(diffusers_io.read_config(source))  # act_fn etc. refused here
        except diffusers_io.DiffusersError as e:
            raise LoadError(f"train.init_from: {e}") from None
        where = f"{source / diffusers_io.CONFIG_NAME}"
    elif source.is_dir() and (source / ckpt.CONFIG_NAME).is_file():
        src = load_config_of(source).model
        if src.arch != "ldm":
            return None
        theirs, where = {k: getattr(src, k) for k in SAME_SHAPES}, f"{source / ckpt.CONFIG_NAME}"
    else:
        return None
    keys = [k for k in SAME_SHAPES if k in theirs and (k != "vq_cosine" or model_cfg.kind == "vq")
            and getattr(model_cfg, k) != theirs[k]]
    if not keys:
        return None
    want = " ".join(f"model.{k}={str(theirs[k]).lower() if isinstance(theirs[k], bool) else theirs[k]}" for k in keys)
    have = ", ".join(f"model.{k}={getattr(model_cfg, k)}" for k in keys)
    return (f"{where} builds these weights with {want}, this run has {have}: the same tensors would compute another "
            f"network; set {want}")


def init_weights(model: torch.nn.Module, path: str | Path, model_cfg=None) -> tuple[int, Path]:
    """Load `path`'s weights into `model`, all of them and exactly: a name or shape that does not fit
    is a one-line LoadError naming it (a silent partial load would train something else), and so are
    weights with NaN or inf, and a source whose own config builds another network from the same shapes
    (`model_cfg`: the run's model section). Returns the number of tensors and where they came from."""
    try:
        state, source = weights_from(path)
    except LoadError as e:
        raise LoadError(f"train.init_from: {e}") from None
    try:
        check_finite(source, state)
    except LoadError as e:
        raise LoadError(f"train.init_from: {e}") from None
    own = model.state_dict()
    if "quantizer.embed" in state and "quantizer.initted" not in state:  # from diffusers' VQModel: no training state
        state = diffusers_io.fill_training_state(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        what = [f"{len(missing)} missing (e.g. {', '.join(missing[:2])})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})" if unexpected else "",
                f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
        raise LoadError(f"train.init_from: {source}: the weights do not fit this model config: "
                        f"{'; '.join(w for w in what if w)}{_diffusers_hint(source)}")
    if (why := _computes_otherwise(model_cfg, source)) is not None:
        raise LoadError(f"train.init_from: {why}")
    model.load_state_dict(state)
    return len(state), source


def check_finite(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """LoadError naming the first weight with a NaN or inf: every output of such a model is NaN."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise LoadError(f"{folder}: weight {bad} holds non-finite values (NaN or inf): the run diverged there, "
                        "or the file was damaged; use an earlier checkpoint")


def read_weights(path: str | Path, ema: bool = False,
                 prior_vq: str | None = None) -> tuple[Path, Config, dict[str, torch.Tensor]]:
    """The folder `path` leads to, its config and its fp32 weights. A run that is still training may prune
    the checkpoint found before (or while) it is read: then once more, from the newer one, quietly."""
    say = _note if int(os.environ.get("RANK", "0")) == 0 else None  # torchrun: one note, from rank 0
    for attempt in (1, 2):
        folder = None
        try:
            folder = find_weights_dir(path, say=say)
            return folder, load_config_of(folder, prior_vq), state_dict_of(folder, ema=ema)
        except (LoadError, OSError) as e:
            pruned = folder is not None and folder != Path(path) and not folder.exists()  # found, then gone
            vanished = "vanished while it was verified" in str(e)  # gone while its manifest was checked
            if attempt == 2 or not (pruned or vanished):
                raise
            say = None  # the first look said what it had to
    raise AssertionError("unreachable")


def with_prior_vq_hint(error: Exception, given: str | None, flag: str = "--prior-vq") -> str:
    """`error`'s message when a prior's VQ model could not be read: with the path the user `given` as `flag`,
    said of the flag (not of the config file it was put into); without, and when model.prior_vq names
    nothing (its VQ step pruned, moved), with how to name where the VQ model is now."""
    msg = str(error)
    if given is not None:
        inner = re.search(r"\(model\.prior_vq: (.*)\)$", msg)
        return f"{flag}: {inner.group(1)}" if inner else msg
    if "model.prior_vq: " in msg and "no such run, checkpoint or export folder" in msg:
        msg += f"; if the VQ model is elsewhere now (an export of that step), name it with {flag} PATH"
    return msg


PERCEPTION_KINDS = ("classifier", "rotnet")


def refuse_perception_net(cfg: Config, folder: Path, tool: str) -> None:
    """A LoadError for a perception run (launch/train_perception.py) given to a tool that needs an
    autoencoder: it has no latents, reconstructions or samples."""
    if cfg.model.kind in PERCEPTION_KINDS:
        raise LoadError(f"{folder}: a model.kind={cfg.model.kind} run is a perception network (for "
                        f"loss.perceptual_net or evaluate.py --fd-net), not an autoencoder: {tool} needs an "
                        "autoencoder run")


def load_model(path: str | Path, *, ema: bool = False, device: str | torch.device = "cpu",
               prior_vq: str | None = None) -> tuple[Autoencoder, Config, Path]:
    folder, cfg, state = read_weights(path, ema, prior_vq)
    check_finite(folder, state)
    return build_from(folder, cfg, state).to(device).eval(), cfg, folder
