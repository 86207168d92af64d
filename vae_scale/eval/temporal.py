"""flicker: how far a reconstructed clip's changes from frame to frame are from the input's.

A reconstruction can score a high PSNR on every frame and still flicker: an error that is different in
each frame (noise, a shimmering texture, a brightness that jumps) shows as motion that is not in the input,
while an error that stays put from frame to frame does not. So flicker compares the frame differences,

    d[t] = x[t+1] - x[t],   d_hat[t] = x_hat[t+1] - x_hat[t],   t = 0 .. T-2,

of the input x and of its reconstruction x_hat (from the posterior mean, clamped to [-1, 1]):

- `flicker`: the mean absolute error |d_hat[t] - d[t]| on the [0, 1] scale (half the [-1, 1] difference),
  over channels, pixels and the T - 1 differences of a clip, averaged over clips. 0 for a reconstruction
  whose error is the same in every frame, however large; an error drawn anew each frame with mean
  absolute value a gives about a (its differences are those of two independent draws). Lower is better.
- `flicker_psnr`: the PSNR in dB of d_hat[t] against d[t] (peak 1 on the [0, 1] scale, as psnr's, so the
  MSE of (d_hat - d) / 2), per difference, averaged over a clip's differences and then over clips; 120 dB
  (psnr's MSE floor of 1e-12) for a temporally exact reconstruction. Higher is better.

With the baseline (EvalSetup.baseline, as `vae-scale eval` asks with psnr) the same two of the trilinear
down-and-up baseline at the latent's numbers (reconstruction.trilinear_round_trip):
`flicker_trilinear` and `flicker_psnr_trilinear`.

A temporal metric: image batches, and clips of one frame (no differences), are refused.
"""

from __future__ import annotations

import torch

from vae_scale.eval.reconstruction import psnr, trilinear_baseline
from vae_scale.eval.registry import Batch, Metric, MetricError, Sums, TableInfo, fold_frames, register_metric


def frame_differences(x: torch.Tensor) -> torch.Tensor:
    """x[:, :, t+1] - x[:, :, t] of clips (n, C, T, H, W): (n, C, T - 1, H, W), float32."""
    x = x.float()
    return x[:, :, 1:] - x[:, :, :-1]


def flicker_per_clip(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flicker, flicker_psnr) per clip, each (n,) float64, of clips (n, C, T, H, W) in [-1, 1], T >= 2
    (see the module docstring)."""
    if x.shape != x_hat.shape or x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(
            f"flicker needs two (n, C, T, H, W) clip batches of one shape with T >= 2, got "
            f"{tuple(x_hat.shape)} and {tuple(x.shape)}"
        )
    d, d_hat = frame_differences(x), frame_differences(x_hat)
    n, steps = x.shape[0], x.shape[2] - 1
    mae = ((d_hat - d).double().abs() / 2).flatten(1).mean(1)
    per_step = psnr(fold_frames(d_hat), fold_frames(d)).double().view(n, steps)  # (n, T - 1)
    return mae, per_step.mean(1)


@register_metric("flicker")
class Flicker(Metric):
    """The error of the reconstruction's frame differences (see the module docstring): `flicker` (mean
    absolute error, [0, 1] scale) and `flicker_psnr` (dB); with EvalSetup.baseline, the trilinear
    baseline's too."""

    higher_is_better = False
    table_position = 25
    refuses_images = "it compares the changes between a clip's frames; give clips (data.frames > 1)"

    def sums(self) -> dict[str, tuple[int, ...]]:
        out = {"flicker": (), "flicker_psnr": ()}
        if self.setup.baseline:
            out.update({"flicker_trilinear": (), "flicker_psnr_trilinear": ()})
        return out

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        if batch.frames < 2:
            raise MetricError("metric flicker needs clips of at least 2 frames, got clips of 1 frame")
        mae, db = flicker_per_clip(batch.reconstruction, batch.images)
        sums["flicker"] += mae.sum()
        sums["flicker_psnr"] += db.sum()
        if self.setup.baseline:
            mae, db = flicker_per_clip(trilinear_baseline(batch)[0], batch.images)
            sums["flicker_trilinear"] += mae.sum()
            sums["flicker_psnr_trilinear"] += db.sum()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        return {k: float(v) / samples for k, v in total.items()}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        rows = []
        for suffix, label in (("", ""), ("_trilinear", ", trilinear thumbnail clip")):
            if f"flicker{suffix}" in results:
                rows.append((f"flicker (frame-difference MAE){label}", f"{results[f'flicker{suffix}']:.5f}"))
                rows.append((f"flicker PSNR (dB){label}", f"{results[f'flicker_psnr{suffix}']:.2f}"))
        return rows
