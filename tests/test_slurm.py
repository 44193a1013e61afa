"""launch/slurm/train.sbatch, twice over.

A real SLURM on this machine (tests/slurm/cluster.sh): jobs, tasks, and train.sbatch running
launch/train.py with 2 tasks: train, checkpoint, then signal -> checkpoint -> requeue -> resume from
`latest` -> finish. Skipped, with the reason, where the cluster cannot start (not root, no apt-get).

Stand-ins for srun / scontrol (fast, everywhere): what the script decides before and after training,
where a real cluster cannot easily be made to fail (a refused requeue) or to have GPUs.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
STATE = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/vae-harness-slurm"))



def real_slurm(test):
    """The marks of a test that runs on the real cluster."""
    return pytest.mark.slurm(pytest.mark.slow(test))


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


@real_slurm
def test_two_tasks_get_their_ranks(slurm_env, tmp_path):
    script = tmp_path / "ranks.sbatch"
    script.write_text('#!/bin/bash\n#SBATCH -N1 -n2\nsrun bash -c \'echo "procid=$SLURM_PROCID"\'\n')
    out = tmp_path / "ranks.out"
    job = sbatch(slurm_env, script, opts=(f"--output={out}",))
    wait_for(lambda: job_state(slurm_env, job) == "", 60, f"job {job}")
    assert sorted(out.read_text().split()) == ["procid=0", "procid=1"]


@real_slurm
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


@real_slurm
def test_usr1_checkpoints_requeues_and_resumes(slurm_env, tmp_path, shards):
    # Loader workers on: SLURM signals them too, and they must leave the checkpointing to training.
    # 150 steps: at about 10 steps a second (idle machine; fewer on a busy one), the signal has 14 s to land
    # after step 5 before the first start would end (it lands within a second or two); the resumed start
    # trains the rest
    job, run_dir, out = train_job(slurm_env, tmp_path, shards, 150, "checkpoint.every_steps=0", "data.num_workers=2")
    wait_for(lambda: "step 5 " in log_of(run_dir), 240, "training to reach step 5",
             lambda: job_report(slurm_env, job, run_dir, out))
    # What `#SBATCH --signal=B:USR1@300` does before the time limit, without waiting for it.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    wait_for(lambda: job_state(slurm_env, job).startswith("PENDING"), 180, "the job to be requeued",
             lambda: job_report(slurm_env, job, run_dir, out))
    stopped = ckpt.read_state(ckpt.resolve(run_dir, "latest"))["step"]
    assert 5 <= stopped < 150
    # slurmctld holds a requeued job back (BeginTime, 2 minutes): wait_until_done lets it go sooner.
    wait_until_done(slurm_env, job, run_dir, out, 150, 400)
    log, slurm_log = log_of(run_dir), out.read_text()
    assert f"checkpoint at step {stopped} saved, exiting with 75" in log, (log, slurm_log)
    assert f"resuming from {run_dir}/checkpoints/step_{stopped} at step {stopped}/150" in log, (log, slurm_log)
    assert ckpt.read_state(ckpt.resolve(run_dir, "latest"))["step"] == 150
    assert "requeueing job" in slurm_log and "restart 1" in slurm_log


@real_slurm
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


def release_and_wait(env, job, timeout, show):
    """Wait for the job to leave the queue, letting a requeued job's BeginTime hold go (as wait_until_done)."""
    end, released_at = time.monotonic() + timeout, -1e9
    while time.monotonic() < end:
        state, now = job_state(env, job), time.monotonic()
        if state == "":
            time.sleep(2)  # squeue has been seen to blink during a requeue
            if job_state(env, job) == "":
                return
        if state.startswith("PENDING") and "BeginTime" in state and now - released_at > 15:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=env, capture_output=True)
            released_at = now
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for job {job} to end\n{show()}")


