"""The latent metrics: kl and active_units, of the posterior itself.

- kl: KL(q(z|x) || N(0, I)) in nats per image (per clip for clips: summed over its latent frames), and per
  latent channel (`kl_channel/<c>`).
- active_units: latent channels whose posterior mean varies across images, Var(E_q[z_c]) > 0.01 (Burda et
  al.'s A_u; for convolutional latents pooled over positions, which are close to stationary; a clip's
  latent frames are pooled with its positions).
"""

from __future__ import annotations

import torch

from vae_scale.eval.registry import Batch, Metric, Sums, TableInfo, indexed, register_metric

ACTIVE_THRESHOLD = 0.01
"""A latent channel is active when its posterior mean's variance over images and positions exceeds this."""


def active_units(mu_sum: torch.Tensor, mu2_sum: torch.Tensor, count: float) -> torch.Tensor:
    """Latent channels whose posterior mean varies over images and positions together (variance above
    ACTIVE_THRESHOLD), from per-channel sums of the mean and its square over `count` images x positions.
    The one definition: the trainer's logged `active_units` and eval's `val/active_units` both use it."""
    activity = mu2_sum / count - (mu_sum / count).square()
    return (activity > ACTIVE_THRESHOLD).sum()


@torch.no_grad()
def latent_stats(posterior) -> dict[str, torch.Tensor]:
    """KL per latent channel (`kl_channel/<c>`, averaged over the batch) and `active_units` of one batch's
    posterior (a DiagonalGaussian), as the trainer logs them."""
    mean = posterior.mean.float()  # (B, C, h, w), or (B, C, t, h, w) of clips: frames pooled as positions
    out = {f"kl_channel/{c}": v for c, v in enumerate(posterior.kl_per_channel().mean(0))}
    dims = (0, *range(2, mean.ndim))
    count = mean.numel() // mean.shape[1]
    out["active_units"] = active_units(mean.sum(dims), mean.square().sum(dims), count).float()
    return out


@register_metric("kl")
class KL(Metric):
    """KL(q(z|x) || N(0, I)) in nats per image (`kl`) and per latent channel (`kl_channel/<c>`)."""

    higher_is_better = None  # a rate, not a score: how much the latent says of each image
    table_position = 70

    def sums(self) -> dict[str, tuple[int, ...]]:
        return {"kl": (), "kl_channel": (self.setup.vae.config.latent_channels,)}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        kl_c = batch.kl_per_channel
        sums["kl"] += kl_c.sum()
        sums["kl_channel"] += kl_c.sum(0)

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        out = {"kl": float(total["kl"]) / samples}
        out.update({f"kl_channel/{c}": float(v) / samples for c, v in enumerate(total["kl_channel"])})
        return out

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        if "kl" not in results:
            return []
        per = indexed(results, "kl_channel/")
        return [
            ("KL (nats per image)", f"{results['kl']:.2f}"),
            ("KL per latent channel", " ".join(f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in per)),
        ]


@register_metric("active_units")
class ActiveUnits(Metric):
    """Latent channels whose posterior mean varies across images and positions (see active_units)."""

    higher_is_better = True
    table_position = 80

    def sums(self) -> dict[str, tuple[int, ...]]:
        C = self.setup.vae.config.latent_channels
        return {"mu": (C,), "mu2": (C,), "positions": ()}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        mean = batch.mean  # (n, C, h, w), or (n, C, t, h, w) for clips: latent frames count as positions
        dims = (0, *range(2, mean.ndim))
        sums["mu"] += mean.double().sum(dims)
        sums["mu2"] += mean.double().square().sum(dims)
        sums["positions"] += mean.numel() // mean.shape[1]

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        return {"active_units": float(active_units(total["mu"], total["mu2"], float(total["positions"])))}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        if "active_units" not in results:
            return []
        of = f" / {info.latent_channels}" if info.latent_channels else ""
        return [("active latent channels", f"{int(results['active_units'])}{of}")]
