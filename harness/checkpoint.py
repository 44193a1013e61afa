"""Atomic, verified, resumable checkpoints on top of `accelerator.save_state`.

Layout inside the run folder:

    checkpoints/step_<N>/            accelerate's state (sharded by DeepSpeed where it runs),
                                     trainer_state.json, config.yaml, then manifest.json (last)
    checkpoints/.tmp-step_<N>.<tag>  a checkpoint being written (never read); <tag> is unique to
                                     the run's life, so two writers never share one
    checkpoints/.trash-...           an old checkpoint being pruned (never read)
    latest                           one line naming the newest complete checkpoint

The order of a save is what makes a kill at any moment safe:
1. every rank writes into `.tmp-step_N.<tag>` (save_state is collective under DeepSpeed: a rank
   that skipped it would deadlock the others);
2. all ranks wait (and learn whether any failed: a full disk is one line, not a hang); rank 0
   writes trainer_state.json + config.yaml, then manifest.json (size and sha256 of every file),
   fsyncs, renames the folder to `step_N` (atomic), then replaces `latest` (write + fsync +
   os.replace, atomic);
3. only then are old checkpoints pruned: renamed into `.trash-*` first (atomic), then deleted.
So a `step_*` folder is always complete, and `latest` always names one. A failure before the
rename leaves the previous checkpoint as it was (CheckpointError says so); one after it (`latest`
not writable) leaves step_N complete, and `resolve` finds it (CheckpointError says that instead); a
failed prune only costs disk space, so it is a warning and training goes on. `resolve` is the one
function that finds where to resume from, for `--resume latest`, a path, and requeued SLURM jobs;
it checks the manifest, so flipped bytes or a truncated file send `latest` back to the newest
step that verifies (saying so) and make `--resume PATH` an error.

Resuming never unpickles arbitrary objects: `check_pickles` runs torch's weights-only unpickler
(plus a short allow-list for the numpy types of the RNG states) over every pickle-based file, and
opens every safetensors header, before anything loads, and `weights_only_loads` forces the same
unpickler on every `torch.load` that accelerate and DeepSpeed make while loading (both would
otherwise pass `weights_only=False` for the scheduler, the EMA and the ZeRO shards). A checksum is
no defence against a crafted file (its maker can rewrite the manifest); the unpickler is.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import yaml

from shards.atomic import fsync_dir, fsync_tree, is_temp_of, write_atomic

STATE_NAME = "trainer_state.json"
CONFIG_NAME = "config.yaml"
LATEST_NAME = "latest"
MANIFEST_NAME = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# Crash tests set this to "<stage>:<seconds>" to hold a save at one stage while they kill the
# process: stages are "written" (files in .tmp, not renamed), "renamed" (before `latest`), "pruning".
_PAUSE_ENV = "HARNESS_CRASH_TEST_PAUSE"


def _pause(stage: str) -> None:
    spec = os.environ.get(_PAUSE_ENV, "")
    if spec.partition(":")[0] == stage:
        time.sleep(float(spec.partition(":")[2] or 1))


class ResumeError(RuntimeError):
    """The resume request cannot be honoured: one line saying why."""


class CheckpointError(RuntimeError):
    """A save failed (disk full, folder gone): one line saying what is intact (the previous checkpoint,
    or the new one itself when only `latest` could not be updated)."""


def is_complete(path: Path) -> bool:
    """A checkpoint folder as the trainer renames it into place: with its trainer state, or (damaged:
    verify() then names what is missing) its manifest, so a lost trainer_state.json is not taken for
    an export folder and passed over silently."""
    return path.is_dir() and ((path / STATE_NAME).is_file() or (path / MANIFEST_NAME).is_file())


def of_run(path: Path, run_dir: Path) -> bool:
    """Whether checkpoint folder `path` lies in `run_dir`'s checkpoints/: by where it is named (a step_N that
    is itself a link to other storage) or by where it leads (a link elsewhere that points in here)."""
    own = (Path(run_dir) / "checkpoints").resolve()
    path = Path(path)
    return path.absolute().parent.resolve() == own or path.resolve().parent == own


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Manifest: size and sha256 of every file, written last
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in C, without the GIL


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _hash_all(folder: Path, names: list[str]) -> list[str]:
    """sha256 of each file. The files were just written, so they are read from the page cache.
    Threads: hashlib releases the GIL, and a checkpoint has a few large files (weights, optimizer,
    EMA; one optimizer shard per rank under ZeRO); below 64 MB a pool costs more than it saves."""
    workers = min(8, os.cpu_count() or 1, len(names))
    if workers < 2 or sum((folder / n).stat().st_size for n in names) < 64 << 20:
        return [_sha256(folder / n) for n in names]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda n: _sha256(folder / n), names))


def write_manifest(folder: Path) -> None:
    """manifest.json: {"files": {relative path: {"size", "sha256"}}} of everything in `folder`."""
    names = _files(folder)
    digests = _hash_all(folder, names)
    files = {n: {"size": (folder / n).stat().st_size, "sha256": h} for n, h in zip(names, digests)}
    (folder / MANIFEST_NAME).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def _unreadable_safetensors(folder: Path) -> str | None:
    """The first .safetensors file in `folder` whose header does not read (truncated, overwritten,
    not safetensors), named with safetensors' reason; None when all read. Cheap: safe_open parses the
    header and checks it against the file's size, no tensor is read."""
    from safetensors import safe_open

    for name in _files(folder):
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(folder / name), framework="pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: named, in one line
                return f"{name} does not read ({' '.join(str(e).split())[:120]})"
    return None


