"""The VAE objective: likelihoods against independent calculations, KL schedule and free bits, the adaptive
adversarial weight by hand, discriminator gating and losses, LPIPS from weight files in the real formats."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from support import VGG_CONVS

from vae_scale.config import ConfigError, LossConfig, ModelConfig
from vae_scale.eval.likelihood import discretized_logistic_log_prob
from vae_scale.eval.lpips import LPIPS, LPIPS_FILE, VGG16_FILE, LossConfigError, find_lpips_weights
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.models.sd import VAE
from vae_scale.train.discriminator import NLayerDiscriminator
from vae_scale.train.objective import LastLayer, VAELoss

LN2 = math.log(2.0)


def grid(k: torch.Tensor) -> torch.Tensor:
    """8-bit values k -> their place in [-1, 1]."""
    return k / 127.5 - 1.0


def images(B=2, C=3, H=8, W=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return grid(torch.randint(0, 256, (B, C, H, W), generator=g).float())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """torch.allclose naming the worst element (torch.testing.assert_close imports torch.distributed: 3 s)."""
    err = (actual - expected).abs() - rtol * expected.abs()
    i = int(err.argmax())
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
        f"at flat index {i}: {actual.flatten()[i].item()} vs {expected.flatten()[i].item()}"
    )


def check_logs(logs: dict) -> None:
    for k, v in logs.items():
        assert isinstance(v, torch.Tensor) and v.ndim == 0, k
        assert not v.requires_grad and v.grad_fn is None, k
        assert torch.isfinite(v), (k, v)


# --------------------------------------------------------------------------------------------------------
# Reconstruction likelihoods


def logistic_log_prob_direct(k: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 log P(bin k) straight from the logistic CDF, edge bins taking the tails.

    Above the mean it differences the survival function 1 - CDF instead, so the float64 difference of two
    numbers near 1 does not cancel away the far upper tail.
    """
    k, mean, scale = (t.double() for t in (k, mean, scale))
    x = grid(k)
    hi = torch.where(k == 255, torch.inf, (x + 1 / 255 - mean) / scale)
    lo = torch.where(k == 0, -torch.inf, (x - 1 / 255 - mean) / scale)
    upper = x > mean
    return torch.log(
        torch.where(upper, torch.sigmoid(-lo) - torch.sigmoid(-hi), torch.sigmoid(hi) - torch.sigmoid(lo))
    )


@pytest.mark.parametrize(
    "mean,scale", [(0.0, 1.0), (0.3, 0.05), (-0.97, 0.01), (1.4, 0.2), (0.0, 1e-3), (-2, 3)]
)
def test_logistic_probabilities_over_256_bins_sum_to_one(mean, scale):
    k = torch.arange(256, dtype=torch.float64)
    logp = discretized_logistic_log_prob(
        grid(k), torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(scale), dtype=torch.float64)
    )
    # guards a missing tail or a bin width off: >= 1e-3; float64 over 256 bins rounds at ~1e-14
    assert torch.logsumexp(logp, 0).abs() < 1e-10
    assert torch.all(logp <= 0)


@pytest.mark.numerics
def test_logistic_matches_float64_cdf_difference():
    g = torch.Generator().manual_seed(1)
    k = torch.randint(0, 256, (4000,), generator=g).float()
    k[:50], k[50:100] = 0, 255  # both edge bins, certainly
    mean = grid(k) + 0.1 * torch.randn(k.shape, generator=g)
    scale = torch.exp(torch.empty(k.shape).uniform_(-5, 0, generator=g))
    ours = discretized_logistic_log_prob(grid(k), mean, scale.log())  # float32
    ref = logistic_log_prob_direct(k, mean, scale)
    assert ours.dtype == torch.float32
    # Guards a wrong bin width, edge bin or tail: >= 1e-2. fp32: a few ulp in each log-CDF term, grown by
    # their difference's conditioning (bins of 2/255 over scales >= e^-5): ~1e-5 at worst; float64: ~1e-13.
    assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)
    ours64 = discretized_logistic_log_prob(grid(k.double()), mean.double(), scale.double().log())
    assert_close(ours64, ref, rtol=1e-9, atol=1e-12)


