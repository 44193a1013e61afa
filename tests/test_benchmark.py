"""launch/benchmark.py runs end to end on tiny inputs and reports its ratios (what it measures is
in the README; no timing is asserted here), and a bad input is one line."""

import json
import math
import os
import subprocess
import sys
import tarfile
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
    monkeypatch.setattr(benchmark, "_plain_decode",
                        lambda images, processes, size: (plain.append(images), (1.0, 1.0))[1])
    return benchmark, shards, delivered, plain


def test_loader_bench_decodes_exactly_the_images_the_loader_delivered(tmp_path, monkeypatch):
    """The plain side decodes the loader's own window (by key), not a fixed set: photos differ in
    decoding cost, and a resampled stream reads whole shards, so a fixed set compared other photos."""
    benchmark, shards, delivered, plain = recorded_loader_bench(tmp_path, monkeypatch)
    p = ["loader", "--data", str(shards), "--image-size", "32", "--workers", "0", "--images", "40",
         "--batch-size", "8", "--shuffle-buffer", "8", "--rounds", "2"]
    assert benchmark.main(p) == 0
    by_key = benchmark._raw_images(str(shards))
    warmup = math.ceil(8 / 8) + 2  # the benchmark's warm-up batches (workers 0: one slot)
    windows = [sum(delivered[warmup:warmup + 5], []), sum(delivered[warmup + 5 + warmup:], [])]
    assert [len(w) for w in windows] == [40, 40]
    assert plain == [[by_key[k] for k in w] for w in windows]
    assert len(set(windows[0])) > 8  # many photos, from more than one shard


def test_loader_bench_counts_worker_cpu_on_the_images_the_workers_made_meanwhile(tmp_path, monkeypatch):
    """Between two points where the workers are idle (prefetch full), the reader takes n batches and
    the workers make the n after the prefetch: the plain side's CPU is measured on those n."""
    from harness.data import PREFETCH

    benchmark, shards, delivered, plain = recorded_loader_bench(tmp_path, monkeypatch)
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
    r, rows = bench("step", "--config", str(ROOT / "tests/configs/tiny.yaml"), "--image-size", "32",
                    "--batch-size", "4", "--steps", "2", "--warmup", "1", "--rounds", "1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = rows
    assert row["bench"] == "step", row
    assert all(v > 0 for k, v in row.items() if k.endswith("_ms")), row


def test_scale_bench_reports_ddp_and_zero_with_and_without_checkpointing(tmp_path):
    """Six 2-process runs (DDP, ZeRO-2, ZeRO-3; gradient checkpointing off/on) on the tiny model: ZeRO
    keeps about half of Adam's state per rank, ZeRO-3 about half of the parameters too."""
    r, rows = bench("scale", "--config", str(ROOT / "tests/configs/tiny.yaml"), "--image-size", "32",
                    "--batch-size", "2", "--steps", "1", "--warmup", "0", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (table,) = rows  # one JSON line: the six rows
    by = {(x["backend"], x["grad_ckpt"]): x for x in table}
    assert len(by) == 6, table
    ddp = by[("ddp", False)]
    for name in ("zero2", "zero3"):
        assert by[(name, False)]["optimizer_state_mib"] == pytest.approx(ddp["optimizer_state_mib"] / 2, rel=0.1)
    assert by[("zero3", False)]["params_resident_mib"] < 0.6 * ddp["params_resident_mib"]
    assert by[("ddp", True)]["activations_mib"] < ddp["activations_mib"]


def test_bad_input_is_one_line(tmp_path):
    r, rows = bench("loader", "--data", str(tmp_path / "missing"), tmp_path=tmp_path)
    assert r.returncode == 2 and rows == []
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such folder or file"], r.stderr
    r, _ = bench("step", "--config", str(ROOT / "tests/configs/tiny.yaml"), "model.colour=1", tmp_path=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: model.colour: unknown key"), r.stderr


TINY_PEER = ["--ch", "32", "--ch-mult", "1,2", "--layers", "1", "--image-size", "32", "--batch-size", "2",
             "--rounds", "1", "--warmup", "0", "--device", "cpu"]


def test_peer_bench_matches_diffusers_parameter_for_parameter(tmp_path):
    pytest.importorskip("diffusers")
    r, rows = bench("peer", *TINY_PEER, "--sides", "ours,diffusers,ours+channels_last", "--flops", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = rows
    assert row["params_ours"] == row["params_diffusers"] > 0
    assert f"ours {row['params_ours']:,}, diffusers {row['params_diffusers']:,}" in r.stdout
    sides = {s["side"]: s for s in row["rows"]}
    assert set(sides) == {"ours", "diffusers", "ours+channels_last"} and sides["diffusers"]["ratio"] == 1.0
    assert abs(sides["ours"]["ratio"] - sides["diffusers"]["ms"] / sides["ours"]["ms"]) < 0.01
    assert row["ratio"] == sides["ours"]["ratio"] and "ratio" in r.stdout
    assert row["flops_per_step"] > 0 and sides["ours"]["tflops"] > 0 and sides["ours"]["peak_fraction"] is None


def test_peer_bench_bad_input_is_one_line(tmp_path):
    r, rows = bench("peer", *TINY_PEER, "--sides", "ours,keras", tmp_path=tmp_path)
    assert r.returncode == 2 and rows == []
    assert r.stderr.strip().splitlines() == ["error: --sides: 'keras' is not ours|diffusers[+channels_last|+compile"
                                             "|+foreach|+fused]"], r.stderr


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
    status = {k: v["status"] for k, v in res["parts"].items()}
    assert status == {"install": "ok", "gpu_tests": "ok", "peer_bf16": "ok", "peer_fp16": "ok", "klf8_step": "skipped",
                      "step_host": "ok", "step_fused": "ok", "compile": "skipped"}, res["parts"]
    assert res["step_host"]["harness_ms"] > 0 and res["step_fused"]["harness_ms"] > 0
    assert res["gpu_tests"]["skipped"] >= 4 and "failed" not in res["gpu_tests"]
    for dtype in ("bf16", "fp16"):
        peer = res[f"peer_{dtype}"]
        assert peer["dtype"] == dtype and peer["params_ours"] == peer["params_diffusers"]
        assert [row["side"] for row in peer["rows"]] == ["ours", "diffusers"] and peer["rows"][0]["img_s"] > 0
    assert res["peer_bf16"]["flops_per_step"] > 0
    assert (out / "summary.txt").read_text().startswith("gpu_check (cpu)")


def test_gpu_check_names_a_wheels_folder_that_is_not_there(tmp_path):
    """WHEELS that is not a folder: the install part fails in one line, and env.json still says what the machine
    is (torch imports), so the rest is judged on the machine, not on a missing file."""
    out = tmp_path / "check"
    r = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OUT=str(out), BUDGET_S="15", WHEELS=str(tmp_path / "nope")))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"error: WHEELS={tmp_path / 'nope'} is not a folder" in (out / "install.log").read_text()
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["parts"]["install"]["status"] == "failed" and not res["ok"]
    assert res["env"]["device"] == "cpu" and res["env"]["torch"]
