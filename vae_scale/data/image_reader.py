"""Whole images from shards for the inference commands (`encode`, `eval`): square crops, the native size,
or aspect-ratio buckets, each sample with its sidecars (captions, metadata).

    reader = ImageReader(urls, counts, shape="buckets", resolution=512, multiple=8, batch_size=8)
    for batch in reader:    # "images" float32 (n, 3, H, W) in [-1, 1], "count", "keys", "sidecars"
        ...
    reader.skipped          # Counter of samples left out, by kind (too_small, undecodable, ...)

Shapes:
- square: the short side resized to `resolution` (down only) and a center crop, exactly the validation
  reader's pixels (data.ValLoader); batches of `batch_size`.
- native: the image as stored, center-cropped to multiples of `multiple` (the model's downsampling
  factor, at most multiple - 1 pixels off each side); one image per batch, since sizes differ.
- buckets: SDXL-style aspect-ratio buckets, sizes (w, h) in multiples of `bucket_step` with w * h <=
  resolution^2 and an aspect ratio within `max_aspect`; each image goes to the bucket whose aspect ratio is
  nearest (in log ratio), is resized to cover it (down only) and center-cropped; batches of one bucket.

Images are never upscaled: one smaller than its crop or bucket is skipped and counted as too_small. The
shards are dealt to ranks and workers the way the validation reader deals them, so across processes every
sample is read exactly once; within a rank the order is fixed for a given number of workers.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

# The validation reader's dealing and square crop, so square mode reads exactly its samples and pixels.
from vae_scale.data.decode import Unusable, decode_sample
from vae_scale.data.lanes import plan_lanes
from vae_scale.data.shard_reader import BadTally, describe_error, read_unit, to_rgb

SHAPES = ("square", "native", "buckets")


def aspect_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes (w, h), multiples of `step`, area <= resolution^2, max(w/h, h/w) <= max_aspect;
    for each width the tallest height that fits, sorted by aspect ratio (w / h)."""
    if step <= 0 or resolution < step or max_aspect < 1:
        raise ValueError(f"no buckets for resolution {resolution}, step {step}, max aspect {max_aspect}")
    area, longest = resolution * resolution, int(resolution * max_aspect)
    buckets = set()
    for w in range(step, longest + 1, step):
        h = min(area // w // step * step, longest // step * step)
        if h >= step and max(w / h, h / w) <= max_aspect:
            buckets.add((w, h))
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's, in log ratio (ties: the first)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def cover_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (bicubic, down only) so the image covers width x height, then center-crop to it.

    ValueError when the image is smaller than that in either side (it would need upscaling).
    """
    w, h = img.size
    s = max(width / w, height / h)
    if s > 1:
        raise ValueError(f"{w}x{h} is smaller than the {width}x{height} bucket")
    nw, nh = max(width, round(w * s)), max(height, round(h * s))
    x0, y0 = (nw - width) // 2, (nh - height) // 2
    if (nw, nh) == (w, h):
        return img.crop((x0, y0, x0 + width, y0 + height))
    # resample only the crop's source region: the pixels of resize-then-crop, less work
    box = (x0 / s, y0 / s, min(w, (x0 + width) / s), min(h, (y0 + height) / s))
    return img.resize((width, height), Image.BICUBIC, box=box)


def native_crop(img: Image.Image, multiple: int) -> Image.Image:
    """Center crop to the largest multiples of `multiple` (ValueError if a side is below `multiple`)."""
    w, h = img.size
    cw, ch = w - w % multiple, h - h % multiple
    if not cw or not ch:
        raise ValueError(f"{w}x{h} is smaller than the model's downsampling factor {multiple}")
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img if (cw, ch) == (w, h) else img.crop((x0, y0, x0 + cw, y0 + ch))


class _Stream(IterableDataset):
    """One pass over this rank's share of the shards; per sample {"image", "key", "sidecars", "size"} or
    {"bad": kind}. One copy per DataLoader worker (a lane, as in the validation reader)."""

    def __init__(self, reader: ImageReader):
        self.r = reader

    def _decode(self, raw) -> np.ndarray:
        r = self.r
        if r.shape == "square":
            return decode_sample(raw, r.resolution, None, False, r.resize)
        try:
            img = Image.open(io.BytesIO(raw.data))
        except Exception as e:
            raise Unusable("undecodable", describe_error(e)) from None
        try:
            if r.shape == "buckets":
                bucket = nearest_bucket(*img.size, r.buckets)
                if img.format in ("JPEG", "MPO"):
                    img.draft("RGB", bucket)  # DCT-domain downscale; both sides stay >= the bucket's
                img.load()
                try:
                    img = cover_crop(to_rgb(img), *bucket)
                except ValueError as e:
                    raise Unusable("too_small", str(e)) from None
            else:
                img.load()
                try:
                    img = native_crop(to_rgb(img), r.multiple)
                except ValueError as e:
                    raise Unusable("too_small", str(e)) from None
            return np.asarray(img)
        except Unusable:
            raise
        except Exception as e:
            raise Unusable("undecodable", describe_error(e)) from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        r = self.r
        info = get_worker_info()
        lane = info.id if info else 0
        plan = plan_lanes(r.urls, r.counts, r.world * r.lanes, list(range(len(r.urls))))
        tally = BadTally()
        for unit in plan[r.rank * r.lanes + lane]:
            for raw in read_unit(unit, tally, sidecars=r.sidecars):
                try:
                    array = self._decode(raw)
                except Unusable as b:
                    yield {"bad": b.kind, "n": 1, "detail": f"{raw.url}#{raw.key}: {b.detail}"}
                    continue
                yield {
                    "image": torch.from_numpy(array.copy()),
                    "key": f"{raw.url}#{raw.key}",
                    "sidecars": raw.sidecars,
                }
            for kind, n in tally.take()["kinds"].items():  # no image, empty, truncated shard, ...
                yield {"bad": kind, "n": n, "detail": unit.url}


def _batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    images = torch.stack([it["image"] for it in items]).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return {
        "images": images.contiguous(),
        "count": len(items),
        "keys": [it["key"] for it in items],
        "sidecars": [it["sidecars"] for it in items],
    }


class ImageReader:
    """Finite batches of whole images from shards for one rank (see the module docstring).

    urls, counts: the shards (shard_reader.expand_shards) and their sample counts (shard_reader.shard_counts,
    or None).
    limit > 0 stops after that many images on this rank. `skipped` counts what was left out, by kind, and
    `first_skipped` describes the first one.
    """

    def __init__(
        self,
        urls: list[str],
        counts: dict[str, float] | None,
        *,
        shape: str = "square",
        resolution: int = 256,
        multiple: int = 8,
        batch_size: int = 8,
        bucket_step: int = 64,
        max_aspect: float = 2.0,
        resize: bool = True,
        workers: int = 0,
        rank: int = 0,
        world: int = 1,
        limit: int = 0,
        sidecars: bool = False,
    ):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        self.urls, self.counts, self.shape = urls, counts, shape
        self.resolution, self.multiple, self.batch_size, self.resize = (
            resolution,
            multiple,
            batch_size,
            resize,
        )
        self.buckets = aspect_buckets(resolution, bucket_step, max_aspect) if shape == "buckets" else []
        if any(w % multiple or h % multiple for w, h in self.buckets):
            raise ValueError(
                f"bucket step {bucket_step} is not a multiple of the downsampling factor {multiple}"
            )
        self.workers, self.lanes = workers, max(workers, 1)
        self.rank, self.world, self.limit, self.sidecars = rank, world, limit, sidecars
        self.skipped: Counter[str] = Counter()
        self.first_skipped: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped, self.first_skipped = Counter(), None
        loader = DataLoader(_Stream(self), batch_size=None, num_workers=self.workers, in_order=True)
        pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
        taken = 0
        for item in loader:
            if "bad" in item:
                self.skipped[item["bad"]] += item["n"]
                self.first_skipped = self.first_skipped or f"{item['bad']}: {item['detail']}"
                continue
            size = tuple(item["image"].shape[:2])
            group = pending.setdefault(size if self.shape == "buckets" else (0, 0), [])
            group.append(item)
            taken += 1
            if self.shape == "native" or len(group) == self.batch_size:
                yield _batch(group)
                group.clear()
            if self.limit and taken >= self.limit:
                break
        for group in pending.values():
            if group:
                yield _batch(group)
