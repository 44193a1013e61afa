"""What a second job, a crafted or corrupted checkpoint, a full disk or a bad run folder gets: one line
and an exit code, never a traceback, a hang, a silent restart or code run from a checkpoint.

Each test builds its bad input itself from one small trained run (two checkpoints, EMA on, so the
checkpoint holds every pickled file accelerate writes: scheduler and EMA custom objects, RNG state,
optimizer)."""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from shardgen import make_shards, rename_classes

from harness import checkpoint as ckpt
from launch.train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/configs/tiny.yaml"


def args(shards, run, *extra):
    return ["--config", str(CONFIG), f"data.train={shards}", f"run.dir={run}", "train.ema_decay=0.9", *extra]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=32, per_shard=8, size=32)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A run folder with step_1 and step_2 (read only: tests copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(args(shards, run, "train.max_steps=2", "checkpoint.every_steps=1", "log.images_every_steps=0")) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "[WARNING]" not in line]
    assert len(err) == 1, err
    return err[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "loss.kl_weight=-inf", "optim.betas=[0.9,.inf]"])
def test_non_finite_floats_are_refused_by_the_config(shards, tmp_path, capsys, override):
    assert main(args(shards, tmp_path / "run", override)) == 2
    assert one_line(capsys).endswith("is not a finite number")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- the run folder


HOLDER = """
import sys, time
from harness.runlock import acquire
acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_job_is_refused_naming_the_holder_and_writes_nothing(run, shards, capsys):
    stale = run / "checkpoints/.tmp-step_3.999-0badcafe"  # the holder's save in progress: not ours to clean
    stale.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert (run / ".lock").read_text() == f"host={socket.gethostname()} pid={holder.pid}\n"
        before = snapshot(run)
        assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 2
        line = one_line(capsys)
        assert line == (f"error: run.dir {run} is in use by another job (host {socket.gethostname()} pid {holder.pid}; "
                        f"{run / '.lock'}): wait for it to end, or choose another run.dir")
        assert snapshot(run) == before  # no log line, no checkpoint, not even the holder's name erased
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 0
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3
    assert (run / ".lock").read_text() == f"host={socket.gethostname()} pid={os.getpid()}\n"
    assert not stale.exists()  # a dead writer's temporary goes once the lock is ours


def test_a_deleted_lock_file_does_not_let_a_second_job_in(run, shards, capsys):
    """Taken for a stale lock and deleted by hand, `.lock` is gone, but the folder stays locked."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (run / ".lock").unlink()
        before = snapshot(run)
        assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 2
        assert one_line(capsys) == (f"error: run.dir {run} is in use by another job (its .lock was deleted, the "
                                    "folder is still locked): wait for it to end, or choose another run.dir")
        after = snapshot(run)
        assert after.pop(".lock")[0] == 0 and after == before  # an empty new .lock (its file lock), nothing else
    finally:
        holder.kill()
        holder.wait()
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 0


@pytest.mark.slow
def test_two_training_jobs_on_one_run_dir(shards, tmp_path):
    """Real processes both ways: a requeued job starting while the old one still trains."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch/train.py"), *args(shards, run, "train.max_steps=100000",
                                                                 "checkpoint.every_steps=0", "log.every_steps=1")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 180
        while not ((run / "train.log").is_file() and "step 2 " in (run / "train.log").read_text()):
            assert first.poll() is None and time.monotonic() < end, "the first job did not start training"
            time.sleep(0.5)
        second = subprocess.run([*cmd, "--resume", "latest"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=180)
        assert second.returncode == 2, second.stderr
        err = [line for line in second.stderr.splitlines() if "[WARNING]" not in line]
        assert len(err) == 1 and f"is in use by another job (host {socket.gethostname()} pid {first.pid};" in err[0]
        assert first.poll() is None  # the first job trains on, undisturbed
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 75
    finally:
        first.kill()
        first.wait()
    assert ckpt.resolve(run, "latest") is not None and not list((run / "checkpoints").glob(".tmp-*"))


def test_run_dir_that_is_a_file_is_one_line(shards, tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("not a folder")
    assert main(args(shards, f, "train.max_steps=1")) == 2
    assert one_line(capsys) == f"error: run.dir {f} exists and is not a folder"


def test_run_dir_that_is_not_writable_is_one_line(shards, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: there, the refusal of the file system is simulated
        run.chmod(0o555)
    else:
        real_open = os.open

        def refusing_open(path, *a, **kw):
            if Path(path).parent == run:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *a, **kw)

        monkeypatch.setattr(os, "open", refusing_open)
    try:
        assert main(args(shards, run, "train.max_steps=1")) == 2
    finally:
        run.chmod(0o755)
    assert one_line(capsys) == f"error: run.dir {run} is not writable ({run / '.lock'}: Permission denied)"


# ----------------------------------------------------------------------------------------- never unpickle


class Payload:
    """Unpickling this creates `marker` (what a crafted checkpoint would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(folder: Path, name: str, marker: Path) -> None:
    """Replace a pickled file of the checkpoint `folder` by one with a payload, and re-write the manifest
    so that it verifies: whoever crafts a file can write a manifest too, so only the unpickler stands
    in the way."""
    path = folder / name
    with torch.serialization.safe_globals(ckpt.allowed_globals(path.suffix == ".pt")):  # .pt: DeepSpeed's
        original = torch.load(path, weights_only=True)
    payload = {**original, "x": Payload(marker)} if isinstance(original, dict) else Payload(marker)
    torch.save(payload, path)
    ckpt.write_manifest(folder)
    assert ckpt.verify(folder) is None


def test_the_payload_is_live(tmp_path):
    """Guards the tests below: unpickled the usual way, the payload does create its marker."""
    f, marker = tmp_path / "x.pkl", tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, f)
    torch.load(f, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl",
                                  "optimizer.bin"])
