"""A fused GroupNorm + SiLU for channels_last fp32 tensors on CPU, compiled on first use.

torch's CPU GroupNorm is 1.45-2.4x slower on channels_last (NHWC) tensors than on contiguous ones
(its backward 4x with 2 channels per group), and the SiLU after it is one more pass over memory each
way: together they were the whole gap between our NHWC step and 1.2x diffusers' (README, Measured).
`csrc/group_norm_silu.c` does both in two passes forward and two backward, vectorised along the
channels. It is plain C (no torch headers), built with the machine's C compiler (`$CC`, else `cc`,
about half a second) into `$VAE_HARNESS_CACHE` (else `$XDG_CACHE_HOME/vae-harness`, else
`~/.cache/vae-harness`) under a name that hashes the source, flags, compiler and CPU, so a home shared
by nodes of different CPUs gets one build per kind. It links the OpenMP runtime torch already loaded
and runs on `torch.get_num_threads()` threads.

Where it is used: `models.blocks.GroupNorm(x, silu=True)` on a CPU fp32 channels_last tensor, outside
autocast and torch.compile, while enabled (`train.cpu_kernels`, on by default; `set_enabled`). Each
process builds or loads it once and checks it against torch's own GroupNorm + SiLU on a small input
(forward and backward); with no compiler, a failed build or load, or a check that differs, every call
takes torch's ops, and `status()` says why in one line (the trainer logs it). Results equal torch's to
float rounding (1e-6 relative on the model's shapes; tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

SOURCE = Path(__file__).with_name("csrc") / "group_norm_silu.c"
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")

_lock = threading.Lock()
_enabled = True
_lib: ctypes.CDLL | None = None
_why_not: str | None = None  # set once a build, load or self-check has failed in this process
_where: str | None = None


class KernelUnavailable(RuntimeError):
    pass


def set_enabled(on: bool) -> None:
    """Turn the fused kernel on or off for this process (`train.cpu_kernels`)."""
    global _enabled
    _enabled = bool(on)


def cache_dir() -> Path:
    if os.environ.get("VAE_HARNESS_CACHE"):
        return Path(os.environ["VAE_HARNESS_CACHE"]).expanduser() / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "vae-harness" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the machine."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "Features", "model name", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compile(cc: str, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        proc = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True, timeout=300
        )
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise KernelUnavailable(f"{cc} could not build {SOURCE.name}: {last}")
        os.replace(tmp, out)  # atomic: another rank building the same file meanwhile is harmless
    finally:
        tmp.unlink(missing_ok=True)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gn_silu_forward.argtypes = [p] * 6 + [i64] * 4 + [ctypes.c_double, c_int, i64, p]
    lib.gn_silu_forward.restype = None
    lib.gn_silu_backward.argtypes = [p] * 9 + [i64] * 4 + [c_int, i64, p, p]
    lib.gn_silu_backward.restype = None
    return lib


def _build_and_load() -> tuple[ctypes.CDLL, str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelUnavailable("no C compiler (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"C compiler {cc!r} does not run: {e}") from None
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, platform.machine(), _cpu_id()]).encode()
    ).hexdigest()[:16]
    name = f"group_norm_silu-{key}.so"
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if not path.exists():
            _compile(cc, path)
        try:
            return _declare(ctypes.CDLL(str(path))), str(path)
        except OSError:
            path.unlink(missing_ok=True)  # a damaged file in the cache: build it again, once
            _compile(cc, path)
            return _declare(ctypes.CDLL(str(path))), str(path)
    except OSError:
        # the cache is not writable (or the rebuilt file still does not load): a private folder
        path = Path(tempfile.mkdtemp(prefix="vae-harness-kernels-")) / name
        _compile(cc, path)
        try:
            return _declare(ctypes.CDLL(str(path))), str(path)
        except OSError as e:
            raise KernelUnavailable(f"built {path} but could not load it: {e}") from None


def _self_check(lib: ctypes.CDLL) -> None:
    """Forward and backward against torch's ops on a small input, in fp64 as the reference (with autograd
    on whatever context the first call came from: no_grad, inference_mode, autocast)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        _compare(lib)


def _compare(lib: ctypes.CDLL) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 64, 5, 7, generator=g) * 2 + 0.5).to(memory_format=torch.channels_last)
    w, b = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    dy = torch.randn(3, 64, 5, 7, generator=g).to(memory_format=torch.channels_last)
    got = _run(lib, x, w, b, 32, 1e-6, dy)
    ref_in = [t.double().requires_grad_() for t in (x, w, b)]
    ref = F.silu(F.group_norm(ref_in[0], 32, ref_in[1], ref_in[2], 1e-6))
    ref.backward(dy.double())
    for name, a, r in zip(("output", "dx", "dweight", "dbias"), got, [ref] + [t.grad for t in ref_in]):
        err = float((a.double() - r.detach()).abs().max() / r.detach().abs().max().clamp_min(1e-12))
        if not err < 1e-4:
            raise KernelUnavailable(f"self-check failed: {name} differs from torch's by {err:.1e} (relative)")


