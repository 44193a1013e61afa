"""Faults of one rank in a real 2-process run (accelerate launch on CPU, gloo)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shardgen import make_shards

from harness import checkpoint as ckpt
from launch.train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/configs/tiny.yaml"
pytestmark = pytest.mark.slow


def launch_cmd(*args, nproc=2):
    """The command line of test_multiproc's `accelerate_launch`, for a run that is started, not awaited."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            *map(str, args)]


def launch_env(**extra):
    return dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def workers_of_rank(rank: int, run: Path) -> list[int]:
    """PIDs of the processes whose environment holds RANK=<rank> and whose command line names `run`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmdline = (d / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if f"RANK={rank}".encode() in env and str(run).encode() in cmdline:
            found.append(int(d.name))
    return found


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=128, per_shard=16, size=40)


def test_kill_9_of_one_rank_while_saving_keeps_the_last_checkpoint_and_resumes(shards, tmp_path):
    """kill -9 of rank 1 while rank 0 holds a save at "written" (every rank's files in `.tmp-step_4.*`,
    manifest included, before the rename): the launcher ends rank 0, and step_2 is still what
    `latest` resumes from.

    HARNESS_CRASH_TEST_PAUSE holds every save from the first, so a first run (no pause) saves step_2
    and ends; the run resumed from it with the pause is the one killed, during its first save (step_4).
    With keep_last=1 the held save is the one that would prune step_2: losing it would lose everything.
    The launcher sends the surviving rank SIGTERM, then SIGKILL after a 30 s grace; the pause (60 s)
    outlasts it, so rank 0 dies inside the pause, before the rename. The test sends that SIGKILL itself
    once the launcher's SIGTERM is out (the same end, without waiting out the grace)."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    cfg = ["--config", CONFIG, f"data.train={shards}", f"run.dir={run}", "checkpoint.every_steps=2",
           "checkpoint.keep_last=1"]
    first = subprocess.run(launch_cmd(ROOT / "launch/train.py", *cfg, "train.max_steps=2"), capture_output=True,
                           text=True, timeout=300, env=launch_env(), cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert ckpt.resolve(run, "latest") == root / "step_2"

    log = tmp_path / "launch.log"  # a file, not a pipe: a full pipe would block the ranks
    with open(log, "w") as out:
        proc = subprocess.Popen(launch_cmd(ROOT / "launch/train.py", *cfg, "train.max_steps=100000",
                                           "--resume", "latest"),
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env=launch_env(HARNESS_CRASH_TEST_PAUSE="written:60"))
    try:
        t0 = time.time()
        # rank 0 writes the manifest last, then pauses: every rank's part is on disk
        while not any((p / ckpt.MANIFEST_NAME).is_file() for p in root.glob(".tmp-step_*")):
            assert proc.poll() is None, f"run exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.time() - t0 < 180, f"no held save after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        held = [p.name for p in root.glob(".tmp-step_*")]
        assert len(held) == 1 and held[0].startswith(".tmp-step_4."), held
        victims = workers_of_rank(1, run)
        assert len(victims) == 1, f"expected one rank-1 worker, found {victims}"
        os.kill(victims[0], signal.SIGKILL)
        # the launcher sees rank 1 die and ends rank 0: SIGTERM (rank 0 is inside the pause), then SIGKILL
        t0 = time.time()
        while "closing signal SIGTERM" not in log.read_text() and proc.poll() is None:
            assert time.time() - t0 < 60, f"the launcher sent no SIGTERM:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        time.sleep(1)  # rank 0 takes the SIGTERM (its handler only sets the stop flag)
        for pid in workers_of_rank(0, run):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the launcher's group
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode != 0, log.read_text()[-3000:]

    # No step_* folder is partial; `latest` names the newest complete one, the save that was held is not one.
    steps = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    assert [p.name for p in steps] == ["step_2"], sorted(p.name for p in root.iterdir())
    assert all(ckpt.is_complete(p) and ckpt.verify(p) is None for p in steps)
    assert ckpt.resolve(run, "latest") == root / "step_2"
    assert (run / "latest").read_text().strip() == "checkpoints/step_2"

    # The DDP checkpoint resumes in one process, and the resume clears the killed save's leftovers.
    assert main(["--config", str(CONFIG), f"data.train={shards}", f"run.dir={run}", "train.max_steps=100000",
                 "checkpoint.every_steps=0", "train.stop_after_steps=1", "--resume", "latest"]) == 0
    assert f"resuming from {root}/step_2 at step 2/" in (run / "train.log").read_text()
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".trash-*"))
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3


def test_a_stop_signal_to_one_rank_while_validating_stops_both_at_that_step(shards, tmp_path):
    """SIGUSR1 to rank 1 alone, in the validation of step 2: it stops its share at the next batch, rank 0
    (no signal) finishes its own, and both agree in one all-reduce to save step 2 (which owes the
    validation) and stop; neither waits for the other inside the validation."""
    import re

    run, val = tmp_path / "run", make_shards(tmp_path / "val", num_samples=24, per_shard=12, size=40)
    cfg = ["--config", CONFIG, f"data.train={shards}", f"run.dir={run}", f"data.val={val}", "eval.every_steps=2",
           "eval.samples=24", "eval.batch_size=2", "log.every_steps=1", "checkpoint.every_steps=0",
           "log.images_every_steps=0", "train.max_steps=100000"]
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(launch_cmd(ROOT / "launch/train.py", *cfg), stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True,
                                env=launch_env(HARNESS_CRASH_TEST_PAUSE="validating:0.5"))
    try:
        t0 = time.time()
        while not ((run / "train.log").exists() and re.search(r"^.*\bstep 2 loss", (run / "train.log").read_text(),
                                                                re.M)):
            assert proc.poll() is None, f"run exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.time() - t0 < 180, f"no step 2 after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        time.sleep(0.7)
        victims = workers_of_rank(1, run)
        assert len(victims) == 1, f"expected one rank-1 worker, found {victims}"
        os.kill(victims[0], signal.SIGUSR1)
        proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    text = (run / "train.log").read_text()
    assert "validation at step 2 stopped by the signal, nothing measured" in text, log.read_text()[-3000:]
    assert "checkpoint at step 2 saved, exiting with 75" in text  # rank 0's: another rank's signal
    assert (run / "preempted").read_text() == "another rank's stop signal: checkpoint at step 2\n"
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step_2"]
    assert ckpt.read_state(run / "checkpoints/step_2")["validation_owed"] == 2