def test_resume_refuses_a_pickled_payload(run, shards, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    plant(run / "checkpoints/step_2", name, marker)
    before = snapshot(run / "checkpoints")
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 2
    line = one_line(capsys)
    assert line == (f"error: cannot resume {run}/checkpoints/step_2: {name} holds a pickled io.open, outside the "
                    "allow-list of plain data: refusing to unpickle it")
    assert not marker.exists()
    assert snapshot(run / "checkpoints") == before  # no fall-back to step_1 either: a crafted file is no accident


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_accelerates_own_loaders_are_held_to_weights_only(run, tmp_path, name):
    """Behind the scan: accelerate's loaders (weights_only=False for custom objects; errors swallowed for
    the RNG states) run torch's weights-only unpickler inside `weights_only_loads`."""
    from accelerate.checkpointing import load_custom_state
    from accelerate.utils.other import load

    marker = tmp_path / "pwned"
    folder = run / "checkpoints/step_2"
    plant(folder, name, marker)
    with ckpt.weights_only_loads(folder) as refused, pytest.raises(ckpt.ResumeError, match="refusing to unpickle"):
        if name.startswith("custom"):
            load_custom_state(torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1), lambda s: 1),
                              str(folder), 0)
        else:
            load(folder / name)
    assert refused and not marker.exists()


def test_deepspeeds_engine_loader_is_held_to_weights_only(tmp_path):
    """DeepSpeed's checkpoint engine passes weights_only=False for every ZeRO shard it reads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"
    shard = tmp_path / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.parent.mkdir()
    torch.save({"optimizer_state_dict": {"x": Payload(marker)}}, shard)
    with ckpt.weights_only_loads(tmp_path) as refused, pytest.raises(ckpt.ResumeError, match="refusing to unpickle"):
        TorchCheckpointEngine().load(str(shard))
    assert refused and not marker.exists()
    with pytest.raises(ckpt.ResumeError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt holds a pickled"):
        ckpt.check_pickles(tmp_path)
    assert not marker.exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zero2(shards, run, *extra):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/zero2.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "launch/train.py",
           *args(shards, run, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def zero2_resumed(shards, tmp_path_factory):
    """A ZeRO-2 run on 2 CPU processes, saved at step 2 and resumed to step 3: the clean resume loads every
    shard through the weights-only unpickler (the allow-list is complete)."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    r = zero2(shards, run, "train.max_steps=2", "checkpoint.every_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = zero2(shards, run, "train.max_steps=3", "checkpoint.every_steps=3", "--resume", "latest")
    assert r.returncode == 0 and "at step 2/3" in r.stderr, r.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                  "pytorch_model/mp_rank_00_model_states.pt"])
