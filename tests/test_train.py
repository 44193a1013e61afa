"""The training loop end to end, on CPU, through `main([...])` and real subprocesses."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shardgen import make_shards

from harness import checkpoint as ckpt
from launch.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=96, per_shard=12, size=40)


@pytest.fixture(scope="module")
def config():
    return ROOT / "tests/configs/tiny.yaml"


def args(config, shards, run, *extra):
    return ["--config", str(config), f"data.train={shards}", f"run.dir={run}", *extra]


def logged(run: Path, key: str) -> list[float]:
    """Values of one scalar from the text log (`step N key=value ...` lines)."""
    out = []
    for line in (run / "train.log").read_text().splitlines():
        for word in line.split():
            if word.startswith(key + "="):
                out.append(float(word.split("=", 1)[1]))
    return out


@pytest.mark.slow
def test_end_to_end_loss_falls_and_run_folder_is_complete(config, shards, tmp_path):
    run = tmp_path / "run"
    assert main(args(config, shards, run, "train.max_steps=80", "checkpoint.every_steps=40",
                     "log.images_every_steps=40")) == 0
    recon = logged(run, "loss/recon")
    assert len(recon) == 40
    assert sum(recon[-5:]) / 5 < 0.75 * sum(recon[:3]) / 3, f"reconstruction loss did not fall: {recon}"
    assert (run / "config.yaml").is_file() and list((run / "tb").glob("events.out.tfevents.*"))
    pngs = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert "reconstruction_step0000040.png" in pngs and "prior_samples_step0000080.png" in pngs
    assert (run / "latest").read_text().strip() == "checkpoints/step_80"
    state = ckpt.read_state(run / "checkpoints/step_80")
    assert state["step"] == 80 and state["samples_seen"] == 80 * 4
    # TensorBoard has every term and the harness's own numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("loss/recon", "loss/kl", "train/lr", "train/grad_norm", "train/images_per_s",
                "train/data_wait_share", "train/bad_samples", "system/peak_memory_gib"):
        assert tag in tags, tag
    assert {"reconstruction", "prior_samples"} <= set(ea.Tags()["images"])


def test_exact_resume_is_bitwise(config, shards, tmp_path):
    common = ["train.ema_decay=0.9", "model.dropout=0.1", "checkpoint.every_steps=0", "train.max_steps=12"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(config, shards, straight, *common)) == 0
    assert main(args(config, shards, split, *common, "train.stop_after_steps=6")) == 0
    assert ckpt.read_state(ckpt.resolve(split, "latest"))["step"] == 6
    assert main(args(config, shards, split, *common, "--resume", "latest")) == 0
    a, b = straight / "checkpoints/step_12", split / "checkpoints/step_12"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    oa = torch.load(a / "optimizer.bin", weights_only=True)
    ob = torch.load(b / "optimizer.bin", weights_only=True)
    for k, v in oa["state"].items():
        assert torch.equal(v["exp_avg_sq"], ob["state"][k]["exp_avg_sq"])
    ema_a = torch.load(a / "custom_checkpoint_1.pkl", weights_only=True)["shadow"]
    ema_b = torch.load(b / "custom_checkpoint_1.pkl", weights_only=True)["shadow"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_resume_refuses_a_different_model_and_fresh_start_refuses_used_folder(config, shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(args(config, shards, run, "train.max_steps=2")) == 0
    capsys.readouterr()
    assert main(args(config, shards, run, "train.max_steps=4", "model.z_channels=8", "--resume", "latest")) == 2
    assert "model config differs (z_channels: 4 -> 8)" in capsys.readouterr().err
    assert main(args(config, shards, run, "train.max_steps=4")) == 2
    assert "already has checkpoints: pass --resume latest" in capsys.readouterr().err
    assert main(args(config, shards, run, "train.max_steps=4", "train.ema_decay=0.99", "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert "trained without an EMA of the weights (train.ema_decay=0.0)" in err and len(err.strip().splitlines()) == 1
    # and nothing was lost
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 2


def test_a_checkpoint_from_before_a_new_model_key_still_resumes(config, shards, tmp_path, capsys):
    """A model key added to the schema since a checkpoint was written holds its default: no difference."""
    import yaml

    run = tmp_path / "run"
    assert main(args(config, shards, run, "train.max_steps=2")) == 0
    step = ckpt.resolve(run, "latest")
    saved = yaml.safe_load((step / ckpt.CONFIG_NAME).read_text())
    added = [k for k in saved["model"] if k.startswith("prior_")]
    assert added
    for k in added:  # as written before these keys existed
        del saved["model"][k]
    (step / ckpt.CONFIG_NAME).write_text(yaml.safe_dump(saved, sort_keys=False))
    state = ckpt.read_state(step)
    (step / ckpt.STATE_NAME).write_text(json.dumps({**state, "model_hash": "from-an-older-schema"}))
    ckpt.write_manifest(step)
    assert main(args(config, shards, run, "train.max_steps=3", "--resume", "latest")) == 0
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3
    # a key the old config has with another value is still a different model
    saved["model"]["z_channels"] = 8
    (step / ckpt.CONFIG_NAME).write_text(yaml.safe_dump(saved, sort_keys=False))
    ckpt.write_manifest(step)
    capsys.readouterr()
    assert main(args(config, shards, run, "train.max_steps=4", "--resume", str(step))) == 2
    assert "model config differs (z_channels: 8 -> 4)" in capsys.readouterr().err


class ModelCheckpoint:
    """Pickled like PyTorch Lightning's callback inside latent-diffusion / SD `.ckpt` files."""

    def __init__(self):
        self.monitor, self.best_model_path = "val/rec_loss", "/somewhere/epoch=3.ckpt"


