"""A fused GroupNorm + SiLU for channels_last fp32 tensors on CPU, compiled on first use.

torch's CPU GroupNorm is 1.45-2.4x slower on channels_last (NHWC) tensors than on contiguous ones
(its backward 4x with 2 channels per group), and the SiLU after it is one more pass over memory each
way: together they were the whole gap between our NHWC step and 1.2x diffusers' (README, Measured).
`csrc/group_norm_silu.c` does both in two passes forward and two backward, vectorised along the
channels. It is plain C (no torch headers), built with the machine's C compiler (`$CC`, else `cc`,
about half a second) into `$VAE_HARNESS_CACHE/kernels` (else `$XDG_CACHE_HOME/vae-harness/kernels`, else
`~/.cache/vae-harness/kernels`) under a name that hashes the source, flags, compiler and CPU, so a home
shared by nodes of different CPUs gets one build per kind. It links the OpenMP runtime torch already
loaded and runs on `torch.get_num_threads()` threads.

Where it is used: `models.blocks.GroupNorm(x, silu=True)` on a CPU fp32 channels_last tensor, outside
autocast and torch.compile, while enabled (`train.cpu_kernels`, on by default; `set_enabled`;
`VAE_HARNESS_CPU_KERNELS=0` turns it off for every tool). Each process builds or loads it once and checks
it against torch's own GroupNorm + SiLU on a small input (forward and backward); with no compiler, a
failed build or load, or a check that differs, every call takes torch's ops, and `prepare()` says why in
one line (the trainer logs it). Results equal torch's to float rounding (tests/test_cpu_kernels.py). A
backward that builds a graph (create_graph=True: double backward, gradient penalties) goes through
torch's ops.

A library is loaded from the cache only when this user owns it and its folder and neither is writable
by others; otherwise (or where the cache cannot be written) it is built in a private temporary folder,
loaded, and the folder removed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("csrc") / "group_norm_silu.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
# AVX-512 machines: gcc and clang default to 256-bit vectors; the kernel's loops gain from 512 (x86 only)
X86_FLAGS = ("-mprefer-vector-width=512",)
BUILD_TIMEOUT_S = 60  # the build takes about half a second
MAX_CHANNELS = 65536

_lock = threading.Lock()
# VAE_HARNESS_CPU_KERNELS=0: off in every tool, and in training whatever train.cpu_kernels says
ENV_ENABLED = os.environ.get("VAE_HARNESS_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_enabled = ENV_ENABLED
_lib: ctypes.CDLL | None = None
_why_not: str | None = None  # set once a build, load or self-check has failed in this process
_where: str | None = None


class KernelUnavailable(RuntimeError):
    pass


def set_enabled(on: bool) -> None:
    """Turn the fused kernel on or off for this process (`train.cpu_kernels`; VAE_HARNESS_CPU_KERNELS=0 wins)."""
    global _enabled
    _enabled = bool(on) and ENV_ENABLED


def cache_dir() -> Path:
    if os.environ.get("VAE_HARNESS_CACHE"):
        return Path(os.environ["VAE_HARNESS_CACHE"]).expanduser() / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "vae-harness" / "kernels"


def _flags() -> tuple[str, ...]:
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    return FLAGS + (X86_FLAGS if x86 else ())


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the machine."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "Features", "model name", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _run(cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run in a session of its own, so that a timeout ends the compiler's children (cc1, as) too."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise KernelUnavailable(f"{cmd[0]} ({what}) took longer than {timeout:.0f} s; stopped") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _compile(cc: list[str], out: Path) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        proc = _run([*cc, *_flags(), str(SOURCE), "-o", str(tmp), "-lm"], BUILD_TIMEOUT_S, f"building {SOURCE.name}")
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise KernelUnavailable(f"{shlex.join(cc)} could not build {SOURCE.name}: {last.strip()[:300]}")
        if not tmp.is_file():
            raise KernelUnavailable(f"{shlex.join(cc)} exited 0 but wrote no library")
        os.replace(tmp, out)  # atomic: another rank building the same file meanwhile is harmless
    finally:
        tmp.unlink(missing_ok=True)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gn_silu_forward.argtypes = [p] * 6 + [i64] * 4 + [ctypes.c_double, c_int, i64, p, p, p]
    lib.gn_silu_forward.restype = None
    lib.gn_silu_backward.argtypes = [p] * 9 + [i64] * 4 + [c_int, i64, p, p, p, p]
    lib.gn_silu_backward.restype = None
    return lib


def _load(path: Path) -> ctypes.CDLL:
    try:
        return _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as e:  # not a library, or one without the kernel's symbols
        raise KernelUnavailable(f"{path}: cannot load it: {e}") from None


def _private(*paths: Path) -> bool:
    """Each owned by this user, not a link, and not writable by anyone else."""
    try:
        for p in paths:
            st = p.lstat()
            if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or stat.S_ISLNK(st.st_mode):
                return False
        return True
    except OSError:
        return False


def _build_and_load(say: Callable[[str], None] | None) -> tuple[ctypes.CDLL, str]:
    cc = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not cc:
        raise KernelUnavailable("no C compiler (set CC, or install gcc)")
    try:
        version = _run([*cc, "--version"], 20, "--version")
    except OSError as e:
        raise KernelUnavailable(f"C compiler {shlex.join(cc)!r} does not run: {e.strerror or e}") from None
    if version.returncode:
        raise KernelUnavailable(f"C compiler {shlex.join(cc)!r} does not run: `--version` exited {version.returncode}")
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(_flags()), version.stdout, platform.machine(), _cpu_id()]).encode()
    ).hexdigest()[:16]
    name = f"group_norm_silu-{key}.so"
    folder = cache_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        usable_cache = _private(folder) and os.access(folder, os.W_OK)
    except OSError:
        usable_cache = False
    if usable_cache:
        path = folder / name
        if path.exists() and _private(path, folder):
            try:
                return _load(path), str(path)
            except KernelUnavailable:
                path.unlink(missing_ok=True)  # damaged: built again below
        elif path.exists():
            usable_cache = False  # someone else's file: not loaded, not replaced
    if usable_cache:
        if say:
            say(f"building the fused GroupNorm+SiLU CPU kernel with {shlex.join(cc)} into {folder}")
        _compile(cc, path)
        return _load(path), str(path)
    # a private folder, removed once the library is loaded (the mapping stays)
    private = Path(tempfile.mkdtemp(prefix="vae-harness-kernels-"))
    try:
        if say:
            say(f"building the fused GroupNorm+SiLU CPU kernel with {shlex.join(cc)} in {private} "
                f"({folder} is not writable, or not this user's alone)")
        _compile(cc, private / name)
        return _load(private / name), f"built in a private folder: {folder} is not writable, or not this user's alone"
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _self_check(lib: ctypes.CDLL) -> None:
    """Forward and backward against torch's ops on a small input, in fp64 as the reference (with autograd
    on whatever context the first call came from: no_grad, inference_mode, autocast)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        _compare(lib)