@real_slurm
def test_encode_sbatch_usr1_requeues_and_ends_as_a_straight_encoding(slurm_env, tmp_path):
    import torch
    import yaml
    from shardgen import make_shards

    from harness.config import load_config, to_dict
    from harness.encode import MANIFEST
    from harness.export import save_safetensors
    from launch.encode import main as encode_main
    from models import build_model

    data = make_shards(tmp_path / "shards", num_samples=192, per_shard=16, size=136)  # 12 shards, 6 a rank
    cfg = load_config([], ["model.ch=64", "model.ch_mult=[1,2,2]", "model.num_res_blocks=1", "model.z_channels=4",
                           "model.embed_dim=4", "model.attn_type=none", "data.image_size=128", f"data.train={data}"])
    torch.manual_seed(0)
    folder = tmp_path / "model"
    folder.mkdir()
    save_safetensors(build_model(cfg.model).state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    out, log = tmp_path / "lat", tmp_path / "slurm.out"
    args = [str(folder), "--out", str(out), "--workers", "0", "--batch-size", "4", "--no-progress"]
    job = sbatch(slurm_env, ENCODE_SBATCH, *args, opts=("--gpus-per-node=0", f"--output={log}"), GPUS_PER_NODE="2")

    def show():
        return f"{job_report(slurm_env, job, tmp_path, log)}\n--- {out}: {sorted(p.name for p in out.glob('*'))}"

    wait_for(lambda: any(out.glob("0*.tar")), 240, "the first latent shard", show)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    wait_for(lambda: job_state(slurm_env, job).startswith("PENDING"), 180, "the job to be requeued", show)
    stopped = sorted(p.name for p in out.glob("0*.tar"))
    assert 1 <= len(stopped) < 12 and not (out / MANIFEST).exists(), show()
    release_and_wait(slurm_env, job, 300, show)
    text = log.read_text()
    assert "requeueing job" in text and "restart 1" in text and "encode exited with 0" in text, text
    assert f"{out}: 192 latents (4x32x32 float16) in 12 shards" in text, text
    straight = tmp_path / "straight"  # one process, never stopped: the same bytes
    assert encode_main([str(folder), "--out", str(straight), "--workers", "0", "--no-progress"]) == 0
    for i in range(12):
        assert (out / f"{i:06d}.tar").read_bytes() == (straight / f"{i:06d}.tar").read_bytes(), i


# ------------------------------------------------------------------------- stand-ins for srun / scontrol

SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
# srun prints the command it was given, one word a line, and exits FAKE_SRUN_RC (75: training
# checkpointed after a signal); scontrol knows one node and fails a requeue with FAKE_REQUEUE_RC.
FAKE_SRUN = ('#!/bin/bash\nprintf "%s\\n" "$@"\n'  # FAKE_MARK: written where the trainer would (its run.dir=)
             'for a in "$@"; do case $a in run.dir=*) RD=${a#run.dir=} ;; esac; done\n'
             '[ -z "${FAKE_MARK:-}" ] || printf "%s\\n" "$FAKE_MARK" >"$RD/preempted"\nexit ${FAKE_SRUN_RC:-0}\n')
FAKE_SCONTROL = """#!/bin/bash
case $1 in
  show) echo node1 ;;
  requeue) echo "requeue $2" >>"$FAKE_CALLS"
    [ "${FAKE_REQUEUE_RC:-0}" = 0 ] || echo "scontrol: error: Requested operation is presently disabled for job $2" >&2
    exit ${FAKE_REQUEUE_RC:-0} ;;
esac
"""
NO_SLURM = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "GPUS_PER_NODE",
            "REPO_DIR", "CONFIG", "ACCEL_CONFIG", "TRAIN_SCRIPT", "RUN_DIR", "ENCODE_SCRIPT")


