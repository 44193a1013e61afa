"""shards.sources.resolve_sources (folders, patterns, img2dataset output, list files, weights) and
`python -m shards verify / inspect` on good and broken sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shards_helpers import img2dataset_folder, picture, write_tar

from shards.__main__ import main
from shards.index import read_index
from shards.sources import DataSourceError, resolve_sources

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", str(out), "--num-samples", "50", "--image-size", "16", "--shard-size", "20", "--quiet",
                 "--workers", "1"]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# resolve_sources


def test_folder_and_pattern_with_index(demo):
    [s] = resolve_sources(str(demo))
    assert s.num_samples == 50 and len(s.urls) == 3 and s.count_from == "index"
    assert len(s.classes) == 10 and len(s.label_names) == 7 and s.weight == 1.0
    [p] = resolve_sources(f"{demo}/{{000000..000001}}.tar")
    assert p.num_samples == 40 and p.classes == s.classes
    [one] = resolve_sources(f"{demo}/000002.tar")
    assert one.num_samples == 10


def test_img2dataset_counts_from_stats(tmp_path):
    root = img2dataset_folder(tmp_path / "i2d")
    [s] = resolve_sources(str(root))
    assert s.num_samples == 5 and s.count_from == "stats" and [u[-9:] for u in s.urls] == ["00000.tar", "00001.tar"]
    assert s.classes == [] and s.label_names == []
    [p] = resolve_sources(f"{root}/{{00000..00001}}.tar")
    assert p.num_samples == 5
    # The pipeline can read them as they are.
    import webdataset as wds

    rows = list(wds.WebDataset(s.urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert len(rows) == 5 and rows[0][1] == "caption 0"
    assert main(["verify", str(root), "--workers", "1"]) == 0


def test_missing_count_needs_num_samples(tmp_path):
    root = img2dataset_folder(tmp_path / "i2d", stats=False)
    with pytest.raises(DataSourceError) as e:
        resolve_sources(str(root))
    assert "data.num_samples" in str(e.value) and "\n" not in str(e.value)
    [s] = resolve_sources(str(root), num_samples=1234)
    assert s.num_samples == 1234 and s.count_from == "num_samples"
    [s] = resolve_sources(str(root), require_count=False)
    assert s.num_samples is None


def test_weights_list_files_and_mixing(tmp_path, demo):
    i2d = img2dataset_folder(tmp_path / "i2d")
    a, b = resolve_sources([f"{demo}::0.7", f"{i2d}::0.3"])
    assert (a.weight, a.num_samples, b.weight, b.num_samples) == (0.7, 50, 0.3, 5)
    lst = tmp_path / "sets.txt"
    lst.write_text(f"# shards for the run\n{demo}/{{000000..000001}}.tar\n\n{demo}/000002.tar\n")
    [s] = resolve_sources(str(lst))  # unweighted lines are pooled into one source
    assert s.num_samples == 50 and len(s.urls) == 3 and len(s.classes) == 10
    rel = tmp_path / "sub" / "rel.txt"
    rel.parent.mkdir()
    rel.write_text("../i2d::2\n../sets.txt::1\n")  # relative to the list file; nesting; weights
    x, y = resolve_sources(f"{rel}::0.5")
    assert (x.weight, x.num_samples) == (1.0, 5) and (y.weight, y.num_samples) == (0.5, 50)
    # img2dataset without stats + demo with an index: data.num_samples fills only the unknown one.
    nostats = img2dataset_folder(tmp_path / "nostats", shards=(2, 2, 2), stats=False)
    d, n = resolve_sources([str(demo), str(nostats)], num_samples=600)
    assert (d.num_samples, n.num_samples) == (50, 600)


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/nope", "no such folder"),
    ("{tmp}/nope/{{000..002}}.tar", "3 of 3 shards do not exist"),
    ("{tmp}/empty", "holds no .tar shards"),
    ("{tmp}/missing.txt", "list file does not exist"),
    ("{demo}::heavy", "must be a number"),
    ("{demo}::-1", "positive"),
    ("{tmp}/file.json", "not a folder of shards"),
])
def test_source_errors_are_one_line(tmp_path, demo, spec, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(DataSourceError) as e:
        resolve_sources(spec.format(tmp=tmp_path, demo=demo))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sources_with_different_classes_do_not_mix(tmp_path, demo):
    other = tmp_path / "other"
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        picture(seed=1).save(tmp_path / "src" / c / "x.jpg")
    assert main(["folder", str(tmp_path / "src"), str(other), "--quiet", "--workers", "1"]) == 0
    with pytest.raises(DataSourceError, match="class names"):
        resolve_sources([str(demo), str(other)])
    listed = tmp_path / "both.txt"  # pooled in a list file: the same
    listed.write_text(f"{demo}\n{other}\n")
    with pytest.raises(DataSourceError, match="class names"):
        resolve_sources(str(listed))
    # For a model that reads no class: they mix, and the names, which mean nothing together, are dropped.
    for spec in ([str(demo), str(other)], str(listed)):
        sources = resolve_sources(spec, names=False)
        assert sum(len(s.urls) for s in sources) == 4 and all(s.classes == [] for s in sources)
    assert len(resolve_sources([str(demo), str(demo)], names=False)[0].classes) == 10  # alike: kept
    (other / "index.json").write_text("{not json")
    with pytest.raises(DataSourceError, match="not valid JSON"):
        resolve_sources(str(other))


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"[1, 2]", b'"text"'])
def test_a_corrupt_index_is_a_one_line_error_naming_the_file(tmp_path, capsys, content):
    out = tmp_path / "s"
    assert main(["demo", str(out), "--num-samples", "4", "--image-size", "8", "--quiet", "--workers", "1"]) == 0
    (out / "index.json").write_bytes(content)
    with pytest.raises(DataSourceError) as e:
        resolve_sources(str(out))
    assert str(out / "index.json") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataSourceError, match="index.json"):
        resolve_sources(str(out / "{000000..000000}.tar"))
    capsys.readouterr()
    for command in ("verify", "inspect"):
        assert main([command, str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert str(out / "index.json") in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------
# verify / inspect


def test_verify_good_set(demo, capsys):
    assert main(["verify", str(demo), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "50 samples read (50 expected)" in out and "circle:5" in out and "warm:" in out and "OK" in out


def test_inspect(demo, tmp_path, capsys):
    assert main(["inspect", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "50 in 3 shards" in out and "classes:      10: circle" in out and "16x16 RGB" in out
    i2d = img2dataset_folder(tmp_path / "i2d")
    assert main(["inspect", str(i2d), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "5 in 2 shards (count from: stats" in out and "caption 0" in out



@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_reader_that_went_away_ends_it_quietly(demo, command):
    """`python -m shards inspect OUT | head -1`: the pipe's reader is gone before the report is out.
    No traceback, no "Exception ignored" at exit: exit 141 (128 + SIGPIPE), as cat or ls would."""
    read, write = os.pipe()
    os.close(read)  # the reader left before anything was written: every write fails
    r = subprocess.run([sys.executable, "-m", "shards", command, str(demo)], stdout=write, stderr=subprocess.PIPE,
                       text=True, cwd=ROOT, timeout=120)
    os.close(write)
    assert r.returncode == 141 and r.stderr == "", (r.returncode, r.stderr)

def _copy(demo, dst):
    import shutil

    shutil.copytree(demo, dst)
    return dst


def _rewrite_shard(path, change):
    """Rewrite one of our shards, passing its samples through change(list) -> list."""
    from shards.check import iter_samples

    samples = [(s.pop("__key__"), s) for s in iter_samples(str(path))]
    write_tar(path, change(samples))


def test_verify_finds_broken_samples(demo, tmp_path, capsys):
    bad = _copy(demo, tmp_path / "bad")

    def corrupt(samples):
        samples[0][1]["jpg"] = samples[0][1]["jpg"][:100]  # truncated image
        samples[1][1]["cls"] = b"42"  # class out of range
        m = json.loads(samples[2][1]["json"])
        m["labels"] = [0, 99]
        samples[3][1]["json"] = b"{oops"
        samples[2][1]["json"] = json.dumps(m).encode()
        return samples

    _rewrite_shard(bad / "000001.tar", corrupt)
    assert main(["verify", str(bad), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "does not decode" in out and "cls 42 outside 0..9" in out and "outside 0..6" in out
    assert "json does not parse" in out and "FAILED" in out


def test_verify_finds_count_mismatch_and_truncatedwrite_tar(demo, tmp_path, capsys):
    short = _copy(demo, tmp_path / "short")
    _rewrite_shard(short / "000000.tar", lambda s: s[:-1])
    assert main(["verify", str(short), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "000000.tar: 19 samples, index says 20" in out and "class_counts" in out

    cut = _copy(demo, tmp_path / "cut")
    data = (cut / "000002.tar").read_bytes()
    (cut / "000002.tar").write_bytes(data[: len(data) // 2 + 100])
    assert main(["verify", str(cut), "--workers", "2"]) == 1
    assert "broken tar" in capsys.readouterr().out


def test_verify_exit_code_from_a_fresh_process(demo, tmp_path):
    from shards_helpers import run_cli

    bad = _copy(demo, tmp_path / "bad")
    _rewrite_shard(bad / "000000.tar", lambda s: s + [("extra", {"jpg": b"not a jpeg", "cls": b"1"})])
    r = run_cli("verify", bad, "--workers", "1")
    assert r.returncode == 1 and "extra: jpg does not decode" in r.stdout
    assert read_index(bad)["num_samples"] == 50


def test_shards_imports_nothing_from_harness():
    """The floors point down: harness reads shards, never the other way round (fresh interpreter,
    so modules other tests imported do not count)."""
    import subprocess
    import sys
    from pathlib import Path

    names = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "shards").glob("*.py"))
    code = (f"import importlib, sys\nfor n in {names!r}: importlib.import_module('shards.' + n)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'harness')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(names) > 5 and r.stdout.strip() == ""
