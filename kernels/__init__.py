"""Fused ops for convolutional VAEs, with an eager reference behind each.

impl="auto" picks the Triton kernel for CUDA tensors when triton imports (and the tensor is big enough for a
fused kernel to pay, see AUTO_MIN_NUMEL), else the eager reference; impl="triton" forces the kernel (CPU
tensors work under TRITON_INTERPRET=1, set before triton is imported); impl="torch" is the reference.

The ops are torch.library custom ops (namespace vae_kernels) with fake-tensor rules and registered autograd,
so they trace into torch.compile graphs without breaks, and run under DDP, FSDP and autocast like any aten op.
This package imports nothing from vae_scale, and imports without triton (then everything runs eagerly).
"""

from __future__ import annotations

import torch

from . import common, gaussian, group_norm, rms_norm
from .gaussian import gaussian_sample_kl_reference
from .group_norm import group_norm_silu_reference
from .rms_norm import rms_norm_act_reference

IMPLS = ("auto", "triton", "torch")
HAS_TRITON = common.HAS_TRITON

# Below these sizes (elements of mean / x), impl="auto" keeps the eager reference even on a GPU.
#
# The model: a forward + backward call costs t(n) = a + b * n, a the fixed cost (the host's dispatch of the
# op and its launches, and each launch's latency on the GPU), b the bytes moved per element over the
# bandwidth. Fused wins above n* = (a_fused - a_eager) / (b_eager - b_fused).
# - GroupNorm+SiLU: fused is 3 + 3 launches and 8 s bytes per element (s bytes a value); eager (aten
#   group_norm, silu and their backward) is about 4 + 5 launches and 13 s (channels_last adds a copy each
#   way). On the GPU's side fused is cheaper at every n; what it adds is host time (a torch.library op and
#   six Triton launches against aten's calls), which costs only while the GPU waits for the host, i.e. for
#   tensors whose whole op takes a few microseconds. 2**16 elements (128 KiB in bf16, 0.04 us of H100
#   bandwidth, under 1 us per kernel) is the size below which the kernels are all launch latency and the
#   host decides; it is a model's estimate, not yet a measurement.
# - RMSNorm+act: the same launch and byte counts (2 + 3 launches, 8 s bytes per element fused; eager is
#   about 6 + 8 launches: square, mean, rsqrt, multiplies, add, activation), so the same estimate.
# - The posterior replaces ~22 eager kernels with 2 and saves ~40 s bytes per element: fused at every n.
# Where it is re-measured: `python -m benchmarks.kernels --crossover` (run by benchmarks/gpu_check.sh)
# times both paths, host included, over 16k to 17M elements and writes
# benchmarks/results/kernels-crossover-<gpu>.json with `crossover_numel`, the value these should take.
AUTO_MIN_NUMEL = {"gaussian_sample_kl": 0, "group_norm_silu": 1 << 16, "rms_norm_act": 1 << 16}

__all__ = [
    "IMPLS",
    "HAS_TRITON",
    "AUTO_MIN_NUMEL",
    "gaussian_sample_kl",
    "group_norm_silu",
    "rms_norm_act",
    "auto_backend",
]


def auto_backend(device: torch.device | str = "cuda") -> str:
    """What impl="auto" resolves to for (large enough) tensors on `device`: "triton" or "torch"."""
    return "triton" if HAS_TRITON and torch.device(device).type == "cuda" else "torch"


def _resolve(impl: str, t: torch.Tensor, op: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = auto_backend(t.device)
    return "torch" if backend == "triton" and t.numel() < AUTO_MIN_NUMEL[op] else backend


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
    non-batch dim, against N(0, I) or N(prior_mean, exp(prior_logvar)). logvar and prior_logvar are clamped
    to [-30, 20] (zero gradient outside), as in diffusers. Gradients reach mean, logvar and the prior from
    both z and kl; eps is a constant. Statistics are fp32, outputs in the inputs' dtype (float32, bfloat16,
    float16; the torch reference also takes float64).

    eps=None draws the noise: inside the kernel (Philox, seeded from torch's generator, so torch.manual_seed
    repeats a run; the backward regenerates it), or with torch.randn_like for impl="torch". The two paths
    draw different noise for the same seed.

    The prior may broadcast to mean's shape (e.g. (1, C, 1, 1)); its gradients come back in its own shape.
    Mixed dtypes are a ValueError, except under autocast, where they are promoted to the widest (fp32 when
    any input is fp32), as autocast does for multi-input elementwise ops.
    """
    mean, logvar, eps, prior_mean, prior_logvar = gaussian.check_inputs(
        mean, logvar, eps, prior_mean, prior_logvar
    )
    if _resolve(impl, mean, "gaussian_sample_kl") == "triton":
        return gaussian.gaussian_sample_kl_triton(mean, logvar, eps, prior_mean, prior_logvar)
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
    """GroupNorm over (B, C, *spatial) with an optional fused SiLU; NCHW or channels_last.

    Statistics are fp32; y comes back in x's dtype (float32, bfloat16, float16; the torch reference also
    takes float64) and, for the Triton path, in x's layout (channels-last if x is, else contiguous; a layout
    whose spatial dims don't flatten is copied to contiguous first). weight and bias, shape (C,), may be
    x's dtype or float32 (mixed precision).

    Under autocast the op keeps x's dtype rather than running in fp32 as aten's group_norm does: its
    statistics are fp32 anyway, and the conv that follows would cast an fp32 result straight back to
    bf16/fp16, so fp32 output would only cost twice the bytes. Both impls follow this rule.
    """
    group_norm.check_inputs(x, num_groups, weight, bias)
    if _resolve(impl, x, "group_norm_silu") == "triton":
        return group_norm.group_norm_silu_triton(x, num_groups, weight, bias, eps, silu)
    return group_norm_silu_reference(x, num_groups, weight, bias, eps, silu)


def rms_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    act: str = "silu",
    impl: str = "auto",
) -> torch.Tensor:
    """RMSNorm over the channels (dim 1) of (B, C, *spatial) at each position, affine, then act; NCHW or
    channels_last.

    y = act(x / sqrt(mean_c(x^2) + eps) * weight + bias), act one of "silu", "relu", "none": DC-AE's
    RMSNorm2d (diffusers' RMSNorm on x.movedim(1, -1), eps 1e-5, weight and bias), alone in its ResBlocks
    (act="none") and followed by ReLU at the decoder's head (act="relu"). A (B, ..., C) tensor of
    features-last layout is normalised by passing x.movedim(-1, 1), which the Triton path reads in place.

    Computed in fp32; y comes back in x's dtype (float32, bfloat16, float16; the torch reference also takes
    float64) and, for the Triton path, in x's layout (channels-last if x is, else contiguous). weight and
    bias, shape (C,), may be x's dtype or float32 (mixed precision); under autocast the op keeps x's dtype,
    as group_norm_silu does.
    """
    rms_norm.check_inputs(x, weight, bias, act)
    if _resolve(impl, x, "rms_norm_act") == "triton":
        return rms_norm.rms_norm_act_triton(x, weight, bias, eps, act)
    return rms_norm_act_reference(x, weight, bias, eps, act)