def fake_sbatch(tmp_path, *argv, cwd=ROOT, script=SBATCH, **env):
    """train.sbatch run by bash as SLURM's batch step would run it (job 7 on node1, submitted from cwd);
    `env` adds or (with None) removes variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k not in NO_SLURM}
    full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_CALLS=str(tmp_path / "calls"), SLURM_JOB_ID="7",
                SLURM_JOB_NAME="t", SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", SLURM_SUBMIT_DIR=str(cwd),
                RUN_DIR=str(tmp_path / "run"))
    for k, v in env.items():
        full.pop(k) if v is None else full.__setitem__(k, v)
    return subprocess.run(["bash", str(script), *argv], env=full, cwd=cwd, capture_output=True, text=True, timeout=30)


def srun_value(r, option):
    """The value srun's command line gave `option` (the stand-in prints one word a line)."""
    words = r.stdout.splitlines()
    return words[words.index(option) + 1]


def requeue_calls(tmp_path):
    calls = tmp_path / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_preempted_job_requeues_itself(tmp_path):
    r = fake_sbatch(tmp_path, "data.train=/d", FAKE_SRUN_RC="75")
    assert r.returncode == 0, r.stderr
    assert "[sbatch] preempted (exit 75): requeueing job 7" in r.stdout
    assert requeue_calls(tmp_path) == ["requeue 7"]


def test_a_refused_requeue_fails_the_job(tmp_path):
    """sbatch --no-requeue, JobRequeue=0, no permission: the job used to exit 0 (COMPLETED) and
    training silently stopped."""
    r = fake_sbatch(tmp_path, "data.train=/d", FAKE_SRUN_RC="75", FAKE_REQUEUE_RC="1")
    assert r.returncode == 75, (r.stdout, r.stderr)
    assert requeue_calls(tmp_path) == ["requeue 7"]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: train.sbatch: scontrol requeue failed (exit 1): job 7 is not requeued; resubmit it "
                      f"with RUN_DIR={tmp_path / 'run'} to continue from its latest checkpoint"], r.stderr


def test_the_trainers_mark_requeues_whatever_process_got_the_signal(tmp_path):
    """accelerate launch reports the trainer's 75 as 1; the job's steps (not this shell) got the signal
    (--signal=USR1@N without B:, preemption's SIGTERM, an admin): the mark in the run folder says it was
    a stop with a checkpoint. The job used to end FAILED, not requeued."""
    (tmp_path / "run").mkdir(exist_ok=True)
    r = fake_sbatch(tmp_path, "data.train=/d", FAKE_SRUN_RC="1", FAKE_MARK="SIGUSR1: checkpoint at step 13 (job 7)")
    assert r.returncode == 0, r.stderr
    assert "[sbatch] preempted (exit 1: SIGUSR1: checkpoint at step 13 (job 7)): requeueing job 7" in r.stdout
    assert requeue_calls(tmp_path) == ["requeue 7"]


def test_another_jobs_mark_is_neither_read_nor_removed(tmp_path):
    """A second job on the run folder (refused by its lock) must not requeue on the first one's mark, nor
    remove it before the first job's script reads it."""
    (tmp_path / "run").mkdir(exist_ok=True)
    r = fake_sbatch(tmp_path, "data.train=/d", FAKE_SRUN_RC="2", FAKE_MARK="SIGUSR1: checkpoint at step 13 (job 6)")
    assert r.returncode == 2 and requeue_calls(tmp_path) == [], r.stdout
    (tmp_path / "run" / "preempted").write_text("SIGUSR1: checkpoint at step 13 (job 6)\n")
    fake_sbatch(tmp_path, "data.train=/d", FAKE_SRUN_RC="2")
    assert (tmp_path / "run" / "preempted").read_text() == "SIGUSR1: checkpoint at step 13 (job 6)\n"


def test_usr1_killing_the_launchers_requeues_whoever_got_it(tmp_path):
    """Exit 138 (USR1 before torchrun hands it on: nothing trained): requeued also when the job's steps got
    it (--signal=USR1@N without B:), not only this shell."""
    r = fake_sbatch(tmp_path, "data.train=/d", FAKE_SRUN_RC="138")
    assert r.returncode == 0 and requeue_calls(tmp_path) == ["requeue 7"], r.stdout