def test_zero_checkpoint_with_a_payload_is_refused(shards, zero2_resumed, tmp_path, name):
    """A planted payload in a ZeRO-2 shard is refused on every rank, in one line (a copy of the run per file)."""
    run = tmp_path / "run"
    shutil.copytree(zero2_resumed, run, symlinks=True)
    marker = tmp_path / "pwned"
    plant(run / "checkpoints/step_3", name, marker)
    r = zero2(shards, run, "train.max_steps=4", "--resume", "latest")
    assert r.returncode != 0  # the workers exit 2; torchrun reports any failure as 1
    refusals = [line for line in r.stderr.splitlines() if "refusing to unpickle" in line]
    assert refusals == [f"error: cannot resume {run}/checkpoints/step_3: {name} holds a pickled io.open, outside "
                        "the allow-list of plain data: refusing to unpickle it"], r.stderr[-3000:]
    # (the launcher prints a traceback of its own for a failed worker; the workers print none)
    assert "/harness/" not in r.stderr.replace("/vae-harness/", "") and "UnpicklingError" not in r.stderr
    assert not marker.exists()
    # export (and sample/evaluate/init_from, which read weights the same way) refuses it as well
    from launch.export import main as export_main

    assert export_main([str(run / "checkpoints/step_3"), "--out", str(tmp_path / "exported")]) == 2
    assert not marker.exists() and not (tmp_path / "exported" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------- verification


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["tensor data", "header"])
def test_corrupt_weights_fall_back_to_the_previous_step(run, shards, capsys, where):
    weights = run / "checkpoints/step_2/model.safetensors"
    flip(weights, weights.stat().st_size - 3 if where == "tensor data" else 2)  # header: its length field
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 0
    log = (run / "train.log").read_text()
    assert ("note: step_2 fails verification (model.safetensors does not match its sha256 (corrupted on disk or "
            "edited)): resuming from step_1, the newest checkpoint that verifies") in log
    assert f"resuming from {run}/checkpoints/step_1 at step 1/3" in log
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3
    # the corrupt one is kept aside for a look, never resumed; named by path it is refused in one line
    kept = run / "checkpoints/abandoned-step_2"
    assert kept.is_dir()
    capsys.readouterr()
    assert main(args(shards, run, "train.max_steps=4", "--resume", str(kept))) == 2
    assert one_line(capsys) == (f"error: --resume {kept}: the checkpoint fails verification (model.safetensors "
                                "does not match its sha256 (corrupted on disk or edited))")


def test_a_lost_trainer_state_is_a_damaged_checkpoint_not_an_export(run, shards, capsys):
    """A step_N that lost trainer_state.json (its manifest still there) is passed over with the same note as any
    other damage and set aside; before, it was skipped without a word, stayed in checkpoints/, and the tools took
    it for an export folder and read its weights unverified."""
    from harness.inference import LoadError, find_weights_dir

    (run / "checkpoints/step_2/trainer_state.json").unlink()
    with pytest.raises(LoadError, match="step_2: the checkpoint fails verification .trainer_state.json is missing"):
        find_weights_dir(run / "checkpoints/step_2")
    assert find_weights_dir(run) == run / "checkpoints/step_1"  # the run folder: the newest that verifies, said
    assert capsys.readouterr().err.strip() == ("note: step_2 fails verification (trainer_state.json is missing): "
                                               "using step_1, the newest checkpoint that verifies")
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 0
    log = (run / "train.log").read_text()
    assert "note: step_2 fails verification (trainer_state.json is missing): resuming from step_1" in log
    assert (run / "checkpoints/abandoned-step_2").is_dir()


@pytest.mark.parametrize("files", ['{"model.safetensors": 5}', "null", '{"model.safetensors": {"size": "7"}}'])
def test_a_manifest_of_the_wrong_shape_fails_verification(run, shards, files):
    manifest = run / "checkpoints/step_2/manifest.json"
    manifest.write_text(f'{{"version": 1, "files": {files}}}')  # valid JSON: it was an AttributeError traceback
    assert ckpt.verify(manifest.parent) == "manifest.json is malformed (not a map of file -> size and sha256)"
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 0
    assert "note: step_2 fails verification (manifest.json is malformed" in (run / "train.log").read_text()


def test_another_runs_checkpoint_is_not_resumed_into_a_run_with_checkpoints(run, shards, tmp_path, capsys):
    """--resume <another run's step_N> in a run.dir with checkpoints of its own: its saves would replace this
    run's step_N and a later `--resume latest` would pick whichever branch is newer. Refused; nothing touched."""
    other = tmp_path / "other"
    shutil.copytree(run, other)
    before = {k: v for k, v in snapshot(run).items() if k != ".lock"}  # the lock is taken (and let go) first
    capsys.readouterr()
    assert main(args(shards, run, "train.max_steps=3", "--resume", str(other / "checkpoints/step_1"))) == 2
    assert one_line(capsys) == (f"error: cannot resume {other / 'checkpoints/step_1'} in run.dir {run}: that folder "
                                "has checkpoints of its own (step_1, step_2); continue another run's checkpoint in a "
                                f"new run.dir, or --resume latest (or a path under {run / 'checkpoints'}) to continue "
                                "this one")
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == before
    fresh = tmp_path / "fresh"  # into a new run.dir it continues, as the message says
    assert main(args(shards, fresh, "train.max_steps=3", "--resume", str(other / "checkpoints/step_1"))) == 0
    assert ckpt.read_state(ckpt.resolve(fresh, "latest"))["step"] == 3
    # its own checkpoint named by path (not `latest`) is this run's: that resumes as before
    assert main(args(shards, run, "train.max_steps=3", "--resume", str(run / "checkpoints/step_1"))) == 0


