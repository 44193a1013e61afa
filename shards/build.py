"""The one writer loop every builder shares: items in, shards + bad_files.txt + index.json out.

A builder (demo, folder, imagenet, coco) only lists `Item`s and names a `produce` function that
turns one item into image bytes. This module does the rest, the same way for all of them:

    items -> (shuffle) -> produce in a process pool, in order -> ShardWriter -> NNNNNN.tar
                                                               -> bad_files.txt -> index.json

Resuming. Output depends only on the item list and the options that change bytes (never on
`--workers`), so a shard is a pure function of its position. Each shard is written as
`NNNNNN.tar.tmp` and renamed when complete; then `.progress.json` records it together with how
many items it consumed. A re-run of the same command keeps the recorded shards, deletes a `.tmp`
left by a killed run, and continues from the first item after the last complete shard: the result
is byte-identical to an uninterrupted build. `index.json` is written last, so its presence means
the set is complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import random
import re
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.atomic import commit, is_temp_of, write_atomic
from shards.images import BadImage, process_image
from shards.index import INDEX_NAME, read_index, write_index

PROGRESS_NAME = ".progress.json"
BAD_FILES_NAME = "bad_files.txt"
SHARD_RE = re.compile(r"^\d{6}\.tar(\.tmp)?$")
TAR_MTIME = 1_600_000_000  # fixed member mtime: same input -> byte-identical tars
# Test hook: "N" hard-exits after N samples written, "N:interrupt" raises Ctrl-C, "N:term" sends this
# process SIGTERM, "N:term-group" sends it to the whole process group (as SLURM or `timeout` may).
FAULT_ENV = "SHARDS_FAULT_AFTER"


class BuildError(Exception):
    """A user mistake (missing folder, bad option, foreign output folder): one line, exit code 2."""


def safe_text(s: str) -> str:
    """`s` as text that encodes to UTF-8: a file name's undecodable bytes (which Python keeps as
    surrogate escapes) become `\\xe9`. For what is written out (json, txt, bad_files.txt, class names), never
    for the path that is opened."""
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name holds (from a JSON \\ud800 escape)
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def one_field(s: str) -> str:
    """`s` (safe_text) with the characters that would end or split a line or a tab-separated field in
    bad_files.txt (a tab or a newline in a file name; every non-printable one) written as `\\t`, `\\n`,
    `\\x1c`, as Python writes them: one input is one line, whatever its name."""
    named = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}

    def shown(c: str) -> str:
        return named.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")

    return "".join(c if c.isprintable() else shown(c) for c in safe_text(s))


@dataclass
class Item:
    """One future sample. Must stay small and picklable: it travels to a worker process."""

    key: str
    path: str = ""  # file to read ("" for generated items)
    cls: int = -1  # class index into the index's `classes` (-1 = none)
    meta: dict = field(default_factory=dict)  # goes into the sample's `json` (labels, captions, ids)
    txt: str = ""  # the sample's `txt` ("" = none)


@dataclass
class BuildOptions:
    workers: int = 1  # encoding processes (1 = encode in the writer process)
    max_size: int = 0  # longest side in pixels after re-encoding (0 = keep the original size)
    quality: int = 95  # JPEG quality of re-encoded images
    resize_filter: str = "bicubic"  # downscaling filter for --max-size (see shards.images.RESIZE_FILTERS)
    shard_size: int = 1000  # samples per shard
    shard_bytes: int = 0  # close a shard once it holds about this many bytes (0 = no limit)
    shuffle_seed: int | None = 0  # order of samples across shards (None = sorted input order)
    max_samples: int = 0  # use only the first N items after shuffling (0 = all)
    overwrite: bool = False  # replace shards of another build in OUT
    progress: bool = True  # tqdm progress bar

    def image_policy(self) -> str:
        if not self.max_size:
            return "original"
        return f"max_side={self.max_size},quality={self.quality},filter={self.resize_filter}"


# ----------------------------------------------------------------------------------------------
# producing one sample (runs in the worker processes)


def _regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "not a plain file")
        raise BadImage(f"not a regular file ({kind}): not opened")


def produce_file(item: Item, *, max_size: int = 0, quality: int = 95, resize_filter: str = "bicubic"):
    """Read and normalize the image file an item names -> (bytes, ext, size info for the json)."""
    try:
        _regular(os.stat(item.path).st_mode)  # a FIFO would block the open (and the build) forever
        fd = os.open(item.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # swapped for one since: no block
        with open(fd, "rb") as f:
            _regular(os.fstat(fd).st_mode)
            data = f.read()
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror or e}") from None
    except ValueError as e:  # a name no file can have: a NUL byte, a lone surrogate (from annotation files)
        raise BadImage(f"cannot read: {e}") from None
    if not data:
        raise BadImage("empty file")
    enc = process_image(data, max_size=max_size, quality=quality, resize_filter=resize_filter)
    info = {"width": enc.width, "height": enc.height}
    if (enc.orig_width, enc.orig_height) != (enc.width, enc.height):
        info.update(orig_width=enc.orig_width, orig_height=enc.orig_height)
    return enc.data, enc.ext, info


_PRODUCE: Callable | None = None


def _init_worker(produce):
    global _PRODUCE
    _PRODUCE = produce


def _start_worker(initializer, initargs):
    # Ctrl-C and SIGTERM reach every process of the group (a terminal, SLURM); the parent handles both
    # and stops the pool. A worker that acted on them itself would print a traceback, or die holding
    # the pool's queue lock (after it acquired the lock, before its `with` block began), and the
    # parent's Pool.terminate() would wait for that lock forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


class _Pool(multiprocessing.pool.Pool):
    @staticmethod
    def Process(ctx, *args, **kwds):
        p = ctx.Process(*args, **kwds)
        p.terminate = p.kill  # the workers ignore SIGTERM: Pool.terminate() ends them with SIGKILL
        return p


def worker_pool(processes: int, initializer: Callable | None = None, initargs: tuple = ()):
    """A process pool (fork where there is one) whose workers leave Ctrl-C and SIGTERM to the parent."""
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return _Pool(processes, initializer=_start_worker, initargs=(initializer, initargs), context=ctx)


def _work(job):
    pos, item = job
    try:
        data, ext, info = _PRODUCE(item)
    except BadImage as e:
        return pos, None, " ".join(str(e).split()) or "bad image"
    sample = {"__key__": item.key, ext: data}
    if item.cls >= 0:
        sample["cls"] = str(item.cls).encode()
    meta = {**item.meta, **info}
    # The builders pass text through safe_text; backslashreplace keeps a slip from killing the build
    # (inside a JSON string it gives a valid \\u escape).
    if meta:
        sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8", "backslashreplace")
    if item.txt:
        sample["txt"] = safe_text(item.txt).encode()
    return pos, sample, ""


# ----------------------------------------------------------------------------------------------
# output folder state


def _stale_temp(name: str) -> bool:
    """The temporary of an index / progress / bad-files write that a killed run left behind."""
    return any(is_temp_of(name, n) for n in (INDEX_NAME, BAD_FILES_NAME, PROGRESS_NAME))


def _clean(out: Path):
    for p in out.iterdir():
        if SHARD_RE.match(p.name) or p.name in (INDEX_NAME, BAD_FILES_NAME, PROGRESS_NAME) or _stale_temp(p.name):
            p.unlink()


def _lock(out: Path):
    """An exclusive lock on OUT/.build.lock: two builds writing one folder would corrupt each other. (Not
    `.lock`, the run folder's lock: a shard set would look like a run folder, and be taken for one.)"""
    import fcntl

    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: exists and is not a folder")
    if out.is_symlink() and not out.exists():
        raise BuildError(f"{out}: a link to {os.readlink(out)}, which does not exist")
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".build.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BuildError(f"{out}: another build is writing into this folder right now") from None
    except OSError:  # a file system without flock (some NFS/Lustre setups): go on unlocked
        pass
    return f


def _fingerprint(kind: str, items: list[Item], opts: BuildOptions, extra: dict) -> str:
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(opts).items() if k not in ("workers", "overwrite", "progress")}
    h.update(json.dumps([kind, settings, extra], sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it.key, it.path, it.cls, it.meta, it.txt], sort_keys=True).encode())
    return h.hexdigest()


