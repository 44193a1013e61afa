"""launch/benchmark.py runs end to end on tiny inputs and reports its ratios (what it measures is
in the README; no timing is asserted here), and a bad input is one line."""

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from shardgen import make_shards

ROOT = Path(__file__).resolve().parents[1]
# Every test here runs a benchmark script in a subprocess: the slow set (CI runs it; the fast loop does not).
pytestmark = pytest.mark.slow


def bench(*args, tmp_path):
    out = tmp_path / "bench.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "launch/benchmark.py"), *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    return r, [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def test_loader_bench_reports_both_sides_and_their_ratio(tmp_path):
    shards = make_shards(tmp_path / "shards", num_samples=32, per_shard=16, size=40)
    r, rows = bench("loader", "--data", str(shards), "--image-size", "32", "--workers", "1", "--images", "64",
                    "--batch-size", "8", "--shuffle-buffer", "8", "--rounds", "1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = rows
    assert row["bench"] == "loader" and row["images"] == 64 and row["workers"] == 1
    assert row["raw_decode_img_s"] > 0 and row["harness_loader_img_s"] > 0
    assert abs(row["ratio"] - row["harness_loader_img_s"] / row["raw_decode_img_s"]) < 0.005, row
    assert "ratio" in r.stdout
    # CPU per image of the worker (counted between two points where it is idle), of the reader, of plain decoding
    assert row["worker_cpu_ms_per_img"] > 0 and row["plain_cpu_ms_per_img"] > 0 and row["reader_cpu_ms_per_img"] >= 0
    assert abs(row["cpu_ratio"] - row["plain_cpu_ms_per_img"] / row["worker_cpu_ms_per_img"]) < 0.01, row
    # and against the loader's own decoder without the loader (its machinery's share)
    assert row["own_decode_img_s"] > 0 and row["own_cpu_ms_per_img"] > 0
    assert abs(row["ratio_to_own_decode"] - row["harness_loader_img_s"] / row["own_decode_img_s"]) < 0.005, row
    assert abs(row["cpu_ratio_to_own_decode"] - row["own_cpu_ms_per_img"] / row["worker_cpu_ms_per_img"]) < 0.01
    assert "of the own decoder" in r.stdout


@pytest.fixture
def recorded_loader_bench(tmp_path, monkeypatch):
    """The loader benchmark in this process on 48 small images -> (module, shards, the keys of each batch
    the loader delivered, the images of each call to the plain side; which does not decode)."""
    sys.path.insert(0, str(ROOT / "launch"))
    import benchmark

    from harness.data import TrainLoader

    shards = make_shards(tmp_path / "shards", num_samples=48, per_shard=16, size=40)
    delivered, plain = [], []
    batches = TrainLoader.batches

    def recording(self, start=0):
        for batch in batches(self, start):
            delivered.append(list(batch["key"]))
            yield batch

    monkeypatch.setattr(TrainLoader, "batches", recording)
    def plain_decode(images, processes, size, how):
        calls.append(how)
        if how == "pil":  # the loader's own decoder gets the same images: checked once here
            plain.append(images)
        else:
            assert images == plain[-1]
        return 1.0, 1.0

    calls = []
    monkeypatch.setattr(benchmark, "_plain_decode", plain_decode)
    yield benchmark, shards, delivered, plain
    assert calls and calls == ["pil", "ours"] * (len(calls) // 2)


def test_loader_bench_decodes_exactly_the_images_the_loader_delivered(recorded_loader_bench):
    """The plain side decodes the loader's own window (by key), not a fixed set: photos differ in
    decoding cost, and a resampled stream reads whole shards, so a fixed set compared other photos."""
    benchmark, shards, delivered, plain = recorded_loader_bench
    p = ["loader", "--data", str(shards), "--image-size", "32", "--workers", "0", "--images", "40",
         "--batch-size", "8", "--shuffle-buffer", "8", "--rounds", "2"]
    assert benchmark.main(p) == 0
    by_key = benchmark._raw_images(str(shards))
    warmup = math.ceil(8 / 8) + 2  # the benchmark's warm-up batches (workers 0: one slot)
    windows = [sum(delivered[warmup:warmup + 5], []), sum(delivered[warmup + 5 + warmup:], [])]
    assert [len(w) for w in windows] == [40, 40]
    assert plain == [[by_key[k] for k in w] for w in windows]
    assert len(set(windows[0])) > 8  # many photos, from more than one shard


def test_loader_bench_counts_worker_cpu_on_the_images_the_workers_made_meanwhile(recorded_loader_bench):
    """Between two points where the workers are idle (prefetch full), the reader takes n batches and
    the workers make the n after the prefetch: the plain side's CPU is measured on those n."""
    from harness.data import PREFETCH

    benchmark, shards, delivered, plain = recorded_loader_bench
    p = ["loader", "--data", str(shards), "--image-size", "32", "--workers", "1", "--images", "32",
         "--batch-size", "8", "--shuffle-buffer", "8", "--rounds", "1"]
    assert benchmark.main(p) == 0
    by_key = benchmark._raw_images(str(shards))
    warmup, window, n = math.ceil(8 / 8) + 2, 4, 2  # warm-up batches, the wall window, n = window // 2
    first = warmup + window + PREFETCH  # the first batch the worker made between the two idle points
    assert len(plain) == 2 and plain[1] == [by_key[k] for k in sum(delivered[first:first + n], [])]


def test_loader_bench_refuses_repeated_keys(tmp_path):
    make_shards(tmp_path / "a", num_samples=16, per_shard=16, size=40)
    (tmp_path / "b").mkdir()
    (tmp_path / "b/000000.tar").write_bytes((tmp_path / "a/000000.tar").read_bytes())
    (tmp_path / "b/000001.tar").write_bytes((tmp_path / "a/000000.tar").read_bytes())
    r, rows = bench("loader", "--data", str(tmp_path / "b/{000000..000001}.tar"), "--workers", "0", tmp_path=tmp_path)
    assert r.returncode == 2 and rows == []
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "occurs twice" in r.stderr, r.stderr


def test_step_bench_compares_the_harness_with_a_plain_loop(tmp_path):
    """The plain loop runs in the harness's precision with its AdamW kernel: the ratio is the harness's own cost."""
    r, rows = bench("step", "--config", str(ROOT / "tests/configs/tiny.yaml"), "--image-size", "32",
                    "--batch-size", "4", "--steps", "2", "--warmup", "1", "--rounds", "1",
                    "train.mixed_precision=bf16", "optim.fused=true", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = rows
    assert row["bench"] == "step", row
    assert all(v > 0 for k, v in row.items() if k.endswith("_ms")), row
    assert row["mixed_precision"] == "bf16" and row["autocast"] and row["fused"] and not row["loss_scaler"], row
    assert "precision bf16, fused AdamW on both sides" in r.stdout


def test_encode_bench_compares_encode_py_with_a_plain_loop_on_the_same_images(tmp_path):
    import yaml

    from harness.config import load_config, to_dict
    from harness.export import save_safetensors
    from models import build_model

    shards = make_shards(tmp_path / "shards", num_samples=24, per_shard=8, size=40)
    cfg = load_config([], ["model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.norm_groups=8",
                           "model.z_channels=4", "model.embed_dim=4", "model.attn_type=none", "data.image_size=32",
                           f"data.train={shards}"])
    folder = tmp_path / "model"
    folder.mkdir()
    save_safetensors(build_model(cfg.model).state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    r, rows = bench("encode", str(folder), "--data", str(shards), "--workers", "1", "--batch-size", "8",
                    "--rounds", "1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = rows
    assert row["bench"] == "encode" and row["images"] == 24 and row["image_size"] == 32
    rates = row["img_per_s"]
    assert rates["encode.py"] > 0 and rates["plain loop"] > 0
    assert abs(row["ratio"] - rates["encode.py"] / rates["plain loop"]) < 1e-9 and "ratio" in r.stdout


def test_bf16_peak_matches_the_device_name_not_a_substring():
    sys.path.insert(0, str(ROOT / "launch"))
    from benchmark import bf16_peak

    assert bf16_peak("NVIDIA H200") == bf16_peak("NVIDIA H100 80GB HBM3") == bf16_peak("NVIDIA GH200 480GB") == 989
    assert bf16_peak("NVIDIA H100 NVL") == bf16_peak("NVIDIA H200 NVL") == 835  # not the SXM parts' 989
    assert bf16_peak("NVIDIA H100 PCIe") == 756 and bf16_peak("NVIDIA A100-SXM4-80GB") == 312
    assert (bf16_peak("NVIDIA L40S"), bf16_peak("NVIDIA L40"), bf16_peak("NVIDIA L4")) == (362, 181, 121)
    assert bf16_peak("NVIDIA GeForce RTX 4090") is None and bf16_peak("cpu") is None


def test_scale_bench_reports_ddp_and_zero_with_and_without_checkpointing(tmp_path):
    """2-process runs (DDP, ZeRO-2, ZeRO-3; gradient checkpointing off, and on for DDP) on the tiny model:
    ZeRO keeps about half of Adam's state per rank, ZeRO-3 about half of the parameters too. (The default
    is all six; four here, each run is a launch of its own.)"""
    r, rows = bench("scale", "--config", str(ROOT / "tests/configs/tiny.yaml"), "--image-size", "32",
                    "--batch-size", "2", "--steps", "1", "--warmup", "0", "--runs", "ddp,zero2,zero3,ddp+ckpt",
                    tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (table,) = rows  # one JSON line: the rows, in the order asked
    by = {(x["backend"], x["grad_ckpt"]): x for x in table}
    assert list(by) == [("ddp", False), ("zero2", False), ("zero3", False), ("ddp", True)], table
    ddp = by[("ddp", False)]
    for name in ("zero2", "zero3"):
        assert by[(name, False)]["optimizer_state_mib"] == pytest.approx(ddp["optimizer_state_mib"] / 2, rel=0.1)
    assert by[("zero3", False)]["params_resident_mib"] < 0.6 * ddp["params_resident_mib"]
    assert by[("ddp", True)]["activations_mib"] < ddp["activations_mib"]


def test_bad_input_is_one_line(tmp_path):
    r, rows = bench("loader", "--data", str(tmp_path / "missing"), tmp_path=tmp_path)
    assert r.returncode == 2 and rows == []
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such folder or file"], r.stderr
    r, rows = bench("scale", "--runs", "ddp,zero4+ckpt", tmp_path=tmp_path)
    assert r.returncode == 2 and rows == []
    assert r.stderr.strip().splitlines() == ["error: --runs: 'zero4+ckpt' is not ddp|zero2|zero3[+ckpt]"], r.stderr
    r, _ = bench("step", "--config", str(ROOT / "tests/configs/tiny.yaml"), "model.colour=1", tmp_path=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: model.colour: unknown key"), r.stderr


TINY_PEER = ["--ch", "32", "--ch-mult", "1,2", "--layers", "1", "--image-size", "32", "--batch-size", "2",
             "--rounds", "1", "--warmup", "0", "--device", "cpu"]


def test_peer_bench_matches_diffusers_parameter_for_parameter(tmp_path):
    """Same parameters; --fused reaches every side (one with options of its own too); each side's TFLOP/s is
    counted on its own model (diffusers' upsample-then-conv does more FLOPs than our phase conv)."""
    pytest.importorskip("diffusers")
    r, rows = bench("peer", *TINY_PEER, "--sides", "ours,diffusers,ours+channels_last", "--fused", "--flops",
                    tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = rows
    assert row["params_ours"] == row["params_diffusers"] > 0
    assert f"ours {row['params_ours']:,}, diffusers {row['params_diffusers']:,}" in r.stdout
    sides = {s["side"]: s for s in row["rows"]}
    assert set(sides) == {"ours+fused", "diffusers+fused", "ours+channels_last+fused"}, sides
    ours, theirs = sides["ours+fused"], sides["diffusers+fused"]
    assert theirs["ratio"] == 1.0 and abs(ours["ratio"] - theirs["ms"] / ours["ms"]) < 0.01
    assert row["ratio"] == ours["ratio"] and "ratio" in r.stdout
    assert row["flops_per_step_diffusers"] > row["flops_per_step"] > 0 and ours["peak_fraction"] is None
    for side, flops in ((ours, row["flops_per_step"]), (theirs, row["flops_per_step_diffusers"])):
        assert side["tflops"] == pytest.approx(flops / side["ms"] / 1e9, rel=1e-3), side


def test_peer_bench_bad_input_is_one_line(tmp_path):
    r, rows = bench("peer", *TINY_PEER, "--sides", "ours,keras", tmp_path=tmp_path)
    assert r.returncode == 2 and rows == []
    assert r.stderr.strip().splitlines() == ["error: --sides: 'keras' is not ours|diffusers[+channels_last|+nhwc"
                                             "|+nchw|+compile|+foreach|+fused|+nokernel]"], r.stderr
    r, rows = bench("peer", *TINY_PEER, "--sides", "ours+nchw", "--channels-last", tmp_path=tmp_path)
    assert r.returncode == 2 and rows == []
    assert r.stderr.strip().splitlines() == ["error: --sides: 'ours+nchw' with --nchw/--channels-last/--nhwc asks "
                                             "for both NHWC and NCHW memory"], r.stderr
    r, rows = bench("peer", *TINY_PEER, "--sides", "ours+nhwc+nchw", tmp_path=tmp_path)
    assert r.returncode == 2 and rows == [] and "asks for both NHWC and NCHW memory" in r.stderr, r.stderr


def test_peer_sides_run_in_the_memory_format_they_name():
    """Ours gets the batch layout the trainer's train.channels_last=auto gives (NHWC, but NCHW on CPU under
    bf16; +nchw: contiguous, +nhwc: NHWC); diffusers a contiguous one as its examples feed it (+nhwc: an NHWC
    batch); +channels_last: weights and batch NHWC."""
    pytest.importorskip("diffusers")
    import torch

    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import benchmark
    finally:
        sys.path.remove(str(ROOT / "launch"))
    a = argparse.Namespace(ch=32, ch_mult=(1, 2), layers=1, latent_channels=4, image_size=16)
    ours, peer = benchmark._peer_models(a, torch.device("cpu"))
    x = torch.rand(1, 3, 16, 16)
    seen = {}
    sides = [(s, "fp32") for s in ("ours", "ours+nchw", "ours+nhwc", "diffusers", "diffusers+channels_last",
                                   "ours+channels_last")]
    sides += [(s, "bf16") for s in ("ours", "ours+nhwc", "diffusers+nhwc")]
    for side, dtype in sides:
        step, model = benchmark._peer_side(side, ours if side.startswith("ours") else peer, torch.device("cpu"),
                                           benchmark.DTYPES[dtype], 1e-6)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        inputs = []
        hook = conv.register_forward_pre_hook(lambda m, args, into=inputs: into.append(args[0]))
        step(x)
        hook.remove()
        seen[side, dtype] = [t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                             for t in (conv.weight, inputs[0])]
    assert seen == {("ours", "fp32"): [False, True], ("ours+nchw", "fp32"): [False, False],
                    ("ours+nhwc", "fp32"): [False, True], ("diffusers", "fp32"): [False, False],
                    ("diffusers+channels_last", "fp32"): [True, True], ("ours+channels_last", "fp32"): [True, True],
                    ("ours", "bf16"): [False, False], ("ours+nhwc", "bf16"): [False, True],
                    ("diffusers+nhwc", "bf16"): [False, True]}, seen


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """launch/gpu_check.sh --cpu: every part runs (or is skipped on purpose) within its budget, one JSON.
    (About 30 s on an idle 2-core machine; the budget here leaves room for a busy one.)"""
    pytest.importorskip("diffusers")
    out, bundle, wheels = tmp_path / "check", tmp_path / "bundle", tmp_path / "wheels"
    # The offline path (WHEELS): pip, given the folder, leaves a package that is installed already alone (these
    # are not even wheels: installing one would fail the install part).
    wheels.mkdir()
    for name in ("webdataset", "typing_extensions", "PyYAML"):
        (wheels / f"{name}-0.0.1-py3-none-any.whl").write_bytes(b"")
    r = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OUT=str(out), BUDGET_S="240", WHEELS=str(wheels),
                                             BUNDLE=str(bundle)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # (pip given those empty files as wheels would have failed the install part: see the statuses below)
    assert sorted(f.name for f in bundle.iterdir()) == ["gpu_check.json", "gpu_check.tgz", "summary.txt"]
    with tarfile.open(bundle / "gpu_check.tgz") as tar:
        assert {"check/gpu_check.json", "check/install.log", "check/gpu_tests.log"} <= set(tar.getnames())
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["mode"] == "cpu" and res["ok"] and res["env"]["device"] == "cpu"
    assert res["env"]["diffusers"] is True and res["env"]["deepspeed"] is True  # imported, not just installed
    assert res["env"]["bf16_matmul_tflops"] > 0 and res["env"]["bf16_matmul_n"] == 256  # (8192 on a GPU)
    assert res["env"]["fallback_site"] is None  # pip had nothing to install
    status = {k: v["status"] for k, v in res["parts"].items()}
    assert status == {"install": "ok", "gpu_tests": "ok", "peer_bf16": "ok", "peer_fp16": "ok", "klf8_step": "skipped",
                      "step_host": "ok", "step_fused": "ok", "encode": "ok", "compile": "skipped"}, res["parts"]
    assert res["step_host"]["harness_ms"] > 0 and res["step_fused"]["harness_ms"] > 0
    assert res["encode"]["images"] == 48 and res["encode"]["ratio"] > 0 and "encode: 48 images at 32 px" in (
        out / "summary.txt").read_text()
    assert res["step_host"]["autocast"] and res["step_fused"]["fused"] and not res["step_host"]["fused"]
    assert res["gpu_tests"]["skipped"] >= 4 and "failed" not in res["gpu_tests"]
    # one outcome per test (pytest -v), here the one test for any device, twice, and the skipped GPU tests
    each = res["gpu_tests_each"]
    assert [v for k, v in each.items() if "in_process" in k] == ["passed", "passed"], each
    assert sum(v == "skipped" for v in each.values()) == res["gpu_tests"]["skipped"]
    for dtype in ("bf16", "fp16"):
        peer = res[f"peer_{dtype}"]
        assert peer["dtype"] == dtype and peer["params_ours"] == peer["params_diffusers"]
        sides = [row["side"] for row in peer["rows"]]
        assert sides == ["ours+fused", "diffusers+fused"] and peer["rows"][0]["img_s"] > 0  # fused AdamW on both
    assert res["peer_bf16"]["flops_per_step_diffusers"] > res["peer_bf16"]["flops_per_step"] > 0
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu_check (cpu)") and "bf16 ceiling: data sheet n/a TFLOP/s, measured" in summary


def test_gpu_check_names_a_wheels_folder_that_is_not_there(tmp_path):
    """WHEELS that is not a folder: the install part fails in one line, and env.json still says what the machine
    is (torch imports), so the rest is judged on the machine, not on a missing file."""
    out = tmp_path / "check"
    r = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OUT=str(out), BUDGET_S="60", PARTS="install",
                                             WHEELS=str(tmp_path / "nope")))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"error: WHEELS={tmp_path / 'nope'} is not a folder" in (out / "install.log").read_text()
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["parts"]["install"]["status"] == "failed" and not res["ok"]
    assert res["env"]["device"] == "cpu" and res["env"]["torch"]


def wheel_of(dist: str, folder: Path) -> Path:
    """A wheel of an installed pure-Python distribution, zipped from its installed files."""
    import importlib.metadata

    d = importlib.metadata.distribution(dist)
    path = folder / f"{dist}-{d.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f in d.files:
            if f.suffix != ".pyc" and ".." not in f.parts:
                z.write(f.locate(), str(f))
    return path


def test_gpu_check_installs_into_a_folder_when_the_environment_takes_nothing(tmp_path):
    """The offline install when pip cannot write the image's environment (a read-only one, here a python3 whose
    pip refuses webdataset): that package and the folder's packages the environment lacks go into SITE
    (--target, --no-deps), which every later part (and a warm rerun) has on PYTHONPATH."""
    pytest.importorskip("diffusers")
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "check"
    wheels.mkdir()
    wheel_of("webdataset", wheels)
    probe = "gc_probe"  # a package this environment lacks
    with zipfile.ZipFile(wheels / f"{probe}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{probe}/__init__.py", "")
        z.writestr(f"{probe}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {probe}\nVersion: 1.0\n")
        z.writestr(f"{probe}-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{probe}-1.0.dist-info/RECORD", "")
    python = tmp_path / "python3"
    python.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2 $3" = "-m pip install" ] && [[ " $* " == *" webdataset "* && " $* " != *" --target "* ]]; then
  echo "ERROR: Could not install packages due to an OSError: [Errno 30] Read-only file system" >&2; exit 1
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env = dict(os.environ, OUT=str(out), WHEELS=str(wheels), SITE=str(site), PYTHON=str(python), PARTS="install")
    r = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + (out / "install.log").read_text()[-3000:]
    log = (out / "install.log").read_text()
    assert f"pip could not install webdataset into {sys.prefix}: falling back to --target {site}" in log, log
    assert f"into {site}: webdataset {probe}" in log, log  # not the environment's own packages
    assert (site / "webdataset/__init__.py").exists() and (site / probe).is_dir()
    assert (site / ".gpu_check_site").exists()  # the mark that puts it on PYTHONPATH
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["env"]["fallback_site"] == str(site) and res["parts"]["install"]["status"] == "ok"
    assert {v["note"] for k, v in res["parts"].items() if k != "install"} <= {"not in PARTS", "cpu mode"}


def test_gpu_check_parts_and_a_part_stopped_in_a_test(tmp_path):
    """PARTS=gpu_tests: env.json alone (no install), every other part skipped; a test that hangs is stopped with
    the part, and the JSON still has each test's outcome: the one that passed, and the one that never ended."""
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "gc_hang.py").write_text("import time\n\n\ndef pytest_runtest_call(item):\n"
                                       "    if item.name.endswith('[no]'):\n        time.sleep(600)\n")
    out = tmp_path / "check"
    env = dict(os.environ, OUT=str(out), BUDGET_S="30", PARTS="gpu_tests", PYTEST_ADDOPTS="-p gc_hang",
               PYTHONPATH=f"{plugin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    r = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["parts"]["env"]["status"] == "ok" and "install" not in res["parts"] and res["env"]["device"] == "cpu"
    assert res["parts"]["gpu_tests"]["status"] == "timeout"
    assert res["parts"]["peer_bf16"]["note"] == "not in PARTS" and res["parts"]["compile"]["status"] == "skipped"
    test = "tests/test_gpu.py::test_in_process_runs_may_change_precision"
    assert res["gpu_tests_each"] == {f"{test}[bf16]": "passed", f"{test}[no]": "unfinished"}, res["gpu_tests_each"]
    assert f"UNFINISHED {test}[no]" in (out / "summary.txt").read_text()


def test_gpu_check_refuses_an_unknown_part(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, OUT=str(tmp_path / "check"), PARTS="install,gpu_test"))
    assert r.returncode == 2 and not (tmp_path / "check").exists()
    assert r.stderr.startswith("error: PARTS: unknown part 'gpu_test' (parts: install gpu_tests "), r.stderr
