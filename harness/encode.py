"""Latent shards: a shard set encoded once by a trained model, for training a diffusion model on it.

One output shard per input shard, in the input's shard order, named `NNNNNN.tar` after its position
there; every sample keeps its input key and carries:

    latent.npy   `c h w`: KL: the posterior mean; VQ: the latent before quantization (what diffusers'
                 VQModel.encode and latent-diffusion's VQModelInterface.encode hand a diffusion model);
                 FSQ and plain autoencoders: the latent the decoder reads
    std.npy      KL only: the posterior std (a diffusion step draws z = latent + std * randn)
    codes.npy    VQ/FSQ: the code indices `h w` (int16, int32 past 32767 codes): what a prior trains on
    *_flip.npy   with `flip`: the same for the mirrored image
    cls, json, txt   the input's: cls as its integer, json and txt byte for byte

`latents.json` is written last, so its presence means the set is complete: the model (folder, digest
of its weights), the settings, each shard (name, input url, samples, bad samples, bytes) and the
latent statistics over every latent written (harness/latents.py: scaling_factor, shift_factor, per
channel), which a diffusion model normalises with. Plain webdataset reads the shards
(`.npy` decodes with pickles refused).

An interrupted run goes on where it stopped when run again with the same model, data and settings:
each finished shard is recorded (with its statistics' sums and its sha256) in `.progress.<rank>.json`,
then renamed into place; what was half-written is dropped. `--verify` checks every recorded shard
against its sha256 (a run checks only sizes) and writes the ones that differ again. Under torchrun,
input shard i goes to rank i % world_size; the ranks meet only at the start (rank 0 checks the folder)
and at the end (rank 0 writes latents.json), through a gloo group.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch.utils.data import IterableDataset, get_worker_info

from harness import tario
from harness.data import (
    WorkerLoader,
    _as_is,
    _ignore_stop_signals,
    collate,
    condition_field,
    decode,
    heldout_sources,
    to_model_input,
    to_torch,
)
from harness.dist import World, all_reduce_sum
from harness.latents import LatentMoments, stats_from_sums
from shards.atomic import commit, is_temp_of, write_atomic
from shards.decode import BadSample, DecodeSpec
from shards.index import INDEX_NAME

FORMAT = "vae-harness-latents/1"
MANIFEST = "latents.json"
LOCK = ".encode.lock"
PROGRESS_RE = re.compile(r"^\.progress\.(\d+|done)\.json$")
DONE = ".progress.done.json"  # the finished shards an earlier run left, gathered by rank 0 at the start
SHARD_RE = re.compile(r"^\d{6}\.tar$")
TAR_MTIME = 1_600_000_000  # fixed member mtime, as the shard builders: same input -> identical tars
PASS_THROUGH = ("json", "txt")
BAD_EXAMPLES = 3  # bad samples named per shard in latents.json
FAULT_ENV = "ENCODE_FAULT_AFTER_SHARDS"  # tests: stop (SIGTERM-like) after this many shards of this run


class EncodeError(Exception):
    """A one-line reason the encoding cannot start or go on; nothing written is lost. `shared`: every rank
    raises it (rank 0 says it); else only the rank that met it knows."""

    def __init__(self, message: str, shared: bool = False):
        super().__init__(message)
        self.shared = shared


@dataclass(frozen=True)
class EncodeOptions:
    image_size: int
    batch_size: int = 32
    workers: int = 2
    dtype: str = "float16"  # of latent/std (codes are integers)
    flip: bool = False
    ema: bool = False
    precision: str = "fp32"  # fp32 | bf16 (autocast of the encoder; the arrays are written in `dtype`)

    def settings(self) -> dict:
        """What the shards are refused over when it changes. Workers change nothing; the batch size can move a
        float16 value by one step (the convolution kernels pick their algorithm by batch), which is not worth
        refusing a resume for: each shard records the batch size it was written with."""
        return {k: v for k, v in asdict(self).items() if k not in ("batch_size", "workers")}


def _progress_name(rank: int) -> str:
    return f".progress.{rank}.json"


# ----------------------------------------------------------------------------------------------
# reading: batches that never mix two shards


class ShardBatches(IterableDataset):
    """`jobs` ([(index, url)]) split over the loader's workers, each shard read whole by one worker into
    batches of its own: {"shard": index, "last": whether the shard ends with it, "image" (None when only
    bad samples remain), "key", "cls"[, "labels"], "raw": the pass-through fields, "bad": count,
    "bad_examples": ["key: reason"]}."""

    def __init__(self, jobs: list[tuple[int, str]], decoder: DecodeSpec, batch_size: int):
        self.jobs, self.decoder, self.batch_size = jobs, decoder, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(0)  # center crops draw nothing; decode takes one
        for index, url in self.jobs[worker::num_workers]:
            batch, raw, bad, examples = [], [], 0, []
            for item in tario.shard_samples(url):
                item = tario.materialize(item)
                out = decode(item, self.decoder, rng)
                if isinstance(out, BadSample):
                    bad += 1
                    if len(examples) < BAD_EXAMPLES:
                        examples.append(f"{out.key or '?'}: {out.reason}")
                    continue
                batch.append(out)
                raw.append({k: item[k] for k in PASS_THROUGH if k in item})
                if len(batch) == self.batch_size:
                    yield self._batch(index, batch, raw, bad, examples, last=False)
                    batch, raw, bad, examples = [], [], 0, []
            yield self._batch(index, batch, raw, bad, examples, last=True)

    @staticmethod
    def _batch(index, batch, raw, bad, examples, last):
        # numpy, not tensors (and the loader's collate_fn leaves them so): pickled through the pipe, where a
        # tensor would go by file-descriptor passing, whose sharer thread prints a traceback in a worker when
        # a stop closes the connection under it
        out = collate(batch, as_numpy=True) if batch else {"image": None}
        return {**out, "shard": index, "last": last, "raw": raw, "bad": bad, "bad_examples": examples}


# ----------------------------------------------------------------------------------------------
# what is written per sample


def latent_fields(model, x: torch.Tensor, cond: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], tuple]:
    """{field: `b ...` tensor} for a batch, and the (mean, var) the statistics take."""
    if hasattr(model, "posterior"):
        post = model.posterior(x, cond)
        return {"latent": post.mean, "std": post.std}, (post.mean, post.var)
    kind = getattr(model, "kind", "")
    if kind in ("vq", "fsq"):
        z = model.encode_unquantized(x, cond)
        q = model.quantizer(z.float())
        latent = z if kind == "vq" else q.quantized
        return {"latent": latent, "codes": q.indices}, (latent, None)
    z = model.encode(x, cond)
    return {"latent": z}, (z, None)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class Converter:
    """Tensors of a batch -> numpy arrays in the set's dtypes, refusing values that would not survive."""

    def __init__(self, dtype: str, num_codes: int | None):
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.codes = np.int16 if num_codes is not None and num_codes <= 32767 else np.int32

    def __call__(self, name: str, t: torch.Tensor, keys: list[str], url: str) -> np.ndarray:
        if name.startswith("codes"):
            return t.cpu().numpy().astype(self.codes)
        t = t.float()
        finite = torch.isfinite(t).flatten(1).all(1)
        if not finite.all():
            key = keys[int((~finite).nonzero()[0])]
            raise EncodeError(f"{url}: the latent of {key} is not finite (NaN or inf): the model fails on that "
                              "image; nothing of its shard was written")
        array = t.cpu().numpy()
        if self.dtype == np.float16:
            big = t.abs().flatten(1).amax(1)
            if (big > 65504).any():
                i = int((big > 65504).nonzero()[0])
                raise EncodeError(f"{url}: the latent of {keys[i]} reaches {float(big[i]):.4g}, past float16's "
                                  "65504; encode with --dtype float32")
            return array.astype(np.float16)
        return array


