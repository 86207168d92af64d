"""Reparameterised sample + KL of a diagonal Gaussian posterior.

The eager reference below is the specification: z = mean + exp(0.5 * clamp(logvar, -30, 20)) * eps and the
KL divergence to N(0, I) or to a diagonal Gaussian prior, summed over every non-batch dimension.
"""

from __future__ import annotations

import torch

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def gaussian_sample_kl_reference(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    prior_mean: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference. Returns (z, kl) with z shaped like mean and kl of shape (B,), in fp32 statistics."""
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    if eps is None:
        eps = torch.randn_like(mean)
    z = mean + torch.exp(0.5 * logvar) * eps
    m, lv = mean.float(), logvar.float()
    if prior_mean is None:
        kl = 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv)
    else:
        pm, plv = prior_mean.float(), prior_logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
        kl = 0.5 * ((m - pm).pow(2) * torch.exp(-plv) + torch.exp(lv - plv) - 1.0 - lv + plv)
    return z, kl.flatten(1).sum(1).to(mean.dtype)
