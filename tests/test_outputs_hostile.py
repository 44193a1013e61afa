"""Where sample.py, evaluate.py and export.py may write, and what they say about a run that cannot give
them a model yet. An output path that would land in a checkpoint (its manifest then fails and a resume
abandons the step), over a run's own files (config.yaml, latest, train.log, its weights), among run
folders (export --out runs), or where nothing can be written (/sys, a name too long for the file system)
is refused in one line before any model is read; a write that fails after the work is one line too.
Also: a diffusers VQModel of another codebook size as train.init_from, --temperature/--top-k where no
code is drawn, a prior to diffusers, and a run before its first checkpoint. One tiny run is trained once
for the module; tests copy what they damage."""

import errno
import shutil
from pathlib import Path

import pytest
import yaml
from shardgen import make_shards

from harness import checkpoint as ckpt
from harness.config import load_config, to_dict
from harness.export import save_safetensors
from launch.evaluate import main as evaluate_main
from launch.export import main as export_main
from launch.sample import main as sample_main
from launch.train import main as train_main
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/configs/tiny.yaml"
LONG = "a" * 300  # over the 255 bytes of a file name on ext4, xfs, btrfs, tmpfs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=8, per_shard=8, size=32)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """runs/run with checkpoints/step_1 (and its manifest), config.yaml, latest, train.log, .lock: read only."""
    runs = tmp_path_factory.mktemp("runs")
    assert train_main(["--config", str(CONFIG), f"data.train={shards}", f"run.dir={runs / 'run'}",
                       "train.max_steps=1", "checkpoint.every_steps=1", "log.images_every_steps=0"]) == 0
    return runs / "run"


@pytest.fixture
def runs(trained, tmp_path):
    """A copy of the run in a folder of its own, as runs/ holds runs/run."""
    shutil.copytree(trained, tmp_path / "runs" / "run")
    return tmp_path / "runs"


def one_line(capsys, prefix: str = "error: ") -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "[WARNING]" not in line]
    assert len(err) == 1, err
    assert err[0].startswith(prefix) and "Traceback" not in err[0], err
    return err[0]


def no_work(monkeypatch):
    """Any model read fails the test: a refusal must come before the work."""
    def fail(*a, **k):
        pytest.fail("read the model before refusing the request")

    for module in ("launch.sample", "launch.evaluate", "launch.export"):
        monkeypatch.setattr(f"{module}.load_model", fail)
    monkeypatch.setattr("launch.export.read_weights", fail)


def sample(model, out, *extra):
    return sample_main([str(model), "sample", "--n", "2", "--device", "cpu", "--out", str(out), *extra])


def evaluate(model, shards, *extra):
    return evaluate_main([str(model), "--data", str(shards), "--workers", "0", "--device", "cpu",
                          "--max-samples", "4", *extra])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------ into a run or a checkpoint


@pytest.mark.parametrize("target, says", [
    ("checkpoints/step_1/e.json", "inside the checkpoint"),  # a new file there fails the manifest
    ("checkpoints/step_1/model.safetensors", "inside the checkpoint"),
    ("checkpoints/step_1/manifest.json", "inside the checkpoint"),
    ("checkpoints/e.json", "inside the run's checkpoints/ folder, which the trainer cleans and prunes"),
    ("config.yaml", "the run's own config.yaml"),
    ("latest", "the run's own latest"),
    ("train.log", "the run's own train.log"),
    (".lock", "the run's own .lock"),
])
def test_evaluate_json_into_a_run_or_a_checkpoint_is_refused_before_the_work(runs, shards, capsys, monkeypatch,
                                                                              target, says):
    run = runs / "run"
    before = snapshot(run)
    no_work(monkeypatch)
    assert evaluate(run, shards, "--json", str(run / target)) == 2
    said = one_line(capsys)
    assert said.startswith(f"error: --json {run / target}: {says}") and said.endswith("write it elsewhere"), said
    assert snapshot(run) == before
    assert ckpt.verify(run / "checkpoints" / "step_1") is None


