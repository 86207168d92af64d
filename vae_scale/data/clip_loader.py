"""The clip loader: WebDataset shards of videos (and images) -> deterministic, exactly resumable batches of
clips per rank, for video autoencoders.

    loader = build_clip_loader(cfg.data, rank=rank, world_size=world, seed=cfg.train.seed)
    loader.load_state_dict(state)               # optional: continue where a checkpoint left off
    for batch in loader:                        # endless; batch["clips"]: float32 (B, 3, T, R, R) in [-1, 1]
        ...                                     # T = batch["frames"]: data.frames, or 1 for an image batch
        state = loader.state_dict()

It is the image loader (vae_scale/data/loader.py) with clips for images: the same epoch plan (shards
permuted per (seed, epoch) and dealt to every rank's lanes), the same seeded shuffle buffers, passes, bad
sample counting and worker protocol; read that module's docstring first. What differs:

Clips. A clip sample is a video member (VIDEO_EXTENSIONS: what `vae-scale shards` writes, or
video2dataset's `.mp4`). A training clip is data.frames frames taken every data.frame_stride-th frame from
a seeded random start; every frame gets the same crop and flip (short side resized to data.resolution,
down only). A video shorter than the clip's span, 1 + (frames - 1) * stride, is skipped and counted as
`too_short`, apart from bad data (like `too_small`, it is not broken, just not usable at these settings);
a video that cannot be demuxed or decoded (a truncated file) is bad data, `bad/undecodable`.

Mixed batches. A batch has one T. Which batches are images (T = 1) is a seeded schedule of (seed, epoch,
batch index) with probability data.image_fraction, the same on every rank (so every rank runs the same
shapes in a step, and DDP/FSDP ranks stay in step), as Wan's and Cosmos's joint trainers alternate image
and video batches. Each lane reads two streams of its shards, each with its own seeded shuffle buffer and
cursor: a clip stream (samples with a video member; image samples are passed over) and an image stream
(every sample: an image as itself, a clip as one seeded random frame of it). With data.frames = 1 only
the image stream runs and every batch is (B, 3, 1, R, R). Problems seen while reading a tar (a truncated
tar, a key without image or video) are counted by the clip stream when clips are trained on, else by the
image stream, so each is counted once per pass.

Resume. The state is (epoch, batch) plus, per lane, the cursors of its two streams; restoring replays each
stream's raw samples (reading, not decoding) and continues with exactly the batches the uninterrupted run
would have made, with the same world size, batch size, worker count and clip settings.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from vae_scale.config import DataConfig
from vae_scale.data.bad_samples import BadLog
from vae_scale.data.decode import TOO_SMALL, Unusable, crop, decode_sample
from vae_scale.data.lanes import (
    Lane,
    LaneStop,
    ResumableLoader,
    TrainStream,
    plan_lanes,
    rank_world,
    seed_of,
    shuffled,
)
from vae_scale.data.loader import ValStream
from vae_scale.data.shard_reader import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    BadTally,
    DataError,
    ShardUnit,
    expand_shards,
    read_unit,
    shard_counts,
)
from vae_scale.data.video import VideoError, clip_span, read_clip, read_frame
from vae_scale.data.workers import dataloader, iterate

__all__ = ["ClipLoader", "ClipValLoader", "build_clip_loader", "build_clip_val_loader"]

log = logging.getLogger(__name__)

TOO_SHORT = "too_short"
"""Videos with fewer frames than a clip spans: skipped and counted apart from bad data."""
KINDS = ("clips", "images")
"""A lane's two streams, in the order of their cursors in the state."""
MEDIA = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


def _to_clips(arrays: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, T, R, R) float32 in [-1, 1] from B (T, R, R, 3) uint8 arrays."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 4, 1, 2, 3)
    out = torch.empty(x.shape, dtype=torch.float32)
    if get_worker_info() is not None:  # in shared memory: no copy to the main process
        out.share_memory_()
    out.copy_(x)
    return out.div_(127.5).sub_(1.0)


def _crop_frames(
    frames: list[Image.Image], size: int, seed: int | None, flip: bool, resize: bool, upscale: bool
) -> np.ndarray:
    """(T, size, size, 3): every frame with the same crop and flip (a random one drawn from `seed`, the
    same for each frame; centered without flip for seed None), resized as the image loader resizes."""
    w, h = frames[0].size
    if min(w, h) < size and not upscale:
        raise Unusable(TOO_SMALL, f"{w}x{h} is smaller than the {size} px crop", min(w, h))
    resize = resize or min(w, h) < size
    return np.stack(
        [crop(f, size, None if seed is None else random.Random(seed), flip, resize) for f in frames]
    )