def test_logistic_far_tails_stay_finite_with_gradients():
    x = grid(torch.tensor([0.0, 10.0, 128.0, 255.0]))
    mean = torch.tensor([8.0, -8.0, 8.0, -8.0], requires_grad=True)  # far outside the data range
    log_scale = torch.full((4,), -7.0, requires_grad=True)
    logp = discretized_logistic_log_prob(x, mean, log_scale)
    logp.sum().backward()
    assert torch.isfinite(logp).all() and (logp < -1000).all()  # a direct CDF difference would be log 0
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


def test_logistic_bits_per_dim_closed_form():
    """x_hat = 0, scale s, known KL: the ELBO in bits/dim written out by hand."""
    cfg = LossConfig(
        recon="logistic", kl_weight=1.0, logistic_per_channel=False, log_scale_init=math.log(0.5)
    )
    crit = VAELoss(cfg)
    s = 0.5
    x = torch.empty(2, 3, 4, 4)
    x[0], x[1] = -1.0, 1.0  # bin 0 and bin 255
    x[1, 2] = grid(torch.tensor(128.0))  # an interior bin at 1/255
    kl = torch.tensor([30.0, 50.0])
    loss, logs = crit.autoencoder_loss(x, torch.zeros_like(x), None, kl, step=0)
    edge = -math.log(1 / (1 + math.exp((1 - 1 / 255) / s)))  # -log sigmoid(-(1 - 1/255) / s), both edges
    interior = -math.log(1 / (1 + math.exp(-2 / 255 / s)) - 0.5)  # -log(sigmoid(2/255 / s) - sigmoid(0))
    P = 48
    nats = ((P + 32) * edge + 16 * interior) / (2 * P)  # 80 edge pixels, 16 interior, per pixel
    expected_bpd = (nats + 40.0 / P) / LN2
    # Guards nats for bits, a wrong P, a missing KL or tail: >= 1e-2. fp32 means of 96 values: <= 96 * 6e-8
    # = 6e-6 in the worst order (the old rel 1e-6 assumed one): rel 1e-5.
    assert logs["bits_per_dim"].item() == pytest.approx(expected_bpd, rel=1e-5)
    assert logs["nll"].item() == pytest.approx(nats, rel=1e-5)
    assert loss.item() == pytest.approx(expected_bpd * LN2, rel=1e-5)  # kl_weight 1: loss is the -ELBO
    assert logs["rec"].item() == pytest.approx(x.abs().mean().item())


def test_logistic_per_channel_scale_is_learned():
    crit = VAELoss(LossConfig(recon="logistic"), image_channels=3)
    (log_scale,) = crit.vae_parameters()
    assert log_scale.shape == (3,)
    x = images()
    loss, logs = crit.autoencoder_loss(x, (x + 0.05).clamp(-1, 1), None, torch.zeros(2), step=0)
    loss.backward()
    assert (log_scale.grad != 0).all()
    assert 0 < logs["bits_per_dim"].item() < 8  # better than uniform over 256 levels


@pytest.mark.numerics
def test_gaussian_matches_torch_distributions():
    crit = VAELoss(LossConfig(recon="gaussian", kl_weight=1e-3, logvar_init=0.3))
    x, x_hat = images(), images(seed=1) * 0.9
    kl = torch.tensor([100.0, 300.0])
    loss, logs = crit.autoencoder_loss(x, x_hat, None, kl, step=5)
    nll = -torch.distributions.Normal(x_hat.double(), math.exp(0.15)).log_prob(x.double()).mean().item()
    P = x[0].numel()
    # Guards a missing log var or log 127.5, std for var: >= 1e-2; fp32 against float64: ~1e-6 (cascade sums)
    assert logs["nll"].item() == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(nll + 1e-3 * 200.0 / P, rel=1e-5)
    assert logs["bits_per_dim"].item() == pytest.approx((nll + 200.0 / P + math.log(127.5)) / LN2, rel=1e-5)
    assert logs["logvar"].item() == pytest.approx(0.3)
    assert logs["rec"].item() == pytest.approx((x - x_hat).square().mean().item(), rel=1e-5)
    loss.backward()
    assert crit.logvar.grad is not None and crit.logvar.grad != 0