def test_checkpoints_of_this_run_through_links_are_its_own(run, shards, tmp_path):
    """A link elsewhere that leads into this run's checkpoints/ names this run's checkpoint: resuming through it
    sets the newer steps aside as any resume does. A step_N that is itself a link to other storage is this run's
    too: `--resume latest` goes on (the check against another run's checkpoints once refused it)."""
    link = tmp_path / "link"
    link.symlink_to(run / "checkpoints/step_1")
    assert ckpt.of_run(link, run)
    assert main(args(shards, run, "train.max_steps=2", "--resume", str(link))) == 0
    assert (run / "checkpoints/abandoned-step_2").is_dir()  # the newer branch, kept aside, never resumed
    moved = tmp_path / "elsewhere" / "step_2"
    moved.parent.mkdir()
    shutil.move(run / "checkpoints/step_2", moved)
    (run / "checkpoints/step_2").symlink_to(moved)
    assert ckpt.of_run(run / "checkpoints/step_2", run) and not ckpt.of_run(moved, run)
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 0
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3


def test_a_checkpoint_pruned_while_it_is_verified_is_a_reason_not_a_traceback(run, monkeypatch):
    real = ckpt._hash_all

    def pruned_meanwhile(folder, names):
        shutil.rmtree(folder)
        return real(folder, names)

    monkeypatch.setattr(ckpt, "_hash_all", pruned_meanwhile)
    why = ckpt.verify(run / "checkpoints/step_2")
    assert why is not None and why.endswith("vanished while it was verified")


def test_learned_logvar_switched_at_a_resume_is_one_line(run, shards, capsys):
    capsys.readouterr()
    assert main(args(shards, run, "train.max_steps=3", "loss.learned_logvar=true", "--resume", "latest")) == 2
    assert one_line(capsys) == (f"error: cannot resume {run / 'checkpoints/step_2'}: loss.learned_logvar was false, "
                                "now true (the learned log-variance is a trained parameter of the run): keep "
                                "loss.learned_logvar=false, or start a new run from its weights (train.init_from)")


def test_gradient_checkpointing_may_change_at_a_resume(run, shards, capsys):
    """The documented answer to running out of memory changes no parameter: a resume follows it, said once."""
    assert main(args(shards, run, "train.max_steps=3", "model.gradient_checkpointing=true",
                     "model.vq_codebook_size=77", "--resume", "latest")) == 0
    log = (run / "train.log").read_text()
    assert ("note: model.gradient_checkpointing follows the config at this resume: False -> True (no parameter "
            "depends on it)") in log
    # a key this kind does not read (a KL model's codebook size) blocks nothing either: said at start and here
    assert "note: model.vq_codebook_size follows the config at this resume: 1024 -> 77 (no parameter depends on " \
           "it: unread)" in log
    assert "note: model.vq_codebook_size set, but a model.kind=kl model.arch=ldm model does not read it" in log
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3


def test_tools_refuse_non_finite_weights(run, tmp_path, capsys):
    """A checkpoint whose weights hold a NaN (a diverged run, a damaged file that still matches a manifest
    rewritten by hand): sample/evaluate/export say so in one line instead of reporting psnr nan."""
    from safetensors.torch import load_file, save_file

    from harness.inference import LoadError, load_model
    from launch.export import main as export_main

    step = run / "checkpoints/step_2"
    weights = load_file(step / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name][(0,) * weights[name].dim()] = float("nan")
    save_file(weights, step / "model.safetensors")
    ckpt.write_manifest(step)
    with pytest.raises(LoadError, match=f"weight {name} holds non-finite values"):
        load_model(step)
    capsys.readouterr()
    out = tmp_path / "exported"
    assert export_main([str(step), "--out", str(out)]) == 2
    assert f"weight {name} holds non-finite values" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_checkpoint_pruned_while_a_tool_reads_it_is_read_from_the_next(run, monkeypatch):
    """evaluate/sample/export on a run that is still training: the checkpoint found can be pruned before its
    files are read. Found again once (the newer one is there by then), not 'no model weights'."""
    from harness import inference

    real, calls = inference.load_config_of, []

    def pruned_meanwhile(folder, prior_vq=None):
        calls.append(folder)
        if len(calls) == 1:  # the trainer saves step_3 and prunes step_2 right now
            shutil.copytree(run / "checkpoints/step_2", run / "checkpoints/step_3")
            shutil.rmtree(folder)
        return real(folder, prior_vq)

    monkeypatch.setattr(inference, "load_config_of", pruned_meanwhile)
    _, _, folder = inference.load_model(run)
    assert calls == [run / "checkpoints/step_2", run / "checkpoints/step_3"] and folder == calls[-1]
    # export reads through the same retry: it once said "no model weights" (or "cannot write" a checkpoint file)
    from launch.export import main as export_main

    calls.clear()
    shutil.copytree(run / "checkpoints/step_3", run / "checkpoints/step_2")  # step_2 found first again (newest: 3)
    shutil.rmtree(run / "checkpoints/step_3")
    assert export_main([str(run), "--out", str(run.parent / "exported")]) == 0
    assert calls[0] == run / "checkpoints/step_2" and (run.parent / "exported/model.safetensors").is_file()


