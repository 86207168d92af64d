"""Spectra of latents and images: the 2D DCT, the radially averaged spectrum, the high-frequency share.

Skorokhodov et al. (2025) found that the latents of modern autoencoders carry far more high-frequency energy
than RGB images do, which a diffusion model (generating coarse to fine) finds hard to learn. These are the
numbers that show it, for any (B, C, H, W) batch of latents or images:

- the orthonormal 2D DCT-II of each channel, C[u, v] (u along the height, v along the width);
- the normalised radial frequency rho(u, v) = sqrt((u / H)^2 + (v / W)^2) / sqrt(2), in [0, 1): u / H is the
  frequency along the height as a fraction of the Nyquist frequency, so a latent and its image, at their
  own resolutions, share one axis;
- the DC coefficient C[0, 0] (an image's mean, times sqrt(HW)) is left out of everything: a channel's offset
  says nothing of its spatial frequencies;
- high-frequency share: the energy (sum of C^2) at rho >= 0.5 over all the (non-DC) energy. White noise has
  about 0.6 (the share of coefficients there), natural photographs a few percent;
- the radially averaged spectrum: the mean energy per coefficient in BINS equal bins of rho, divided by the
  mean energy per coefficient over all of them: 1 in every bin for white noise, falling for smooth images.

Clips are spectra of their frames: a clip's frames (and its latent's frames) join the pool as images.

Images are pooled, not averaged: the sums of energy over every image come first, the ratios after, so
`spectrum_sums` returns float64 sums that ranks add up (one all-reduce) and images of any size can join.
"""

from __future__ import annotations

import math

import torch

from vae_scale.eval.registry import Batch, Metric, Sums, TableInfo, fold_frames, indexed, register_metric

BINS = 16
"""Radial frequency bins of the averaged spectrum (some stay empty for latents under 16 x 16)."""
HF_THRESHOLD = 0.5
"""The high-frequency share counts the energy at normalised radial frequency rho >= this."""