@pytest.mark.parametrize("recon", ["l1", "l2"])
def test_l1_l2_per_pixel_means(recon):
    crit = VAELoss(LossConfig(recon=recon, kl_weight=1e-6))
    x, x_hat = images(), images(seed=2)
    kl = torch.tensor([1000.0, 3000.0])
    loss, logs = crit.autoencoder_loss(x, x_hat, None, kl, step=0)
    d = (x - x_hat).abs() if recon == "l1" else (x - x_hat).square()
    P = x[0].numel()
    # guards a sum for a mean or the KL per element: >= x2
    # fp32 loss values: torch's cascade sums round within ~log2(n) * 6e-8 ~ 1e-6 relative on any SIMD width
    assert loss.item() == pytest.approx(d.mean().item() + 1e-6 * 2000.0 / P, rel=1e-5)
    assert logs["rec"].item() == logs["nll"].item() == pytest.approx(d.mean().item(), rel=1e-5)
    assert logs["kl"].item() == 2000.0
    assert "bits_per_dim" not in logs and crit.vae_parameters() == []


# --------------------------------------------------------------------------------------------------------
# KL schedule and free bits


def test_kl_warmup_schedule():
    crit = VAELoss(LossConfig(recon="l2", kl_weight=0.5, kl_warmup_steps=100))
    x = images()
    kl = torch.tensor([64.0, 128.0])
    base, _ = crit.autoencoder_loss(x, x, None, torch.zeros(2), step=0)
    for step, w in [(0, 0.0), (25, 0.125), (50, 0.25), (100, 0.5), (10_000, 0.5)]:
        # the weights are dyadic: exact in float and fp32; a ramp off by a step is 1e-3 of 0.5 or more
        assert crit.kl_weight(step) == pytest.approx(w)
        loss, logs = crit.autoencoder_loss(x, x, None, kl, step=step)
        assert logs["kl_weight"].item() == pytest.approx(w)
        # rec(x, x) is exactly 0: the difference is the fp32 KL term alone, a few ulp off
        assert (loss - base).item() == pytest.approx(w * 96.0 / x[0].numel(), rel=1e-5, abs=1e-12)
    assert VAELoss(LossConfig(kl_weight=0.5)).kl_weight(0) == 0.5  # no warm-up: full weight at once


