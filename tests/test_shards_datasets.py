"""ImageNet (train + flat val with ground truth) and COCO (instances + captions) builders."""

from __future__ import annotations

import pytest
from shards_helpers import SYNSETS, decode, jpeg_bytes, meta, picture, read_set, save, tiny_coco, tiny_imagenet

from shards.__main__ import main
from shards.index import read_index

Q = ["--quiet", "--workers", "1"]


# ----------------------------------------------------------------------------------------------
# ImageNet


def test_imagenet_train_and_val_agree(tmp_path):
    truth = tiny_imagenet(tmp_path)
    train, val = tmp_path / "s" / "train", tmp_path / "s" / "val"
    assert main(["imagenet", str(tmp_path / "train"), str(train), *Q]) == 0
    assert main(["imagenet", str(tmp_path / "val"), str(val), *Q]) == 0  # finds LOC_val_solution.csv upwards
    ti, vi = read_index(train), read_index(val)
    assert ti["classes"] == vi["classes"] == SYNSETS  # sorted synsets, the standard order
    assert ti["class_descriptions"] == [f"fish number {k}" for k in range(3)]  # from LOC_synset_mapping.txt
    assert ti["class_counts"] == [3, 3, 3] and ti["source"]["layout"] == "train"
    for key, s in read_set(train).items():
        assert SYNSETS[int(s["cls"])] == key.split("_")[0] == meta(s)["synset"]
    samples = read_set(val)
    assert sorted(samples) == [f"ILSVRC2012_val_{i:08d}" for i in sorted(truth)]
    for key, s in samples.items():
        assert SYNSETS[int(s["cls"])] == truth[int(key[-8:])]
    bad = (val / "bad_files.txt").read_text()
    assert "ILSVRC2012_val_00000099.JPEG\tno label in LOC_val_solution.csv" in bad
    assert vi["num_bad"] == 1


def test_imagenet_classes_file_fixes_order(tmp_path):
    tiny_imagenet(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "train" / SYNSETS[1])  # a train split missing a class
    order = [SYNSETS[2], SYNSETS[0], SYNSETS[1], "n09999999"]
    (tmp_path / "classes.txt").write_text("# my order\n" + "\n".join(order) + "\n")
    out = tmp_path / "s"
    classes = ["--classes", str(tmp_path / "classes.txt")]
    assert main(["imagenet", str(tmp_path / "train"), str(out / "train"), *classes, *Q]) == 0
    assert main(["imagenet", str(tmp_path / "val"), str(out / "val"), *classes, *Q]) == 0
    for split in ("train", "val"):
        assert read_index(out / split)["classes"] == order
        for s in read_set(out / split).values():
            assert order[int(s["cls"])] == meta(s)["synset"]
    assert read_index(out / "train")["class_counts"] == [3, 3, 0, 0]
    # Without the file the train split alone would number its two classes 0, 1: the file is the fix.
    assert main(["imagenet", str(tmp_path / "train"), str(out / "t2"), *Q]) == 0
    assert read_index(out / "t2")["classes"] == [SYNSETS[0], SYNSETS[2]]


def test_imagenet_val_ground_truth_formats(tmp_path, capsys):
    truth = tiny_imagenet(tmp_path)
    (tmp_path / "LOC_val_solution.csv").unlink()
    val = tmp_path / "val"
    # one synset per line, line i for ILSVRC2012_val_<i>
    per_line = tmp_path / "gt_lines.txt"
    per_line.write_text("\n".join(truth[i] for i in sorted(truth)) + "\n")
    assert main(["imagenet", str(val), str(tmp_path / "a"), "--labels", str(per_line), *Q]) == 0
    got = {k: SYNSETS[int(s["cls"])] for k, s in read_set(tmp_path / "a").items()}
    assert got == {f"ILSVRC2012_val_{i:08d}": s for i, s in truth.items()}
    # "<file> <synset>" per line
    pairs = tmp_path / "gt_pairs.txt"
    pairs.write_text("\n".join(f"ILSVRC2012_val_{i:08d}.JPEG {s}" for i, s in truth.items()) + "\n")
    assert main(["imagenet", str(val), str(tmp_path / "b"), "--labels", str(pairs), *Q]) == 0
    assert {k: SYNSETS[int(s["cls"])] for k, s in read_set(tmp_path / "b").items()} == got
    capsys.readouterr()
    # the devkit's numeric ids are refused, with the reason
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("65\n970\n230\n809\n516\n")
    assert main(["imagenet", str(val), str(tmp_path / "c"), "--labels", str(devkit), *Q]) == 2
    assert "class numbers, not synsets" in capsys.readouterr().err
    # a flat folder without labels, and the ImageNet root itself
    assert main(["imagenet", str(val), str(tmp_path / "d"), *Q]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["imagenet", str(tmp_path), str(tmp_path / "e"), *Q]) == 2
    assert "build each split" in capsys.readouterr().err


