"""The FID Inception equals pytorch-fid's on golden values, the Frechet distance equals pytorch-fid's
`calculate_frechet_distance`, and the running statistics add up across batches, ranks and files.

The golden file was made by tests/reference/make_fid_golden.py in a venv with torch 2.14.1,
torchvision 0.29.1 and pytorch-fid 0.3.0, on a network filled by tests/reference/recipe.py.
"""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from reference.recipe import SEED_INCEPTION, checksum, feature_sets, fill, shapes_of
from safetensors import safe_open
from safetensors.torch import load_file

from harness.fid import (
    FeatureStats,
    Gaussian,
    StatsFileError,
    frechet_distance,
    gaussian_of,
    load_stats,
    save_stats,
)
from models.inception import FEATURE_DIM, INCEPTION_FILE, FIDInception
from models.weights import WeightsNotFoundError

GOLDEN = Path(__file__).parent / "reference" / "fid_golden.safetensors"
# pytorch-fid's weight file also holds the 1008-way classifier (unused for pool3 features).
FC_SHAPES = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(GOLDEN)), meta


@pytest.fixture(scope="module")
def recipe_state():
    """The recipe over the weight file's names: our network's tensors plus fc."""
    return fill({**shapes_of(FIDInception().state_dict()), **FC_SHAPES}, SEED_INCEPTION)


@pytest.fixture(scope="module")
def net(recipe_state):
    net = FIDInception()
    net.load_state_dict({k: v for k, v in recipe_state.items() if not k.startswith("fc.")}, strict=False)
    return net


def test_recipe_reproduces_the_golden_network_bitwise(golden, recipe_state):
    _, meta = golden
    assert checksum(recipe_state) == meta["inception_checksum"], "the recipe drew other weights than the golden script"


def test_pool3_matches_pytorch_fid(golden, net):
    tensors, _ = golden
    with torch.no_grad():
        feats = net.pool3(tensors["images"].float() / 255)  # pytorch-fid's [0, 1] input
        feats_pm1 = net(tensors["images"][:2].float() / 127.5 - 1)  # the harness's [-1, 1] input
    assert feats.shape == (4, FEATURE_DIM)
    ref = tensors["pool3"]
    assert ref.abs().mean() > 0.1  # the recipe keeps activations alive through the whole network
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats_pm1, ref[:2], rtol=1e-4, atol=1e-4)


def test_frozen_and_always_eval(net):
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a = net(x)
        net.train()
        b = net(x)
    assert torch.equal(a, b)  # BatchNorm kept its running statistics


# -- the Frechet distance ---------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 1])
def test_frechet_distance_matches_pytorch_fid(golden, i):
    tensors, _ = golden
    a, b = feature_sets()[i]
    got = frechet_distance(gaussian_of(a), gaussian_of(b))
    ref = tensors[f"fd{i}"].item()
    assert abs(got - ref) <= 1e-6 * abs(ref), (got, ref)


