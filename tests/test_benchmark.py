"""launch/benchmark.py runs end to end on tiny inputs and reports its ratios (what it measures is
in the README; no timing is asserted here), and a bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

from shardgen import make_shards

ROOT = Path(__file__).resolve().parents[1]


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


def test_step_bench_compares_the_harness_with_a_plain_loop(tmp_path):
    r, rows = bench("step", "--config", str(ROOT / "tests/configs/tiny.yaml"), "--image-size", "32",
                    "--batch-size", "4", "--steps", "2", "--warmup", "1", "--rounds", "1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = rows
    assert row["bench"] == "step", row
    assert all(v > 0 for k, v in row.items() if k.endswith("_ms")), row


def test_bad_input_is_one_line(tmp_path):
    r, rows = bench("loader", "--data", str(tmp_path / "missing"), tmp_path=tmp_path)
    assert r.returncode == 2 and rows == []
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such folder or file"], r.stderr
    r, _ = bench("step", "--config", str(ROOT / "tests/configs/tiny.yaml"), "model.colour=1", tmp_path=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: model.colour: unknown key"), r.stderr
