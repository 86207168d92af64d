"""The `sd-finetune` objective against latent diffusion's, written out in float64 from its source.

The reference below is ldm/modules/losses/contperceptual.py `LPIPSWithDiscriminator.forward` (optimizer_idx
0 and 1, logvar at its untrained logvar_init=0) with taming-transformers' LPIPS (losses/lpips.py),
`NLayerDiscriminator` (discriminator/model.py), `adopt_weight` and `hinge_d_loss` (losses/vqperceptual.py),
on the same weights: random VGG16 and LPIPS heads from files, the recipe's discriminator, a toy decoder
whose last convolution is LDM's `last_layer`. vae_scale's loss is LDM's divided by P = C*H*W (losses.py), so
its value and every gradient times P are LDM's; the discriminator's loss is LDM's as it is. Checked before,
at and after disc_start, with LDM's adaptive weight capped at 1e4 and not.

LPIPS runs with its dropout off on both sides: LDM trains with it on (docs/objective.md).
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale.config import load_config
from vae_scale.eval.lpips import LPIPS_FILE, VGG16_FILE
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.train.objective import LastLayer, VAELoss

DISC_START = 3
SIZE = 64  # image side: P = 3 * 64 * 64 = 12288
TOL = 1e-3
"""Relative error allowed between vae_scale (float32, as it trains) and the float64 reference, norm-wise per
tensor. It guards against an objective other than LDM's: the cap in the wrong units (the weight then moves by
a factor of 2 or more, asserted below), a term missing or scaled by P where it should not be, the KL weighted
2% off (the KL carries about a fifth of the posterior's gradient in the uncapped case), a wrong generator or
hinge term. float32 rounding stays far below it on any x86 CPU, whatever the summation order: the deepest
path is VGG16's 13 convolutions of at most 4608 products each, whose rounding (~sqrt(4608) * 6e-8 = 4e-6 per
layer, independent from layer to layer) adds up to about 1e-5; no compared quantity is a small difference of
large ones (a gradient that is exactly 0 in LDM is measured against the whole gradient instead)."""


# --------------------------------------------------------------------------------------------------------
# latent diffusion's loss, written from its source, on float64 tensors


def ldm_lpips(inputs: torch.Tensor, target: torch.Tensor, vgg: dict, heads: dict) -> torch.Tensor:
    """taming's LPIPS.forward in eval mode (no dropout): (B, 1, 1, 1)."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64)[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64)[None, :, None, None]

    def net(h):  # torchvision vgg16.features[:30], split after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        outs = []
        for i in range(30):
            if f"features.{i}.weight" in vgg:
                h = F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)
            elif i in (4, 9, 16, 23):
                h = F.max_pool2d(h, 2, 2)
            else:
                h = F.relu(h)
            if i in (3, 8, 15, 22, 29):
                outs.append(h)
        return outs

    def normalize_tensor(t, eps=1e-10):
        return t / (torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + eps)

    outs0, outs1 = net((inputs - shift) / scale), net((target - shift) / scale)
    val = 0
    for kk in range(5):
        diff = (normalize_tensor(outs0[kk]) - normalize_tensor(outs1[kk])) ** 2
        val = val + F.conv2d(diff, heads[f"lin{kk}.model.1.weight"]).mean([2, 3], keepdim=True)
    return val


def ldm_discriminator(x: torch.Tensor, sd: dict, n_layers: int) -> torch.Tensor:
    """taming's NLayerDiscriminator.forward in train mode (BatchNorm on batch statistics), from weights."""
    h = F.leaky_relu(F.conv2d(x, sd["main.0.weight"], sd["main.0.bias"], stride=2, padding=1), 0.2)
    i = 2
    for n in range(1, n_layers + 1):
        h = F.conv2d(h, sd[f"main.{i}.weight"], None, stride=2 if n < n_layers else 1, padding=1)
        h = F.batch_norm(h, None, None, sd[f"main.{i + 1}.weight"], sd[f"main.{i + 1}.bias"], training=True)
        h = F.leaky_relu(h, 0.2)
        i += 3
    return F.conv2d(h, sd[f"main.{i}.weight"], sd[f"main.{i}.bias"], stride=1, padding=1)


