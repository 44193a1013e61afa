"""The fused GroupNorm + SiLU CPU kernel (models/cpu_kernels.py): it equals torch's ops (forward and
backward, against fp64), it is what the model runs on channels_last fp32 CPU tensors and nowhere else,
and a missing compiler, a failed build, a damaged cached library, an unwritable cache or a kernel that
computes something else leave torch's ops running, with the reason in one line."""

import os
import shutil
import subprocess
import sys

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
    return float((a.double() - ref).abs().max() / ref.abs().max())


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
        assert cpu_kernels.usable(x, w, b), cpu_kernels.prepare()
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
    assert cpu_kernels.usable(x, w, b)
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
                assert not cpu_kernels.usable(x, norm.weight, norm.bias)
        elif case == "fp16":
            y = norm(x.half(), silu=True)  # fp32 statistics by construction, torch's ops, fp16 out
            assert y.dtype == torch.float16
            torch.testing.assert_close(y.float(), F.silu(F.group_norm(x, 32, norm.weight, norm.bias, 1e-6)),
                                       rtol=1e-2, atol=1e-2)
        else:
            assert not cpu_kernels.usable(x, norm.weight, norm.bias)
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


def test_an_unwritable_cache_builds_in_a_private_folder(fresh, monkeypatch):
    blocker = fresh / "afile"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VAE_HARNESS_CACHE", str(blocker))
    line = cpu_kernels.prepare()
    assert "on (" in line and "vae-harness-kernels-" in line


@pytest.mark.parametrize("cc, why", [("/bin/false", "could not build"), ("/nonexistent/cc", "does not run")])
def test_no_working_compiler_leaves_torchs_ops(fresh, monkeypatch, cc, why):
    monkeypatch.setenv("CC", cc)
    line = cpu_kernels.prepare()
    assert line.startswith("fused GroupNorm+SiLU CPU kernel unavailable, torch's ops run instead") and why in line
    x = nhwc(torch.randn(2, 64, 4, 4))
    norm = Normalize(64)
    assert not cpu_kernels.usable(x, norm.weight, norm.bias)
    torch.testing.assert_close(norm(x, silu=True), F.silu(norm(x)))


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
