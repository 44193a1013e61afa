"""Builders -> training pipeline: what `python -m shards` writes is what the loader yields."""

import numpy as np
import pytest
from PIL import Image

from harness.config import DataConfig
from harness.data import TrainLoader
from shards.__main__ import main as shards_main


def loader_for(path, batch_size=8, **kw):
    cfg = DataConfig(train=str(path), image_size=24, num_workers=kw.pop("num_workers", 0), shuffle_buffer=20, **kw)
    return TrainLoader(cfg, rank=0, world_size=1, batch_size=batch_size)


def write_images(root, layout: dict[str, int], size=(40, 30)):
    rng = np.random.default_rng(0)
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / folder / f"{folder}_{i}.JPEG")


def test_demo_shards_train(tmp_path):
    assert shards_main(["demo", str(tmp_path / "demo"), "--num-samples", "60", "--image-size", "32",
                        "--shard-size", "16"]) == 0
    loader = loader_for(tmp_path / "demo", num_workers=2)
    assert loader.info.num_samples == 60 and loader.info.num_shards == 4 and len(loader.info.classes) == 10
    batch = next(loader.batches())
    assert batch["image"].shape == (8, 24, 24, 3)
    assert batch["cls"].min() >= 0 and batch["cls"].max() < 10
    if loader.info.label_names:  # demo attributes as multi-hot labels
        assert batch["labels"].shape == (8, len(loader.info.label_names))


def test_imagenet_layout_labels_survive_the_pipeline(tmp_path):
    synsets = {"n01440764": 5, "n01443537": 4, "n01484850": 3}
    write_images(tmp_path / "train", synsets)
    assert shards_main(["imagenet", str(tmp_path / "train"), str(tmp_path / "out"), "--shard-size", "4"]) == 0
    loader = loader_for(tmp_path / "out", batch_size=4)
    assert loader.info.classes == sorted(synsets) and loader.info.num_samples == 12
    it = loader.batches()
    for _ in range(6):
        batch = next(it)
        for key, cls in zip(batch["key"], batch["cls"].tolist()):
            assert key.startswith(loader.info.classes[cls]), (key, cls)  # key = <synset>_<i>


def test_folder_with_subfolders_labels(tmp_path):
    write_images(tmp_path / "src", {"cats": 3, "dogs": 5})
    assert shards_main(["folder", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    loader = loader_for(tmp_path / "out", batch_size=4)
    assert loader.info.classes == ["cats", "dogs"] and loader.info.num_samples == 8
    batch = next(loader.batches())
    for key, cls in zip(batch["key"], batch["cls"].tolist()):
        assert ["cats", "dogs"][cls] in key


@pytest.mark.parametrize("num_samples", [0, 20])
def test_img2dataset_like_folder_needs_a_count(tmp_path, num_samples):
    import webdataset as wds

    from shards.sources import DataSourceError

    out = tmp_path / "i2d"
    out.mkdir()
    with wds.TarWriter(str(out / "00000.tar")) as w:
        for i in range(20):
            buf = __import__("io").BytesIO()
            Image.fromarray(np.full((30, 30, 3), i * 10, np.uint8)).save(buf, format="JPEG")
            w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"caption {i}", "json": '{"url": "x"}'})
    if not num_samples:
        with pytest.raises(DataSourceError, match="data.num_samples"):
            loader_for(out)
    else:
        loader = loader_for(out, num_samples=num_samples, batch_size=5)
        batch = next(loader.batches())
        assert batch["image"].shape == (5, 24, 24, 3) and (batch["cls"] == -1).all()


def test_conditional_vae_trains_on_coco_multi_hot_labels(tmp_path):
    """COCO-schema annotations -> shards -> a multilabel conditional VAE trains; labels reach the model."""
    import json
    from pathlib import Path

    from shards_helpers import tiny_coco

    from harness import checkpoint as ckpt
    from launch.train import main as train_main

    images, instances, captions = tiny_coco(tmp_path / "coco")
    args = ["coco", "--images", str(images), "--instances", str(instances), "--captions", str(captions),
            str(tmp_path / "shards"), "--quiet"]
    assert shards_main(args) == 0
    index = json.loads((tmp_path / "shards/index.json").read_text())
    num = len(index["label_names"])  # the categories of the instances file (80 in real COCO)
    assert {"person", "dog", "car", "toothbrush"} <= set(index["label_names"])
    loader = loader_for(tmp_path / "shards", batch_size=2)
    it, labels = loader.batches(), {}
    for _ in range(8):
        batch = next(it)
        labels.update({k: v.nonzero().flatten().tolist() for k, v in zip(batch["key"], batch["labels"])})
    names = index["label_names"]
    assert sorted(names[i] for i in labels["000000000009"]) == ["dog", "person"]  # as annotated
    assert sorted(names[i] for i in labels["000000000025"]) == ["car", "toothbrush"]
    assert labels["000000000030"] == []  # kept, without labels
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    code = train_main(["--config", str(root / "launch/configs/cond_demo.yaml"), f"data.train={tmp_path / 'shards'}",
                       f"run.dir={run}", "model.condition=multilabel", f"model.num_classes={num}",
                       "model.ch_mult=[1,2]", "data.image_size=32", "train.batch_size=2", "train.max_steps=3",
                       "log.progress=false", "data.num_workers=0", "log.images_every_steps=3", "log.class_rows=3",
                       "log.num_images=2"])
    assert code == 0 and ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3
    assert any((run / "samples").glob("class_samples_*.png"))


def test_img2dataset_output_trains_as_it_is(tmp_path):
    """An img2dataset folder (tars + parquet + *_stats.json, no index) trains without conversion."""
    from pathlib import Path

    from shards_helpers import img2dataset_folder

    from harness import checkpoint as ckpt
    from launch.train import main as train_main

    folder = img2dataset_folder(tmp_path / "i2d", shards=(6, 6))
    loader = loader_for(folder, batch_size=4)
    assert loader.info.num_samples == 12  # from the successes in the _stats.json files
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    assert train_main(["--config", str(root / "tests/configs/tiny.yaml"), f"data.train={folder}", f"run.dir={run}",
                       "train.max_steps=3", "data.image_size=16"]) == 0
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3
