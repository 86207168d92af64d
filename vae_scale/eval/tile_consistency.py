"""tile_consistency: how far a tiled decode (and a tiled encode + decode) is from the untiled one.

For users who decode large latents tile by tile (`VAE.decode(z, tiled=Tiling(...))`, diffusers'
enable_tiling()): the PSNR in dB of the tiled reconstruction against the untiled reconstruction of the same
images, at a given tile size, as a `Tiling` (vae_scale/models/tiling.py) of eval.consistency_tile,
eval.consistency_norm and eval.consistency_overlap:

- `tile_consistency`: decode(z, tiled) against decode(z), z the (untiled) posterior mean;
- `tile_consistency/encode_decode`: decode(encode(x, tiled).mode(), tiled) against the untiled round trip;
- `tile_consistency/seam_ratio`: where the decode's error lies: its mean squared error on the pixels near a
  tile boundary (within f px of one, one latent position, f the downsampling factor) over that on the other
  pixels. About 1: the error is spread evenly; well above 1: it sits on the seams, where a per-tile pass
  (norm "tile") shows a grid. NaN when the tiles are so small that no pixel is off the seams.

Per-tile GroupNorm statistics (norm "tile", the default here, diffusers' way) give tens of dB; the
whole-image statistics of norm "image" give the untiled result to rounding: 120 dB, the ceiling of psnr
(an MSE floor of 1e-12). PSNRs are per
image, averaged; the seam ratio pools the squared errors over every image first (sums per sample, exact
across processes). Images no larger than the tile are not tiled, so they are refused (MetricError).
"""

from __future__ import annotations

import inspect

import torch

from vae_scale.eval.reconstruction import psnr
from vae_scale.eval.registry import Batch, EvalSetup, Metric, MetricError, Sums, TableInfo, register_metric
from vae_scale.models.tiling import Tiling


def default_tile(height: int, width: int, factor: int) -> int:
    """Half the shorter side, rounded down to a whole number of 4 latent positions (at least 4): a tile
    that splits the image in two or more along each side, and whose 0.25 overlap is whole positions."""
    positions = max(4, (min(height, width) // 2 // factor) // 4 * 4)
    return positions * factor


def seam_mask(height: int, width: int, stride: int, band: int) -> torch.Tensor:
    """(H, W) bool: the pixels within `band` px of a tile boundary (every `stride` px, the image's edges
    left out)."""

    def near(size: int) -> torch.Tensor:
        pos = torch.arange(size)
        lines = torch.arange(stride, size, stride)
        if len(lines) == 0:
            return torch.zeros(size, dtype=torch.bool)
        return (pos[:, None] - lines[None, :] + 0.5).abs().min(1).values < band

    return near(height)[:, None] | near(width)[None, :]


@register_metric("tile_consistency")
class TileConsistency(Metric):
    """PSNR (dB) of tiled against untiled reconstructions, and where the error lies (module docstring)."""

    higher_is_better = True
    table_position = 110
    refuses_clips = (
        "tiling is spatial, per image; the video family (wan) refuses tiles, so there is none to measure"
    )

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        takes_tiled = all(
            "tiled" in inspect.signature(getattr(setup.vae, f)).parameters for f in ("encode", "decode")
        )
        if not takes_tiled:
            raise MetricError(
                f"tile_consistency needs a model whose encode and decode take tiled= (as the model "
                f"interface's do); {type(setup.vae).__name__}'s do not"
            )
        cfg = setup.config
        self.tile, self.norm, self.overlap = (
            cfg.consistency_tile,
            cfg.consistency_norm,
            cfg.consistency_overlap,
        )

    def tiling(self, height: int, width: int) -> tuple[Tiling, int]:
        """The Tiling measured on images of height x width, and its stride in pixels."""
        vae = self.setup.vae
        f = vae.config.downsample_factor
        tiling = Tiling(
            tile=self.tile or default_tile(height, width, f),
            overlap=self.overlap,
            norm=self.norm,
            offload=False,
        )
        try:
            tile, stride, _ = tiling.geometry(f, vae.config.sample_size)
        except ValueError as e:
            raise MetricError(f"tile_consistency: eval.consistency_tile={self.tile}: {e}") from None
        if max(height, width) <= tile:
            raise MetricError(
                f"tile_consistency: images of {height}x{width} px fit in one tile of {tile} px, so nothing "
                f"is tiled; set eval.consistency_tile (--consistency-tile) below {max(height, width)}"
            )
        return tiling, stride

    def sums(self) -> dict[str, tuple[int, ...]]:
        names = ("decode", "encode_decode", "seam_sq", "seam_count", "interior_sq", "interior_count")
        return {name: () for name in names}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        setup, x = self.setup, batch.images
        vae, (H, W) = setup.vae, x.shape[-2:]
        tiling, stride = self.tiling(H, W)
        if setup.tiled:  # the pass's own reconstruction is tiled: the untiled one is computed here
            z = vae.encode(x).mode()
            untiled = vae.decode(z).float().clamp(-1, 1)
        else:
            z, untiled = batch.latent, batch.reconstruction
        decoded = vae.decode(z, tiled=tiling).float().clamp(-1, 1)
        round_trip = vae.decode(vae.encode(x, tiled=tiling).mode(), tiled=tiling).float().clamp(-1, 1)
        sums["decode"] += psnr(decoded, untiled).double().sum()
        sums["encode_decode"] += psnr(round_trip, untiled).double().sum()
        seam = seam_mask(H, W, stride, vae.config.downsample_factor).to(x.device)
        err = ((decoded - untiled) / 2).double().square().mean(1)  # (n, H, W)
        sums["seam_sq"] += err[:, seam].sum()
        sums["seam_count"] += batch.n * int(seam.sum())
        sums["interior_sq"] += err[:, ~seam].sum()
        sums["interior_count"] += batch.n * int((~seam).sum())

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        seam = float(total["seam_sq"]) / max(float(total["seam_count"]), 1.0)
        interior = float(total["interior_sq"]) / max(float(total["interior_count"]), 1.0)
        if float(total["interior_count"]) == 0 or float(total["seam_count"]) == 0:
            ratio = float("nan")  # nothing to compare with
        elif interior > 0:
            ratio = seam / interior
        else:  # no error off the seams: none at all is "even", any on them is all on them
            ratio = 1.0 if seam == 0 else float("inf")
        return {
            "tile_consistency": float(total["decode"]) / samples,
            "tile_consistency/encode_decode": float(total["encode_decode"]) / samples,
            "tile_consistency/seam_ratio": ratio,
        }

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        if "tile_consistency" not in results:
            return []
        return [
            ("tiled vs untiled decode PSNR (dB)", f"{results['tile_consistency']:.2f}"),
            ("tiled vs untiled encode+decode PSNR (dB)", f"{results['tile_consistency/encode_decode']:.2f}"),
            ("tiled decode error, seams / interior", f"{results['tile_consistency/seam_ratio']:.2f}"),
        ]
