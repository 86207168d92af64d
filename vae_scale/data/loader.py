"""The streaming loader: WebDataset tar shards -> deterministic, exactly resumable batches per rank.

    loader = build_train_loader(cfg.data, rank=rank, world_size=world, seed=cfg.train.seed)
    loader.load_state_dict(state)               # optional: continue where a checkpoint left off
    for batch in loader:                        # endless; batch["images"]: float32 (B, 3, R, R) in [-1, 1]
        ...
        state = loader.state_dict()             # position after the batches consumed so far (per rank)
    val = build_val_loader(cfg.data, rank=rank, world_size=world)     # finite; batch["count"] real images

How an epoch is planned. An epoch is `batches_per_epoch` (P) batches on every rank, the same P everywhere,
so DDP never waits on a rank that ran out of data. P is data.batches_per_epoch, or total samples //
(world_size * batch_size) with the totals from index.json (written by `vae-scale shards`) or, for shards
without one (img2dataset output), from a scan of member names at start (no decode; set
data.batches_per_epoch to skip it). Each rank runs W lanes (W = data.workers, or 1 with 0 workers). For
epoch e, the shards are permuted with a seed from (seed, e) and dealt to the world_size * W lanes of all
ranks, balanced by sample count when counts are known; with fewer shards than lanes each shard is split
into parts by sample index, so every lane has data and no two lanes share a sample. Lane l of a rank makes
batches l, l + W, l + 2W, ... of the epoch: it reads its shards in a seeded order through a seeded shuffle
buffer (data.shuffle_buffer raw samples; memory is that many encoded images per worker), decodes,
crops, and cuts batches. A lane that runs out before making its share reads its shards again (another
pass, reshuffled), so a sample may repeat within an epoch while another lane's surplus waits for a later
epoch. Every seed comes from (train.seed, epoch, rank, lane), never from time or pid: ranks see disjoint
data within an epoch, and the stream is a pure function of the shards, the config and the seed. (Two
degenerate cases: a lane whose shards are all unreadable borrows from all shards, with a warning; a lane
that finds no decodable image in a whole pass stops the run with DataError.)

Signals. A cluster stops a job by signalling every process of it (SIGTERM, SIGUSR1; Ctrl-C and `timeout`
signal the whole process group with SIGINT / SIGTERM): workers ignore those and leave them to the trainer,
which finishes its step, saves and closes the loader. Workers are started with the stop signals blocked,
so not even one sent while they start can kill them, and the main process receives any that arrived in
that moment once they are started.

Workers. The DataLoader (batch_size=None, pinned memory when CUDA is available, persistent workers,
in_order) round-robins its workers, so the k-th batch of an iteration comes from worker k % W: worker w
makes the global batches g0 + w, g0 + w + W, ..., g0 being where the iteration starts (the position, put
in shared memory before each `iter()`, so persistent workers pick it up). Within an epoch those are always
one lane's, so lanes, not workers, own the data: the stream is the same with 0 and 1 workers, and every
rank must run the same data.workers (they share one config).

Images. Decoded in the workers with PIL; JPEGs with `Image.draft` (DCT-domain downscaling, short side kept
>= resolution), then converted to RGB (EXIF orientation, L/LA/P/RGBA on white/CMYK/16-bit), resized so the
short side is data.resolution (bicubic, only ever down; data.resize=false keeps the native scale) and
cropped: random crop and optional flip for training, center crop for validation. Images smaller than the
crop (e.g. shards written with --keep-small) are skipped and counted apart, as `too_small`: they are not
bad data and never stop a run; data.upscale_small=true upscales them to the crop (bicubic) instead.

Bad data never crashes the run: an undecodable or zero-length member, a key without an image, a duplicate
key, a truncated tar or a shard that cannot be opened is skipped and counted by kind. Counts travel with
each batch, so `counters()` is exact at the consumed position and is part of the state dict. The first
bad sample is logged in full, then a summary every data.log_bad_every. Above data.max_error_fraction bad
of all samples read (checked once 100 samples are seen and at each epoch end) the loader raises DataError
naming the worst shards. The first image too small for the crop is logged with the remedies (a lower
data.resolution, data.upscale_small=true). A pattern that matches nothing or a missing local shard raises
DataError at build time.

Resume. The state is (epoch, batch) plus, per lane, how many raw samples it has taken from its shuffle
buffer. Restoring it replays each lane's raw stream up to that point, reading tar members but decoding
nothing, and continues with exactly the batches the uninterrupted run would have made next, with any
worker count as long as it is the same one. The replay reads (I/O only) what the lane had read of the
current epoch: at most about 1 / (world_size * W) of the data. The state is per rank: save every rank's
(load_state_dict accepts the gathered list). With a different worker count, world size or batch size,
resume keeps the epoch and batch position, but the samples of that epoch's remaining batches differ from
the uninterrupted run's (assumed: no bad samples in the skipped part); later epochs are planned afresh.

Validation is finite and exact: val shards are dealt to lanes without shuffling, every good sample is read
by exactly one lane of one rank, and the last batch of a lane is short rather than padded. Ranks may make
different numbers of batches, so sum metrics per sample with batch["count"] and all-reduce the sums once
at the end; never run a collective per batch.

Beside this file: lanes.py holds the sample order and position shared with the clip loader, decode.py
turns a raw sample into a crop, workers.py runs the worker processes and keeps the stop signals from them,
bad_samples.py counts and reports bad data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vae_scale.config import DataConfig
from vae_scale.data.bad_samples import BadLog
from vae_scale.data.decode import TOO_SMALL, Unusable, decode_sample, to_batch
from vae_scale.data.decode import stats as decode_stats
from vae_scale.data.lanes import ResumableLoader, TrainStream, plan_lanes, rank_world
from vae_scale.data.shard_reader import (
    BadTally,
    DataError,
    expand_shards,
    read_unit,
    shard_counts,
)
from vae_scale.data.workers import dataloader, iterate

__all__ = ["DataError", "TrainLoader", "ValLoader", "build_train_loader", "build_val_loader"]

log = logging.getLogger(__name__)

_stats = decode_stats  # process-local: images decoded and raw samples replayed (tests, debugging)


class TrainLoader(ResumableLoader):
    """Endless, deterministic, resumable training batches of images for one rank (see the module docstring):
    {"images": float32 (B, 3, R, R) in [-1, 1], "keys": ["shard#key", ...]}.

    `epoch` and `batch` are the position: batches of `epoch` consumed so far. Position, state and close are
    lanes.ResumableLoader's, which the clip loader shares.
    """

    kind = "images"
    streams = 1

    def __init__(
        self,
        urls: list[str],
        counts: dict[str, float] | None,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        batches_per_epoch: int,
    ):
        super().__init__(cfg, rank, world_size, seed, batches_per_epoch)
        self._dataset = TrainStream(urls, counts, cfg, rank, world_size, seed, batches_per_epoch, self._start)
        self._loader = dataloader(self._dataset, cfg.workers, persistent=True, seed=seed)
        self._bad = BadLog(cfg, f"data.train (rank {rank})")


# --------------------------------------------------------------------------------------------------------
# Validation


class ValStream(IterableDataset):
    """One pass over this rank's share of the val shards: center crops, short last batch per lane."""

    def __init__(self, urls, counts, cfg: DataConfig, rank: int, world_size: int):
        self.urls, self.counts, self.rank, self.world_size = urls, counts, rank, world_size
        self.batch_size, self.resolution, self.lanes = cfg.batch_size, cfg.resolution, max(cfg.workers, 1)
        self.resize, self.upscale = cfg.resize, cfg.upscale_small

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        lane = info.id if info else 0
        plan = plan_lanes(self.urls, self.counts, self.world_size * self.lanes, list(range(len(self.urls))))
        tally, small, arrays, keys = BadTally(), BadTally(), [], []
        for raw in (raw for u in plan[self.rank * self.lanes + lane] for raw in read_unit(u, tally)):
            try:
                arrays.append(decode_sample(raw, self.resolution, None, False, self.resize, self.upscale))
            except Unusable as b:
                (small if b.kind == TOO_SMALL else tally).add(b.kind, raw.url, raw.key, b.detail)
                continue
            keys.append(f"{raw.url}#{raw.key}")
            if len(arrays) == self.batch_size:
                yield self._batch(arrays, keys, tally, small)
                arrays, keys = [], []
        if arrays or tally.kinds or small.kinds:
            yield self._batch(arrays, keys, tally, small)

    def _batch(self, arrays, keys, tally: BadTally, small: BadTally) -> dict[str, Any]:
        images = to_batch(arrays) if arrays else torch.empty(0, 3, self.resolution, self.resolution)
        return {
            "images": images,
            "keys": keys,
            "count": len(arrays),
            "_meta": {"samples": len(arrays), "bad": tally.take(), "small": small.take()},
        }


