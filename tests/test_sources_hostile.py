"""Data sources from a hostile review: weights that overflow, brace patterns over several folders,
unlabelled sources for a model that reads labels, weights in held-out data, bad-sample lines that
name their folder, and command-line lists that do not parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shardgen import make_shards, rename_classes

from harness.config import ConfigError, from_dict, load_config, to_dict
from harness.data import TrainLoader, eval_batches, unread_note
from launch.train import main as train_main
from shards.decode import BadSample
from shards.sources import DataSourceError, resolve_sources

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "launch" / "configs" / "demo.yaml"


def small(out: Path, **kw) -> Path:
    """8 tiny samples in 2 shards, classes c0..c3 (unless told otherwise)."""
    return make_shards(out, num_samples=8, per_shard=4, size=16, **kw)


def unlabelled(out: Path) -> Path:
    """As `small`, but its index names no classes (a `python -m shards folder` of one folder)."""
    rename_classes(small(out), [])
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {"a": small(root / "a"), "b": small(root / "b"), "three": small(root / "three", num_classes=3),
            "bare": unlabelled(root / "bare"), "tagged": small(root / "tagged", label_names=["x", "y"])}


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def loader_cfg(train, **kw):
    from harness.config import DataConfig

    return DataConfig(**{"train": train, "image_size": 16, "num_workers": 0, "shuffle_buffer": 0, **kw})


# ----------------------------------------------------------------------------------------------
# 1. weights: each finite and above 0, and so their total


def test_weights_whose_total_overflows_are_refused(sets):
    a, b = sets["a"], sets["b"]
    assert [s.weight for s in resolve_sources(f"{a}::1e308")] == [1e308]  # alone: fine
    with pytest.raises(DataSourceError) as e:
        resolve_sources([f"{a}::1e308", f"{b}::1e308"])
    assert "add up to inf" in one_line_error(e)


@pytest.mark.parametrize("weight, says", [("1e300", "is inf"), ("1e-200", "is 0,")])
def test_a_list_files_weight_times_its_lines_must_stay_finite_and_above_0(sets, tmp_path, weight, says):
    listed = tmp_path / "sets.txt"
    listed.write_text(f"{sets['a']}::{weight}\n")
    with pytest.raises(DataSourceError) as e:
        resolve_sources([f"{listed}::{weight}", str(sets["b"])])
    msg = one_line_error(e)
    assert says in msg and f"{listed}::{weight}:1" in msg  # the line that overflowed


def test_the_trainer_refuses_overflowing_weights_before_the_run_folder(sets, tmp_path, capsys):
    run = tmp_path / "run"
    code = train_main(["--config", str(DEMO), f"data.train=[{sets['a']}::1e308, {sets['b']}::1e308]",
                       f"run.dir={run}", "data.num_workers=0", "train.max_steps=2", "train.batch_size=4",
                       "log.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "add up to inf" in err and len(err.splitlines()) == 1, err
    assert not run.exists()


# ----------------------------------------------------------------------------------------------
# 2. a brace pattern over several folders is a list of them


def test_a_brace_pattern_over_two_folders_checks_their_class_names(sets):
    root = sets["a"].parent
    with pytest.raises(DataSourceError) as e:
        resolve_sources(f"{root}/{{a,three}}/000000.tar")
    msg = one_line_error(e)
    assert "class names" in msg and f"[{sets['three']}]" in msg and f"[{sets['a']}]" in msg
    # As a list of the same shards: the same refusal.
    with pytest.raises(DataSourceError, match="class names"):
        resolve_sources([f"{sets['a']}/000000.tar", f"{sets['three']}/000000.tar"])
    # For a model that reads no class: they mix, their names dropped, as a list's are.
    [s] = resolve_sources(f"{root}/{{a,three}}/000000.tar", names=False)
    assert s.classes == [] and s.num_samples == 8


def test_a_brace_pattern_over_two_folders_takes_counts_and_names_from_both(sets):
    root = sets["a"].parent
    [s] = resolve_sources(f"{root}/{{b,a}}/{{000001,000000}}.tar")
    assert s.num_samples == 16 and s.count_from == "index" and s.classes == ["c0", "c1", "c2", "c3"]
    assert [Path(u).relative_to(root).as_posix() for u in s.urls] == [
        "b/000001.tar", "b/000000.tar", "a/000001.tar", "a/000000.tar"]  # the pattern's own order


def test_a_brace_pattern_with_an_unlabelled_folder_is_refused_where_classes_are_read(sets):
    root = sets["a"].parent
    assert len(resolve_sources(f"{root}/{{a,bare}}/000000.tar")[0].urls) == 2  # nothing read: fine
    with pytest.raises(DataSourceError) as e:
        resolve_sources(f"{root}/{{a,bare}}/000000.tar", needs="cls")
    assert f"[{sets['bare']}]: no class names" in one_line_error(e)


# ----------------------------------------------------------------------------------------------
# 3. a model that reads classes (labels): every source has them, whatever the order


@pytest.mark.parametrize("order", ["bare first", "bare last", "bare weighted little", "bare in a list file"])
def test_an_unlabelled_source_is_refused_for_a_class_model_in_any_order(sets, tmp_path, order):
    a, bare = str(sets["a"]), str(sets["bare"])
    listed = tmp_path / "both.txt"
    listed.write_text(f"{a}\n{bare}\n")
    train = {"bare first": [bare, a], "bare last": [a, bare], "bare weighted little": [a, f"{bare}::0.01"],
             "bare in a list file": str(listed)}[order]
    with pytest.raises(DataSourceError) as e:
        TrainLoader(loader_cfg(train), rank=0, world_size=1, batch_size=4, num_classes=4, names=True)
    msg = one_line_error(e)
    named = f"{listed}:2" if order == "bare in a list file" else bare
    assert msg.startswith(named) and "no class names" in msg and "reads class labels" in msg, msg


def test_the_trainer_refuses_an_unlabelled_source_before_the_run_folder(sets, tmp_path, capsys):
    """[labelled, unlabelled] used to train, then stop on too many bad samples with no checkpoint."""
    run = tmp_path / "run"
    code = train_main(["--config", str(DEMO), f"data.train=[{sets['a']}, {sets['bare']}]", f"run.dir={run}",
                       "data.num_workers=0", "train.max_steps=2", "train.batch_size=4", "log.progress=false",
                       "model.condition=class", "model.num_classes=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {sets['bare']}: no class names") and len(err.splitlines()) == 1, err
    assert not run.exists()


@pytest.mark.parametrize("first", ["tagged", "a"])
def test_a_source_without_labels_is_refused_for_a_multilabel_model_in_any_order(sets, first):
    train = [str(sets[first]), str(sets["a" if first == "tagged" else "tagged"])]
    with pytest.raises(DataSourceError) as e:  # names=True without need_cls: the model reads `labels`
        TrainLoader(loader_cfg(train), rank=0, world_size=1, batch_size=4, names=True)
    assert one_line_error(e).startswith(f"{sets['a']}: no label names")


def test_a_class_model_reads_no_labels_so_a_set_without_them_mixes(sets):
    """Before, the first source's label names made every sample of a set without `json` bad."""
    loader = TrainLoader(loader_cfg([str(sets["tagged"]), str(sets["a"])]), rank=0, world_size=1, batch_size=4,
                         num_classes=4, names=True)
    batches = [b for b, _ in zip(loader.batches(), range(4))]
    assert sum(int(b["bad"]) for b in batches) == 0 and "labels" not in batches[0]
    keys = {k for b in batches for k in b["key"]}
    assert len(keys) > 1


