"""The WebDataset pipeline: shapes, labels, rank split, replay for resume, bad samples."""

import io
import os
import time

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from shardgen import _write_shards, image_bytes, make_shards

from harness.config import DataConfig
from harness.data import TrainLoader, to_model_input
from shards.decode import load_image
from shards.images import to_rgb
from shards.index import write_index
from shards.sources import DataSourceError, resolve_sources


def keys_of(loader, n, start=0):
    it = loader.batches(start)
    return [next(it)["key"] for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=96, per_shard=12, size=40, num_classes=4)


def cfg(path, **kw):
    base = dict(train=str(path), image_size=32, num_workers=0, shuffle_buffer=16)
    base.update(kw)
    return DataConfig(**base)


def test_batches_have_shapes_labels_and_counts(shards):
    loader = TrainLoader(cfg(shards), rank=0, world_size=1, batch_size=6)
    assert loader.info.num_samples == 96 and loader.info.classes == ["c0", "c1", "c2", "c3"]
    assert loader.batches_per_epoch == 96 // 6
    batch = next(loader.batches())
    assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype.is_floating_point is False
    # the label is the one written with the key (key s00007 -> class 7 % 4)
    assert [int(k[1:]) % 4 for k in batch["key"]] == batch["cls"].tolist()
    x = to_model_input(batch["image"], "cpu")
    assert x.shape == (6, 3, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05


def test_a_worker_sends_numpy_and_the_reader_gets_the_same_tensors(shards):
    """Workers send numpy arrays (no fresh shared memory a batch); the reader turns them into tensors,
    and a batch is the same, bit for bit, with or without a worker process."""
    import torch

    from harness.data import collate

    got = []
    for workers in (0, 1):
        it = TrainLoader(cfg(shards, num_workers=workers), rank=0, world_size=1, batch_size=6).batches()
        got.append([next(it) for _ in range(3)])
    for a, b in zip(*got):
        assert isinstance(b["image"], torch.Tensor) and b["image"].dtype == torch.uint8
        assert isinstance(b["cls"], torch.Tensor) and b["cls"].dtype == torch.int64
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["cls"], b["cls"])
    samples = [{"image": np.zeros((2, 2, 3), np.uint8), "cls": i, "key": str(i)} for i in range(3)]
    assert isinstance(collate(samples, as_numpy=True)["image"], np.ndarray)
    assert collate(samples)["cls"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_see_disjoint_samples(shards, workers):
    seen = []
    for rank in range(2):
        loader = TrainLoader(cfg(shards, num_workers=workers), rank=rank, world_size=2, batch_size=4)
        seen.append({k for batch in keys_of(loader, 10) for k in batch})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_fewer_shards_than_ranks_splits_samples(tmp_path):
    one = make_shards(tmp_path / "one", num_samples=24, per_shard=24)
    seen = []
    for rank in range(2):
        loader = TrainLoader(cfg(one, shuffle_buffer=0), rank=rank, world_size=2, batch_size=4)
        assert loader.sample_split
        seen.append({k for batch in keys_of(loader, 3) for k in batch})
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_shorter_than_a_shard_still_reaches_the_shards_ends(tmp_path, workers):
    """Each epoch restarts a slot's stream (a resume replays at most an epoch): it used to start at a
    shard's first sample every time, so a slot reading fewer samples an epoch than a shard holds never
    read the shards' ends (41 of 100 samples of a small mixed-in set never read in 20 epochs). Now each
    epoch starts at a random point of the first shard: every sample is read, about as often as any."""
    one = make_shards(tmp_path / "one", num_samples=64, per_shard=64, size=8)
    loader = TrainLoader(cfg(one, num_workers=workers, shuffle_buffer=0, epoch_samples=8, image_size=8), rank=0,
                         world_size=1, batch_size=4)
    assert loader.batches_per_epoch == 2  # 8 samples an epoch (4 per slot with 2 workers), from a shard of 64
    reads = {}
    for batch in keys_of(loader, 2 * 120):  # 120 epochs: each sample about 15 times
        for k in batch:
            reads[k] = reads.get(k, 0) + 1
    assert len(reads) == 64, f"never read: {64 - len(reads)} of 64"
    first, second = (sum(n for k, n in reads.items() if (int(k[1:]) < 32) == half) for half in (True, False))
    assert 0.6 < second / first < 1.67, (first, second)  # the shard's second half about as often as its first


def test_a_set_smaller_than_the_ranks_still_feeds_every_rank(tmp_path):
    """Overfitting a handful of images on a multi-GPU node (a pipeline check): a shard of 2 samples on 4
    ranks. Each rank keeps every world_size-th sample of its own stream of the shard read again and again,
    so every rank gets samples (two ranks read the same ones): a split of each shard's positions by rank
    would leave ranks 2 and 3 none, and their streams nothing to deliver."""
    tiny = tmp_path / "tiny"
    parts = _write_shards(tiny, 2, 2, lambda i: {"__key__": f"t{i:05d}", "jpg": image_bytes(i, 8), "cls": "0"})
    write_index(tiny, source={"kind": "test"}, shards=parts, classes=["c0"])
    for rank in range(4):
        loader = TrainLoader(cfg(tiny, image_size=8, shuffle_buffer=0, epoch_samples=8), rank=rank, world_size=4,
                             batch_size=2)
        assert {k for batch in keys_of(loader, 3) for k in batch} <= {"t00000", "t00001"}


def test_a_small_source_keeps_the_others_split_by_shard(tmp_path):
    """One source with fewer shards than ranks switched every source of the mixture to the sample-level
    split: each rank read all shards of the big one too (at 64 ranks, 64x its bytes). Only the small one
    is split by sample now."""
    big = make_shards(tmp_path / "big", num_samples=64, per_shard=8, size=8)
    small = tmp_path / "small"  # keys of its own
    shards = _write_shards(small, 8, 8, lambda i: {"__key__": f"t{i:05d}", "jpg": image_bytes(i, 8), "cls": "0"})
    write_index(small, source={"kind": "test"}, shards=shards, classes=["c0", "c1", "c2", "c3"])
    seen = []
    for rank in range(2):
        c = DataConfig(train=[str(big), str(small)], image_size=8, num_workers=0, shuffle_buffer=16)
        loader = TrainLoader(c, rank=rank, world_size=2, batch_size=4)
        assert loader.sample_split
        assert [len(p.urls) for p in loader.dataset.parts] == [4, 1] and [p.split for p in loader.dataset.parts] == [
            False, True]
        seen.append({k for batch in keys_of(loader, 20) for k in batch})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert loader.split_notes() == [f"{small}: fewer shards than ranks (1 < 2): every rank reads all its shards and "
                                    "keeps 1/world_size of the samples; make more shards"]
    # 3 shards on 2 ranks: rank 1's samples are read twice as often (every rank reads as many batches)
    three = DataConfig(train=str(make_shards(tmp_path / "three", num_samples=24, per_shard=8, size=8)), image_size=8)
    (note,) = TrainLoader(three, rank=0, world_size=2, batch_size=4).split_notes()
    assert "3 shards over 2 ranks: some ranks hold 2 shards, others 1, and read each of their samples 2x" in note


@pytest.mark.parametrize("workers", [0, 2])
def test_replay_from_any_batch_matches_uninterrupted_stream(shards, workers):
    c = cfg(shards, num_workers=workers)
    straight = keys_of(TrainLoader(c, rank=0, world_size=1, batch_size=5), 25)  # crosses an epoch (19 batches)
    for start in (3, 7, 19, 20):
        resumed = keys_of(TrainLoader(c, rank=0, world_size=1, batch_size=5), 25 - start, start=start)
        assert resumed == straight[start:], f"replay from batch {start} differs"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mixture_with_a_sample_split_source_replays_exactly(shards, tmp_path, workers):
    """Two sources, one split by shard and one by sample (fewer shards than ranks), each starting its
    epochs at its own random point: replayed from any batch, across an epoch, as it ran."""
    small = tmp_path / "small"
    parts = _write_shards(small, 10, 10, lambda i: {"__key__": f"t{i:05d}", "jpg": image_bytes(i, 8), "cls": "0"})
    write_index(small, source={"kind": "test"}, shards=parts, classes=["c0", "c1", "c2", "c3"])
    c = DataConfig(train=[f"{shards}::0.7", f"{small}::0.3"], image_size=8, num_workers=workers, shuffle_buffer=8,
                   epoch_samples=48)
    loader = lambda: TrainLoader(c, rank=1, world_size=3, batch_size=4)  # noqa: E731
    assert [p.split for p in loader().dataset.parts] == [False, True] and loader().batches_per_epoch == 4
    straight = keys_of(loader(), 10)
    for start in (1, 3, 4, 6):
        assert keys_of(loader(), 10 - start, start=start) == straight[start:], start


def test_seed_changes_the_stream(shards):
    a = keys_of(TrainLoader(cfg(shards, seed=1), rank=0, world_size=1, batch_size=4), 3)
    b = keys_of(TrainLoader(cfg(shards, seed=2), rank=0, world_size=1, batch_size=4), 3)
    assert a != b


def test_corrupt_image_and_truncated_tar_are_skipped_and_counted(tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    with wds.TarWriter(str(out / "000000.tar")) as w:
        for i in range(10):
            data = image_bytes(i) if i != 3 else b"\xff\xd8\xff\xe0 this is not a jpeg"
            w.write({"__key__": f"a{i}", "jpg": data, "cls": "0"})
        w.write({"__key__": "noimage", "txt": "a caption without an image"})
    with wds.TarWriter(str(out / "000001.tar")) as w:
        for i in range(10):
            w.write({"__key__": f"b{i}", "jpg": image_bytes(100 + i), "cls": "1"})
    full = (out / "000001.tar").read_bytes()
    (out / "000001.tar").write_bytes(full[: len(full) // 2])  # truncated mid-file
    write_index(out, source={"kind": "test"}, shards=[{"name": "000000.tar", "num_samples": 11},
                                                      {"name": "000001.tar", "num_samples": 10}])
    loader = TrainLoader(cfg(out, shuffle_buffer=0), rank=0, world_size=1, batch_size=4)
    it = loader.batches()
    batches = [next(it) for _ in range(12)]
    keys = {k for b in batches for k in b["key"]}
    assert "a3" not in keys and "noimage" not in keys
    assert any(k.startswith("b") for k in keys)  # the readable half of the truncated shard is used
    assert sum(b["bad"] for b in batches) >= 3  # the bad jpeg, the sample without an image, the truncation
    assert any("a3" in b["bad_error"] or "noimage" in b["bad_error"] or "Error" in b["bad_error"] for b in batches)


def test_a_shard_cut_where_a_header_would_start_is_a_bad_sample_not_its_end(tmp_path):
    """A cut at a 512-byte boundary (an interrupted copy, a full disk: often a 4 KiB page) read as the
    end of the archive: its last samples were lost without a word. `shards verify` called it truncated;
    the loader now counts it as a bad sample too."""
    from harness import tario

    out = tmp_path / "cut"
    out.mkdir()
    with wds.TarWriter(str(out / "000000.tar")) as w:
        for i in range(8):
            w.write({"__key__": f"s{i}", "jpg": image_bytes(i, 8), "cls": "0"})
    full = (out / "000000.tar").read_bytes()
    member_ends = [i for i in range(512, len(full) - 1024, 512) if full[i + 257:i + 262] == b"ustar"]
    cut = member_ends[len(member_ends) // 2]  # where a header starts, half-way
    (out / "000000.tar").write_bytes(full[:cut])
    items = list(tario.shard_samples(str(out / "000000.tar")))
    assert 0 < len(items) - 1 < 8 and "end-of-archive" in str(items[-1]) and hasattr(items[-1], "reason"), items[-1]
    whole = tmp_path / "whole.tar"
    whole.write_bytes(full)
    assert [it["__key__"] for it in tario.shard_samples(str(whole))] == [f"s{i}" for i in range(8)]
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert "no samples" in str(list(tario.shard_samples(str(empty)))[0])


def test_programming_errors_are_not_swallowed(shards, monkeypatch):
    import shards.decode as decode

    def broken(*args, **kwargs):
        raise TypeError("a bug, not bad data")

    monkeypatch.setattr(decode, "load_image", broken)
    loader = TrainLoader(cfg(shards), rank=0, world_size=1, batch_size=4)
    with pytest.raises(TypeError, match="a bug"):
        next(loader.batches())


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "LA"])
def test_any_mode_becomes_rgb(mode):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8), "RGB")
    img = img.convert("I;16") if mode == "I;16" else img.convert(mode)
    assert to_rgb(img).mode == "RGB"
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    arr = load_image(buf.getvalue(), 16, "center", False, None)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("level", [200, 4096])
def test_16_bit_images_scale_by_the_mode_range_not_the_pixel_max(level):
    """A dark 16-bit picture stays dark: 200/65535 is black, 4096/65535 is 1/16 grey, whatever the max."""
    a = np.full((20, 30), level, dtype=np.uint16)
    a[:, :10] = level // 2
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    expected = round(level * 255 / 65535)
    assert expected < 20
    for im in (img, img.convert("I")):  # PIL opens 16-bit PNGs as I;16 or I
        rgb = np.asarray(to_rgb(im))
        assert rgb.shape == (20, 30, 3) and rgb[:, 10:].max() == expected and rgb[:, 10:].min() == expected
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # a real 16-bit greyscale PNG through the training decoder
    arr = load_image(buf.getvalue(), 16, "center", False, None)
    assert arr.max() <= expected + 1



def test_a_32_bit_integer_image_is_a_bad_sample_not_a_clipped_one():
    """Mode I holds 32 bits: values past 65535 were clipped to white without a word (a TIFF ramp to 1.05M
    decoded to [0, 255, 255, ...]). Its scale is unknown, as a float image's outside [0, 1] is."""
    from shards.images import BadImage

    ramp = Image.fromarray(np.arange(30 * 20, dtype=np.int32).reshape(20, 30) * 1750)
    assert ramp.mode == "I" and np.asarray(ramp).max() > 65535
    with pytest.raises(BadImage, match="outside 0..65535"):
        to_rgb(ramp)
    buf = io.BytesIO()
    ramp.save(buf, format="TIFF")
    with pytest.raises(Exception, match="outside 0..65535"):  # the loader's BadData, with the same reason
        load_image(buf.getvalue(), 16, "center", False, None)


def photo_like(w, h, seed=0):
    """Smooth gradients and sharp edges, as a photo has (noise alone resizes to grey)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8))
    img = coarse.resize((w, h), Image.BICUBIC)
    img.paste((255, 0, 0), (w // 3, h // 3, w // 2, h // 2))
    return img


@pytest.mark.parametrize("w,h,size", [(64, 48, 32), (48, 64, 32), (24, 20, 32), (40, 30, 40), (32, 32, 32),
                                      (1, 1, 16), (1, 9, 8), (300, 7, 16), (530, 520, 32), (520, 530, 64),
                                      (523, 530, 32), (600, 523, 64), (530, 520, 16)])
def test_the_resize_is_pils_bicubic_of_the_crop(w, h, size):
    """Torch's uint8 kernel with PIL's filter: within 2 levels of PIL resizing the same square crop,
    up or down (antialiased), for any shape down to one pixel; a crop 8x the size or more is box-averaged
    first, as PIL's `reducing_gap=4` does it (also when the factor does not divide the crop)."""
    import random

    img = photo_like(w, h)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    side = min(w, h)
    for crop in ("center", "random"):
        got = load_image(buf.getvalue(), size, crop, False, random.Random(3))
        rng = random.Random(3)
        x0, y0 = ((rng.randint(0, w - side), rng.randint(0, h - side)) if crop == "random"
                  else ((w - side) // 2, (h - side) // 2))
        gap = 4.0 if side >= 8 * size else None
        want = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC, reducing_gap=gap)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        assert np.abs(got - np.asarray(want, dtype=int)).max() <= 2, (crop, np.abs(got - want).max())


def test_a_drafted_jpeg_still_big_for_the_size_is_box_averaged_as_pil_would():
    """A 4000x3000 JPEG for 32 px: drafted to 500x375, a 375 crop then reduced by 2 (not a divisor)."""
    img = photo_like(4000, 3000)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    drafted = Image.open(io.BytesIO(buf.getvalue()))
    drafted.draft("RGB", (32, 32))
    drafted = drafted.convert("RGB")
    assert drafted.size == (500, 375)
    want = drafted.crop((62, 0, 437, 375)).resize((32, 32), Image.BICUBIC, reducing_gap=4.0)
    got = load_image(buf.getvalue(), 32, "center", False, None)
    assert np.abs(got - np.asarray(want, dtype=int)).max() <= 2


def test_a_failing_resize_is_a_bug_not_bad_data(monkeypatch):
    """The resize's inputs are ours (a crop of a decoded picture): torch failing there must stop the run
    with its error, not turn every sample into a bad one (a torch without the kernel would)."""
    import random
    import types

    import shards.decode as dec

    def broken(*args, **kwargs):
        raise RuntimeError("kernel gone")

    load_image(image_bytes(0, 40), 32, "center", False, None)  # torch imported
    fake = types.SimpleNamespace(from_numpy=dec._torch.from_numpy, ops=types.SimpleNamespace(
        aten=types.SimpleNamespace(_upsample_bicubic2d_aa=types.SimpleNamespace(out=broken))))
    monkeypatch.setattr(dec, "_torch", fake)
    sample = {"__key__": "k", "__url__": "u", "jpg": image_bytes(0, 40)}
    with pytest.raises(RuntimeError, match="failed in torch: kernel gone"):
        dec.guarded(sample, dec.DecodeSpec(image_size=32), random.Random(0))
    with pytest.raises(dec.BadData, match="no pixels"):  # never from PIL (it refuses such files), but said
        dec.resize_into(np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 3), np.uint8))