class ValLoader:
    """Finite validation batches for one rank; across ranks every good val sample appears exactly once.

    Each batch: "images" float32 (n, 3, R, R) of real images only (n <= batch_size, n may be 0 at the end
    of a lane whose last samples were bad), "count" n, "keys". Ranks may yield different numbers of batches.
    """

    def __init__(
        self, urls: list[str], counts: dict[str, float] | None, cfg: DataConfig, rank: int, world_size: int
    ):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._dataset = ValStream(urls, counts, cfg, rank, world_size)
        # Not persistent: evaluation is occasional, and idle workers would hold memory between passes.
        self._loader = dataloader(self._dataset, cfg.workers, persistent=False, seed=0)
        self._bad = BadLog(cfg, f"data.val (rank {rank})")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._bad = BadLog(self.cfg, f"data.val (rank {self.rank})")
        for item in iterate(self._loader):
            self._bad.add(item.pop("_meta"))
            if item["count"]:
                yield item
        self._bad.check(epoch_end=True)

    def counters(self) -> dict[str, int]:
        """Samples and bad samples (by kind) of the latest pass on this rank."""
        return self._bad.counters()


# --------------------------------------------------------------------------------------------------------
# Building


def build_train_loader(
    cfg: DataConfig, rank: int | None = None, world_size: int | None = None, seed: int = 0
) -> TrainLoader:
    """The training loader of this rank over cfg.train; DataError if shards are missing or too few samples."""
    rank, world_size = rank_world(rank, world_size)
    urls = expand_shards(cfg.train, "train")
    counts = shard_counts(urls, scan=cfg.batches_per_epoch == 0)
    if cfg.batches_per_epoch:
        bpe = cfg.batches_per_epoch
    else:
        total = int(sum(counts.values()))
        bpe = total // (world_size * cfg.batch_size)
        if bpe == 0:
            raise DataError(
                f"data.train has {total} samples in {len(urls)} shards ({urls[0]} ...): fewer than "
                f"one batch per rank ({world_size} ranks x data.batch_size={cfg.batch_size})"
            )
    samples = f", {int(sum(counts.values()))} samples" if counts else ""
    log.info(
        f"data.train: {len(urls)} shards{samples}, {bpe} batches of {cfg.batch_size} per rank per epoch "
        f"(rank {rank} of {world_size}, {cfg.workers} workers)"
    )
    return TrainLoader(urls, counts, cfg, rank, world_size, seed, bpe)


def build_val_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None) -> ValLoader:
    """The validation loader of this rank over cfg.val (finite, exact, center crops)."""
    rank, world_size = rank_world(rank, world_size)
    if not cfg.val:
        raise DataError("data.val is empty: no validation shards")
    urls = expand_shards(cfg.val, "val")
    return ValLoader(urls, shard_counts(urls, scan=False), cfg, rank, world_size)
