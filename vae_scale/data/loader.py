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

Beside this file: decode.py turns a raw sample into a crop, workers.py runs the worker processes and keeps
the stop signals from them, bad_samples.py counts and reports bad data.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vae_scale.config import DataConfig
from vae_scale.data.bad_samples import BadLog
from vae_scale.data.decode import TOO_SMALL, Unusable, decode_sample, to_batch, too_small_remedy
from vae_scale.data.decode import stats as decode_stats
from vae_scale.data.shard_reader import (
    BadTally,
    DataError,
    RawSample,
    ShardUnit,
    expand_shards,
    read_unit,
    shard_counts,
)
from vae_scale.data.workers import dataloader, iterate, stop_workers

__all__ = ["DataError", "TrainLoader", "ValLoader", "build_train_loader", "build_val_loader"]

log = logging.getLogger(__name__)

_stats = decode_stats  # process-local: images decoded and raw samples replayed (tests, debugging)


# --------------------------------------------------------------------------------------------------------
# Sample order


def _seed(*parts: Any) -> int:
    """A 64-bit seed from ints and strings; stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer of `size` items, drained at the end (in random order)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = x
    while buf:
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


# --------------------------------------------------------------------------------------------------------
# Planning


def _plan_lanes(
    urls: list[str], counts: dict[str, float] | None, n_lanes: int, order: list[int]
) -> list[list[ShardUnit]]:
    """Deal the shards (in `order`) to n_lanes lanes, balanced by sample count when counts are known.

    With fewer shards than lanes, each shard is split into ceil(n_lanes / shards) parts by sample index.
    """
    parts = -(-n_lanes // len(urls)) if len(urls) < n_lanes else 1
    units = [ShardUnit(urls[s], p, parts) for s in order for p in range(parts)]
    lanes: list[list[ShardUnit]] = [[] for _ in range(n_lanes)]
    if counts is None:
        for k, u in enumerate(units):
            lanes[k % n_lanes].append(u)
        return lanes
    weights = [counts[u.url] / parts for u in units]
    heap = [(0.0, 0, lane) for lane in range(n_lanes)]  # (samples, units, lane): empty shards spread too
    for k in sorted(range(len(units)), key=lambda k: -weights[k]):  # stable: `order` breaks ties
        load, n, lane = heapq.heappop(heap)
        lanes[lane].append(units[k])
        heapq.heappush(heap, (load + weights[k], n + 1, lane))
    return lanes


class _Fatal(Exception):
    """A lane cannot go on (no readable data); sent to the main process as a DataError."""


class _Lane:
    """One lane of one epoch on one rank: its units, pass after pass, through a shuffle buffer, as batches.

    `cursor` counts raw samples taken from the buffer; replaying that many (reading, not decoding)
    rebuilds the lane's exact state, because everything after the tar bytes is seeded.
    """

    def __init__(self, ds: _TrainStream, epoch: int, lane: int, units: list[ShardUnit], skip: int):
        self.ds, self.epoch, self.lane, self.units = ds, epoch, lane, units
        self.cursor, self.pass_no, self.it = 0, 0, None
        self.raw_in_pass = self.good_in_pass = self.largest_small = 0
        self.fallback, self.replaying = False, True
        self.tally, self.small = BadTally(), BadTally()
        for _ in range(skip):
            self._next_raw()
        _stats["replayed"] += skip
        self.replayed_pass = self.pass_no if skip else -1  # good samples uncounted: no "all bad" verdict
        self.replaying = False
        self.tally.take()  # counted before the checkpoint
        self.small.take()

    def _pass(self) -> Iterator[RawSample]:
        ds = self.ds
        units = list(self.units)
        random.Random(_seed(ds.seed, "units", self.epoch, ds.rank, self.lane, self.pass_no)).shuffle(units)
        raws = (raw for u in units for raw in read_unit(u, self.tally))
        rng = random.Random(_seed(ds.seed, "buffer", self.epoch, ds.rank, self.lane, self.pass_no))
        return _shuffle(raws, ds.shuffle_buffer, rng)

    def _next_raw(self) -> RawSample:
        while True:
            if self.it is None:
                self.it, self.raw_in_pass, self.good_in_pass = self._pass(), 0, 0
                self.largest_small = 0
            raw = next(self.it, None)
            if raw is not None:
                self.cursor += 1
                self.raw_in_pass += 1
                return raw
            self.it = None
            if self.raw_in_pass == 0:
                if self.fallback:
                    raise _Fatal(
                        f"no readable sample in any of the {len(self.ds.urls)} shards "
                        f"(first: {self.ds.urls[0]})"
                    )
                # Only unreadable shards in this lane: borrow from all shards rather than stall (rare).
                log.warning(
                    "rank %d lane %d: no readable sample in its shards (%s); reading all shards",
                    self.ds.rank,
                    self.lane,
                    ", ".join(u.url for u in self.units[:3]),
                )
                self.fallback, self.units = True, [ShardUnit(u) for u in self.ds.urls]
            elif self.good_in_pass == 0 and not self.replaying and self.pass_no != self.replayed_pass:
                if self.largest_small:
                    raise _Fatal(
                        f"every image in {', '.join(u.url for u in self.units[:3])}"
                        + (" ..." if len(self.units) > 3 else "")
                        + f" is smaller than the {self.ds.resolution} px crop (or not decodable); "
                        + too_small_remedy(self.ds.resolution, self.largest_small)
                    )
                raise _Fatal(
                    f"no decodable image of at least {self.ds.resolution} px in "
                    + ", ".join(u.url for u in self.units[:3])
                    + (" ..." if len(self.units) > 3 else "")
                )
            self.pass_no += 1

    def next_batch(self) -> dict[str, Any]:
        ds, arrays, keys = self.ds, [], []
        while len(arrays) < ds.batch_size:
            raw = self._next_raw()
            rng = random.Random(_seed(ds.seed, "crop", self.epoch, ds.rank, self.lane, self.cursor))
            try:
                arrays.append(decode_sample(raw, ds.resolution, rng, ds.flip, ds.resize, ds.upscale))
            except Unusable as b:
                if b.kind == TOO_SMALL:
                    self.small.add(b.kind, raw.url, raw.key, b.detail)
                    self.largest_small = max(self.largest_small, b.short_side)
                else:
                    self.tally.add(b.kind, raw.url, raw.key, b.detail)
                continue
            keys.append(f"{raw.url}#{raw.key}")
            self.good_in_pass += 1
        meta = {
            "cursor": self.cursor,
            "samples": len(arrays),
            "bad": self.tally.take(),
            "small": self.small.take(),
        }
        return {"images": to_batch(arrays), "keys": keys, "_meta": meta}


class _TrainStream(IterableDataset):
    """The endless per-rank batch stream; one copy per DataLoader worker (see the module docstring)."""

    def __init__(
        self,
        urls,
        counts,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        bpe: int,
        start: torch.Tensor,
    ):
        self.urls, self.counts, self.rank, self.world_size, self.seed = urls, counts, rank, world_size, seed
        self.batch_size, self.resolution, self.flip = cfg.batch_size, cfg.resolution, cfg.flip
        self.resize, self.upscale = cfg.resize, cfg.upscale_small
        self.shuffle_buffer, self.batches_per_epoch = cfg.shuffle_buffer, bpe
        self.lanes = max(cfg.workers, 1)
        self.start = start  # shared memory: [first global batch, lane cursors...], written before each iter()
        self._plans: dict[int, list[list[ShardUnit]]] = {}

    def plan(self, epoch: int) -> list[list[ShardUnit]]:
        """This rank's lanes for `epoch`: the shard permutation of (seed, epoch) dealt to all lanes."""
        if epoch not in self._plans:
            order = list(range(len(self.urls)))
            random.Random(_seed(self.seed, "shards", epoch)).shuffle(order)
            lanes = _plan_lanes(self.urls, self.counts, self.world_size * self.lanes, order)
            self._plans = {epoch: lanes[self.rank * self.lanes : (self.rank + 1) * self.lanes]}
        return self._plans[epoch]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        assert n == self.lanes, (n, self.lanes)
        P = self.batches_per_epoch
        g0, cursors = int(self.start[0]), self.start[1:].tolist()
        g, lane = g0 + worker, None
        while True:
            epoch, i = divmod(g, P)
            if lane is None or lane.epoch != epoch:
                skip = cursors[i % n] if epoch == g0 // P else 0
                lane = _Lane(self, epoch, i % n, self.plan(epoch)[i % n], skip)
            try:
                batch = lane.next_batch()
            except _Fatal as e:
                yield {"_error": str(e)}
                return
            batch["_meta"].update(epoch=epoch, index=i, lane=i % n)
            yield batch
            g += n


