"""Tiny generated inputs for the shard tests (no test reads /work/shared/data).

`tiny_imagenet`, `tiny_coco` and `img2dataset_folder` write small data sets in the real layouts
(ImageNet train/ + flat val/ + LOC_val_solution.csv; COCO images + instances/captions JSON;
img2dataset tars + _stats.json); pipeline tests can build shards from them with `shards.__main__.main`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from shards.check import iter_samples
from shards.index import read_index

ROOT = Path(__file__).resolve().parents[1]


def picture(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    """A small RGB picture with structure (so JPEG sizes and decodes are realistic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    a = (base + np.stack([xx * 3, yy * 5, (xx + yy) * 2], -1)) % 256
    return Image.fromarray(a.astype(np.uint8), "RGB")


def save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **kw)
    return path


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def read_set(out: Path) -> dict[str, dict]:
    """key -> sample (fields as bytes) over the shards the index lists, in order."""
    index = read_index(out)
    assert index is not None, f"{out} has no index.json"
    samples = {}
    for s in index["shards"]:
        n = 0
        for sample in iter_samples(str(out / s["name"])):
            assert sample["__key__"] not in samples
            samples[sample["__key__"]] = sample
            n += 1
        assert n == s["num_samples"]
    assert len(samples) == index["num_samples"]
    return samples


