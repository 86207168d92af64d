"""latent_drift: how far the evaluated encoder's latents have moved from a reference encoder's on the same
images. A latent diffusion model trained on the reference's latents keeps working after a VAE fine-tune only
when they stay put: a decoder-only fine-tune (sd-vae-ft-mse's recipe) leaves them exactly where they were; a
full fine-tune moves them while the exported VAE keeps the old scaling_factor.

    latent_drift_psnr         10 log10(sum of (max - min)^2 / sum of MSE), both per image over the
                              reference's latent: the PSNR of the current latents against the reference's,
                              on the reference's range; inf when they are identical
    latent_drift_mse          mean squared difference per latent element
    latent_drift_mean_shift   max over channels of |mean - reference mean| (per channel: ..._mean_shift<c>)
    latent_drift_std_shift    max over channels of |std - reference std| (per channel: ..._std_shift<c>);
                              the std is the one scaling_factor is 1 / of

Latents are the posterior modes (the mean; DC-AE's latent itself). Channel means and stds pool every
latent position of every image (each image weighs the same), from per-image sums, so they are exact across
ranks like every metric's.

The reference is a DriftReference in EvalSetup.inputs["latent_drift"]: in training the run's starting weights
(model.init_from, or the seeded initialisation: rebuilt from the config at start, so a resumed run has it
too), in `vae-scale eval --against RUN_OR_DIR` that run's, checkpoint's or diffusers folder's weights.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from vae_scale.eval.registry import Batch, EvalSetup, Metric, MetricError, Sums, TableInfo, register_metric


class DriftReference:
    """The reference weights of latent_drift: a VAE (the model interface) kept on the CPU between passes,
    and the line that names where its weights came from."""

    def __init__(self, vae: nn.Module, source: str):
        self.vae = vae.eval().requires_grad_(False)
        self.source = source

    def on(self, device: torch.device) -> nn.Module:
        """The reference on `device`: itself there, else a copy for one pass (freed with the pass's metric),
        so that it takes device memory only while an evaluation runs."""
        p = next(self.vae.parameters(), None)
        if p is None or p.device == torch.device(device):
            return self.vae
        return copy.deepcopy(self.vae).to(device)


def _latent_channels(vae) -> int:
    return int(vae.config.latent_channels)


@register_metric("latent_drift")
class LatentDrift(Metric):
    """The evaluated latents against a reference encoder's (see the module docstring)."""

    higher_is_better = True
    table_position = 85

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        ref = setup.inputs.get("latent_drift")
        if ref is None:
            raise MetricError(
                "latent_drift needs reference weights: `vae-scale eval --against RUN_OR_DIR` (a run, a "
                "checkpoint or a diffusers folder); in training, the run's starting weights"
            )
        self.channels = _latent_channels(setup.vae)
        if _latent_channels(ref.vae) != self.channels:
            raise MetricError(
                f"latent_drift: the reference {ref.source} has {_latent_channels(ref.vae)} latent channels, "
                f"the evaluated model {self.channels}"
            )
        self.reference = ref.on(setup.device)

    def sums(self) -> dict[str, tuple[int, ...]]:
        c = (self.channels,)
        return {"sq_err": (), "range_sq": (), "mean": c, "sq": c, "ref_mean": c, "ref_sq": c}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        tiled, ref_vae = self.setup.tiled, self.reference
        post = ref_vae.encode(batch.images, tiled=tiled) if tiled else ref_vae.encode(batch.images)
        ref = post.mode().float().flatten(2)  # (n, C, positions)
        cur = batch.latent.float().flatten(2)
        if cur.shape != ref.shape:
            raise MetricError(
                f"latent_drift: latents of shape {tuple(cur.shape)} against the reference's "
                f"{tuple(ref.shape)}"
            )
        sums["sq_err"] += (cur - ref).pow(2).flatten(1).mean(1).double().sum()
        flat = ref.flatten(1)
        sums["range_sq"] += (flat.amax(1) - flat.amin(1)).double().pow(2).sum()
        sums["mean"] += cur.mean(2).double().sum(0)
        sums["sq"] += cur.pow(2).mean(2).double().sum(0)
        sums["ref_mean"] += ref.mean(2).double().sum(0)
        sums["ref_sq"] += ref.pow(2).mean(2).double().sum(0)

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        sq_err, range_sq = float(total["sq_err"]), float(total["range_sq"])
        psnr = math.inf if sq_err == 0 else 10 * math.log10(range_sq / sq_err) if range_sq > 0 else -math.inf
        mean, ref_mean = total["mean"] / samples, total["ref_mean"] / samples
        std = (total["sq"] / samples - mean.pow(2)).clamp(min=0).sqrt()
        ref_std = (total["ref_sq"] / samples - ref_mean.pow(2)).clamp(min=0).sqrt()
        d_mean, d_std = mean - ref_mean, std - ref_std
        out = {
            "latent_drift_psnr": psnr,
            "latent_drift_mse": sq_err / samples,
            "latent_drift_mean_shift": float(d_mean.abs().max()),
            "latent_drift_std_shift": float(d_std.abs().max()),
        }
        for c in range(d_mean.numel()):
            out[f"latent_drift_mean_shift{c}"] = float(d_mean[c])
            out[f"latent_drift_std_shift{c}"] = float(d_std[c])
        return out

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        if "latent_drift_psnr" not in results:
            return []
        return [
            ("latent drift PSNR (dB)", f"{results['latent_drift_psnr']:.2f}"),
            ("latent mean shift (max |d|)", f"{results['latent_drift_mean_shift']:.4g}"),
            ("latent std shift (max |d|)", f"{results['latent_drift_std_shift']:.4g}"),
        ]