def _without_manifest(folder: Path) -> str | None:
    """verify() of a folder without manifest.json: fine (None) when it was written before checkpoints
    had manifests (its trainer state names none), once its safetensors files read (their headers:
    nothing else can tell a truncated one); else why not."""
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError) as e:
        return f"no {MANIFEST_NAME}, and {STATE_NAME} is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or "manifest" in state:
        return f"no {MANIFEST_NAME}"
    return _unreadable_safetensors(folder)


def verify(folder: Path) -> str | None:
    """Why `folder` does not match its manifest (a missing, resized, changed or unlisted file), or None."""
    if not (folder / MANIFEST_NAME).exists():
        # Written before checkpoints had manifests: resumed unverified but for its safetensors headers
        # (the pickle scan still runs), with a note where the caller can say one.
        return _without_manifest(folder)
    try:
        listed = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_NAME} is unreadable ({type(e).__name__})"
    if not isinstance(listed, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and type(v.get("size")) is int and isinstance(v.get("sha256"), str)
        for k, v in listed.items()
    ):
        return f"{MANIFEST_NAME} is malformed (not a map of file -> size and sha256)"
    present = set(_files(folder))
    if missing := sorted(set(listed) - present):
        return f"{missing[0]} is missing"
    if extra := sorted(present - set(listed)):
        return f"{extra[0]} is not in its manifest"
    try:
        for name, entry in listed.items():
            if (size := (folder / name).stat().st_size) != entry.get("size"):
                return f"{name} has {size} bytes, its manifest says {entry.get('size')}"
        names = sorted(listed)
        for name, digest in zip(names, _hash_all(folder, names)):
            if digest != listed[name].get("sha256"):
                return f"{name} does not match its sha256 (corrupted on disk or edited)"
    except FileNotFoundError as e:  # pruned (or moved) by a run that is still training, while we read it
        return f"{Path(e.filename or folder).name} vanished while it was verified"
    return None


# ---------------------------------------------------------------------------------------------
# Where to resume from
# ---------------------------------------------------------------------------------------------


