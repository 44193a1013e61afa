"""TensorBoard scalars and image grids (main process only), and PNG grids in samples/.

No torchvision here: a grid is one einops pattern over a padded batch.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from shards.atomic import atomic_path


def make_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Rows of `b c h w` images in [-1, 1] (equal b) -> one `c H W` grid in [0, 1]."""
    x = torch.stack([r.detach().float().cpu() for r in rows])  # r b c h w
    x = ((x.clamp(-1, 1) + 1) / 2)
    x = F.pad(x, (pad, pad, pad, pad), value=1.0)
    return rearrange(x, "r b c h w -> c (r h) (b w)")


def save_png(grid: torch.Tensor, path: Path) -> None:
    arr = (rearrange(grid, "c h w -> h w c").numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    with atomic_path(path) as tmp:  # never a half-written image where one was (the format: from the real name)
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(
            tmp, format=Image.registered_extensions().get(path.suffix.lower()))


class Tracker:
    """A SummaryWriter on the main process; every method is a no-op elsewhere.

    Logging is never worth the run: a write that fails (a full disk, samples/ made read-only, the run
    folder removed) is reported once through `on_error` and turns TensorBoard and the PNG grids off
    for the rest of the run, which trains on (train.log and checkpoints report their own failures)."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0, on_error=print):
        """`start_step`: the step the run (re)starts at. What an earlier attempt logged after it (a crash
        after the last checkpoint), or at all for a fresh start over a failed one, is purged from view,
        so a resumed run's curves do not fold back over the steps it trains again."""
        self.enabled = enabled
        self.samples_dir = Path(run_dir) / "samples"
        self.writer = None
        self.on_error = on_error
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_threads()
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else 0)

    @contextmanager
    def _guard(self, what: str):
        try:
            yield
        except OSError as e:
            writer, self.writer = self.writer, None
            if writer is not None:
                try:
                    writer.close()
                except OSError:
                    pass  # the same failure again
            self.on_error(f"warning: cannot write {what} ({type(e).__name__}: {e.strerror or e}"
                          f"{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}): TensorBoard and "
                          "image grids are off for the rest of this run; training goes on")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            with self._guard("TensorBoard scalars"):
                for k, v in values.items():
                    self.writer.add_scalar(k, v, step)

    def grid(self, tag: str, rows: list[torch.Tensor], step: int) -> None:
        if not self.writer:
            return
        grid = make_grid(rows)
        with self._guard(f"the {tag} grid"):
            self.writer.add_image(tag, grid, step)
            save_png(grid, self.samples_dir / f"{tag.replace('/', '_')}_step{step:07d}.png")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer:
            with self._guard("TensorBoard text"):
                self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer:
            with self._guard("TensorBoard events"):
                self.writer.flush()

    def close(self) -> None:
        if self.writer:
            with self._guard("TensorBoard events"):
                self.writer.close()
            self.writer = None


def _quiet_writer_threads() -> None:
    """TensorBoard writes events from a thread of its own; a failed write there is printed as a traceback
    ("Exception in thread ...") and raised again at the next write from the main thread, which
    `Tracker` reports in one line: the thread's print is dropped (other threads' are not)."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "_vae_harness", False):
        return

    def hook(args):
        if isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook._vae_harness = True
    threading.excepthook = hook
