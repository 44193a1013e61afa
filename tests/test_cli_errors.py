"""launch/sample.py, evaluate.py and export.py given a bad request: exit status 2 and one line
naming the problem (`error: ...`; export.py's own prefix `export: ...`), never a traceback, and
nothing written or lost. One tiny class-conditional run (one checkpoint, with its manifest) is
trained once for the module; tests copy what they damage."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from shardgen import make_shards, rename_classes

from harness.config import load_config, to_dict
from harness.export import save_safetensors
from launch.evaluate import main as evaluate_main
from launch.export import main as export_main
from launch.sample import main as sample_main
from launch.train import main as train_main
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/configs/tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=16, per_shard=8, size=32)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A run folder with checkpoints/step_1 of a 4-class conditional model (read only: tests copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train_main(["--config", str(CONFIG), f"data.train={shards}", f"run.dir={run}", "train.max_steps=1",
                       "checkpoint.every_steps=1", "log.images_every_steps=0", "model.condition=class",
                       "model.num_classes=4", "model.cond_dropout=0.2"]) == 0
    return run


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    """An exported folder of a tiny unconditional model."""
    cfg = load_config([CONFIG], ["data.train=unused"])
    folder = tmp_path_factory.mktemp("uncond")
    save_safetensors(build_model(cfg.model).state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return folder


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def one_line(capsys, prefix: str = "error: ") -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "[WARNING]" not in line]
    assert len(err) == 1, err
    assert err[0].startswith(prefix) and "Traceback" not in err[0], err
    return err[0]


# ----------------------------------------------------------------------------------------- sample


@pytest.mark.parametrize("argv, says", [
    (["sample", "--n", "0"], "--n 0"),
    (["sample", "--n", "-3"], "--n -3"),
    (["interpolate", "--steps", "0"], "--steps 0"),
    (["interpolate", "--steps", "1"], "--steps 1: an interpolation needs at least 2 (both ends)"),
    (["classes", "--rows", "0"], "--rows 0"),
    (["interpolate", "--rows", "-2"], "--rows -2"),
    (["sample", "--image-size", "0"], "--image-size 0"),
    (["sample", "--image-size", "-4"], "--image-size -4"),
    (["sample", "--image-size", "7"], "divisible by 2"),
    (["sample", "--device", "foo"], "--device foo"),
    (["sample", "--device", "meta"], "--device meta: holds no data"),
    (["sample", "--seed", "99999999999999999999999"], "need 0 <= seed < 2^63"),
    (["sample", "--cls", "99"], "model.num_classes=4"),
    (["sample", "--cls", "-1"], "model.num_classes=4"),
])
def test_sample_bad_request_is_one_line(trained, tmp_path, capsys, argv, says):
    out = tmp_path / "x.png"
    device = [] if "--device" in argv else ["--device", "cpu"]
    assert sample_main([str(trained), *argv, "--out", str(out), *device]) == 2
    assert says in one_line(capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_sample_cuda_without_cuda_is_one_line(trained, tmp_path, capsys):
    assert sample_main([str(trained), "sample", "--device", "cuda", "--out", str(tmp_path / "x.png")]) == 2
    assert "CUDA is not available" in one_line(capsys)


@pytest.mark.parametrize("name", ["x.txt", "noext", "."])
def test_sample_out_pil_cannot_write_is_one_line(trained, tmp_path, capsys, name):
    out = tmp_path / name
    assert sample_main([str(trained), "sample", "--device", "cpu", "--out", str(out)]) == 2
    assert "--out" in one_line(capsys)
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "noext").exists()


def test_sample_out_in_a_missing_folder_is_made(trained, tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "x.png"
    assert sample_main([str(trained), "sample", "--n", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file()


def test_sample_out_under_a_file_is_one_line(trained, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert sample_main([str(trained), "sample", "--device", "cpu", "--out", str(tmp_path / "f" / "x.png")]) == 2
    assert "is a file" in one_line(capsys)


def test_unconditional_samples_need_a_trained_null_condition(shards, tmp_path, capsys):
    """Trained with cond_dropout=0, the null condition is a random embedding: `sample` without --cls gave images
    from it with exit 0. Refused; with --cls it samples."""
    run = tmp_path / "run"
    assert train_main(["--config", str(CONFIG), f"data.train={shards}", f"run.dir={run}", "train.max_steps=1",
                       "log.images_every_steps=0", "model.condition=class", "model.num_classes=4"]) == 0
    capsys.readouterr()
    assert sample_main([str(run), "sample", "--n", "2", "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
    assert one_line(capsys) == ("error: the model was trained with model.cond_dropout=0, so its null (unconditional) "
                                "condition never trained: give --cls N for conditional samples")
    assert sample_main([str(run), "sample", "--n", "2", "--cls", "1", "--device", "cpu",
                        "--out", str(tmp_path / "x.png")]) == 0


@pytest.mark.parametrize("mode", ["reconstruct", "interpolate", "classes"])
def test_cls_outside_sample_mode_is_refused(trained, tmp_path, capsys, mode):
    assert sample_main([str(trained), mode, "--cls", "1", "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
    assert one_line(capsys).startswith(f"error: --cls: for `sample`; `{mode}` ")


def test_sample_classes_of_an_unconditional_model_is_exit_2(unconditional, tmp_path, capsys):
    assert sample_main([str(unconditional), "classes", "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
    assert "conditional model" in one_line(capsys)


# --------------------------------------------------------------------------------------- evaluate


def evaluate(model, shards, *extra):
    return evaluate_main([str(model), "--data", str(shards), "--workers", "0", "--device", "cpu", *extra])


@pytest.mark.parametrize("extra, says", [
    (["--image-size", "7"], "divisible by 2"),
    (["--image-size", "0"], "--image-size 0"),
    (["--workers", "-1"], "--workers -1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--save-ref-stats", "s.npz"], "--save-ref-stats: Inception statistics for rfid, which needs --fid-weights"),
    (["--ref-stats", "s.npz"], "--ref-stats: Inception statistics for rfid, which needs --fid-weights"),
    (["--fid-weights", "w.pth", "--save-ref-stats", "s.txt"], "--save-ref-stats s.txt: statistics are written as "
     ".npz or .safetensors"),
    (["--fid-weights", "w.pth", "--ref-stats", "r.npz", "--save-ref-stats", "s.npz"], "--ref-stats and "
     "--save-ref-stats: one or the other"),
    (["--fid-weights", "w.pth", "--max-samples", "1"], "--max-samples 1: a Frechet distance needs the covariance of "
     "at least 2 images"),
    (["--lpips-vgg", "v.pth"], "--lpips-vgg: weights for LPIPS, which needs --lpips too"),
    (["--lpips", "--image-size", "8"], "--lpips: LPIPS(vgg) needs images of at least 16 px a side; this evaluation "
     "reads 8 px"),
    (["--lpips-lin", "l.pth"], "--lpips-lin: weights for LPIPS, which needs --lpips too"),
])
def test_evaluate_bad_request_is_one_line(trained, shards, capsys, extra, says):
    assert evaluate(trained, shards, *extra) == 2
    assert says in one_line(capsys)


def test_evaluate_ref_stats_of_another_size_are_refused_before_the_work(trained, shards, tmp_path, capsys,
                                                                          monkeypatch):
    """pytorch-fid --dims 64 statistics against our 2048-d Inception: one line before any image, not a traceback
    after the whole pass. The Inception file itself need not be real for that: its loader is stubbed."""
    import numpy as np

    import launch.evaluate

    class Net:
        name, dim = "rfid", 2048

    monkeypatch.setattr(launch.evaluate, "fid_net", lambda path, device: Net())
    monkeypatch.setattr(launch.evaluate.Evaluator, "__init__", lambda *a, **k: pytest.fail("evaluated"))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    assert evaluate(trained, shards, "--fid-weights", "w.pth", "--ref-stats", str(tmp_path / "small.npz")) == 2
    assert one_line(capsys) == (f"error: --ref-stats {tmp_path / 'small.npz'}: 64-d statistics, but the FID Inception "
                                "gives 2048-d features (pytorch-fid --dims 64?): make them with --save-ref-stats, or "
                                "pytorch-fid's --save-stats at its default --dims 2048")


def test_evaluate_lpips_weights_keyed_by_ints_is_one_line(trained, shards, tmp_path, capsys):
    numbered = tmp_path / "numbered.pth"
    torch.save({1: torch.zeros(1)}, numbered)  # was an AttributeError traceback (`int` has no `.startswith`)
    assert evaluate(trained, shards, "--lpips", "--lpips-vgg", str(numbered)) == 2
    assert one_line(capsys) == (f"error: LPIPS VGG16 weights: {numbered}: not a state dict of tensors "
                                "(key 1 of type int, not a name)")


def test_an_exported_folder_with_weights_keyed_by_ints_is_one_line(unconditional, shards, tmp_path, capsys):
    from harness.export import ExportError, consolidate

    folder = tmp_path / "export"
    shutil.copytree(unconditional, folder)
    (folder / "model.safetensors").unlink()
    torch.save({1: torch.zeros(1)}, folder / "pytorch_model.bin")
    says = f"{folder / 'pytorch_model.bin'}: not a state dict of tensors (key 1 of type int, not a name)"
    assert evaluate(folder, shards) == 2
    assert one_line(capsys) == f"error: {says}"
    with pytest.raises(ExportError) as e:
        consolidate(folder)
    assert str(e.value) == says


def test_evaluate_json_to_a_folder_or_under_a_file_is_refused_before_the_work(trained, shards, tmp_path, capsys,
                                                                               monkeypatch):
    import launch.evaluate

    def no_work(*a, **kw):
        raise AssertionError("evaluated before checking --json")

    monkeypatch.setattr(launch.evaluate, "eval_batches", no_work)
    assert evaluate(trained, shards, "--json", str(tmp_path)) == 2
    assert "is a folder" in one_line(capsys)
    (tmp_path / "f").write_text("")
    assert evaluate(trained, shards, "--json", str(tmp_path / "f" / "e.json")) == 2
    assert "is a file" in one_line(capsys)


def test_evaluate_json_into_a_missing_folder_is_written(trained, shards, tmp_path, capsys):
    out = tmp_path / "new" / "e.json"
    assert evaluate(trained, shards, "--max-samples", "4", "--json", str(out)) == 0
    assert out.is_file()


# ----------------------------------------------------------------------------------------- export


def test_export_default_out_of_a_checkpoint_is_beside_checkpoints(run, capsys):
    step = run / "checkpoints" / "step_1"
    before = sorted(p.name for p in step.iterdir())
    assert export_main([str(step)]) == 0
    assert (run / "export-step_1" / "model.safetensors").is_file()
    assert sorted(p.name for p in step.iterdir()) == before  # the checkpoint (and its manifest) untouched
    from harness import checkpoint as ckpt

    assert ckpt.resolve(run, "latest") == step


def test_export_out_inside_a_checkpoint_or_onto_a_file_is_one_line(run, tmp_path, capsys):
    step = run / "checkpoints" / "step_1"
    before = sorted(p.name for p in step.iterdir())
    assert export_main([str(step), "--out", str(step / "export")]) == 2
    assert "inside the checkpoint" in one_line(capsys, "export: ")
    assert sorted(p.name for p in step.iterdir()) == before
    (tmp_path / "f").write_text("")
    assert export_main([str(step), "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in one_line(capsys, "export: ")


def test_export_out_onto_the_run_or_another_export_is_one_line(run, capsys):
    config = (run / "config.yaml").read_text()
    for out, says in [(run, "is a run folder itself (its config.yaml, checkpoints and logs)"),
                      (run / "checkpoints", "is the run's own checkpoints/ folder"),
                      (run / "tb", "is the run's own tb/ folder")]:
        assert export_main([str(run), "--out", str(out)]) == 2
        assert one_line(capsys, "export: ") == (f"export: --out {out}: {says}: write the export into a folder of its "
                                                f"own (as the default, {run.resolve() / 'export'})")
    assert (run / "config.yaml").read_text() == config and not (run / "model.safetensors").exists()
    assert export_main([str(run)]) == 0  # the default, <run>/export
    first = (run / "export" / "model.safetensors").stat().st_mtime_ns
    for fmt in ("safetensors", "diffusers"):
        assert export_main([str(run), "--format", fmt, "--out", str(run / "export")]) == 2
        assert one_line(capsys, "export: ") == (f"export: --out {run / 'export'}: holds model.safetensors already (an "
                                                "export?); pass --overwrite to replace it")
    assert (run / "export" / "model.safetensors").stat().st_mtime_ns == first
    assert export_main([str(run), "--overwrite", "--latent-stats", "4", "--workers", "0"]) == 0
    assert (run / "export" / "latent_stats.json").is_file()
    assert export_main([str(run), "--overwrite"]) == 0  # without: the earlier statistics are not the new weights'
    assert not (run / "export" / "latent_stats.json").exists() and (run / "export" / "model.safetensors").is_file()


def test_a_failed_export_leaves_the_earlier_one_in_out_as_it_was(run, unconditional, tmp_path, capsys):
    """Weights beside the config of another model: refused in one line naming the key, before anything
    is written, so an export already in --out (replaced with --overwrite) stays whole; a new --out is
    not left behind empty."""
    good = tmp_path / "good"
    assert export_main([str(run), "--out", str(good)]) == 0
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    wrong = tmp_path / "wrong"
    shutil.copytree(unconditional, wrong)
    cfg = yaml.safe_load((wrong / "config.yaml").read_text())
    cfg["model"]["ch"] = 8  # other widths: every conv's shape differs
    (wrong / "config.yaml").write_text(yaml.safe_dump(cfg))
    for fmt in ("safetensors", "diffusers"):
        assert export_main([str(wrong), "--format", fmt, "--overwrite", "--out", str(good)]) == 2
        said = one_line(capsys, "export: ")
        assert "weights do not fit the stored config" in said and "in the weights" in said, said
        assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert export_main([str(wrong), "--out", str(tmp_path / "new" / "x")]) == 2
    capsys.readouterr()
    assert not (tmp_path / "new" / "x").exists()
    # what an export killed while writing leaves (its process gone) goes at the next export into the folder
    (good / ".tmp-export-999999999-abc").mkdir()
    assert export_main([str(run), "--overwrite", "--out", str(good)]) == 0
    assert sorted(p.name for p in good.iterdir()) == ["config.yaml", "model.safetensors"]


@pytest.mark.parametrize("text, says", [("model: [1, 2", "config.yaml: not valid YAML (line 1)"),
                                        ("", "config.yaml: holds nothing, not a config mapping"),
                                        ("model: {ch: -1}\n", "config.yaml: cannot be loaded (model.ch")])
def test_an_export_with_a_broken_config_is_one_line_in_every_tool(unconditional, shards, tmp_path, capsys, text,
                                                                   says):
    bad = tmp_path / "bad"
    shutil.copytree(unconditional, bad)
    (bad / "config.yaml").write_text(text)
    refused_by_all_three(bad, shards, tmp_path, capsys, says)


@pytest.mark.parametrize("argv, says", [
    (["--data", "nowhere"], "--data: only read with --latent-stats N"),
    (["--workers", "1"], "--workers: only read with --latent-stats N"),
    (["--latent-stats", "4", "--batch-size", "0"], "--batch-size 0: need at least 1 image per batch"),
    (["--latent-stats", "4", "--workers", "-1"], "--workers -1: need 0"),
])
def test_export_flags_that_do_not_go_together_are_refused(trained, tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        export_main([str(trained), "--out", str(tmp_path / "x"), *argv])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_refuses_what_it_cannot_write_before_measuring_latents(trained, shards, tmp_path, capsys, monkeypatch):
    """A conditional model to diffusers: refused before --latent-stats reads a single image."""
    monkeypatch.setattr("launch.export.eval_batches", lambda *a, **k: pytest.fail("measured first"))
    assert export_main([str(trained), "--format", "diffusers", "--latent-stats", "8", "--out",
                        str(tmp_path / "d")]) == 2
    assert "cannot export to diffusers: model.condition=class" in one_line(capsys, "export: ")


def test_export_out_inside_the_runs_checkpoints_or_a_dangling_link_is_one_line(run, tmp_path, capsys):
    assert export_main([str(run), "--out", str(run / "checkpoints" / "mine")]) == 2
    assert "inside the run's checkpoints/ folder, which the trainer cleans and prunes" in one_line(capsys, "export: ")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    assert export_main([str(run), "--out", str(link)]) == 2
    assert one_line(capsys, "export: ") == f"export: --out {link}: a link to {tmp_path / 'gone'}, which does not exist"


def test_export_reads_the_run_once_for_weights_and_latent_stats(run, tmp_path, capsys, monkeypatch):
    """A run still training moves on between two reads: the statistics must be of the exported weights."""
    import harness.inference as inference
    import launch.export as export

    reads = []
    real = inference.read_weights

    def counted(path, *a, **k):
        reads.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(inference, "read_weights", counted)
    monkeypatch.setattr(export, "read_weights", counted)
    out = tmp_path / "e"
    assert export_main([str(run), "--latent-stats", "4", "--workers", "0", "--out", str(out)]) == 0
    assert [p for p in reads if p.resolve() == run.resolve() or run.resolve() in p.resolve().parents] == [run]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (a folder nobody, root included, writes in)")
@pytest.mark.parametrize("fmt", ["safetensors", "diffusers"])
def test_export_out_where_nothing_can_be_written_is_one_line_before_the_work(trained, capsys, monkeypatch, fmt):
    monkeypatch.setattr("launch.export.load_model", lambda *a, **k: pytest.fail("read the model first"))
    assert export_main([str(trained), "--format", fmt, "--out", "/proc/no/export"]) == 2
    said = one_line(capsys, "export: ")
    assert said == "export: --out /proc/no/export: cannot write in /proc (No such file or directory)"


# --------------------------------------------------------------------- damaged or truncated weights


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def refused_by_all_three(model: Path, shards, tmp_path, capsys, names: str) -> None:
    """sample, evaluate and export each refuse `model` with exit 2 and one line naming `names`."""
    assert sample_main([str(model), "sample", "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
    assert names in one_line(capsys)
    assert evaluate(model, shards) == 2
    assert names in one_line(capsys)
    assert export_main([str(model), "--out", str(tmp_path / "e")]) == 2
    assert names in one_line(capsys, "export: ")


def test_damaged_checkpoint_is_refused_naming_the_file(run, shards, tmp_path, capsys):
    step = run / "checkpoints" / "step_1"
    truncate(step / "model.safetensors")
    refused_by_all_three(step, shards, tmp_path, capsys, names="model.safetensors")


def test_truncated_weights_without_a_manifest_are_one_line(run, shards, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(run / "checkpoints" / "step_1", folder)
    for name in ("manifest.json", "trainer_state.json"):  # an exported folder: nothing to verify against
        (folder / name).unlink()
    truncate(folder / "model.safetensors")
    refused_by_all_three(folder, shards, tmp_path, capsys, names="model.safetensors")


# ------------------------------------------------------------------ data the model cannot condition on


def refused_on_data_by_all_three(model: Path, data: Path, tmp_path, capsys, says: str) -> None:
    """sample (reconstruct), evaluate and export --latent-stats each refuse `data` for `model` in one line."""
    assert sample_main([str(model), "reconstruct", "--data", str(data), "--device", "cpu",
                        "--out", str(tmp_path / "x.png")]) == 2
    assert one_line(capsys) == f"error: {data}: {says}"
    assert evaluate(model, data) == 2
    assert one_line(capsys) == f"error: {data}: {says}"
    assert export_main([str(model), "--out", str(tmp_path / "e"), "--latent-stats", "4", "--data", str(data)]) == 2
    assert one_line(capsys, "export: ") == f"export: {data}: {says}"
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "e").exists()


def test_shards_with_more_classes_than_the_model_are_one_line(trained, tmp_path, capsys):
    wide = make_shards(tmp_path / "wide", num_samples=8, per_shard=8, size=32, num_classes=6)
    refused_on_data_by_all_three(trained, wide, tmp_path, capsys, "model.num_classes: the shards have 6 classes, "
                                 "more than 4")


def test_shards_naming_their_classes_otherwise_are_one_line(trained, tmp_path, capsys):
    """Class i of the held-out index must be class i of the training data's, or the model is conditioned
    on the wrong class without a word (per-class results then logged under the wrong names)."""
    other = make_shards(tmp_path / "other", num_samples=8, per_shard=8, size=32, num_classes=3)
    rename_classes(other, ["c0", "c1", "zebra"])
    refused_on_data_by_all_three(trained, other, tmp_path, capsys, "its class names differ from the training data's "
                                 "(3 vs 4; #2 is 'zebra' here, 'c2' there): build both with the same --classes file")
    rename_classes(other, ["c0", "c1", "c2"])  # a prefix of the training data's names is not the same list either
    assert evaluate(trained, other) == 2
    assert "(3 vs 4; #3 is none here, 'c3' there)" in one_line(capsys)


def test_out_of_memory_is_one_line(trained, tmp_path, capsys, monkeypatch):
    from harness.inference import out_of_memory

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                       "tried to allocate 320000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory(cpu) == "out of memory (an allocation of 320000000000 bytes)"
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity ...")
    assert out_of_memory(cuda) == "out of memory (an allocation of 2.00 GiB)"
    assert out_of_memory(RuntimeError("shapes do not match")) is None  # a bug: raised on, not hidden
    monkeypatch.setattr("launch.sample.run", lambda args: (_ for _ in ()).throw(cpu))
    assert sample_main([str(trained), "sample", "--out", str(tmp_path / "x.png")]) == 1
    assert one_line(capsys) == ("error: out of memory (an allocation of 320000000000 bytes): fewer or smaller images "
                                "(--n, --rows, --image-size) need less")
    monkeypatch.setattr("harness.trainer.Trainer.__init__", lambda *a, **k: (_ for _ in ()).throw(cuda))
    assert train_main(["--config", str(CONFIG), "data.train=x", f"run.dir={tmp_path / 'r'}"]) == 1
    assert one_line(capsys).startswith("error: out of memory (an allocation of 2.00 GiB): a smaller train.batch_size")


def test_no_traceback_from_a_real_process(trained, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "launch/sample.py"), str(trained), "sample", "--n", "0",
                        "--device", "cpu", "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --n 0: need at least 1"], r.stderr


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-by-a-weights-file",))


def test_a_weights_file_that_calls_a_function_is_refused_naming_it(tmp_path):
    from harness.inference import load_reason

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _Evil()}, path)
    with pytest.raises(Exception) as e:
        torch.load(path, weights_only=True)
    assert load_reason(e.value).startswith("refused: Trying to load unsupported GLOBAL posix.system")
    assert not Path("pwned-by-a-weights-file").exists()


def test_evaluate_data_whose_later_source_lacks_class_names_is_one_line(trained, shards, tmp_path, capsys):
    """Only the first held-out source was checked for what a conditional model reads: a later one without
    class names gave bad samples only (measured on fewer images, with no word why). Every source now."""
    import json

    bare = make_shards(tmp_path / "bare", num_samples=8, per_shard=8, size=32)
    index = json.loads((bare / "index.json").read_text())
    index["classes"] = []
    (bare / "index.json").write_text(json.dumps(index))
    listing = tmp_path / "heldout.txt"
    listing.write_text(f"{shards}\n{bare}::1\n")
    capsys.readouterr()
    assert evaluate_main([str(trained), "--data", str(listing), "--device", "cpu"]) == 2
    assert f"{listing}:2: no class names in its index.json, but the model reads class labels (cls)" in one_line(capsys)


def test_help_config_into_a_reader_that_went_away_is_quiet():
    """`train.py --help-config | head` (14 KB, two writes): a reader gone before the second write ended in a
    BrokenPipeError traceback. Now exit 141 (128 + SIGPIPE), as `cat` does, and nothing on stderr."""
    import os

    r, w = os.pipe()
    os.close(r)  # gone before anything is written
    try:
        p = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--help-config"], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, "")