def test_a_big_picture_is_box_averaged_before_it_becomes_an_array(monkeypatch):
    """A 64 Mpx PNG would otherwise be copied whole into an array beside PIL's own pixels."""
    import random

    factors = []
    reduce = Image.Image.reduce
    monkeypatch.setattr(Image.Image, "reduce", lambda im, f, box=None: (factors.append(f), reduce(im, f, box))[1])
    buf = io.BytesIO()
    photo_like(530, 520).save(buf, "PNG")
    for size, want in ((66, []), (65, [2]), (64, [2]), (32, [4]), (16, [8])):  # from 8x the size on, to >= 4x it
        factors.clear()
        assert load_image(buf.getvalue(), size, "random", False, random.Random(0)).shape == (size, size, 3)
        assert factors == want, size


def test_decoding_into_a_batch_slot_writes_there_and_flips_as_drawn():
    import random

    buf = io.BytesIO()
    photo_like(60, 40).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    batch = np.zeros((3, 32, 32, 3), np.uint8)
    slot = batch[1]
    assert load_image(data, 32, "center", False, random.Random(0), out=slot) is slot
    assert np.array_equal(batch[1], load_image(data, 32, "center", False, random.Random(0)))
    assert not batch[0].any() and not batch[2].any()  # nothing outside the slot
    flips = []
    for seed in range(8):  # hflip: drawn after the crop, half the time
        plain = load_image(data, 32, "random", False, random.Random(seed))
        flipped = load_image(data, 32, "random", True, random.Random(seed), out=batch[2])
        flips.append(not np.array_equal(flipped, plain))
        assert np.array_equal(flipped, plain) or np.array_equal(flipped, plain[:, ::-1])
    assert 0 < sum(flips) < 8
    for wrong in (np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3), np.float32), batch[:, :, ::2][0]):
        with pytest.raises(ValueError, match="out must be"):  # a caller's bug, not bad data
            load_image(data, 32, "center", False, None, out=wrong)


