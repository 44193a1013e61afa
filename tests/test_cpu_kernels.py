"""The fused GroupNorm + SiLU CPU kernel (models/cpu_kernels.py): it equals torch's ops (forward and
backward, against fp64), it is what the model runs on channels_last fp32 CPU tensors and nowhere else,
and a missing compiler, a failed build, a damaged cached library, an unwritable cache or a kernel that
computes something else leave torch's ops running, with the reason in one line."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.blocks import Normalize, ResnetBlock

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """The module as a new process has it, its cache in tmp_path; restored afterwards."""
    monkeypatch.setenv("VAE_HARNESS_CACHE", str(tmp_path / "cache"))
    for name, value in (("_lib", None), ("_why_not", None), ("_where", None), ("_enabled", True)):
        monkeypatch.setattr(cpu_kernels, name, value)
    return tmp_path


def nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def fp64_reference(x, w, b, groups, dy):
    xs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y = F.silu(F.group_norm(xs[0], groups, xs[1], xs[2], 1e-6))
    y.backward(dy.double())
    return [y.detach()] + [t.grad for t in xs]


def rel_err(a, ref):
    """Largest error against the reference's largest value (1e-6 at least: outputs of about 1e-37 are 0)."""
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize(
    "shape, groups, threads",
    [((2, 64, 5, 7), 32, 1), ((8, 64, 16, 16), 32, 2), ((1, 128, 9, 3), 32, 2), ((3, 96, 4, 4), 8, 1),
     ((1, 256, 8, 8), 32, 3), ((2, 32, 6, 6), 32, 2)],
)  # fmt: skip
def test_kernel_equals_torch_forward_and_backward(shape, groups, threads):
    """Against fp64, the kernel is as close as torch's own fp32 ops, whatever the threads and pixel chunks."""
    torch.manual_seed(0)
    c = shape[1]
    x = nhwc(torch.randn(shape) * 2 + 0.5).requires_grad_()
    w, b = (torch.rand(c) + 0.5).requires_grad_(), torch.randn(c).requires_grad_()
    dy = nhwc(torch.randn(shape))
    ref = fp64_reference(x, w, b, groups, dy)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu_kernels.usable(x, 32, w, b), cpu_kernels.prepare()
        y = cpu_kernels.group_norm_silu(x, groups, w, b, 1e-6)
        assert y.grad_fn is not None and "GroupNormSiLU" in type(y.grad_fn).__name__  # the kernel ran
        y.backward(dy)
        got = [y.detach(), x.grad, w.grad, b.grad]
        x.grad = w.grad = b.grad = None
        y_t = F.silu(F.group_norm(x, groups, w, b, 1e-6))
        y_t.backward(dy)
        torch_ = [y_t.detach(), x.grad, w.grad, b.grad]
    finally:
        torch.set_num_threads(old)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (y, got[1]))
    for name, a, t, r in zip(("y", "dx", "dw", "db"), got, torch_, ref):
        assert rel_err(a, r) < max(3 * rel_err(t, r), 2e-6), name


def test_a_large_mean_keeps_its_variance():
    """Activations of mean 1000 and spread 0.01: summing x and x^2 directly would lose the variance in
    fp32; the kernel sums about each channel's first pixel and stays near fp64 (torch's ops too)."""
    torch.manual_seed(1)
    x = nhwc(torch.randn(2, 64, 8, 8) * 0.01 + 1000).requires_grad_()
    w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    dy = nhwc(torch.randn(2, 64, 8, 8))
    ref = fp64_reference(x, w, b, 32, dy)
    assert cpu_kernels.usable(x, 32, w, b)
    y = cpu_kernels.group_norm_silu(x, 32, w, b, 1e-6)
    y.backward(dy)
    for name, a, r in zip(("y", "dx", "dw", "db"), [y.detach(), x.grad, w.grad, b.grad], ref):
        assert rel_err(a, r) < 5e-3, name  # fp32 holds 1000 to 6e-5: the spread's 0.01 to about 1e-2 relative


