"""A step without host syncs (optim.fused, no fp16 loss scaler, no DeepSpeed) and the stop vote.

On a GPU every `.item()`, `float(tensor)` or `bool(tensor)` in the step makes the host wait for the
device. They all reach the device through one op, `aten._local_scalar_dense`; these tests count it.
"""

import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from shardgen import make_shards
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harness import checkpoint as ckpt
from harness.ema import EMA
from harness.engine import DDPEngine, DeferredSkips, make_engine
from harness.signals import StopFlag, StopVote
from harness.trainer import Trainer
from launch.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=96, per_shard=12, size=40)


def args(shards, run, *extra):
    return ["--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}", *extra]


class CountSyncs(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (what blocks on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # The DataLoader draws its base seed from a CPU generator once, at the first batch: not a device read.
            self.n += not any("torch/utils/data/" in f.filename for f in traceback.extract_stack())
        return func(*args, **(kwargs or {}))


def syncs_per_step(monkeypatch, shards, run, *extra) -> tuple[int, int]:
    """(host reads inside train_step over the run, steps): train_step is the forward, backward,
    optimizer step and hooks of one step."""
    counter, steps = CountSyncs(), []
    real = Trainer.train_step

    def counted(self, batches, stats):
        with counter:
            real(self, batches, stats)
        steps.append(self.step)

    monkeypatch.setattr(Trainer, "train_step", counted)
    assert main(args(shards, run, "train.max_steps=6", "train.ema_decay=0.9", *extra)) == 0
    return counter.n, len(steps)


def test_a_fused_step_reads_nothing_back_from_the_device(monkeypatch, shards, tmp_path):
    host, steps = syncs_per_step(monkeypatch, shards, tmp_path / "host")
    assert steps == 6 and host >= steps  # the host-decided step reads the gradient norm every step
    deferred, _ = syncs_per_step(monkeypatch, shards, tmp_path / "fused", "optim.fused=true")
    assert deferred == 0


def test_fused_steps_decided_on_the_device_equal_those_decided_on_the_host(monkeypatch, shards, tmp_path):
    """Same weights, Adam moments and EMA, bitwise, whether the skip decision stays on the device or not."""
    common = ["optim.fused=true", "train.ema_decay=0.9", "checkpoint.every_steps=0", "train.max_steps=8"]
    assert main(args(shards, tmp_path / "device", *common)) == 0
    real_init = DDPEngine.__init__

    def host_decides(self, *a, **k):
        real_init(self, *a, **k)
        assert self.deferred
        self.deferred = False

    monkeypatch.setattr(DDPEngine, "__init__", host_decides)
    assert main(args(shards, tmp_path / "host", *common)) == 0
    a, b = (tmp_path / run / "checkpoints/step_8" for run in ("device", "host"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(p / "optimizer.bin", weights_only=True)["state"] for p in (a, b))
    assert all(torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"]) for k in oa)
    ea, eb = (torch.load(p / "custom_checkpoint_1.pkl", weights_only=True)["shadow"] for p in (a, b))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert ckpt.read_state(a)["totals"] == ckpt.read_state(b)["totals"]


GAN = ["loss.disc_weight=0.5", "loss.disc_start=2", "loss.lecam_weight=0.1", "loss.lecam_decay=0.9"]


def test_a_fused_step_with_a_discriminator_reads_nothing_back_either(monkeypatch, shards, tmp_path):
    host, steps = syncs_per_step(monkeypatch, shards, tmp_path / "host", *GAN)
    assert steps == 6 and host >= steps + 2 * 4  # + D's norm and LeCAM's two means in the 4 judged steps
    deferred, _ = syncs_per_step(monkeypatch, shards, tmp_path / "fused", "optim.fused=true", *GAN)
    assert deferred == 0


def test_a_discriminator_step_decided_on_the_device_equals_the_host_decision(monkeypatch, shards, tmp_path):
    """With a non-finite discriminator loss at one step: the same autoencoder, discriminator (weights,
    moments, LeCAM EMAs) and totals, bitwise, whether D's skip is decided on the device or the host."""
    from test_discriminator import disc_state

    from harness import discriminator

    hinge, calls = discriminator.D_LOSSES["hinge"], []

    def nan_at_the_third(real, fake):
        calls.append(1)
        loss = hinge(real, fake)
        return loss * float("nan") if len(calls) == 3 else loss  # step 5 (D judges from step 3)

    monkeypatch.setitem(discriminator.D_LOSSES, "hinge", nan_at_the_third)
    common = ["optim.fused=true", "checkpoint.every_steps=0", "train.max_steps=8", "log.every_steps=4", *GAN]
    assert main(args(shards, tmp_path / "device", *common)) == 0
    real_init = DDPEngine.__init__

    def host_decides(self, *a, **k):
        real_init(self, *a, **k)
        self.deferred = False

    monkeypatch.setattr(DDPEngine, "__init__", host_decides)
    calls.clear()
    assert main(args(shards, tmp_path / "host", *common)) == 0
    a, b = (tmp_path / run / "checkpoints/step_8" for run in ("device", "host"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    da, db = disc_state(a), disc_state(b)
    assert all(torch.equal(da["model"][k], db["model"][k]) for k in da["model"])
    assert torch.equal(da["lecam_ema"], db["lecam_ema"]) and da["lecam_ema"].abs().sum() > 0
    sa, sb = (list(d["optimizer"]["state"].values()) for d in (da, db))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(sa, sb, strict=True) for k in x)  # moments, step count
    totals = ckpt.read_state(a)["totals"]
    assert totals == ckpt.read_state(b)["totals"] and totals["nonfinite_disc_steps"] == 1
    assert "steps to 8: 1 non-finite discriminator step(s) skipped" in (tmp_path / "device/train.log").read_text()


def test_deferred_nonfinite_steps_are_skipped_then_stop_the_run_at_the_log(shards, tmp_path, monkeypatch, capsys):
    from test_train import nan_loss_at_step_3_and_from_6

    nan_loss_at_step_3_and_from_6(monkeypatch)
    run = tmp_path / "run"
    assert main(args(shards, run, "optim.fused=true", "train.max_nonfinite=3", "train.max_steps=20",
                     "log.every_steps=4", "checkpoint.every_steps=0")) == 1
    err = capsys.readouterr().err
    assert "steps to 4: 1 non-finite (loss or gradients) skipped, at most 1 in a row" in err
    assert "loss was not finite for 3 steps in a row (train.max_nonfinite, read at the log)" in err


def test_the_engine_skips_a_nonfinite_step_on_the_device():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    acc = Accelerator(cpu=True)
    engine = make_engine(acc, *acc.prepare(model, opt), grad_clip=1.0, grad_accum=1)
    assert isinstance(engine, DDPEngine) and engine.deferred
    x = torch.randn(8, 4)

    def state():
        inner = engine.optimizer.optimizer
        moments = [t.clone() for s in inner.state.values() for k, t in sorted(s.items())]
        return [p.detach().clone() for p in model.parameters()] + moments

    engine.backward(engine.model(x).square().mean())
    first = engine.step()
    assert first.deferred and bool(first.finite) and float(first.grad_norm) > 0
    before = state()
    engine.backward(engine.model(x).square().mean() * float("nan"))
    out = engine.step()
    assert out.deferred and not bool(out.finite) and float(out.grad_norm) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, state(), strict=True))  # weights, moments, step count
    engine.backward(engine.model(x).square().mean())
    engine.step()
    assert not torch.equal(before[0], state()[0])  # and a finite step after it moves again


def test_deferred_skips_count_runs_on_the_device():
    skips = DeferredSkips()
    for finite in [True, False, False, True, False]:
        skips.add(torch.tensor(finite))
    assert skips.read() == (3, 2, 1)  # skipped, most in a row, in a row now
    skips.add(torch.tensor(False))
    skips.add(torch.tensor(False))
    assert skips.read() == (2, 3, 3)  # a run across reads keeps counting
    skips.add(torch.tensor(True))
    assert skips.read() == (0, 3, 0)


def test_ema_with_a_device_flag_equals_the_host_update_and_holds_on_a_skip():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    a, b = EMA(model, 0.9), EMA(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    a.update(model)
    b.update(model, applied=torch.tensor(True))
    assert all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
    held = {k: v.clone() for k, v in b.shadow.items()}
    b.update(model, applied=torch.tensor(False))
    assert all(torch.equal(held[k], b.shadow[k]) for k in held)


def _vote_worker(rank: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    flag = StopFlag()
    vote = StopVote(flag)
    agreed_at = None
    for step in range(10):
        if rank == 1 and step == 3:
            flag.signum = 10  # rank 1 alone is signalled during step 3
        if vote():
            agreed_at = step
            break
    vote.close()
    Path(out, f"{rank}").write_text(str(agreed_at))
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_ranks_stop_at_the_same_step_one_after_the_signal(tmp_path):
    torch.multiprocessing.spawn(_vote_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                                join=True)
    assert [(tmp_path / f"{r}").read_text() for r in (0, 1)] == ["4", "4"]


def test_one_process_stops_at_once():
    assert not (dist.is_available() and dist.is_initialized())
    flag = StopFlag()
    vote = StopVote(flag)
    assert not vote()
    flag.signum = 15
    assert vote()
    vote.close()



def test_tf32_is_left_alone_off_cuda():
    from harness import scale

    before = torch.get_float32_matmul_precision()
    scale.set_tf32(torch.device("cpu"), True)
    assert torch.get_float32_matmul_precision() == before


def test_fused_under_deepspeed_is_refused_in_one_line(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a ZeRO config sets
    assert main(args(shards, tmp_path / "run", "optim.fused=true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("optim.fused=true is for DDP and one process: DeepSpeed steps its own optimizer "
                            "partitions and decides skips on the host; leave it false under DeepSpeed"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fused", ["false", "true"])
def test_one_nan_reconstruction_does_not_end_the_discriminator(monkeypatch, shards, tmp_path, fused):
    """A NaN reconstruction at one step (the autoencoder skips it; so does D) is kept out of LeCAM's
    EMAs: folded in, both anchors stayed NaN and D skipped every later step, silently frozen."""
    from test_discriminator import disc_state

    from harness.losses import AutoencoderLoss

    forward, calls = AutoencoderLoss.forward, []

    def nan_recon_at_the_fourth(self, x, out):
        calls.append(1)
        if len(calls) == 4:
            out.recon = out.recon * float("nan")  # an overflow in the decoder, once
        return forward(self, x, out)

    monkeypatch.setattr(AutoencoderLoss, "forward", nan_recon_at_the_fourth)
    run = tmp_path / "run"
    assert main(args(shards, run, f"optim.fused={fused}", "checkpoint.every_steps=0", "train.max_steps=8",
                     "log.every_steps=4", *GAN)) == 0
    d = disc_state(run / "checkpoints/step_8")
    assert torch.isfinite(d["lecam_ema"]).all() and d["lecam_ema"].abs().sum() > 0
    totals = ckpt.read_state(run / "checkpoints/step_8")["totals"]
    assert totals["nonfinite_steps"] == 1 and totals.get("nonfinite_disc_steps", 0) == 0, totals


def test_an_fp16_overflow_is_counted_with_a_fused_adamw_too():
    """GradScaler calls a fused optimizer's step even on an overflow (handing it found_inf), so
    accelerate's step_was_skipped stays False: the non-finite norm under a scaler is the overflow."""
    from types import SimpleNamespace

    from harness.engine import DDPEngine

    class Opt:
        step_was_skipped = False  # what accelerate reports when the (fused) step was called

        def step(self):
            pass

        def zero_grad(self, set_to_none=True):
            pass

    engine = object.__new__(DDPEngine)
    engine.deferred, engine.grad_clip, engine.optimizer, engine.model = False, 1.0, Opt(), torch.nn.Linear(1, 1)
    inf = lambda params, clip: torch.tensor(float("inf"))  # noqa: E731
    engine.accelerator = SimpleNamespace(clip_grad_norm_=inf, scaler=object())  # any scaler
    outcome = engine.step()
    assert outcome.overflow and not outcome.finite
    engine.accelerator.scaler = None  # no scaler: no overflow (the trainer counts a non-finite step)
    assert not engine.step().overflow