def adopt_weight(weight, global_step, threshold=0, value=0.0):
    if global_step < threshold:
        weight = value
    return weight


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def ldm_forward(inputs, reconstructions, mean, logvar, optimizer_idx, global_step, last_layer, nets, cfg):
    """LPIPSWithDiscriminator.forward: (loss, d_weight, the unclamped ratio) for optimizer_idx 0, (d_loss,)
    for 1. mean, logvar: the posterior's; nets: (vgg, heads, discriminator weights, n_layers)."""
    vgg, heads, disc, n_layers = nets
    rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
    if cfg.perceptual_weight > 0:
        p_loss = ldm_lpips(inputs.contiguous(), reconstructions.contiguous(), vgg, heads)
        rec_loss = rec_loss + cfg.perceptual_weight * p_loss
    logvar_init = 0.0  # never in LDM's optimiser: it stays here
    nll_loss = rec_loss / torch.exp(torch.tensor(logvar_init, dtype=torch.float64)) + logvar_init
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = 0.5 * torch.sum(mean.pow(2) + torch.exp(logvar) - 1.0 - logvar, dim=[1, 2, 3])
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    disc_factor = adopt_weight(1.0, global_step, threshold=cfg.disc_start)
    if optimizer_idx == 0:
        logits_fake = ldm_discriminator(reconstructions.contiguous(), disc, n_layers)
        g_loss = -torch.mean(logits_fake)
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        ratio = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(ratio, 0.0, 1e4).detach() * cfg.disc_weight
        loss = nll_loss + cfg.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        return loss, d_weight, ratio.item()
    logits_real = ldm_discriminator(inputs.contiguous().detach(), disc, n_layers)
    logits_fake = ldm_discriminator(reconstructions.contiguous().detach(), disc, n_layers)
    return (disc_factor * hinge_d_loss(logits_real, logits_fake),)


# --------------------------------------------------------------------------------------------------------
# The comparison


