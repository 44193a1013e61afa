"""launch/evaluate.py, validation and the statistics files given what breaks a Frechet distance or a mean:
fewer than 2 images, a diverged model (finite weights, NaN / inf reconstructions), statistics of another
network or image size, a sigma that is no covariance. Nothing is NaN in a result or a JSON file, nothing
computed is lost to a refusal, training goes on, and every rank agrees.

The FID Inception (95 MB, 299 px) is stood in for by a 6-d feature net named `rfid` (each channel's mean
and spread): what is tested is the bookkeeping around the network, not the network (tests/test_fid.py
tests that); one slow test runs the real one from tests/reference/recipe.py end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from shardgen import make_shards
from test_train import args, logged

from harness.config import load_config, to_dict
from harness.evaluation import Evaluator, FeatureNet
from harness.export import save_safetensors
from harness.fid import Gaussian, StatsFileError, gaussian_of, load_stats, save_stats
from harness.losses import file_digest
from harness.perception_file import save_perception
from launch.evaluate import main as evaluate_main
from launch.train import main as train_main
from models import build_model
from models.perception import PerceptionNet

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/configs/tiny.yaml"


def channel_stats(x: torch.Tensor) -> torch.Tensor:
    """(b, 6) features: each channel's mean and standard deviation."""
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def fake_rfid(path, device) -> FeatureNet:
    return FeatureNet("rfid", channel_stats, 6)