def test_nothing_verifies_is_one_line(run, shards, capsys):
    for step in (1, 2):
        flip(run / f"checkpoints/step_{step}/optimizer.bin", 100)
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 2
    assert one_line(capsys).startswith(f"error: no checkpoint in {run / 'checkpoints'} verifies: step_2 fails "
                                       "verification (optimizer.bin does not match its sha256")


def test_latest_without_checkpoints_is_exit_2_not_a_restart(run, shards, capsys):
    shutil.rmtree(run / "checkpoints")
    assert main(args(shards, run, "train.max_steps=3", "--resume", "latest")) == 2
    assert one_line(capsys) == (f"error: {run / 'latest'} names 'checkpoints/step_2' but {run / 'checkpoints'} holds "
                                "no complete checkpoint (deleted or moved?): put them back, or start over in a new "
                                "run.dir")
    assert not (run / "checkpoints").exists()


# ----------------------------------------------------------------------------------------- a full disk


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(run, shards, capsys, monkeypatch):
    import accelerate.utils.other as acc_other

    real = acc_other.safe_save_file

    def full_disk(obj, path, **kw):
        if ".tmp-step_4" in str(path):  # the second save of this run: half a file, then no space
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, **kw)

    monkeypatch.setattr(acc_other, "safe_save_file", full_disk)
    assert main(args(shards, run, "train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=1",
                     "--resume", "latest")) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the run's own log lines
    assert "Traceback" not in err
    assert line == (f"error: could not write checkpoint step_4 in {run / 'checkpoints'}: no space left on device "
                    "(ENOSPC); the previous checkpoint step_3 is intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3"]  # no partial folder, nothing pruned
    assert (run / "latest").read_text().strip() == "checkpoints/step_3"
    assert ckpt.verify(run / "checkpoints/step_3") is None
    monkeypatch.undo()
    assert main(args(shards, run, "train.max_steps=4", "--resume", "latest")) == 0


FULL_ON_RANK_1 = """
import errno, os, sys
import torch
sys.path.insert(0, {root!r})
real_save = torch.save


def save(obj, f, *args, **kwargs):  # rank 1's disk fills up during the second save
    if os.environ.get("RANK") == "1" and ".tmp-step_4" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)


torch.save = save
from launch.train import main
sys.exit(main())
"""


@pytest.mark.slow
def test_disk_full_on_one_rank_stops_every_rank_without_a_hang(shards, tmp_path):
    """2-process DDP: rank 1 cannot write its RNG state. Every rank learns it (one all-reduce), none
    waits forever in the next collective, rank 0 says it in one line, step_2 stays the checkpoint."""
    script = tmp_path / "train_full_disk.py"
    script.write_text(FULL_ON_RANK_1.format(root=str(ROOT)))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu2.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), str(script),
           *args(shards, run, "train.max_steps=6", "checkpoint.every_steps=2")]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: could not write checkpoint step_4 in {run / 'checkpoints'}: another rank could not "
                      "write its part; the previous checkpoint step_2 is intact"], r.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]
    assert (run / "latest").read_text().strip() == "checkpoints/step_2"


# ----------------------------------------------------------------------------------------- sbatch arguments