def test_a_run_dir_under_home_is_where_the_trainer_writes(tmp_path):
    """run.dir=~/x reaches the script unexpanded; the trainer expands it, so the script looked for
    `latest` and the mark in ./~/x."""
    home = tmp_path / "home"
    (home / "x").mkdir(parents=True)
    (home / "x" / "latest").write_text("checkpoints/step_6\n")
    r = fake_sbatch(tmp_path, "data.train=/d", "run.dir=~/x", FAKE_SRUN_RC="1",
                    FAKE_MARK="SIGUSR1: checkpoint at step 8 (job 7)", HOME=str(home), RUN_DIR=None)
    assert f"run {home / 'x'}, resume latest" in r.stdout, r.stdout
    assert requeue_calls(tmp_path) == ["requeue 7"]


def test_a_sigterm_mark_is_not_requeued(tmp_path):
    """scancel (SIGTERM to every process of the job) saves and stops; SLURM's own preemption requeues by
    its PreemptMode, not this script."""
    (tmp_path / "run").mkdir(exist_ok=True)
    r = fake_sbatch(tmp_path, "data.train=/d", FAKE_SRUN_RC="1", FAKE_MARK="SIGTERM: checkpoint at step 4 (job 7)")
    assert r.returncode == 1 and "[sbatch] training exited with 1" in r.stdout, r.stdout
    assert requeue_calls(tmp_path) == []


def test_a_failure_without_the_mark_is_not_requeued(tmp_path):
    """A crash, or a save failing on a full disk (exit 1), after SLURM's USR1 reached this shell was
    requeued too, again and again. And a mark left by an earlier start is not this one's."""
    fake_sbatch(tmp_path, "data.train=/d")
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "preempted").write_text("SIGUSR1: checkpoint at step 2 (job 7)\n")  # an earlier start's
    (tmp_path / "bin" / "srun").write_text(WAITING_SRUN)
    env = {k: v for k, v in os.environ.items() if k not in NO_SLURM}
    env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_CALLS=str(tmp_path / "calls"), SLURM_JOB_ID="7",
               SLURM_JOB_NAME="t", SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", SLURM_SUBMIT_DIR=str(ROOT),
               RUN_DIR=str(tmp_path / "run"))
    job = subprocess.Popen(["bash", str(SBATCH), "data.train=/d"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "calls.started").exists(), 20, "srun to start")
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=20)
    assert job.returncode == 1 and "[sbatch] training exited with 1" in out, (out, err)
    assert requeue_calls(tmp_path) == [] and not (tmp_path / "run" / "preempted").exists()


def test_a_resume_path_is_the_first_starts_then_latest(tmp_path):
    """Rewinding a run under SLURM: --resume PATH used to be replaced by `latest` whenever the run had one."""
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "latest").write_text("checkpoints/step_6\n")
    step = str(tmp_path / "run" / "checkpoints" / "step_3")
    r = fake_sbatch(tmp_path, "data.train=/d", "--resume", step)
    assert r.returncode == 0, r.stderr
    assert srun_value(r, "--resume") == step and f"resume {step}" in r.stdout
    r = fake_sbatch(tmp_path, "data.train=/d", "--resume", step, SLURM_RESTART_COUNT="1")  # requeued
    assert srun_value(r, "--resume") == "latest"


def test_more_than_one_task_per_node_is_refused(tmp_path):
    """--ntasks-per-node=<GPUs>, as other templates have it: two launchers claimed one machine rank."""
    r = fake_sbatch(tmp_path, "data.train=/d", SLURM_NTASKS="2")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: train.sbatch: 2 tasks on 1 node(s): submit one task per node (--ntasks-per-node=1, as in this "
        "script's #SBATCH lines); accelerate starts GPUS_PER_NODE processes on each"]
    assert r.stdout == ""
    assert fake_sbatch(tmp_path, "data.train=/d", SLURM_NTASKS="2", SLURM_NNODES="2").returncode == 0