class ShardOut:
    """One output shard being written under `NNNNNN.tar.tmp`, renamed into place when its input ends."""

    def __init__(self, out: Path, index: int, url: str, batch_size: int):
        self.path = out / f"{index:06d}.tar"
        self.batch_size = batch_size
        self.sha = hashlib.sha256()
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.url = url
        self.source = str(Path(url).resolve()) if _local(url) else url
        self.file = None  # opened by open(), once the caller holds this object (a stop in between leaves nothing)
        self.moments = LatentMoments()
        self.count = self.bad = 0
        self.examples: list[str] = []

    def open(self) -> ShardOut:
        self.file = open(self.tmp, "wb", buffering=1 << 20)
        return self

    def write(self, sample: dict) -> None:
        """One sample's members in name order (as webdataset's TarWriter writes them), plain ustar headers."""
        key = sample["__key__"]
        self._write(b"".join(tario.member_bytes(f"{key}.{k}", sample[k], TAR_MTIME)
                             for k in sorted(sample) if k != "__key__"))
        self.count += 1

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)

    def finish(self, channels: int) -> dict:
        """Closes the shard, still under its .tmp name, and returns its record; commit() puts it in place once
        the record is written (so every NNNNNN.tar in the folder is recorded, and a stop in between leaves
        a record whose shard is missing: written again)."""
        self._write(tario.END_OF_ARCHIVE)
        self.file.close()
        return {"name": self.path.name, "source": self.source, "num_samples": self.count, "bad": self.bad,
                "bad_examples": self.examples, "bytes": self.tmp.stat().st_size, "sha256": self.sha.hexdigest(),
                "batch_size": self.batch_size, "sums": self.moments.sums(channels)}

    def commit(self) -> None:
        commit(self.tmp, self.path)

    def drop(self) -> None:
        try:
            if self.file is not None:
                self.file.close()  # may fail itself on a full disk (the buffer's last write)
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# the output folder: checked once (rank 0), then written by every rank


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _numbers(value, length: int | None = None) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def valid_record(r) -> bool:
    """A shard record as encode.py writes it (a hand-edited or foreign one is no record: its shard is
    written again, never trusted)."""
    if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not SHARD_RE.match(r["name"]):
        return False
    if not all(isinstance(r.get(k), int) and not isinstance(r.get(k), bool) and r[k] >= 0
               for k in ("bytes", "num_samples", "bad")):
        return False
    sha = r.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        return False
    sums = r.get("sums")
    return (isinstance(sums, dict) and isinstance(sums.get("images"), int) and _numbers(sums.get("n"))
            and all(_numbers(sums.get(k), len(sums["n"])) for k in ("s1", "s2")))


