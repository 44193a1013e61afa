"""A real SLURM on this machine (tests/slurm/cluster.sh): jobs, tasks, and launch/slurm/train.sbatch
running launch/train.py with 2 tasks: train, checkpoint, then signal -> checkpoint -> requeue ->
resume from `latest` -> finish. Skipped, with the reason, where the cluster cannot start (not root,
no apt-get).
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
STATE = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/vae-harness-slurm"))

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _running() -> bool:
    pids = [STATE / f"{d}.pid" for d in ("slurmctld", "slurmd")]
    try:
        return all(os.kill(int(p.read_text()), 0) is None for p in pids)
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def slurm_env():
    """SLURM_CONF pointing at the test cluster; started here (and stopped after) unless already up."""
    was_running = _running()
    r = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    if r.returncode == 3:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, f"cluster.sh start failed:\n{r.stderr}"
    env = dict(os.environ, SLURM_CONF=str(STATE / "slurm.conf"), OMP_NUM_THREADS="1")
    yield env
    if not was_running:
        subprocess.run(["bash", str(CLUSTER), "stop"], timeout=60)


def sbatch(env, script, *args, opts=(), **extra_env) -> str:
    cmd = ["sbatch", "--parsable", *opts, str(script), *args]
    r = subprocess.run(cmd, env=dict(env, **extra_env), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def job_state(env, job) -> str:
    """"STATE reason" while the job lives (requeued included), "" once it has ended or left the queue,
    "?" when squeue could not answer (a busy slurmctld must not read as "ended")."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return "" if "Invalid job id" in r.stderr else "?"
    state = r.stdout.strip()
    return "" if not state or state.split()[0] in ENDED else state


def wait_for(predicate, timeout, what, show=None):
    """Poll until predicate() is true; on timeout fail with `what` and what show() returns (logs)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{show()}" if show else ""))


def tail(path: Path, lines=40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else f"({path} missing)"


def job_report(env, job, run_dir: Path, out: Path) -> str:
    """What a person would look at when a job does not do what the test waits for."""
    show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    return "\n".join([
        f"--- scontrol show job {job}:\n{show.stdout or show.stderr}",
        f"--- {run_dir}/train.log:\n{tail(run_dir / 'train.log')}",
        f"--- {out}:\n{tail(out)}",
        f"--- slurmctld.log:\n{tail(STATE / 'log' / 'slurmctld.log', 25)}",
    ])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shardgen import make_shards

    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=128, per_shard=16, size=40)


def log_of(run_dir: Path) -> str:
    f = run_dir / "train.log"
    return f.read_text() if f.exists() else ""


def train_job(env, tmp_path, shards, max_steps, *overrides):
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm.out"
    job = sbatch(
        env,
        ROOT / "launch" / "slurm" / "train.sbatch",
        f"data.train={shards}", f"train.max_steps={max_steps}", "log.every_steps=1", *overrides,
        # the cluster has no GPUs and 2 cores: command-line options win over the #SBATCH lines
        opts=("--gpus-per-node=0", f"--output={out}"),
        CONFIG="tests/configs/tiny.yaml",
        RUN_DIR=str(run_dir),
        ACCEL_CONFIG="launch/accelerate/cpu2.yaml",
        GPUS_PER_NODE="2",
    )
    return job, run_dir, out


def wait_until_done(env, job, run_dir: Path, out: Path, steps: int, timeout: float):
    """Wait for the job to leave the queue with "done: <steps> steps" in its training log. Fails at
    once, with the logs, when the job ended without finishing.

    A requeued job is held for its BeginTime (the credential lifetime, 2 minutes): it is released
    to start a few seconds from now, not at once. slurmd revoked the first run's credential when it
    killed it, to the second, and a run started within that second is killed as "non-startable
    batch job: Job credential revoked" (seen in CI). Released again if the hold is still there."""
    end, ended_at, released_at = time.monotonic() + timeout, None, -1e9
    while time.monotonic() < end:
        state, now = job_state(env, job), time.monotonic()
        if state == "":
            if f"done: {steps} steps" in log_of(run_dir):
                return
            # squeue has been seen to blink during a requeue: ended means ended for a while
            ended_at = ended_at or now
            if now - ended_at > 10:
                report = job_report(env, job, run_dir, out)
                raise AssertionError(f"job {job} ended without finishing {steps} steps\n{report}")
        else:
            ended_at = None
        if state.startswith("PENDING") and "BeginTime" in state and now - released_at > 15:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=env, capture_output=True)
            released_at = now
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for job {job} to finish {steps} steps\n"
                         f"{job_report(env, job, run_dir, out)}")