@pytest.mark.parametrize("env, nodes, processes", [
    ({}, "1", "8"),                                                  # SLURM says nothing: 8
    ({"SLURM_GPUS_ON_NODE": "4"}, "2", "8"),                         # 2 nodes x the 4 GPUs on each
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, "1", "2"),                   # --gpus-per-node=a100:2
    ({"SLURM_GPUS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "0"}, "1", "3"),
    ({"SLURM_GPUS_ON_NODE": "4", "GPUS_PER_NODE": "4"}, "1", "4"),   # set by hand, as allocated
    ({"SLURM_GPUS_ON_NODE": "0", "GPUS_PER_NODE": "2"}, "1", "2"),   # CPU processes on a GPU-less job
])
def test_processes_per_node_follow_the_gpus_allocated(tmp_path, env, nodes, processes):
    r = fake_sbatch(tmp_path, "data.train=/d", SLURM_NNODES=nodes, **env)
    assert r.returncode == 0, r.stderr
    assert srun_value(r, "--num_processes") == processes


def test_gpus_per_node_other_than_allocated_is_refused(tmp_path):
    r = fake_sbatch(tmp_path, "data.train=/d", SLURM_GPUS_ON_NODE="4", GPUS_PER_NODE="8")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: train.sbatch: GPUS_PER_NODE=8 but SLURM allocated 4 GPU(s) on this node (SLURM_GPUS_ON_NODE): "
        "unset GPUS_PER_NODE, or submit with --gpus-per-node=8"]
    assert r.stdout == ""  # srun never started


def test_outside_a_slurm_job_is_refused(tmp_path):
    r = fake_sbatch(tmp_path, "data.train=/d", SLURM_JOB_ID=None)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: train.sbatch: not inside a SLURM allocation (SLURM_JOB_ID or SLURM_JOB_NODELIST unset): "
        "submit it with sbatch"]
    assert r.stdout == ""


def test_submitted_outside_the_repository(tmp_path):
    """Used to fail after the allocation, with an accelerate traceback per node."""
    elsewhere = tmp_path / "my jobs"
    elsewhere.mkdir()
    r = fake_sbatch(tmp_path, "data.train=/d", cwd=elsewhere)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: train.sbatch: TRAIN_SCRIPT=launch/train.py: no such file in {elsewhere} (submit from the "
        "repository, or set REPO_DIR=/path/to/vae-harness)"]
    assert r.stdout == ""
    r = fake_sbatch(tmp_path, "data.train=/d", cwd=elsewhere, REPO_DIR=str(ROOT))  # what the hint says
    assert r.returncode == 0, r.stderr
    assert srun_value(r, "--config") == "launch/configs/kl_f8.yaml"


@pytest.mark.parametrize("variable", ["CONFIG", "ACCEL_CONFIG", "TRAIN_SCRIPT"])
def test_a_missing_file_is_refused_by_its_variable(tmp_path, variable):
    r = fake_sbatch(tmp_path, "data.train=/d", **{variable: "launch/nope.yaml"})
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: train.sbatch: {variable}=launch/nope.yaml: no such file in {ROOT} (submit from the repository, "
        "or set REPO_DIR=/path/to/vae-harness)"]
    r = fake_sbatch(tmp_path, "data.train=/d", **{variable: str(tmp_path / "nope.yaml")})
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: train.sbatch: {variable}={tmp_path / 'nope.yaml'}: no such file"]


@pytest.mark.parametrize("config", ["gpu.yaml", "cpu.yaml"])
def test_a_config_started_without_torchrun_is_refused(tmp_path, config):
    """accelerate starts a distributed_type 'NO' config without torchrun: the preemption signal would
    kill the launcher, and nothing would be saved."""
    r = fake_sbatch(tmp_path, "data.train=/d", ACCEL_CONFIG=f"launch/accelerate/{config}")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: train.sbatch: ACCEL_CONFIG=launch/accelerate/{config} has distributed_type NO, which accelerate "
        "starts without torchrun (a preemption signal would kill training unsaved): use "
        "launch/accelerate/multi_gpu.yaml (also for one GPU), a zero*.yaml, or cpu2.yaml on CPU"]
    assert r.stdout == ""