def resolve(run_dir: str | Path, resume: str | None, say: Callable[[str], None] | None = None,
            verb: str = "resuming from") -> Path | None:
    """Where to resume from: None = start fresh.

    `latest` takes the newest complete `step_*` folder that verifies against its manifest (the one
    the run's `latest` file names, unless a newer one was renamed into place just before a kill);
    each newer one that fails is skipped with one line through `say`. A run with no checkpoint yet
    (killed before its first, or a requeued job) starts fresh; one whose `latest` names a
    checkpoint while `checkpoints/` holds none, or where nothing verifies, is a ResumeError: a
    silent restart from step 0 would overwrite the run. Anything else is a path that must be a
    complete checkpoint that verifies.
    """
    if resume is None:
        return None
    run_dir = Path(run_dir)
    if resume == "latest":
        found = list_checkpoints(run_dir)
        pointer = run_dir / LATEST_NAME
        if not found:
            if pointer.is_file():
                raise ResumeError(f"{pointer} names {pointer.read_text().strip()!r} but {run_dir / 'checkpoints'} "
                                  "holds no complete checkpoint (deleted or moved?): put them back, or start over "
                                  "in a new run.dir")
            return None
        # Newest first. `latest` names the newest, except after a kill between the rename of a new
        # checkpoint and the update of `latest`: the complete folder is newer, and wins.
        failed = []
        for _, path in reversed(found):
            why = verify(path)
            if why is None:
                if not (path / MANIFEST_NAME).exists() and say is not None:  # an old checkpoint
                    say(f"note: {path.name} has no {MANIFEST_NAME} (written before checkpoints had one): "
                        f"{'resumed' if verb == 'resuming from' else 'used'} without checking its files")
                if failed and say is not None:
                    say(f"note: {'; '.join(failed)}: {verb} {path.name}, the newest checkpoint that verifies")
                return path
            failed.append(f"{path.name} fails verification ({why})")
        raise ResumeError(f"no checkpoint in {run_dir / 'checkpoints'} verifies: {'; '.join(failed)}")
    path = Path(resume)
    if not path.exists():
        raise ResumeError(f"--resume {resume}: no such checkpoint folder")
    if not is_complete(path):
        raise ResumeError(f"--resume {resume}: not a complete checkpoint (no {STATE_NAME} or {MANIFEST_NAME})")
    if (why := verify(path)) is not None:
        raise ResumeError(f"--resume {resume}: the checkpoint fails verification ({why})")
    return path