def test_the_loader_decodes_each_image_straight_into_its_batch(shards, monkeypatch):
    """Each good image goes into its batch slot by the decoder itself (no array of its own to copy)."""
    import shards.decode as dec

    outputs = []
    real = dec.load_image

    def spying(*args, **kwargs):
        outputs.append(real(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(dec, "load_image", spying)
    images = next(TrainLoader(cfg(shards), rank=0, world_size=1, batch_size=6).batches())["image"].numpy()
    assert len(outputs) == 6  # no worker: the first batch is the first six positions
    assert all(np.shares_memory(out, images[i]) for i, out in enumerate(outputs))
    assert np.array_equal(images, np.stack(outputs))


def test_missing_sources_are_one_line_errors(tmp_path):
    with pytest.raises(DataSourceError, match="do not exist"):
        resolve_sources(str(tmp_path / "{000000..000003}.tar"))
    with pytest.raises(DataSourceError, match="no such folder or file"):
        resolve_sources(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no .tar shards"):
        resolve_sources(str(tmp_path / "empty"))


def test_epoch_smaller_than_a_batch_is_refused(shards):
    with pytest.raises(DataSourceError, match="less than one batch per rank"):
        TrainLoader(cfg(shards, epoch_samples=10), rank=0, world_size=2, batch_size=8)



@pytest.mark.parametrize("workers", [0, 2])
def test_nothing_readable_stops_with_one_line_instead_of_hanging(tmp_path, workers):
    from harness.data import DataStalledError

    out = tmp_path / "garbage"
    out.mkdir()
    for i in range(2):
        (out / f"{i:06d}.tar").write_bytes(b"not a tar file at all " * 100)
    write_index(out, source={"kind": "test"}, shards=[{"name": f"{i:06d}.tar", "num_samples": 8} for i in range(2)])
    loader = TrainLoader(cfg(out, num_workers=workers), rank=0, world_size=1, batch_size=4)
    with pytest.raises(DataStalledError) as e:
        next(loader.batches())
    msg = str(e.value)
    assert "\n" not in msg and "in a row could not be read" in msg and "shards verify" in msg, msg


@pytest.mark.parametrize("max_samples, workers", [(1, 2), (5, 2), (7, 3), (0, 2)])
def test_eval_batches_read_exactly_max_samples(shards, max_samples, workers):
    from harness.data import eval_batches

    loader, _ = eval_batches(str(shards), image_size=32, batch_size=4, num_workers=workers, max_samples=max_samples)
    keys = [k for b in loader if b["image"] is not None for k in b["key"]]
    assert len(keys) == len(set(keys)) == (max_samples or 96)
    # the first max_samples in shard order, whatever the workers: evaluate.py's numbers equal validation's
    alone, _ = eval_batches(str(shards), image_size=32, batch_size=4, num_workers=0, max_samples=max_samples)
    assert sorted(keys) == sorted(k for b in alone if b["image"] is not None for k in b["key"])


LEAKY = """
import os, signal, subprocess, sys, time
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
from harness.config import DataConfig
from harness.data import TrainLoader
loader = TrainLoader(DataConfig(train={shards!r}, image_size=32, num_workers=2, shuffle_buffer=8),
                     rank=0, world_size=1, batch_size=4)
it = loader.batches()
next(it)
tasks = os.listdir("/proc/self/task")
workers = [int(p) for t in tasks for p in open(f"/proc/self/task/{{t}}/children").read().split()]
print("workers", *workers, flush=True)
for w in workers:  # what SLURM does: a signal to every process, sent by someone other than the parent
    subprocess.run(["kill", "-TERM", str(w)], check=True)
    subprocess.run(["kill", "-USR1", str(w)], check=True)
time.sleep(1)
for _ in range(3):
    next(it)  # the workers are still serving
print("served", flush=True)
# exits with the iterator still open: multiprocessing terminates the workers (SIGTERM from the parent)
"""


STARTING = """
import os, signal, subprocess, sys, threading, time
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
import harness.data as data
from harness.config import DataConfig
real = data._ignore_stop_signals
data._ignore_stop_signals = lambda worker_id: (time.sleep(1.5), real(worker_id))  # a slow start-up
loader = data.TrainLoader(DataConfig(train={shards!r}, image_size=32, num_workers=2, shuffle_buffer=8),
                          rank=0, world_size=1, batch_size=4)
it = loader.batches()
first = threading.Thread(target=next, args=(it,))
first.start()  # forks the workers, which now sleep before their init
workers = []
while len(workers) < 2:
    time.sleep(0.05)
    workers = [int(p) for t in os.listdir("/proc/self/task")
               for p in open(f"/proc/self/task/{{t}}/children").read().split()]
for w in workers:  # SLURM's signals, and a terminal's, while the workers are still starting
    for sig in ("-TERM", "-USR1", "-INT", "-HUP"):
        subprocess.run(["kill", sig, str(w)], check=True)
first.join()
for _ in range(3):
    next(it)
print("served", flush=True)
"""


def test_workers_starting_up_keep_signals_for_later(shards, tmp_path):
    """A signal that reaches a worker before its init has set up its signal thread waits (blocked since
    the fork) instead of killing it: the trainer would crash without a checkpoint."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "starting.py"
    script.write_text(STARTING.format(root=root, shards=str(shards)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "served" in r.stdout, r.stderr[-2000:]
    assert "Ctrl-C" not in r.stderr


@pytest.mark.slow
def test_workers_end_when_their_parent_is_killed_with_batches_in_flight(shards):
    """A batch (numpy, through the pipe) can be larger than the pipe holds: a worker whose parent died
    with SIGKILL is blocked in that write, and must still end (its signal thread sees the orphaning)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    code = (f"import sys, time; sys.path[:0] = [{root!r}]\n"
            "from harness.config import DataConfig\nfrom harness.data import TrainLoader\n"
            f"it = TrainLoader(DataConfig(train={str(shards)!r}, image_size=128, num_workers=2, shuffle_buffer=8),"
            " rank=0, world_size=1, batch_size=24).batches()\n"
            "next(it)\nimport os\nprint(*[int(p) for t in os.listdir('/proc/self/task') for p in "
            "open(f'/proc/self/task/{t}/children').read().split()], flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = [int(w) for w in proc.stdout.readline().split()]
    assert len(workers) == 2
    time.sleep(3)  # the workers fill the prefetch queue and block writing (1.2 MB batches)
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.5)
    left = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in left:
        os.kill(w, 9)
    assert not left, "workers outlived their killed parent"


@pytest.mark.slow
def test_workers_drop_outside_stop_signals_but_end_with_their_parent(shards, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "leaky.py"
    script.write_text(LEAKY.format(root=root, shards=str(shards)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "served" in r.stdout, r.stderr[-2000:]
    workers = [int(w) for w in r.stdout.split("\n")[0].split()[1:]]
    assert len(workers) >= 2

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.time() + 10  # the parent's exit terminates them; give their exit a moment to finish
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers)  # no leftover workers after the parent exited