def center_clip(raw, cfg: DataConfig) -> np.ndarray:
    """(T, R, R, 3) uint8: a video member's first clip (data.frames at data.frame_stride; its first frame
    with data.frames = 1), or an image member as a one-frame clip, center-cropped as validation crops.

    Unusable (too_small) or VideoError (too_short, undecodable) for a sample the loader would skip.
    """
    r, resize, upscale = cfg.resolution, cfg.resize, cfg.upscale_small
    if raw.ext not in VIDEO_EXTENSIONS:
        return decode_sample(raw, r, None, False, resize, upscale)[None]
    if cfg.frames > 1:
        frames = read_clip(raw.data, cfg.frames, cfg.frame_stride, None)
    else:
        frames = [read_frame(raw.data, None)]
    return _crop_frames(frames, r, None, False, resize, upscale)


class _Stream(Lane):
    """One of a lane's two streams (`kind` clips or images): the lane's units through its own seeded
    shuffle buffer, with its own cursor; batches of clips or of one-frame clips."""

    def __init__(self, ds: _ClipStream, epoch: int, lane: int, units: list[ShardUnit], skip: int, kind: str):
        self.kind = kind
        self.short = BadTally()
        # read-level problems counted by one stream only (see the module docstring)
        self.counts_reads = kind == "clips" or ds.frames == 1
        super().__init__(ds, epoch, lane, units, skip)
        self.short.take()

    def _pass(self) -> Iterator[Any]:
        ds, kind = self.ds, self.kind
        units = list(self.units)
        random.Random(seed_of(ds.seed, kind, "units", self.epoch, ds.rank, self.lane, self.pass_no)).shuffle(
            units
        )
        tally = self.tally if self.counts_reads else BadTally()
        raws = (
            raw
            for u in units
            for raw in read_unit(u, tally, media=MEDIA)
            if kind == "images" or raw.ext in VIDEO_EXTENSIONS
        )
        rng = random.Random(seed_of(ds.seed, kind, "buffer", self.epoch, ds.rank, self.lane, self.pass_no))
        return shuffled(raws, ds.shuffle_buffer, rng)

    def _decode(self, raw, seed: int) -> np.ndarray:
        ds = self.ds
        if raw.ext not in VIDEO_EXTENSIONS:  # an image: a one-frame clip
            rng = random.Random(seed)
            return decode_sample(raw, ds.resolution, rng, ds.flip, ds.resize, ds.upscale)[None]
        if self.kind == "images":
            frames = [read_frame(raw.data, random.Random(seed))]
        else:
            frames = read_clip(raw.data, ds.frames, ds.stride, random.Random(seed))
        return _crop_frames(frames, ds.resolution, seed, ds.flip, ds.resize, ds.upscale)

    def next_batch(self) -> dict[str, Any]:
        ds, arrays, keys = self.ds, [], []
        while len(arrays) < ds.batch_size:
            raw = self._next_raw()
            seed = seed_of(ds.seed, self.kind, "crop", self.epoch, ds.rank, self.lane, self.cursor)
            try:
                arrays.append(self._decode(raw, seed))
            except Unusable as b:
                if b.kind == TOO_SMALL:
                    self.small.add(b.kind, raw.url, raw.key, b.detail)
                    self.largest_small = max(self.largest_small, b.short_side)
                else:
                    self.tally.add(b.kind, raw.url, raw.key, b.detail)
                continue
            except VideoError as v:
                (self.short if v.kind == TOO_SHORT else self.tally).add(v.kind, raw.url, raw.key, v.detail)
                continue
            keys.append(f"{raw.url}#{raw.key}")
            self.good_in_pass += 1
        meta = {"samples": len(arrays), "bad": self.tally.take(), "small": self.small.take()}
        return {"clips": _to_clips(arrays), "keys": keys, "_meta": {**meta, "short": self.short.take()}}


class _LanePair:
    """A lane of one epoch: its clip and image streams, each started (and replayed) when first used."""

    def __init__(self, ds: _ClipStream, epoch: int, lane: int, units: list[ShardUnit], skips: list[int]):
        self.ds, self.epoch, self.lane, self.units, self.skips = ds, epoch, lane, units, skips
        self.streams: dict[str, _Stream] = {}

    def next_batch(self, kind: str) -> dict[str, Any]:
        if kind not in self.streams:
            k = KINDS.index(kind)
            self.streams[kind] = _Stream(self.ds, self.epoch, self.lane, self.units, self.skips[k], kind)
        batch = self.streams[kind].next_batch()
        cursors = [self.streams[k].cursor if k in self.streams else s for k, s in zip(KINDS, self.skips)]
        batch["_meta"]["cursor"] = cursors
        batch["frames"] = batch["clips"].shape[2]
        return batch


