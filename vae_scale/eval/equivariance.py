"""Spatial transforms applied alike to a latent and to its image, for the diffusability regularisers.

Two loss terms (vae_scale/train/objective.py) and one metric (vae_scale/eval/metrics.py) decode a transformed
latent T(z) and compare it with the equally transformed image T(x):

- scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"): T is a 2x or
  4x downsampling, a box average (torch's `area` mode: the mean of each 2x2 or 4x4 block; for a factor of 2
  it equals bilinear interpolation, which lands exactly between the pixels it averages);
- EQ-VAE (Kouzelis et al. 2025): T is one of a scaling by s in [eq_scale_min, 1) (bilinear, antialiased, so
  that the image, scaled by the same factor, does not alias), a rotation by 90/180/270 degrees, or a
  horizontal or vertical flip.

A transform is defined on the latent's grid: a latent of h x w scaled by s becomes h' x w' with
h' = max(1, floor(h * s)) (h // factor for a downsampling), and the image of f*h x f*w pixels (f the model's
downsampling factor) becomes f*h' x f*w', so the decoded size always equals the target's. `apply(t, unit)`
takes the number of pixels per latent position: 1 for latents, f for images. Outputs keep the input's memory
layout (NCHW or channels_last).

    transforms = draw_transforms(cfg.loss, seed=cfg.train.seed, step=step, micro=micro)   # {"se": ..., ...}
    z_t = transforms["se"].apply(z)          # (B, C, h', w')
    x_t = transforms["se"].apply(x, unit=8)  # (B, 3, 8h', 8w')
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vae_scale.config import LossConfig
from vae_scale.eval.reconstruction import psnr
from vae_scale.eval.registry import Batch, Metric, Sums, TableInfo, register_metric

KINDS = ("down", "scale", "rotate", "flip")
TERMS = ("se", "eq")
"""Loss terms that decode transformed latents: se (scale equivariance) and eq (EQ-VAE)."""


@dataclass(frozen=True)
class Transform:
    """One spatial transform: a downsampling, a scaling, a rotation or a flip (see the module docstring)."""

    kind: str
    """down | scale | rotate | flip."""
    factor: int = 1
    """down: the downsampling factor (2 or 4)."""
    scale: float = 1.0
    """scale: the factor s in (0, 1] applied to the latent's size (floored, at least 1)."""
    turns: int = 0
    """rotate: counter-clockwise quarter turns (1, 2, 3)."""
    axis: str = "h"
    """flip: h (left-right) | v (upside down)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"transform kind {self.kind!r} is not one of {' | '.join(KINDS)}")
        if self.kind == "down" and self.factor < 1:
            raise ValueError(f"downsampling factor must be >= 1, got {self.factor}")
        if self.kind == "scale" and not 0.0 < self.scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {self.scale}")
        if self.kind == "rotate" and self.turns not in (1, 2, 3):
            raise ValueError(f"rotation must be 1, 2 or 3 quarter turns, got {self.turns}")
        if self.kind == "flip" and self.axis not in ("h", "v"):
            raise ValueError(f"flip axis must be h or v, got {self.axis!r}")

    @property
    def name(self) -> str:
        """A short label: down2, scale0.62, rot90, hflip."""
        if self.kind == "down":
            return f"down{self.factor}"
        if self.kind == "scale":
            return f"scale{self.scale:.2f}"
        if self.kind == "rotate":
            return f"rot{90 * self.turns}"
        return f"{self.axis}flip"

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """The transformed size of an h x w latent."""
        if self.kind == "down":
            return max(1, h // self.factor), max(1, w // self.factor)
        if self.kind == "scale":
            # The tiny epsilon keeps floor(h * s) exact when h * s is an integer up to rounding (0.75 * 4).
            return max(1, math.floor(h * self.scale + 1e-9)), max(1, math.floor(w * self.scale + 1e-9))
        if self.kind == "rotate" and self.turns % 2:
            return w, h
        return h, w

    def apply(self, t: torch.Tensor, unit: int = 1) -> torch.Tensor:
        """The transform of a (B, C, H, W) batch with `unit` pixels per latent position (1 for a latent).

        H and W must be multiples of unit. Same dtype; the input's memory layout (channels_last stays so).
        """
        if t.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(t.shape)}")
        H, W = t.shape[-2:]
        if H % unit or W % unit:
            raise ValueError(f"size {H}x{W} is not a multiple of {unit} pixels per latent position")
        if self.kind in ("down", "scale"):
            h, w = self.latent_size(H // unit, W // unit)
            size = (h * unit, w * unit)
            if size == (H, W):
                return t
            # Resampled in float32 at least: the antialiased kernel has no CPU bf16/fp16 version.
            t32 = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
            if self.kind == "down":
                out = F.interpolate(t32, size=size, mode="area")
            else:
                out = F.interpolate(t32, size=size, mode="bilinear", align_corners=False, antialias=True)
            out = out.to(t.dtype)
        elif self.kind == "rotate":
            out = torch.rot90(t, self.turns, dims=(-2, -1))
        else:
            out = torch.flip(t, dims=(-1,) if self.axis == "h" else (-2,))
        return _layout_of(t, out)


def _layout_of(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` made contiguous in the memory layout of `ref` (rot90 and flip return views or NCHW copies)."""
    if ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


