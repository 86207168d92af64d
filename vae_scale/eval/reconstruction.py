"""The reconstruction metrics: psnr (with the bicubic baseline), mse, ssim and lpips, each of the input
against its reconstruction from the posterior mean (clamped to [-1, 1]).

Clips are scored frame by frame: psnr, ssim and lpips of a clip are the means of its frames' figures (each
frame an image), mse the mean over all its values; the run's figures are means over clips. psnr's baseline
for clips is trilinear down-and-up through a thumbnail clip that keeps at least the latent's numbers
(`psnr_trilinear`, `trilinear_values`; see trilinear_round_trip).

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
from vae_scale.eval.registry import (
    Batch,
    EvalSetup,
    Metric,
    MetricError,
    Sums,
    TableInfo,
    fold_frames,
    register_metric,
)

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


def equal_values_clip_size(
    values: int, frames: int, latent_frames: int, height: int, width: int, channels: int = 3
) -> tuple[int, int, int]:
    """The thumbnail clip (T', h, w) of a clip's aspect ratio that keeps at least `values` numbers.

    T' is the latent's own frame count (capped at the clip's): the baseline compresses time as the causal
    latent does (the first frame alone, then every 4 frames), and space to the smallest thumbnail with
    channels * T' * h * w >= values (equal_values_size), never fewer numbers than the latent.
    """
    t = max(1, min(latent_frames, frames))
    h, w = equal_values_size(-(-values // t), height, width, channels)
    return t, h, w


def trilinear_round_trip(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Clips (n, C, T, H, W) down to a (T', h, w) thumbnail clip and back up: the clip baseline.

    Down: each frame bilinear with antialiasing to (h, w) (as bicubic_round_trip's thumbnail, so space does
    not alias), then linear in time to T' frames; together trilinear interpolation, antialiased in space. Up:
    trilinear to (T, H, W). align_corners False throughout; clamped to [-1, 1].
    """
    n, c, t, H, W = x.shape
    frames = x.float().transpose(1, 2).reshape(n * t, c, H, W)
    small = F.interpolate(frames, size=size[1:], mode="bilinear", antialias=True, align_corners=False)
    small = small.reshape(n, t, c, *size[1:]).transpose(1, 2)  # (n, C, T, h, w)
    small = F.interpolate(small, size=size, mode="trilinear", align_corners=False)  # in time only
    return F.interpolate(small, size=(t, H, W), mode="trilinear", align_corners=False).clamp(-1, 1)


def trilinear_baseline(batch: Batch) -> tuple[torch.Tensor, int]:
    """(the trilinear round trip of a clip batch, the numbers its thumbnail keeps per clip), computed once
    per batch for every metric that scores the baseline (psnr, flicker)."""

    def compute() -> tuple[torch.Tensor, int]:
        x, (t, H, W) = batch.images, batch.images.shape[2:]
        size = equal_values_clip_size(batch.mean[0].numel(), t, batch.mean.shape[2], H, W, x.shape[1])
        return trilinear_round_trip(x, size), x.shape[1] * size[0] * size[1] * size[2]

    return batch.shared("trilinear", compute)


def compression(values: float, pixel_values: float) -> str:
    """How many times fewer numbers than the pixels: '64x', '2.8x' (one decimal unless near a whole)."""
    ratio = pixel_values / values
    return f"{ratio:.0f}x" if abs(ratio - round(ratio)) < 0.05 else f"{ratio:.1f}x"


def baseline_kind(results: dict[str, float]) -> str | None:
    """Which baseline `results` hold: "bicubic" (images), "trilinear" (clips) or None."""
    return next((k for k in ("bicubic", "trilinear") if f"psnr_{k}" in results), None)


def baseline_verdict(results: dict[str, float]) -> str:
    """One line: which has the higher PSNR, the VAE or the baseline (bicubic through a thumbnail, trilinear
    through a thumbnail clip) of at least its numbers."""
    kind = baseline_kind(results) or "bicubic"
    unit = "clip" if kind == "trilinear" else "image"
    vae, base = results["psnr"], results[f"psnr_{kind}"]
    latent, thumb, pixels = results["latent_values"], results[f"{kind}_values"], results["pixel_values"]
    same = (
        f"the same {latent:,.0f} numbers per {unit}"
        if round(thumb) == round(latent)
        else f"{thumb:,.0f} numbers per {unit} against the latent's {latent:,.0f}"
    )
    # the winner's figure first, as the demo's verdict says it
    who = f"the VAE beats {kind} ({vae:.2f}" if vae > base else f"{kind} beats the VAE ({base:.2f}"
    what = "a thumbnail" if kind == "bicubic" else "a thumbnail clip"
    return (
        f"baseline: {kind} down to {what} and back up, keeping {same} "
        f"({compression(thumb, pixels)} fewer than the pixels): {who} against {min(vae, base):.2f} dB)"
    )


BASELINE = ("latent_values", "pixel_values")
"""The numbers per sample the baseline rows show, with `<kind>_values` of the baseline's thumbnail."""


@register_metric("psnr")
class PSNR(Metric):
    """PSNR (dB) of the reconstruction, per frame for clips; with EvalSetup.baseline, the baseline's too:
    bicubic through a thumbnail (images) or trilinear through a thumbnail clip (clips)."""

    higher_is_better = True
    table_position = 10
    note_position = 10_000  # the baseline's verdict closes the table

    def sums(self) -> dict[str, tuple[int, ...]]:
        out = {"psnr": ()}
        if self.setup.baseline:
            for kind in ("bicubic", "trilinear"):  # images and clips: each over its own samples
                out.update({f"psnr_{kind}": (), f"{kind}_values": (), f"{kind}_samples": ()})
            out.update({name: () for name in BASELINE})
        return out

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        x, n = batch.images, batch.n
        sums["psnr"] += batch.per_sample(psnr(batch.frame_reconstruction, batch.frame_images)).sum()
        if not self.setup.baseline:
            return
        values = batch.mean[0].numel()
        if batch.is_clip:
            kind = "trilinear"
            base, kept = trilinear_baseline(batch)
            score = batch.per_sample(psnr(fold_frames(base), batch.frame_images))
        else:
            kind = "bicubic"
            size = equal_values_size(values, *x.shape[-2:], x.shape[1])
            score = psnr(bicubic_round_trip(x, size=size), x).double()
            kept = x.shape[1] * size[0] * size[1]
        sums[f"psnr_{kind}"] += score.sum()
        sums[f"{kind}_values"] += n * kept
        sums[f"{kind}_samples"] += n
        sums["latent_values"] += n * values
        sums["pixel_values"] += n * x[0].numel()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        out = {"psnr": float(total["psnr"]) / samples}
        if self.setup.baseline:
            out.update({k: float(total[k]) / samples for k in BASELINE})
            for kind in ("bicubic", "trilinear"):
                count = float(total[f"{kind}_samples"])
                if count:
                    out[f"psnr_{kind}"] = float(total[f"psnr_{kind}"]) / count
                    out[f"{kind}_values"] = float(total[f"{kind}_values"]) / count
        return out

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        rows = []
        kind = baseline_kind(results) if "latent_values" in results else None
        thumb = "bicubic thumbnail" if kind == "bicubic" else "trilinear thumbnail clip"
        if kind is not None:
            pixels, unit = results["pixel_values"], "clip" if kind == "trilinear" else "image"
            for name, key in (("latent", "latent_values"), (thumb, f"{kind}_values")):
                v = results[key]
                rows.append(
                    (f"numbers kept per {unit}: {name}", f"{v:,.0f} ({compression(v, pixels)} fewer)")
                )
        if "psnr" in results:
            per_frame = ", per frame" if kind == "trilinear" else ""
            rows.append((f"PSNR (dB){per_frame}", f"{results['psnr']:.2f}"))
            if kind is not None:
                rows.append((f"PSNR (dB){per_frame}, {thumb}", f"{results[f'psnr_{kind}']:.2f}"))
        return rows

    @classmethod
    def notes(cls, results: dict[str, float], info: TableInfo) -> list[str]:
        base = "latent_values" in results and baseline_kind(results) is not None
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
        sums["ssim"] += batch.per_sample(ssim(batch.frame_reconstruction, batch.frame_images)).sum()

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
        sums["lpips"] += batch.per_sample(self.net(batch.frame_reconstruction, batch.frame_images)).sum()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        return {"lpips": float(total["lpips"]) / samples}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        return [("LPIPS-VGG", f"{results['lpips']:.4f}")] if "lpips" in results else []