def batch_frames(cfg: DataConfig, seed: int, epoch: int, index: int) -> int:
    """T of batch `index` of `epoch`: data.frames, or 1 for an image batch (seeded; the same on all ranks)."""
    if cfg.frames == 1:
        return 1
    draw = random.Random(seed_of(seed, "batch frames", epoch, index)).random()
    return 1 if draw < cfg.image_fraction else cfg.frames


class _ClipStream(TrainStream):
    """The endless per-rank clip batch stream; one copy per DataLoader worker."""

    def __init__(self, urls, counts, cfg: DataConfig, rank, world_size, seed, bpe, start: torch.Tensor):
        super().__init__(urls, counts, cfg, rank, world_size, seed, bpe, start)
        self.cfg, self.frames, self.stride = cfg, cfg.frames, cfg.frame_stride

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        assert n == self.lanes, (n, self.lanes)
        P = self.batches_per_epoch
        g0, cursors = int(self.start[0]), self.start[1:].view(n, len(KINDS)).tolist()
        g, lane = g0 + worker, None
        while True:
            epoch, i = divmod(g, P)
            if lane is None or lane.epoch != epoch:
                skips = cursors[i % n] if epoch == g0 // P else [0] * len(KINDS)
                lane = _LanePair(self, epoch, i % n, self.plan(epoch)[i % n], skips)
            kind = "images" if batch_frames(self.cfg, self.seed, epoch, i) == 1 else "clips"
            try:
                batch = lane.next_batch(kind)
            except LaneStop as e:
                why = ""
                if kind == "clips":
                    span = clip_span(self.frames, self.stride)
                    why = f" (clips need a video member of at least {span} frames: data.frames={self.frames}"
                    why += f" at data.frame_stride={self.stride})"
                yield {"_error": f"{e}{why}"}
                return
            batch["_meta"].update(epoch=epoch, index=i, lane=i % n)
            yield batch
            g += n


class _ClipBadLog(BadLog):
    """BadLog with videos too short for the clip counted apart, as too_short."""

    def add(self, meta: dict[str, Any]) -> None:
        short = meta["short"]
        if short["first"] and not self.counts[TOO_SHORT]:
            log.warning(
                "%s: skipped a video too short for data.frames=%d at data.frame_stride=%d (%s); such videos "
                "are counted as data/too_short, not as bad data",
                self.what,
                self.cfg.frames,
                self.cfg.frame_stride,
                short["first"],
            )
        self.counts[TOO_SHORT] += sum(short["kinds"].values())
        super().add(meta)

    def read(self) -> int:
        return super().read() + self.counts[TOO_SHORT]

    def counters(self) -> dict[str, int]:
        return {**super().counters(), TOO_SHORT: self.counts[TOO_SHORT]}


class ClipLoader(ResumableLoader):
    """Endless, deterministic, resumable clip batches for one rank (see the module docstring):
    {"clips": float32 (B, 3, T, R, R) in [-1, 1], "frames": T, "keys": [...]}.

    `epoch` and `batch` are the position: batches of `epoch` consumed so far. Position, state and close are
    lanes.ResumableLoader's, which the image loader shares; a lane keeps one cursor per stream (KINDS).
    """

    kind = "clips"
    streams = len(KINDS)

    def __init__(
        self, urls, counts, cfg: DataConfig, rank: int, world_size: int, seed: int, batches_per_epoch: int
    ):
        super().__init__(cfg, rank, world_size, seed, batches_per_epoch)
        self._dataset = _ClipStream(urls, counts, cfg, rank, world_size, seed, batches_per_epoch, self._start)
        self._loader = dataloader(self._dataset, cfg.workers, persistent=True, seed=seed)
        self._bad = _ClipBadLog(cfg, f"data.train (rank {rank})")

    def _layout(self) -> dict[str, Any]:
        c = self.cfg
        clip = {"frames": c.frames, "frame_stride": c.frame_stride, "image_fraction": c.image_fraction}
        return {**super()._layout(), **clip}

    def _replayed_cursors(self, epoch: int, batch: int) -> list[list[int]]:
        """Lane l made batches l, l + W, ... below `batch`, each from the stream its T says."""
        cursors = self._zero_cursors()
        for i in range(batch):
            kind = 0 if batch_frames(self.cfg, self.seed, epoch, i) > 1 else 1
            cursors[i % self.lanes][kind] += self.cfg.batch_size
        return cursors