def lightning_checkpoint(path: Path, weights: dict, monkeypatch) -> Path:
    """A latent-diffusion checkpoint as Lightning writes it: the autoencoder under
    first_stage_model., beside the diffusion model, the loss (LPIPS, discriminator), LitEma's
    counters, and callback objects (the class itself as a dict key, as older Lightning did)."""
    import types

    name = "pytorch_lightning.callbacks.model_checkpoint"
    for i, part in enumerate(name.split(".")):
        monkeypatch.setitem(sys.modules, ".".join(name.split(".")[: i + 1]), types.ModuleType(part))
    monkeypatch.setattr(ModelCheckpoint, "__module__", name)
    monkeypatch.setattr(sys.modules[name], "ModelCheckpoint", ModelCheckpoint, raising=False)
    state = {**{f"first_stage_model.{k}": v for k, v in weights.items()},
             "first_stage_model.loss.discriminator.main.0.weight": torch.ones(2),
             "first_stage_model.model_ema.decay": torch.tensor(0.9999),
             "first_stage_model.model_ema.num_updates": torch.tensor(840000),
             "model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)}
    torch.save({"epoch": 3, "global_step": 840000, "state_dict": state, "hparams": ModelCheckpoint(),
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}}}, path)
    return path


def test_init_from_starts_a_new_run_from_trained_or_latent_diffusion_weights(config, shards, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from harness.config import load_config
    from harness.inference import state_dict_of
    from harness.trainer import Trainer

    src = tmp_path / "src"
    assert main(args(config, shards, src, "train.max_steps=3")) == 0
    trained = state_dict_of(ckpt.resolve(src, "latest"))
    ldm = lightning_checkpoint(tmp_path / "sd.ckpt", trained, monkeypatch)
    with pytest.raises(Exception, match="Unsupported global"):  # what plain weights_only makes of it
        torch.load(ldm, weights_only=True)
    half = tmp_path / "vae-fp16.safetensors"  # SD VAEs are often shared in fp16
    save_file({k: v.half() if v.is_floating_point() else v for k, v in trained.items()}, half)
    expected = {src: trained, ldm: trained, half: {k: v.half().float() if v.is_floating_point() else v
                                                   for k, v in trained.items()}}
    for source, weights in expected.items():
        run = tmp_path / f"from-{source.name}"
        trainer = Trainer(load_config([config], [f"data.train={shards}", f"run.dir={run}",
                                                 f"train.init_from={source}"]))
        try:
            started = trainer.engine.unwrapped().state_dict()
        finally:
            trainer.monitor.close()
            trainer.log.close()
        assert started.keys() == weights.keys()
        assert all(torch.equal(started[k], weights[k]) for k in weights), source
        # the log names what was loaded: a run folder's checkpoint, not the folder
        where = ckpt.resolve(src, "latest").resolve() if source == src else source.resolve()
        assert f"initialised {len(weights)} tensors from {where}" in (run / "train.log").read_text()
        # and through launch/train.py, to a checkpoint
        assert main(args(config, shards, run, "train.max_steps=1", f"train.init_from={source}")) == 0
    # A resumed run continues from its own checkpoint; init_from no longer matters.
    run = tmp_path / f"from-{src.name}"
    assert main(args(config, shards, run, "train.max_steps=2", f"train.init_from={tmp_path / 'gone'}",
                     "--resume", "latest")) == 0
    assert "train.init_from ignored: resuming from" in (run / "train.log").read_text()


def test_init_from_that_does_not_fit_is_one_line_and_starts_nothing(config, shards, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    assert main(args(config, shards, src, "train.max_steps=1", "model.ch=8")) == 0
    capsys.readouterr()
    # a checkpoint folder changed since it was written (its manifest no longer verifies)
    broken = tmp_path / "broken" / "step_1"
    shutil.copytree(ckpt.resolve(src, "latest"), broken)
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model").mkdir()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rnd = tmp_path / "random.bin"  # torch's own message would advise loading it with weights_only=False
    rnd.write_bytes(bytes(range(256)) * 8)
    numbered = tmp_path / "numbered.pt"  # a state dict keyed by ints: was an AttributeError on `.startswith`
    torch.save({1: torch.zeros(1)}, numbered)
    listed = tmp_path / "listed.pth"
    torch.save([torch.zeros(1)], listed)
    for source, says in [(src, "the weights do not fit this model config: 98 of another shape "
                               "(e.g. encoder.conv_in.weight "
                               "(8, 3, 3, 3) vs model (16, 3, 3, 3))"),
                         (tmp_path / "missing.safetensors", "no such weights file or folder"),
                         (config, "expected a run, checkpoint or export folder, or a .safetensors"),
                         (broken, "the checkpoint fails verification (model.safetensors is missing)"),
                         (bad, f"{bad}: cannot read weights (not a torch checkpoint file: "),
                         (rnd, f"{rnd}: cannot read weights (not a torch checkpoint file: "),
                         (numbered, f"{numbered}: not a state dict of tensors (key 1 of type int, not a name)"),
                         (listed, f"{listed}: holds a list, not a state dict of tensors")]:
        run = tmp_path / "run"
        assert main(args(config, shards, run, "train.max_steps=1", f"train.init_from={source}")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and err[0].startswith("error: train.init_from: "), err
        assert not ckpt.list_checkpoints(run)


def nan_loss_at_step_3_and_from_6(monkeypatch) -> None:
    """The autoencoder's total loss is NaN in the 3rd call and from the 6th on (one process, grad_accum 1)."""
    from harness.losses import AutoencoderLoss

    real = AutoencoderLoss.forward
    calls = {"n": 0}

    def sometimes_nan(self, x, out):
        calls["n"] += 1
        terms = real(self, x, out)
        if calls["n"] in (3,) or calls["n"] >= 6:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(AutoencoderLoss, "forward", sometimes_nan)


def test_nonfinite_losses_are_skipped_then_stop_the_run(config, shards, tmp_path, monkeypatch, capsys):
    nan_loss_at_step_3_and_from_6(monkeypatch)
    run = tmp_path / "run"
    assert main(args(config, shards, run, "train.max_nonfinite=3", "train.max_steps=20")) == 1
    err = capsys.readouterr().err
    assert "loss was not finite for 3 steps in a row" in err
    assert "step 3: non-finite loss or gradients, step skipped (1 in a row)" in err


def test_too_many_bad_samples_stop_the_run(tmp_path, config, capsys):
    import webdataset as wds
    from shardgen import image_bytes

    from shards.index import write_index

    out = tmp_path / "bad"
    out.mkdir()
    with wds.TarWriter(str(out / "000000.tar")) as w:
        for i in range(40):
            w.write({"__key__": f"k{i}", "jpg": image_bytes(i) if i % 2 else b"garbage", "cls": "0"})
    write_index(out, source={"kind": "test"}, shards=[{"name": "000000.tar", "num_samples": 40}])
    run = tmp_path / "run"
    code = main(args(config, out, run, "data.min_bad_samples=4", "data.max_bad_fraction=0.2", "train.max_steps=20"))
    assert code == 1
    assert "exceed data.max_bad_fraction=0.2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Real processes: signals and kill -9
# ------------------------------------------------------------------------------------------------


def spawn(config, shards, run, *extra, env=None, **popen):
    # PYTHONFAULTHANDLER: a trainer that hangs is sent SIGABRT by `finish` and prints every thread's stack
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", **(env or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "launch/train.py"), *args(config, shards, run, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e, **popen)


def finish(proc, timeout: float) -> str:
    """The spawned trainer's output once it has ended; if it has not within `timeout`, its stacks (SIGABRT:
    faulthandler) and the rest of its output in the failure, not a bare TimeoutExpired."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
        raise AssertionError(f"trainer still running after {timeout} s; its stacks and output:\n{out}") from None


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_75_then_resume_continues(config, shards, tmp_path):
    run = tmp_path / "run"
    proc = spawn(config, shards, run, "train.max_steps=100000", "checkpoint.every_steps=0")
    wait_for(lambda: (run / "train.log").is_file() and "step 4 " in (run / "train.log").read_text(), proc)
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc, 120)
    assert proc.returncode == 75, out
    step = ckpt.read_state(ckpt.resolve(run, "latest"))["step"]
    assert step >= 4 and f"checkpoint at step {step} saved" in out
    assert (run / "preempted").read_text() == f"SIGUSR1: checkpoint at step {step}\n"  # what sbatch requeues on
    assert main(args(config, shards, run, f"train.max_steps={step + 2}", "checkpoint.every_steps=0",
                     "--resume", "latest")) == 0
    assert not (run / "preempted").exists()
    assert f"resuming from {run}/checkpoints/step_{step} at step {step}/" in (run / "train.log").read_text()
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == step + 2


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130_a_second_one_at_once_in_one_line(config, shards, tmp_path):
    """A first Ctrl-C (the whole process group: loader workers too) is a stop with a checkpoint; a second
    one during that save stops at once, the save left unfinished, saying so in one line."""
    run, log = tmp_path / "run", tmp_path / "run" / "train.log"
    proc = spawn(config, shards, run, "train.max_steps=100000", "checkpoint.every_steps=0", "data.num_workers=2",
                 process_group=0)  # a group of its own, as a terminal's job: Ctrl-C signals all of it
    wait_for(lambda: log.is_file() and "step 4 " in log.read_text(), proc)
    os.killpg(proc.pid, signal.SIGINT)
    out = finish(proc, 120)
    step = ckpt.read_state(ckpt.resolve(run, "latest"))["step"]
    assert proc.returncode == 130 and f"checkpoint at step {step} saved, exiting with 130" in out, out
    assert "Traceback" not in out and "Ctrl-C again: exit now" in out

    proc = spawn(config, shards, run, "train.max_steps=100000", "checkpoint.every_steps=0", "--resume", "latest",
                 env={"HARNESS_CRASH_TEST_PAUSE": "written:30"})  # the stop's save, held
    wait_for(lambda: max(map(int, re.findall(r"\] step (\d+) ", log.read_text()))) > step, proc)  # training again
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: any((run / "checkpoints").glob(".tmp-step_*/trainer_state.json")), proc)
    proc.send_signal(signal.SIGINT)
    out = finish(proc, 60)
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert out.strip().splitlines()[-1] == ("interrupted: stopped without a checkpoint of this step; the saved ones "
                                            "are intact (--resume latest continues from the newest)")
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == step  # the unfinished save is not taken


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["written", "renamed", "pruning"])
def test_kill_9_while_saving_never_loses_the_last_checkpoint(config, shards, tmp_path, stage):
    """Hold a save at one stage (HARNESS_CRASH_TEST_PAUSE), kill -9 there, then resume."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    proc = spawn(config, shards, run, "train.max_steps=100000", "checkpoint.every_steps=2", "checkpoint.keep_last=1",
                 env={"HARNESS_CRASH_TEST_PAUSE": f"{stage}:30"})
    in_stage = {
        # save 1, before the rename
        "written": lambda: any((p / ckpt.STATE_NAME).exists() for p in root.glob(".tmp-step_*")),
        "renamed": lambda: (root / "step_2").exists() and not (run / "latest").exists(),  # save 1, before `latest`
        "pruning": lambda: any(root.glob(".trash-step_*")),  # save 2, deleting step_2
    }[stage]
    wait_for(lambda: root.is_dir() and in_stage(), proc)
    proc.kill()
    proc.wait()
    found = ckpt.resolve(run, "latest")
    # the partial save is invisible; a renamed one is complete even before `latest` names it
    expected = {"written": None, "renamed": "step_2", "pruning": "step_4"}[stage]
    assert (found.name if found else None) == expected and (found is None or ckpt.is_complete(found))
    before = ckpt.read_state(found)["step"] if found else 0
    assert main(args(config, shards, run, "train.max_steps=100000", "checkpoint.every_steps=0",
                     "train.stop_after_steps=1", "--resume", "latest")) == 0
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".trash-*"))  # leftovers cleaned
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == before + 1