EVAL_TRANSFORMS: dict[str, Transform] = {
    "down2": Transform("down", factor=2),
    "down4": Transform("down", factor=4),
    "scale": Transform("scale", scale=0.75),
    "rotate": Transform("rotate", turns=1),
    "flip": Transform("flip", axis="h"),
}
"""The transforms the `equivariance` metric measures, one per family: the scale-equivariance term's two
downsamplings, and EQ-VAE's scaling (by 0.75, mid-range), rotation (by 90 degrees) and flip (left-right)."""


# --------------------------------------------------------------------------------------------------------
# The transforms of one training micro-batch


def _generator(seed: int, step: int, micro: int, term: str) -> random.Random:
    """A generator that depends on (seed, step, micro-batch, term) only: the same on every rank and after
    a resume, and independent of the global RNG (which differs per rank and feeds the posterior noise)."""
    digest = hashlib.blake2b(repr((seed, step, micro, term)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def draw_transforms(cfg: LossConfig, seed: int, step: int, micro: int = 0) -> dict[str, Transform]:
    """The transformed decodes of a micro-batch: {"se": Transform, "eq": Transform}, each present when its
    term is on (weight > 0) and drawn with its probability; often empty.

    se: a downsampling by a factor from loss.se_factors. eq: a family from loss.eq_transforms, then a
    scale uniform in [eq_scale_min, 1), 1-3 quarter turns, or a flip axis. Each term has its own generator,
    so turning one on does not change what the other draws.
    """
    out: dict[str, Transform] = {}
    if cfg.se_weight > 0:
        rng = _generator(seed, step, micro, "se")
        if rng.random() < cfg.se_prob:
            out["se"] = Transform("down", factor=rng.choice(cfg.se_factors))
    if cfg.eq_weight > 0:
        rng = _generator(seed, step, micro, "eq")
        if rng.random() < cfg.eq_prob:
            family = rng.choice(cfg.eq_transforms)
            if family == "scale":
                out["eq"] = Transform("scale", scale=rng.uniform(cfg.eq_scale_min, 1.0))
            elif family == "rotate":
                out["eq"] = Transform("rotate", turns=rng.choice((1, 2, 3)))
            else:
                out["eq"] = Transform("flip", axis=rng.choice(("h", "v")))
    return out


@dataclass
class TransformedDecode:
    """A decode of a transformed latent, for a loss term: its target is the image under the same transform."""

    term: str
    """se | eq."""
    transform: Transform
    x_hat: torch.Tensor
    """decode(T(z)): (B, C, f*h', f*w')."""
    unit: int
    """Pixels per latent position (the model's downsampling factor)."""

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """T(x) for the input batch x: the same size as x_hat."""
        return self.transform.apply(x, self.unit)


# --------------------------------------------------------------------------------------------------------
# The metric


@register_metric("equivariance")
class Equivariance(Metric):
    """`equivariance/<family>`: PSNR (dB) of decode(T(z)) against T(x), z the posterior mean, for each
    transform of EVAL_TRANSFORMS. A decoder that commutes with T scores its plain reconstruction PSNR."""

    higher_is_better = True
    table_position = 100
    refuses_clips = "its transforms (scalings, rotations, flips) are defined on an image's latent grid"

    def sums(self) -> dict[str, tuple[int, ...]]:
        return {name: () for name in EVAL_TRANSFORMS}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        f, z, x = self.setup.vae.config.downsample_factor, batch.latent, batch.images
        for name, t in EVAL_TRANSFORMS.items():
            x_t = self.setup.decode(t.apply(z)).clamp(-1, 1)
            sums[name] += psnr(x_t, t.apply(x, f)).double().sum()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        return {f"equivariance/{name}": float(total[name]) / samples for name in EVAL_TRANSFORMS}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        return [
            (f"equivariance PSNR, {key.split('/', 1)[1]} (dB)", f"{results[key]:.2f}")
            for key in sorted(k for k in results if k.startswith("equivariance/"))
        ]