def valid_manifest(m, num_shards: int | None = None) -> bool:
    """latents.json as encode.py writes it: this format, a record for every shard (000000.tar on, in
    order; `num_shards` of them when the inputs are known, and as many as it says it holds), and the
    samples it says it holds."""
    if not (isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("fingerprint"), dict)
            and isinstance(m.get("model"), dict) and isinstance(m.get("fields"), dict)
            and isinstance(m.get("shards"), list) and all(valid_record(r) for r in m["shards"])):
        return False
    shards = m["shards"]
    count = len(shards) if num_shards is None else num_shards
    return ([r["name"] for r in shards] == [f"{i:06d}.tar" for i in range(count)]
            and m.get("num_shards", count) == count
            and m.get("num_samples") == sum(r["num_samples"] for r in shards))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_out(out: Path, inputs: list[Path], overwrite: bool = False) -> None:
    """Refuse, before anything is created, an --out that is a file, lies where a run keeps its state or
    where the input shards are, or holds something not ours: NNNNNN.tar files count as ours only beside a
    latents.json or progress file that could record them (else they are image shards that lost their
    index.json, as likely as latents of an encoding killed in its first second: --overwrite says which)."""
    from harness.inference import run_storage

    if out.exists() and not out.is_dir():
        raise EncodeError(f"--out {out}: is a file, not a folder")
    resolved = out.resolve()
    if (why := run_storage(resolved)) is not None:
        raise EncodeError(f"--out {out}: {why}; write the latents elsewhere")
    for folder in inputs:
        if resolved == folder or folder in resolved.parents:
            where = "is the folder of" if resolved == folder else "is inside the folder of"
            raise EncodeError(f"--out {out}: {where} the input shards ({folder}); write the latents elsewhere")
    if (out / INDEX_NAME).exists():
        raise EncodeError(f"--out {out}: holds an image shard set ({INDEX_NAME}); write the latents elsewhere")
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    foreign = [n for n in names if not _ours(n) and not n.startswith(".")]
    recorded = MANIFEST in names or any(PROGRESS_RE.match(n) for n in names)
    if not recorded and not overwrite and (tars := sorted(n for n in names if SHARD_RE.match(n))):
        raise EncodeError(f"--out {out}: holds {len(tars)} .tar files ({tars[0]}, ...) that no encoding recorded "
                          "(image shards without their index.json?); choose another folder, or pass --overwrite if "
                          "they are latents of an encoding stopped in its first shard")
    if foreign:
        raise EncodeError(f"--out {out}: holds other files ({', '.join(sorted(foreign)[:3])}); give an empty or new "
                          "folder, or the folder of an earlier encoding")


def _ours(name: str) -> bool:
    return bool(SHARD_RE.match(name) or name == MANIFEST or PROGRESS_RE.match(name) or name.endswith(".tar.tmp")
                or any(is_temp_of(name, n) for n in (MANIFEST, DONE)) or name.startswith(".progress."))