def sbatch(tmp_path, *argv, **extra):
    """launch/slurm/train.sbatch run by bash, with srun / scontrol stand-ins that print what they got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NAME="t",
               SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", SLURM_SUBMIT_DIR=str(ROOT), RUN_DIR=str(tmp_path / "r"),
               **extra)
    return subprocess.run(["bash", str(ROOT / "launch/slurm/train.sbatch"), *argv], env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("argv", [["--resume"], ["data.train=/d", "--resume"], ["--resume", "train.max_steps=5"],
                                  ["--resume", "--config"], ["--resume="]])
def test_sbatch_resume_without_a_value_is_refused_at_once(tmp_path, argv):
    r = sbatch(tmp_path, *argv)  # used to loop forever (`shift 2` with one argument left shifts nothing)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: train.sbatch: --resume needs a value: latest or a checkpoint folder (runs/<name>/checkpoints/step_N)"]
    assert "[sbatch]" not in r.stdout  # nothing started


def test_sbatch_passes_a_resume_path_and_overrides_through(tmp_path):
    path = "/runs/lr=1e-4/checkpoints/step_5"  # a "=" in a path is no override
    r = sbatch(tmp_path, "data.train=/d/{0..3}.tar", "--resume", path, "train.max_steps=9")
    assert r.returncode == 0, r.stderr
    words = r.stdout.splitlines()
    i = words.index("--resume")
    assert words[i + 1] == path
    assert "data.train=/d/{0..3}.tar" in words and "train.max_steps=9" in words


def test_sbatch_takes_the_run_folder_from_a_run_dir_override_too(tmp_path):
    """run.dir=... with --resume PATH: once that run has a checkpoint, the requeued job must continue from its
    `latest`; the script looked in $RUN_DIR only, passed the PATH again and the requeued job was refused."""
    own = tmp_path / "own"
    r = sbatch(tmp_path, "data.train=/d", f"run.dir={own}", "--resume", "/other/checkpoints/step_10")
    words = r.stdout.splitlines()
    assert words[words.index("--resume") + 1] == "/other/checkpoints/step_10" and f"run.dir={own}" in words
    assert f"run.dir={tmp_path / 'r'}" not in words and f"run {own}," in r.stdout  # one run.dir, the override's
    own.mkdir(exist_ok=True)  # (the script makes it)
    (own / "latest").write_text("checkpoints/step_160\n")  # preempted after its first checkpoint: requeued
    words = sbatch(tmp_path, "data.train=/d", f"run.dir={own}", "--resume", "/other/checkpoints/step_10",
                   SLURM_RESTART_COUNT="1").stdout
    assert words.splitlines()[words.splitlines().index("--resume") + 1] == "latest"


def test_shard_sets_naming_classes_otherwise_mix_only_for_a_model_that_reads_none(shards, tmp_path, capsys):
    other = make_shards(tmp_path / "other", num_samples=8, per_shard=8, size=32)
    rename_classes(other, ["w", "x", "y", "z"])
    mix = [f"data.train=[{shards}::0.5, {other}::0.5]", "train.max_steps=1", "checkpoint.every_steps=0"]
    assert main(args(shards, tmp_path / "a", *mix[1:], mix[0])) == 0  # unconditional: cls is never read
    capsys.readouterr()
    assert main(args(shards, tmp_path / "b", *mix[1:], mix[0], "model.condition=class", "model.num_classes=4")) == 2
    assert "class names (4) differ from those of" in one_line(capsys)
    assert not (tmp_path / "b").exists()


def test_conditional_validation_shards_are_checked_at_start_and_may_be_small(shards, tmp_path, capsys):
    """data.val with more classes than the model: refused at start, in one line (it failed at the first
    validation, after training); a data.val smaller than log.num_images still makes its grids."""
    cond = ["model.condition=class", "model.num_classes=4", "train.max_steps=2", "checkpoint.every_steps=0"]
    wide = make_shards(tmp_path / "wide", num_samples=16, per_shard=8, size=32, num_classes=10)
    assert main(args(shards, tmp_path / "a", *cond, f"data.val={wide}", "eval.every_steps=1")) == 2
    assert one_line(capsys) == "error: data.val: model.num_classes: the shards have 10 classes, more than 4"
    assert not (tmp_path / "a").exists()
    renamed = make_shards(tmp_path / "renamed", num_samples=16, per_shard=8, size=32)
    rename_classes(renamed, ["c0", "c2", "c1", "c3"])  # class 1 of these is class 2 of the training data
    assert main(args(shards, tmp_path / "a", *cond, f"data.val={renamed}", "eval.every_steps=1")) == 2
    assert one_line(capsys).startswith("error: data.val: its class names differ from the training data's (4 vs 4; "
                                       "#1 is 'c2' here, 'c1' there)")
    assert not (tmp_path / "a").exists()
    small = make_shards(tmp_path / "small", num_samples=6, per_shard=6, size=32)
    run = tmp_path / "b"
    assert main(args(shards, run, *cond, f"data.val={small}", "eval.every_steps=2", "log.num_images=8",
                     "log.images_every_steps=2")) == 0
    assert list((run / "samples").glob("*.png"))


def test_links_among_the_files_the_trainer_writes_are_refused(shards, tmp_path, capsys):
    """A run folder (unpacked, shared) whose .lock, config.yaml or train.log is a symbolic link: the trainer
    wrote through it (the .lock truncated the file it points to). Refused in one line, the target untouched."""
    victim = tmp_path / "victim.txt"
    for name in (".lock", "config.yaml", "train.log"):
        victim.write_text("precious")
        run = tmp_path / f"run-{name.strip('.')}"
        run.mkdir()
        (run / name).symlink_to(victim)
        capsys.readouterr()
        assert main(args(shards, run, "train.max_steps=1")) == 2
        assert one_line(capsys) == (f"error: run.dir {run}: {name} is a symbolic link (to {victim}); the trainer "
                                    "writes this file, and would write through the link: remove the link")
        assert victim.read_text() == "precious"


def test_a_step_folder_holding_another_step_is_refused(run, shards, trained, capsys):
    """Another run's step_2 copied in as step_9: resumed as this run's newest (its weights trained on, this
    run's own newest set aside as abandoned). Its trainer state says step 2: refused in one line."""
    shutil.copytree(trained / "checkpoints/step_2", run / "checkpoints/step_9")
    capsys.readouterr()
    assert main(args(shards, run, "train.max_steps=12", "--resume", str(run / "checkpoints/step_9"))) == 2
    assert one_line(capsys).endswith(f"{run / 'checkpoints/step_9'}: holds step 2, so it was not written as step_9 "
                                     "(copied in from another run, or renamed?): move it out of the run's checkpoints/")
    assert (run / "checkpoints/step_2").is_dir() and not list((run / "checkpoints").glob("abandoned-*"))


@pytest.mark.parametrize("field, value, said", [
    ("samples_seen", "x", "samples_seen is 'x', not a count"),
    ("samples_seen", -5, "samples_seen is -5, not a count"),
    ("totals", "x", "totals is 'x', not a mapping of numbers"),
    ("best", {"step": "x"}, "best is {'step': 'x'}, not null or a mapping with an integer step and a value"),
    ("step", 10**23, "step is 100000000000000000000000, not a step count below 2**53"),
])
def test_a_trainer_state_edited_past_its_step_is_one_line(field, value, said):
    """Fields of trainer_state.json past `step` were trusted: tracebacks (TypeError, TensorBoard's range
    check) or a silently wrong sample count."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "x"
        folder.mkdir()
        (folder / ckpt.STATE_NAME).write_text(json.dumps({"step": 3, "samples_seen": 12, field: value}))
        with pytest.raises(ckpt.ResumeError) as e:
            ckpt.read_state(folder)
        assert str(e.value) == f"{folder / ckpt.STATE_NAME}: {said}; not as vae-harness writes it (edited?)"


def signalled_while_held(shards, run, sig, pause: str, ready: str, delay: float) -> tuple[int, str]:
    """launch/train.py held at the pause point `pause` (HARNESS_CRASH_TEST_PAUSE), sent `sig` `delay` s after
    run/`ready` appears -> (exit code, stderr)."""
    env = dict(os.environ, HARNESS_CRASH_TEST_PAUSE=pause, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(ROOT / "launch/train.py"), *args(shards, run, "train.max_steps=2")],
                         env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not (run / ready).exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(delay)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


def test_a_stop_signal_while_starting_is_one_line_and_exit_75(shards, tmp_path):
    """SIGTERM/SIGUSR1 before the loop takes them over (checkpoint verification, loading: seconds on a real
    job) killed the process silently (143/138), so SLURM's USR1 requeue never happened. Now one line, 75."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        run = tmp_path / sig.name
        code, err = signalled_while_held(shards, run, sig, "starting:30", ".lock", 0.5)
        assert code == 75, err
        lines = [ln for ln in err.splitlines() if "[WARNING]" not in ln]
        assert lines[-1] == (f"stopped by {sig.name} while starting: nothing trained from this start (the checkpoints "
                             "saved before are intact)"), err
        assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())


