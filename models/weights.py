"""Finding and reading the weight files of the reference networks (LPIPS's VGG16 and linear heads,
the FID Inception). Nothing is downloaded: the user's files are looked for in the places the
upstream packages would have put them, and a missing file is one line that names every place
looked at.

Files are read with `torch.load(weights_only=True)`: tensors only, never arbitrary pickle.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

import torch


class WeightsNotFoundError(ValueError):
    """A reference network's weight file is missing or unreadable: one line, naming the file and where
    it was looked for."""


def hub_checkpoint_dirs() -> list[Path]:
    """Where `torch.hub` keeps downloaded checkpoints: $TORCH_HOME/hub/checkpoints, else
    $XDG_CACHE_HOME/torch/hub/checkpoints, else ~/.cache/torch/hub/checkpoints (all that apply, in
    that order, so a file cached under a different setting is still found)."""
    dirs = []
    if os.environ.get("TORCH_HOME"):
        dirs.append(Path(os.environ["TORCH_HOME"]).expanduser() / "hub" / "checkpoints")
    if os.environ.get("XDG_CACHE_HOME"):
        dirs.append(Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "torch" / "hub" / "checkpoints")
    dirs.append(Path("~/.cache/torch/hub/checkpoints").expanduser())
    return list(dict.fromkeys(dirs))


def installed_package_file(package: str, relative: str) -> tuple[Path | None, list[str]]:
    """`relative` inside an installed package, found WITHOUT importing it (lpips imports torchvision,
    which may not import beside this torch). Returns (path or None, the places looked at)."""
    looked = []
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: locates, does not execute
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / relative
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate, looked
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    wanted = f"{package}/{relative}"
    for f in files:
        if str(f).replace("\\", "/") == wanted:
            candidate = Path(f.locate())
            looked.append(str(candidate))
            if candidate.is_file():
                return candidate, looked
    if not looked:
        looked.append(f"the installed '{package}' package (not installed)")
    return None, looked


def find_weights(what: str, path: str | os.PathLike | None, filename: str, places: list[Path] = (),
                 hint: str = "") -> Path:
    """The file to read: `path` when given (it must exist), else `filename` in the first of `places`
    that has it. Raises WeightsNotFoundError naming every place looked at."""
    if path:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        if p.is_dir():  # a folder that holds the file under its usual name (a run folder, a hub cache)
            if (p / filename).is_file():
                return p / filename
            raise WeightsNotFoundError(f"{what}: {p}: a folder, and it holds no {filename}; give the file{hint}")
        raise WeightsNotFoundError(f"{what}: {p}: no such file{hint}")
    looked = [Path(d) / filename for d in places]
    for p in looked:
        if p.is_file():
            return p
    where = ", ".join(str(p) for p in looked) or "nowhere (no path given)"
    raise WeightsNotFoundError(f"{what}: {filename} not found; looked in {where}{hint}")


def read_state_dict(what: str, path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a torch checkpoint file (tensors only, CPU)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for broken or pickled files
        raise WeightsNotFoundError(f"{what}: {path}: not a readable weights-only torch file "
                                   f"({load_reason(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if (why := state_dict_problem(state)) is not None:
        raise WeightsNotFoundError(f"{what}: {path}: {why}")
    return state


def load_reason(e: Exception) -> str:
    """Why a weights file did not load, in one line: torch's own messages span many lines, carry
    terminal colour codes, and bury the cause under advice to load the file unsafely."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    first = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
    if (name := re.search(r"Unsupported global: GLOBAL (\S+)", first)) is not None:
        # torch's advice here is to allow the global and load again: not what a weights file needs
        return f"refused: it holds a pickled {name.group(1)}, and a weights file holds plain tensors"
    if first.startswith("Weights only load failed") and not any("Unsupported global" in x for x in lines):
        blocked = next((x for x in lines if "unsupported GLOBAL" in x), "")
        if blocked:  # a pickle that calls a function no weights file needs (os.system, ...): refused, never run
            return f"refused: {blocked}"
        cause = next((x for x in lines if x.startswith(("Unsupported operand", "invalid load key"))), "")
        return f"not a torch checkpoint file: {cause or 'unreadable pickle'}"
    if len(first) > 200:
        first = first[:200].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {first}"


def state_dict_problem(state, *, tensors_only: bool = True) -> str | None:
    """Why `state` (what torch.load gave for a user's file) is not a name -> tensor dict, in a few
    words for a one-line error; None when it is. Every loader checks this before it reads a key: a
    foreign pickle may map ints (or anything) to anything, and `key.startswith` would be a traceback.
    `tensors_only=False` lets values of other types through, for callers that drop them."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a state dict of tensors"
    for k, v in state.items():
        if not isinstance(k, str):
            return f"not a state dict of tensors (key {k!r} of type {type(k).__name__}, not a name)"
        if tensors_only and not isinstance(v, torch.Tensor):
            return f"not a state dict of tensors ({k!r} holds a value of type {type(v).__name__})"
    return None


def check_keys(what: str, path: Path, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Every expected tensor present with its shape, and finite (extra keys are the caller's business)."""
    missing = [k for k in expected if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        raise WeightsNotFoundError(f"{what}: {path}: does not fit the network "
                                   f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                   f"wrong shape {wrong[:3]})")
    for k, v in expected.items():  # integer weights would load (cast) into a float net without a word
        if v.is_floating_point() and not state[k].is_floating_point():
            raise WeightsNotFoundError(f"{what}: {path}: weight {k} holds {str(state[k].dtype).removeprefix('torch.')}"
                                       " values, not floating-point weights")
    for k in expected:  # a NaN in a frozen network makes every score NaN, or a traceback deep in the metric
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise WeightsNotFoundError(f"{what}: {path}: weight {k} holds non-finite values (NaN or inf)")