class TrainLoader:
    """Endless, deterministic, resumable training batches for one rank (see the module docstring).

    `epoch` and `batch` are the position: batches of `epoch` consumed so far.
    """

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
        self.batches_per_epoch = batches_per_epoch
        """Batches every rank yields per epoch (the same on every rank)."""
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.lanes = max(cfg.workers, 1)
        self.epoch, self.batch = 0, 0  # position: batches of `epoch` consumed so far
        self._cursors = [0] * self.lanes
        self._start = torch.zeros(1 + self.lanes, dtype=torch.int64).share_memory_()
        self._dataset = _TrainStream(
            urls, counts, cfg, rank, world_size, seed, batches_per_epoch, self._start
        )
        self._loader = dataloader(self._dataset, cfg.workers, persistent=True, seed=seed)
        self._bad = BadLog(cfg, f"data.train (rank {rank})")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """From the position on: {"images": float32 (B, 3, R, R) in [-1, 1], "keys": ["shard#key", ...]}."""
        self._start[0] = self.epoch * self.batches_per_epoch + self.batch
        self._start[1:] = torch.tensor(self._cursors)
        for item in iterate(self._loader):
            if "_error" in item:
                raise DataError(f"data.train (rank {self.rank}): {item['_error']}")
            meta = item.pop("_meta")
            if (meta["epoch"], meta["index"]) != (self.epoch, self.batch):  # the worker protocol broke
                raise RuntimeError(
                    f"data stream out of order: got {meta['epoch'], meta['index']}, "
                    f"expected {self.epoch, self.batch}"
                )
            self._cursors[meta["lane"]] = meta["cursor"]
            self.batch += 1
            if self.batch == self.batches_per_epoch:
                self.epoch, self.batch, self._cursors = self.epoch + 1, 0, [0] * self.lanes
            self._bad.add(meta)
            self._bad.check(epoch_end=self.batch == 0)
            yield item

    def counters(self) -> dict[str, int]:
        """Samples delivered, bad samples skipped, by kind ("bad/<kind>"), and images smaller than the crop
        skipped ("too_small"), up to the consumed batches."""
        return self._bad.counters()

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (small, JSON-able); checkpoint one per rank."""
        return {
            "version": 1,
            "epoch": self.epoch,
            "batch": self.batch,
            "batches_per_epoch": self.batches_per_epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.cfg.batch_size,
            "lanes": self.lanes,
            "cursors": list(self._cursors),
            "counters": dict(self._bad.counts),
            "bad_shards": dict(self._bad.shards.most_common(64)),
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from a saved position (before iterating). Takes this rank's state or all ranks' list.

        Exact with the same world size, batch size and worker count; otherwise the epoch and batch
        position carry over but the rest of that epoch's samples differ (see the module docstring).
        """
        if isinstance(state, (list, tuple)):
            state = state[self.rank] if self.rank < len(state) else state[0]
        epoch, batch = int(state["epoch"]), int(state["batch"])
        mine = self.state_dict()
        same = all(
            state.get(k) == mine[k]
            for k in ("batches_per_epoch", "rank", "world_size", "batch_size", "lanes")
        )
        if same:
            self._cursors = [int(c) for c in state["cursors"]]
        else:
            batch = min(
                batch * self.batches_per_epoch // max(int(state["batches_per_epoch"]), 1),
                self.batches_per_epoch - 1,
            )
            # Lane l has made the batches l, l + W, ... below `batch`; assume none of their samples was bad.
            self._cursors = [
                len(range(lane, batch, self.lanes)) * self.cfg.batch_size for lane in range(self.lanes)
            ]
            log.warning(
                "data.train: resuming at epoch %d batch %d with a different layout (world size, "
                "batch size, workers or rank) than the checkpoint's: this epoch's remaining samples "
                "differ from an uninterrupted run",
                epoch,
                batch,
            )
        self.epoch, self.batch = epoch, batch
        self._bad.counts = Counter(state.get("counters", {}))
        self._bad.shards = Counter(state.get("bad_shards", {}))

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            stop_workers(it)
        self._loader._iterator = None


