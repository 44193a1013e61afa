"""launch/export.py and the diffusers hand-off against what a hostile review found: an export onto its
own source, two exports into one folder at once, a model whose outputs are not finite, a stop between
the renames, `export.py .` inside a checkpoint, and the init_from hint for a model without attention."""

import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from shardgen import make_shards
from test_diffusers_io import config, our_export, tiny_diffusers

import harness.diffusers_io as dio
import launch.export as exp
from harness import checkpoint as ckpt
from harness.export import save_safetensors
from launch.export import main as export_main


def one_line(capsys, prefix="export: "):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def test_an_export_onto_its_own_folder_is_refused_and_keeps_it(tmp_path, capsys):
    _, src = our_export(tmp_path, config())
    before = sorted(p.name for p in src.iterdir())
    for fmt in ("safetensors", "diffusers"):  # the diffusers one used to delete model.safetensors and config.yaml
        assert export_main([str(src), "--format", fmt, "--out", str(src), "--overwrite"]) == 2
        assert "is the folder exported from" in one_line(capsys)
    assert sorted(p.name for p in src.iterdir()) == before


def test_a_second_export_into_a_folder_being_written_is_refused(tmp_path, capsys):
    _, src = our_export(tmp_path, config())
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # what the first export holds while it writes
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert export_main([str(src), "--out", str(out)]) == 2
        assert one_line(capsys) == f"export: --out {out}: another export is writing into it right now"
    finally:
        os.close(fd)
    assert export_main([str(src), "--out", str(out)]) == 0
    capsys.readouterr()


def test_an_export_that_finished_meanwhile_is_not_replaced_without_overwrite(tmp_path, capsys, monkeypatch):
    """Both used to pass the check before either wrote: the second then replaced the first silently."""
    _, src = our_export(tmp_path, config())
    out = tmp_path / "out"
    real = exp.read_source

    def meanwhile(args, w):  # another export lands between our check of --out and our writing
        (out / "config.json").write_text("{}")
        return real(args, w)

    out.mkdir()
    monkeypatch.setattr(exp, "read_source", meanwhile)
    assert export_main([str(src), "--out", str(out)]) == 2
    assert "holds config.json already (an export?); pass --overwrite" in one_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_model_with_finite_weights_and_non_finite_outputs_is_one_line(tmp_path, capsys):
    shards = make_shards(tmp_path / "shards", num_samples=8, per_shard=8, size=40)
    model, src = our_export(tmp_path, config(f"data.train={shards}"))
    state = model.state_dict()
    state["encoder.conv_in.weight"] *= 1e37  # finite, but every activation overflows
    save_safetensors(state, src / "model.safetensors")
    assert export_main([str(src), "--latent-stats", "8", "--workers", "0", "--out", str(tmp_path / "a")]) == 2
    assert "the model's latents are not finite (NaN or inf): it diverged" in one_line(capsys)
    assert not (tmp_path / "a").exists()  # no latent_stats.json with NaN in it
    assert export_main([str(src), "--format", "diffusers", "--out", str(tmp_path / "n1/n2/b")]) == 2
    line = one_line(capsys)
    assert "reconstruction of a test image is not finite (NaN or inf) although its weights are" in line, line
    assert "mapping error" not in line
    assert not (tmp_path / "n1").exists()  # nor the parent folders the failed export had made


def test_a_stop_between_the_renames_lands_after_the_whole_export(tmp_path, capsys, monkeypatch):
    _, src = our_export(tmp_path, config())
    out = tmp_path / "out"
    assert export_main([str(src), "--format", "diffusers", "--out", str(out)]) == 0
    capsys.readouterr()
    real, calls = os.replace, []

    def replace(a, b):
        if os.path.dirname(b) == str(out):  # (not the atomic writes inside the staging folder)
            calls.append(b)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # held until every file is in place
        real(a, b)

    monkeypatch.setattr(exp.os, "replace", replace)
    assert export_main([str(src), "--out", str(out), "--overwrite"]) == 130
    assert one_line(capsys) == "export: stopped by a signal after the export was in place (it is whole)"
    assert len(calls) == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]  # no diffusers file left


def test_export_of_dot_inside_a_checkpoint_defaults_beside_the_run(tmp_path, monkeypatch):
    step = tmp_path / "run" / "checkpoints" / "step_20"
    step.mkdir(parents=True)
    monkeypatch.setattr(ckpt, "is_complete", lambda p: p.resolve() == step)
    monkeypatch.chdir(step)
    assert exp.default_out(".", "export") == tmp_path / "run" / "export-step_20"


def test_the_init_from_hint_says_attn_resolutions_for_a_model_without_attention():
    plain = tiny_diffusers(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    assert "model.attn_resolutions=[]" in dio.overrides(dio.model_keys(plain.config))


def test_a_tensor_of_no_autoencoder_in_a_diffusers_folder_names_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_diffusers().save_pretrained(tmp_path / "vae")
    file = tmp_path / "vae" / dio.WEIGHTS_NAME
    state = load_file(file)
    state["encoder.extra.weight"] = state["encoder.conv_in.weight"]
    save_file({k: v.clone() for k, v in state.items()}, file)
    with pytest.raises(dio.DiffusersError, match=f"^{file}: encoder.extra.weight: no our name for this tensor"):
        dio.load_folder(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"


def test_a_run_into_an_export_or_a_shard_set_is_refused_and_touches_nothing(tmp_path, capsys):
    """train.py (and train_perception.py --out) into an export replaced its config.yaml: the export lost."""
    from launch.train import main as train_main
    from shards.__main__ import main as shards_main

    shards = make_shards(tmp_path / "shards", num_samples=8, per_shard=8, size=40)
    _, export = our_export(tmp_path, config(f"data.train={shards}"))
    # built by `python -m shards`: its build lock was `.lock`, the run folder's, and the set was taken for a run
    assert shards_main(["demo", str(tmp_path / "built"), "--num-samples", "8", "--image-size", "32", "--quiet"]) == 0
    old = tmp_path / "old"  # a set built before that lock's name changed
    shutil.copytree(tmp_path / "built", old)
    (old / ".lock").touch()
    capsys.readouterr()
    for folder, what in ((export, "an export (model.safetensors)"), (shards, "a shard set (index.json)"),
                         (tmp_path / "built", "a shard set (index.json)"), (old, "a shard set (index.json)")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        argv = ["--config", str(Path(__file__).parent / "configs/tiny.yaml"), f"data.train={shards}",
                f"run.dir={folder}", "train.max_steps=1"]
        assert train_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"run.dir {folder} holds {what}, not a run" in err[0], err
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
