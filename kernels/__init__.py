"""Fused ops for convolutional VAEs, with an eager reference behind each.

impl="auto" picks the Triton kernel for CUDA tensors when triton imports, else the eager reference;
impl="triton" forces the kernel (CPU tensors work under TRITON_INTERPRET=1); impl="torch" is the reference.
"""

from __future__ import annotations

import torch

from kernels.gaussian import gaussian_sample_kl_reference
from kernels.group_norm import group_norm_silu_reference

IMPLS = ("auto", "triton", "torch")

__all__ = ["IMPLS", "gaussian_sample_kl", "group_norm_silu", "auto_backend"]


def auto_backend(device: torch.device | str = "cuda") -> str:
    """What impl="auto" resolves to for tensors on `device`: "triton" or "torch"."""
    return "torch"


def _resolve(impl: str, t: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return auto_backend(t.device) if impl == "auto" else impl


def gaussian_sample_kl(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    prior_mean: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised sample and KL per sample of a diagonal Gaussian posterior.

    mean, logvar: (B, ...) of one shape. Returns z (like mean) and kl of shape (B,), summed over every
    non-batch dim, against N(0, I) or N(prior_mean, exp(prior_logvar)). logvar is clamped to [-30, 20].
    """
    if _resolve(impl, mean) == "triton":
        raise NotImplementedError("the Triton gaussian kernel is not built yet")
    return gaussian_sample_kl_reference(mean, logvar, eps, prior_mean, prior_logvar)


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    silu: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """GroupNorm over (B, C, H, W) with an optional fused SiLU; NCHW or channels_last."""
    if _resolve(impl, x) == "triton":
        raise NotImplementedError("the Triton group-norm kernel is not built yet")
    return group_norm_silu_reference(x, num_groups, weight, bias, eps, silu)