def make_posterior(B=4, h=2, w=2, seed=0) -> tuple[DiagonalGaussian, torch.Tensor]:
    """Channel 0 near the prior except in sample 0 (KL 1.6 there, 0.4 on average over 4 samples); channel 1
    far from the prior everywhere (KL ~ 20), channel 2 in between (KL ~ 1.5)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([[0.9] + [0.01] * (B - 1), [3.0] * B, [0.8] * B]).view(3, B, 1, 1)
    mean = offsets + 0.01 * torch.randn(3, B, h, w, generator=g)
    logvar = torch.tensor([0.0, -2.0, -0.5]).view(3, 1, 1, 1) + 0.01 * torch.randn(3, B, h, w, generator=g)
    moments = torch.cat([mean.transpose(0, 1), logvar.transpose(0, 1)], 1).requires_grad_(
        True
    )  # (B, 6, h, w)
    return DiagonalGaussian(moments, "torch"), moments


def test_kl_per_channel_sums_to_the_posterior_kl():
    post, _ = make_posterior()
    # guards a channel or a spatial sum lost (>= 1e-2); nonnegative fp32 terms summed in two orders: ~1e-6
    assert_close(post.kl_per_channel().sum(1), post.kl(), rtol=1e-5, atol=1e-6)


def test_free_bits_stop_gradient_below_threshold_only():
    fb = 1.0
    crit = VAELoss(LossConfig(recon="l1", kl_weight=1.0, free_bits=fb))
    post, moments = make_posterior()
    kl_c = post.kl_per_channel().detach()  # (B, 3)
    batch_mean = kl_c.mean(0)
    assert batch_mean[0] < fb < batch_mean[2] < batch_mean[1]  # the set-up the test relies on ...
    assert kl_c[0, 0] > fb  # ... with one sample above the threshold in channel 0: the max is on the mean
    x = images(B=4, H=4, W=4)
    loss, logs = crit.autoencoder_loss(x, x, post, post.kl(), step=0)
    expected = fb + batch_mean[1] + batch_mean[2]  # max(mean_b KL_c, free_bits) summed over channels
    # guards the max taken per sample instead of on the batch mean (channel 0: 0.6 apart)
    # fp32 loss values: torch's cascade sums round within ~log2(n) * 6e-8 ~ 1e-6 relative on any SIMD width
    assert logs["kl_free_bits"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item() / x[0].numel(), rel=1e-5)
    assert logs["kl"].item() == pytest.approx(kl_c.sum(1).mean().item(), rel=1e-5)  # the true KL is logged
    loss.backward()
    grad_mean, grad_logvar = moments.grad[:, :3], moments.grad[:, 3:]
    for grad in (grad_mean, grad_logvar):
        assert (grad[:, 0] == 0).all()  # below the threshold on average: no gradient, not even for sample 0
        assert (grad[:, 1] != 0).all() and (grad[:, 2] != 0).all()


def test_without_free_bits_the_given_kl_is_used():
    crit = VAELoss(LossConfig(recon="l1", kl_weight=1.0))
    post, _ = make_posterior()
    x = images(B=4, H=4, W=4)
    kl = torch.full((4,), 123.0)  # deliberately not the posterior's
    loss, logs = crit.autoencoder_loss(x, x, post, kl, step=0)
    assert loss.item() == pytest.approx(123.0 / x[0].numel()) and "kl_free_bits" not in logs


# --------------------------------------------------------------------------------------------------------
# Discriminator and the adaptive weight


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.conv_in(z)))


def decoded(seed=0, z_scale=1.0, size=32):
    torch.manual_seed(seed)
    dec = TinyDecoder()
    dec.last = LastLayer(dec.conv_out)  # records conv_out's input on every forward
    z = z_scale * torch.randn(2, 4, size, size)
    return dec, dec(z), images(H=size, W=size, seed=seed)


NARROW = {"disc_channels": 8}  # where the discriminator's width is not what a test is about


@pytest.mark.numerics
@pytest.mark.parametrize("disc_loss", ["hinge", "non_saturating"])
def test_adaptive_weight_is_the_ratio_of_gradient_norms(disc_loss):
    cfg = LossConfig(
        recon="l1", kl_weight=1e-6, disc_weight=0.5, disc_loss=disc_loss, disc_layers=2, **NARROW
    )
    crit = VAELoss(cfg)
    dec, x_hat, x = decoded()
    kl = torch.tensor([10.0, 20.0])
    W = dec.conv_out.weight
    loss, logs = crit.autoencoder_loss(x, x_hat, None, kl, step=0, last_layer=dec.last)

    rec = (x - x_hat).abs().mean()
    logits = crit.discriminator(x_hat)  # train-mode BatchNorm: batch statistics, same as inside
    g = -logits.mean() if disc_loss == "hinge" else F.softplus(-logits).mean()
    (g_rec,) = torch.autograd.grad(rec, W, retain_graph=True)
    (g_g,) = torch.autograd.grad(g, W, retain_graph=True)
    P = x[0].numel()
    ratio = g_rec.norm().item() / (g_g.norm().item() + 1e-4)
    assert ratio < 1e4 / P  # below the cap: the weight is the ratio itself
    d_weight = 0.5 * ratio
    # Guards the norms of another layer's gradient, a missing 0.5 or clamp: O(1). fp32 norms of 216-element
    # gradients and the same losses summed in other orders: ~1e-6 relative.
    assert logs["d_weight"].item() == pytest.approx(d_weight, rel=1e-5)
    assert logs["g_loss"].item() == pytest.approx(g.item(), rel=1e-5)
    assert logs["disc_factor"].item() == 1.0
    assert loss.item() == pytest.approx(rec.item() + 1e-6 * 15.0 / P + d_weight * g.item(), rel=1e-5)
    check_logs(logs)
    loss.backward()
    # The gradient pushed into the decoder through x_hat is the one of the plain objective.
    ref_dec, ref_x_hat, _ = decoded()
    ref_logits = crit.discriminator(ref_x_hat)
    ref_g = -ref_logits.mean() if disc_loss == "hinge" else F.softplus(-ref_logits).mean()
    ref = (x - ref_x_hat).abs().mean() + 1e-6 * 15.0 / P + d_weight * ref_g
    ref_grads = torch.autograd.grad(ref, list(ref_dec.parameters()))
    # Guards a gradient through d_weight (not detached): O(1). d_weight as an fp32 tensor against a float
    # (6e-8) and one backward graph against another: ~1e-6 relative.
    for p, g_ref in zip(dec.parameters(), ref_grads):
        assert_close(p.grad, g_ref, rtol=1e-5, atol=1e-7)
    # the generator term reaches the decoder only: D's grads stay clean for its own step
    assert all(p.grad is None and p.requires_grad for p in crit.discriminator.parameters())


def test_adaptive_weight_clamps_at_1e4_in_latent_diffusions_units():
    # LDM clamps ||grad nll_sum|| / ||grad g_loss|| at 1e4; its nll is P times this loss's rec term, so the
    # cap here is 1e4 / P on a ratio P times smaller, and the weight LDM's / P (tests/test_objective_ldm.py).
    crit = VAELoss(LossConfig(recon="l1", disc_weight=0.25, **NARROW))
    last = crit.discriminator.main[-1]
    nn.init.zeros_(last.weight)  # constant logits: the generator term has no gradient
    dec, x_hat, x = decoded(z_scale=100.0)
    _, logs = crit.autoencoder_loss(x, x_hat, None, torch.zeros(2), step=0, last_layer=dec.last)
    (g_rec,) = torch.autograd.grad((x - x_hat).abs().mean(), dec.conv_out.weight)
    assert g_rec.norm() > 1.0  # so the unclamped ratio g_rec.norm() / 1e-4 exceeds 1e4, let alone 1e4 / P
    P = x[0].numel()
    assert logs["d_weight"].item() == pytest.approx(0.25 * 1e4 / P, rel=1e-6)


def test_adaptive_weight_falls_back_to_disc_weight():
    crit = VAELoss(LossConfig(disc_weight=0.3, **NARROW))
    dec, x_hat, x = decoded()
    _, logs = crit.autoencoder_loss(x, x_hat, None, torch.zeros(2), step=0, last_layer=None)
    assert logs["d_weight"].item() == pytest.approx(0.3)
    with torch.no_grad():
        x_hat = dec(torch.randn(2, 4, 32, 32))
        loss, logs = crit.autoencoder_loss(x, x_hat, None, torch.zeros(2), step=0, last_layer=dec.last)
    assert logs["d_weight"].item() == pytest.approx(0.3)
    check_logs(logs)


def test_disc_start_gates_the_generator_term_without_a_discriminator_forward():
    crit = VAELoss(LossConfig(recon="l1", disc_weight=0.5, disc_start=100, **NARROW))
    plain = VAELoss(LossConfig(recon="l1"))
    calls = []
    crit.discriminator.register_forward_hook(lambda *_: calls.append(1))
    dec, x_hat, x = decoded()
    kl = torch.tensor([5.0, 6.0])

    assert not crit.disc_active(99) and crit.disc_factor(99) == 0.0
    loss, logs = crit.autoencoder_loss(x, x_hat, None, kl, step=99, last_layer=dec.last)
    assert calls == []
    assert logs["disc_factor"].item() == 0.0 and logs["g_loss"].item() == 0.0
    assert loss.item() == plain.autoencoder_loss(x, x_hat, None, kl, step=99)[0].item()
    check_logs(logs)

    assert crit.disc_active(100)
    loss, logs = crit.autoencoder_loss(x, x_hat, None, kl, step=100, last_layer=dec.last)
    assert len(calls) == 1 and logs["disc_factor"].item() == 1.0 and logs["d_weight"].item() > 0
    d_loss, _ = crit.discriminator_loss(x, x_hat.detach(), step=99)
    assert d_loss.item() == 0.0  # scaled by disc_factor before the start
    assert plain.discriminator is None and not plain.disc_active(10**9)


@pytest.mark.parametrize("disc_loss", ["hinge", "non_saturating"])
def test_discriminator_losses_match_hand_formulas(disc_loss):
    crit = VAELoss(LossConfig(disc_weight=1.0, disc_loss=disc_loss, **NARROW))
    dec, x_hat, x = decoded()
    d_loss, logs = crit.discriminator_loss(x, x_hat.detach(), step=0)
    real, fake = crit.discriminator(x), crit.discriminator(x_hat.detach())
    if disc_loss == "hinge":
        expected = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    else:  # -log sigmoid(real) and -log(1 - sigmoid(fake))
        expected = 0.5 * (-torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean())
    # guards a wrong margin, sign or factor 0.5: O(1); the same discriminator on the same batch, ~1e-7 apart
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["logits_real"].item() == pytest.approx(real.mean().item(), rel=1e-5, abs=1e-7)
    assert logs["logits_fake"].item() == pytest.approx(fake.mean().item(), rel=1e-5, abs=1e-7)
    check_logs(logs)
    d_loss.backward()
    assert dec.conv_out.weight.grad is None  # reconstructions are detached for this step
    assert all(p.grad is not None for p in crit.discriminator.parameters())


def test_discriminator_loss_can_run_through_a_wrapper():
    """The trainer passes D's DDP wrapper for D's own step; the plain module must then not run."""
    crit = VAELoss(LossConfig(disc_weight=1.0, **NARROW))
    calls = []
    crit.discriminator.register_forward_hook(lambda *_: calls.append("plain"))
    wrapper = nn.Sequential(crit.discriminator)  # stands in for DistributedDataParallel(crit.discriminator)
    wrapper.register_forward_hook(lambda *_: calls.append("wrapper"))
    _, x_hat, x = decoded()
    d_loss, _ = crit.discriminator_loss(x, x_hat.detach(), step=0, discriminator=wrapper)
    assert calls == ["plain", "wrapper"] * 2 and torch.isfinite(d_loss)


def test_discriminator_shape_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 64, 3)
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    assert NLayerDiscriminator(3, 4, 3)(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert NLayerDiscriminator(1, 4, 2)(torch.randn(1, 1, 64, 64)).shape == (1, 1, 14, 14)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 5 and len(norms) == 3
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.kernel_size == (4, 4) for c in convs)
    assert all(c.bias is None for c in convs[1:4])  # followed by BatchNorm
    # sampling bounds: the std of 2M draws is within ~5e-4 relative, the mean of 256 N(1, 0.02) within 1.3e-3
    assert convs[3].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert norms[2].weight.mean().item() == pytest.approx(1.0, abs=0.01) and (norms[2].bias == 0).all()
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in d.main if not m._parameters)


# --------------------------------------------------------------------------------------------------------
# LPIPS


def lpips_reference(x: torch.Tensor, y: torch.Tensor, folder) -> torch.Tensor:
    """LPIPS written out from the files: conv/ReLU/pool stack, taps after each block's last ReLU."""
    vgg = torch.load(folder / VGG16_FILE, weights_only=True)
    heads = torch.load(folder / LPIPS_FILE, weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(t):
        h, out, index = (t - shift) / scale, [], 0
        for item in VGG_CONVS:
            if item == "M":
                out.append(h)
                h, index = F.max_pool2d(h, 2), index + 1
            else:
                h = F.relu(
                    F.conv2d(h, vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"], padding=1)
                )
                index += 2
        return out + [h]

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((a - b) ** 2 * heads[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
    return total


@pytest.fixture(scope="module")
def lpips_net(lpips_dir):
    return LPIPS.from_files(lpips_dir / LPIPS_FILE, lpips_dir / VGG16_FILE)


@pytest.mark.numerics
def test_lpips_loads_by_name_and_matches_a_reference(lpips_dir, lpips_net):
    vgg, heads = (
        torch.load(lpips_dir / VGG16_FILE, weights_only=True),
        torch.load(lpips_dir / LPIPS_FILE, weights_only=True),
    )
    assert torch.equal(lpips_net.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(lpips_net.features[0].bias, vgg["features.0.bias"])
    assert torch.equal(lpips_net.lin3.model[1].weight, heads["lin3.model.1.weight"])
    x, y = images(H=16, W=16), images(H=16, W=16, seed=5)
    # Guards a wrong normalisation, tap or head weight: O(1). Both run torch's convs, but in other batches
    # (kernels chosen per shape): sums of up to 4,608 terms in other orders, ~sqrt(4608) * 6e-8 = 4e-6 a
    # layer over 13 layers: ~2e-5. rtol 1e-3 (was 1e-4).
    assert_close(lpips_net(x, y), lpips_reference(x, y, lpips_dir), rtol=1e-3, atol=1e-6)


@pytest.mark.numerics
def test_lpips_is_a_distance_with_gradients(lpips_net):
    x = images(H=16, W=16)
    y = images(H=16, W=16, seed=3).requires_grad_(True)
    d = lpips_net(torch.cat([x, y, x]), torch.cat([x, x, y]))  # one pass: d(x, x), d(y, x), d(x, y)
    d_xx, d_yx, d_xy = d.chunk(3)
    # d(x, x) is quadratic in the features' rounding (~1e-6): ~1e-12; a bias or a train-mode layer: >= 1e-3.
    # Symmetry guards a normalisation on one side only (O(1)); x and y sit at other batch positions, so the
    # features may round apart (~1e-6) and d by ~2e-6 relative: rtol 1e-4 (was 1e-5).
    assert d.shape == (6,) and d_xx.abs().max() < 1e-6
    assert (d_yx > 1e-3).all()
    assert_close(d_yx, d_xy, rtol=1e-4, atol=1e-7)
    d_yx.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in lpips_net.buffers()) and list(lpips_net.parameters()) == []
    lpips_net.train()
    assert not lpips_net.training


def test_perceptual_term_in_the_vae_loss(lpips_dir, lpips_net):
    crit = VAELoss(LossConfig(recon="l1", perceptual_weight=0.5, lpips_path=str(lpips_dir)))
    dec, x_hat, x = decoded(size=16)
    loss, logs = crit.autoencoder_loss(x, x_hat, None, torch.zeros(2), step=0)
    with torch.no_grad():
        perceptual = lpips_net(x_hat, x).mean().item()
    # guards a missing weight or the term on another pair: O(1); the same net on the same batch, ~1e-6
    assert logs["perceptual"].item() == pytest.approx(perceptual, rel=1e-5)
    assert loss.item() == pytest.approx((x - x_hat).abs().mean().item() + 0.5 * perceptual, rel=1e-5)
    loss.backward()
    assert dec.conv_out.weight.grad.abs().sum() > 0
    assert not any(k.startswith("perceptual") for k in crit.state_dict())  # VGG stays out of checkpoints


def test_lpips_file_convention_and_the_torch_hub_cache(lpips_dir, tmp_path, monkeypatch):
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / VGG16_FILE).symlink_to(lpips_dir / VGG16_FILE)
    heads_only = tmp_path / "heads"
    heads_only.mkdir()
    (heads_only / LPIPS_FILE).symlink_to(lpips_dir / LPIPS_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    found = find_lpips_weights(LossConfig(perceptual_weight=1.0, lpips_path=str(heads_only / LPIPS_FILE)))
    assert found == (heads_only / LPIPS_FILE, hub / VGG16_FILE)
    found = find_lpips_weights(LossConfig(lpips_path=str(lpips_dir), vgg_path=str(hub / VGG16_FILE)))
    assert found == (lpips_dir / LPIPS_FILE, hub / VGG16_FILE)


def test_missing_lpips_weights_give_a_clear_error_and_no_download(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr("urllib.request.urlopen", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(LossConfigError, match="loss.lpips_path") as err:
        VAELoss(LossConfig(perceptual_weight=1.0))
    assert VGG16_FILE in str(err.value) and isinstance(err.value, ConfigError)
    with pytest.raises(LossConfigError, match=r"loss.lpips_path='/nowhere/lpips'"):
        VAELoss(LossConfig(perceptual_weight=1.0, lpips_path="/nowhere/lpips"))
    (tmp_path / LPIPS_FILE).write_bytes(b"")
    with pytest.raises(LossConfigError, match="loss.vgg_path"):
        VAELoss(LossConfig(perceptual_weight=1.0, lpips_path=str(tmp_path / LPIPS_FILE)))


def test_a_weight_file_without_the_expected_names_is_rejected(lpips_dir, tmp_path):
    heads = torch.load(lpips_dir / LPIPS_FILE, weights_only=True)
    torch.save({k.replace("lin4", "lin_4"): v for k, v in heads.items()}, tmp_path / LPIPS_FILE)
    with pytest.raises(LossConfigError, match=r"lin4\.model\.1\.weight"):
        LPIPS.from_files(tmp_path / LPIPS_FILE, lpips_dir / VGG16_FILE)


# --------------------------------------------------------------------------------------------------------
# Everything together


@pytest.mark.parametrize("recon", ["l1", "l2", "gaussian", "logistic"])
def test_full_objective_is_finite_with_detached_logs(recon):
    cfg = LossConfig(
        recon=recon,
        kl_weight=1e-4,
        kl_warmup_steps=10,
        free_bits=0.1,
        disc_weight=0.5,
        disc_layers=2,
        **NARROW,
    )
    crit = VAELoss(cfg)
    dec, x_hat, x = decoded()
    post, moments = make_posterior(B=2)
    loss, logs = crit.autoencoder_loss(x, x_hat, post, post.kl(), step=5, last_layer=dec.last)
    assert loss.ndim == 0 and torch.isfinite(loss)
    expected = {"loss", "rec", "nll", "kl", "kl_weight", "kl_free_bits", "g_loss", "d_weight", "disc_factor"}
    expected |= {"bits_per_dim", "logvar"} if recon == "gaussian" else set()
    expected |= {"bits_per_dim", "log_scale"} if recon == "logistic" else set()
    assert set(logs) == expected
    check_logs(logs)
    loss.backward()
    grads = [p.grad for p in [*dec.parameters(), *crit.vae_parameters()]] + [moments.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    d_loss, d_logs = crit.discriminator_loss(x, x_hat.detach(), step=5)
    assert torch.isfinite(d_loss) and set(d_logs) == {"d_loss", "logits_real", "logits_fake"}
    check_logs(d_logs)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="loss.disc_layers"):
        LossConfig(disc_layers=0)
    with pytest.raises(ConfigError, match="loss.kl_warmup_steps"):
        LossConfig(kl_warmup_steps=-1)
    with pytest.raises(ConfigError, match="loss.recon"):
        LossConfig(recon="bernoulli")


def test_with_the_real_vae_under_bf16_autocast():
    torch.manual_seed(0)
    cfg = ModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, kernels="torch")
    vae = VAE(cfg)
    crit = VAELoss(LossConfig(recon="logistic", free_bits=0.5, disc_weight=0.5, disc_layers=2, **NARROW))
    x = images(H=16, W=16)
    last = LastLayer(vae.decoder.conv_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        post = vae.encode(x)
        z, kl = post.sample_kl()
        x_hat = vae.decode(z)
        loss, logs = crit.autoencoder_loss(x, x_hat, post, kl, step=0, last_layer=last)
        d_loss, d_logs = crit.discriminator_loss(x, x_hat.detach(), step=0)
    assert loss.dtype == torch.float32 and d_loss.dtype == torch.float32
    check_logs(logs)
    check_logs(d_logs)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and crit.log_scale.grad is not None