def _compare(lib: ctypes.CDLL) -> None:
    g = torch.Generator().manual_seed(0)
    f32 = {"dtype": torch.float32, "generator": g}
    x = (torch.randn(3, 64, 5, 7, **f32) * 2 + 0.5).to(memory_format=torch.channels_last)
    x[0, :, 2, 3] = -300.0  # z far below -88: exp(-z) past fp32's range
    w, b = torch.rand(64, **f32) + 0.5, torch.randn(64, **f32)
    dy = torch.randn(3, 64, 5, 7, **f32).to(memory_format=torch.channels_last)
    got = _run_kernel(lib, x, w, b, 32, 1e-6, dy)
    ref_in = [t.double().requires_grad_() for t in (x, w, b)]
    ref = F.silu(F.group_norm(ref_in[0], 32, ref_in[1], ref_in[2], 1e-6))
    ref.backward(dy.double())
    for name, a, r in zip(("output", "dx", "dweight", "dbias"), got, [ref] + [t.grad for t in ref_in]):
        err = float((a.double() - r.detach()).abs().max() / r.detach().abs().max().clamp_min(1e-12))
        if not err < 1e-4:
            raise KernelUnavailable(f"self-check failed: {name} differs from torch's by {err:.1e} (relative)")


def _run_kernel(lib, x, w, b, groups, eps, dy):
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


def _f32(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.float32)  # whatever torch's default dtype