def no_nan(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def stderr_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip() and "[WARNING]" not in line]
    assert not any("Traceback" in line for line in err), err
    return captured.out, err


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("val"), num_samples=6, per_shard=6, size=32)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("one"), num_samples=1, per_shard=1, size=32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported folder of a tiny (untrained) KL autoencoder."""
    torch.manual_seed(0)
    cfg = load_config([CONFIG], ["data.train=unused"])
    folder = tmp_path_factory.mktemp("model")
    save_safetensors(build_model(cfg.model).state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return folder


@pytest.fixture(scope="module")
def diverged(exported, tmp_path_factory):
    """The same model with one decoder weight at +-3e38: every weight finite, every reconstruction NaN."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("diverged") / "model"
    shutil.copytree(exported, folder)
    path = str(folder / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    state = load_file(path)
    state["decoder.conv_in.weight"] = state["decoder.conv_in.weight"].sign() * 3e38
    save_file(state, path, metadata=meta)
    return folder


@pytest.fixture(scope="module")
def fd_net(tmp_path_factory):
    torch.manual_seed(0)
    net = PerceptionNet(channels=[8, 16], num_classes=5, norm_groups=4).eval()
    return save_perception(net, tmp_path_factory.mktemp("perc") / "percnet.safetensors")


@pytest.fixture
def inception(tmp_path, monkeypatch):
    """A weights file for --fid-weights (its bytes only digested) and the stand-in network it names."""
    path = tmp_path / "inception_a.pth"
    path.write_bytes(b"inception weights A")
    monkeypatch.setattr("launch.evaluate.fid_net", fake_rfid)
    return path


def evaluate(model, data, *extra):
    return evaluate_main([str(model), "--data", str(data), "--workers", "0", "--device", "cpu", "--batch-size", "4",
                          *extra])


# ---------------------------------------------------------------------------- F1: fewer than 2 images


def test_one_image_leaves_the_frechet_distances_out_with_a_note(exported, one, fd_net, inception, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert evaluate(exported, one, "--fd-net", str(fd_net), "--fid-weights", str(inception), "--json", str(out)) == 0
    stdout, err = stderr_lines(capsys)
    assert err == ["note: rfid left out: a Frechet distance needs at least 2 images, 1 was read",
                   "note: fd_percnet left out: a Frechet distance needs at least 2 images, 1 was read"]
    assert "nan" not in stdout.lower() and "psnr" in stdout
    result = no_nan(out.read_text())
    assert result["samples"] == 1 and result["nonfinite_samples"] == 0 and result["psnr"] > 0
    assert "rfid" not in result and "fd_percnet" not in result


def test_one_image_against_saved_statistics_is_left_out_too(exported, val, one, inception, tmp_path, capsys):
    stats = tmp_path / "ref.npz"
    assert evaluate(exported, val, "--fid-weights", str(inception), "--save-ref-stats", str(stats)) == 0
    capsys.readouterr()
    out = tmp_path / "x.json"
    assert evaluate(exported, one, "--fid-weights", str(inception), "--ref-stats", str(stats), "--json", str(out)) == 0
    _, err = stderr_lines(capsys)
    assert err == ["note: rfid left out: a Frechet distance needs at least 2 images, 1 was read"]
    assert "rfid" not in no_nan(out.read_text())


def test_save_ref_stats_of_one_image_prints_the_metrics_then_refuses(exported, one, inception, tmp_path, capsys):
    out, stats = tmp_path / "x.json", tmp_path / "ref.npz"
    assert evaluate(exported, one, "--fid-weights", str(inception), "--save-ref-stats", str(stats),
                    "--json", str(out)) == 2
    stdout, err = stderr_lines(capsys)
    assert "psnr" in stdout and no_nan(out.read_text())["samples"] == 1  # nothing computed is lost
    assert err[-1] == (f"error: --save-ref-stats {stats}: a covariance needs at least 2 images, 1 was read; "
                       "nothing written")
    assert not stats.exists()


def test_validation_of_one_image_notes_it_and_training_goes_on(fd_net, one, tmp_path):
    shards = make_shards(tmp_path / "train", num_samples=8, per_shard=8, size=32)
    run = tmp_path / "run"
    assert train_main(args(CONFIG, shards, run, f"data.val={one}", f"eval.fd_net={fd_net}", "eval.every_steps=1",
                           "train.max_steps=2", "checkpoint.every_steps=0", "log.images_every_steps=0")) == 0
    log = (run / "train.log").read_text()
    assert log.count("note: validation at step") == 2, log
    assert "fd_percnet left out: a Frechet distance needs at least 2 images, 1 was read" in log
    assert "=nan" not in log.lower() and logged(run, "val/samples") == [1.0, 1.0] and logged(run, "val/psnr")


# ------------------------------------------------------------------ F2: a diverged model (NaN / inf out)


class Spoiled(torch.nn.Module):
    """`inner`'s reconstructions with the images at the given batch positions (of the call's number) made NaN
    (even positions) or inf (odd),
    and a model term `extra` that is NaN in the batches listed in `nan_term_batches`."""

    def __init__(self, inner, spoil: dict[int, list[int]], nan_term_batches=()):
        super().__init__()
        self.inner, self.spoil, self.nan_term_batches, self.calls = inner, spoil, set(nan_term_batches), 0

    def forward(self, x, cond=None, sample_posterior=False):
        out = self.inner(x, cond=cond, sample_posterior=sample_posterior)
        recon = out.recon.clone()
        for j, i in enumerate(i for i in self.spoil.get(self.calls, []) if i < len(recon)):
            recon[i, j % 3, 0, 0] = float("nan") if i % 2 == 0 else float("inf")
        extra = torch.tensor(float("nan") if self.calls in self.nan_term_batches else 1.0 + self.calls)
        self.calls += 1
        return SimpleNamespace(recon=recon, losses={**out.losses, "extra": extra})


def batches(seed: int, sizes: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (b, 32, 32, 3), generator=g, dtype=torch.uint8), "bad": 0} for b in sizes]


def test_nonfinite_reconstructions_are_counted_and_left_out_of_every_mean(exported, fd_net):
    from harness.evaluation import perception_fd_net

    torch.manual_seed(0)
    cfg = load_config([CONFIG], ["data.train=unused"])
    inner = build_model(cfg.model).eval()
    nets = [FeatureNet("rfid", channel_stats, 6), perception_fd_net(str(fd_net), "cpu")]
    data = batches(0, [4, 4, 3])
    spoil = {0: [1], 1: [0, 2, 3]}  # 4 of 11 images: inf, then NaN, NaN, inf (all but one of batch 1)
    ev = Evaluator(device="cpu", feature_nets=nets)
    model = Spoiled(inner, spoil, nan_term_batches=[2])
    for batch in data:
        ev.update(model, batch, None)
    got = ev.result()

    # the same images less the spoiled ones, through the unspoiled model; the real images' statistics
    # (here: of all 11 inputs) are the inputs', whatever the model made of them
    clean = Evaluator(device="cpu", feature_nets=nets)
    kept = [{"image": b["image"][[i for i in range(len(b["image"])) if i not in spoil.get(k, [])]], "bad": 0}
            for k, b in enumerate(data)]
    for batch in kept:
        clean.update(Spoiled(inner, {}), batch, None)
    clean.real = ev.real
    want = clean.result()
    assert got["samples"] == 11 and got["nonfinite_samples"] == 4 and want["samples"] == 7
    # (the models' convolutions round differently by batch size: SSIM, a mean near 0 here, to about 1e-8)
    for k in ("psnr", "ssim", "l1", "mse", "rfid", "fd_percnet"):
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
    # a model term is a batch mean: a finite one counts for its whole batch, spoiled reconstructions included
    whole = Evaluator(device="cpu")
    for batch in data:
        whole.update(Spoiled(inner, {}), batch, None)
    assert got["kl"] == pytest.approx(whole.result()["kl"], rel=1e-6)
    assert all(np.isfinite(v) for v in got.values())
    # `extra` was NaN for batch 2 (3 images): its mean is over the 8 images of batches 0 and 1
    assert got["extra"] == pytest.approx((1.0 * 4 + 2.0 * 4) / 8)
    assert ev.notes == ["extra: not finite (NaN or inf) for 3 of 11 images; its mean is over the other 8"]