def read_config(path: Path) -> dict:
    """The resolved config saved with a checkpoint; ResumeError (one line) when missing or not a mapping."""
    f = path / CONFIG_NAME
    try:
        saved = yaml.safe_load(f.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ResumeError(f"{f}: cannot read the checkpoint's config ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(saved, dict):
        raise ResumeError(f"{f}: not a config mapping")
    return saved


def read_state(path: Path) -> dict:
    """A checkpoint's trainer state; ResumeError (one line) when it is missing or not ours."""
    f = path / STATE_NAME
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{f}: cannot read the trainer state ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(state, dict) or type(state.get("step")) is not int or state["step"] < 0:
        raise ResumeError(f"{f}: not a trainer state written by vae-harness (no integer step)")
    if why := _state_problem(state):
        raise ResumeError(f"{f}: {why}; not as vae-harness writes it (edited?)")
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != state["step"]:
        raise ResumeError(f"{path}: holds step {state['step']}, so it was not written as {path.name} (copied in from "
                          "another run, or renamed?): move it out of the run's checkpoints/")
    return state


def _state_problem(state: dict) -> str | None:
    """What in a trainer state's fields (past `step`) is not what the trainer writes, or None."""
    def count(v):
        return type(v) is int and 0 <= v < 2**53

    def number(v):
        return type(v) in (int, float)

    best, totals = state.get("best"), state.get("totals", {})
    checks = (
        ("step", count(state["step"]), "a step count below 2**53"),
        ("samples_seen", "samples_seen" not in state or count(state["samples_seen"]), "a count"),
        ("data_layout", isinstance(state.get("data_layout", {}), dict), "a mapping"),
        ("loss_files", isinstance(state.get("loss_files", {}), dict), "a mapping"),
        ("totals", isinstance(totals, dict) and all(number(v) for v in totals.values()), "a mapping of numbers"),
        ("best", best is None or (isinstance(best, dict) and count(best.get("step")) and number(best.get("value"))),
         "null or a mapping with an integer step and a value"),
    )
    return next((f"{key} is {state.get(key)!r:.60}, not {what}" for key, ok, what in checks if not ok), None)


# ---------------------------------------------------------------------------------------------
# Loading without unpickling
# ---------------------------------------------------------------------------------------------

# What torch.load writes besides .pt: accelerate's .bin/.pkl, DeepSpeed's .pt, a user's .pth.
PICKLED = (".pkl", ".pt", ".bin", ".pth", ".ckpt")


# DeepSpeed classes found in its ZeRO shards (0.19): plain records, built by setting their attributes
# (no __setstate__ / __reduce__ of their own), so allowing them runs none of their code.
_DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler", "LossScaleConfig", "LossScaleProfile"),
}


@functools.cache
def allowed_globals(deepspeed: bool = True) -> list:
    """The few non-tensor types our checkpoints hold: numpy arrays and dtypes inside the RNG states
    (accelerate's own list) and, for a DeepSpeed checkpoint, its records above. Anything else is
    refused by name."""
    import importlib

    allowed = []
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        allowed += TORCH_SAFE_GLOBALS
    except ImportError:
        pass
    for module, names in _DEEPSPEED_GLOBALS.items() if deepspeed else ():
        try:
            mod = importlib.import_module(module)
        except ImportError:  # DeepSpeed not installed: none of its shards to read
            continue
        allowed += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return allowed


def _is_pickle(f: Path) -> bool:
    """Whether `f` (or the data.pkl inside torch's zip format) parses as a pickle, opcode by opcode up to
    its STOP. pickletools only reads opcodes: nothing is built, nothing runs."""
    import io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                inner = next((n for n in z.namelist() if n.rpartition("/")[2] == "data.pkl"), None)
                if inner is None:
                    return False
                stream = io.BytesIO(z.read(inner))
        else:
            stream = open(f, "rb")
        with stream:
            pickletools.dis(stream, out=io.StringIO())
        return True
    except Exception:  # noqa: BLE001 - unknown opcode, no STOP, a bad zip: no pickle
        return False


def _not_a_pickle(name) -> str:
    return f"{name} is not a readable pickle (damaged, or not written by torch.save)"


def _refusal(name: str, error: Exception, path: Path | None = None) -> str:
    """Why the weights-only unpickler refused a file: the global it met, or, for bytes that are no
    pickle at all (the unpickler calls any byte it does not know an "unsupported operand"), that."""
    if path is not None and not _is_pickle(path):
        return _not_a_pickle(name)
    text = str(error)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand (\d+)", text)
    what = f"a pickled {m.group(1)}" if m and not m.group(1).isdigit() else "pickled objects"
    return f"{name} holds {what}, outside the allow-list of plain data: refusing to unpickle it"


def check_pickles(folder: Path) -> None:
    """Run torch's weights-only unpickler (with `allowed_globals`) over every pickle-based file in a
    checkpoint, storages memory-mapped (so a large ZeRO shard costs little); ResumeError naming the
    first file that holds anything else. Nothing in a refused file is ever executed.

    Also opens every safetensors header: a damaged file that matches its manifest (damaged before the
    manifest was written, or the manifest rewritten with it) is one line here, not a traceback from
    accelerate's load_state."""
    import torch

    folder = Path(folder)
    if (why := _unreadable_safetensors(folder)) is not None:
        raise ResumeError(f"cannot resume {folder}: {why}, though it matches the manifest: resume an earlier "
                          "checkpoint by its path")
    deepspeed = any(p.is_dir() for p in folder.glob("pytorch_model*"))  # else DeepSpeed need not be imported
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLED):
        try:
            with torch.serialization.safe_globals(allowed_globals(deepspeed)):
                try:
                    torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # an old (non-zip) torch.save format cannot be memory-mapped
                    if "mmap" not in str(e):
                        raise
                    torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ResumeError(f"cannot resume {folder}: {_refusal(f.relative_to(folder), e, f)}") from None
        except Exception as e:  # noqa: BLE001 -- a file the unpickler cannot even parse: one line
            import zipfile

            if not zipfile.is_zipfile(f) and not _is_pickle(f):  # (a damaged zip: torch's reason says more)
                raise ResumeError(f"cannot resume {folder}: {_not_a_pickle(f.relative_to(folder))}") from None
            raise ResumeError(f"cannot resume {folder}: {f.relative_to(folder)} is unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


@contextmanager
def weights_only_loads(folder: Path) -> Iterator[list[str]]:
    """Within the block, every `torch.load` (accelerate's `load_state`, DeepSpeed's engine) runs the
    weights-only unpickler with `allowed_globals`, whatever `weights_only` its caller passed.

    Yields a list of refusals: accelerate swallows any error while loading the RNG states ("Could
    not load random states"), so the caller must check it after the block as well."""
    import torch

    real, refused = torch.load, []

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed_globals("deepspeed" in sys.modules)):
                return real(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            path = Path(f) if isinstance(f, (str, os.PathLike)) else None
            refused.append(_refusal(path.name if path else "a file", e, path))
            raise ResumeError(f"cannot resume {folder}: {refused[-1]}") from None

    torch.load = load
    try:
        yield refused
    finally:
        torch.load = real


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, accelerator, is_main: bool, tag: str | None = None,
                 say: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.accelerator = accelerator
        self.is_main = is_main
        # The same on every rank (rank 0 chose it when it locked the run folder): names this run's temporaries.
        self.tag = tag or f"{os.getpid()}"
        self.say = say or _warn  # warnings that do not stop training (a failed prune): the run's log, else stderr

    def set_aside_newer(self, resumed: Path, step: int) -> list[Path]:
        """Resuming this run from an older checkpoint: its newer ones belong to the abandoned branch.
        Renamed to `abandoned-step_N` (`.2`, `.3`, ... when an earlier branch left one; kept, never
        resumed or pruned) so that `latest` cannot pick
        them up after a crash, and pruning counts only this branch. Main process."""
        if not self.is_main or not of_run(resumed, self.run_dir):
            return []
        moved = []
        for n, p in list_checkpoints(self.run_dir):
            if n > step:
                target, k = self.root / f"abandoned-{p.name}", 2
                while os.path.lexists(target):  # an earlier branch's: kept too (abandoned-step_N.2, ...)
                    target, k = self.root / f"abandoned-{p.name}.{k}", k + 1
                os.rename(p, target)
                moved.append(target)
        if moved:
            write_atomic(self.run_dir / LATEST_NAME, f"checkpoints/{resumed.name}\n")
        return moved

    def clean_stale(self) -> None:
        """Remove leftovers of saves or prunes that were killed (main process, at start-up, while
        holding the run folder's lock: no other live writer can own them)."""
        if self.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    _remove(p)
        if self.is_main and self.run_dir.is_dir():  # a `latest` whose write was killed before its rename
            for p in self.run_dir.iterdir():
                if is_temp_of(p.name, LATEST_NAME):
                    p.unlink(missing_ok=True)

    def _agree(self, error: str | None, placed: bool = False) -> tuple[str | None, bool]:
        """Collective: every rank learns whether any rank failed, and whether that was after step_N was
        renamed into place (two floats each; also the barrier). A rank that raised alone would leave the
        others waiting in the next collective forever."""
        from harness.dist import all_reduce_sum

        failed, after = all_reduce_sum([float(error is not None), float(error is not None and placed)],
                                       getattr(self.accelerator, "device", None))
        if not failed:
            return None, False
        return error or "another rank could not write its part", after > 0

    def save(self, step: int, state: dict, config_yaml: str) -> Path:
        """Collective: every rank must call this at the same step. A failed write (disk full, folder
        gone) raises CheckpointError on every rank after the partial folder is removed; the previous
        checkpoint and `latest` are untouched. A failure after step_N is renamed into place (`latest`
        not writable) raises CheckpointError saying that step_N was saved. A failed prune is a warning."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}.{self.tag}"
        error = bug = None
        placed = False
        try:
            if self.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp))
        except Exception as e:  # noqa: BLE001 -- the other ranks must hear of it (re-raised below if a bug)
            error, bug = _failure(e)
        if (error := self._agree(error)[0]) is None and self.is_main:  # every rank's part is on disk
            try:
                self._commit(step, tmp, final, state, config_yaml)
                placed = True
                self._point(final)
            except Exception as e:  # noqa: BLE001 -- as above: rank 0 alone must not raise before the barrier
                error, bug = _failure(e)
        error, placed = self._agree(error, placed)
        if error is not None:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if bug is not None:
                raise bug
            if placed:  # complete, manifest and all: resolve() takes the newest folder that verifies
                what = f"`latest` could not be updated ({error})" if self.is_main else "rank 0 failed after it"
                raise CheckpointError(f"checkpoint step_{step} was saved in {self.root}, but {what}: "
                                      f"--resume latest still finds step_{step}")
            previous = next((p for n, p in reversed(list_checkpoints(self.run_dir)) if n < step), None)
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint"
            raise CheckpointError(f"could not write checkpoint step_{step} in {self.root}: {error}; {kept}")
        return final

    def _commit(self, step: int, tmp: Path, final: Path, state: dict, config_yaml: str) -> None:
        """Main process: trainer state, manifest (last), fsync, rename into place. Raises on a failure,
        which leaves the previous checkpoints as they were."""
        (tmp / CONFIG_NAME).write_text(config_yaml)
        (tmp / STATE_NAME).write_text(json.dumps({**state, "manifest": MANIFEST_NAME}, indent=1))
        write_manifest(tmp)
        fsync_tree(tmp)
        _pause("written")
        if final.exists():  # re-saving a step (resumed from an older checkpoint): swap out the old one
            trash = self.root / f".trash-{final.name}.{self.tag}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
        os.rename(tmp, final)

    def _point(self, final: Path) -> None:
        """Main process, once `final` is in place: make the rename durable, point `latest` at it, then
        prune. A failure here raises (step_N is complete: resolve() finds it all the same)."""
        fsync_dir(self.root)
        _pause("renamed")
        write_atomic(self.run_dir / LATEST_NAME, f"checkpoints/{final.name}\n")
        shutil.rmtree(self.root / f".trash-{final.name}.{self.tag}", ignore_errors=True)  # a re-saved step's old one
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        """Old checkpoints beyond keep_last, oldest first: renamed out of the way (atomic), then deleted.

        A failure is a warning and training goes on: `keep` and `latest` are durable already and resume
        takes the newest checkpoint, so an old one that stays costs disk space only (and a full disk
        later is one line, like any other); rank 0 prunes alone and a warning raises nothing, so every rank
        leaves the save's last agreement together. A step_N that stays is tried again at the next save, a
        .trash-* left behind is removed at the next start (clean_stale)."""
        try:
            found = list_checkpoints(self.run_dir)
        except OSError as e:
            self.say(f"warning: could not list {self.root} to prune it ({_describe(e)}); training goes on")
            return
        old = [p for _, p in found if p != keep][: max(0, len(found) - self.keep_last)]
        for p in old:
            trash = self.root / f".trash-{p.name}.{self.tag}"
            try:
                os.rename(p, trash)
            except FileNotFoundError:  # gone already (deleted by hand)
                continue
            except OSError as e:
                self.say(f"warning: could not prune old checkpoint {p} ({_describe(e)}): it stays (tried again "
                         f"at the next save); {keep.name} and `latest` are saved, training goes on")
                continue
            _pause("pruning")
            _remove(trash)
            if os.path.lexists(trash):
                self.say(f"warning: could not delete all of {trash} (pruned {p.name}): it is removed at the next "
                         "start; training goes on")


def _remove(path: Path) -> None:
    """A checkpoint folder set aside, gone: a link (a step_N that was a link to another run's checkpoint)
    is unlinked, its target left alone (rmtree refuses links: it stayed, noted again at every start)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # above a progress bar, not through it


def _failure(e: Exception) -> tuple[str, Exception | None]:
    """A failed save: its one line and None, or, for an error that is not about writing (a bug), a
    stand-in line for the other ranks and the error itself, to re-raise once every rank knows."""
    why = _describe(e)
    return (why, None) if why is not None else (f"{type(e).__name__} on this rank", e)


def _describe(e: Exception) -> str | None:
    """One line for a failed write, or None when `e` is not about writing (a bug: raised as it is).
    torch.save reports a full disk as a RuntimeError from its C++ writer ("... file write failed");
    safetensors (accelerate writes model.safetensors first) as a SafetensorError that carries the OS
    error: "Error while serializing: I/O error: No space left on device (os error 28)"."""
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return "no space left on device (ENOSPC)"
        return f"{e.strerror or type(e).__name__}{' (' + str(e.filename) + ')' if e.filename else ''}"
    text = str(e).splitlines()[0] if str(e) else ""
    if type(e).__name__ == "SafetensorError" and type(e).__module__.startswith("safetensors"):
        if m := re.search(r"\(os error (\d+)\)", text):
            code = int(m.group(1))
            if code == errno.ENOSPC:
                return "no space left on device (ENOSPC)"
            return f"{os.strerror(code)} ({errno.errorcode.get(code, code)}) while safetensors wrote a file"
        if "I/O error" in text:
            return f"safetensors: {text}"
    if "write" in text.lower() and ("fail" in text.lower() or "error" in text.lower()):
        return f"{text} (disk full?)"
    return None