def _run(lib, x, w, b, groups, eps, dy):
    """The kernel's forward and backward outside autograd (the self-check)."""
    with torch.no_grad():
        y, mean, rstd = _forward(lib, x, w, b, groups, eps)
        return (y, *_backward(lib, dy, x, w, b, mean, rstd, groups))


CHUNK_PIXELS = 1024


def _chunks(p: int) -> int:
    """Pixel chunks per sample, by its size alone: each sample's sums are then added in one order whatever
    the batch size or thread count (a sample's output does not depend on the batch it came in, nor a resumed
    run's on its threads), and a small batch of large images still has tasks for every thread."""
    return max(1, -(-p // CHUNK_PIXELS))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _nhwc_empty(n: int, c: int, h: int, w: int) -> torch.Tensor:
    return torch.empty(n, h, w, c).permute(0, 3, 1, 2)


def _forward(lib, x, w, b, groups, eps):
    n, c, h, w_ = x.shape
    threads, chunks = torch.get_num_threads(), _chunks(h * w_)
    y = _nhwc_empty(n, c, h, w_)
    mean, rstd = torch.empty(n, groups), torch.empty(n, groups)
    work = torch.empty(n * chunks * 2 * c, dtype=torch.float64)
    lib.gn_silu_forward(
        _ptr(x), _ptr(w), _ptr(b), _ptr(y), _ptr(mean), _ptr(rstd),
        n, h * w_, c, groups, eps, threads, chunks, _ptr(work),
    )  # fmt: skip
    return y, mean, rstd


def _backward(lib, dy, x, w, b, mean, rstd, groups):
    n, c, h, w_ = x.shape
    if not dy.permute(0, 2, 3, 1).is_contiguous():
        dy = dy.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    threads, chunks = torch.get_num_threads(), _chunks(h * w_)
    dx = _nhwc_empty(n, c, h, w_)
    dw, db = torch.empty(c), torch.empty(c)
    work = torch.empty(n * chunks * 2 * c, dtype=torch.float64)
    coef = torch.empty(2 * n * groups)
    lib.gn_silu_backward(
        _ptr(dy), _ptr(x), _ptr(w), _ptr(b), _ptr(mean), _ptr(rstd), _ptr(dx), _ptr(dw), _ptr(db),
        n, h * w_, c, groups, threads, chunks, _ptr(work), _ptr(coef),
    )  # fmt: skip
    return dx, dw, db


def _library() -> ctypes.CDLL | None:
    global _lib, _why_not, _where
    if _lib is not None or _why_not is not None:
        return _lib
    with _lock:
        if _lib is None and _why_not is None:
            try:
                lib, where = _build_and_load()
                _self_check(lib)
                _lib, _where = lib, where
            except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
                _why_not = str(e) or type(e).__name__
            except Exception as e:  # noqa: BLE001 (a surprise in the check: torch's ops run, and it is said)
                _why_not = f"{type(e).__name__}: {e}"
    return _lib


def prepare() -> str:
    """Build or load the kernel now (not at the first step) and say in one line what will run."""
    if not _enabled:
        return "fused GroupNorm+SiLU CPU kernel: off (train.cpu_kernels=false)"
    if _library() is None:
        return f"fused GroupNorm+SiLU CPU kernel unavailable, torch's ops run instead: {_why_not}"
    return f"fused GroupNorm+SiLU CPU kernel: on ({_where})"


def usable(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether `group_norm_silu` runs the kernel for these arguments (else: torch's ops)."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.numel() > 0
        and x.shape[1] <= 8192  # per-channel sums live on each thread's stack (4 floats a channel)
        and weight is not None
        and bias is not None
        and weight.dtype == torch.float32
        and bias.dtype == torch.float32
        and x.permute(0, 2, 3, 1).is_contiguous()
        and not x.is_contiguous()  # NCHW memory: torch's kernel is the fast one there
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and _library() is not None
    )


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        weight, bias = weight.contiguous(), bias.contiguous()
        y, mean, rstd = _forward(_lib, x, weight, bias, groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward(_lib, dy, x, weight, bias, mean, rstd, ctx.groups)
        return dx, dw, db, None, None


def group_norm_silu(x, groups, weight, bias, eps):
    """silu(group_norm(x)): the fused kernel where `usable`, else torch's two ops."""
    if usable(x, weight, bias):
        return _GroupNormSiLU.apply(x, weight, bias, groups, eps)
    return F.silu(F.group_norm(x, groups, weight, bias, eps))
