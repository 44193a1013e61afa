"""The training lifecycle against what a hostile world does: a forked worker outliving its trainer,
a checkpoint folder given as run.dir, writes that fail outside a save, SIGHUP, a schedule changed at
a resume, and start-up mistakes that used to pass without a word."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from shardgen import make_shards

from harness import runlock
from launch.train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/configs/tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=32, per_shard=16, size=32)


def run_args(shards, run, *extra):
    return ["--config", str(CONFIG), f"data.train={shards}", f"run.dir={run}", "log.images_every_steps=0", *extra]


def test_a_forked_worker_does_not_keep_the_run_folder_locked(tmp_path):
    """The trainer dies (os._exit) while a forked child (a loader worker) lives on: the next job may start."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from harness import runlock
        runlock.acquire({str(tmp_path / "run")!r})
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2)  # the test's pipe closes when the trainer exits
            time.sleep(30)
            os._exit(0)
        print("locked", flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "locked", out.stderr
    runlock.acquire(tmp_path / "run")  # the orphan sleeps on, without the lock
    runlock.release_all()


def spawn(shards, run, *extra, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "launch/train.py"), *run_args(shards, run, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def wait_for_step(proc, log, step=3, timeout=120):
    t0 = time.time()
    while not (log.is_file() and f"] step {step} " in log.read_text()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_closed_terminal_checkpoints_and_exits_129(shards, tmp_path):
    """SIGHUP to the whole job (a terminal closing), loader workers too: a checkpoint, then exit 129;
    the output after it goes nowhere (the terminal is gone), train.log says it."""
    from harness import checkpoint as ckpt

    run = tmp_path / "run"
    proc = spawn(shards, run, "train.max_steps=100000", "checkpoint.every_steps=0", "log.every_steps=1",
                 "data.num_workers=2", process_group=0)
    wait_for_step(proc, run / "train.log")
    os.killpg(proc.pid, signal.SIGHUP)
    out, _ = proc.communicate(timeout=120)
    step = ckpt.read_state(ckpt.resolve(run, "latest"))["step"]
    assert proc.returncode == 129, out
    assert f"checkpoint at step {step} saved, exiting with 129" in (run / "train.log").read_text()
    assert "Traceback" not in out
    assert "exiting with 129" in out  # its output went to a pipe, not a terminal: kept


def test_a_run_under_nohup_keeps_ignoring_sighup():
    from harness.signals import StopFlag

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        flag = StopFlag().install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        flag.restore()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        flag = StopFlag().install()
        assert signal.getsignal(signal.SIGHUP) == flag._hangup
        flag.restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_hangup_leaves_output_that_is_no_terminal_where_it_goes(tmp_path):
    from harness.signals import StopFlag

    saved = os.dup(1)
    try:
        out = open(tmp_path / "out.log", "w")
        os.dup2(out.fileno(), 1)  # stdout is a file, as with `train.py > out.log`
        flag = StopFlag().install()
        try:
            flag._hangup(signal.SIGHUP, None)
            os.write(1, b"after the hangup\n")
        finally:
            flag.restore()
        assert flag.requested and flag.exit_code == 129
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        out.close()
    assert (tmp_path / "out.log").read_text() == "after the hangup\n"


def test_a_checkpoint_folder_as_run_dir_is_refused_and_left_alone(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(run_args(shards, run, "train.max_steps=2", "checkpoint.every_steps=2")) == 0
    step = run / "checkpoints/step_2"
    before = sorted(p.name for p in step.iterdir())
    assert main(run_args(shards, step, "train.max_steps=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: run.dir {step} is a checkpoint folder, not a run folder: to continue that run use "
                   f"run.dir={run} --resume latest; to start a new run from its weights, train.init_from={step}")
    assert sorted(p.name for p in step.iterdir()) == before
    assert main(run_args(shards, run / "checkpoints/new", "train.max_steps=2")) == 2
    assert "inside the checkpoints/ of run" in capsys.readouterr().err
    assert not (run / "checkpoints/new").exists()


def test_a_failed_log_write_turns_logging_off_and_training_goes_on(shards, tmp_path, monkeypatch, capsys):
    import errno

    import harness.tracking

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", "samples/x.png")

    monkeypatch.setattr(harness.tracking, "save_png", full)
    run = tmp_path / "run"
    assert main(run_args(shards, run, "train.max_steps=6", "checkpoint.every_steps=3", "log.every_steps=1",
                         "log.images_every_steps=2")) == 0
    log = (run / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "cannot write" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "warning: cannot write the reconstruction grid (OSError: No space left on device: samples/x.png): "
        "TensorBoard and image grids are off for the rest of this run; training goes on"), warnings
    assert "] step 6 " in log and (run / "checkpoints/step_6").is_dir()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's traceback
def test_a_failed_event_write_in_tensorboards_thread_is_one_line(tmp_path, capsys):
    """The events file removed under the writer: its thread fails (no traceback printed), and the next
    write from the trainer reports it once."""
    import shutil

    from harness.tracking import Tracker

    said = []
    tracker = Tracker(tmp_path / "run", True, on_error=said.append)
    tracker.scalars({"a": 1.0}, 1)
    tracker.flush()
    shutil.rmtree(tmp_path / "run")
    for step in range(2, 40):
        tracker.scalars({"a": float(step)}, step)
        tracker.flush()
        time.sleep(0.01)
    tracker.close()
    assert len(said) == 1 and said[0].startswith("warning: cannot write TensorBoard"), said
    assert "Traceback" not in capsys.readouterr().err


def test_a_resume_that_changes_the_schedule_says_so(shards, tmp_path):
    run = tmp_path / "run"
    common = ["optim.warmup_steps=0", "checkpoint.every_steps=0"]
    assert main(run_args(shards, run, "train.max_steps=4", *common)) == 0
    assert main(run_args(shards, run, "train.max_steps=4", *common, "--resume", "latest")) == 0
    log = (run / "train.log").read_text()
    assert "note: the checkpoint is at step 4 and train.max_steps=4: nothing is left to train" in log
    assert "schedule differs" not in log
    assert main(run_args(shards, run, "train.max_steps=8", *common, "--resume", "latest")) == 0
    log = (run / "train.log").read_text()
    said = [line for line in log.splitlines() if "schedule differs" in line]
    assert len(said) == 1 and "at step 4 it gives 0.0022" in said[0] and "the checkpoint's gave 0.0004" in said[0], said


def test_resume_latest_without_a_checkpoint_says_it_starts_anew(shards, tmp_path):
    run = tmp_path / "run"
    assert main(run_args(shards, run, "train.max_steps=1", "--resume", "latest")) == 0
    assert f"note: --resume latest: no checkpoint in {run} yet, starting a new run" in (run / "train.log").read_text()


def test_a_batch_larger_than_the_data_names_the_keys_the_user_set(shards, tmp_path, capsys):
    assert main(run_args(shards, tmp_path / "run", "train.batch_size=1000")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "32 samples make less than one batch per rank and worker (1 ranks x train.batch_size=1000 x 1 " \
           "data.num_workers); lower train.batch_size" in err and "data.epoch_samples" not in err, err



def test_a_resume_at_another_image_size_says_so(shards, tmp_path):
    run = tmp_path / "run"
    assert main(run_args(shards, run, "train.max_steps=2", "checkpoint.every_steps=0")) == 0
    assert main(run_args(shards, run, "train.max_steps=3", "checkpoint.every_steps=0", "data.image_size=16",
                         "--resume", "latest")) == 0
    log = (run / "train.log").read_text()
    assert "note: data.image_size is 16, the checkpoint trained at 32 px: the model goes on at the new size" in log
    assert "image_size 32 -> 16" not in log and "data layout changed" not in log


def test_a_resume_that_changes_how_the_stream_reads_says_so(shards, tmp_path):
    """data.shuffle_buffer, data.crop and data.hflip change the samples an uninterrupted run would read,
    and so does a checkpoint of the stream before its seeds were hashed (no `stream` in its layout):
    resumed without a word, these were silently not exact."""
    import json

    from harness import checkpoint as ckpt

    run = tmp_path / "run"
    assert main(run_args(shards, run, "train.max_steps=2", "checkpoint.every_steps=0")) == 0
    assert main(run_args(shards, run, "train.max_steps=3", "checkpoint.every_steps=0", "data.shuffle_buffer=3",
                         "data.crop=center", "--resume", "latest")) == 0
    log = (run / "train.log").read_text()
    assert "note: data layout changed since the checkpoint (shuffle_buffer 32 -> 3, crop random -> center)" in log
    step = run / "checkpoints/step_3"
    state = json.loads((step / "trainer_state.json").read_text())
    del state["data_layout"]["stream"]  # as a checkpoint of the stream before it
    (step / "trainer_state.json").write_text(json.dumps(state))
    ckpt.write_manifest(step)
    assert main(run_args(shards, run, "train.max_steps=4", "checkpoint.every_steps=0", "data.shuffle_buffer=3",
                         "data.crop=center", "--resume", "latest")) == 0
    assert ("note: data layout changed since the checkpoint (the stream's seeds and epoch starts (harness/data.py, "
            "version 1 -> 2))") in (run / "train.log").read_text()


def test_a_resume_that_changes_the_loss_says_so(shards, tmp_path):
    run = tmp_path / "run"
    assert main(run_args(shards, run, "train.max_steps=2", "checkpoint.every_steps=0")) == 0
    assert main(run_args(shards, run, "train.max_steps=3", "checkpoint.every_steps=0", "--resume", "latest")) == 0
    assert "the loss differs" not in (run / "train.log").read_text()
    assert main(run_args(shards, run, "train.max_steps=4", "checkpoint.every_steps=0", "loss.kl_weight=0.001",
                         "--resume", "latest")) == 0
    said = [line for line in (run / "train.log").read_text().splitlines() if "the loss differs" in line]
    assert len(said) == 1 and "loss.kl_weight 1e-06 -> 0.001" in said[0], said


def test_a_loss_key_an_older_checkpoint_lacks_counts_as_its_default(shards, tmp_path):
    """recipe_ldm's new loss.disc_adaptive_max: a run saved before the key existed ran at the default."""
    import yaml

    run = tmp_path / "run"
    assert main(run_args(shards, run, "train.max_steps=2", "checkpoint.every_steps=0")) == 0
    saved = run / "checkpoints/step_2/config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    del cfg["loss"]["disc_adaptive_max"]
    saved.write_text(yaml.safe_dump(cfg))
    from harness import checkpoint as ckpt

    ckpt.write_manifest(run / "checkpoints/step_2")
    assert main(run_args(shards, run, "train.max_steps=3", "checkpoint.every_steps=0", "--resume", "latest")) == 0
    assert "the loss differs" not in (run / "train.log").read_text()
    assert main(run_args(shards, run, "train.max_steps=4", "checkpoint.every_steps=0", "--resume", "latest",
                         "loss.disc_adaptive_max=0.05")) == 0
    assert "loss.disc_adaptive_max 10000.0 -> 0.05" in (run / "train.log").read_text()
