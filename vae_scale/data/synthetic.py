"""Synthetic image batches: `data.train=synthetic` for smoke tests and compute-only throughput runs.

Sample i of the global batch at step s is a smooth random pattern seeded by (seed, s, i): a run on N
processes with batch B sees exactly the images a 1-process run with batch N*B sees, which is what makes a
distributed run comparable with a single-process one, and what benchmarks need to take data loading out
of the measurement. Same interface as the shard loader (batches_per_epoch, state_dict, counters).

With frames > 1 the batches are clips, as the clip loader's: {"clips": (B, 3, T, R, R), "frames": T}, frame t
of a clip being its pattern moved t pixels right and down (a camera pan, wrapping round), and the batches
that are images (T = 1) those of the clip loader's seeded schedule (clip_loader.batch_frames).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from vae_scale.config import DataConfig
from vae_scale.data.clip_loader import batch_frames

SYNTHETIC = "synthetic"


def synthetic_image(seed: int, index: int, resolution: int) -> torch.Tensor:
    """A (3, R, R) image in [-1, 1]: a few random oriented sinusoids per channel plus a colour offset."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)
    coords = torch.linspace(0, 1, resolution)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    img = torch.zeros(3, resolution, resolution)
    for c in range(3):
        freq = torch.rand(3, generator=g) * 6 + 1
        angle = torch.rand(3, generator=g) * math.pi
        phase = torch.rand(3, generator=g) * 2 * math.pi
        for f, a, p in zip(freq, angle, phase):
            img[c] += torch.sin(2 * math.pi * f * (xx * torch.cos(a) + yy * torch.sin(a)) + p) / 3
        img[c] += torch.rand(1, generator=g) - 0.5
    return img.clamp(-1, 1)


class SyntheticLoader:
    """Endless deterministic batches for one rank: global sample index = (step * world + rank) * B + j."""

    def __init__(
        self,
        resolution: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        batches_per_epoch: int = 1000,
        frames: int = 1,
        image_fraction: float = 0.0,
    ):
        self.resolution, self.batch_size = resolution, batch_size
        self.frames, self.image_fraction = frames, image_fraction
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = batches_per_epoch
        self.position = 0  # batches this rank has delivered

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            first = (self.position * self.world_size + self.rank) * self.batch_size
            images = torch.stack(
                [synthetic_image(self.seed, first + j, self.resolution) for j in range(self.batch_size)]
            )
            keys = [f"synthetic#{first + j}" for j in range(self.batch_size)]
            if self.frames == 1:
                self.position += 1
                yield {"images": images, "keys": keys}
                continue
            epoch, index = divmod(self.position, self.batches_per_epoch)
            schedule = DataConfig(frames=self.frames, image_fraction=self.image_fraction)
            t = batch_frames(schedule, self.seed, epoch, index)
            clips = torch.stack([images.roll((k, k), dims=(2, 3)) for k in range(t)], dim=2)
            self.position += 1
            yield {"clips": clips, "frames": t, "keys": keys}

    def counters(self) -> dict[str, int]:
        return {"samples": self.position * self.batch_size, "bad": 0}

    def state_dict(self) -> dict[str, Any]:
        return {"synthetic": True, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        pass