def _local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def lock(out: Path):
    """An exclusive lock on OUT/.encode.lock held for the whole encoding: a second job writing the same
    folder would interleave shards and progress."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise EncodeError(f"--out {out}: another encoding is writing into this folder right now") from None
    except OSError:  # a file system without flock: go on unlocked
        pass
    return f


WHAT = {"model": "another model (a run folder gives its newest checkpoint: name the step_N folder to go on with "
                 "the same weights)",
        "inputs": "other input shards (other files, or the same files changed since: size or date)",
        "settings": "other settings (--image-size, --dtype, --flip, --ema, --precision)"}


def prepare(out: Path, fp: dict, overwrite: bool, verify: bool = False,
            num_shards: int | None = None) -> tuple[dict[str, dict], dict | None]:
    """Rank 0, under the folder lock: the shards already done ({name: record}) and, when the whole set is
    already there, its manifest. Latents of another model, inputs or settings are refused (--overwrite
    removes them). What an earlier run finished is gathered into .progress.done.json (from its progress
    files and from a latents.json whose set has lost a shard since, which then goes: the set is incomplete).
    A shard counts as done when its size is the recorded one; with `verify`, when its sha256 is too."""
    names = [p.name for p in out.iterdir()]
    for n in names:  # what a killed run was writing: a shard, a manifest, a progress file
        if n.endswith(".tar.tmp") or any(is_temp_of(n, t) for t in (MANIFEST, DONE)) or (
                n.startswith(".progress.") and n.endswith(".tmp")):
            (out / n).unlink(missing_ok=True)
    names = [p.name for p in out.iterdir()]
    manifest = _read_json(out / MANIFEST)
    if not valid_manifest(manifest, num_shards):  # truncated, edited, another tool's: the set is written again
        manifest = None
    progress = [(n, r) for n in names if PROGRESS_RE.match(n) and (r := _read_json(out / n)) is not None]
    recorded = ([manifest] if manifest else []) + [r for _, r in progress]
    differ = next((k for k in fp for r in recorded if not isinstance(r.get("fingerprint"), dict)
                   or r["fingerprint"].get(k) != fp[k]), None)
    if differ is not None:
        if not overwrite:
            raise EncodeError(f"--out {out}: holds latents of {WHAT[differ]}; pass --overwrite to replace them, or "
                              "choose another folder")
        for n in names:
            if _ours(n):
                (out / n).unlink(missing_ok=True)
        return {}, None
    records = [*(manifest or {}).get("shards", []),
               *(r for _, p in progress if isinstance(p.get("shards"), list) for r in p["shards"])]
    done = {}
    for record in filter(valid_record, records):
        path = out / record["name"]
        if not (path.is_file() and path.stat().st_size == record["bytes"]):
            continue
        if verify and record.get("sha256") != file_sha256(path):  # (an older record without one: written again)
            continue
        done[path.name] = record
    for record in filter(valid_record, records):  # recorded, not done: it goes now, before its new record is
        if record["name"] not in done:            # written (a stop before the rename would vouch for it)
            (out / record["name"]).unlink(missing_ok=True)
    if overwrite:  # shards no record names (check_out let them through for --overwrite): written again or stale
        for n in names:
            if SHARD_RE.match(n) and n not in done:
                (out / n).unlink(missing_ok=True)
    if manifest is not None and all(r["name"] in done for r in manifest["shards"]):
        for n, _ in progress:  # a kill after latents.json was in place left them
            (out / n).unlink(missing_ok=True)
        return {}, manifest
    if done:  # first all in one file, then the files they came from go
        write_atomic(out / DONE, json.dumps({"fingerprint": fp, "shards": list(done.values())}))
    for n, _ in progress:
        if n != DONE:
            (out / n).unlink(missing_ok=True)
    if manifest is not None:  # a shard of the set was lost or damaged since: the set is no longer complete
        (out / MANIFEST).unlink()
    return done, None


def fingerprint(model_digest: str, urls: list[str], opts: EncodeOptions) -> dict:
    """What the shards depend on, in three parts so a refusal can say which differs: the model's weights,
    the input shards (by absolute path, size and modification time: the same encoding run from another
    folder is the same, a shard set rebuilt in place is not) and the settings."""
    import hashlib

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]

    inputs = []
    for u in urls:
        if _local(u):
            st = os.stat(u) if os.path.exists(u) else None
            inputs.append([str(Path(u).resolve()), st.st_size if st else None, st.st_mtime_ns if st else None])
        else:
            inputs.append([u])
    return {"model": model_digest, "inputs": digest(inputs), "settings": digest([FORMAT, opts.settings()])}


def expected_counts(urls: list[str]) -> list[int | None]:
    """Each input shard's sample count as its folder's index.json lists it (None: not listed)."""
    from shards.index import read_index

    counts: dict[str, int] = {}
    for folder in {Path(u).resolve().parent for u in urls if _local(u)}:
        try:
            index = read_index(folder)
        except ValueError:
            index = None
        for shard in (index or {}).get("shards", []):
            if isinstance(shard, dict) and isinstance(shard.get("num_samples"), int):
                counts[str(folder / str(shard.get("name")))] = shard["num_samples"]
    return [counts.get(str(Path(u).resolve())) if _local(u) else None for u in urls]


def _broadcast(value, w: World):
    if w.world_size == 1:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# the encoding


@dataclass
class Model:
    """What encode_shards needs of the model being used."""

    module: torch.nn.Module
    cfg: object
    folder: Path
    digest: str


def encode_shards(model: Model, data, out: Path, opts: EncodeOptions, w: World, device: torch.device,
                  overwrite: bool = False, progress: bool = True, verify: bool = False) -> dict:
    """Encode every sample of `data` into latent shards in `out` (see the module docstring); returns the
    manifest. Every rank calls it (a gloo group must exist when w.world_size > 1)."""
    sources = heldout_sources(data, model.cfg)
    urls = [u for s in sources for u in s.urls]
    fp = fingerprint(model.digest, urls, opts)
    # the folders the shards were named in and the ones they live in (a folder of links to shards is both)
    inputs = sorted({p for u in urls if _local(u) for p in (Path(u).resolve().parent,
                                                            Path(os.path.abspath(u)).parent.resolve())})
    held = None
    found: list = [None, {}, None]
    if w.is_main:
        try:
            check_out(out, inputs, overwrite)
            held = lock(out)
            done, manifest = prepare(out, fp, overwrite, verify, len(urls))
            found = [None, done, manifest]
        except EncodeError as e:
            found = [str(e), {}, None]
        except OSError as e:
            found = [f"--out {out}: cannot write there ({e.strerror or e})", {}, None]
    error, done, manifest = _broadcast(found, w)
    if error:
        raise EncodeError(error, shared=True)
    if manifest is not None:
        return {**manifest, "already_complete": True, "encoded_now": 0}

    m = model.module
    channels = m.latent_shape(opts.image_size)[0]
    cond_key = condition_field(m.condition)
    num_codes = None
    if getattr(m, "kind", "") in ("vq", "fsq"):
        num_codes = m.quantizer.codebook_size
    convert = Converter(opts.dtype, num_codes)
    decoder = DecodeSpec(opts.image_size, num_classes=len(sources[0].classes),
                         num_labels=len(sources[0].label_names))
    jobs = [(i, u) for i, u in enumerate(urls) if i % w.world_size == w.rank and f"{i:06d}.tar" not in done]
    records = []  # this run's, in .progress.<rank>.json (what earlier runs finished is in .progress.done.json)
    encoded = 0
    fault = int(os.environ.get(FAULT_ENV, "0") or 0)
    if jobs:
        stream = ShardBatches(jobs, decoder, opts.batch_size)
        workers = min(opts.workers, len(jobs))
        loader = WorkerLoader(stream, batch_size=None, num_workers=workers, generator=torch.Generator(),
                              collate_fn=_as_is, worker_init_fn=_ignore_stop_signals if workers else None)
        total = sum(s.num_samples or 0 for s in sources)
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=total // w.world_size or None, unit="img", disable=not (progress and w.is_main),
                   dynamic_ncols=True, mininterval=0.5 if tty else 30, file=sys.stderr)
        open_: dict[int, ShardOut] = {}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.precision == "bf16")
        try:
            for batch in loader:
                batch = to_torch(batch)
                index = batch["shard"]
                shard = open_.get(index)
                if shard is None:
                    shard = open_[index] = ShardOut(out, index, urls[index], opts.batch_size)
                    shard.open()
                shard.bad += batch["bad"]
                shard.examples = (shard.examples + batch["bad_examples"])[:BAD_EXAMPLES]
                if batch["image"] is not None:
                    write_batch(m, batch, shard, cond_key, convert, opts, device, autocast)
                    bar.update(len(batch["key"]))
                    encoded += len(batch["key"])
                if batch["last"]:
                    # finished while still held: a stop before the rename drops its .tmp; recorded first, so
                    # every NNNNNN.tar in the folder has a record (a record whose shard is missing: written again)
                    record = shard.finish(channels)
                    write_atomic(out / _progress_name(w.rank),
                                 json.dumps({"fingerprint": fp, "shards": [*records, record]}))
                    shard.commit()
                    records.append(record)
                    del open_[index]
                    if fault and len(records) >= fault:
                        raise KeyboardInterrupt
        except BaseException:
            for shard in open_.values():
                shard.drop()
            raise
        finally:
            bar.close()

    # rank 0 gathers every rank's records (files, not collectives: a long encode outlives no timeout)
    try:
        if w.world_size > 1:
            tdist.barrier()
        result: list = [None, None]
        if w.is_main:
            try:
                result = [None, write_manifest(out, fp, done, model, sources, data, opts, channels, urls)]
            except EncodeError as e:
                result = [str(e), None]
        error, manifest = _broadcast(result, w)
        images = all_reduce_sum([float(encoded)])[0] if w.world_size > 1 else encoded
    except RuntimeError as e:  # a rank that failed (it says why) broke the group
        if "gloo" in str(e).lower() or "connection" in str(e).lower():
            raise EncodeError("another rank stopped (its reason is above); the finished shards are kept, run the "
                              "same command again to go on", shared=False) from None
        raise
    if held is not None:
        held.close()
    if error:
        raise EncodeError(error, shared=True)
    return {**manifest, "encoded_now": int(images)}


@torch.no_grad()
def write_batch(m, batch, shard: ShardOut, cond_key, convert: Converter, opts: EncodeOptions, device, autocast):
    x = to_model_input(batch["image"], device)
    cond = batch[cond_key].to(device) if cond_key else None
    keys = batch["key"]
    with autocast:
        fields, stats = latent_fields(m, x, cond)
        if opts.flip:
            flipped, flip_stats = latent_fields(m, x.flip(-1), cond)
            fields.update({f"{k}_flip": v for k, v in flipped.items()})
    arrays = {k: convert(k, v, keys, shard.url) for k, v in fields.items()}  # every check before any write
    shard.moments.update(stats[0].float(), None if stats[1] is None else stats[1].float())
    if opts.flip:
        shard.moments.update(flip_stats[0].float(), None if flip_stats[1] is None else flip_stats[1].float())
    cls = batch["cls"].tolist()
    for i, key in enumerate(keys):
        sample = {"__key__": key, **{f"{k}.npy": _npy(a[i]) for k, a in arrays.items()}}
        if cls[i] >= 0:
            sample["cls"] = str(cls[i]).encode()
        sample.update(batch["raw"][i])
        shard.write(sample)


def write_manifest(out: Path, fp: dict, inherited: dict[str, dict], model: Model, sources, data,
                   opts: EncodeOptions, channels: int, urls: list[str]) -> dict:
    """latents.json from every record (what earlier runs finished and what the ranks wrote now), then the
    progress files go. Each shard keeps its statistics' sums, so a shard lost later is all that is redone."""
    records = dict(inherited)
    files = [p for p in out.iterdir() if PROGRESS_RE.match(p.name)]
    for p in files:
        progress = _read_json(p)
        if progress is None or progress.get("fingerprint") != fp or not isinstance(progress.get("shards"), list):
            continue
        records.update({r["name"]: r for r in progress["shards"] if valid_record(r)})
    names = [f"{i:06d}.tar" for i in range(len(urls))]
    missing = [n for n in names if n not in records]
    if missing:
        raise EncodeError(f"{out}: {len(missing)} shards were not written ({', '.join(missing[:3])}); run the same "
                          "command again to write them")
    shards = [records[n] for n in names]
    for record, expected in zip(shards, expected_counts(urls), strict=True):
        record["expected"] = expected
    images = sum(r["sums"]["images"] for r in shards)
    if images == 0:
        bad = sum(r["bad"] for r in shards)
        example = next((e for r in shards for e in r.get("bad_examples", [])), None)
        raise EncodeError(f"{data}: no image was read from its {len(shards)} shards"
                          + (f" ({bad} samples without a readable image, e.g. {example})" if bad else " (empty)")
                          + ": --data must name image shards")
    sums = [torch.tensor([r["sums"][k] for r in shards], dtype=torch.float64).sum(0) for k in ("n", "s1", "s2")]
    try:
        stats = stats_from_sums(images, *sums).to_dict()
    except ValueError as e:
        raise EncodeError(f"{data}: {e}") from None
    cfg = model.cfg
    kind = getattr(model.module, "kind", cfg.model.kind)
    fields = {"latent.npy": f"c h w {opts.dtype}: " + {
        "kl": "the posterior mean", "vq": "the latent before quantization", "fsq": "the quantized latent (codes)",
    }.get(kind, "the latent")}
    if kind == "kl":
        fields["std.npy"] = f"c h w {opts.dtype}: the posterior std (z = latent + std * randn)"
    if kind in ("vq", "fsq"):
        fields["codes.npy"] = "h w integers: the code indices"
    if opts.flip:
        fields.update({k.replace(".npy", "_flip.npy"): "the same, of the mirrored image" for k in list(fields)})
    listed = [r["expected"] for r in shards]
    num_samples = sum(r["num_samples"] for r in shards)
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "model": {"folder": str(model.folder.resolve()), "kind": kind, "weights_digest": model.digest, "ema": opts.ema},
        "data": data if isinstance(data, str) else list(data),
        **opts.settings(),
        "latent_shape": list(model.module.latent_shape(opts.image_size)),
        "fields": fields,
        "classes": sources[0].classes,
        "label_names": sources[0].label_names,
        "num_samples": num_samples,
        "num_shards": len(shards),
        "num_bad": sum(r["bad"] for r in shards),
        # what the inputs' index.json lists (None: a shard it does not list); less num_samples = samples missing,
        # bad or unread (a shard cut off or emptied after it was built counts one bad sample, whatever it lost)
        "num_listed": sum(listed) if None not in listed else None,
        "latent_stats": stats,
        "shards": [{k: r.get(k) for k in ("name", "source", "num_samples", "expected", "bad", "bad_examples", "bytes",
                                          "sha256", "batch_size", "sums")} for r in shards],
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    for p in files:
        p.unlink(missing_ok=True)
    return manifest