def test_frechet_distance_singular_covariances(golden):
    """Fewer samples than dimensions (as with a few images and 2048-d features): scipy's sqrtm is
    inexact there, so the agreement is looser, but our value is a proper one."""
    tensors, _ = golden
    a, b = feature_sets()[2]
    got = frechet_distance(gaussian_of(a), gaussian_of(b))
    ref = tensors["fd2"].item()
    assert abs(got - ref) <= 1e-6 * abs(ref), (got, ref)
    assert frechet_distance(gaussian_of(a), gaussian_of(a)) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_by_hand():
    # 1-d: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2) = (m1 - m2)^2 + (sqrt(s1) - sqrt(s2))^2
    g1 = Gaussian(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[4.0]], dtype=torch.float64))
    g2 = Gaussian(torch.tensor([3.0], dtype=torch.float64), torch.tensor([[9.0]], dtype=torch.float64))
    assert frechet_distance(g1, g2) == pytest.approx(4.0 + 1.0, rel=1e-12)
    # diagonal: per-axis sums; symmetric in its arguments
    d1 = Gaussian(torch.zeros(3, dtype=torch.float64), torch.diag(torch.tensor([1.0, 4.0, 0.0], dtype=torch.float64)))
    d2 = Gaussian(torch.ones(3, dtype=torch.float64), torch.diag(torch.tensor([9.0, 1.0, 0.0], dtype=torch.float64)))
    expected = 3.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(d1, d2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(d2, d1) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(g1, d1)


def test_running_sums_equal_direct_statistics():
    a, _ = feature_sets()[1]
    direct = gaussian_of(a)
    stats = FeatureStats(a.shape[1])
    for chunk in a.float().split(37):  # float32 batches, as a network gives them
        stats.update(chunk)
    g = stats.gaussian()
    ref = gaussian_of(a.float())
    assert g.n == a.shape[0]
    torch.testing.assert_close(g.mu, ref.mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(g.sigma, ref.sigma, rtol=0, atol=1e-11)
    torch.testing.assert_close(g.sigma, torch.from_numpy(np.cov(a.float().double().numpy(), rowvar=False)),
                               rtol=0, atol=1e-11)
    assert abs(frechet_distance(g, direct)) < 1e-6
    # two halves merged = the whole
    h1, h2 = FeatureStats(a.shape[1]).update(a[:100]), FeatureStats(a.shape[1]).update(a[100:])
    merged = h1.merge(h2).gaussian()
    torch.testing.assert_close(merged.sigma, direct.sigma, rtol=0, atol=1e-11)
    with pytest.raises(ValueError, match="expected"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(4).update(torch.zeros(1, 4)).gaussian()


def _rank_stats(rank: int, world: int, port: int, feats: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stats = FeatureStats(feats.shape[1]).update(feats[rank::world])  # each rank its share
        g = stats.all_reduce().gaussian()
        save_stats(g, f"{out}/rank{rank}.safetensors")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_across_two_ranks(tmp_path):
    a, _ = feature_sets()[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_stats, args=(2, port, a, str(tmp_path)), nprocs=2, join=True)
    direct = gaussian_of(a)
    for rank in range(2):
        g = load_stats(tmp_path / f"rank{rank}.safetensors")
        assert g.n == a.shape[0]
        torch.testing.assert_close(g.mu, direct.mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(g.sigma, direct.sigma, rtol=0, atol=1e-11)


# -- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_stats_files_round_trip(tmp_path, suffix):
    a, _ = feature_sets()[0]
    g = gaussian_of(a)
    back = load_stats(save_stats(g, tmp_path / f"ref{suffix}"))
    assert back.n == g.n and torch.equal(back.mu, g.mu) and torch.equal(back.sigma, g.sigma)


def test_pytorch_fid_npz_layout_and_bad_files(tmp_path):
    a, _ = feature_sets()[0]
    g = gaussian_of(a)
    np.savez(tmp_path / "pfid.npz", mu=g.mu.numpy(), sigma=g.sigma.numpy())  # pytorch-fid's --save-stats
    back = load_stats(tmp_path / "pfid.npz")
    assert back.n == 0 and torch.equal(back.sigma, g.sigma)
    with pytest.raises(StatsFileError, match="no such statistics file"):
        load_stats(tmp_path / "missing.npz")
    (tmp_path / "broken.npz").write_bytes(b"nope")
    with pytest.raises(StatsFileError, match="not a readable statistics file"):
        load_stats(tmp_path / "broken.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(StatsFileError, match="needs arrays 'mu' and 'sigma'"):
        load_stats(tmp_path / "other.npz")
    with pytest.raises(StatsFileError, match=r"\.npz or \.safetensors"):
        save_stats(g, tmp_path / "stats.txt")
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    with pytest.raises(StatsFileError, match="mu or sigma holds non-finite values"):
        load_stats(tmp_path / "nan.npz")


def test_inception_weight_file_loads_and_missing_is_one_line(tmp_path, recipe_state, golden):
    with pytest.raises(WeightsNotFoundError) as e:
        FIDInception.from_file(tmp_path / INCEPTION_FILE)
    assert "no such file" in str(e.value) and INCEPTION_FILE in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="no path given"):
        FIDInception.from_file("")
    # the real file's layout: our tensors plus fc, no num_batches_tracked
    path = tmp_path / INCEPTION_FILE
    torch.save(recipe_state, path)
    net = FIDInception.from_file(path)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    tensors, _ = golden
    with torch.no_grad():
        feats = net.pool3(tensors["images"][:2].float() / 255)
    torch.testing.assert_close(feats, tensors["pool3"][:2], rtol=1e-5, atol=1e-5)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in recipe_state.items() if "Mixed_7c" not in k}, partial)
    with pytest.raises(WeightsNotFoundError, match="missing"):
        FIDInception.from_file(partial)
    nan = {**recipe_state, "Mixed_7c.branch1x1.conv.weight": torch.full_like(
        recipe_state["Mixed_7c.branch1x1.conv.weight"], float("nan"))}
    torch.save(nan, tmp_path / "nan.pth")  # every FID would be NaN, or a traceback deep in the statistics
    with pytest.raises(WeightsNotFoundError, match=r"nan\.pth: weight Mixed_7c.branch1x1.conv.weight holds non-finite"):
        FIDInception.from_file(tmp_path / "nan.pth")
    torch.save({1: torch.zeros(1)}, tmp_path / "numbered.pth")  # the check LPIPS and train.init_from share
    with pytest.raises(WeightsNotFoundError, match=r"numbered\.pth: not a state dict of tensors \(key 1 of type int"):
        FIDInception.from_file(tmp_path / "numbered.pth")