class ToyDecoder(nn.Module):
    """Latent (B, 4, 16, 16) -> image (B, 3, 64, 64); conv_out is the adaptive weight's last layer."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.conv_out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.interpolate(F.silu(self.conv_in(z)), scale_factor=4.0, mode="nearest"))


def assert_close_normwise(ours: torch.Tensor, ldm: torch.Tensor, what: str, scale: float = 0.0) -> None:
    """||ours - ldm|| < TOL * ||ldm||, or TOL * scale where ldm is exactly 0 (e.g. a hinge's halves that
    cancel in a bias's gradient)."""
    err = (ours.double() - ldm).norm() / (ldm.norm() or scale)
    assert err < TOL, f"{what}: relative error {err:.2e}"


# regime -> (scale of the discriminator's last conv, which sets ||grad g_loss||; loss.kl_weight)
CASES = {
    "capped": (0.05, 1e-6),  # the recipe's kl_weight
    "uncapped": (1.0, 1.0),  # LDM's default kl_weight: the KL's share is visible at TOL
}


@pytest.mark.parametrize("regime", list(CASES))
def test_sd_finetune_is_latent_diffusions_objective(regime, lpips_dir):
    d_scale, kl_weight = CASES[regime]
    recipe = load_config("sd-finetune").loss
    cfg = dataclasses.replace(recipe, lpips_path=str(lpips_dir), disc_start=DISC_START, kl_weight=kl_weight)
    assert (cfg.recon, cfg.disc_loss, cfg.perceptual_weight, cfg.disc_weight) == ("l1", "hinge", 1.0, 0.5)
    torch.manual_seed(0)
    crit = VAELoss(cfg)
    with torch.no_grad():
        crit.discriminator.main[-1].weight.mul_(d_scale)
    dec = ToyDecoder()
    last = LastLayer(dec.conv_out)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    moments = torch.cat([torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16) * 0.5 - 1.0], 1)
    eps = torch.randn(2, 4, 16, 16)
    P = x[0].numel()

    disc64 = {n: p.detach().double().requires_grad_() for n, p in crit.discriminator.named_parameters()}
    nets = (
        {k: v.double() for k, v in torch.load(lpips_dir / VGG16_FILE).items()},
        {k: v.double() for k, v in torch.load(lpips_dir / LPIPS_FILE).items()},
        disc64,
        cfg.disc_layers,
    )
    dec64 = copy.deepcopy(dec).double()

    for step in (DISC_START - 1, DISC_START, DISC_START + 1):
        # vae_scale, as the trainer runs it
        dec.zero_grad(set_to_none=True)
        crit.discriminator.zero_grad(set_to_none=True)
        leaf = moments.clone().requires_grad_()
        posterior = DiagonalGaussian(leaf, kernels_impl="torch")
        z, kl = posterior.sample_kl(eps)
        x_hat = dec(z)
        loss, logs = crit.autoencoder_loss(x, x_hat, posterior, kl, step, last_layer=last)
        loss.backward()
        ours = [p.grad for p in dec.parameters()] + [leaf.grad]
        d_loss, _ = crit.discriminator_loss(x, x_hat.detach(), step)
        d_loss.backward()
        ours_d = [p.grad for p in crit.discriminator.parameters()]

        # latent diffusion, float64
        leaf64 = moments.double().requires_grad_()
        mean64, logvar64 = leaf64.chunk(2, 1)
        x_hat64 = dec64(mean64 + torch.exp(0.5 * logvar64) * eps.double())
        x64 = x.double()
        ldm_loss, ldm_d_weight, ratio = ldm_forward(
            x64, x_hat64, mean64, logvar64, 0, step, dec64.conv_out.weight, nets, cfg
        )
        ldm_grads = torch.autograd.grad(ldm_loss, [*dec64.parameters(), leaf64])
        (ldm_d_loss,) = ldm_forward(x64, x_hat64, mean64, logvar64, 1, step, None, nets, cfg)
        ldm_d_grads = torch.autograd.grad(ldm_d_loss, list(disc64.values()))

        # The regime is the one named, away from the cap's edge; where LDM caps, a cap of 1e4 on vae_scale's
        # own ratio (P times smaller: 1e4 * P in LDM's units) would not, the weight 2x off or more.
        if regime == "capped":
            assert ratio > 2e4 and ratio / P < 1e4, ratio
        else:
            assert ratio < 0.5e4, ratio
        if step >= DISC_START:
            assert_close_normwise(logs["d_weight"] * P, ldm_d_weight, f"step {step}: d_weight")
        assert_close_normwise(loss.detach() * P, ldm_loss.detach(), f"step {step}: loss")
        names = [n for n, _ in dec.named_parameters()] + ["posterior mean and logvar"]
        for name, g, ref in zip(names, ours, ldm_grads, strict=True):
            assert_close_normwise(g * P, ref, f"step {step}: gradient of {name}")

        if step < DISC_START:  # adopt_weight's 0: LDM steps on zero gradients, the trainer skips the step
            assert ldm_d_loss.item() == 0.0 and d_loss.item() == 0.0
            assert not any(g.any() for g in ours_d) and not any(g.any() for g in ldm_d_grads)
            continue
        assert_close_normwise(d_loss.detach(), ldm_d_loss.detach(), f"step {step}: d_loss")
        whole = torch.cat([g.flatten() for g in ldm_d_grads]).norm().item()
        for (name, _), g, ref in zip(crit.discriminator.named_parameters(), ours_d, ldm_d_grads, strict=True):
            assert_close_normwise(g, ref, f"step {step}: discriminator gradient of {name}", scale=whole)