def init_group(w: World) -> None:
    """The gloo group the ranks meet through (also beside CUDA: only small objects pass)."""
    if w.world_size > 1 and not tdist.is_initialized():
        tdist.init_process_group("gloo", timeout=timedelta(hours=24))


def rate(images: int, seconds: float) -> str:
    return f"{images / seconds:.1f} img/s" if seconds > 0 and math.isfinite(seconds) else "-"


def now() -> float:
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# reading latents back (launch/sample.py decode)


@dataclass
class Latents:
    """What `read_latents` found: `z` (float `b c h w`, or integer codes `b h w`), each latent's class from
    latent shards (-1: none; None from a file), the shards' manifest (None from a file), and whether the
    file held one latent without a batch axis."""

    z: torch.Tensor
    cls: list[int] | None = None
    manifest: dict | None = None
    single: bool = False


def _one_tensor(found, path: Path) -> torch.Tensor:
    if isinstance(found, (list, tuple)):
        raise EncodeError(f"{path}: a {type(found).__name__} of {len(found)} items; save one tensor "
                          "(torch.stack them first)")
    tensors = {k: v for k, v in (found.items() if isinstance(found, dict) else []) if isinstance(v, torch.Tensor)}
    for name in ("latents", "latent", "codes"):
        if name in tensors:
            return tensors[name]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    names = sorted(tensors)
    listed = ", ".join(names[:5]) + (f", ... {len(names) - 5} more" if len(names) > 5 else "")
    raise EncodeError(f"{path}: holds {len(names)} tensors ({listed or 'none'}); give a file with one, or one "
                      "named latents")