def test_the_model_runs_the_kernel_on_nhwc_and_equals_torchs_ops():
    torch.manual_seed(0)
    block = ResnetBlock(in_channels=64, out_channels=128)
    x = nhwc(torch.randn(2, 64, 12, 12)).requires_grad_()
    calls = []
    real = cpu_kernels._GroupNormSiLU.apply
    cpu_kernels._GroupNormSiLU.apply = lambda *a: calls.append(1) or real(*a)
    try:
        out = {}
        for on in (True, False):
            cpu_kernels.set_enabled(on)
            block.zero_grad()
            x.grad = None
            y = block(x)
            y.square().mean().backward()
            out[on] = [y.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    finally:
        cpu_kernels._GroupNormSiLU.apply = real
        cpu_kernels.set_enabled(True)
    assert len(calls) == 2  # both norms, and only with the kernel on
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["nchw", "fp64", "bf16_autocast", "fp16", "disabled", "no_affine"])
def test_torchs_ops_run_where_the_kernel_does_not_apply(case):
    norm = Normalize(64)
    x = nhwc(torch.randn(2, 64, 6, 6))
    if case == "nchw":
        x = x.contiguous()
    elif case == "fp64":
        norm, x = norm.double(), x.double()
    elif case == "disabled":
        cpu_kernels.set_enabled(False)
    elif case == "no_affine":
        norm = torch.nn.GroupNorm(32, 64, affine=False)
    try:
        if case == "bf16_autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not cpu_kernels.usable(x, 32, norm.weight, norm.bias)
        elif case == "fp16":
            y = norm(x.half(), silu=True)  # fp32 statistics by construction, torch's ops, fp16 out
            assert y.dtype == torch.float16
            torch.testing.assert_close(y.float(), F.silu(F.group_norm(x, 32, norm.weight, norm.bias, 1e-6)),
                                       rtol=1e-2, atol=1e-2)
        else:
            assert not cpu_kernels.usable(x, 32, norm.weight, norm.bias)
            y = cpu_kernels.group_norm_silu(x, 32, norm.weight, norm.bias, norm.eps)
            assert y.grad_fn is None or "GroupNormSiLU" not in type(y.grad_fn).__name__
    finally:
        cpu_kernels.set_enabled(True)


def test_built_once_into_the_cache_and_loaded_from_it(fresh):
    assert cpu_kernels.prepare().startswith("fused GroupNorm+SiLU CPU kernel: on (")
    built = list((fresh / "cache" / "kernels").glob("group_norm_silu-*.so"))
    assert len(built) == 1 and not list((fresh / "cache" / "kernels").glob(".*tmp"))
    mtime = built[0].stat().st_mtime_ns
    cpu_kernels._lib = None  # a new process: loads the file, builds nothing
    assert "on (" in cpu_kernels.prepare() and built[0].stat().st_mtime_ns == mtime