def test_a_stop_signal_leaves_the_mark_the_sbatch_script_requeues_on(shards, tmp_path):
    """accelerate launch reports a worker's 75 as 1: the run folder's `preempted` says it was a stop
    signal with a checkpoint (or nothing trained, while starting), not a crash; a new start removes it."""
    run = tmp_path / "r"
    code, err = signalled_while_held(shards, run, signal.SIGUSR1, "starting:30", ".lock", 0.5)
    assert code == 75, err
    assert (run / "preempted").read_text() == "SIGUSR1: nothing trained from this start\n"
    assert main(args(shards, run, "train.max_steps=2")) == 0  # a start that ends well: no mark
    assert not (run / "preempted").exists()


def test_a_stop_signal_during_the_imports_of_a_slurm_job_still_leaves_the_mark(shards, tmp_path):
    """USR1 in the seconds the trainer imports (before its config is read): exit 75, but no mark, so
    train.sbatch ended the job as failed instead of requeueing it. Rank 0 of a SLURM job now writes it
    into the command line's run.dir (which the script creates); elsewhere nothing is written."""
    for job, marked in (("7", True), (None, False)):
        run = tmp_path / f"run{job}"
        run.mkdir()
        env = dict(os.environ, HARNESS_CRASH_TEST_PAUSE="importing:30", OMP_NUM_THREADS="1")
        env.pop("SLURM_JOB_ID", None)
        if job:
            env["SLURM_JOB_ID"] = job
        p = subprocess.Popen([sys.executable, str(ROOT / "launch/train.py"), *args(shards, run)], env=env,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)  # the handler is in after a few imports of the standard library; the pause follows
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 75 and err.strip() == "stopped by SIGUSR1 while starting: nothing was trained or written"
        if marked:
            assert (run / "preempted").read_text() == "SIGUSR1: nothing trained from this start (job 7)\n"
        assert sorted(q.name for q in run.iterdir()) == (["preempted"] if marked else [])


