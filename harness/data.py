"""The WebDataset pipeline: resampled, deterministic shard streams split by node and worker.

Per rank, per DataLoader worker, per epoch, one stream of batches, built as a list of stages:

    shards (this rank's share, resampled with a seed)  ->  read tar  ->  shuffle buffer
      ->  [skip what was consumed before a resume]  ->  decode + crop + resize  ->  batch

Why it looks like this:
- Ranks see disjoint data: the shard list is split by rank *before* resampling (each rank resamples
  only its own shards). With fewer shards than ranks, every rank reads all shards and keeps every
  world_size-th sample instead (correct, but each rank reads all bytes: make more shards).
- Everything random is seeded from (data seed, epoch, rank, slot) — a slot is a worker's position
  in the DataLoader's round-robin — so a stream can be replayed. On resume the trainer asks for
  batches from global batch index N; each slot skips the raw samples it had consumed, before
  decoding, and the run continues exactly as if it had never stopped (`data.exact_resume`).
- The loader is NOT passed through `accelerator.prepare()`: prepare would re-shard or dispatch an
  IterableDataset, and we already split by rank here.
- Images leave the workers as uint8 `b h w c` (4x less to copy between processes than float32);
  `to_model_input` makes the `b c h w` float in [-1, 1] on the training device.
- Bad samples (corrupt image, truncated tar, missing image) are skipped and counted in the worker;
  counts ride along in each batch so the trainer can log them and stop when too many are bad.
  Programming errors (TypeError, AttributeError, ...) are re-raised, never swallowed. Pickle is
  never decoded: only image, `cls`, `json` and `txt` fields are read.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import tarfile
import threading
from dataclasses import dataclass
from itertools import count, islice

import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.utils import make_seed

from harness import tario
from shards.images import to_rgb
from shards.sources import DataSourceError, ShardSource, resolve_sources

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Errors that mean "this sample / shard is bad": skip and count. Anything else is a bug: raise.
DATA_ERRORS = (OSError, EOFError, tarfile.TarError, KeyError, ValueError, Image.DecompressionBombError, SyntaxError)

# ---------------------------------------------------------------------------------------------
# Decoding one sample (runs in the workers)
# ---------------------------------------------------------------------------------------------


def load_image(data: bytes, size: int, crop: str, hflip: bool, rng: random.Random) -> np.ndarray:
    """Decode, square-crop (random or center), resize to `size`, maybe flip -> uint8 `h w c`."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))  # JPEG only: decode at a reduced scale still >= size (much faster)
    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an image that is already upright
    img = to_rgb(img)  # the shard builders' conversion: img2dataset's or anyone's shards decode the same way
    w, h = img.size
    side = min(w, h)
    if crop == "random":
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    else:
        x0, y0 = (w - side) // 2, (h - side) // 2
    img = img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


@dataclass
class SampleDecoder:
    image_size: int
    crop: str = "random"
    hflip: bool = False
    num_labels: int = 0

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise KeyError(f"sample {sample.get('__key__')!r} has no image ({', '.join(IMAGE_KEYS)})")
        out = {
            "image": load_image(data, self.image_size, self.crop, self.hflip, rng),
            "key": sample["__key__"],
            "cls": int(sample["cls"]) if "cls" in sample else -1,
        }
        if self.num_labels:
            labels = np.zeros(self.num_labels, dtype=np.float32)
            if "json" in sample:
                idx = json.loads(sample["json"]).get("labels", [])
                labels[[i for i in idx if 0 <= i < self.num_labels]] = 1.0
            out["labels"] = labels
        return out


