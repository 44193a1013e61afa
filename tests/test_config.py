"""Config: composition, precedence, and one-line errors with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import ConfigError, describe, from_dict, load_config, to_dict
from launch.train import main

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_composes_and_cli_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 7\n  batch_size: 3\nmodel:\n  ch: 64\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  batch_size: 5\noptim:\n  lr: 2e-4\n")
    cfg = load_config([tmp_path / "top.yaml"], ["data.train=x/{0..3}.tar", "train.max_steps=9"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.model.ch) == (9, 5, 64)
    assert cfg.optim.lr == pytest.approx(2e-4)  # "2e-4" is a string to PyYAML; the schema makes it a float
    assert cfg.data.train == "x/{0..3}.tar"  # a brace pattern stays a string
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_stepz=3", "train.max_stepz: unknown key; did you mean 'max_steps'?"),
        ("train.max_steps=abc", "train.max_steps: expected int, got 'abc'"),
        ("model.attn_type=fancy",
         "model.attn_type: 'fancy' is not allowed; choose one of 'vanilla' | 'linear' | 'none'"),
        ("train.batch_size=0", "train.batch_size: 0 is out of range; must be >= 1"),
        ("train.seed=-1", "train.seed: -1 is out of range; must be >= 0"),  # numpy takes 0 <= seed < 2^32
        ("train.seed=4294967296", "train.seed: 4294967296 is out of range; must be < 2147483648"),
        ("data.image_size=30", "data.image_size: 30 is not divisible by 8"),
        ("trainn.max_steps=3", "trainn: unknown key; did you mean 'train'?"),
        ("model.ch_mult=[1,x]", "model.ch_mult[1]: expected int"),
        ("train.channels_last=maybe", "train.channels_last: expected bool or 'auto', got 'maybe'"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config([], ["data.train=x.tar", override])
    assert str(e.value).startswith(expected)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"])
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([tmp_path / "bad.yaml"])


def test_hostile_config_files_are_one_line(tmp_path):
    """A section given twice (YAML keeps the last, silently dropping the first one's keys), a base
    that is not a file name, a file that is not UTF-8 text, an empty run.dir, an absurd image size."""
    (tmp_path / "dup.yaml").write_text("train:\n  batch_size: 2\nmodel:\n  ch: 8\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="line 5 is not valid YAML .key 'train' appears twice in one mapping"):
        load_config([tmp_path / "dup.yaml"])
    (tmp_path / "base.yaml").write_text("base: 5\n")
    with pytest.raises(ConfigError, match="base: 5 is not a file name or a list of file names"):
        load_config([tmp_path / "base.yaml"])
    (tmp_path / "u16.yaml").write_bytes("train:\n  max_steps: 3\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config([tmp_path / "u16.yaml"])
    with pytest.raises(ConfigError, match="run.dir: empty"):
        load_config([], ["data.train=x.tar", "run.dir="])
    with pytest.raises(ConfigError, match="data.image_size: 100000 is out of range; must be <= 16384"):
        load_config([], ["data.train=x.tar", "data.image_size=100000"])
    (tmp_path / "enc.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="enc.json: not a UTF-8 text file"):
        load_config([], ["data.train=x.tar", "model.arch=spec", f"model.encoder={tmp_path / 'enc.json'}"])
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config([tmp_path])
    (tmp_path / "loop.yaml").write_text("train: &a\n  x: *a\n")  # an alias inside itself: endless
    with pytest.raises(ConfigError, match="loop.yaml: an alias refers to a node that contains it"):
        load_config([tmp_path / "loop.yaml"])
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]"
                                                        for i in range(1, 9)]  # 10^9 values, in 9 lines
    (tmp_path / "laughs.yaml").write_text("\n".join(laughs) + "\n")
    with pytest.raises(ConfigError, match="laughs.yaml: its aliases expand to more than 100000 values"):
        load_config([tmp_path / "laughs.yaml"])


def test_yaml_aliases_are_copies_not_one_section(tmp_path):
    """`data: *t` where `train: &t {...}`: an override of one section must not land in the other (it
    did: `data.train=...` became train.train, an unknown key)."""
    (tmp_path / "alias.yaml").write_text("train: &t {seed: 3}\ndata: *t\n")  # both sections have a seed
    cfg = load_config([tmp_path / "alias.yaml"], ["data.train=x.tar", "train.seed=5"])
    assert (cfg.data.seed, cfg.train.seed, cfg.data.train) == (3, 5, "x.tar")


def test_main_exits_2_with_one_line(capsys):
    assert main(["data.train=x.tar", "train.max_stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("config error: train.max_stepz: unknown key")


@pytest.mark.slow
def test_cli_process_exit_code_and_no_traceback():
    r = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "data.train=x.tar", "optim.lr=fast"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == "config error: optim.lr: expected float, got 'fast' (str)"


def test_every_field_is_documented():
    lines = describe()
    assert any(line.startswith("train.max_steps (int) = 1000") for line in lines)
    assert all(line.split("# ", 1)[1].strip() for line in lines), "a config field has no help line"


def test_launcher_options_after_the_script_are_explained(capsys, monkeypatch):
    """`accelerate launch launch/train.py --multi_gpu` on CPU with no process count: one line saying
    where the option belongs (with a count it relaunches: tests/test_multiproc.py)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["--multi_gpu", "--mixed_precision", "no", "data.train=x.tar"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "`--multi_gpu --mixed_precision no` belongs to `accelerate launch`" in err
    assert ("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --mixed_precision no --num_processes 2 "
            "launch/train.py data.train=x.tar (or pick") in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under a launcher that already started 2 processes: a note, then on
    monkeypatch.setenv("RANK", "0")
    assert main(["--multi_gpu", "--help-config"]) == 0
    assert "ignored here" in capsys.readouterr().err


def test_overrides_may_follow_resume_and_config(tmp_path, monkeypatch):
    from launch.train import parse_args

    a = parse_args(["--config", "a.yaml", "x.y=1", "--resume", "latest", "train.max_steps=30", "--config", "b.yaml",
                    "z=2"])
    assert a.config == ["a.yaml", "b.yaml"] and a.resume == "latest"
    assert a.overrides == ["x.y=1", "train.max_steps=30", "z=2"]


def test_deepspeed_json_disagreeing_with_the_config_is_a_config_error():
    from harness.config import ConfigError
    from harness.scale import _fill

    cfg = {"train_micro_batch_size_per_gpu": 8}
    with pytest.raises(ConfigError, match='sets train_micro_batch_size_per_gpu=8 but train.batch_size gives 4'):
        _fill(cfg, "train_micro_batch_size_per_gpu", 4, "train.batch_size")
    _fill(cfg, "gradient_clipping", 1.0, "optim.grad_clip")  # "auto" (absent) is filled
    assert cfg["gradient_clipping"] == 1.0


def test_gradient_trained_codebook_is_refused_under_deepspeed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code = main(["--config", str(ROOT / "launch/configs/vq.yaml"), "model.vq_decay=0", f"data.train={tmp_path}",
                 f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.vq_decay=0" in err and len(err.splitlines()) == 1, err


def test_a_deepspeed_config_is_found_from_any_directory_or_named_in_one_line(tmp_path, monkeypatch, capsys):
    """accelerate reads launch/accelerate/zero*.yaml's deepspeed_config_file from the working directory."""
    from launch.train import _find_deepspeed_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch/deepspeed/zero2.json")
    assert _find_deepspeed_config() is None
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(ROOT / "launch/deepspeed/zero2.json")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch/deepspeed/zero9.json")
    assert main(["data.train=x.tar"]) == 2
    assert capsys.readouterr().err.strip() == ("error: deepspeed_config_file launch/deepspeed/zero9.json (from the "
                                               "accelerate config): no such file, neither in the working directory "
                                               "nor in the checkout")


def test_a_deepspeed_config_that_accelerate_left_out_is_refused(monkeypatch):
    """ACCELERATE_USE_CPU=1 with a zero*.yaml: accelerate runs plain MULTI_CPU, no ZeRO, and says nothing."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from harness.dist import DistEnvError
    from harness.scale import check_world

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(DistEnvError, match="asks for DeepSpeed but this run is MULTI_CPU"):
        check_world(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=1))
    check_world(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    check_world(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=1))


def test_settings_a_run_never_acts_on_are_named():
    """Accepted, but said: a discriminator that starts after the last step, eval metrics without validation."""
    from harness.config import unused_settings

    cfg = load_config([str(ROOT / "launch/configs/demo.yaml")], ["data.train=x", "loss.disc_weight=0.5",
                                                                   "loss.disc_start=300", "eval.lpips=true",
                                                                   "eval.fid_weights=w.pth"])
    assert unused_settings(cfg) == [
        "loss.disc_start=300 is at or past train.max_steps=300: the discriminator will not train in this run "
        "(raise train.max_steps, or lower loss.disc_start)",
        "eval.lpips, eval.fid_weights set, but eval.every_steps=0: validation never runs, so neither do they "
        "(set eval.every_steps and data.val)"]
    assert unused_settings(load_config([str(ROOT / "launch/configs/demo.yaml")], [
        "data.train=x", "data.val=y", "loss.disc_weight=0.5", "loss.disc_start=299", "eval.every_steps=10",
        "eval.lpips=true"])) == []
    # keys only a switched-off term reads
    off = load_config([str(ROOT / "launch/configs/demo.yaml")], ["data.train=x", "loss.logvar_init=3",
                                                                   "loss.lecam_weight=0.001", "loss.disc_start=5",
                                                                   "loss.lpips_vgg=v.pth"])
    assert unused_settings(off) == [
        "loss.logvar_init set, but loss.learned_logvar is off: nothing reads it",
        "loss.disc_start, loss.lecam_weight set, but loss.disc_weight is off: nothing reads them",
        "loss.lpips_vgg set, but loss.perceptual_weight is off: nothing reads it"]
    assert unused_settings(load_config([str(ROOT / "launch/configs/demo.yaml")], [
        "data.train=x", "data.val=y", "eval.every_steps=5", "eval.lpips=true", "loss.lpips_vgg=v.pth"])) == []
    # a perception net or a prior trains with cross-entropy: the autoencoder's loss keys were ignored silently
    perc = load_config([str(ROOT / "launch/configs/perception.yaml")], ["data.train=x", "loss.ssim_weight=1"])
    assert unused_settings(perc)[-1:] == [
        f"loss.ssim_weight set, but a model.kind={perc.model.kind} run trains with cross-entropy alone: "
        "nothing reads it"]
    # keys of another kind or arch: accepted, named
    fsq = load_config([str(ROOT / "launch/configs/fsq.yaml")], ["data.train=x", "model.vq_codebook_size=16",
                                                                 "loss.vq_weight=5", "loss.kl_weight=1"])
    assert unused_settings(fsq) == ["model.vq_codebook_size, loss.kl_weight, loss.vq_weight set, but a model.kind=fsq "
                                    "model.arch=ldm model does not read them"]
    spec = load_config([str(ROOT / "launch/configs/spec_basic.yaml")], ["data.train=x", "model.ch_mult=[1,2,4]"])
    assert unused_settings(spec) == ["model.ch_mult set, but a model.kind=kl model.arch=spec model does not read it"]
    # no shipped config sets what it does not read, and the recipe reaches its own disc_start
    for path in sorted((ROOT / "launch/configs").glob("*.yaml")):
        if path.name != "vq_prior.yaml":  # needs a trained VQ run to load
            assert unused_settings(load_config([str(path)], ["data.train=x"])) == [], path.name


def test_a_codebook_too_large_to_seed_is_refused():
    """vq_codebook_size=100000000 (a typo) hung at step 0 in k-means seeding, deaf to SIGTERM."""
    with pytest.raises(ConfigError, match="model.vq_codebook_size: 100000000 is out of range; must be <= 1048576"):
        load_config([str(ROOT / "launch/configs/vq.yaml")], ["data.train=x", "model.vq_codebook_size=100000000"])
    assert load_config([str(ROOT / "launch/configs/vq.yaml")],
                       ["data.train=x", "model.vq_codebook_size=1048576"]).model.vq_codebook_size == 2**20


def test_a_whole_section_override_merges_into_the_files():
    """`train={batch_size: 2}` replaced the whole section: the file's and earlier overrides' keys fell back
    to the defaults (1000 steps instead of 1). Merged now, as a YAML file's mapping; not a mapping: one line."""
    tiny = Path(__file__).parent / "configs/tiny.yaml"
    cfg = load_config([tiny], ["data.train=x", "train.max_steps=1", "train={batch_size: 2}", "model={}"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.model.ch) == (1, 2, 16)
    with pytest.raises(ConfigError, match=r"^train=5: train is a section: give train.key=value, or a mapping "):
        load_config([tiny], ["data.train=x", "train=5"])
    with pytest.raises(ConfigError, match=r"^train.nope: unknown key"):
        load_config([tiny], ["data.train=x", "train={nope: 1}"])


def test_values_past_pythons_limits_are_one_line(tmp_path):
    """5000 digits, or brackets nested past the stack, in an override or a file: tracebacks before."""
    tiny = Path(__file__).parent / "configs/tiny.yaml"
    with pytest.raises(ConfigError, match=r"^train.max_steps: 9{40}\.\.\. is not a value \(a number of too many "):
        load_config([tiny], ["data.train=x", "train.max_steps=" + "9" * 5000])
    with pytest.raises(ConfigError, match=r"^model.ch_mult: \[{40}\.\.\. is not a value \(nested too deep\)$"):
        load_config([tiny], ["data.train=x", "model.ch_mult=" + "[" * 5000 + "]" * 5000])
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 10000 + "]" * 10000)
    with pytest.raises(ConfigError, match=r"deep.yaml: nested too deep to be a config$"):
        load_config([deep], ["data.train=x"])


def test_resume_given_twice_is_refused(capsys):
    """The last --resume won silently (the newer checkpoints then set aside as abandoned)."""
    with pytest.raises(SystemExit) as e:
        main(["--config", "x.yaml", "--resume", "latest", "--resume", "runs/x/checkpoints/step_6"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --resume given twice (latest and "
                                                    "runs/x/checkpoints/step_6): give one")


def test_run_dir_under_home_is_expanded():
    """run.dir=~/x (or dir: ~/x in YAML) made a folder literally named ~ in the working directory."""
    tiny = Path(__file__).parent / "configs/tiny.yaml"
    cfg = load_config([tiny], ["data.train=x", "run.dir=~/runs/x"])
    assert cfg.run.dir == os.path.expanduser("~/runs/x") and not cfg.run.dir.startswith("~")


def test_config_from_a_pipe_is_read_and_an_endless_file_refused():
    """`--config <(...)` said 'config file not found' under a /proc/<pid>/fd/pipe:[...] name; /dev/zero
    would be read forever."""
    r, w = os.pipe()
    os.write(w, b"train: {max_steps: 3}\n")
    os.close(w)
    try:
        assert load_config([f"/dev/fd/{r}"], ["data.train=x"]).train.max_steps == 3
    finally:
        os.close(r)
    with pytest.raises(ConfigError, match=r"^/dev/zero: more than 16 MB: not a config file$"):
        load_config(["/dev/zero"], ["data.train=x"])
