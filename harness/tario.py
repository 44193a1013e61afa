"""A fast, hostile-input-proof reader of tar shards for the training stream.

webdataset reads shards through the standard library's `tarfile`, whose header parsing costs about
1 ms per sample in Python: a quarter of the decode time of a 256 px JPEG, and more than half at
64 px. Shards are plain POSIX tar (what webdataset's TarWriter, img2dataset and GNU tar write), so
a header is 512 bytes with the name at [0:100], the size in octal at [124:136], the checksum at
[148:156] and the type at [156]. This module parses exactly that (plus pax and GNU long names) and
groups members into samples as webdataset does (key up to the first dot of the base name,
extensions lower-cased), so samples look exactly as webdataset's would.

Untrusted bytes are checked before they are trusted: a header with a wrong checksum, a size field
that is not a number or runs past the end of the shard (read in bounded chunks, never allocated up
front), a malformed pax record: each is `BadData`. What a shard cannot deliver becomes one
`BadSample` in the stream (shards/decode.py draws the line between bad data and bugs), and a
shard with no sample at all is one too: every read of a shard yields at least one item, so a
stream over empty or unreadable shards is seen to stall instead of spinning forever.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import webdataset as wds
from webdataset.gopen import gopen

from shards.decode import BadData, BadSample, is_data_error, one_line

BLOCK = 512
CHUNK = 1 << 24  # a member is read in pieces of at most this: a forged size allocates nothing
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def _octal(field: bytes, what: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        n = int(text, 8) if text else 0  # the fast path: 4 headers a sample (pax + file, twice)
    except ValueError:
        n = -1
    if n < 0 or not text.isdigit() and text:  # "-7", "+7", "7_7" parse as numbers too
        raise BadData(f"tar header {what} {field[:12]!r} is not an octal number")
    return n


def _read(read, n: int, what: str) -> bytes:
    if n <= CHUNK:
        data = read(n)
    else:
        parts, left = [], n
        while left > 0:
            part = read(min(left, CHUNK))
            if not part:
                break
            parts.append(part)
            left -= len(part)
        data = b"".join(parts)
    if len(data) < n:
        raise _past_end(what, n)
    return data


def _past_end(what: str, n: int) -> BadData:
    return BadData(f"{what} of {n} bytes runs past the end of the shard (truncated, or a forged size)")


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<name>\\n" records): the last one, as
    POSIX and `tarfile` have it. GNU.sparse.* records mark a sparse member (its data is a sparse map
    and chunks, not the file): not supported, so BadData rather than a sample made of the map."""
    path, pos = None, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if length <= space - pos + 1 or pos + length > len(data):
            raise BadData("malformed pax header record")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        elif key.startswith(b"GNU.sparse."):
            raise BadData(f"sparse member ({key.decode('ascii', 'replace')} in a pax header) is not supported")
        pos += length
    return path


@dataclass(frozen=True)
class Ref:
    """Where a member's bytes are, read only if needed: what a fast-forward carries instead of data."""

    url: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.url, "rb") as f:
            f.seek(self.offset)
            return _read(f.read, self.size, "tar member")


@dataclass
class Skipping:
    """The reader's switch for a resume: while `on`, members of local shards are passed by their
    headers alone (seek, no read) and come out as Refs; a sample that is still in the shuffle
    buffer when the fast-forward ends is read then (`materialize`). The items, and so the stream,
    are the same either way."""

    on: bool = False


def tar_members(stream, skipping: Skipping | None = None, url: str = "") -> Iterator[tuple[str, bytes | Ref]]:
    """(name, data) of every regular file in a tar stream, in order; BadData on what is not tar.
    With `skipping` on (a local file), regular members are Refs, checked against the file's size:
    headers (and pax records) are then read at their offsets (`os.pread`), so a fast-forward reads
    no member data, and the buffered stream takes over where it ended."""
    long_name: str | None = None
    fd = stream.fileno() if skipping is not None else -1
    end = os.fstat(fd).st_size if skipping is not None else 0
    at: int | None = None  # the file offset while skipping (the buffered stream is not used meanwhile)
    first = True

    def read_at(n: int) -> bytes:
        nonlocal at
        data = os.pread(fd, n, at)
        at += len(data)
        return data

    while True:
        skip = skipping is not None and skipping.on
        if skip and at is None:
            at = stream.tell()
        elif not skip and at is not None:
            stream.seek(at)
            at = None
        read = read_at if skip else stream.read
        header = read(BLOCK)
        if header == b"\0" * BLOCK or not header and first:
            return  # end of archive (its zero blocks), or an empty file
        if not header:  # cut where a header would start: what `shards verify` calls truncated, not the end
            raise BadData("the shard ends without tar's end-of-archive blocks (cut short?)")
        if len(header) < BLOCK:
            raise BadData("unexpected end of data (truncated header)")
        if first and _octal(header[148:156], "checksum") != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise BadData("tar header checksum mismatch (not a tar file, or corrupt)")
        first = False  # checking every header costs more than parsing it; the first tells a foreign file
        size, kind = _octal(header[124:136], "size"), header[156:157]
        if kind == b"S":  # old GNU sparse: its map runs on in blocks its size does not count
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            raise BadData(f"sparse member {name!r} (GNU tar type 'S') is not supported")
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if skip and kind in (b"0", b"\0", b"7"):
            if at + padded > end:  # what reading would find, without reading
                raise _past_end("tar member", padded)
            data = Ref(url, at, size)
            at += padded
        else:
            data = _read(read, padded, "tar member")[:size]
        if kind in (b"x", b"g"):  # pax header: may rename the next member
            long_name = _pax_path(data) if kind == b"x" else long_name
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None  # directories, links, devices: not samples
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:262] == b"ustar":
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        yield name, data


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _open(url: str):
    # Local files through a 256 KB buffer: a sample's members (header, data, header, ...) come out of
    # memory instead of one system call each (about 10 us a sample); a fast-forward reads at offsets.
    return open(url, "rb", buffering=1 << 18) if _is_local(url) else gopen(url)