@pytest.mark.parametrize("gt", ["csv", "per_line", "pairs"])
def test_imagenet_partial_val_keeps_every_synset_of_the_ground_truth(tmp_path, gt):
    """A val folder holding only some images still numbers its classes by every synset of the
    ground-truth file (sorted), so `cls` means the same as in train, whichever file format."""
    truth = tiny_imagenet(tmp_path)
    val = tmp_path / "val"
    (val / "ILSVRC2012_val_00000003.JPEG").unlink()  # the only image of SYNSETS[1]
    labels = {"csv": tmp_path / "LOC_val_solution.csv", "per_line": tmp_path / "gt_lines.txt",
              "pairs": tmp_path / "gt_pairs.txt"}[gt]
    if gt == "per_line":
        labels.write_text("\n".join(truth[i] for i in sorted(truth)) + "\n")
    elif gt == "pairs":
        labels.write_text("\n".join(f"ILSVRC2012_val_{i:08d}.JPEG {s}" for i, s in truth.items()) + "\n")
    out = tmp_path / "s"
    assert main(["imagenet", str(val), str(out), "--labels", str(labels), *Q]) == 0
    index = read_index(out)
    assert index["classes"] == SYNSETS and index["class_counts"] == [2, 0, 2]
    for key, s in read_set(out).items():
        assert SYNSETS[int(s["cls"])] == truth[int(key[-8:])]


def test_imagenet_odd_images(tmp_path):
    root = tmp_path / "train"
    save(picture(seed=1).convert("CMYK"), root / SYNSETS[0] / "cmyk.JPEG")
    save(picture(seed=2).convert("L"), root / SYNSETS[0] / "gray.JPEG")
    good = jpeg_bytes(picture(seed=3))
    (root / SYNSETS[1] / "cut.JPEG").parent.mkdir(parents=True)
    (root / SYNSETS[1] / "cut.JPEG").write_bytes(good[:300])
    save(picture(seed=4), root / SYNSETS[1] / "fine.JPEG")
    save(picture(seed=5), root / "stray.JPEG")  # not inside a synset folder
    out = tmp_path / "out"
    assert main(["imagenet", str(root), str(out), *Q]) == 0
    samples = read_set(out)
    assert sorted(samples) == ["cmyk", "fine", "gray"]
    assert all(decode(s).mode == "RGB" for s in samples.values())
    bad = (out / "bad_files.txt").read_text()
    assert "cut.JPEG\t" in bad and "stray.JPEG\tnot inside a synset folder" in bad
    assert read_index(out)["num_bad"] == 2


# ----------------------------------------------------------------------------------------------
# COCO


def test_coco_labels_and_captions(tmp_path):
    images, inst, caps = tiny_coco(tmp_path)
    out = tmp_path / "out"
    assert main(["coco", "--images", str(images), "--instances", str(inst), "--captions", str(caps), str(out), *Q]) == 0
    index = read_index(out)
    assert index["label_names"] == ["person", "car", "dog", "toothbrush"]
    assert index["label_ids"] == [1, 3, 18, 90]
    assert index["classes"] == [] and index["label_counts"] == [1, 1, 1, 1]
    samples = read_set(out)
    assert sorted(samples) == ["000000000009", "000000000025", "000000000030"]
    m9, m25, m30 = (meta(samples[k]) for k in sorted(samples))
    assert m9["labels"] == [0, 2] and m9["category_ids"] == [1, 18]
    assert m9["captions"] == ["Person and dog on a street.", "A man walks a dog."]  # by annotation id
    assert samples["000000000009"]["txt"].decode() == "Person and dog on a street."
    assert m9["image_id"] == 9 and (m9["width"], m9["height"]) == (64, 48) and m9["file_name"] == "000000000009.jpg"
    assert m25["labels"] == [1, 3]
    assert m30["labels"] == [] and m30["captions"] == ["An empty room."]  # kept without instance labels
    assert all("cls" not in s for s in samples.values())
    bad = (out / "bad_files.txt").read_text()
    assert "000000000034.jpg\tcannot read" in bad

    # --require-labels drops the image without instances; verify agrees with the index.
    out2 = tmp_path / "out2"
    assert main(["coco", "--images", str(images), "--instances", str(inst), str(out2), "--require-labels", *Q]) == 0
    samples = read_set(out2)
    assert sorted(samples) == ["000000000009", "000000000025"]
    assert all("txt" not in s and "captions" not in meta(s) for s in samples.values())
    assert main(["verify", str(out2), "--workers", "1"]) == 0