REWRITE = "run launch/encode.py again with --verify to rewrite it"


def _member(item: dict, name: str, where: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(item[name]), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a damaged or pickled array
        raise EncodeError(f"{where}: {name} does not read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          f"{REWRITE}") from None


def _from_shards(path: Path, limit: int) -> Latents:
    """The first `limit` latents of a folder of latent shards: codes.npy where the set has them (VQ/FSQ:
    exactly what the model's quantizer gave, where quantizing the stored float16 latent again could flip
    a code), else latent.npy; every shard read must be whole."""
    manifest = _read_json(path / MANIFEST)
    if manifest is None or manifest.get("format") != FORMAT:
        raise EncodeError(f"{path}: not a folder of latent shards (no readable {MANIFEST}: launch/encode.py "
                          "writes one when the set is complete)")
    if not valid_manifest(manifest):
        raise EncodeError(f"{path / MANIFEST}: not as launch/encode.py writes it (edited?); run launch/encode.py "
                          "again to write the set and its record")
    field = "codes.npy" if "codes.npy" in manifest.get("fields", {}) else "latent.npy"
    arrays, cls = [], []
    for shard in manifest["shards"]:
        if len(arrays) == limit:
            break
        if shard["num_samples"] == 0:  # its input shard had no readable image: an empty tar, as recorded
            continue
        url = path / shard["name"]
        if not url.is_file() or url.stat().st_size != shard["bytes"]:
            raise EncodeError(f"{url}: {'missing' if not url.is_file() else 'not the size latents.json records'}; "
                              f"{REWRITE}")
        if shard.get("sha256") is not None and file_sha256(url) != shard["sha256"]:
            raise EncodeError(f"{url}: not the shard latents.json records (another sha256: damaged or replaced "
                              f"since); {REWRITE}")
        for item in tario.shard_samples(str(url)):
            where = f"{url} {getattr(item, 'key', '') or item.get('__key__', '') if isinstance(item, dict) else ''}"
            if isinstance(item, BadSample):
                raise EncodeError(f"{url}: {item.reason}; {REWRITE}")
            if field not in item:
                raise EncodeError(f"{where.strip()}: no {field}")
            a = _member(item, field, where.strip())
            if arrays and a.shape != arrays[0].shape:
                raise EncodeError(f"{where.strip()}: {field} of shape {a.shape}, the first was {arrays[0].shape}")
            arrays.append(a)
            try:
                cls.append(int(item["cls"]) if "cls" in item else -1)
            except ValueError:
                raise EncodeError(f"{where.strip()}: cls {item['cls'][:20]!r} is no integer") from None
            if len(arrays) == limit:
                break
    if not arrays:
        raise EncodeError(f"{path}: its shards hold no latents")
    z = torch.from_numpy(np.stack(arrays))
    return Latents(z.long() if field == "codes.npy" else z.float(), cls, manifest)


def _batched(ndim: int, floating: bool) -> bool:
    return ndim == (4 if floating else 3)


def read_latents(path: str | Path, limit: int) -> Latents:
    """Up to `limit` latents from a .npy, a .safetensors or a .pt file (`b c h w` floats, `b h w` integer
    codes, or one of either without the batch axis), or from a folder of latent shards (launch/encode.py).
    Pickles are refused; a big file is read only as far as `limit` (memory-mapped)."""
    path = Path(path)
    if path.is_dir():
        return _from_shards(path, limit)
    if not path.is_file():
        raise EncodeError(f"{path}: {'not a regular file' if path.exists() else 'no such file or folder'}")
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":  # np.load would take it for a pickle (and refuse it as one)
                    raise EncodeError(f"{path}: not a .npy file (no NUMPY header)")
            a = np.load(path, allow_pickle=False, mmap_mode="r")
            if a.dtype.kind not in "fiub":
                raise EncodeError(f"{path}: an array of {a.dtype}, not numbers")
            a = np.array(a[:limit] if _batched(a.ndim, a.dtype.kind == "f") else a)
            t = torch.from_numpy(a.astype(a.dtype.newbyteorder("=")))  # a big-endian file: native order
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
                name = next((k for k in ("latents", "latent", "codes") if k in keys), None)
                if name is None and len(keys) != 1:
                    _one_tensor(dict.fromkeys(keys, torch.empty(0)), path)  # names them in the refusal
                part = f.get_slice(name or keys[0])
                floating = part.get_dtype().startswith(("F", "BF"))
                t = part[:limit] if _batched(len(part.get_shape()), floating) else f.get_tensor(name or keys[0])
        elif path.suffix in (".pt", ".pth"):
            import zipfile

            # memory-mapped where it can be: a file of torch < 1.6 (not a zip) is read whole
            found = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            t = found if isinstance(found, torch.Tensor) else _one_tensor(found, path)
        else:
            raise EncodeError(f"{path}: latents are read from .npy, .safetensors or .pt files, or a folder of latent "
                              "shards")
    except EncodeError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy, safetensors and torch raise their own types for broken files
        raise EncodeError(f"{path}: not a readable latent file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    if t.is_complex():
        raise EncodeError(f"{path}: complex values are no latents")
    floating = t.is_floating_point()
    single = t.dim() == (3 if floating else 2)
    if single:
        t = t[None]
    if t.dim() != (4 if floating else 3):
        what = "latents" if floating else "integer codes"
        need = "`b c h w` (or one `c h w`)" if floating else "`b h w` (or one `h w`)"
        raise EncodeError(f"{path}: {what} of shape {tuple(t.shape)}; need {need}")
    if any(d == 0 for d in t.shape):
        raise EncodeError(f"{path}: holds no latent (shape {tuple(t.shape)})")
    t = t[:limit]
    return Latents(t.float() if floating else t.long(), None, None, single)
