"""Real multi-process runs on CPU through `accelerate launch` (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shardgen import make_shards

from harness import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def accelerate_launch(*args, nproc=2, extra_launch=(), timeout=300):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           *extra_launch, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=128, per_shard=16, size=40)


def test_two_ranks_read_disjoint_samples(shards, tmp_path):
    r = accelerate_launch(ROOT / "tests/dist_keys.py", shards, tmp_path, 6, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.loads((tmp_path / f"keys_rank{i}.json").read_text()) for i in range(2)]
    assert [s["rank"] for s in seen] == [0, 1] and all(s["world_size"] == 2 for s in seen)
    a, b = set(seen[0]["keys"]), set(seen[1]["keys"])
    assert len(seen[0]["keys"]) == 24 and a and b and not a & b


def test_two_process_training_checkpoints_and_resumes(shards, tmp_path):
    run = tmp_path / "run"
    cfg = ["--config", ROOT / "tests/configs/tiny.yaml", f"data.train={shards}", f"run.dir={run}"]
    r = accelerate_launch(ROOT / "launch/train.py", *cfg, "train.max_steps=10", "checkpoint.every_steps=5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) (MULTI_CPU" in r.stderr
    state = ckpt.read_state(ckpt.resolve(run, "latest"))
    assert state["step"] == 10 and state["samples_seen"] == 10 * 4 * 2 and state["data_layout"]["world_size"] == 2
    assert (run / "checkpoints/step_10/random_states_1.pkl").is_file()  # every rank saved its RNG
    r = accelerate_launch(ROOT / "launch/train.py", *cfg, "train.max_steps=14", "checkpoint.every_steps=5",
                          "--resume", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 10/14" in r.stderr
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 14
    losses = [float(w.split("=")[1]) for line in (run / "train.log").read_text().splitlines()
              for w in line.split() if w.startswith("loss/recon=")]
    assert len(losses) == 7 and sum(losses[-2:]) < sum(losses[:2])


def test_multi_gpu_after_the_script_name_runs_what_it_means(shards, tmp_path):
    """The user's spelling: `accelerate launch launch/train.py --multi_gpu --num_processes 2 ...`
    starts the 2-process run itself (accelerate alone would start one process)."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", ROOT / "launch/train.py", "--multi_gpu",
           "--num_processes", "2", "--main_process_port", "0", "--config", ROOT / "tests/configs/tiny.yaml",
           f"data.train={shards}", f"run.dir={run}", "train.max_steps=4"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "running: accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 launch/train.py" in r.stderr
    assert "2 process(es) (MULTI_CPU" in r.stderr
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["data_layout"]["world_size"] == 2
