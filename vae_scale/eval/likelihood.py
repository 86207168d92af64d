"""Likelihoods of 8-bit images under a decoder's output: the discretised logistic (PixelCNN++) and the
Gaussian, what the objective's reconstruction term and the bits/dim metric both compute; and that metric.

bpd: the negative ELBO in bits per dimension of the 8-bit images, -(E_q log p(x|z) - KL) / (3HW ln 2) (3THW
for a clip of T frames), with one reparameterised sample per image, under the run's likelihood:
loss.recon=logistic (discretised logistic, learned log-scale) or gaussian (learned variance; a density on
[-1, 1] becomes a bin probability by the bin width 2/255). Runs trained with l1/l2 have no likelihood: theirs
is a Gaussian whose single variance is the maximum-likelihood one on the evaluated images (sigma^2 = MSE of
the sampled reconstructions), an optimistic bound. `iw=K` adds `bpd_iw`, the importance-weighted bound of
Burda et al.: log p(x) >= E log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), which tightens with K. The noise of
each sample's latents is seeded by its key, so bpd does not depend on how samples are dealt to ranks or
batches.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from vae_scale.eval.registry import Batch, EvalSetup, Metric, MetricError, Sums, TableInfo, register_metric

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


# --------------------------------------------------------------------------------------------------------
# bpd


def log_likelihood(x: torch.Tensor, x_hat: torch.Tensor, criterion) -> torch.Tensor:
    """log p(x | x_hat) in nats per image (B,), float64, of 8-bit images under the criterion's likelihood.

    criterion: a VAELoss with loss.recon logistic (discretised logistic, learned log-scale per channel)
    or gaussian (learned scalar logvar; density times the bin width 2/255).
    """
    x, x_hat = x.float(), x_hat.float()
    if criterion.cfg.recon == "logistic":
        shape = (1, -1) + (1,) * (x.ndim - 2)  # images (B, C, H, W) or clips (B, C, T, H, W)
        log_scale = criterion.log_scale.detach().float().clamp(min=LOG_SCALE_MIN).view(shape)
        lp = discretized_logistic_log_prob(quantize_8bit(x), x_hat, log_scale)
    elif criterion.cfg.recon == "gaussian":
        lp = -gaussian_nll(x, x_hat, criterion.logvar.detach().float()) - math.log(127.5)
    else:
        raise MetricError(f"loss.recon={criterion.cfg.recon} has no likelihood")
    return lp.double().flatten(1).sum(1)


def has_likelihood(criterion) -> bool:
    """Whether the criterion is a normalised likelihood (recon logistic or gaussian)."""
    return criterion is not None and criterion.cfg.recon in ("logistic", "gaussian")


def key_noise(keys: list[str] | None, shape: tuple[int, ...], seed: int, k: int, first: int) -> torch.Tensor:
    """Standard normal noise (B, *shape), each sample's seeded by its key (or its index without keys)."""
    out = []
    for i in range(shape[0]):
        name = keys[i] if keys else f"#{first + i}"
        digest = hashlib.blake2b(repr((seed, name, k)).encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        out.append(torch.randn(shape[1:], generator=g))
    return torch.stack(out)


@register_metric("bpd")
class BPD(Metric):
    """The negative ELBO in bits/dim (`bpd`) and, with EvalSetup.iw = K, the IW bound (`bpd_iw`)."""

    higher_is_better = False
    table_position = 60

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        self.learned = has_likelihood(setup.criterion)
        if setup.iw and not self.learned:
            recon = setup.criterion.cfg.recon if setup.criterion is not None else "none"
            raise MetricError(
                f"the importance-weighted bound (iw={setup.iw}) needs a learned likelihood "
                f"(loss.recon=logistic or gaussian), this run has loss.recon={recon}"
            )

    def sums(self) -> dict[str, tuple[int, ...]]:
        return {"kl": (), "dims": (), "sq_err_sample": (), "nll": (), "iw": ()}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        setup, x, mean, logvar = self.setup, batch.images, batch.mean, batch.logvar
        criterion, iw = setup.criterion, setup.iw
        sums["kl"] += batch.kl_per_channel.sum()
        sums["dims"] += x.numel()  # 3HW per image, 3THW per clip
        std = torch.exp(0.5 * logvar)
        log_w = []
        for k in range(max(iw, 1)):
            eps = key_noise(batch.keys, tuple(mean.shape), setup.seed, k, batch.first).to(setup.device)
            z = mean + std * eps
            x_s = setup.decode(z)
            if k == 0:
                sums["sq_err_sample"] += (x - x_s).double().square().sum()
                if self.learned:
                    sums["nll"] -= log_likelihood(x, x_s, criterion).sum()
            if iw:
                # log p(z) - log q(z|x) for z = mean + std * eps: the 2 pi terms cancel
                log_prior_ratio = (0.5 * (eps.square() - z.square()) + 0.5 * logvar).double()
                log_w.append(log_likelihood(x, x_s, criterion) + log_prior_ratio.flatten(1).sum(1))
        if iw:
            log_px = torch.logsumexp(torch.stack(log_w), 0) - math.log(iw)
            sums["iw"] -= log_px.sum()

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        dims_total = float(total["dims"])  # the evaluated values in all: n * 3 * H * W (n * 3 * T * H * W)
        if self.learned:
            nats = (float(total["nll"]) + float(total["kl"])) / dims_total
        else:  # fitted Gaussian: at sigma^2 = MSE the squared-error term is exactly 1/2 per dimension
            var = max(float(total["sq_err_sample"]) / dims_total, 1e-12)
            nats = 0.5 * (1 + math.log(2 * math.pi * var)) + float(total["kl"]) / dims_total + math.log(127.5)
        out = {"bpd": nats / math.log(2)}
        if self.setup.iw:
            out["bpd_iw"] = float(total["iw"]) / dims_total / math.log(2)
        return out

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        rows = []
        if "bpd" in results:
            rows.append(("bits/dim (ELBO)", f"{results['bpd']:.4f}"))
        if "bpd_iw" in results:
            label = f"bits/dim (IW bound, K={info.iw})" if info.iw else "bits/dim (IW bound)"
            rows.append((label, f"{results['bpd_iw']:.4f}"))
        return rows

    @classmethod
    def notes(cls, results: dict[str, float], info: TableInfo) -> list[str]:
        return [f"bits/dim likelihood: {info.likelihood}"] if info.likelihood and "bpd" in results else []
