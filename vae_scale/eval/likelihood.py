"""Likelihoods of 8-bit images under a decoder's output: the discretised logistic (PixelCNN++) and the
Gaussian, what the objective's reconstruction term and the bits/dim metric both compute."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BIN_HALF_WIDTH = 1.0 / 255.0
"""8-bit value k sits at k / 127.5 - 1 in [-1, 1]; bins are 2/255 wide."""
LOG_SCALE_MIN = -7.0
"""Floor of the logistic's log-scale, as in PixelCNN++ (keeps the finest bin probability representable)."""


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Snap values in [-1, 1] to the nearest of the 256 levels k / 127.5 - 1 (same shape and dtype)."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def discretized_logistic_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) in nats of 8-bit pixels under a logistic(mean, exp(log_scale)) discretised to 256 bins.

    x lies on the grid k / 127.5 - 1 (see quantize_8bit); mean and log_scale broadcast against it. Bin k
    covers [x - 1/255, x + 1/255], except the edges, which take the CDF tails as in PixelCNN++ / IAF: bin 0
    is (-inf, -1 + 1/255] and bin 255 is [1 - 1/255, inf), so the 256 probabilities sum to 1. Output has
    the broadcast shape and is finite for any finite inputs (gradients too).
    """
    inv_scale = torch.exp(-log_scale)
    centered = x - mean
    plus = inv_scale * (centered + BIN_HALF_WIDTH)  # upper bin edge, standardised
    minus = inv_scale * (centered - BIN_HALF_WIDTH)  # lower bin edge
    # sigmoid(p) - sigmoid(m) = sigmoid(p) * sigmoid(-m) * (1 - exp(m - p)): a product of three terms whose
    # logs are each stable, so no tail is lost to cancellation and no pdf * width approximation is needed.
    lower_edge = x < -1.0 + BIN_HALF_WIDTH  # bin 0: P = sigmoid(plus)
    upper_edge = x > 1.0 - BIN_HALF_WIDTH  # bin 255: P = 1 - sigmoid(minus) = sigmoid(-minus)
    zero = torch.zeros((), dtype=plus.dtype, device=plus.device)
    log_cdf_plus = torch.where(upper_edge, zero, F.logsigmoid(plus))
    log_sf_minus = torch.where(lower_edge, zero, F.logsigmoid(-minus))
    log_width = torch.where(lower_edge | upper_edge, zero, torch.log(-torch.expm1(minus - plus)))
    return log_cdf_plus + log_sf_minus + log_width


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, exp(logvar)) in nats per element: 0.5 * ((x - mean)^2 / var + logvar + log 2pi).

    Not LDM's `rec / exp(logvar) + logvar`: that one divides L1 + LPIPS (a Laplace form) by a logvar LDM never
    trains. This is a Gaussian on the squared error alone, normalised (bits/dim need one), whose logvar the
    trainer learns with the VAE. Shapes broadcast.
    """
    return 0.5 * ((x - mean).square() * torch.exp(-logvar) + logvar + math.log(2 * math.pi))