def test_a_changed_lr_at_resume_is_followed_and_said(config, shards, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["checkpoint.every_steps=0", "train.max_steps=8", "optim.schedule=constant"]
    assert main(args(config, shards, run, *common, "train.stop_after_steps=4")) == 0
    capsys.readouterr()
    assert main(args(config, shards, run, *common, "optim.lr=1e-3", "--resume", "latest")) == 0
    err = capsys.readouterr().err
    assert "note: optim.lr is 0.001, the checkpoint's was 0.004: the schedule goes on from step 4" in err
    sched = torch.load(run / "checkpoints/step_8/custom_checkpoint_0.pkl", weights_only=True)
    assert sched["base_lrs"] == [1e-3] and sched["_last_lr"] == [1e-3]
    assert logged(run, "train/lr")[-1] == pytest.approx(1e-3)
    assert main(args(config, shards, run, *common, "train.max_steps=10", "--resume", "latest",
                     "optim.lr=1e-3")) == 0
    assert "note: optim.lr" not in capsys.readouterr().err  # unchanged: nothing to say


def test_changed_adamw_settings_at_resume_are_followed_and_said(config, shards, tmp_path, capsys):
    """The optimizer's state holds its betas, eps and weight decay: without care the checkpoint's win
    over the config at a resume, while config.yaml records the config's."""
    run = tmp_path / "run"
    common = ["checkpoint.every_steps=0", "train.max_steps=4"]
    assert main(args(config, shards, run, *common, "train.stop_after_steps=2")) == 0
    capsys.readouterr()
    changed = ["optim.betas=[0.5,0.6]", "optim.eps=0.001", "optim.weight_decay=0.25"]
    assert main(args(config, shards, run, *common, *changed, "--resume", "latest")) == 0
    assert ("note: optim.betas is [0.5, 0.6] (the checkpoint's [0.9, 0.999]), optim.eps is 0.001 (the checkpoint's "
            "1e-08), optim.weight_decay is 0.25 (the checkpoint's 0): used from here on") in capsys.readouterr().err
    saved = torch.load(run / "checkpoints/step_4/optimizer.bin", weights_only=True)["param_groups"]
    assert all(tuple(g["betas"]) == (0.5, 0.6) and g["eps"] == 0.001 and g["weight_decay"] == 0.25 for g in saved)
    assert main(args(config, shards, run, *common, *changed, "train.max_steps=5", "--resume", "latest")) == 0
    assert "note: optim." not in capsys.readouterr().err  # the same again: nothing to say


@pytest.mark.parametrize("first, then", [("false", "true"), ("true", "false")])
def test_optim_fused_switched_at_resume_follows_the_config_for_both_optimizers(config, shards, tmp_path, capsys,
                                                                              first, then):
    """The optimizer's state brought its fused flag back: switched on at a resume, the step (which defers its
    skips to a fused AdamW) failed at once with a traceback; switched off, both AdamWs stayed fused."""
    run = tmp_path / "run"
    common = ["checkpoint.every_steps=0", "train.max_steps=4", "loss.disc_weight=0.5", "loss.disc_start=1"]
    assert main(args(config, shards, run, *common, f"optim.fused={first}", "train.stop_after_steps=2")) == 0
    capsys.readouterr()
    assert main(args(config, shards, run, *common, f"optim.fused={then}", "--resume", "latest")) == 0
    assert (f"note: optim.fused is {then} (the checkpoint's {first}): used from here on"
            in capsys.readouterr().err)
    root = run / "checkpoints/step_4"
    groups = [*torch.load(root / "optimizer.bin", weights_only=True)["param_groups"],
              *torch.load(root / "custom_checkpoint_1.pkl", weights_only=True)["optimizer"]["param_groups"]]
    assert [bool(g["fused"]) for g in groups] == [then == "true"] * len(groups)


def test_a_changed_logvar_init_at_resume_is_said_to_be_unused(config, shards, tmp_path, capsys):
    """It was noted as "used from here on", while the learned logvar comes from the checkpoint."""
    run = tmp_path / "run"
    common = ["checkpoint.every_steps=0", "train.max_steps=4", "loss.learned_logvar=true"]
    assert main(args(config, shards, run, *common, "train.stop_after_steps=2")) == 0
    capsys.readouterr()
    assert main(args(config, shards, run, *common, "loss.logvar_init=-3", "--resume", "latest")) == 0
    err = capsys.readouterr().err
    assert ("note: loss.logvar_init 0.0 -> -3.0: a starting value, not used by a resumed run (the checkpoint's "
            "learned value goes on)") in err and "the loss differs" not in err


def test_a_resume_after_a_crash_hides_what_the_lost_steps_logged(config, shards, tmp_path):
    """A crash after the last checkpoint: the resumed run logs those steps again, and TensorBoard shows
    each step once (the writer purges the earlier attempt's events from the resume step on)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = ["train.max_steps=10", "log.every_steps=2", "checkpoint.every_steps=6", "log.images_every_steps=4"]
    assert main(args(config, shards, run, *common)) == 0
    shutil.rmtree(run / "checkpoints/step_10")  # as if killed after step 10 was logged, before it was saved
    (run / "latest").write_text("checkpoints/step_6\n")
    time.sleep(1.1)  # a new event file (their names carry the second)
    assert main(args(config, shards, run, *common, "--resume", "latest")) == 0
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("loss/recon")]
    assert steps == [2, 4, 6, 8, 10], steps
    assert [e.step for e in ea.Images("reconstruction")] == [4, 8, 10], "images logged twice"  # 10: the last step
    texts = [e.step for e in ea.Tensors("config/text_summary")]
    assert texts == [0, 6], texts  # the config as started, and as resumed


def test_images_per_s_is_the_steps_own_rate_not_the_saves(config, shards, tmp_path, monkeypatch):
    """A save (held 2 s here), a grid or a validation between two logs made train/images_per_s read as a
    throughput collapse for that interval (7 against 95 beside a 4 s save)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = ["train.max_steps=6", "log.every_steps=2", "checkpoint.every_steps=4", "log.images_every_steps=0"]
    monkeypatch.setenv("HARNESS_CRASH_TEST_PAUSE", "written:2")  # inside each save
    assert main(args(config, shards, run, *common)) == 0
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    rate = {e.step: e.value for e in ea.Scalars("train/images_per_s")}
    assert sorted(rate) == [2, 4, 6]
    # steps 5-6 came after the save at step 4: 2 steps x batch 4 in well under the save's 2 s (with it: under
    # 4 img/s, against ~100; a step right after a save can be twice as slow on a busy machine)
    assert rate[6] > 0.2 * rate[4] and rate[6] > 2 * 4 / 2, rate


def test_start_notes_fp32_under_a_deepspeed_yaml_left_at_auto():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from harness.config import load_config
    from harness.monitor import precision_notes

    cfg = load_config([], ["data.train=x"])

    def trainer(kind, precision, device):
        return SimpleNamespace(accelerator=SimpleNamespace(distributed_type=kind, mixed_precision=precision),
                               device=torch.device(device), cfg=cfg)

    assert precision_notes(trainer(DistributedType.MULTI_GPU, "no", "cuda")) == []
    (note,) = precision_notes(trainer(DistributedType.DEEPSPEED, "no", "cuda"))
    assert note.startswith("training in fp32 under DeepSpeed")
    assert precision_notes(trainer(DistributedType.DEEPSPEED, "bf16", "cuda")) == []
    cfg.train.mixed_precision = "no"  # fp32 asked for
    assert precision_notes(trainer(DistributedType.DEEPSPEED, "no", "cuda")) == []


def test_epoch_counts_samples_and_continues_across_a_batch_size_change(config, shards, tmp_path):
    """train/epoch is samples seen over an epoch's samples: a resume with another batch size (or process
    count) goes on from where it was, where steps * accumulation / batches per epoch would jump."""
    run = tmp_path / "run"
    common = ["data.epoch_samples=48", "data.num_workers=0", "log.every_steps=2", "checkpoint.every_steps=4"]
    assert main(args(config, shards, run, *common, "train.batch_size=4", "train.max_steps=4")) == 0
    assert main(args(config, shards, run, *common, "train.batch_size=8", "train.max_steps=6",
                     "--resume", "latest")) == 0
    epochs = logged(run, "train/epoch")
    assert epochs == pytest.approx([8 / 48, 16 / 48, (16 + 16) / 48], abs=1e-4), epochs  # (the log keeps 5 digits)


def test_channels_last_is_a_layout_not_a_different_model(config, shards, tmp_path):
    """train.channels_last (default) trains on NHWC batches (the convolutions follow them; weights stay as
    built: DeepSpeed's broadcast cannot take NHWC parameters); false makes them contiguous NCHW. The same
    steps either way, to float rounding, and the checkpoints hold the same tensors."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from harness.inference import state_dict_of

    def nhwc(t):
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    layouts, weights, losses = {}, {}, {}
    for flag in ("true", "false"):
        seen = []

        def first_conv(module, inputs, into=seen):
            if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3 and module.training:
                into.append((nhwc(module.weight), nhwc(inputs[0])))

        hook = register_module_forward_pre_hook(first_conv)
        try:
            run = tmp_path / f"cl-{flag}"
            assert main(args(config, shards, run, "train.max_steps=3", f"train.channels_last={flag}",
                             "model.attn_type=vanilla", "log.images_every_steps=0")) == 0
        finally:
            hook.remove()
        layouts[flag] = set(seen)
        weights[flag] = state_dict_of(ckpt.resolve(run, "latest"))
        losses[flag] = logged(run, "loss/total") + logged(run, "train/grad_norm")
    assert layouts == {"true": {(False, True)}, "false": {(False, False)}}, layouts
    # (weights after Adam steps are no test: Adam turns the rounding noise of a zero gradient, e.g. the
    # key bias's in attention, into whole lr-sized steps)
    assert len(losses["true"]) == 4 and losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    assert {k: v.shape for k, v in weights["true"].items()} == {k: v.shape for k, v in weights["false"].items()}


def test_channels_last_auto_is_nhwc_but_on_cpu_computing_in_bf16():
    from harness.data import use_channels_last

    assert [use_channels_last("auto", "cpu", p) for p in ("no", "bf16", "fp16")] == [True, False, True]
    assert [use_channels_last("auto", "cuda", p) for p in ("no", "bf16", "fp16")] == [True, True, True]
    for device, precision in (("cpu", "no"), ("cpu", "bf16"), ("cuda", "fp16")):  # as given, wherever
        assert use_channels_last(True, device, precision) is True
        assert use_channels_last(False, device, precision) is False


def test_channels_last_auto_trains_cpu_bf16_on_nchw_batches(config, shards, tmp_path, fresh_accelerate_state):
    """Under bf16 autocast on CPU torch's NCHW convolutions and GroupNorm are the faster ones (our step 1.08-1.32x
    faster NCHW): train.channels_last=auto (default) gives NCHW batches there and says so; true still NHWC.
    accelerate's fp16 on a CPU computes in fp32 (no autocast there): NHWC, where the fused kernel runs."""
    from accelerate.state import AcceleratorState
    from torch.nn.modules.module import register_module_forward_pre_hook

    seen = {}
    for precision, flag in (("bf16", "auto"), ("bf16", "true"), ("fp16", "auto")):
        AcceleratorState._reset_state(reset_partial_state=True)  # a precision is fixed by the first Accelerator
        layouts = seen[precision, flag] = set()

        def first_conv(module, inputs, into=layouts):
            if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3 and module.training:
                into.add(inputs[0].is_contiguous(memory_format=torch.channels_last) and not inputs[0].is_contiguous())

        hook = register_module_forward_pre_hook(first_conv)
        try:
            run = tmp_path / f"{precision}-{flag}"
            assert main(args(config, shards, run, "train.max_steps=2", f"train.mixed_precision={precision}",
                             f"train.channels_last={flag}", "log.images_every_steps=0")) == 0
        finally:
            hook.remove()
        log = (run / "train.log").read_text()
        layout = "NCHW" if (precision, flag) == ("bf16", "auto") else "NHWC"
        assert f"(NO, {precision}), {layout} batches," in log, log
    assert seen == {("bf16", "auto"): {False}, ("bf16", "true"): {True}, ("fp16", "auto"): {True}}, seen