def test_tools_still_read_what_the_first_source_names(sets):
    """names left alone (benchmarks, tests): labels of the first source are read, unlabelled sets pass."""
    loader = TrainLoader(loader_cfg([str(sets["tagged"]), str(sets["bare"])]), rank=0, world_size=1, batch_size=4)
    assert loader.dataset.decoder.num_labels == 2 and not loader.dataset.decoder.need_cls


# ----------------------------------------------------------------------------------------------
# 6. weights in held-out data mean nothing: refused


def test_weights_in_held_out_data_are_refused_by_eval_batches(sets, tmp_path):
    a, b = sets["a"], sets["b"]
    with pytest.raises(DataSourceError) as e:
        eval_batches([f"{a}::0.1", f"{b}::5"], image_size=16, batch_size=4)
    msg = one_line_error(e)
    assert msg.startswith("data.val/--data: weights mean nothing") and "drop the ::w" in msg
    listed = tmp_path / "val.txt"  # weighted lines inside a list file: the same
    listed.write_text(f"{a}\n{b}::3\n")
    with pytest.raises(DataSourceError, match="weights mean nothing"):
        eval_batches(str(listed), image_size=16, batch_size=4)
    loader, sources = eval_batches([f"{a}::1", str(b)], image_size=16, batch_size=4)  # ::1 is no weight
    assert sum(len(batch["key"]) for batch in loader) == 16


def test_export_still_measures_a_weighted_data_train(sets):
    """launch/export.py measures latent statistics over the run's data.train: its weights are the training's."""
    cfg = load_config([DEMO], [f"data.train=[{sets['a']}::2, {sets['b']}]"])
    loader, _ = eval_batches(cfg.data.train, image_size=16, batch_size=4, max_samples=4, cfg=cfg)
    assert sum(len(batch["key"]) for batch in loader) == 4


def test_weights_in_data_val_are_refused_at_start_up(sets):
    with pytest.raises(ConfigError) as e:
        load_config([DEMO], [f"data.val=[{sets['a']}::0.1, {sets['b']}::5]"])
    assert one_line_error(e).startswith("data.val: weights mean nothing")
    with pytest.raises(ConfigError, match="weights mean nothing"):
        load_config([DEMO], [f"data.val={sets['a']}::heavy"])
    cfg = load_config([DEMO], [f"data.val=[{sets['a']}::1, {sets['b']}]"])
    raw = to_dict(cfg)
    raw["data"]["val"] = [f"{sets['a']}::0.1"]
    assert from_dict(raw).data.val == raw["data"]["val"]  # a stored run's config still loads (export, inspect)