def decode(sample: dict) -> Image.Image:
    ext = next(e for e in ("jpg", "png", "webp") if e in sample)
    im = Image.open(io.BytesIO(sample[ext]))
    im.load()
    return im


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def run_cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m shards ARGS` in a fresh process, with this checkout first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "shards", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=str(ROOT))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def index_without_time(out: Path) -> dict:
    index = read_index(out)
    index.pop("created")
    return index


# ----------------------------------------------------------------------------------------------
# tiny data sets in the real layouts (also for pipeline tests: build them, then run the builders)

SYNSETS = ["n01440764", "n01443537", "n01484850"]


def tiny_imagenet(root):
    """train/<synset>/ with 3 classes (the last one missing from train on purpose in one test) + flat val/."""
    for c, syn in enumerate(SYNSETS):
        for j in range(3):
            save(picture(40, 30, seed=10 * c + j), root / "train" / syn / f"{syn}_{j}.JPEG")
    (root / "train" / SYNSETS[0] / "readme.txt").write_text("stray non-image")
    val_truth = {1: SYNSETS[2], 2: SYNSETS[0], 3: SYNSETS[1], 4: SYNSETS[2], 5: SYNSETS[0]}
    for i in val_truth:
        save(picture(36, 36, seed=100 + i), root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    save(picture(36, 36, seed=200), root / "val" / "ILSVRC2012_val_00000099.JPEG")  # not in the ground truth
    rows = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{i:08d},{s} 10 20 30 40 {s} 1 2 3 4"
                                           for i, s in sorted(val_truth.items(), key=lambda kv: -kv[0])]
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    mapping = "\n".join(f"{s} fish number {k}" for k, s in enumerate(SYNSETS)) + "\n"
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return val_truth


# Non-contiguous category ids, as in COCO (1..90 with gaps), listed out of order.
CATEGORIES = [{"supercategory": "animal", "id": 18, "name": "dog"},
              {"supercategory": "person", "id": 1, "name": "person"},
              {"supercategory": "vehicle", "id": 3, "name": "car"},
              {"supercategory": "indoor", "id": 90, "name": "toothbrush"}]
# contiguous index = rank of the id: person 0, car 1, dog 2, toothbrush 3


def tiny_coco(root):
    images_dir = root / "train2017"
    ids = [9, 25, 30, 34]
    images = []
    for k, image_id in enumerate(ids):
        name = f"{image_id:012d}.jpg"
        if image_id != 34:  # 34 is in the annotations but missing on disk
            save(picture(64, 48, seed=k), images_dir / name)
        images.append({"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                       "height": 48, "width": 64, "date_captured": "2013-11-14 16:28:13",
                       "flickr_url": "http://farm.example/x.jpg", "id": image_id})
    save(picture(64, 48, seed=9), images_dir / "000000000099.jpg")  # on disk, not in the annotations
    annotations = [  # image 9: person, dog (twice); 25: car, toothbrush; 30: none
        {"segmentation": [[1.0, 1.0, 10.0, 1.0, 10.0, 10.0]], "area": 40.5, "iscrowd": 0, "image_id": 9,
         "bbox": [1.0, 1.0, 9.0, 9.0], "category_id": 18, "id": 1001},
        {"segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0]], "area": 50.0, "iscrowd": 0, "image_id": 9,
         "bbox": [2.0, 2.0, 10.0, 10.0], "category_id": 1, "id": 1002},
        {"segmentation": {"counts": [0, 5, 10], "size": [48, 64]}, "area": 12.0, "iscrowd": 1, "image_id": 9,
         "bbox": [3.0, 3.0, 4.0, 3.0], "category_id": 18, "id": 1003},
        {"segmentation": [[5.0, 5.0, 20.0, 5.0, 20.0, 20.0]], "area": 99.0, "iscrowd": 0, "image_id": 25,
         "bbox": [5.0, 5.0, 15.0, 15.0], "category_id": 90, "id": 1004},
        {"segmentation": [[5.0, 5.0, 20.0, 5.0, 20.0, 20.0]], "area": 99.0, "iscrowd": 0, "image_id": 25,
         "bbox": [5.0, 5.0, 15.0, 15.0], "category_id": 3, "id": 1005},
        {"segmentation": [[1.0, 1.0, 2.0, 2.0, 3.0, 1.0]], "area": 1.0, "iscrowd": 0, "image_id": 34,
         "bbox": [1.0, 1.0, 2.0, 1.0], "category_id": 1, "id": 1006},
    ]
    info = {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0", "year": 2017,
            "contributor": "COCO Consortium", "date_created": "2017/09/01"}
    licenses = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                 "name": "Attribution-NonCommercial-ShareAlike License"}]
    instances = {"info": info, "licenses": licenses, "images": images, "annotations": annotations,
                 "categories": CATEGORIES}
    captions = {"info": info, "licenses": licenses, "images": images, "annotations": [
        {"image_id": 9, "id": 48, "caption": "A man walks a dog. "},
        {"image_id": 9, "id": 12, "caption": "Person and dog on a street."},
        {"image_id": 25, "id": 70, "caption": "A car parked by a toothbrush."},
        {"image_id": 30, "id": 80, "caption": "An empty room."},
    ]}
    ann = root / "annotations"
    ann.mkdir()
    (ann / "instances_train2017.json").write_text(json.dumps(instances))
    (ann / "captions_train2017.json").write_text(json.dumps(captions))
    return images_dir, ann / "instances_train2017.json", ann / "captions_train2017.json"


def write_tar(path, samples):
    """A shard written the plain way: [(key, {ext: bytes})]."""
    with tarfile.open(path, "w") as tf:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def img2dataset_folder(root, shards=(3, 2), stats=True):
    """What img2dataset writes: 00000.tar (jpg/txt/json per sample), 00000.parquet, 00000_stats.json."""
    root.mkdir(parents=True)
    k = 0
    for s, n in enumerate(shards):
        samples = []
        for _ in range(n):
            key = f"{s:05d}{k:04d}"
            samples.append((key, {"jpg": jpeg_bytes(picture(20, 20, seed=k)), "txt": f"caption {k}".encode(),
                                  "json": json.dumps({"url": f"http://x/{k}.jpg", "key": key, "status": "success",
                                                      "caption": f"caption {k}", "width": 20, "height": 20}).encode()}))
            k += 1
        write_tar(root / f"{s:05d}.tar", samples)
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1")
        if stats:
            (root / f"{s:05d}_stats.json").write_text(json.dumps(
                {"count": n + 1, "successes": n, "failed_to_download": 1, "failed_to_resize": 0,
                 "duration": 1.0, "status_dict": {"success": n, "HTTP 404": 1}}))
    return root
