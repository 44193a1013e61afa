"""The WebDataset pipeline: resampled, deterministic shard streams split by node and worker.

Per rank, per DataLoader worker, per epoch, one stream of batches, built as a list of stages:

    shards (this rank's share, resampled with a seed)  ->  read tar  ->  shuffle buffer
      ->  [skip what was consumed before a resume]  ->  decode + crop + resize  ->  batch

Why it looks like this:
- Ranks see disjoint data: the shard list is split by rank *before* resampling (each rank resamples
  only its own shards). A source with fewer shards than ranks is read by every rank, each keeping
  every world_size-th sample of its stream (each rank reads all its bytes: make more shards; and
  with shard sizes not a multiple of the ranks, two ranks may read one sample in an epoch and none
  another, evened out over epochs). Other sources of a mixture keep the split by shard.
- Each epoch a slot's stream of each source starts at a random point of its first shard (the first
  r samples passed over by their headers, r uniform below the source's samples per shard): a slot
  whose epoch is shorter than a shard would otherwise read only the shards' first samples, every
  epoch, and never their ends. A window of the stream starting at a uniform point covers every
  position of a shard alike.
- Everything random is seeded from (data seed, epoch, rank, slot) — a slot is a worker's position
  in the DataLoader's round-robin — so a stream can be replayed. The seeds are hashed (`_seed`),
  not webdataset's linear make_seed, whose seeds for neighbouring slots, ranks and sample indices
  coincide (slot s+1's crops at sample i were slot s's at sample i+31). On resume the trainer asks for
  batches from global batch index N; each slot skips the raw samples it had consumed, before
  decoding, and the run continues exactly as if it had never stopped (`data.exact_resume`).
- The loader is NOT passed through `accelerator.prepare()`: prepare would re-shard or dispatch an
  IterableDataset, and we already split by rank here.
- Images leave the workers as uint8 `b h w c` (4x less to copy than float32) through a ring of
  reusable shared-memory batch buffers (BatchRing): a worker writes a batch's images into a free
  buffer and sends only the buffer's number with the small fields; the trainer gets the buffer itself
  as the batch's tensor, free again once the trainer lets go of it. No pickling of images, no pipe,
  no copy in the reader, no fresh shared memory a batch.
  `to_model_input` makes the `b c h w` float in [-1, 1] on the training device.
- Bad samples (anything the data does wrong: see shards/decode.py for the one boundary between bad
  data and bugs) travel as BadSample records: the tar reader emits one for a shard that breaks off
  or is empty, the decoder one for a sample that does not decode. They are counted in the worker
  and ride along in each batch, so the trainer can log them and stop when too many are bad; a
  stream with nothing readable stops with DataStalledError instead of spinning. Bugs propagate.
  Pickle is never decoded: only image, `cls`, `json` and `txt` fields are read.
- Bad samples do not shift the stream: batch j is made from the raw positions [j*B, (j+1)*B) of
  its slot, a bad one replaced by a good one of the same window (ShardStream._epoch), so a resume
  skips raw items by count, before decoding, and still replays exactly.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import math
import mmap
import multiprocessing
import os
import random
import signal
import sys
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from itertools import count, islice

import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness import tario
from shards.decode import BadSample, DecodeSpec, guarded
from shards.sources import DataSourceError, ShardSource, resolve_sources

# ---------------------------------------------------------------------------------------------
# Decoding one sample (runs in the workers): shards/decode.py, shared with `shards verify`
# ---------------------------------------------------------------------------------------------


def decode(item: dict | BadSample, spec: DecodeSpec, rng: random.Random, out: np.ndarray | None = None
           ) -> dict | BadSample:
    """A raw item of the stream (a sample, or the reader's BadSample) -> a decoded sample or a BadSample
    (its image decoded into `out` when given: a slot of the batch)."""
    item = tario.materialize(item)  # a sample a fast-forward passed over by its headers
    return item if isinstance(item, BadSample) else guarded(item, spec, rng, out)


def collate(samples: list[dict], as_numpy: bool = False, images: bool = True) -> dict:
    """Decoded samples -> a batch of tensors (numpy arrays with `as_numpy`: what a worker sends, see below;
    without the images with `images=False`: they travel through a BatchRing)."""
    batch = {
        "cls": np.array([s["cls"] for s in samples], dtype=np.int64),
        "key": [s["key"] for s in samples],
    }
    if images:
        batch["image"] = np.stack([s["image"] for s in samples])
    if "labels" in samples[0]:
        batch["labels"] = np.stack([s["labels"] for s in samples])
    return batch if as_numpy else to_torch(batch)


def to_torch(batch: dict, pin: bool = False) -> dict:
    """The numpy arrays of a batch as tensors (no copy), pinned with `pin` where CUDA is.

    Workers send numpy arrays, not tensors: torch moves each tensor a worker sends into a new
    shared-memory segment, and fresh pages cost about 5 us per 4 KB on our machines (a 6 MB batch:
    7 ms in the worker, more in the reader when it reads them), a fifth of a 256 px batch's decoding.
    The images themselves come through a BatchRing (reused shared memory) where workers fork; the
    rest, small, is pickled through the pipe. Pinning happens in the reader, not in the DataLoader's
    pin thread (an already pinned tensor is left as it is)."""
    out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if pin and torch.cuda.is_available():
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


class BatchRing:
    """Reusable shared-memory batch buffers between the loader workers and the reader.

    Sending a 6 MB batch through the DataLoader's pipe costs a worker about a tenth of its time on
    real photos (stack, pickle, and the pipe's write in 64 KB pieces, each waiting for the reader)
    and the reader as much again (read, unpickle). Here each worker owns `buffers` buffers of one
    batch in one anonymous shared mapping made before the workers fork (so no /dev/shm, whose size a
    container may cap): it decodes a batch's images into a free buffer and sends only the buffer's
    number. The reader hands the buffer itself to the trainer as the batch's image tensor (no copy),
    and the buffer is free again when the last reference to that tensor, or to a view of it, is gone;
    with pinned memory (CUDA) the reader copies it into pinned memory instead and frees it at once.

    A batch in the trainer's hands is never written: each buffer has a busy byte in shared memory,
    set by the worker that claims it and cleared by the reader when the batch's memory is released
    (in any order), and a semaphore per worker counts its free buffers. A worker never waits for a
    buffer: when the trainer holds them all (it kept many batches), that batch goes through the pipe
    as a plain array. The trainer holds at most two (the batch it trains on, and the previous one
    while it asks for the next), so with `buffers` = the prefetch + 3 the pipe is not needed."""

    def __init__(self, workers: int, buffers: int, batch_size: int, image_size: int, context):
        shape = (workers, buffers, batch_size, image_size, image_size, 3)
        self._mem = mmap.mmap(-1, math.prod(shape))  # MAP_SHARED | MAP_ANONYMOUS: shared with forked children
        self.images = np.frombuffer(self._mem, np.uint8).reshape(shape)
        self._flags = mmap.mmap(-1, workers * buffers)
        self.busy = np.frombuffer(self._flags, np.uint8).reshape(workers, buffers)
        self.free = [context.Semaphore(buffers) for _ in range(workers)]

    def claim(self, worker: int) -> tuple[int, np.ndarray] | None:
        """In a worker: a free buffer of this worker (its index, and its `b h w c` array to write), or
        None when the reader holds them all (the batch then goes through the pipe)."""
        if not self.free[worker].acquire(block=False):
            return None
        buffer = int(np.flatnonzero(self.busy[worker] == 0)[0])  # the semaphore counted it: one is free
        self.busy[worker, buffer] = 1
        return buffer, self.images[worker, buffer]

    def take(self, worker: int, buffer: int, pin: bool = False) -> torch.Tensor:
        """In the reader: a buffer's images as a tensor, the buffer's own memory (free again when that
        memory is released), or with `pin` a copy in pinned memory (and the buffer free now)."""
        if pin:
            out = torch.empty(self.images.shape[2:], dtype=torch.uint8, pin_memory=True)
            out.numpy()[...] = self.images[worker, buffer]
            self._release(worker, buffer)
            return out
        view = self.images[worker, buffer][...]  # an array object of its own, which the tensor's storage holds
        weakref.finalize(view, self._release, worker, buffer).atexit = False
        return torch.from_numpy(view)

    def _release(self, worker: int, buffer: int) -> None:
        self.busy[worker, buffer] = 0
        self.free[worker].release()


def _ring_context():
    """The fork start method where the ring can be used (Linux), else None: the anonymous mapping is
    inherited by forked workers only (Python 3.14 makes forkserver the default on Linux, so ask for fork)."""
    return multiprocessing.get_context("fork") if sys.platform == "linux" else None


def _as_is(batch):
    """DataLoader collate_fn: leave a worker's numpy batch alone (its default would make tensors)."""
    return batch


def use_channels_last(setting: bool | str, device_type: str, mixed_precision: str) -> bool:
    """What `train.channels_last` means on this device: true/false as given; auto = NHWC batches except on CPU
    under bf16 (autocast, or DeepSpeed's bf16 model), where torch's NCHW convolutions and GroupNorm are the faster
    ones (our step 1.08-1.32x faster NCHW there, measured with `launch/benchmark.py peer --dtype bf16`; in fp32
    NHWC is 1.06x faster). fp16 on a CPU stays NHWC: accelerate gives it no autocast there, it computes in fp32."""
    if setting != "auto":
        return bool(setting)
    return not (device_type == "cpu" and mixed_precision == "bf16")


def to_model_input(images: torch.Tensor, device, channels_last: bool = True) -> torch.Tensor:
    """uint8 `b h w c` -> float `b c h w` in [-1, 1], on `device`: channels_last memory (the loader's own
    layout, no copy), or contiguous NCHW."""
    images = images.to(device, non_blocking=True)
    x = rearrange(images, "b h w c -> b c h w").float().div_(127.5).sub_(1.0)
    return x if channels_last else x.contiguous()


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------


BAD_IN_A_ROW_LIMIT = 1000  # unreadable samples or shards in a row before a stream gives up


class DataStalledError(DataSourceError):
    """Nothing readable comes out of the shards (every shard or image fails): one line, not a hang.

    Raised in a loader worker, it reaches the main process rebuilt from the worker's whole
    traceback text (torch's ExceptionWrapper); keep only the message, so the user sees one line."""

    def __init__(self, msg: str):
        if "Traceback" in msg:
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(msg)


class BadCounter:
    """The bad samples of one stream: how many, the last one, and how many in a row.

    A stream in which nothing can be read would otherwise skip forever (resampled shards never
    run out) without producing the batch that carries its bad count to the trainer: after
    BAD_IN_A_ROW_LIMIT bad items (samples, or reads of an empty or unreadable shard) with no good
    sample between them it stops with DataStalledError."""

    def __init__(self):
        self.bad = 0
        self.in_a_row = 0
        self.last_error = ""

    def see(self, out: dict | BadSample) -> None:
        """Every item of the stream, once, in order: the stall check."""
        if not isinstance(out, BadSample):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= BAD_IN_A_ROW_LIMIT:
            raise DataStalledError(f"data: {self.in_a_row} samples or shards in a row could not be read (last: "
                                   f"{out}); check them with `python -m shards verify DIR`")

    def count(self, bad: BadSample) -> None:
        self.bad += 1
        self.last_error = str(bad)


STREAM_VERSION = 2  # in the checkpoints' data_layout: 2 = hashed seeds, a random start in each epoch's first shard


def _seed(*parts: int) -> int:
    """A 63-bit seed, well mixed, from integers (the same on every machine and Python: no hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _start_offset(seed: int, per_shard: int) -> int:
    """Where an epoch's stream of a source starts in its first shard: uniform below its samples per shard."""
    return random.Random(_seed(seed, 1)).randrange(per_shard)


class _Positions:
    """A slot's raw stream decoded position by position, each exactly once and in order.

    A window that holds no good sample looks ahead for one (`peek_good`); what it decoded there
    stays queued for the windows that follow, so every position is still decoded once, with the
    crop randomness of its own index."""

    def __init__(self, raw, first_index: int, spec: DecodeSpec, seed: int, counter: BadCounter):
        self.raw, self.index, self.spec, self.seed, self.counter = raw, first_index, spec, seed, counter
        self.ahead: deque = deque()
        self.rng = random.Random()  # reseeded per position: the same stream as a new Random, made for less

    def _decode_next(self, into: np.ndarray | None = None) -> dict | BadSample:
        self.index += 1
        self.rng.seed(_seed(self.seed, self.index))
        out = decode(next(self.raw), self.spec, self.rng, into)
        self.counter.see(out)
        return out

    def take(self, into: np.ndarray) -> dict | BadSample:
        """The next position; its image decoded into `into` (the batch's next free slot), unless it was
        decoded ahead (then in an array of its own)."""
        return self.ahead.popleft() if self.ahead else self._decode_next(into)

    def peek_good(self) -> dict:
        for out in self.ahead:
            if not isinstance(out, BadSample):
                return out
        while True:
            out = self._decode_next()
            self.ahead.append(out)
            if not isinstance(out, BadSample):
                return out


def _mix(streams: list, weights: list[float], rng: random.Random):
    """Weighted, seeded choice of the source of each sample (several data sources)."""
    while True:
        yield next(rng.choices(streams, weights)[0])


def _take_every(samples, start: int, step: int):
    """Sample-level split for when there are fewer shards than ranks."""
    return islice(samples, start, None, step)


@dataclass
class _Part:
    """One source as this rank streams it."""
    urls: list[str]
    weight: float
    split: bool  # fewer shards than ranks: all of them, every world_size-th sample
    per_shard: int  # its samples per shard in this rank's stream, on average (at least 1)


class ShardStream(IterableDataset):
    """One epoch of batches for this rank; see the module docstring."""

    def __init__(self, sources: list[ShardSource], *, rank: int, world_size: int, batch_size: int,
                 decoder: DecodeSpec, shuffle_buffer: int, seed: int, batches_per_epoch: int):
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.decoder = batch_size, decoder
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.batches_per_epoch = batches_per_epoch
        self.epoch, self.skip_batches = 0, 0
        self.ring: BatchRing | None = None  # set by TrainLoader.batches on the copy its workers get
        # Split by node: this rank's shards per source (or, for a source with fewer shards than ranks, all
        # of them and a sample-level split), with the samples a shard holds on average in this rank's stream.
        self.parts = []
        for s in sources:
            split = len(s.urls) < world_size
            per_shard = (s.num_samples or 0) / max(1, len(s.urls)) / (world_size if split else 1)
            self.parts.append(_Part(s.urls if split else s.urls[rank::world_size], s.weight, split,
                                    max(1, math.ceil(per_shard))))
        self.sample_split = any(part.split for part in self.parts)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw_samples(self, part: _Part, seed: int, skipping: tario.Skipping):
        """Infinite resampled raw items of one source: samples, and a BadSample for each shard read that
        breaks off or holds nothing (webdataset's ResampledShards + our tar reader), from a random point
        of the first shard (passed over by the headers: `skipping` is on meanwhile)."""
        stages = [
            wds.ResampledShards(part.urls, worker_seed=lambda: seed, deterministic=True),
            tario.tarfile_to_samples(skipping),
        ]
        if part.split:
            stages.append(wds.pipelinefilter(_take_every)(self.rank, self.world_size))
        raw = iter(wds.DataPipeline(*stages))
        skipping.on = True
        deque(islice(raw, _start_offset(seed, part.per_shard)), maxlen=0)
        return raw

    def __iter__(self):
        """Batches forever, from global batch index epoch * batches_per_epoch + skip_batches.

        The DataLoader takes batches from its workers round-robin, starting at worker 0. Worker w
        therefore produces global batches k+w, k+w+W, ... (k = the start); its *slot* is (k+w) % W.
        batches_per_epoch is a multiple of W, so a slot owns the same positions in every epoch and
        a worker streams epoch after epoch without restarting (no respawn, no refilled buffers)."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.skip_batches
        slot = (k + worker) % num_workers
        per_epoch = self.batches_per_epoch // num_workers  # this slot's batches in one epoch
        already = len(range(slot, k, num_workers))  # ... of which consumed before the start
        counter = BadCounter()
        size, ring = self.decoder.image_size, self.ring

        def new_batch():
            """A free ring buffer of this worker, else (no ring: no workers, or workers that do not fork;
            or the trainer holds all its buffers) an array of its own that goes through the pipe."""
            claimed = ring.claim(worker) if ring is not None else None
            return claimed or (None, np.empty((self.batch_size, size, size, 3), np.uint8))

        for epoch in count(self.epoch):
            for buffer, images, samples, bad in self._epoch(epoch, slot, per_epoch - already, already, counter,
                                                            new_batch):
                out = collate(samples, as_numpy=True, images=False)
                if buffer is None:
                    yield {"image": images, **out, **bad}
                else:  # the images are in the ring: the reader is told where
                    yield {**out, **bad, "ring": (worker, buffer)}
            already = 0

    def _epoch(self, epoch: int, slot: int, todo: int, already: int, counter: BadCounter, new_batch):
        """This slot's batches `already` .. `already + todo` of one epoch, each as (the tag and `b h w c`
        array that `new_batch()` gave it, its samples without their images, its bad-sample fields).

        Batch j is made from the raw positions [j*B, (j+1)*B) of the slot's stream, whatever they
        hold: a bad one is replaced by a good sample of the same window (repeated in turn; an
        all-bad window takes the next good sample after it). So batch j starts at position j*B even
        after bad samples, and a resume skips already*B raw items without decoding any: exact.
        Each image is decoded straight into its slot of the batch's array (resized there: no array of
        its own, no copy; holding a batch of decoded images to stack them cost 5-10% of a worker's time
        on real photos, copying each into the batch 3%). A bad sample's partial pixels are overwritten
        by the next good one, which decodes into the same slot."""
        seed = _seed(self.seed, epoch, self.rank, slot)
        skipping = tario.Skipping(on=False)
        streams = [self._raw_samples(part, _seed(seed, 1, i), skipping) for i, part in enumerate(self.parts)]
        skipping.on = already > 0
        weights = [part.weight for part in self.parts]
        raw = streams[0] if len(streams) == 1 else _mix(streams, weights, random.Random(_seed(seed, 2)))
        if self.shuffle_buffer > 0:
            raw = wds.filters._shuffle(raw, self.shuffle_buffer, initial=self.shuffle_buffer,
                                       rng=random.Random(_seed(seed, 3)))
        # Resume: pass the raw items consumed before, by count, without decoding them; local
        # shards are read by their headers alone meanwhile (tario.Skipping).
        deque(islice(raw, already * self.batch_size), maxlen=0)
        skipping.on = False
        positions = _Positions(raw, already * self.batch_size, self.decoder, seed, counter)
        for _ in range(todo):
            (tag, images), samples, bad = new_batch(), [], []
            for _ in range(self.batch_size):
                slot = images[len(samples)]
                item = positions.take(slot)
                if isinstance(item, BadSample):
                    bad.append(item)
                    counter.count(item)
                else:
                    if item["image"] is not slot:  # decoded ahead, by peek_good
                        slot[...] = item["image"]
                    samples.append(_without_image(item))
            good = len(samples)
            if bad and not good:  # nothing good in the window: the next good sample, which stays queued
                fill = positions.peek_good()
                images[:] = fill["image"]
                samples = [_without_image(fill)] * len(bad)
            for i in range(len(bad) if good else 0):  # each bad one: a good one of the window, in turn
                images[good + i] = images[i % good]
                samples.append(samples[i % good])
            yield tag, images, samples, {"bad": len(bad), "bad_error": str(bad[-1]) if bad else ""}


def _without_image(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k != "image"}


# ---------------------------------------------------------------------------------------------
# What the trainer uses
# ---------------------------------------------------------------------------------------------


@dataclass
class DataInfo:
    num_samples: int
    classes: list[str]
    label_names: list[str]
    num_shards: int


PREFETCH = 4  # batches in flight per loader worker (the DataLoader's prefetch_factor)


class TrainLoader:
    """Infinite batches for one rank, replayable from any global batch index."""

    def __init__(self, cfg, *, rank: int, world_size: int, batch_size: int, pin_memory: bool = False,
                 num_classes: int = 0, need_cls: bool | None = None, names: bool | None = None):
        """num_classes: the model's classes when it is class-conditional (0 = not): a sample without
        `cls` or with one outside them is bad here, on the CPU, never an index error in the model.
        need_cls: the same for a model that reads `cls` otherwise (a classifier: num_classes 0 = the
        index's classes); default: num_classes > 0. names: whether the model reads classes or labels
        (the trainer says): True = it reads `cls` (need_cls) or else multi-hot `labels`, and every source
        must name them (an unnamed one, wherever it stands in the list, is refused here rather than
        becoming bad samples); False = neither, so shard sets whose index.json names differ may be mixed;
        None (tools, tests) = whatever the first source names is read."""
        need_cls = num_classes > 0 if need_cls is None else need_cls
        reads = "cls" if need_cls else "labels" if names else None
        sources = resolve_sources(cfg.train, cfg.num_samples, names=names is not False, needs=reads)
        total = sum(s.num_samples for s in sources)
        first = sources[0]
        self.info = DataInfo(total, first.classes, first.label_names, sum(len(s.urls) for s in sources))
        epoch_samples = cfg.epoch_samples or total
        # A multiple of the worker count, so that every worker owns whole positions of each epoch.
        slots = max(1, cfg.num_workers)
        self.batches_per_epoch = epoch_samples // (world_size * batch_size) // slots * slots
        if self.batches_per_epoch < 1:
            source = "data.epoch_samples" if cfg.epoch_samples else f"the data ({cfg.train})"
            raise DataSourceError(f"{source}: {epoch_samples} samples make less than one batch per rank and worker "
                                  f"({world_size} ranks x train.batch_size={batch_size} x {slots} data.num_workers); "
                                  "lower train.batch_size or data.num_workers, or use more data")
        # A model that reads no names reads no cls or labels either: none is checked against them (mixed
        # sets, named and unnamed, would make bad samples of the other set's classes). Nor does one that
        # reads `cls` read labels: a set without them mixes with one that has them.
        decoder = DecodeSpec(cfg.image_size, cfg.crop, cfg.hflip,
                             num_classes=num_classes or (len(first.classes) if names is not False else 0),
                             need_cls=need_cls,
                             num_labels=len(first.label_names) if reads == "labels" or names is None else 0,
                             max_pixels=cfg.max_pixels)
        self.dataset = ShardStream(sources, rank=rank, world_size=world_size, batch_size=batch_size, decoder=decoder,
                                   shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                                   batches_per_epoch=self.batches_per_epoch)
        self.num_workers, self.pin_memory = cfg.num_workers, pin_memory
        self.batch_size, self.image_size = batch_size, cfg.image_size
        self.sources, self.world_size = sources, world_size

    @property
    def sample_split(self) -> bool:
        return self.dataset.sample_split

    def split_notes(self) -> list[str]:
        """What the split over ranks does to how often a sample is read (said at the start): every rank
        reads as many batches, so a rank holding fewer shards of a source reads each of them more often."""
        notes, w = [], self.world_size
        for source in self.sources:
            n = len(source.urls)
            if n < w:
                notes.append(f"{source.spec}: fewer shards than ranks ({n} < {w}): every rank reads all its shards "
                             "and keeps 1/world_size of the samples; make more shards")
            elif n % w and (n // w + 1) / (n // w) >= 1.1:
                notes.append(f"{source.spec}: {n} shards over {w} ranks: some ranks hold {n // w + 1} shards, others "
                             f"{n // w}, and read each of their samples {(n // w + 1) / (n // w):.2g}x as often (a "
                             "shard count that is a multiple of the ranks reads all alike)")
        return notes

    def batches(self, start: int = 0):
        """Yield batches forever, starting at global (per-rank) batch index `start`."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        self.dataset.set_epoch(epoch, offset)
        dataset, ring, context = self.dataset, None, _ring_context() if self.num_workers else None
        if self.num_workers:
            _keep_freed_memory()  # this process may copy each batch (pinned memory, or the pipe)
        if context is not None:
            # The ring of this call's workers, on a copy of the dataset: a later call makes its own.
            dataset = copy.copy(self.dataset)
            dataset.ring = ring = BatchRing(self.num_workers, PREFETCH + 3, self.batch_size, self.image_size, context)
        pin = self.pin_memory and torch.cuda.is_available()
        # Its own generator: creating the iterator must not draw from the global torch RNG, which
        # the model uses (posterior noise) and a resume restores.
        loader = WorkerLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            prefetch_factor=PREFETCH if self.num_workers else None,
                            multiprocessing_context=context, generator=torch.Generator().manual_seed(start),
                            worker_init_fn=_init_worker if self.num_workers else None)
        it = iter(loader)
        try:
            for batch in it:
                if "ring" in batch:
                    batch = {"image": ring.take(*batch.pop("ring"), pin=pin), **batch}
                yield to_torch(batch, pin)
        finally:
            # The workers end with their iterator. An exception (a worker's DataStalledError) keeps this
            # frame, and so the iterator, alive in its traceback: drop it here, not when that is freed.
            del it