@pytest.mark.parametrize("config", ["multi_gpu.yaml", "cpu2.yaml", "zero2.yaml", "multi_node.yaml"])
def test_torchrun_configs_are_accepted(tmp_path, config):
    r = fake_sbatch(tmp_path, "data.train=/d", ACCEL_CONFIG=f"launch/accelerate/{config}", GPUS_PER_NODE="2")
    assert r.returncode == 0, r.stderr
    assert srun_value(r, "--config_file") == f"launch/accelerate/{config}"


# ------------------------------------------------------------------------------------ launch/slurm/encode.sbatch

ENCODE_SBATCH = ROOT / "launch" / "slurm" / "encode.sbatch"
ENCODE_ARGS = ("runs/kl-f8", "--data", "/d/{000000..000003}.tar", "--out", "/lat ents/in256", "--flip")


def test_encode_sbatch_runs_torchrun_per_node_with_the_arguments_as_written(tmp_path):
    r = fake_sbatch(tmp_path, *ENCODE_ARGS, script=ENCODE_SBATCH, SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4")
    assert r.returncode == 0, r.stderr
    words = r.stdout.splitlines()
    assert words[0] == "[sbatch] job 7 restart 0: encode, 2 node(s) x 4, head node1:30007"
    assert words[1:4] == ["--kill-on-bad-exit=1", "bash", "-c"] and words[5] == "torchrun"
    assert srun_value(r, "--nnodes") == "2" and srun_value(r, "--nproc_per_node") == "4"
    assert srun_value(r, "--master_addr") == "node1"
    # the brace pattern and the space reach encode.py as written
    assert words[words.index("launch/encode.py") + 1:words.index("[sbatch] encode exited with 0")] == list(ENCODE_ARGS)


@pytest.mark.parametrize("env, processes", [({}, "1"), ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2"),
                                            ({"SLURM_GPUS_ON_NODE": "0", "GPUS_PER_NODE": "2"}, "2")])
def test_encode_sbatch_ranks_per_node_follow_the_gpus_allocated(tmp_path, env, processes):
    r = fake_sbatch(tmp_path, *ENCODE_ARGS, script=ENCODE_SBATCH, **env)
    assert r.returncode == 0, r.stderr
    assert srun_value(r, "--nproc_per_node") == processes


@pytest.mark.parametrize("argv, env, line", [
    (ENCODE_ARGS, {"SLURM_JOB_ID": None}, "not inside a SLURM allocation (SLURM_JOB_ID or SLURM_JOB_NODELIST unset)"),
    ((), {}, "no arguments: give launch/encode.py's"),
    (ENCODE_ARGS, {"SLURM_GPUS_ON_NODE": "4", "GPUS_PER_NODE": "8"}, "GPUS_PER_NODE=8 but SLURM allocated 4 GPU(s)"),
    (ENCODE_ARGS, {"GPUS_PER_NODE": "two"}, "GPUS_PER_NODE=two: not a positive number of ranks"),
    (ENCODE_ARGS, {"ENCODE_SCRIPT": "launch/nope.py"}, "ENCODE_SCRIPT=launch/nope.py: no such file in"),
])
def test_encode_sbatch_refusals_are_one_line_before_srun(tmp_path, argv, env, line):
    r = fake_sbatch(tmp_path, *argv, script=ENCODE_SBATCH, **env)
    errors = r.stderr.splitlines()
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: encode.sbatch: ")
    assert line in errors[0], errors
    assert r.stdout == ""  # srun never started


# srun that runs until a signal, as torchrun with ranks stopping on it: exits 1 (torchrun's report)
WAITING_SRUN = '#!/bin/bash\ntouch "$FAKE_CALLS.started"\ntrap "exit 1" USR1 TERM\nwhile :; do sleep 0.1; done\n'


@pytest.mark.parametrize("sig, requeue_rc, rc, requeued", [
    (signal.SIGUSR1, "0", 0, True),     # before the time limit: requeued, the same command goes on
    (signal.SIGUSR1, "1", 1, True),     # the requeue refused: the job fails and says what to do
    (signal.SIGTERM, "0", 1, False),    # scancel: stops, never requeued
])
def test_encode_sbatch_stopped_by_a_signal(tmp_path, sig, requeue_rc, rc, requeued):
    fake_sbatch(tmp_path, *ENCODE_ARGS, script=ENCODE_SBATCH)  # makes the stand-ins
    (tmp_path / "bin" / "srun").write_text(WAITING_SRUN)
    env = {k: v for k, v in os.environ.items() if k not in NO_SLURM}
    env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_CALLS=str(tmp_path / "calls"), SLURM_JOB_ID="7",
               SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", SLURM_SUBMIT_DIR=str(ROOT), FAKE_REQUEUE_RC=requeue_rc)
    job = subprocess.Popen(["bash", str(ENCODE_SBATCH), *ENCODE_ARGS], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "calls.started").exists(), 20, "srun to start")
    job.send_signal(sig)
    out, err = job.communicate(timeout=20)
    assert job.returncode == rc, (out, err)
    assert requeue_calls(tmp_path) == (["requeue 7"] if requeued else [])
    if requeued and requeue_rc != "0":
        assert err.splitlines()[-1:] == [
            "error: encode.sbatch: scontrol requeue failed (exit 1): job 7 is not requeued; "
            "submit the same command again to go on with the shards not yet written"]