def test_coco_captions_only_and_images_only(tmp_path, capsys):
    images, inst, caps = tiny_coco(tmp_path)
    out = tmp_path / "c"
    assert main(["coco", "--images", str(images), "--captions", str(caps), str(out), *Q]) == 0
    index = read_index(out)
    assert index["label_names"] == [] and index["num_samples"] == 3
    assert all("labels" not in meta(s) for s in read_set(out).values())
    out = tmp_path / "i"
    assert main(["coco", "--images", str(images), str(out), *Q]) == 0
    assert sorted(read_set(out)) == ["000000000009", "000000000025", "000000000030", "000000000099"]
    capsys.readouterr()
    (tmp_path / "broken.json").write_text('{"images": [}')
    assert main(["coco", "--images", str(images), "--instances", str(tmp_path / "broken.json"), str(tmp_path / "x"),
                 *Q]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["coco", "--images", str(images), "--instances", str(caps), str(tmp_path / "x"), *Q]) == 2
    assert "not a COCO instances file" in capsys.readouterr().err


def test_coco_records_the_builder_cannot_read_are_one_line(tmp_path, capsys):
    """A category without a name, an annotation without image_id, an image without file_name, a caption that is
    null: each was a KeyError/AttributeError traceback from deep in the builder."""
    import json

    images, inst, caps = tiny_coco(tmp_path)
    cases = [(inst, "categories", 0, "name", "instances", "categories[0] needs 'name' as text (missing)"),
             (inst, "annotations", 1, "image_id", "instances", "annotations[1] needs 'image_id' as an integer "
                                                               "(missing)"),
             (inst, "images", 0, "file_name", "instances", "images[0] needs 'file_name' as text (missing)"),
             (caps, "annotations", 0, "caption", "captions", "annotations[0] needs 'caption' as text (a NoneType)")]
    for source, part, i, key, option, says in cases:
        data = json.loads(source.read_text())
        if key == "caption":
            data[part][i][key] = None
        else:
            del data[part][i][key]
        bad = tmp_path / f"bad_{part}_{key}.json"
        bad.write_text(json.dumps(data))
        capsys.readouterr()
        assert main(["coco", "--images", str(images), f"--{option}", str(bad), str(tmp_path / "x"), *Q]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"{bad}: {says}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_coco_annotations_of_unknown_images_or_categories_are_counted(tmp_path, capsys):
    """They were dropped without a word: an image whose only annotation had an unknown category looked like an
    image without annotations."""
    import json

    images, inst, caps = tiny_coco(tmp_path)
    data, cap = json.loads(inst.read_text()), json.loads(caps.read_text())
    data["annotations"][0]["category_id"] = 99
    data["annotations"][1]["category_id"] = "1"  # a string id is no category id
    data["annotations"].append({"id": 5000, "image_id": 4242, "category_id": 1})
    cap["annotations"].append({"id": 6000, "image_id": 7777, "caption": "ghost"})
    inst.write_text(json.dumps(data))
    caps.write_text(json.dumps(cap))
    capsys.readouterr()
    assert main(["coco", "--images", str(images), "--instances", str(inst), "--captions", str(caps),
                 str(tmp_path / "out"), *Q]) == 0
    err = capsys.readouterr().err
    assert "note: left out 1 instance annotations of images the files do not list" in err
    assert "note: left out 2 instance annotations whose category_id is not among the categories" in err
    assert "note: left out 1 captions of images the files do not list" in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_coco_through_webdataset_multi_hot(tmp_path, workers):
    """What a conditional model would see: a dense multi-hot vector built from json.labels."""
    import torch
    import webdataset as wds

    images, inst, caps = tiny_coco(tmp_path)
    out = tmp_path / "out"
    assert main(["coco", "--images", str(images), "--instances", str(inst), str(out), "--quiet",
                 "--workers", workers]) == 0
    index = read_index(out)
    n = len(index["label_names"])
    urls = [str(out / s["name"]) for s in index["shards"]]

    def multi_hot(m):
        v = torch.zeros(n)
        v[m["labels"]] = 1.0
        return v

    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "json").map_tuple(
        lambda k: k, lambda im: im.size, multi_hot)
    got = {k: (size, v.tolist()) for k, size, v in ds}
    assert got["000000000009"] == ((64, 48), [1.0, 0.0, 1.0, 0.0])
    assert got["000000000025"][1] == [0.0, 1.0, 0.0, 1.0]
    assert got["000000000030"][1] == [0.0] * 4