def _buffers(n: int, c: int, p: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    chunks = _chunks(p)
    return chunks, torch.empty(n * chunks * 2 * c, dtype=torch.float64), _f32(n * chunks * 4 * c), _f32(n * c)


def _forward(lib, x, w, b, groups, eps):
    n, c, h, w_ = x.shape
    chunks, work, scratch, shift = _buffers(n, c, h * w_)
    y = _f32(n, h, w_, c).permute(0, 3, 1, 2)
    mean, rstd = _f32(n, groups), _f32(n, groups)
    lib.gn_silu_forward(
        _ptr(x), _ptr(w), _ptr(b), _ptr(y), _ptr(mean), _ptr(rstd),
        n, h * w_, c, groups, eps, torch.get_num_threads(), chunks, _ptr(work), _ptr(scratch), _ptr(shift),
    )  # fmt: skip
    return y, mean, rstd


def _backward(lib, dy, x, w, b, mean, rstd, groups):
    n, c, h, w_ = x.shape
    if dy.dtype != torch.float32:
        dy = dy.float()
    if not dy.permute(0, 2, 3, 1).is_contiguous():
        dy = dy.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    chunks, work, scratch, shift = _buffers(n, c, h * w_)
    dx = _f32(n, h, w_, c).permute(0, 3, 1, 2)
    dw, db, coef = _f32(c), _f32(c), _f32(2 * n * groups)
    lib.gn_silu_backward(
        _ptr(dy), _ptr(x), _ptr(w), _ptr(b), _ptr(mean), _ptr(rstd), _ptr(dx), _ptr(dw), _ptr(db),
        n, h * w_, c, groups, torch.get_num_threads(), chunks, _ptr(work), _ptr(scratch), _ptr(shift), _ptr(coef),
    )  # fmt: skip
    return dx, dw, db


def _library(say: Callable[[str], None] | None = None) -> ctypes.CDLL | None:
    global _lib, _why_not, _where
    if _lib is not None or _why_not is not None:
        return _lib
    with _lock:
        if _lib is None and _why_not is None:
            try:
                lib, where = _build_and_load(say)
                _self_check(lib)
                _lib, _where = lib, where
            except (KernelUnavailable, OSError) as e:
                _why_not = str(e) or type(e).__name__
            except Exception as e:  # noqa: BLE001 (a surprise in the check: torch's ops run, and it is said)
                _why_not = f"{type(e).__name__}: {e}"
    return _lib


def prepare(say: Callable[[str], None] | None = None) -> str:
    """Build or load the kernel now (not at the first step) and say in one line what will run; `say` is told
    first when a build starts (it can take a while on a loaded machine)."""
    if not _enabled:
        return "fused GroupNorm+SiLU CPU kernel: off (train.cpu_kernels=false or VAE_HARNESS_CPU_KERNELS=0)"
    if _library(say) is None:
        return f"fused GroupNorm+SiLU CPU kernel unavailable, torch's ops run instead: {_why_not}"
    return f"fused GroupNorm+SiLU CPU kernel: on ({_where})"


def _affine_fits(t: torch.Tensor | None, c: int) -> bool:
    return t is not None and t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 1 and t.numel() == c


def usable(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether `group_norm_silu` runs the kernel for these arguments (else: torch's ops, which also say
    what is wrong with arguments that do not fit)."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.numel() > 0
        and 0 < x.shape[1] <= MAX_CHANNELS
        and isinstance(groups, int)
        and groups > 0
        and x.shape[1] % groups == 0
        and _affine_fits(weight, x.shape[1])
        and _affine_fits(bias, x.shape[1])
        and x.permute(0, 2, 3, 1).is_contiguous()
        and not x.is_contiguous()  # NCHW memory: torch's kernel is the fast one there
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and _library() is not None
    )


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        y, mean, rstd = _forward(_lib, x, weight.contiguous(), bias.contiguous(), groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.eps = groups, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: torch's ops, whose backward is differentiable
            wanted = [t for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3]) if need]
            y = F.silu(F.group_norm(x, ctx.groups, weight, bias, ctx.eps))
            got = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
            return (*(next(got) if need else None for need in ctx.needs_input_grad[:3]), None, None)
        dx, dw, db = _backward(_lib, dy, x, weight.contiguous(), bias.contiguous(), mean, rstd, ctx.groups)
        return dx, dw, db, None, None


def group_norm_silu(x, groups, weight, bias, eps):
    """silu(group_norm(x)): the fused kernel where `usable`, else torch's two ops."""
    if usable(x, groups, weight, bias):
        return _GroupNormSiLU.apply(x, weight, bias, groups, eps)
    return F.silu(F.group_norm(x, groups, weight, bias, eps))
