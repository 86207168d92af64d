"""GroupNorm with an optional fused SiLU, for NCHW and channels_last inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    silu: bool = True,
) -> torch.Tensor:
    """Eager reference: F.group_norm followed by SiLU when silu is True."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y