def test_a_resume_with_another_grad_accum_trains_every_step(config, shards, tmp_path):
    """accelerate restores its micro-step count; with another train.grad_accum its accumulation boundary
    (`count % grad_accum == 0`) fell mid-step: 1 -> 2 at step 3 stepped the optimizer never again (and
    never zeroed the gradients), while the log went on as if it trained."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    common = ["checkpoint.every_steps=3", "log.images_every_steps=0", "optim.warmup_steps=0"]
    assert main(args(config, shards, run, "train.max_steps=3", *common)) == 0
    assert main(args(config, shards, run, "train.max_steps=6", "train.grad_accum=2", *common,
                     "--resume", "latest")) == 0
    before, after = (load_file(run / f"checkpoints/step_{n}/model.safetensors") for n in (3, 6))
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith(".weight"))
    steps = {float(s["step"]) for s in torch.load(run / "checkpoints/step_6/optimizer.bin",
                                                  weights_only=True)["state"].values()}
    assert steps == {6.0}


def test_train_cpu_kernels_runs_the_fused_norm_and_false_runs_torchs_ops(config, shards, tmp_path, monkeypatch):
    """The trainer says in its log what runs; the same steps either way, to float rounding."""
    from models import cpu_kernels

    calls = []
    real = cpu_kernels._GroupNormSiLU.apply
    monkeypatch.setattr(cpu_kernels._GroupNormSiLU, "apply", lambda *a: calls.append(1) or real(*a))
    losses, n = {}, {}
    for flag in ("true", "false"):
        run = tmp_path / f"k-{flag}"
        assert main(args(config, shards, run, "train.max_steps=3", f"train.cpu_kernels={flag}",
                         "log.images_every_steps=0")) == 0
        n[flag] = len(calls)
        log = (run / "train.log").read_text()
        losses[flag] = logged(run, "loss/total") + logged(run, "train/grad_norm")
        if flag == "true":
            assert "fused GroupNorm+SiLU CPU kernel: on (" in log
        else:
            assert "fused GroupNorm+SiLU CPU kernel: off (train.cpu_kernels=false" in log
    cpu_kernels.set_enabled(True)
    assert n["true"] > 0 and n["false"] == n["true"]  # none with the key off
    assert len(losses["true"]) == 4 and losses["true"] == pytest.approx(losses["false"], rel=1e-4)
