"""A fast reader of tar members for the training stream.

webdataset reads shards through the standard library's `tarfile`, whose header parsing costs about
1 ms per sample in Python: a quarter of the decode time of a 256 px JPEG, and more than half at
64 px. Shards are plain POSIX tar (what webdataset's TarWriter, img2dataset and GNU tar write), so
a header is 512 bytes with the name at [0:100], the size in octal at [124:136] and the type at
[156]. This module parses exactly that (plus pax and GNU long names) and hands members to
webdataset's own `url_opener` / `group_by_keys`, so samples look exactly as webdataset's would.
Anything it does not understand raises `tarfile.ReadError`, which the pipeline's handler counts.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, url_opener

BLOCK = 512
_SKIP_META = re.compile(r"__[^/]*__($|/)")


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes >= 8 GiB
        n = int.from_bytes(field[1:], "big")
        return -n if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<name>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in a tar stream, in order."""
    long_name: str | None = None
    read = stream.read
    while True:
        header = read(BLOCK)
        if not header or header == b"\0" * BLOCK:
            return  # end of archive (two zero blocks, or a tar without them)
        if len(header) < BLOCK:
            raise tarfile.ReadError("unexpected end of data (truncated header)")
        size, kind = _octal(header[124:136]), header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = read(padded)
        if len(data) < padded:
            raise tarfile.ReadError("unexpected end of data (truncated member)")
        data = data[:size]
        if kind in (b"x", b"g"):  # pax header: may rename the next member
            long_name = _pax_path(data) if kind == b"x" else long_name
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None  # directories, links, devices: not samples
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:262] == b"ustar":
                name = prefix.decode("utf-8") + "/" + name
        yield name, data


def _members(sources: Iterable[dict], handler) -> Iterator[dict]:
    """webdataset's tar_file_expander, over `tar_members`: file dicts plus an end-of-shard marker."""
    for source in sources:
        url = source["url"]
        try:
            for name, data in tar_members(source["stream"]):
                if "/" not in name and name.startswith("__") and name.endswith("__") or _SKIP_META.match(name):
                    continue
                yield {"fname": name, "data": data, "__url__": url}
            yield {}  # keeps samples of different shards apart in group_by_keys
        except Exception as exn:
            exn.args = exn.args + (url,)
            if handler(exn):
                yield {}
                continue
            break
        finally:
            close = getattr(source["stream"], "close", None)
            if close:
                close()


def _tarfile_samples(src, handler=wds.reraise_exception):
    return group_by_keys(_members(url_opener(src, handler=handler), handler), handler=handler)


tarfile_to_samples = wds.pipelinefilter(_tarfile_samples)