def test_a_stop_signal_while_a_finished_run_closes_changes_nothing(shards, tmp_path):
    """The loop's handlers used to give way to the start-up ones before the TensorBoard writer and the
    loader were closed: a SIGTERM then made a finished run exit 75, "stopped while starting: nothing
    trained", skipping the rest of the closing (and a USR1 requeued a finished job)."""
    run = tmp_path / "r"
    # the final save is done (latest), 1 s later the run is closing (held there 4 s)
    code, err = signalled_while_held(shards, run, signal.SIGTERM, "closing:4", "latest", 1.0)
    assert code == 0, err
    assert "while starting" not in err and not (run / "preempted").exists()
    assert "done: 2 steps" in (run / "train.log").read_text()


def test_a_checkpoints_folder_the_first_save_cannot_use_is_refused_at_start(shards, tmp_path, capsys):
    """checkpoints/ a file or a link to nothing, or `latest` a folder: the run trained checkpoint.every_steps
    steps, then failed its first save (those steps lost). One line at start now."""
    cases = {"file": lambda r: (r / "checkpoints").write_text("x"),
             "dangling": lambda r: (r / "checkpoints").symlink_to(tmp_path / "gone"),
             "latest": lambda r: (r / "latest").mkdir(),
             "tb": lambda r: (r / "tb").write_text("x"),  # was a FileExistsError at start, with a resume hint
             "samples": lambda r: (r / "samples").symlink_to(tmp_path / "gone")}
    said = {"file": "checkpoints exists and is not a folder",
            "dangling": f"checkpoints is a link to nothing (to {tmp_path / 'gone'})",
            "tb": "tb exists and is not a folder",
            "samples": f"samples is a link to nothing (to {tmp_path / 'gone'})",
            "latest": "latest is a folder; the trainer keeps a one-line file there naming the newest checkpoint: "
                      "move the folder away"}
    for name, make in cases.items():
        run = tmp_path / name
        run.mkdir()
        make(run)
        capsys.readouterr()
        assert main(args(shards, run, "train.max_steps=1")) == 2
        assert one_line(capsys) == f"error: run.dir {run}: {said[name]}"
        assert not (run / "train.log").exists()


def test_the_mark_names_the_job_and_the_first_stop_signal(tmp_path, monkeypatch):
    """train.sbatch reads only its own job's mark; and torchrun's SIGTERM to the ranks still running after
    one exited 75 must not turn SLURM's USR1 into a SIGTERM (which is not requeued)."""
    from harness.signals import StopFlag, mark_preempted

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    mark_preempted(tmp_path, 13, signal.SIGUSR1)
    assert (tmp_path / "preempted").read_text() == "SIGUSR1: checkpoint at step 13 (job 7)\n"
    monkeypatch.delenv("SLURM_JOB_ID")
    mark_preempted(tmp_path, None, None)
    assert (tmp_path / "preempted").read_text() == "another rank's stop signal: nothing trained from this start\n"
    flag = StopFlag()
    flag._handle(signal.SIGUSR1, None)
    flag._handle(signal.SIGTERM, None)
    assert flag.signum == signal.SIGUSR1 and flag.exit_code == 75
