"""A sample of a split's data read as the loader reads it: the first samples of a few shards, decoded with
the loader's own crop and resize, counted as usable, too small for the crop, or bad by kind. The check
before a run reads it to stop a run whose data holds nothing usable; the dry run prints its counts. With
data.frames > 1 a video member is read as the clip loader reads it (a clip of data.frames frames; a video
shorter than that is counted as too short) and an image member as a one-frame clip.
"""

from __future__ import annotations

import dataclasses
from contextlib import closing
from dataclasses import dataclass

from vae_scale.config import DataConfig
from vae_scale.data.clip_loader import MEDIA, TOO_SHORT, center_clip
from vae_scale.data.decode import TOO_SMALL, Unusable, decode_sample
from vae_scale.data.shard_reader import IMAGE_EXTENSIONS, BadTally, ShardUnit, expand_shards, read_unit
from vae_scale.data.video import VideoError

SAMPLE_SIZE = 100
"""Samples the start-up check reads (the loader judges its bad fraction once it has seen as many)."""
SAMPLE_SHARDS = 4
"""Shards they come from: the first, the last and evenly spaced ones between."""


@dataclass
class DataSample:
    """What the loader makes of the first samples of a few shards of one split: usable crops, images
    smaller than the crop (skipped unless data.upscale_small) and bad samples by kind."""

    key: str
    shards: int
    total_shards: int
    usable: int = 0
    too_small: int = 0
    small_sides: tuple[int, int] = (0, 0)
    """Smallest and largest short side of the images smaller than the crop."""
    too_short: int = 0
    """Videos with fewer frames than a clip spans (data.frames > 1)."""
    bad: dict[str, int] = dataclasses.field(default_factory=dict)
    first_bad: str | None = None

    @property
    def read(self) -> int:
        return self.usable + self.too_small + self.too_short + sum(self.bad.values())

    def line(self, resolution: int) -> str:
        """The dry-run's line: how many of each."""
        small = f"{self.too_small} smaller than the {resolution} px crop"
        if self.too_small:
            lo, hi = self.small_sides
            small += f" (short sides {lo}-{hi} px; skipped and counted as data/too_small)"
        if self.too_short:
            small += f", {self.too_short} videos shorter than a clip (counted as data/too_short)"
        bad = ", ".join(f"{k} {n}" for k, n in self.bad.items())
        return (
            f"data sample    {self.key}: {self.read} samples from {self.shards} of {self.total_shards} "
            f"shards: {self.usable} usable, {small}, {sum(self.bad.values())} bad{f' ({bad})' if bad else ''}"
        )


def read_data_sample(data: DataConfig, split: str = "train", n: int = SAMPLE_SIZE) -> DataSample:
    """Decode up to n samples from up to SAMPLE_SHARDS shards of data.<split> with the loader's own decoding
    (resolution, resize, upscale_small), counting what it would do with each."""
    spec = data.train if split == "train" else data.val
    urls = expand_shards(spec, split)
    k = min(SAMPLE_SHARDS, len(urls))
    picks = sorted({round(i * (len(urls) - 1) / max(k - 1, 1)) for i in range(k)})
    sample = DataSample(f"data.{split}", len(picks), len(urls))
    tally, per_shard, sides = BadTally(), -(-n // len(picks)), []
    clips = data.frames > 1
    media = MEDIA if clips else IMAGE_EXTENSIONS
    for index in picks:
        with closing(read_unit(ShardUnit(urls[index]), tally, media=media)) as raws:
            for taken, raw in enumerate(raws):
                if taken >= per_shard:
                    break
                try:
                    if clips:
                        center_clip(raw, data)
                    else:
                        decode_sample(raw, data.resolution, None, False, data.resize, data.upscale_small)
                    sample.usable += 1
                except Unusable as b:
                    if b.kind == TOO_SMALL:
                        sides.append(b.short_side)
                    else:
                        tally.add(b.kind, raw.url, raw.key, b.detail)
                except VideoError as v:
                    if v.kind == TOO_SHORT:
                        sample.too_short += 1
                    else:
                        tally.add(v.kind, raw.url, raw.key, v.detail)
    counted = tally.take()
    sample.too_small, sample.small_sides = len(sides), (min(sides, default=0), max(sides, default=0))
    sample.bad, sample.first_bad = counted["kinds"], counted["first"]
    return sample