def test_two_tasks_get_their_ranks(slurm_env, tmp_path):
    script = tmp_path / "ranks.sbatch"
    script.write_text('#!/bin/bash\n#SBATCH -N1 -n2\nsrun bash -c \'echo "procid=$SLURM_PROCID"\'\n')
    out = tmp_path / "ranks.out"
    job = sbatch(slurm_env, script, opts=(f"--output={out}",))
    wait_for(lambda: job_state(slurm_env, job) == "", 60, f"job {job}")
    assert sorted(out.read_text().split()) == ["procid=0", "procid=1"]


def test_train_sbatch_runs_to_the_end(slurm_env, tmp_path, shards):
    # A brace pattern reaches launch/train.py as written (not expanded into 8 overrides by a shell).
    pattern = f"data.train={shards}/{{000000..000007}}.tar"
    job, run_dir, out = train_job(slurm_env, tmp_path, shards, 10, "checkpoint.every_steps=5", pattern)
    wait_until_done(slurm_env, job, run_dir, out, 10, 240)
    log = log_of(run_dir)
    assert "starting at step 0/10" in log and "2 process(es) (MULTI_CPU" in log, (log, out.read_text())
    assert "128 samples in 8 shard(s)" in log, log
    assert ckpt.read_state(ckpt.resolve(run_dir, "latest"))["step"] == 10
    assert "training exited with 0" in out.read_text()


def test_usr1_checkpoints_requeues_and_resumes(slurm_env, tmp_path, shards):
    # Loader workers on: SLURM signals them too, and they must leave the checkpointing to training.
    job, run_dir, out = train_job(slurm_env, tmp_path, shards, 400, "checkpoint.every_steps=0", "data.num_workers=2")
    wait_for(lambda: "step 5 " in log_of(run_dir), 240, "training to reach step 5",
             lambda: job_report(slurm_env, job, run_dir, out))
    # What `#SBATCH --signal=B:USR1@300` does before the time limit, without waiting for it.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    wait_for(lambda: job_state(slurm_env, job).startswith("PENDING"), 180, "the job to be requeued",
             lambda: job_report(slurm_env, job, run_dir, out))
    stopped = ckpt.read_state(ckpt.resolve(run_dir, "latest"))["step"]
    assert 5 <= stopped < 400
    # slurmctld holds a requeued job back (BeginTime, 2 minutes): wait_until_done lets it go sooner.
    wait_until_done(slurm_env, job, run_dir, out, 400, 400)
    log, slurm_log = log_of(run_dir), out.read_text()
    assert f"checkpoint at step {stopped} saved, exiting with 75" in log, (log, slurm_log)
    assert f"resuming from {run_dir}/checkpoints/step_{stopped} at step {stopped}/400" in log, (log, slurm_log)
    assert ckpt.read_state(ckpt.resolve(run_dir, "latest"))["step"] == 400
    assert "requeueing job" in slurm_log and "restart 1" in slurm_log


def test_scancel_is_not_requeued(slurm_env, tmp_path, shards):
    # scancel sends SIGTERM to every process of the job, the loader workers included: training
    # still checkpoints (the workers ignore it), and the job is not requeued.
    job, run_dir, out = train_job(slurm_env, tmp_path, shards, 100000, "checkpoint.every_steps=0", "data.num_workers=2")
    wait_for(lambda: "step 5 " in log_of(run_dir), 240, "training to reach step 5",
             lambda: job_report(slurm_env, job, run_dir, out))
    subprocess.run(["scancel", job], env=slurm_env, check=True)
    wait_for(lambda: job_state(slurm_env, job) == "", 120, f"job {job} to end",
             lambda: job_report(slurm_env, job, run_dir, out))
    time.sleep(2)
    assert job_state(slurm_env, job) == "", "a cancelled job must not come back"
    assert "requeueing" not in out.read_text()
    assert "saved, exiting with 75" in log_of(run_dir), (log_of(run_dir), out.read_text())
    assert ckpt.read_state(ckpt.resolve(run_dir, "latest"))["step"] >= 5
