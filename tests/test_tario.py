"""The fast tar reader yields exactly what webdataset's tarfile-based reader yields."""

import io
import tarfile

import pytest
import webdataset as wds

from harness import tario
from shardgen import image_bytes


def write_tar(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)


def samples(reader, path):
    return [{k: v for k, v in s.items()} for s in wds.DataPipeline(wds.SimpleShardList([str(path)]), reader())]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_webdataset(tmp_path, fmt):
    long = "x" * 90 + "/" + "deep" * 10 + "/k1"  # > 100 chars: pax path, GNU longname or ustar prefix
    if fmt == tarfile.USTAR_FORMAT:
        long = "p" * 120 + "/k1"
    members = [("k0.jpg", image_bytes(0)), ("k0.cls", b"3"), ("k0.json", b'{"a": 1}'), ("__meta__", b"skip"),
               (long + ".jpg", image_bytes(1)), (long + ".txt", "a caption é".encode()), ("k2.seg.png", b"\x89PNG")]
    write_tar(tmp_path / "a.tar", members, fmt)
    ours = samples(tario.tarfile_to_samples, tmp_path / "a.tar")
    theirs = samples(wds.tarfile_to_samples, tmp_path / "a.tar")
    assert ours == theirs and len(ours) == 3 and ours[1]["__key__"] == long


def test_truncated_tar_raises_read_error_to_the_handler(tmp_path):
    write_tar(tmp_path / "a.tar", [(f"k{i}.jpg", image_bytes(i)) for i in range(4)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
    errors = []
    got = samples(lambda: tario.tarfile_to_samples(handler=lambda e: errors.append(e) or True), tmp_path / "b.tar")
    assert 0 < len(got) < 4 and isinstance(errors[0], tarfile.ReadError)
    with pytest.raises(tarfile.ReadError):
        samples(tario.tarfile_to_samples, tmp_path / "b.tar")