def test_unread_note_names_the_sources_eval_samples_never_reach(sets):
    sources = resolve_sources([str(sets["a"]), str(sets["b"]), str(sets["bare"])])
    note = unread_note(sources, 8)
    assert note is not None and str(sets["b"]) in note and str(sets["bare"]) in note and "\n" not in note
    assert f"end before {sets['bare']}: never measured" in unread_note(sources, 12)
    assert unread_note(sources, 17) is None and unread_note(sources, 0) is None
    assert unread_note(sources[:1], 4) is None


def test_a_weighted_line_in_a_data_val_list_file_is_refused_at_start(sets, tmp_path, capsys):
    (tmp_path / "val.txt").write_text(f"{sets['a']}::2\n{sets['b']}\n")
    run = tmp_path / "run"
    code = train_main(["--config", str(DEMO), f"data.train={sets['a']}", f"data.val={tmp_path / 'val.txt'}",
                       f"run.dir={run}", "data.num_workers=0", "train.max_steps=2", "train.batch_size=4",
                       "log.progress=false", "eval.every_steps=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "weights mean nothing for evaluation" in err and len(err.splitlines()) == 1, err
    assert not run.exists()  # refused at start, not at the first validation


def test_validation_and_evaluate_say_which_held_out_sources_eval_samples_never_reach(sets, tmp_path, capsys):
    run = tmp_path / "run"
    val = f"[{sets['a']}, {sets['b']}]"
    assert train_main(["--config", str(DEMO), f"data.train={sets['a']}", f"data.val={val}", "eval.samples=4",
                       "eval.every_steps=1", f"run.dir={run}", "data.num_workers=0", "train.max_steps=2",
                       "train.batch_size=4", "log.progress=false", "data.image_size=16", "log.images_every_steps=0",
                       "eval.best_metric=psnr"]) == 0
    log = (run / "train.log").read_text()
    assert log.count(f"end before {sets['b']}: never measured") == 1, log  # once a run, not each validation
    from launch.evaluate import main as evaluate_main

    capsys.readouterr()
    assert evaluate_main([str(run), "--data", str(sets["a"]), "--max-samples", "2", "--workers", "0"]) == 0
    assert "never measured" not in capsys.readouterr().err  # one source: nothing left unread
    assert evaluate_main([str(run), "--max-samples", "4", "--workers", "0"]) == 0
    assert f"end before {sets['b']}: never measured" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 9. a bad sample names its shard's folder


@pytest.mark.parametrize("shard, key, says", [
    ("/data/deadv/000001.tar", "", "deadv/000001.tar: no samples (empty tar)"),
    ("runs/x/deadv/000001.tar", "s00003", "deadv/000001.tar s00003: no samples (empty tar)"),
    ("000001.tar", "", "000001.tar: no samples (empty tar)"),
    ("", "s00003", "s00003: no samples (empty tar)"),
])
def test_a_bad_sample_names_its_shards_folder(shard, key, says):
    assert str(BadSample(key, shard, "no samples (empty tar)")) == says


def test_the_loaders_bad_sample_line_tells_two_sources_apart(tmp_path):
    good = small(tmp_path / "good")
    dead = small(tmp_path / "deadv")
    (dead / "000001.tar").write_bytes(b"")  # an empty shard, also named 000001.tar in the other source
    index = json.loads((dead / "index.json").read_text())
    loader = TrainLoader(loader_cfg([str(good), str(dead)]), rank=0, world_size=1, batch_size=4)
    errors = [b["bad_error"] for b, _ in zip(loader.batches(), range(8)) if b["bad"]]
    assert index["shards"][1]["name"] == "000001.tar" and errors
    assert all(e.startswith("deadv/000001.tar: ") for e in errors), errors


# ----------------------------------------------------------------------------------------------
# 10. a command-line list that YAML cannot read


@pytest.mark.parametrize("value", ["[data/black::1, data/white/{000000..000003}.tar]",
                                   "[data/black, data/white/{000000..000003}.tar]"])
def test_a_command_line_list_that_does_not_parse_says_so(value):
    with pytest.raises(ConfigError) as e:
        load_config([DEMO], [f"data.train={value}"])
    msg = one_line_error(e)
    assert msg.startswith("data.train=[...]: does not parse as a YAML list (expected ',' or ']', but got '{')"), msg
    assert "quote items holding {} braces" in msg and "data.train=['a', 'b/{000000..000003}.tar']" in msg
    cfg = load_config([DEMO], ["data.train=['data/black::1', 'data/white/{000000..000003}.tar']"])
    assert cfg.data.train == ["data/black::1", "data/white/{000000..000003}.tar"]


def test_only_fields_that_take_a_list_read_brackets_as_one():
    with pytest.raises(ConfigError, match=r"model.ch_mult=\[...\]: does not parse as a YAML list"):
        load_config([DEMO], ["model.ch_mult=[1, {2]"])
    assert load_config([DEMO], ["run.dir=runs/[a{b]"]).run.dir == "runs/[a{b]"  # a plain string field
    assert load_config([DEMO], ["data.train=data/{000000..000003}.tar"]).data.train == "data/{000000..000003}.tar"