class _ClipValStream(ValStream):
    """One pass over this rank's share of the val shards: clips from each video's first frame, center crops;
    a short last batch per lane. With data.frames > 1 image samples are passed over (a batch has one T)."""

    def __init__(self, urls, counts, cfg: DataConfig, rank: int, world_size: int):
        super().__init__(urls, counts, cfg, rank, world_size)
        self.cfg, self.frames, self.stride, self.flip = cfg, cfg.frames, cfg.frame_stride, False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        lane = info.id if info else 0
        plan = plan_lanes(self.urls, self.counts, self.world_size * self.lanes, list(range(len(self.urls))))
        tally, small, short, arrays, keys = BadTally(), BadTally(), BadTally(), [], []
        for raw in (
            raw for u in plan[self.rank * self.lanes + lane] for raw in read_unit(u, tally, media=MEDIA)
        ):
            if self.frames > 1 and raw.ext not in VIDEO_EXTENSIONS:
                continue
            try:
                arrays.append(self._decode(raw))
            except Unusable as b:
                (small if b.kind == TOO_SMALL else tally).add(b.kind, raw.url, raw.key, b.detail)
                continue
            except VideoError as v:
                (short if v.kind == TOO_SHORT else tally).add(v.kind, raw.url, raw.key, v.detail)
                continue
            keys.append(f"{raw.url}#{raw.key}")
            if len(arrays) == self.batch_size:
                yield self._clip_batch(arrays, keys, tally, small, short)
                arrays, keys = [], []
        if arrays or tally.kinds or small.kinds or short.kinds:
            yield self._clip_batch(arrays, keys, tally, small, short)

    def _decode(self, raw) -> np.ndarray:
        return center_clip(raw, self.cfg)

    def _clip_batch(self, arrays, keys, tally: BadTally, small: BadTally, short: BadTally) -> dict[str, Any]:
        r = self.resolution
        clips = _to_clips(arrays) if arrays else torch.empty(0, 3, self.frames, r, r)
        meta = {"samples": len(arrays), "bad": tally.take(), "small": small.take(), "short": short.take()}
        return {"clips": clips, "frames": self.frames, "keys": keys, "count": len(arrays), "_meta": meta}


class ClipValLoader:
    """Finite validation clips for one rank; across ranks every good val clip appears exactly once.

    Each batch: "clips" float32 (n, 3, T, R, R), T = data.frames, the first T frames at data.frame_stride of
    each video, center-cropped; "count" n (<= batch_size; the last batch of a lane is short), "keys".
    """

    def __init__(self, urls, counts, cfg: DataConfig, rank: int, world_size: int):
        self.cfg, self.rank = cfg, rank
        self._dataset = _ClipValStream(urls, counts, cfg, rank, world_size)
        self._loader = dataloader(self._dataset, cfg.workers, persistent=False, seed=0)
        self._bad = _ClipBadLog(cfg, f"data.val (rank {rank})")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._bad = _ClipBadLog(self.cfg, f"data.val (rank {self.rank})")
        for item in iterate(self._loader):
            self._bad.add(item.pop("_meta"))
            if item["count"]:
                yield item
        self._bad.check(epoch_end=True)

    def counters(self) -> dict[str, int]:
        """Samples, bad samples (by kind), too_small and too_short of the latest pass on this rank."""
        return self._bad.counters()


def build_clip_val_loader(
    cfg: DataConfig, rank: int | None = None, world_size: int | None = None
) -> ClipValLoader:
    """The clip validation loader of this rank over cfg.val (finite, exact, center crops, first frames)."""
    rank, world_size = rank_world(rank, world_size)
    if not cfg.val:
        raise DataError("data.val is empty: no validation shards")
    urls = expand_shards(cfg.val, "val")
    return ClipValLoader(urls, shard_counts(urls, scan=False), cfg, rank, world_size)


def build_clip_loader(
    cfg: DataConfig, rank: int | None = None, world_size: int | None = None, seed: int = 0
) -> ClipLoader:
    """The clip training loader of this rank over cfg.train; DataError if shards are missing or too few."""
    rank, world_size = rank_world(rank, world_size)
    urls = expand_shards(cfg.train, "train")
    counts = shard_counts(urls, scan=cfg.batches_per_epoch == 0)
    bpe = cfg.batches_per_epoch or int(sum(counts.values())) // (world_size * cfg.batch_size)
    if bpe == 0:
        raise DataError(
            f"data.train has {int(sum(counts.values()))} samples in {len(urls)} shards ({urls[0]} ...): "
            f"fewer than one batch per rank ({world_size} ranks x data.batch_size={cfg.batch_size})"
        )
    log.info(
        f"data.train: {len(urls)} shards, {bpe} batches of {cfg.batch_size} clips of {cfg.frames} frames "
        f"(stride {cfg.frame_stride}, {cfg.image_fraction:.0%} image batches) per rank per epoch "
        f"(rank {rank} of {world_size}, {cfg.workers} workers)"
    )
    return ClipLoader(urls, counts, cfg, rank, world_size, seed, bpe)