# What a loader worker must not act on by itself: blocked from its fork until _ignore_stop_signals.
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP}


class WorkerLoader(DataLoader):
    """A DataLoader whose workers start with WORKER_SIGNALS blocked (a forked child inherits the mask)
    until their init hands them to its signal thread: one that SLURM or a terminal sends while a worker
    starts up would otherwise kill it (the trainer then crashes without a checkpoint) or run the
    trainer's own handler in it. In this process they wait, pending, for the fork's few milliseconds."""

    def __iter__(self):
        if not self.num_workers:
            return super().__iter__()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _init_worker(worker_id: int) -> None:
    _ignore_stop_signals(worker_id)
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse, in a worker and in the process that reads from workers.

    Both allocate and free the same big buffers all the time (decoded images; a 6 MB batch the
    reader copies into pinned memory, or receives through the pipe); glibc gives blocks over 128 KB back
    to the kernel, and touching fresh pages again costs about 5 us per 4 KB page on our machines: 95
    page faults per 256 px image in a worker (a fifth of its decoding time) and 50 in the reader.
    Blocks up to 32 MB from the heap, and a heap trimmed only above 256 MB free, make both 0; peak
    memory is what it was (process-wide: the trainer's own big CPU tensors are reused the same way).
    glibc only; elsewhere nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (32 MB is the most glibc accepts)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: SLURM (time limit, preemption, scancel) signals every process of the
    job step, workers included. torch's worker handler lets SIGTERM kill a worker unless it came
    from the parent, and SIGUSR1's default action is to terminate; either way the main process would
    die with "DataLoader worker killed" instead of saving its checkpoint. So the worker blocks both
    and a thread takes them with sigtimedwait, which tells who sent them: SIGTERM from the parent
    (multiprocessing's terminate, at its exit) ends the worker as torch's own handler would; from
    anyone else, and SIGUSR1, they are dropped. The main process alone decides, and checkpoints."""
    # A terminal's Ctrl-C reaches the whole process group: the trainer decides (a checkpoint first); a
    # worker that ended on its KeyboardInterrupt (or ran the trainer's handler, inherited) would not do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal: likewise (the trainer checkpoints)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGHUP})  # blocked since the fork: ignored now
    stop = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # inherited by the thread below (and since the fork)
    threading.Thread(target=_drop_stop_signals, args=(os.getppid(), stop), daemon=True, name="stop-signals").start()


def _drop_stop_signals(parent: int, stop: set) -> None:
    while True:
        info = signal.sigtimedwait(stop, 2.0)
        if info is None:
            # A parent killed outright leaves a worker blocked writing a batch into a pipe nobody reads
            # (batches are several MB, more than a pipe holds): torch's own parent check never runs then.
            if os.getppid() != parent:
                os._exit(0)
        elif info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


# ---------------------------------------------------------------------------------------------
# Shards against the model that reads them
# ---------------------------------------------------------------------------------------------


COND_KEYS = {"class": "cls", "multilabel": "labels"}  # model.condition -> the batch field it reads


def condition_field(condition: str) -> str | None:
    """The batch field a model of this `model.condition` reads (`cls`, `labels`), or None."""
    return COND_KEYS.get(condition)


def condition_problem(model_cfg, classes: list[str], label_names: list[str]) -> str | None:
    """What a conditional model needs of the shards' index.json and does not find there (None: fine)."""
    num = model_cfg.num_classes
    if model_cfg.condition == "class":
        if not classes:
            return "model.condition: class conditioning needs shards with class labels (index.json classes)"
        if len(classes) > num:
            return f"model.num_classes: the shards have {len(classes)} classes, more than {num}"
    if model_cfg.condition == "multilabel":
        if not label_names:
            return "model.condition: multilabel conditioning needs shards with json labels (index.json label_names)"
        if len(label_names) != num:
            n = len(label_names)
            return f"model.num_classes: the shards have {n} labels ({', '.join(label_names[:3])}, ...); set " \
                   f"model.num_classes={n}"
    return None


def names_problem(heldout, train, reads: str | None) -> str | None:
    """Held-out shards (a source) must name what the model reads (`reads`: "cls" or "labels", by
    index) as the training data (a source or DataInfo) does, where both name them: index i is to be
    the same class in both (None: fine, or nothing read)."""
    if reads is None:
        return None
    attr, what = ("classes", "class names") if reads == "cls" else ("label_names", "label names")
    return _differ(getattr(heldout, attr), getattr(train, attr), what)


def _differ(heldout: list[str], train: list[str], what: str) -> str | None:
    if not heldout or not train or heldout == train:
        return None
    i = next((i for i, (a, b) in enumerate(zip(heldout, train)) if a != b), min(len(heldout), len(train)))
    here, there = (repr(names[i]) if i < len(names) else "none" for names in (heldout, train))
    how = "the same --classes file" if what == "class names" else "the same label list"
    return (f"its {what} differ from the training data's ({len(heldout)} vs {len(train)}; #{i} is {here} here, "
            f"{there} there): build both with {how}")


def check_heldout(cfg, sources: list[ShardSource], spec) -> None:
    """Shards a trained model runs on (sample, evaluate, export, validation grids): they carry what its
    condition reads, named as in its training data where that is still where the run's config says
    (else there is nothing to compare with). DataSourceError naming `spec` otherwise."""
    src, reads = sources[0], condition_field(cfg.model.condition)
    problem = condition_problem(cfg.model, src.classes, src.label_names)
    if problem is None and reads is not None and spec != cfg.data.train:
        try:
            train = resolve_sources(cfg.data.train, require_count=False)[0]
        except DataSourceError:
            train = None
        if train is not None:
            problem = names_problem(src, train, reads)
    if problem:
        raise DataSourceError(f"{spec if isinstance(spec, str) else ', '.join(spec)}: {problem}")


def heldout_sources(spec, cfg=None, names: bool | None = None) -> list[ShardSource]:
    """`spec` resolved, and with the run's `cfg` checked against its model (`check_heldout`): mixed shard
    sets that name their classes otherwise are then fine for a model that reads no class or label
    (`names`: whether it reads them; default: from cfg's model.condition, True without cfg)."""
    if names is None:
        names = cfg is None or condition_field(cfg.model.condition) is not None
    # every source, not only the first, must carry what the model reads (else its samples were all bad ones)
    needs = condition_field(cfg.model.condition) if cfg is not None and names else None
    sources = resolve_sources(spec, require_count=False, names=names, needs=needs)
    if cfg is not None:
        check_heldout(cfg, sources, spec)
    return sources


def fixed_batch(spec, n: int, image_size: int, cfg=None, names: bool | None = None) -> dict | None:
    """The first `n` samples of a source, center-cropped: the fixed inputs of reconstruction grids.
    With the run's `cfg`, the shards are checked against its model first (`check_heldout`); `names`:
    see heldout_sources."""
    sources = heldout_sources(spec, cfg, names)
    decoder = DecodeSpec(image_size, num_classes=len(sources[0].classes), num_labels=len(sources[0].label_names))
    samples = []
    for item in wds.DataPipeline(wds.SimpleShardList(sources[0].urls), tario.tarfile_to_samples()):
        out = decode(item, decoder, random.Random(0))
        if not isinstance(out, BadSample):
            samples.append(out)
        if len(samples) == n:
            break
    return collate(samples) if samples else None


class EvalStream(IterableDataset):
    """Every sample of some shards exactly once, center-cropped, shards split over workers.

    Split over ranks (`world_size` > 1, one worker): the samples are read in shard order and
    sample i goes to rank i % world_size, so the ranks together see the same `max_samples` samples
    as one process does (validation on 2 ranks equals validation on 1)."""

    def __init__(self, urls: list[str], decoder: DecodeSpec, batch_size: int, max_samples: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.urls, self.decoder, self.batch_size, self.max_samples = urls, decoder, batch_size, max_samples
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        bad = 0
        urls = self.urls[worker::num_workers]
        samples = wds.DataPipeline(wds.SimpleShardList(urls), tario.tarfile_to_samples())
        if self.world_size > 1:  # eval_batches reads with at most one worker then: the order is global
            mine = self.max_samples // self.world_size + (self.rank < self.max_samples % self.world_size)
            samples = islice(samples, self.rank, self.max_samples or None, self.world_size)
            num_workers, worker, max_samples = 1, 0, mine if self.max_samples else 0
        else:
            max_samples = self.max_samples
        rng = random.Random(0)
        # max_samples split over workers with the remainder to the first ones (0 = every sample)
        limit = max_samples // num_workers + (worker < max_samples % num_workers) if max_samples else -1
        if limit == 0:
            return
        batch, seen, reported = [], 0, 0
        for sample in samples:
            out = decode(sample, self.decoder, rng)
            if isinstance(out, BadSample):
                bad += 1
                continue
            batch.append(out)
            seen += 1
            if len(batch) == self.batch_size or seen == limit:
                yield {**collate(batch), "bad": bad - reported}
                batch, reported = [], bad
            if seen == limit:
                return
        if batch or bad > reported:  # the tail, or the bad-sample count alone
            yield {**(collate(batch) if batch else {"image": None}), "bad": bad - reported}


def refuse_weights(sources: list[ShardSource]) -> None:
    """Held-out shards are read once each, in order: a weight (`::w` other than 1, also on a list file's
    line) would be ignored without a word. DataSourceError naming the first weighted source."""
    weighted = [s for s in sources if s.weight != 1.0]
    if weighted:
        raise DataSourceError(f"data.val/--data: weights mean nothing for evaluation, which reads every sample once "
                              f"in order; drop the ::w ({weighted[0].spec})")


def eval_batches(spec, *, image_size: int, batch_size: int, num_workers: int = 0, max_samples: int = 0,
                 rank: int = 0, world_size: int = 1, cfg=None, names: bool | None = None):
    """Batches over every sample of `spec` once (no resampling, no shuffling): for evaluation.
    With `world_size` > 1, this rank's share of the first `max_samples` (see EvalStream).
    With the run's `cfg`, the shards are checked against its model first (`check_heldout`); `names`:
    see heldout_sources. Weights are refused (`refuse_weights`), except in the run's own data.train (launch/
    export.py measures latent statistics over it; its weights are the training's)."""
    sources = heldout_sources(spec, cfg, names)
    if cfg is None or spec != cfg.data.train:
        refuse_weights(sources)
    urls = [u for s in sources for u in s.urls]
    decoder = DecodeSpec(image_size, num_classes=len(sources[0].classes), num_labels=len(sources[0].label_names))
    # The first max_samples in shard order need one reader: workers split the shards, and each would
    # take its share from its own (another subset with each worker count). One worker still decodes
    # beside the evaluation.
    workers = min(num_workers, len(urls), 1 if world_size > 1 or max_samples else num_workers)
    stream = EvalStream(urls, decoder, batch_size, max_samples, rank=rank, world_size=world_size)
    # Its own generator (creating the iterator must not draw from the training's global RNG) and
    # workers that leave SLURM's stop signals to the trainer, as the training loader's do.
    loader = WorkerLoader(stream, batch_size=None, num_workers=workers, generator=torch.Generator(),
                          worker_init_fn=_ignore_stop_signals if workers else None)
    return loader, sources


def unread_note(sources: list[ShardSource], max_samples: int) -> str | None:
    """A note for the log when the first `max_samples` samples in shard order (eval.samples, --max-samples)
    all lie in the first sources, so that the later ones are never measured (None: every source is read,
    or the counts are unknown). Bad samples may make the reader reach a little further."""
    seen = 0
    for i, s in enumerate(sources[:-1] if max_samples else []):
        if s.num_samples is None:
            return None
        seen += s.num_samples
        if seen >= max_samples:
            later = ", ".join(t.spec for t in sources[i + 1:])
            return (f"the first {max_samples} held-out samples in shard order (eval.samples / --max-samples) end "
                    f"before {later}: never measured (0 = every sample)")
    return None