def _index_readable(out: Path) -> bool:
    """Whether OUT/index.json is there and sound. A broken one (a crash while it was written) is
    only reported: the build then goes on from its last shard and writes the index again."""
    try:
        return read_index(out) is not None
    except ValueError as e:
        print(f"{e}; writing it again", file=sys.stderr)
        return False


def _prepare(out: Path, fingerprint: str, overwrite: bool) -> dict:
    """The progress to continue from: {"shards": [...], "bad": [...], "done": bool}."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    fresh = {"fingerprint": fingerprint, "shards": [], "bad": [], "done": False}
    progress_path = out / PROGRESS_NAME
    progress = None
    if progress_path.is_file():
        try:
            progress = json.loads(progress_path.read_text())
        except (json.JSONDecodeError, OSError):
            progress = None
    if progress is None or progress.get("fingerprint") != fingerprint:
        # (a .tar.tmp is what a run killed in its first shard leaves, before any progress: not foreign)
        foreign = progress is not None or any((SHARD_RE.match(p.name) and not p.name.endswith(".tmp"))
                                              or p.name == INDEX_NAME for p in out.iterdir())
        if foreign and not overwrite:
            what = "a build with other inputs or options" if progress is not None else "shards not made by this command"
            raise BuildError(f"{out}: holds {what}; pass --overwrite to replace them, or choose another folder")
        _clean(out)
        return fresh
    # Same build: keep the complete shards that are still there, byte count and all.
    kept = []
    for rec in progress["shards"]:
        p = out / rec["name"]
        if not p.is_file() or p.stat().st_size != rec["bytes"]:
            break
        kept.append(rec)
    end = kept[-1]["end"] if kept else 0
    done = progress.get("done") and len(kept) == len(progress["shards"]) and _index_readable(out)
    keep_names = {r["name"] for r in kept}
    for p in out.iterdir():  # a .tmp of a killed run, shards after a missing one
        if (SHARD_RE.match(p.name) and p.name not in keep_names) or _stale_temp(p.name):
            p.unlink()
    bad = progress["bad"] if done else [b for b in progress["bad"] if b[0] < end]
    return {"fingerprint": fingerprint, "shards": kept, "bad": bad, "done": bool(done)}


# ----------------------------------------------------------------------------------------------
# the build


def order_items(items: list[Item], opts: BuildOptions) -> list[Item]:
    """Sorted input order, shuffled by --shuffle-seed, cut to --max-samples."""
    items = list(items)
    if opts.shuffle_seed is not None:
        random.Random(opts.shuffle_seed).shuffle(items)
    if opts.max_samples:
        items = items[: opts.max_samples]
    return items


def build(out: str | Path, items: list[Item], produce: Callable, opts: BuildOptions, *, source: dict,
          classes: list[str] = (), label_names: list[str] = (), index_extra: dict | None = None,
          skipped: list[tuple[str, str]] = (), order: bool = True) -> dict:
    """Write `items` as shards into `out` and return the index. Resumes an interrupted build.

    `skipped` are inputs the builder already rejected while listing, as (path, reason): they go
    into bad_files.txt with the ones that fail to decode.
    """
    out = Path(out)
    if opts.shard_size < 1:
        raise BuildError(f"--shard-size must be at least 1 (got {opts.shard_size})")
    if order:
        items = order_items(items, opts)
    if not items:
        raise BuildError(f"{source.get('path', out)}: no images found")
    _check_keys(items)
    fingerprint = _fingerprint(source.get("kind", ""), items, opts,
                               {"classes": list(classes), "labels": list(label_names)})
    lock = _lock(out)  # noqa: F841  held until this function returns (or the process dies)
    state = _prepare(out, fingerprint, opts.overwrite)
    bad_paths = out / BAD_FILES_NAME
    if state["done"]:
        print(f"{out}: already complete ({sum(s['num_samples'] for s in state['shards'])} samples in "
              f"{len(state['shards'])} shards); nothing to do", file=sys.stderr)
        return read_index(out)
    start = state["shards"][-1]["end"] if state["shards"] else 0
    if start:
        print(f"{out}: resuming after {len(state['shards'])} complete shards ({start} of {len(items)} inputs done)",
              file=sys.stderr)

    progress_path = out / PROGRESS_NAME
    bad = state["bad"]  # [position, path or key, reason]
    shards = state["shards"]
    fault = os.environ.get(FAULT_ENV, "").partition(":")
    fault_after, fault_kind = int(fault[0] or 0), fault[2]
    last = {"end": start, "stream": None}

    def save_progress(done=False):
        write_atomic(progress_path, json.dumps({"fingerprint": fingerprint, "shards": shards, "bad": bad,
                                                "done": done}))

    # A shard's temporary name is the fixed NNNNNN.tar.tmp (not shards.atomic.temp_path): the folder
    # lock makes this the only writer, and a re-run must find and delete what a killed run left.
    def open_tmp(fname):
        last["stream"] = open(fname + ".tmp", "wb")
        return last["stream"]

    def shard_done(fname):
        last["stream"].close()
        count = writer.count
        if count == 0:  # the writer opens a shard before knowing whether anything follows
            os.unlink(fname + ".tmp")
            return
        commit(fname + ".tmp", fname)
        shards.append({"name": os.path.basename(fname), "num_samples": count,
                       "bytes": os.path.getsize(fname), "end": last["end"]})
        save_progress()

    from tqdm import tqdm
    from webdataset import ShardWriter

    # Pool.imap keeps every finished result until it is consumed: with workers faster than the
    # disk, all encoded images of the set would pile up in memory. A semaphore taken for each
    # item handed out and given back for each one written keeps only `in_flight` images around.
    in_flight = threading.Semaphore(max(64, 32 * opts.workers))
    stop = threading.Event()

    def todo():
        for pos in range(start, len(items)):
            while not in_flight.acquire(timeout=0.2):
                if stop.is_set():  # the pool is being torn down: let its feeder thread finish
                    return
            yield pos, items[pos]

    pool = None
    if opts.workers > 1:
        pool = worker_pool(opts.workers, _init_worker, (produce,))
        results = pool.imap(_work, todo(), chunksize=8)
    else:
        _init_worker(produce)
        results = map(_work, ((pos, items[pos]) for pos in range(start, len(items))))

    t0 = time.perf_counter()
    written = 0
    tty = sys.stderr.isatty()  # in a log file (SLURM, nohup) a line every 30 s is enough
    bar = tqdm(total=len(items), initial=start, unit="img", disable=not opts.progress, dynamic_ncols=True,
               smoothing=0.05, mininterval=0.1 if tty else 30, file=sys.stderr)
    writer = ShardWriter(str(out / "%06d.tar"), maxcount=opts.shard_size,
                         maxsize=opts.shard_bytes if opts.shard_bytes > 0 else float("inf"),
                         post=shard_done, start_shard=len(shards), verbose=0, opener=open_tmp,
                         encoder=False, mtime=TAR_MTIME)
    try:
        for pos, sample, reason in results:
            in_flight.release()
            if sample is None:
                bad.append([pos, items[pos].path or items[pos].key, reason])
                bar.set_postfix(bad=len(bad), refresh=False)
            else:
                writer.write(sample)
                last["end"] = pos + 1
                written += 1
                if fault_after and written >= fault_after:
                    if fault_kind == "interrupt":
                        raise KeyboardInterrupt  # as Ctrl-C would
                    if fault_kind == "term":
                        os.kill(os.getpid(), signal.SIGTERM)
                    elif fault_kind == "term-group":
                        os.killpg(os.getpgrp(), signal.SIGTERM)
                    else:
                        os._exit(75)  # as abrupt as kill -9: no cleanup, no finally
            bar.update(1)
        writer.close()
    except BaseException:
        stop.set()
        if pool is not None:
            pool.terminate()
        bar.close()
        if last["stream"] is not None and not last["stream"].closed:  # drop the half-written shard
            try:
                writer.tarstream.close()  # (else tarfile flushes into the closed file when collected)
            except Exception:
                pass
            writer.tarstream = None
            last["stream"].close()
            Path(last["stream"].name).unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    bar.close()
    elapsed = time.perf_counter() - t0

    # Report, then index last: index.json present <=> the set is complete.
    bad.sort()
    report = [(path, reason) for path, reason in skipped] + [(path, reason) for _, path, reason in bad]
    write_atomic(bad_paths, "".join(f"{one_field(path)}\t{one_field(reason)}\n" for path, reason in report))
    if not shards:
        raise BuildError(f"{source.get('path', out)}: none of the {len(items)} inputs is a usable image "
                         f"(reasons in {bad_paths})")
    save_progress(done=True)
    bad_pos = {b[0] for b in bad}
    extra = dict(index_extra or {})
    extra["num_bad"] = len(report)
    if classes:
        counts = Counter(it.cls for pos, it in enumerate(items) if pos not in bad_pos)
        extra["class_counts"] = [counts.get(i, 0) for i in range(len(classes))]
    if label_names:
        counts = Counter(j for pos, it in enumerate(items) if pos not in bad_pos for j in it.meta.get("labels", ()))
        extra["label_counts"] = [counts.get(i, 0) for i in range(len(label_names))]
    records = [{k: s[k] for k in ("name", "num_samples", "bytes")} for s in shards]
    index = write_index(out, source=source, shards=records, classes=classes, label_names=label_names,
                        image_policy=opts.image_policy(), **extra)
    rate = (len(items) - start) / elapsed if elapsed > 0 else 0.0
    print(f"{out}: {index['num_samples']} samples in {len(shards)} shards ({rate:.0f} img/s)"
          + (f"; {len(report)} bad inputs skipped, listed in {bad_paths}" if report else ""), file=sys.stderr)
    return index


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]+")


def make_key(name: str, limit: int = 80) -> str:
    """A webdataset key from a name: no dots (they start the extension), no slashes, not too long."""
    key = _KEY_BAD.sub("_", name).strip("_") or "img"
    if len(key) > limit:
        # surrogatepass: any str encodes (a non-UTF-8 file name, a lone surrogate); distinct names, distinct hashes
        key = key[: limit - 9] + "_" + hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return key


def unique_keys(names: list[str]) -> list[str]:
    """make_key for each name; a key that repeats gets _2, _3... (in input order, so deterministic)."""
    seen: dict[str, int] = {}
    keys = []
    for n in names:
        k = make_key(n)
        if k in seen:
            seen[k] += 1
            k2 = f"{k}_{seen[k]}"
            while k2 in seen:
                seen[k] += 1
                k2 = f"{k}_{seen[k]}"
            k = k2
        seen.setdefault(k, 1)
        keys.append(k)
    return keys


def _check_keys(items: list[Item]):
    dup = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if dup:  # a builder bug, not a user mistake
        raise AssertionError(f"duplicate sample keys, e.g. {dup[0]!r}")