# --------------------------------------------------------------------------------------------------------
# Validation


class _ValStream(IterableDataset):
    """One pass over this rank's share of the val shards: center crops, short last batch per lane."""

    def __init__(self, urls, counts, cfg: DataConfig, rank: int, world_size: int):
        self.urls, self.counts, self.rank, self.world_size = urls, counts, rank, world_size
        self.batch_size, self.resolution, self.lanes = cfg.batch_size, cfg.resolution, max(cfg.workers, 1)
        self.resize, self.upscale = cfg.resize, cfg.upscale_small

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        lane = info.id if info else 0
        plan = _plan_lanes(self.urls, self.counts, self.world_size * self.lanes, list(range(len(self.urls))))
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
        self._dataset = _ValStream(urls, counts, cfg, rank, world_size)
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


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments, else torch.distributed, else RANK / WORLD_SIZE, else a single process."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:
        rank = torch.distributed.get_rank() if dist else int(os.environ.get("RANK", 0))
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def build_train_loader(
    cfg: DataConfig, rank: int | None = None, world_size: int | None = None, seed: int = 0
) -> TrainLoader:
    """The training loader of this rank over cfg.train; DataError if shards are missing or too few samples."""
    rank, world_size = _rank_world(rank, world_size)
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
    rank, world_size = _rank_world(rank, world_size)
    if not cfg.val:
        raise DataError("data.val is empty: no validation shards")
    urls = expand_shards(cfg.val, "val")
    return ValLoader(urls, shard_counts(urls, scan=False), cfg, rank, world_size)