def test_all_reconstructions_nonfinite_leave_only_the_counts(exported):
    cfg = load_config([CONFIG], ["data.train=unused"])
    ev = Evaluator(device="cpu", feature_nets=[FeatureNet("rfid", channel_stats, 6)])
    model = Spoiled(build_model(cfg.model).eval(), {0: [0, 1, 2]}, nan_term_batches=[0])
    ev.update(model, batches(1, [3])[0], None)
    r = ev.result()
    assert r == {"samples": 3, "bad_samples": 0, "nonfinite_samples": 3, "kl": pytest.approx(r["kl"])}
    assert ev.notes == ["extra: not finite (NaN or inf) for 3 of 3 images; left out",
                        "rfid left out: a Frechet distance needs at least 2 images, 0 of the 3 reconstructions "
                        "were finite"]


def test_a_diverged_model_prints_its_metrics_then_exits_2(diverged, val, fd_net, inception, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert evaluate(diverged, val, "--fd-net", str(fd_net), "--fid-weights", str(inception), "--json", str(out)) == 2
    stdout, err = stderr_lines(capsys)
    assert "nonfinite_samples  6" in stdout and "nan" not in stdout.lower()
    assert err[-1] == ("error: 6 of 6 reconstructions are not finite (NaN or inf): the model diverged; "
                       "no reconstruction metric could be formed"), err
    result = no_nan(out.read_text())  # written all the same: the count is the finding
    assert result["nonfinite_samples"] == 6 and "psnr" not in result and "rfid" not in result


def test_validation_of_a_diverged_model_notes_it_and_training_goes_on(fd_net, val, tmp_path, monkeypatch):
    """Validation measures a copy of the model (harness/validation.py); the copy here makes every other image
    NaN. It was a traceback out of the feature statistics (eval.fd_net), on one rank alone under DDP."""
    import harness.validation

    real_build = harness.validation.build_model
    monkeypatch.setattr(harness.validation, "build_model",
                        lambda cfg: Spoiled(real_build(cfg), {k: [0, 2] for k in range(100)}))
    # Spoiled's copy has the inner model's weights under `inner.`: the validator loads the run's by name
    monkeypatch.setattr(harness.validation.Validator, "_load_weights", lambda self, trainer: None)
    shards = make_shards(tmp_path / "train", num_samples=8, per_shard=8, size=32)
    run = tmp_path / "run"
    assert train_main(args(CONFIG, shards, run, f"data.val={val}", f"eval.fd_net={fd_net}", "eval.every_steps=1",
                           "eval.batch_size=4", "train.max_steps=2", "checkpoint.every_steps=0",
                           "log.images_every_steps=0")) == 0
    log = (run / "train.log").read_text()
    assert log.count("3 of 6 reconstructions are not finite (NaN or inf): the model diverged") == 2, log
    assert logged(run, "val/nonfinite_samples") == [3.0, 3.0] and len(logged(run, "val/fd_percnet")) == 2
    assert "=nan" not in log.lower()
    assert not (run / "checkpoints" / "best").exists()  # measured on the finite half only: no best


def _rank_result(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1's reconstructions are all NaN, rank 0's are the inputs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        def model(x, cond=None, sample_posterior=False):
            return SimpleNamespace(recon=torch.full_like(x, float("nan")) if rank == 1 else x.clone(),
                                   losses={"kl": torch.tensor(float("nan") if rank == 1 else 2.0)})

        ev = Evaluator(device="cpu", feature_nets=[FeatureNet("rfid", channel_stats, 6)])
        for batch in batches(rank, [3, 2]):
            ev.update(model, batch, None)
        result = ev.result(distributed=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"result": result, "notes": ev.notes}, allow_nan=False))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_on_nonfinite_reconstructions_one_of_them_made(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_result, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    result = r0["result"]
    assert result["samples"] == 10 and result["nonfinite_samples"] == 5 and result["kl"] == 2.0
    assert result["psnr"] == 100 and "rfid" in result  # rank 0's perfect reconstructions, against all 10 inputs


# -------------------------------------------------- F3: statistics of another network or image size


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_stats_files_record_image_size_network_and_count(tmp_path, suffix):
    feats = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = gaussian_of(feats)
    g.image_size, g.net_digest = 64, "0123456789abcdef"
    path = save_stats(g, tmp_path / f"ref{suffix}")
    back = load_stats(path)
    assert (back.n, back.image_size, back.net_digest) == (5, 64, "0123456789abcdef")
    assert torch.equal(back.mu, g.mu) and torch.equal(back.sigma, g.sigma)
    if suffix == ".npz":  # no pickles: pytorch-fid's own np.load reads the file too
        with np.load(path, allow_pickle=False) as z:
            assert sorted(z.files) == ["image_size", "mu", "n", "net_digest", "sigma"]
            assert str(z["net_digest"]) == "0123456789abcdef" and int(z["image_size"]) == 64


def test_ref_stats_of_another_size_or_network_are_refused_before_the_work(exported, val, inception, tmp_path,
                                                                          capsys, monkeypatch):
    stats = tmp_path / "ref.safetensors"
    assert evaluate(exported, val, "--fid-weights", str(inception), "--save-ref-stats", str(stats)) == 0
    _, err = stderr_lines(capsys)
    assert err == [f"wrote {stats} (Inception statistics of 6 images at 32 px)"]
    g = load_stats(stats)
    assert (g.n, g.image_size, g.net_digest) == (6, 32, file_digest(inception))
    assert evaluate(exported, val, "--fid-weights", str(inception), "--ref-stats", str(stats)) == 0  # the same: used
    _, err = stderr_lines(capsys)
    assert err == []

    monkeypatch.setattr("launch.evaluate.Evaluator.__init__", lambda *a, **k: pytest.fail("evaluated"))
    assert evaluate(exported, val, "--fid-weights", str(inception), "--ref-stats", str(stats),
                    "--image-size", "16") == 2
    _, err = stderr_lines(capsys)
    assert err == [f"error: --ref-stats {stats}: statistics of 32 px images, but this evaluation reads 16 px "
                   "(--image-size): make them at 16 px with --save-ref-stats"]
    other = tmp_path / "inception_b.pth"
    other.write_bytes(b"inception weights B")
    assert evaluate(exported, val, "--fid-weights", str(other), "--ref-stats", str(stats)) == 2
    _, err = stderr_lines(capsys)
    assert err == [f"error: --ref-stats {stats}: made with the Inception file of digest {file_digest(inception)}, "
                   f"but --fid-weights {other} has digest {file_digest(other)}: features of another network do not "
                   "compare"]


def test_foreign_statistics_are_used_with_a_note(exported, val, inception, tmp_path, capsys):
    feats = torch.randn(20, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = gaussian_of(feats)
    foreign = tmp_path / "pytorch_fid.npz"
    np.savez(foreign, mu=g.mu.numpy(), sigma=g.sigma.numpy())  # pytorch-fid's --save-stats: mu and sigma only
    out = tmp_path / "x.json"
    assert evaluate(exported, val, "--fid-weights", str(inception), "--ref-stats", str(foreign), "--json",
                    str(out)) == 0
    _, err = stderr_lines(capsys)
    assert err == [f"note: --ref-stats {foreign} does not record its network and image size (pytorch-fid's "
                   "--save-stats?): they cannot be checked"]
    assert no_nan(out.read_text())["rfid"] > 0


@pytest.mark.parametrize("n", [0, 1])
def test_statistics_of_fewer_than_2_images_are_refused(tmp_path, n):
    np.savez(tmp_path / "few.npz", mu=np.zeros(3), sigma=np.eye(3), n=np.int64(n))
    with pytest.raises(StatsFileError, match=f"the statistics of {n} image"):
        load_stats(tmp_path / "few.npz")


# ----------------------------------------------------------------------- F4: a sigma that is no covariance


@pytest.mark.parametrize("sigma, says", [
    (-np.eye(6), "sigma has a negative eigenvalue"),
    (np.eye(6) + np.triu(np.full((6, 6), 0.1), 1), "sigma is not symmetric"),
    (np.diag([1.0, 1.0, 1.0, 1.0, 1.0, -0.01]), "sigma has a negative eigenvalue"),
])
def test_a_sigma_that_is_no_covariance_is_refused_in_one_line(exported, val, inception, tmp_path, capsys, sigma,
                                                              says):
    path = tmp_path / "bad.npz"
    np.savez(path, mu=np.zeros(6), sigma=sigma)
    with pytest.raises(StatsFileError, match=says):
        load_stats(path)
    assert evaluate(exported, val, "--fid-weights", str(inception), "--ref-stats", str(path)) == 2
    _, err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: --ref-stats {path}: {says}"), err


def test_covariances_of_fewer_images_than_dimensions_are_accepted(tmp_path):
    """Singular (3 samples in 64-d), rounding in its null space included, and float32 statistics."""
    feats = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5 + 3
    g = gaussian_of(feats)
    save_stats(g, tmp_path / "few.npz")
    assert load_stats(tmp_path / "few.npz").n == 3
    np.savez(tmp_path / "f32.npz", mu=g.mu.float().numpy(), sigma=g.sigma.float().numpy())
    load_stats(tmp_path / "f32.npz")


# ----------------------------------------------------------------------------------------------- minor


def test_a_wrong_file_names_a_few_of_its_tensors(exported, val, inception, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({f"layer{i:02d}.weight": torch.zeros(1) for i in range(34)}, str(tmp_path / "net.safetensors"))
    with pytest.raises(StatsFileError) as e:
        load_stats(tmp_path / "net.safetensors")
    said = str(e.value)
    assert "needs arrays 'mu' and 'sigma', has 'layer00.weight'" in said and "... 29 more" in said
    assert "layer33" not in said and "\n" not in said
    net = tmp_path / "net.safetensors"
    assert evaluate(exported, val, "--fid-weights", str(inception), "--ref-stats", str(net)) == 2
    _, err = stderr_lines(capsys)
    assert err == [f"error: --ref-stats {said}"]


@pytest.mark.slow
def test_real_inception_statistics_round_trip(exported, val, tmp_path, capsys):
    """The FID Inception filled by the golden recipe: --save-ref-stats records it, --ref-stats of the same
    images gives the rfid the inputs' own statistics gave."""
    from reference.recipe import SEED_INCEPTION, fill, shapes_of

    from models.inception import FIDInception

    weights = tmp_path / "pt_inception.pth"
    torch.save(fill({**shapes_of(FIDInception().state_dict()), "fc.weight": (1008, 2048), "fc.bias": (1008,)},
                    SEED_INCEPTION), weights)
    stats, a, b = tmp_path / "ref.npz", tmp_path / "a.json", tmp_path / "b.json"
    assert evaluate(exported, val, "--fid-weights", str(weights), "--save-ref-stats", str(stats),
                    "--json", str(a)) == 0
    assert load_stats(stats).net_digest == file_digest(weights)
    assert evaluate(exported, val, "--fid-weights", str(weights), "--ref-stats", str(stats), "--json", str(b)) == 0
    _, err = stderr_lines(capsys)
    assert err == [f"wrote {stats} (Inception statistics of 6 images at 32 px)"]
    assert no_nan(b.read_text())["rfid"] == pytest.approx(no_nan(a.read_text())["rfid"], rel=1e-9)


def test_gaussian_defaults_record_nothing(tmp_path):
    """A Gaussian made by hand records no count, size or network: the file holds only mu and sigma."""
    save_stats(Gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)), tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["mu", "sigma"]
    back = load_stats(tmp_path / "g.npz")
    assert (back.n, back.image_size, back.net_digest) == (0, 0, "")
