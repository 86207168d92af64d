"""Tiled encode and decode: the Tiling a caller asks for, and diffusers' per-tile pass with blended overlaps
(norm="tile"); the whole-image-statistics pass (norm="image") is vae_scale/models/tiled.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------------------
# Tiled encode and decode


@dataclass(frozen=True)
class Tiling:
    """Encode and decode tile by tile: whole-image GroupNorm statistics by default, or diffusers' tiles.

    tile: tile size in image pixels (0: the model's sample_size, diffusers' threshold). Inputs no larger
    than one tile are not tiled, so their result equals the untiled one exactly.

    norm="image" (default): the network runs layer by layer, each layer tile by tile; every GroupNorm
    normalises with the whole image's statistics, gathered over the tiles, convolutions read their halo
    from the neighbouring tiles and the mid-block attention sees the whole latent (vae_scale/models/tiled.py),
    so the result equals the untiled one to rounding. Tiles do not overlap (overlap is not used); the tile
    must be a whole number of latent positions. Between layers the whole image's activations wait in host
    memory when `offload` and the model is on an accelerator (the device holds one tile's window of a
    layer and the lowest-resolution activation for attention; host memory holds what an untiled pass
    would), else on the model's device.

    norm="tile": diffusers' AutoencoderKL after enable_tiling(): each tile runs the whole encoder or
    decoder alone. overlap: the fraction of a tile shared with the next one (diffusers: 0.25). Tiles start
    every tile * (1 - overlap) pixels (the same in latent positions for decode); each result tile is
    blended linearly into the one above and the one to its left over tile * overlap rows / columns, then
    cropped to the stride. Every memory is that of one tile; tiles differ from the whole image in their
    GroupNorm statistics and the mid-block attention's reach, so the result is close to, not equal to,
    the untiled one (a grid of per-tile colour offsets, softened by the blending).
    """

    tile: int = 0
    overlap: float = 0.25
    norm: str = "image"
    offload: bool = True

    def geometry(self, factor: int, sample_size: int) -> tuple[int, int, int]:
        """(tile, stride, blend extent) in image pixels for a model with this downsampling factor; the
        same divided by `factor` in latent positions (norm="image": no overlap, no blending). ValueError
        when they are not whole latent positions."""
        tile = self.tile or sample_size
        if self.norm not in ("image", "tile"):
            raise ValueError(f"tiling norm must be 'image' or 'tile', got {self.norm!r}")
        if self.norm == "image":
            if tile % factor or tile <= 0:
                raise ValueError(
                    f"tile {tile} px: tiles must cover a whole number of latent positions ({factor} px each)"
                )
            return tile, tile, 0
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tiling overlap must be in [0, 1), got {self.overlap}")
        latent = tile // factor
        stride, extent = int(latent * (1 - self.overlap)), int(latent * self.overlap)
        # diffusers computes the pixel and latent strides separately; they agree only on whole positions
        if (
            tile % factor
            or stride == 0
            or stride + extent != latent
            or int(tile * (1 - self.overlap)) != stride * factor
        ):
            raise ValueError(
                f"tile {tile} px with overlap {self.overlap}: tiles must cover a whole number of latent "
                f"positions ({factor} px each) and so must their overlap, e.g. a tile of "
                f"{factor * max(4, round(latent / 4) * 4)} px"
            )
        return tile, stride * factor, extent * factor


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Blend b's first `extent` rows (dim 2) or columns (dim 3) with a's last ones in place: b's weight goes
    0, 1/e, ..., (e-1)/e (diffusers' blend_v / blend_h, in one step)."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e == 0:
        return
    w = torch.arange(e, dtype=torch.float64, device=b.device) / e
    shape = (1, 1, e, 1) if dim == 2 else (1, 1, 1, e)
    keep, take = (1 - w).to(b.dtype).view(shape), w.to(b.dtype).view(shape)
    head = b.narrow(dim, 0, e)
    head.copy_(a.narrow(dim, a.shape[dim] - e, e) * keep + head * take)


def tiled_apply(fn, x: torch.Tensor, tile: int, stride: int, out_tile: int, out_extent: int) -> torch.Tensor:
    """fn over overlapping tiles of x (B, C, H, W), blended and stitched (diffusers' tiled_encode/decode).

    tile, stride: in x's positions; out_tile, out_extent: a full tile's output size and blend extent in
    the output's positions. Holds two rows of output tiles at a time besides the result.
    """
    H, W = x.shape[2:]
    limit = out_tile - out_extent
    rows, above = [], []
    for i in range(0, H, stride):
        row = []
        for j in range(0, W, stride):
            t = fn(x[:, :, i : i + tile, j : j + tile])
            if above:
                _blend(above[len(row)], t, out_extent, dim=2)
            if row:
                _blend(row[-1], t, out_extent, dim=3)
            row.append(t)
        rows.append(torch.cat([t[:, :, :limit, :limit] for t in row], dim=3))
        above = row
    return torch.cat(rows, dim=2)


def refuse_tiles(family: str, tiled, size: tuple[int, ...], factor: int, sample_size: int) -> None:
    """For a family without a tiled pass: nothing when `tiled` is off or the image (or latent: factor 1
    given with its size times the factor) fits in one tile, so a command that tiles large images by default
    still runs whole ones; NotImplementedError naming the family when tiles would be needed."""
    if tiled is False or tiled is None:
        return
    tiling = Tiling() if tiled is True else tiled
    tile = tiling.tile or sample_size
    if max(size) * factor > tile:
        raise NotImplementedError(
            f"model.family={family} has no tiled encode/decode: an image of {max(size) * factor} px does not "
            f"fit in one {tile} px tile (decode it whole, with tiling off)"
        )