def shard_samples(url: str, skipping: Skipping | None = None) -> Iterator[dict | BadSample]:
    """The samples of one shard as webdataset groups them ({"__key__", "__url__", ext: bytes}), then
    one BadSample for the rest of a shard that breaks off (a tar cannot be resynchronised) or for a
    shard without any sample."""
    current, n = None, 0
    try:
        with _open(url) as stream:
            local = skipping if _is_local(url) else None  # pipes and URLs cannot seek
            for name, data in tar_members(stream, local, url):
                if "/" not in name and name.startswith("__") and name.endswith("__") or _SKIP_META.match(name):
                    continue
                match = _KEY.match(name)
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if current is not None and key != current["__key__"]:
                    n += 1
                    yield current
                    current = None
                if current is None:
                    current, duplicate = {"__key__": key, "__url__": url}, False
                if duplicate or ext in current:  # two samples under one key (webdataset raises): from the first
                    if not duplicate:                  # repeated member on, the rest of the key is skipped, said once
                        duplicate = True
                        yield BadSample(key, url, f"a second {key}.{ext} in the shard (keys must be unique): "
                                                  "the second sample is skipped")
                    continue
                current[ext] = data
    except Exception as exn:
        if not is_data_error(exn):
            raise
        key = current["__key__"] if current else ""
        yield BadSample(key, url, f"tar unreadable after {n} samples: {one_line(exn)}")
        return
    if current is not None:
        yield current
    elif n == 0:
        yield BadSample("", url, "no samples (empty tar)")


def materialize(item: dict | BadSample) -> dict | BadSample:
    """A sample whose members are Refs (passed over by a fast-forward) with its bytes read."""
    if isinstance(item, BadSample) or not any(isinstance(v, Ref) for v in item.values()):
        return item
    try:
        return {k: v.read() if isinstance(v, Ref) else v for k, v in item.items()}
    except Exception as exn:
        if not is_data_error(exn):
            raise
        return BadSample(item["__key__"], item["__url__"], f"tar member unreadable: {one_line(exn)}")


def _tarfile_samples(src: Iterable[dict], skipping: Skipping | None = None) -> Iterator[dict | BadSample]:
    for shard in src:
        yield from shard_samples(shard["url"], skipping)


tarfile_to_samples = wds.pipelinefilter(_tarfile_samples)  # a webdataset stage over {"url": ...} dicts


# ----------------------------------------------------------------------------------------------
# writing: one member's bytes (launch/encode.py writes tens of thousands of small members)

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)  # two zero blocks end a tar (tarfile and GNU tar read it so)


def member_bytes(name: str, data: bytes, mtime: int, mode: int = 0o644) -> bytes:
    """One regular file of a POSIX ustar archive: header, data, zero padding to the block. About 20 times
    cheaper than tarfile's pax headers, which webdataset's TarWriter builds for every member; a name over
    100 bytes (ustar's field) goes through tarfile's GNU long-name record, which every reader here follows."""
    encoded = name.encode("utf-8", "surrogateescape")
    pad = bytes(-len(data) % BLOCK)
    if len(encoded) > 100 or len(data) >= 8 << 30 or not 0 <= mtime < 8**11:
        import tarfile

        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), mtime, mode
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data + pad
    header = bytearray(BLOCK)
    header[0:len(encoded)] = encoded
    header[100:108] = b"%07o\x00" % mode
    header[108:124] = b"0000000\x000000000\x00"  # uid, gid
    header[124:136] = b"%011o\x00" % len(data)
    header[136:148] = b"%011o\x00" % mtime
    header[148:156] = b"        "  # the checksum counts its own field as spaces
    header[156] = ord("0")  # a regular file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header) + data + pad