@pytest.mark.parametrize("target", ["checkpoints/step_1/e.png", "checkpoints/x.png"])
def test_sample_out_into_a_run_or_a_checkpoint_is_refused_before_the_work(runs, capsys, monkeypatch, target):
    run = runs / "run"
    before = snapshot(run)
    no_work(monkeypatch)
    assert sample_main([str(run), "sample", "--device", "cpu", "--out", str(run / target)]) == 2
    assert one_line(capsys).startswith(f"error: --out {run / target}: ")
    assert snapshot(run) == before


def test_save_ref_stats_into_a_checkpoint_is_refused_before_the_work(runs, shards, capsys, monkeypatch):
    step = runs / "run" / "checkpoints" / "step_1"
    no_work(monkeypatch)
    assert evaluate(runs / "run", shards, "--fid-weights", "w.pth", "--save-ref-stats", str(step / "s.npz")) == 2
    assert one_line(capsys).startswith(f"error: --save-ref-stats {step / 's.npz'}: inside the checkpoint")
    assert ckpt.verify(step) is None


def test_a_link_into_a_checkpoint_is_followed(runs, tmp_path, capsys, monkeypatch):
    (tmp_path / "into").symlink_to(runs / "run" / "checkpoints" / "step_1")
    no_work(monkeypatch)
    assert sample(runs / "run", tmp_path / "into" / "x.png") == 2
    assert "inside the checkpoint" in one_line(capsys)