def test_starts_stopped_before_training_anything_are_requeued_three_times_in_a_row_at_most(tmp_path):
    """A time limit shorter than --signal's lead (plus the start-up) signals every start as it begins: each
    stopped 'while starting', each requeued, forever. The third such start in a row of one job ends it
    failed, in one line; a start that trains resets the count."""
    (tmp_path / "run").mkdir(exist_ok=True)
    untrained = dict(FAKE_SRUN_RC="1", FAKE_MARK="SIGUSR1: nothing trained from this start (job 7)")
    for restart in ("0", "1"):
        r = fake_sbatch(tmp_path, "data.train=/d", SLURM_RESTART_COUNT=restart, **untrained)
        assert r.returncode == 0 and "requeueing job 7" in r.stdout, (r.stdout, r.stderr)
    r = fake_sbatch(tmp_path, "data.train=/d", SLURM_RESTART_COUNT="2", FAKE_SRUN_RC="138")  # counted alike
    assert r.returncode == 138 and len(requeue_calls(tmp_path)) == 2, r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.sbatch: 3 starts in a row were stopped by the "
                                                     "signal before training anything: not requeued again"), r.stderr
    # a resubmission starts counting again; a start that checkpointed resets it
    nothing, step_4 = "SIGUSR1: nothing trained from this start (job 7)", "SIGUSR1: checkpoint at step 4 (job 7)"
    for mark in (nothing, step_4, nothing, nothing):
        r = fake_sbatch(tmp_path, "data.train=/d", FAKE_SRUN_RC="1", FAKE_MARK=mark)
        assert r.returncode == 0 and "requeueing job 7" in r.stdout, (mark, r.stdout, r.stderr)
    assert (tmp_path / "run/.untrained-starts").read_text() == "7 2\n"
    # another job's count is not this one's
    (tmp_path / "run/.untrained-starts").write_text("6 2\n")
    r = fake_sbatch(tmp_path, "data.train=/d", **untrained)
    assert r.returncode == 0 and (tmp_path / "run/.untrained-starts").read_text() == "7 1\n"