def collate(samples: list[dict]) -> dict:
    first = samples[0]["image"]
    images = torch.empty((len(samples), *first.shape), dtype=torch.uint8)
    if get_worker_info() is not None:
        images.share_memory_()  # filled in place: sending it to the main process copies nothing
    view = images.numpy()
    for i, s in enumerate(samples):
        view[i] = s["image"]
    batch = {
        "image": images,
        "cls": torch.tensor([s["cls"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }
    if "labels" in samples[0]:
        batch["labels"] = torch.from_numpy(np.stack([s["labels"] for s in samples]))
    return batch


def to_model_input(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 `b h w c` -> float `b c h w` in [-1, 1], on `device`."""
    images = images.to(device, non_blocking=True)
    return rearrange(images, "b h w c -> b c h w").float().div_(127.5).sub_(1.0)


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


class BadSampleCounter:
    """A webdataset exception handler that counts data errors and re-raises bugs.

    A stream in which nothing can be read would otherwise skip forever (resampled shards never
    run out) without producing the batch that carries its bad count to the trainer: after
    BAD_IN_A_ROW_LIMIT failures with no good sample between them it stops with DataStalledError."""

    def __init__(self):
        self.bad = 0
        self.in_a_row = 0
        self.last_error = ""

    def __call__(self, exn: Exception) -> bool:
        if (not isinstance(exn, DATA_ERRORS) or isinstance(exn, (NotImplementedError, RecursionError))
                or isinstance(exn, DataStalledError)):
            raise exn
        self.bad += 1
        self.in_a_row += 1
        self.last_error = f"{type(exn).__name__}: {exn}"[:300]
        if self.in_a_row >= BAD_IN_A_ROW_LIMIT:
            raise DataStalledError(f"data: {self.in_a_row} samples or shards in a row could not be read (last: "
                                   f"{self.last_error.splitlines()[0] if self.last_error else '?'}); check them with "
                                   "`python -m shards verify DIR`")
        return True  # continue with the next sample / shard


def _mix(streams: list, weights: list[float], rng: random.Random):
    """Weighted, seeded choice of the source of each sample (several data sources)."""
    while True:
        yield next(rng.choices(streams, weights)[0])


def _take_every(samples, start: int, step: int):
    """Sample-level split for when there are fewer shards than ranks."""
    return islice(samples, start, None, step)


class ShardStream(IterableDataset):
    """One epoch of batches for this rank; see the module docstring."""

    def __init__(self, sources: list[ShardSource], *, rank: int, world_size: int, batch_size: int,
                 decoder: SampleDecoder, shuffle_buffer: int, seed: int, batches_per_epoch: int):
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.decoder = batch_size, decoder
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.batches_per_epoch = batches_per_epoch
        self.epoch, self.skip_batches = 0, 0
        # Split by node: this rank's shards per source (or all of them + a sample-level split).
        self.sample_split = any(len(s.urls) < world_size for s in sources)
        self.parts = [(s.urls if self.sample_split else s.urls[rank::world_size], s.weight) for s in sources]

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw_samples(self, urls: list[str], seed: int, handler):
        """Infinite resampled raw samples from `urls` (webdataset's ResampledShards + tar reader)."""
        stages = [
            wds.ResampledShards(urls, worker_seed=lambda: seed, deterministic=True),
            tario.tarfile_to_samples(handler=handler),  # webdataset's, with a faster header parser
        ]
        if self.sample_split:
            stages.append(wds.pipelinefilter(_take_every)(self.rank, self.world_size))
        return iter(wds.DataPipeline(*stages))

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
        handler = BadSampleCounter()
        for epoch in count(self.epoch):
            yield from self._epoch(epoch, slot, per_epoch - already, already, handler)
            already = 0

    def _epoch(self, epoch: int, slot: int, todo: int, already: int, handler: BadSampleCounter):
        seed = make_seed(self.seed, epoch, self.rank, slot)
        streams = [self._raw_samples(urls, make_seed(seed, i), handler) for i, (urls, _) in enumerate(self.parts)]
        weights = [w for _, w in self.parts]
        raw = streams[0] if len(streams) == 1 else _mix(streams, weights, random.Random(seed))
        if self.shuffle_buffer > 0:
            raw = wds.filters._shuffle(raw, self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(seed + 1))
        raw = islice(raw, already * self.batch_size, None)  # resume: skip without decoding

        index = already * self.batch_size
        batch, reported = [], handler.bad
        for sample in raw:
            if todo <= 0:
                return
            index += 1
            try:
                batch.append(self.decoder(sample, random.Random(make_seed(seed, index))))
            except Exception as exn:  # noqa: BLE001 - the handler re-raises anything that is not a data error
                handler(exn)
                continue
            handler.in_a_row = 0
            if len(batch) == self.batch_size:
                out = collate(batch)
                out["bad"] = handler.bad - reported
                out["bad_error"] = handler.last_error
                reported = handler.bad
                yield out
                batch, todo = [], todo - 1


# ---------------------------------------------------------------------------------------------
# What the trainer uses
# ---------------------------------------------------------------------------------------------


@dataclass
class DataInfo:
    num_samples: int
    classes: list[str]
    label_names: list[str]
    num_shards: int


class TrainLoader:
    """Infinite batches for one rank, replayable from any global batch index."""

    def __init__(self, cfg, *, rank: int, world_size: int, batch_size: int, pin_memory: bool = False):
        sources = resolve_sources(cfg.train, cfg.num_samples)
        total = sum(s.num_samples for s in sources)
        first = sources[0]
        self.info = DataInfo(total, first.classes, first.label_names, sum(len(s.urls) for s in sources))
        epoch_samples = cfg.epoch_samples or total
        # A multiple of the worker count, so that every worker owns whole positions of each epoch.
        slots = max(1, cfg.num_workers)
        self.batches_per_epoch = epoch_samples // (world_size * batch_size) // slots * slots
        if self.batches_per_epoch < 1:
            raise DataSourceError(f"data.epoch_samples: {epoch_samples} samples make less than one batch per rank "
                                  f"and worker ({world_size} ranks x {batch_size} x {slots} workers)")
        decoder = SampleDecoder(cfg.image_size, cfg.crop, cfg.hflip, num_labels=len(first.label_names))
        self.dataset = ShardStream(sources, rank=rank, world_size=world_size, batch_size=batch_size, decoder=decoder,
                                   shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, batches_per_epoch=self.batches_per_epoch)
        self.num_workers, self.pin_memory = cfg.num_workers, pin_memory

    @property
    def sample_split(self) -> bool:
        return self.dataset.sample_split

    def batches(self, start: int = 0):
        """Yield batches forever, starting at global (per-rank) batch index `start`."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        self.dataset.set_epoch(epoch, offset)
        # Its own generator: creating the iterator must not draw from the global torch RNG, which
        # the model uses (posterior noise) and a resume restores.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.num_workers else None, generator=torch.Generator().manual_seed(start),
                            worker_init_fn=_ignore_stop_signals if self.num_workers else None)
        yield from loader


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: SLURM (time limit, preemption, scancel) signals every process of the
    job step, workers included. torch's worker handler lets SIGTERM kill a worker unless it came
    from the parent, and SIGUSR1's default action is to terminate; either way the main process would
    die with "DataLoader worker killed" instead of saving its checkpoint. So the worker blocks both
    and a thread takes them with sigwaitinfo, which tells who sent them: SIGTERM from the parent
    (multiprocessing's terminate, at its exit) ends the worker as torch's own handler would; from
    anyone else, and SIGUSR1, they are dropped. The main process alone decides, and checkpoints."""
    stop = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # inherited by the thread below
    threading.Thread(target=_drop_stop_signals, args=(os.getppid(), stop), daemon=True, name="stop-signals").start()


def _drop_stop_signals(parent: int, stop: set) -> None:
    while True:
        info = signal.sigwaitinfo(stop)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def fixed_batch(spec, n: int, image_size: int) -> dict | None:
    """The first `n` samples of a source, center-cropped: the fixed inputs of reconstruction grids."""
    sources = resolve_sources(spec, require_count=False)
    decoder = SampleDecoder(image_size, "center", False, num_labels=len(sources[0].label_names))
    handler = BadSampleCounter()
    samples = []
    pipeline = wds.DataPipeline(wds.SimpleShardList(sources[0].urls), wds.tarfile_to_samples(handler=handler))
    for sample in pipeline:
        try:
            samples.append(decoder(sample, random.Random(0)))
        except Exception as exn:  # noqa: BLE001
            handler(exn)
        if len(samples) == n:
            break
    return collate(samples) if samples else None


class EvalStream(IterableDataset):
    """Every sample of some shards exactly once, center-cropped, shards split over workers."""

    def __init__(self, urls: list[str], decoder: SampleDecoder, batch_size: int, max_samples: int = 0):
        self.urls, self.decoder, self.batch_size, self.max_samples = urls, decoder, batch_size, max_samples

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        handler = BadSampleCounter()
        urls = self.urls[worker::num_workers]
        samples = wds.DataPipeline(wds.SimpleShardList(urls), tario.tarfile_to_samples(handler=handler))
        rng = random.Random(0)
        # max_samples split over workers with the remainder to the first ones (0 = every sample)
        limit = self.max_samples // num_workers + (worker < self.max_samples % num_workers) if self.max_samples else -1
        if limit == 0:
            return
        batch, seen, reported = [], 0, 0
        for sample in samples:
            try:
                batch.append(self.decoder(sample, rng))
            except Exception as exn:  # noqa: BLE001
                handler(exn)
                continue
            seen += 1
            if len(batch) == self.batch_size or seen == limit:
                yield {**collate(batch), "bad": handler.bad - reported}
                batch, reported = [], handler.bad
            if seen == limit:
                return
        if batch or handler.bad > reported:  # the tail, or the bad-sample count alone
            yield {**(collate(batch) if batch else {"image": None}), "bad": handler.bad - reported}


def eval_batches(spec, *, image_size: int, batch_size: int, num_workers: int = 0, max_samples: int = 0):
    """Batches over every sample of `spec` once (no resampling, no shuffling): for evaluation."""
    sources = resolve_sources(spec, require_count=False)
    urls = [u for s in sources for u in s.urls]
    decoder = SampleDecoder(image_size, "center", False, num_labels=len(sources[0].label_names))
    workers = min(num_workers, len(urls))
    loader = DataLoader(EvalStream(urls, decoder, batch_size, max_samples), batch_size=None, num_workers=workers)
    return loader, sources