def test_files_the_trainer_or_an_export_wrote_are_not_overwritten(runs, tmp_path, capsys, monkeypatch):
    run = runs / "run"
    (run / "tb").mkdir(exist_ok=True)
    (run / "tb" / "events.out.tfevents.1").write_bytes(b"events")
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / "recon_step0000001.png").write_bytes(b"grid")
    assert export_main([str(run), "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    no_work(monkeypatch)
    for target, says in [(run / "tb" / "events.out.tfevents.1", "a file the trainer wrote in the run's tb/ folder"),
                         (run / "samples" / "recon_step0000001.png", "a file the trainer wrote in the run's samples/"),
                         (tmp_path / "exported" / "config.yaml", f"a file of the model in {tmp_path / 'exported'}"),
                         (tmp_path / "exported" / "model.safetensors", "a file of the model in")]:
        assert sample(run, target) == 2
        assert says in one_line(capsys)
    assert (run / "tb" / "events.out.tfevents.1").read_bytes() == b"events"


def test_new_files_beside_a_run_are_still_written(runs, shards, capsys):
    """Not over-refused: eval.json in the run folder, a new grid in its samples/."""
    run = runs / "run"
    assert evaluate(run, shards, "--json", str(run / "eval.json")) == 0
    assert (run / "eval.json").is_file()
    assert sample(run, run / "samples" / "mine.png") == 0
    assert (run / "samples" / "mine.png").is_file()
    assert ckpt.verify(run / "checkpoints" / "step_1") is None


def test_export_into_the_folder_of_all_runs_is_refused(runs, capsys, monkeypatch):
    """export runs/run --out runs dropped model.safetensors and config.yaml among the run folders, rc 0."""
    before = sorted(p.name for p in runs.iterdir())
    assert export_main([str(runs / "run"), "--out", str(runs)]) == 2
    assert one_line(capsys, "export: ") == (f"export: --out {runs}: holds run folders (run/): write the export into a "
                                            f"folder of its own (as the default, {runs / 'run' / 'export'})")
    assert sorted(p.name for p in runs.iterdir()) == before
    # an export written there before is replaced with --overwrite (and only so)
    save_safetensors({}, runs / "model.safetensors")
    assert export_main([str(runs / "run"), "--out", str(runs)]) == 2
    assert "holds run folders (run/)" in one_line(capsys, "export: ")
    assert export_main([str(runs / "run"), "--out", str(runs), "--overwrite"]) == 0
    assert (runs / "config.yaml").is_file()


# ------------------------------------------------------------------------ where nothing can be written


@pytest.mark.parametrize("name", [LONG + ".png", "b" * 245 + ".png"])  # the second fits; its temporary name not
def test_sample_out_with_a_name_too_long_is_one_line_before_the_work(trained, tmp_path, capsys, monkeypatch, name):
    no_work(monkeypatch)
    out = tmp_path / "out" / name
    assert sample(trained, out) == 2
    said = one_line(capsys)
    assert said.startswith(f"error: --out {out}: cannot write in {tmp_path / 'out'} (File name too long: the name is "
                           f"{len(name)} bytes"), said
    assert not (tmp_path / "out").exists()  # the folder made for the check is gone again


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs /sys (a folder nobody, root included, writes in)")
def test_sample_out_in_sys_is_one_line_before_the_work(trained, capsys, monkeypatch):
    no_work(monkeypatch)
    assert sample(trained, "/sys/x.png") == 2
    assert one_line(capsys).startswith("error: --out /sys/x.png: cannot write in /sys (")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs /sys (a folder nobody, root included, writes in)")
@pytest.mark.parametrize("option", ["--json", "--save-ref-stats"])
def test_evaluate_outputs_in_sys_are_one_line_before_the_work(trained, shards, capsys, monkeypatch, option):
    """--json /sys/x.json ran the whole evaluation, then said 'cannot write'."""
    no_work(monkeypatch)
    name = "/sys/x.json" if option == "--json" else "/sys/x.npz"
    fid = ["--fid-weights", "w.pth"] if option == "--save-ref-stats" else []
    assert evaluate(trained, shards, option, name, *fid) == 2
    assert one_line(capsys).startswith(f"error: {option} {name}: cannot write in /sys (")


def test_export_out_with_a_name_too_long_is_one_line(trained, tmp_path, capsys, monkeypatch):
    """It said 'cannot read out/aaa...' (an OSError from a stat of --out taken for the source's)."""
    no_work(monkeypatch)
    out = tmp_path / LONG
    assert export_main([str(trained), "--out", str(out)]) == 2
    assert one_line(capsys, "export: ").startswith(f"export: --out {out}: cannot write in {tmp_path} (File name too "
                                                    "long")


def test_sample_write_that_fails_after_the_work_is_one_line(trained, tmp_path, capsys, monkeypatch):
    def full(grid, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("launch.sample.save_png", full)
    out = tmp_path / "x.png"
    assert sample(trained, out) == 1
    assert one_line(capsys) == f"error: --out {out}: cannot write in {tmp_path} (No space left on device)"


def test_evaluate_json_write_that_fails_after_the_work_keeps_the_numbers(trained, shards, tmp_path, capsys,
                                                                         monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("launch.evaluate.write_atomic", full)
    out = tmp_path / "e.json"
    assert evaluate(trained, shards, "--json", str(out)) == 1
    captured = capsys.readouterr()
    assert "psnr" in captured.out  # the numbers are printed all the same
    assert captured.err.strip().splitlines()[-1] == f"error: --json {out}: cannot write in {tmp_path} (No space left " \
                                                     "on device)"


# ------------------------------------------------------------------------ train.init_from a diffusers VQModel


def test_init_from_a_vqmodel_of_another_codebook_size_is_one_line_naming_the_codebook(shards, tmp_path, capsys):
    """It was `RuntimeError: The size of tensor a (64) must match the size of tensor b (32)` (a traceback from
    filling in the VQ training state diffusers does not keep) before the shape check could name the key."""
    cfg = load_config([CONFIG], ["data.train=unused", "model.kind=vq", "model.vq_codebook_size=64"])
    ours = tmp_path / "vq64"
    save_safetensors(build_model(cfg.model).state_dict(), ours / "model.safetensors")
    (ours / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert export_main([str(ours), "--format", "diffusers", "--out", str(tmp_path / "vq64-diffusers")]) == 0
    capsys.readouterr()
    assert train_main(["--config", str(CONFIG), f"data.train={shards}", f"run.dir={tmp_path / 'run'}",
                       "model.kind=vq", "model.vq_codebook_size=32", "train.max_steps=1", "log.images_every_steps=0",
                       f"train.init_from={tmp_path / 'vq64-diffusers'}"]) == 2
    said = one_line(capsys)
    first = "1 of another shape (e.g. quantizer.embed (64, 4) vs model (32, 4))"
    assert said.startswith(f"error: train.init_from: {(tmp_path / 'vq64-diffusers').resolve()}: the weights do not "
                           f"fit this model config: {first}"), said
    assert "model.vq_codebook_size=64" in said  # what to put on the command line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fill_training_state_leaves_a_codebook_of_another_shape_to_the_shape_check():
    import torch

    from harness.diffusers_io import fill_training_state

    cfg = load_config([CONFIG], ["data.train=unused", "model.kind=vq", "model.vq_codebook_size=32"])
    own = build_model(cfg.model).state_dict()
    state = fill_training_state({"quantizer.embed": torch.zeros(64, 4)}, own)
    assert state["quantizer.embed"].shape == (64, 4) and state["quantizer.embed_sum"].shape == (32, 4)
    same = fill_training_state({"quantizer.embed": torch.ones(32, 4)}, own)
    assert torch.equal(same["quantizer.embed_sum"], torch.ones(32, 4)) and bool(same["quantizer.initted"])


# ------------------------------------------------------------------------ requests that would be ignored


@pytest.mark.parametrize("mode", ["reconstruct", "interpolate"])
@pytest.mark.parametrize("option, value", [("--temperature", "0.5"), ("--top-k", "10")])
def test_temperature_and_top_k_where_no_code_is_drawn_are_refused(trained, tmp_path, capsys, monkeypatch, mode,
                                                                  option, value):
    """A prior run reconstructs and interpolates through its VQ model (encode, decode): no code is drawn, so
    these were accepted and left unused without a word (--cls is refused there on that ground)."""
    no_work(monkeypatch)
    assert sample_main([str(trained), mode, option, value, "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
    assert one_line(capsys) == (f"error: {option}: for `sample` and `classes`, where a prior run draws codes; `{mode}` "
                                "encodes and decodes the images it is given, drawing none")


def test_a_prior_to_diffusers_says_what_a_prior_is():
    from harness.config import ModelConfig
    from harness.diffusers_io import DiffusersError, check_exportable

    with pytest.raises(DiffusersError) as e:
        check_exportable(ModelConfig(kind="prior", prior_vq="runs/vq"))  # as export.py runs/prior --format diffusers
    assert str(e.value) == ("cannot export to diffusers: model.kind=prior: a prior is a transformer over a VQ model's "
                            "codes, not an autoencoder; export its VQ model instead (model.prior_vq=runs/vq)")


# ------------------------------------------------------------------------ a run before its first checkpoint


def test_a_run_before_its_first_checkpoint_says_so_in_every_tool(runs, shards, tmp_path, capsys):
    """config.yaml, train.log and .lock, no checkpoints/ yet: it said 'no model weights (model.safetensors,
    pytorch_model.bin or DeepSpeed shards)'."""
    run = runs / "run"
    shutil.rmtree(run / "checkpoints")
    (run / ckpt.LATEST_NAME).unlink()
    says = (f"{run}: no checkpoint yet (the run has not saved one; wait for checkpoint.every_steps or use a finished "
            "run)")
    assert sample(run, tmp_path / "x.png") == 2
    assert one_line(capsys) == f"error: {says}"
    assert evaluate(run, shards) == 2
    assert one_line(capsys) == f"error: {says}"
    assert export_main([str(run), "--out", str(tmp_path / "e")]) == 2
    assert one_line(capsys, "export: ") == f"export: {says}"
    (run / "checkpoints").mkdir()  # made, still empty
    assert sample(run, tmp_path / "x.png") == 2
    assert one_line(capsys) == f"error: {says}"
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_an_export_stopped_by_sigterm_leaves_out_as_it_was(trained, tmp_path, capsys, monkeypatch, existing):
    """SIGTERM while the files are written (a 196 MB stage was left behind): the stage goes, an earlier
    export stays, a folder the export made goes, one line, exit 130."""
    import os
    import signal

    import launch.export as export_mod

    out = tmp_path / "export"
    if existing:
        assert export_main([str(trained), "--out", str(out)]) == 0
    before = snapshot(out) if existing else None
    real = export_mod.write_ours

    def killed_midway(stage, *args, **kwargs):
        written = real(stage, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the stage is full now
        return written

    monkeypatch.setattr(export_mod, "write_ours", killed_midway)
    capsys.readouterr()
    assert export_main([str(trained), "--out", str(out), "--overwrite"]) == 130
    assert capsys.readouterr().err.strip() == ("export: stopped by a signal; --out is as it was (nothing "
                                               "half-written is left)")
    if existing:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is not export_mod._terminated  # put back
