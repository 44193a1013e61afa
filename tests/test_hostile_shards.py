"""Hostile inputs to `python -m shards` and to the index readers: non-regular files in a source
folder, negative --max-samples, an index.json whose fields have the wrong types or signs."""

from __future__ import annotations

import json
import os
import socket

import pytest
from shards_helpers import picture, run_cli

from shards.__main__ import main
from shards.index import read_index
from shards.sources import DataSourceError, resolve_sources


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", str(out), "--num-samples", "6", "--image-size", "8", "--shard-size", "4", "--quiet",
                 "--workers", "1"]) == 0
    return out


@pytest.mark.parametrize("value", ["-3", "-1"])
def test_a_negative_max_samples_is_a_one_line_usage_error(tmp_path, capsys, value):
    (tmp_path / "src").mkdir()
    picture(seed=0).save(tmp_path / "src" / "a.jpg")
    assert main(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--max-samples", value, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and "--max-samples" in err and value in err, err
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifos_and_sockets_in_the_source_are_bad_files_never_opened(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        picture(seed=i).save(src / f"k{i}.jpg")
    os.mkfifo(src / "x.jpg")  # opening it would wait for a writer forever
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "s.png"))
        r = run_cli("folder", src, tmp_path / "out", "--quiet", "--workers", "1", timeout=60)
    finally:
        sock.close()
    assert r.returncode == 0, r.stderr
    index = read_index(tmp_path / "out")
    assert index["num_samples"] == 3 and index["num_bad"] == 2
    report = dict(line.split("\t") for line in (tmp_path / "out" / "bad_files.txt").read_text().splitlines())
    reasons = {k.rsplit("/", 1)[1]: v for k, v in report.items()}
    assert "not a regular file" in reasons["x.jpg"] and "FIFO" in reasons["x.jpg"]
    assert "not a regular file" in reasons["s.png"] and "socket" in reasons["s.png"]


@pytest.mark.parametrize("edit, field", [
    (lambda ix: ix.update(num_samples="6"), "'num_samples'"),
    (lambda ix: ix.update(num_samples=-6), "'num_samples'"),
    (lambda ix: ix.update(num_samples=6.0), "'num_samples'"),
    (lambda ix: ix.update(num_samples=True), "'num_samples'"),
    (lambda ix: ix["shards"][1].update(num_samples="2"), "'shards[1].num_samples'"),
    (lambda ix: ix["shards"][0].update(num_samples=-4), "'shards[0].num_samples'"),
    (lambda ix: ix["shards"][0].update(name=7), "'shards[0].name'"),
    (lambda ix: ix["shards"][0].update(name="../000000.tar"), "'shards[0].name'"),
    (lambda ix: ix["shards"][1].update(name="/etc/passwd"), "'shards[1].name'"),
    (lambda ix: ix["shards"][0].update(name=""), "'shards[0].name'"),
    (lambda ix: ix["shards"][1].update(name="000000.tar"), "'shards' names '000000.tar' twice"),
    (lambda ix: ix.update(num_samples=ix["num_samples"] + 1), "'num_samples' is 7, but its shards' num_samples"),
    (lambda ix: ix["shards"][0].update(num_samples=ix["shards"][0]["num_samples"] - 1), "add up to 5"),
    (lambda ix: ix["shards"].append("000002.tar"), "'shards[2]'"),
    (lambda ix: ix.update(classes="abc"), "'classes'"),
    (lambda ix: ix.update(class_counts=[1, "2"]), "'class_counts[1]'"),
    (lambda ix: ix.update(num_bad="0"), "'num_bad'"),
])
def test_an_index_with_wrong_field_types_is_refused_in_one_line(demo, tmp_path, capsys, edit, field):
    out = tmp_path / "s"
    out.mkdir()
    for f in demo.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    index = json.loads((out / "index.json").read_text())
    edit(index)
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as e:
        read_index(out)
    assert str(out / "index.json") in str(e.value) and field in str(e.value) and "\n" not in str(e.value)
    for spec in (str(out), str(out / "{000000..000001}.tar")):
        with pytest.raises(DataSourceError, match=r"index\.json: field"):
            resolve_sources(spec)
    capsys.readouterr()
    for command in ("verify", "inspect"):
        assert main([command, str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert str(out / "index.json") in err and field in err and len(err.splitlines()) == 1, err


def test_a_good_index_still_reads(demo):
    assert read_index(demo)["num_samples"] == 6
    [s] = resolve_sources(str(demo))
    assert s.num_samples == 6