def prepare_in_a_new_process(cache):
    code = "from models import cpu_kernels; print(cpu_kernels.prepare())"
    env = {**os.environ, "VAE_HARNESS_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_damaged_cached_library_is_built_again(fresh):
    """A new process (a loaded library stays mapped in this one) finds the cached file damaged."""
    assert "on (" in cpu_kernels.prepare()
    (so,) = (fresh / "cache" / "kernels").glob("group_norm_silu-*.so")
    damaged = so.with_name("damaged")
    damaged.write_bytes(b"\x7fELF not really")
    os.replace(damaged, so)  # a new file: overwriting the one this process has mapped would crash it
    assert "on (" in prepare_in_a_new_process(fresh / "cache")
    assert so.read_bytes()[:4] == b"\x7fELF" and so.stat().st_size > 1000


@pytest.fixture
def tmpdirs(tmp_path, monkeypatch):
    """Where tempfile makes folders, to see that none is left behind."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_an_unwritable_cache_builds_in_a_private_folder_it_removes(fresh, monkeypatch, tmpdirs):
    blocker = fresh / "afile"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VAE_HARNESS_CACHE", str(blocker))
    said = []
    line = cpu_kernels.prepare(say=said.append)
    assert line.startswith("fused GroupNorm+SiLU CPU kernel: on (built in a private folder: ")
    assert "not writable" in line
    assert len(said) == 1 and said[0].startswith("building the fused GroupNorm+SiLU CPU kernel with ")
    assert list(tmpdirs.iterdir()) == []  # loaded, then removed (the mapping stays)
    x = nhwc(torch.randn(2, 64, 4, 4))
    norm = Normalize(64)
    assert cpu_kernels.usable(x, 32, norm.weight, norm.bias)


@pytest.mark.parametrize("whose", ["group_writable_folder", "world_writable_file"])
def test_a_cache_others_can_write_is_not_loaded_from(fresh, tmpdirs, whose):
    """Whoever can write the cache could plant a library: one that is not this user's alone is not loaded
    (nor replaced); the kernel is built privately instead."""
    assert "on (" in cpu_kernels.prepare()
    folder = fresh / "cache" / "kernels"
    (so,) = folder.glob("group_norm_silu-*.so")
    if whose == "group_writable_folder":
        folder.chmod(0o775)
    else:
        so.chmod(0o666)
    planted = so.read_bytes()
    cpu_kernels._lib = None
    assert "built in a private folder" in cpu_kernels.prepare()
    assert so.read_bytes() == planted and list(tmpdirs.iterdir()) == []


@pytest.mark.parametrize("cc, why", [("/bin/false", "does not run: `--version` exited 1"),
                                     ("/nonexistent/cc", "does not run: No such file or directory"),
                                     ("true", "exited 0 but wrote no library")])
def test_no_working_compiler_leaves_torchs_ops(fresh, monkeypatch, tmpdirs, cc, why):
    monkeypatch.setenv("CC", cc)
    line = cpu_kernels.prepare()
    assert line.startswith("fused GroupNorm+SiLU CPU kernel unavailable, torch's ops run instead") and why in line, line
    x = nhwc(torch.randn(2, 64, 4, 4))
    norm = Normalize(64)
    assert not cpu_kernels.usable(x, 32, norm.weight, norm.bias)
    torch.testing.assert_close(norm(x, silu=True), F.silu(norm(x)))
    assert list(tmpdirs.iterdir()) == []


def test_cc_may_carry_arguments(fresh, monkeypatch):
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -std=gnu11")
    assert "on (" in cpu_kernels.prepare()


def test_a_compiler_that_hangs_is_stopped_with_its_children(fresh, monkeypatch, tmp_path):
    pidfile = tmp_path / "child.pid"
    cc = tmp_path / "slowcc"
    cc.write_text(f"#!/bin/sh\ncase \"$1\" in --version) echo slowcc; exit 0;; esac\n"
                  f"sleep 300 & echo $! > {pidfile}\nwait\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(cpu_kernels, "BUILD_TIMEOUT_S", 2)
    t0 = time.monotonic()
    line = cpu_kernels.prepare()
    assert time.monotonic() - t0 < 30
    assert "unavailable" in line and "(building group_norm_silu.c) took longer than 2 s; stopped" in line, line
    child = Path(f"/proc/{int(pidfile.read_text())}/stat")
    time.sleep(0.2)
    # the compiler's own child went with it (gone, or a zombie until whoever adopted it reaps it)
    assert not child.exists() or child.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_the_build_flags_fit_the_machine(monkeypatch):
    for machine, x86 in (("x86_64", True), ("aarch64", False), ("arm64", False)):
        monkeypatch.setattr(cpu_kernels.platform, "machine", lambda m=machine: m)
        assert ("-mprefer-vector-width=512" in cpu_kernels._flags()) == x86


def test_the_environment_turns_it_off_for_every_tool():
    code = "from models import cpu_kernels; print(cpu_kernels.prepare())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "VAE_HARNESS_CPU_KERNELS": "0"})
    assert out.stdout.strip().startswith("fused GroupNorm+SiLU CPU kernel: off"), out.stderr


def test_a_kernel_that_computes_something_else_is_refused(fresh, monkeypatch):
    """The self-check: a build whose results differ from torch's (here one constant of its exp changed)
    is not used."""
    bad = fresh / "group_norm_silu.c"
    bad.write_text(cpu_kernels.SOURCE.read_text().replace("5.0000001201e-1f", "6.0e-1f"))
    monkeypatch.setattr(cpu_kernels, "SOURCE", bad)
    line = cpu_kernels.prepare()
    assert "self-check failed: output differs from torch's" in line


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_first_call_may_come_without_autograd(fresh, context):
    """Evaluation and export build the kernel at their first call, under no_grad or inference_mode: the
    self-check still runs its backward."""
    norm = Normalize(64)
    x = nhwc(torch.randn(2, 64, 6, 6))
    with context():
        y = norm(x, silu=True)
    assert "on (" in cpu_kernels.prepare()
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 32, norm.weight, norm.bias, 1e-6)))


def test_a_nan_spreads_over_its_group_as_in_torchs_ops():
    """The trainer skips a step on a non-finite loss: the kernel must pass a NaN on, not hide it."""
    x = nhwc(torch.randn(2, 64, 4, 4))
    x[1, 5, 2, 3] = float("nan")  # sample 1, group 2 (channels 4, 5)
    w, b = torch.ones(64), torch.zeros(64)
    y = cpu_kernels.group_norm_silu(x, 32, w, b, 1e-6)
    ref = F.silu(F.group_norm(x, 32, w, b, 1e-6))
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().sum() == 2 * 16
    torch.testing.assert_close(y.nan_to_num(), ref.nan_to_num())


def test_a_samples_output_depends_on_neither_its_batch_nor_the_threads():
    """Bitwise: evaluation compares batches of different sizes, and a resumed run may have other threads."""
    torch.manual_seed(2)
    x = nhwc(torch.randn(4, 64, 40, 40))
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    dy = nhwc(torch.randn(4, 64, 40, 40))
    old = torch.get_num_threads()
    runs = []
    try:
        for threads, rows in ((1, slice(0, 4)), (3, slice(0, 4)), (2, slice(1, 2))):
            torch.set_num_threads(threads)
            xi = x[rows].clone().requires_grad_()
            y = cpu_kernels.group_norm_silu(xi, 32, w, b, 1e-6)
            y.backward(dy[rows])
            runs.append((y.detach()[-1], xi.grad[-1]))  # sample 1 in the last run, 3 in the others
    finally:
        torch.set_num_threads(old)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    ref = cpu_kernels.group_norm_silu(x[1:2], 32, w, b, 1e-6)
    assert torch.equal(runs[2][0], ref[0])
    alone = cpu_kernels.group_norm_silu(x[3:4], 32, w, b, 1e-6)
    assert torch.equal(runs[0][0], alone[0])


def kernel_and_torch(x, w, b, groups=32, dy=None):
    """(kernel's, torch fp32's, fp64 reference) of [y, dx, dw, db]."""
    dy = nhwc(torch.randn(x.shape)) if dy is None else dy
    out = []
    for f in (lambda *a: cpu_kernels.group_norm_silu(*a, 1e-6), lambda *a: F.silu(F.group_norm(*a, 1e-6))):
        xs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = f(xs[0], groups, xs[1], xs[2])
        y.backward(dy)
        out.append([y.detach()] + [t.grad for t in xs])
    return out[0], out[1], fp64_reference(x, w, b, groups, dy)


@pytest.mark.parametrize("case", ["bias_-90", "outlier_-1e4", "weight_100", "bias_+100", "first_pixel_outlier"])
def test_far_tails_and_outliers_stay_as_close_as_torchs_ops(case):
    """z far below -88 (exp(-z) past fp32's range), far above (1 - sigmoid cancels), one outlier in a group,
    an outlier at the pixel the sums could have been taken about: as close to fp64 as torch's own ops."""
    torch.manual_seed(3)
    x, w, b = nhwc(torch.randn(2, 64, 16, 16)), torch.rand(64) + 0.5, torch.randn(64)
    if case == "bias_-90":
        x, b = nhwc(torch.zeros(1, 64, 4, 4)), torch.full((64,), -90.0)
    elif case == "outlier_-1e4":
        x[0, 0, 5, 5] = -1e4
    elif case == "weight_100":
        w = torch.full((64,), 100.0)
    elif case == "bias_+100":
        b = torch.full((64,), 100.0)
    else:
        x[:, :, 0, 0] = 100.0
    assert cpu_kernels.usable(x, 32, w, b)
    kernel, torch_, ref = kernel_and_torch(x, w, b)
    for name, k, t, r in zip(("y", "dx", "dw", "db"), kernel, torch_, ref):
        assert torch.isfinite(k).all() == torch.isfinite(t).all(), name
        assert rel_err(k, r) < max(3 * rel_err(t, r), 2e-6), (name, rel_err(k, r), rel_err(t, r))


def test_values_whose_squares_overflow_give_nan_as_torchs_ops_do():
    """Not silu(beta) from a variance gone infinite: the trainer's non-finite check must see it."""
    x, w, b = nhwc(torch.randn(2, 64, 8, 8) * 1e30), torch.ones(64), torch.zeros(64)
    y = cpu_kernels.group_norm_silu(x, 32, w, b, 1e-6)
    assert not torch.isfinite(F.silu(F.group_norm(x, 32, w, b, 1e-6))).any()
    assert not torch.isfinite(y).any()


def test_the_default_dtype_does_not_matter():
    torch.manual_seed(4)
    x, w, b = nhwc(torch.randn(2, 64, 6, 6)), torch.rand(64) + 0.5, torch.randn(64)
    want = F.silu(F.group_norm(x, 32, w, b, 1e-6))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = cpu_kernels.group_norm_silu(x, 32, w, b, 1e-6)
    finally:
        torch.set_default_dtype(old)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", ["groups_5", "weight_32", "groups_0", "groups_128", "meta_weight", "empty_weight"])
def test_arguments_that_do_not_fit_get_torchs_own_error(case):
    x, w, b, groups = nhwc(torch.randn(2, 64, 4, 4)), torch.ones(64), torch.zeros(64), 32
    if case.startswith("groups_"):
        groups = int(case.split("_")[1])
    elif case == "weight_32":
        w = torch.ones(32)
    elif case == "meta_weight":
        w = torch.ones(64, device="meta")
    else:
        w = torch.ones(0)  # a ZeRO-3 parameter that was not gathered
    assert not cpu_kernels.usable(x, groups, w, b)
    with pytest.raises((RuntimeError, ValueError, ZeroDivisionError, NotImplementedError)):
        cpu_kernels.group_norm_silu(x, groups, w, b, 1e-6)


def test_a_gradient_penalty_through_it_is_differentiated_like_torchs_ops():
    """create_graph=True (an R1 penalty, double backward) goes through torch's ops: the same answer."""
    torch.manual_seed(5)
    x0, w0, b0 = nhwc(torch.randn(2, 64, 6, 6)), torch.rand(64) + 0.5, torch.randn(64)
    grads = []
    for f in (lambda *a: cpu_kernels.group_norm_silu(*a, 1e-6), lambda *a: F.silu(F.group_norm(*a, 1e-6))):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        (g,) = torch.autograd.grad(f(x, 32, w, b).square().sum(), x, create_graph=True)
        g.square().sum().backward()
        grads.append((x.grad, w.grad, b.grad))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_many_channels_on_a_small_thread_stack():
    """Per-channel sums are not on the threads' stacks: 8192 channels with OpenMP's stack at 128 KB."""
    code = ("import torch; from models import cpu_kernels; torch.set_num_threads(2)\n"
            "x = torch.randn(4, 8192, 8, 8).to(memory_format=torch.channels_last).requires_grad_()\n"
            "w, b = torch.ones(8192), torch.zeros(8192)\n"
            "assert cpu_kernels.usable(x, 32, w, b), cpu_kernels.prepare()\n"
            "cpu_kernels.group_norm_silu(x, 32, w, b, 1e-6).sum().backward(); print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_STACKSIZE": "128K"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_environment_wins_over_the_config_key(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ENV_ENABLED", False)
    cpu_kernels.set_enabled(True)  # what train.cpu_kernels=true asks for
    try:
        assert cpu_kernels.prepare().startswith("fused GroupNorm+SiLU CPU kernel: off")
    finally:
        monkeypatch.setattr(cpu_kernels, "ENV_ENABLED", True)
        cpu_kernels.set_enabled(True)
