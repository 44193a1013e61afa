"""Scale-out building blocks on CPU: harness/scale.py under 2-process DDP, ZeRO-2 and ZeRO-3 (real
`accelerate launch` runs of tests/dist/scale_worker.py), sharded save/resume, and launch/export.py."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import export  # noqa: E402

WORKER = ROOT / "tests" / "dist" / "scale_worker.py"
BACKENDS = {  # name -> accelerate config, extra env
    "ddp": ("launch/accelerate/cpu2.yaml", {}),
    "zero2": ("launch/accelerate/zero2.yaml", {}),
    "zero3": ("launch/accelerate/zero3.yaml", {"GRAD_CKPT": "1"}),
    # DeepSpeedCPUAdam is compiled on first use (about 2 minutes here, then cached in ~/.cache/torch_extensions)
    "zero3_offload": ("launch/accelerate/zero3_offload.yaml", {}),
}
EXACT = ["ddp", "zero2", "zero3"]  # resumed bitwise (offload: same path as zero3, not run twice)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, out, ckpt, mode, *, num_processes=2, extra_env=None, launcher_args=(), timeout=300):
    cmd = ["accelerate", "launch", "--config_file", config, "--num_processes", str(num_processes),
           "--main_process_port", str(free_port()), *launcher_args, str(WORKER), str(out), str(ckpt), mode]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def reports(out, mode, n=2):
    return [json.loads((Path(out) / f"{mode}_rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run per backend, made on first use: name -> (out folder, checkpoint folder)."""
    runs = {}

    def get(name):
        if name not in runs:
            if name == "zero3_offload" and not shutil.which("c++"):
                pytest.skip("ZeRO offload compiles DeepSpeedCPUAdam: needs a C++ compiler")
            out = tmp_path_factory.mktemp(name)
            config, env = BACKENDS[name]
            r = launch(config, out, out / "ckpt", "train", extra_env=env)
            assert r.returncode == 0, r.stderr[-3000:]
            runs[name] = (out, out / "ckpt")
        return runs[name]

    return get


# ---------------------------------------------------------------------------------------------
# Multi-process runs (slow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKENDS))
def test_trains_and_everyone_agrees_on_the_world(trained, name):
    out, _ = trained(name)
    r0, r1 = reports(out, "train")
    for rank, r in enumerate((r0, r1)):
        # accelerate must count what torch.distributed runs (it said 1 before harness.scale)
        assert (r["rank"], r["world"], r["acc_num_processes"], r["acc_process_index"]) == (rank, 2, 2, rank)
        assert r["losses"][-1] < 0.9 * r["losses"][0], r["losses"]
        assert r["ema_updates"] == len(r["losses"]) and r["ema_shapes_whole"]  # restored with the checkpoint
    if name != "ddp":
        assert r0["zero_stage"] == int(name[4])
        # configure_deepspeed filled what the JSON leaves "auto": no DataLoader was prepared
        assert r0["ds"] == {"micro": 4, "accum": 2, "train_batch": 16, "clip": 0.5}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_plain_accelerator_miscounts_on_cpu(name, tmp_path):
    """Without harness.scale.accelerator_kwargs() accelerate counts 1 process on a GPU-less machine
    (DDP would silently not synchronise); check_world() stops the run, naming the fix."""
    if torch.cuda.is_available():
        pytest.skip("a CPU-only fact")
    r = launch(BACKENDS[name][0], tmp_path, tmp_path / "ckpt", "train", extra_env={"PLAIN_ACCELERATOR": "1"})
    assert r.returncode != 0
    assert "torch.distributed runs 2 processes but accelerate counts 1" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_resume_continues_exactly(trained, name):
    out, ckpt = trained(name)
    r = launch(BACKENDS[name][0], out, ckpt, "resume", extra_env=BACKENDS[name][1])
    assert r.returncode == 0, r.stderr[-3000:]
    for straight, resumed in zip(reports(out, "train"), reports(out, "resume")):
        assert resumed["after"] == straight["after"]  # weights, Adam state, scheduler, RNG: bitwise
        assert resumed["lr"] == straight["lr"] and resumed["ema_updates"] == straight["ema_updates"]
    before = torch.load(out / "train_weights.pt")
    after = torch.load(out / "resume_weights.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKENDS))
def test_export_consolidates_the_checkpoint(trained, name, tmp_path):
    out, ckpt = trained(name)
    if name != "ddp":  # one shard of optimizer state per rank
        assert sorted(p.name for p in (ckpt / "pytorch_model").glob("*optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = export.consolidate(ckpt)
    ref = torch.load(out / "train_weights.pt")
    assert state.keys() == ref.keys()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], ref[k]) for k in ref)
    (ckpt / "config.yaml").write_text("model: {}\n")
    assert export.main([str(ckpt), "--out", str(tmp_path / "exp")]) == 0
    from safetensors.torch import load_file

    written = load_file(tmp_path / "exp" / "model.safetensors")
    assert all(torch.equal(written[k], ref[k]) for k in ref)
    assert (tmp_path / "exp" / "config.yaml").read_text() == "model: {}\n"


@pytest.mark.slow
def test_zero_checkpoint_needs_the_same_world_size(trained, tmp_path):
    out, ckpt = trained("zero2")
    r = launch("launch/accelerate/zero2.yaml", tmp_path, ckpt, "resume", num_processes=1)
    assert r.returncode != 0
    assert "used a DP world size of 2 but the current world size is 1" in r.stderr


@pytest.mark.slow
def test_two_nodes_on_one_machine(tmp_path):
    """Two `accelerate launch`es, --num_processes counting the whole job, as train.sbatch runs them."""
    port = free_port()
    procs = [
        subprocess.Popen(
            ["accelerate", "launch", "--config_file", "launch/accelerate/zero2.yaml", "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), str(WORKER), str(tmp_path), str(tmp_path / "ckpt"), "train"],
            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert [r["world"] for r in reports(tmp_path, "train")] == [2, 2]
    assert (tmp_path / "ckpt" / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


# ---------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------


def test_export_plain_checkpoint_and_errors(tmp_path):
    from accelerate import Accelerator

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    acc.save_state(tmp_path / "ckpt")
    state = export.consolidate(tmp_path / "ckpt")
    ref = model.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    assert state["1.num_batches_tracked"].dtype == torch.int64  # integer buffers keep their dtype

    torch.save({k: v.half() for k, v in ref.items()}, tmp_path / "pytorch_model.bin")
    assert export.consolidate(tmp_path)["0.weight"].dtype == torch.float32
    (tmp_path / "empty").mkdir()
    with pytest.raises(export.ExportError, match="neither"):
        export.consolidate(tmp_path / "empty")
    assert export.main([str(tmp_path / "empty")]) == 2


def test_misplaced_launcher_flags_are_explained():
    from harness import scale

    assert scale.misplaced_launcher_flags(["--config", "x.yaml", "train.batch_size=4"]) is None
    msg = scale.misplaced_launcher_flags(["--config", "x.yaml", "--multi_gpu", "--num_processes=8"])
    assert msg.startswith("--multi_gpu --num_processes belongs to `accelerate launch`, before the script name")
    assert "\n" not in msg