_DCT_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def dct_matrix(
    n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n, n): D @ x is the DCT of the column x, D @ D.T = I.

    D[k, i] = s_k cos(pi (2i + 1) k / (2n)), s_0 = sqrt(1/n), s_k = sqrt(2/n) (scipy's dct(norm="ortho")).
    """
    key = (n, str(device), dtype)
    if key not in _DCT_CACHE:
        k = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(n, dtype=torch.float64)[None, :]
        d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        d[0] /= math.sqrt(2.0)
        _DCT_CACHE[key] = d.to(device=device, dtype=dtype)
    return _DCT_CACHE[key]


def dct2(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal 2D DCT-II over the last two dimensions (..., H, W); float32 for lower precisions."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    h, w = x.shape[-2:]
    return dct_matrix(h, x.device, x.dtype) @ x @ dct_matrix(w, x.device, x.dtype).T


def radial_frequency(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """rho(u, v) = sqrt((u / h)^2 + (v / w)^2) / sqrt(2) of an h x w DCT, shape (h, w), float64, in [0, 1)."""
    u = torch.arange(h, dtype=torch.float64, device=device)[:, None] / h
    v = torch.arange(w, dtype=torch.float64, device=device)[None, :] / w
    # Radii that fall exactly on a bin edge or on HF_THRESHOLD (u = v = h/2) count above it, whatever the
    # rounding of sqrt: the nudge is far below the spacing of any two distinct radii.
    return (u.square() + v.square()).sqrt() / math.sqrt(2.0) + 1e-12


def spectrum_sums(x: torch.Tensor, bins: int = BINS) -> dict[str, torch.Tensor]:
    """Energy sums of a (B, C, H, W) batch over its images, float64, DC left out:

    energy (C, bins): sum of C[u, v]^2 over the coefficients in each bin of rho; count (bins,): how many
    coefficients each bin got, per channel, over the batch; hf (C,): the energy at rho >= HF_THRESHOLD;
    total (C,): all the energy.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    # float64, and each image's mean taken out first (it only moves the DC coefficient, which is left out):
    # a latent channel's offset can dwarf its variations, which float32 would round away.
    x = x.double()
    energy = dct2(x - x.mean((2, 3), keepdim=True)).square().sum(0).reshape(C, H * W)  # (C, HW)
    rho = radial_frequency(H, W, x.device).reshape(-1)
    keep = torch.ones_like(rho, dtype=torch.bool)
    keep[0] = False  # DC
    index = (rho * bins).floor().long().clamp(max=bins - 1)[keep]
    kept = energy[:, keep]
    binned = torch.zeros(C, bins, dtype=torch.float64, device=x.device).index_add_(1, index, kept)
    count = torch.bincount(index, minlength=bins).double() * B
    hf = kept[:, rho[keep] >= HF_THRESHOLD].sum(1)
    return {"energy": binned, "count": count, "hf": hf, "total": kept.sum(1)}


def hf_share(hf: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """High-frequency energy over all (non-DC) energy; 0 where there is no energy at all."""
    return torch.where(total > 0, hf / total.clamp_min(1e-300), torch.zeros_like(total))


def radial_spectrum(energy: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean energy per coefficient in each bin over the mean over all bins, (bins,); NaN in empty bins.

    energy: (bins,) or (C, bins), summed over channels first; count: (bins,) coefficients per channel.
    """
    energy = energy.reshape(-1, energy.shape[-1]).sum(0)  # the channel count cancels in the ratio
    mean_all = energy.sum() / count.sum().clamp_min(1)
    out = energy / count.clamp_min(1) / mean_all.clamp_min(1e-300)
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


def bin_centres(bins: int = BINS) -> list[float]:
    """The normalised radial frequency at the middle of each bin."""
    return [(k + 0.5) / bins for k in range(bins)]


# --------------------------------------------------------------------------------------------------------
# The metric


@register_metric("spectrum")
class Spectrum(Metric):
    """How much high-frequency energy the latents (posterior means) carry next to the images:
    `latent_hf_share` (and per channel, `latent_hf_share/<c>`) and `rgb_hf_share`, and the radially averaged
    spectra `spectrum/latent/<k>` and `spectrum/rgb/<k>` (bin k of BINS, empty bins left out), normalised
    so that white noise is 1 everywhere."""

    higher_is_better = None  # lower latent_hf_share is easier to diffuse, but it describes, not scores
    table_position = 90

    def sums(self) -> dict[str, tuple[int, ...]]:
        C = self.setup.vae.config.latent_channels
        return {
            "latent_energy": (C, BINS),
            "latent_count": (BINS,),
            "latent_hf": (C,),
            "latent_total": (C,),
            "rgb_energy": (BINS,),
            "rgb_count": (BINS,),
            "rgb_hf": (),
            "rgb_total": (),
        }

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        # a clip's frames (and its latent's frames) are pooled as images: the spectra are spatial
        for side, t in (("latent", fold_frames(batch.mean)), ("rgb", batch.frame_images)):
            parts = spectrum_sums(t)
            sums[f"{side}_energy"] += parts["energy"] if side == "latent" else parts["energy"].sum(0)
            sums[f"{side}_count"] += parts["count"]
            for name in ("hf", "total"):
                sums[f"{side}_{name}"] += parts[name] if side == "latent" else parts[name].sum()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        out = {"latent_hf_share": float(hf_share(total["latent_hf"].sum(), total["latent_total"].sum()))}
        per_channel = hf_share(total["latent_hf"], total["latent_total"])
        out.update({f"latent_hf_share/{c}": float(v) for c, v in enumerate(per_channel)})
        out["rgb_hf_share"] = float(hf_share(total["rgb_hf"], total["rgb_total"]))
        for side in ("latent", "rgb"):
            curve = radial_spectrum(total[f"{side}_energy"], total[f"{side}_count"])
            out.update({f"spectrum/{side}/{k}": float(v) for k, v in enumerate(curve) if not math.isnan(v)})
        return out

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        if "latent_hf_share" not in results:
            return []
        rows = [("high-frequency share, latent", f"{results['latent_hf_share']:.4f}")]
        per = indexed(results, "latent_hf_share/")
        rows.append(("  per latent channel", " ".join(f"{v:.3f}" for v in per)))
        rows.append(("high-frequency share, RGB", f"{results['rgb_hf_share']:.4f}"))
        for side in ("latent", "rgb"):
            curve = indexed(results, f"spectrum/{side}/")
            rows.append((f"spectrum, {side} (by frequency)", " ".join(f"{v:.3g}" for v in curve)))
        return rows
