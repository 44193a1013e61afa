"""A real SLURM on this machine (tests/slurm/cluster.sh): jobs, tasks, and launch/slurm/train.sbatch's
signal -> checkpoint -> requeue -> resume path.

Until launch/train.py exists, train.sbatch runs tests/slurm/standin.py: the same command line
through the same `accelerate launch`, the same signal contract (stop at an agreed step, save,
exit 75). Skipped, with the reason, where the cluster cannot start (not root, no apt-get).
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

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


def job_state(env, job) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True)
    return r.stdout.strip()  # "" once the job has left the queue


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def events(run_dir: Path) -> list[str]:
    f = run_dir / "events"
    return f.read_text().splitlines() if f.exists() else []


def train_job(env, tmp_path, max_steps, **extra):
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm.out"
    job = sbatch(
        env,
        ROOT / "launch" / "slurm" / "train.sbatch",
        f"train.max_steps={max_steps}",
        # the cluster has no GPUs and 2 cores: command-line options win over the #SBATCH lines
        opts=("--gpus-per-node=0", f"--output={out}"),
        CONFIG="tests/slurm/none.yaml",
        RUN_DIR=str(run_dir),
        ACCEL_CONFIG="launch/accelerate/cpu2.yaml",
        GPUS_PER_NODE="2",
        TRAIN_SCRIPT="tests/slurm/standin.py",
        **extra,
    )
    return job, run_dir, out


def test_two_tasks_get_their_ranks(slurm_env, tmp_path):
    script = tmp_path / "ranks.sbatch"
    script.write_text('#!/bin/bash\n#SBATCH -N1 -n2\nsrun bash -c \'echo "procid=$SLURM_PROCID"\'\n')
    out = tmp_path / "ranks.out"
    job = sbatch(slurm_env, script, opts=(f"--output={out}",))
    wait_for(lambda: job_state(slurm_env, job) == "", 60, f"job {job}")
    assert sorted(out.read_text().split()) == ["procid=0", "procid=1"]


def test_train_sbatch_runs_to_the_end(slurm_env, tmp_path):
    job, run_dir, out = train_job(slurm_env, tmp_path, max_steps=10)
    wait_for(lambda: job_state(slurm_env, job) == "", 120, f"job {job}")
    ev = events(run_dir)
    assert ev and "--resume latest" in ev[0] and f"run.dir={run_dir}" in ev[0], (ev, out.read_text())
    assert "world=2" in ev[0]
    assert ev[-1].startswith("done step=10"), (ev, out.read_text())
    assert "training exited with 0" in out.read_text()


def test_usr1_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    job, run_dir, out = train_job(slurm_env, tmp_path, max_steps=60)
    wait_for(lambda: any(e.startswith("step 5 ") for e in events(run_dir)), 120, "training to reach step 5")
    # What `#SBATCH --signal=B:USR1@300` does before the time limit, without waiting for it.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    wait_for(lambda: job_state(slurm_env, job).startswith("PENDING"), 120, "the job to be requeued")
    # slurmctld holds a requeued job back (BeginTime, about 2 minutes); let it go now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env, check=True)
    wait_for(lambda: job_state(slurm_env, job) == "", 180, f"job {job} to finish after the requeue")

    ev, log = events(run_dir), out.read_text()
    stop = [e for e in ev if e.startswith("preempted")]
    assert len(stop) == 1 and "signal=SIGUSR1" in stop[0] and "restart=0" in stop[0], (ev, log)
    step = int(stop[0].split("step=")[1].split()[0])
    assert int((run_dir / "latest").read_text()) == 60
    starts = [e for e in ev if e.startswith("start")]
    assert [s.split()[1] for s in starts] == ["step=0", f"step={step}"], (ev, log)
    assert "restart=1" in starts[1]
    assert ev[-1].startswith("done step=60") and "restart=1" in ev[-1], (ev, log)
    assert "requeueing job" in log


def test_scancel_is_not_requeued(slurm_env, tmp_path):
    job, run_dir, out = train_job(slurm_env, tmp_path, max_steps=600)
    wait_for(lambda: any(e.startswith("step 5 ") for e in events(run_dir)), 120, "training to reach step 5")
    subprocess.run(["scancel", job], env=slurm_env, check=True)
    wait_for(lambda: job_state(slurm_env, job) == "", 90, f"job {job} to end")
    time.sleep(2)
    assert job_state(slurm_env, job) == "", "a cancelled job must not come back"
    assert "requeueing" not in out.read_text()
