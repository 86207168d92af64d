"""The sample order and position that the image loader (loader.py) and the clip loader (clip_loader.py)
share: seeds, shuffle buffers, the epoch plan of shards dealt to lanes, a lane's raw stream with its cursor
(replayed on resume), the per-rank stream the DataLoader workers run, and the main process's side of it
(ResumableLoader: position, worker protocol, bad-sample counts, state, close). What a sample is (an image,
a clip) is the loaders' own; loader.py's docstring describes the whole.
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
from vae_scale.data.shard_reader import BadTally, DataError, RawSample, ShardUnit, read_unit
from vae_scale.data.workers import iterate, stop_workers

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Sample order


def seed_of(*parts: Any) -> int:
    """A 64-bit seed from ints and strings; stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
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


def plan_lanes(
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


class LaneStop(Exception):
    """A lane cannot go on (no readable data); sent to the main process as a DataError."""


class Lane:
    """One lane of one epoch on one rank: its units, pass after pass, through a shuffle buffer, as batches.

    `cursor` counts raw samples taken from the buffer; replaying that many (reading, not decoding)
    rebuilds the lane's exact state, because everything after the tar bytes is seeded.
    """

    def __init__(self, ds: TrainStream, epoch: int, lane: int, units: list[ShardUnit], skip: int):
        self.ds, self.epoch, self.lane, self.units = ds, epoch, lane, units
        self.cursor, self.pass_no, self.it = 0, 0, None
        self.raw_in_pass = self.good_in_pass = self.largest_small = 0
        self.fallback, self.replaying = False, True
        self.tally, self.small = BadTally(), BadTally()
        for _ in range(skip):
            self._next_raw()
        decode_stats["replayed"] += skip
        self.replayed_pass = self.pass_no if skip else -1  # good samples uncounted: no "all bad" verdict
        self.replaying = False
        self.tally.take()  # counted before the checkpoint
        self.small.take()

    def _pass(self) -> Iterator[RawSample]:
        ds = self.ds
        units = list(self.units)
        random.Random(seed_of(ds.seed, "units", self.epoch, ds.rank, self.lane, self.pass_no)).shuffle(units)
        raws = (raw for u in units for raw in read_unit(u, self.tally))
        rng = random.Random(seed_of(ds.seed, "buffer", self.epoch, ds.rank, self.lane, self.pass_no))
        return shuffled(raws, ds.shuffle_buffer, rng)

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
                    raise LaneStop(
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
                    raise LaneStop(
                        f"every image in {', '.join(u.url for u in self.units[:3])}"
                        + (" ..." if len(self.units) > 3 else "")
                        + f" is smaller than the {self.ds.resolution} px crop (or not decodable); "
                        + too_small_remedy(self.ds.resolution, self.largest_small)
                    )
                raise LaneStop(
                    f"no decodable image of at least {self.ds.resolution} px in "
                    + ", ".join(u.url for u in self.units[:3])
                    + (" ..." if len(self.units) > 3 else "")
                )
            self.pass_no += 1

    def next_batch(self) -> dict[str, Any]:
        ds, arrays, keys = self.ds, [], []
        while len(arrays) < ds.batch_size:
            raw = self._next_raw()
            rng = random.Random(seed_of(ds.seed, "crop", self.epoch, ds.rank, self.lane, self.cursor))
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
            "cursor": [self.cursor],  # the lane's one stream
            "samples": len(arrays),
            "bad": self.tally.take(),
            "small": self.small.take(),
        }
        return {"images": to_batch(arrays), "keys": keys, "_meta": meta}


class TrainStream(IterableDataset):
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
            random.Random(seed_of(self.seed, "shards", epoch)).shuffle(order)
            lanes = plan_lanes(self.urls, self.counts, self.world_size * self.lanes, order)
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
                lane = Lane(self, epoch, i % n, self.plan(epoch)[i % n], skip)
            try:
                batch = lane.next_batch()
            except LaneStop as e:
                yield {"_error": str(e)}
                return
            batch["_meta"].update(epoch=epoch, index=i, lane=i % n)
            yield batch
            g += n


def rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments, else torch.distributed, else RANK / WORLD_SIZE, else a single process."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:
        rank = torch.distributed.get_rank() if dist else int(os.environ.get("RANK", 0))
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


# --------------------------------------------------------------------------------------------------------
# The main process's side

SAMPLE_KINDS = {"images": "an image", "clips": "a clip"}
"""What a loader's batches hold, as its state records it (a state of one kind never restores the other)."""


class ResumableLoader:
    """Endless, deterministic, resumable training batches for one rank: the main process's side of a
    TrainStream run by the DataLoader workers (see loader.py's docstring).

    `epoch` and `batch` are the position: batches of `epoch` consumed so far. Each lane keeps `streams`
    cursors (raw samples taken from each of its streams' shuffle buffers: one for images, a clip lane's
    clip and image streams for clips), which the workers send with every batch and a state holds.
    A subclass names its `kind` (SAMPLE_KINDS) and `streams`, then makes `_dataset` (which reads `_start`),
    `_loader` (workers.dataloader) and `_bad` (a BadLog); it may add to `_layout()` and say which cursors a
    position stands for (`_replayed_cursors`).
    """

    kind: str = "images"
    streams: int = 1

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, seed: int, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch
        """Batches every rank yields per epoch (the same on every rank)."""
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.lanes = max(cfg.workers, 1)
        self.epoch, self.batch = 0, 0
        self._cursors = self._zero_cursors()
        # shared memory: [first global batch, each lane's cursors...], written before each iter()
        self._start = torch.zeros(1 + self.lanes * self.streams, dtype=torch.int64).share_memory_()
        self._loader: Any = None
        self._bad: BadLog

    def _zero_cursors(self) -> list[list[int]]:
        return [[0] * self.streams for _ in range(self.lanes)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The batches from the position on (their keys: the subclass's), the worker protocol checked."""
        self._start[0] = self.epoch * self.batches_per_epoch + self.batch
        self._start[1:] = torch.tensor([c for lane in self._cursors for c in lane])
        for item in iterate(self._loader):
            if "_error" in item:
                raise DataError(f"data.train (rank {self.rank}): {item['_error']}")
            meta = item.pop("_meta")
            if (meta["epoch"], meta["index"]) != (self.epoch, self.batch):  # the worker protocol broke
                raise RuntimeError(
                    f"data stream out of order: got {meta['epoch'], meta['index']}, "
                    f"expected {self.epoch, self.batch}"
                )
            self._cursors[meta["lane"]] = [int(c) for c in meta["cursor"]]
            self.batch += 1
            if self.batch == self.batches_per_epoch:
                self.epoch, self.batch, self._cursors = self.epoch + 1, 0, self._zero_cursors()
            self._bad.add(meta)
            self._bad.check(epoch_end=self.batch == 0)
            yield item

    def counters(self) -> dict[str, int]:
        """Samples delivered, bad samples skipped by kind ("bad/<kind>"), and the samples skipped apart
        from bad data ("too_small", and for clips "too_short"), up to the consumed batches."""
        return self._bad.counters()

    def _layout(self) -> dict[str, Any]:
        """What must match for a state to resume exactly."""
        c = self.cfg
        return {
            "batches_per_epoch": self.batches_per_epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": c.batch_size,
            "lanes": self.lanes,
        }

    def _replayed_cursors(self, epoch: int, batch: int) -> list[list[int]]:
        """The cursors of a position reached without a bad sample: lane l made batches l, l + W, ..."""
        return [[len(range(lane, batch, self.lanes)) * self.cfg.batch_size] for lane in range(self.lanes)]

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (small, JSON-able); checkpoint one per rank."""
        cursors = [c[0] for c in self._cursors] if self.streams == 1 else [list(c) for c in self._cursors]
        return {
            "version": 1,
            "kind": self.kind,
            "epoch": self.epoch,
            "batch": self.batch,
            **self._layout(),
            "cursors": cursors,
            "counters": dict(self._bad.counts),
            "bad_shards": dict(self._bad.shards.most_common(64)),
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from a saved position (before iterating). Takes this rank's state or all ranks' list.

        Exact with the same layout (world size, batch size, workers; for clips the clip settings too);
        otherwise the epoch and batch position carry over but the rest of that epoch's samples differ from
        an uninterrupted run (see loader.py's docstring). DataError for another kind's state.
        """
        if isinstance(state, (list, tuple)):
            state = state[self.rank] if self.rank < len(state) else state[0]
        theirs = state.get("kind", "images")  # states saved before clips existed are images'
        if theirs != self.kind:
            raise DataError(
                f"the loader state is {SAMPLE_KINDS.get(theirs, theirs)} loader's, not "
                f"{SAMPLE_KINDS[self.kind]} loader's (data.frames changed?)"
            )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        differ = [k for k, v in self._layout().items() if state.get(k) != v]
        if not differ:
            self._cursors = [[int(c)] if self.streams == 1 else [int(x) for x in c] for c in state["cursors"]]
        else:
            batch = min(
                batch * self.batches_per_epoch // max(int(state["batches_per_epoch"]), 1),
                self.batches_per_epoch - 1,
            )
            self._cursors = self._replayed_cursors(epoch, batch)  # assumes no bad sample in the skipped part
            log.warning(
                "data.train: resuming at epoch %d batch %d with a different layout (%s) than the "
                "checkpoint's: this epoch's remaining samples differ from an uninterrupted run",
                epoch,
                batch,
                ", ".join(differ),
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
