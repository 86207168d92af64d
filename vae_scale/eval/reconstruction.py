"""The reconstruction metrics: psnr (with the bicubic baseline), mse, ssim and lpips, each of the input
against its reconstruction from the posterior mean (clamped to [-1, 1]).

- psnr: dB per image on the [0, 1] scale (peak 1), averaged over images. With the baseline (`vae-scale eval`
  asks for it with psnr) also the PSNR of bicubic through a thumbnail that keeps at least as many numbers as
  the latent (`psnr_bicubic`), and those numbers per image (`latent_values`, `bicubic_values`,
  `pixel_values`).
- mse: the mean squared error on the [0, 1] scale; part of every pass.
- ssim: scikit-image's `structural_similarity(a, b, data_range=1, channel_axis=-1)` with its defaults (7x7
  uniform window, K1 0.01, K2 0.03, sample covariance, border of 3 px left out), averaged over channels and
  images. torchmetrics' SSIM with a 7x7 uniform window differs from it by ~1e-3 (population covariance,
  reflect-padded border), so it is written here, in float64, and tested against scikit-image.
- lpips: LPIPS-VGG v0.1 (vae_scale.eval.lpips.LPIPS) from weights on local disk, never downloaded.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vae_scale.config import LossConfig
from vae_scale.eval.lpips import LPIPS, LossConfigError, find_lpips_weights
from vae_scale.eval.registry import Batch, EvalSetup, Metric, MetricError, Sums, TableInfo, register_metric

SSIM_WINDOW = 7

# --------------------------------------------------------------------------------------------------------
# psnr, and the bicubic baseline


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of (B, C, H, W) batches in [-1, 1] (peak 1 on the [0, 1] scale); shape (B,)."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def bicubic_round_trip(
    x: torch.Tensor, factor: int | None = None, *, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Downsample (antialiased bicubic) by `factor` or to a `size` (h, w) thumbnail, and back up (bicubic).

    The baseline a VAE must beat: the thumbnail keeps 3 * h * w numbers per image, its latent C * h' * w'.
    """
    h, w = x.shape[-2:]
    if size is None:
        if factor is None:
            raise ValueError("bicubic_round_trip needs a factor or a size")
        size = (h // factor, w // factor)
    small = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def equal_values_size(values: int, height: int, width: int, channels: int = 3) -> tuple[int, int]:
    """The smallest thumbnail (h, w) of an image's aspect ratio that keeps at least `values` numbers.

    channels * h * w >= values, so a baseline at this size never keeps fewer numbers than the latent it is
    compared with (exactly as many when they divide: 8 x 8 x 3 for an f8 latent of 3 channels). Capped at
    the image's own size.
    """
    for h in range(1, height + 1):
        w = max(1, round(h * width / height))
        if channels * h * w >= values:
            return h, min(w, width)
    return height, width


def compression(values: float, pixel_values: float) -> str:
    """How many times fewer numbers than the pixels: '64x', '2.8x' (one decimal unless near a whole)."""
    ratio = pixel_values / values
    return f"{ratio:.0f}x" if abs(ratio - round(ratio)) < 0.05 else f"{ratio:.1f}x"


def baseline_verdict(results: dict[str, float]) -> str:
    """One line: which has the higher PSNR, the VAE or bicubic through a thumbnail of at least its numbers."""
    vae, bic = results["psnr"], results["psnr_bicubic"]
    latent, thumb, pixels = results["latent_values"], results["bicubic_values"], results["pixel_values"]
    same = (
        f"the same {latent:,.0f} numbers per image"
        if round(thumb) == round(latent)
        else f"{thumb:,.0f} numbers per image against the latent's {latent:,.0f}"
    )
    # the winner's figure first, as the demo's verdict says it
    who = f"the VAE beats bicubic ({vae:.2f}" if vae > bic else f"bicubic beats the VAE ({bic:.2f}"
    return (
        f"baseline: bicubic down to a thumbnail and back up, keeping {same} "
        f"({compression(thumb, pixels)} fewer than the pixels): {who} against {min(vae, bic):.2f} dB)"
    )


BASELINE = ("latent_values", "pixel_values", "bicubic_values")


@register_metric("psnr")
class PSNR(Metric):
    """PSNR (dB) of the reconstruction; with EvalSetup.baseline, bicubic through a thumbnail's too."""

    higher_is_better = True
    table_position = 10
    note_position = 10_000  # the baseline's verdict closes the table

    def sums(self) -> dict[str, tuple[int, ...]]:
        out = {"psnr": ()}
        if self.setup.baseline:
            out.update({name: () for name in ("psnr_bicubic", *BASELINE)})
        return out

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        x, n = batch.images, batch.n
        sums["psnr"] += psnr(batch.reconstruction, x).double().sum()
        if self.setup.baseline:
            values, (H, W) = batch.mean[0].numel(), x.shape[-2:]
            size = equal_values_size(values, H, W, x.shape[1])
            sums["psnr_bicubic"] += psnr(bicubic_round_trip(x, size=size), x).double().sum()
            sums["latent_values"] += n * values
            sums["bicubic_values"] += n * x.shape[1] * size[0] * size[1]
            sums["pixel_values"] += n * x[0].numel()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        out = {"psnr": float(total["psnr"]) / samples}
        if self.setup.baseline:
            out.update({k: float(total[k]) / samples for k in BASELINE})
            out["psnr_bicubic"] = float(total["psnr_bicubic"]) / samples
        return out

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        rows = []
        base = "latent_values" in results and "psnr_bicubic" in results
        if base:
            pixels = results["pixel_values"]
            for name, key in (("latent", "latent_values"), ("bicubic thumbnail", "bicubic_values")):
                v = results[key]
                rows.append((f"numbers kept per image: {name}", f"{v:,.0f} ({compression(v, pixels)} fewer)"))
        if "psnr" in results:
            rows.append(("PSNR (dB)", f"{results['psnr']:.2f}"))
            if base:
                rows.append(("PSNR (dB), bicubic thumbnail", f"{results['psnr_bicubic']:.2f}"))
        return rows

    @classmethod
    def notes(cls, results: dict[str, float], info: TableInfo) -> list[str]:
        base = "latent_values" in results and "psnr_bicubic" in results
        return [baseline_verdict(results)] if base and "psnr" in results else []


# --------------------------------------------------------------------------------------------------------
# mse


@register_metric("mse")
class MSE(Metric):
    """The mean squared error of the reconstruction on the [0, 1] scale, in every pass."""

    higher_is_better = False
    table_position = 30
    always = True

    def sums(self) -> dict[str, tuple[int, ...]]:
        return {"mse": ()}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        sums["mse"] += ((batch.reconstruction - batch.images) / 2).double().square().flatten(1).mean(1).sum()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        return {"mse": float(total["mse"]) / samples}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        return [("MSE ([0, 1] scale)", f"{results['mse']:.5f}")] if "mse" in results else []


# --------------------------------------------------------------------------------------------------------
# ssim


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image of (B, C, H, W) batches in [-1, 1], shape (B,), float64; H, W >= 7.

    Equals scikit-image's structural_similarity(a, b, data_range=1, channel_axis=-1) on the [0, 1] images:
    7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1)), the mean over the positions
    whose window lies inside the image, averaged over channels.
    """
    if x.shape != y.shape or x.ndim != 4 or min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs two (B, C, H, W) batches of one shape with H, W >= 7, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    a, b = (x.double() + 1) / 2, (y.double() + 1) / 2
    C = a.shape[1]
    moments = F.avg_pool2d(torch.cat([a, b, a * a, b * b, a * b], 1), SSIM_WINDOW, stride=1)  # valid windows
    ux, uy, uxx, uyy, uxy = moments.split(C, 1)
    n = SSIM_WINDOW**2
    vx, vy, vxy = (n / (n - 1) * t for t in (uxx - ux * ux, uyy - uy * uy, uxy - ux * uy))
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


@register_metric("ssim")
class SSIM(Metric):
    """SSIM of the reconstruction (scikit-image's, see ssim)."""

    higher_is_better = True
    table_position = 20

    def sums(self) -> dict[str, tuple[int, ...]]:
        return {"ssim": ()}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        sums["ssim"] += ssim(batch.reconstruction, batch.images).sum()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        return {"ssim": float(total["ssim"]) / samples}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        return [("SSIM", f"{results['ssim']:.4f}")] if "ssim" in results else []


# --------------------------------------------------------------------------------------------------------
# lpips


def load_lpips(loss: LossConfig, lpips_path: str = "", vgg_path: str = "") -> LPIPS:
    """LPIPS-VGG from local files (flags first, then loss.lpips_path / loss.vgg_path, then the caches)."""
    cfg = dataclasses.replace(
        loss, lpips_path=lpips_path or loss.lpips_path, vgg_path=vgg_path or loss.vgg_path
    )
    try:
        return LPIPS.from_files(*find_lpips_weights(cfg))
    except LossConfigError as e:
        raise MetricError(
            f"metric lpips needs its weights on disk (pass --lpips-path DIR with vgg.pth and "
            f"vgg16-397923af.pth, or --vgg-path): {e}"
        ) from None


@register_metric("lpips")
class LPIPSMetric(Metric):
    """LPIPS-VGG of the reconstruction: EvalSetup.nets["lpips"], else the criterion's perceptual network."""

    higher_is_better = False
    table_position = 40

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        net = setup.nets.get("lpips")
        if net is None:
            net = getattr(setup.criterion, "perceptual", None)
        if net is None:
            raise MetricError("metric lpips needs the LPIPS network (load_eval_nets or load_lpips)")
        self.net = net.to(setup.device)

    def sums(self) -> dict[str, tuple[int, ...]]:
        return {"lpips": ()}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        sums["lpips"] += self.net(batch.reconstruction, batch.images).double().sum()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        return {"lpips": float(total["lpips"]) / samples}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        return [("LPIPS-VGG", f"{results['lpips']:.4f}")] if "lpips" in results else []
