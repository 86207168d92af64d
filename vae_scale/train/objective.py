"""The VAE training objective: reconstruction likelihood, KL schedule, LPIPS-VGG, PatchGAN adversarial terms.

The objective is latent diffusion's (taming/ldm `LPIPSWithDiscriminator`) with its relative weights kept, so
`loss.kl_weight=1e-6` means what it means there, but divided by P = C*H*W pixels per image so the loss has the
scale of a per-pixel mean (what gradient clipping and learning rates are tuned against):

    loss = mean_b( nll_sum_b + w_kl(step) * kl_b ) / P  +  perceptual_weight * mean_b(lpips_b)
           + d_weight * disc_factor(step) * g_loss
           + sum over T drawn this micro-batch: weight_T * [the first line's reconstruction terms for
                                                             decode(T(z)) against T(x)]

nll_sum_b is the reconstruction NLL summed over the P pixels of image b (so mean_b(nll_sum_b) / P is simply
the mean over every element), kl_b the KL of its posterior summed over the latent (or the free-bits form),
w_kl(step) = kl_weight * min(1, step / kl_warmup_steps). LDM adds LPIPS to every pixel's reconstruction term,
which summed and divided by P is perceptual_weight * lpips_b. LDM then divides that sum by exp(logvar) and
adds logvar, but its logvar is never given to an optimiser, so it stays at logvar_init (0 in its configs):
recon=l1 with perceptual_weight=1 is LDM's term exactly.

Clips (B, C, T, H, W) take the same objective with P = C*T*H*W: the reconstruction over every frame, KL_b
summed over the 5-D latent (B, c, t, h, w) as an image's is over its 3-D one (so kl_weight keeps its meaning
per latent number), LPIPS on every frame (T folded into the batch; the mean over frames is the clip's term,
no frame left out: a subsample would leave the first frame, which Wan encodes on its own, unweighted half
the time), and the 3D PatchGAN (discriminator.NLayerDiscriminator3D) on the whole clip. A one-frame clip,
an image of a mixed batch, goes the same way. d_weight is LDM's adaptive weight, from the
gradients of the first two terms (LDM's `nll_loss`, divided by P) and of g_loss w.r.t. the decoder's last
layer, capped where LDM caps it (adaptive_weight). docs/objective.md lists where the `sd-finetune` recipe
differs from LDM's training and why. The last line holds the diffusability regularisers
(vae_scale/eval/equivariance.py): scale equivariance (T a 2x/4x downsampling, weight se_weight) and EQ-VAE
(T a scaling, rotation or flip, weight eq_weight), each at its own image size.

With recon=logistic, kl_weight=1 and no warm-up/free bits, loss / ln 2 is exactly the negative ELBO in bits
per dimension of the 8-bit images; `bits_per_dim` is logged with the unweighted KL whatever the schedule.
recon=gaussian is a density on [-1, 1], so its bits_per_dim adds log(127.5) nats per dimension: the mass of
a 2/255-wide bin is density * 2/255 (an upper bound on -log-likelihood only for uniformly dequantised data).

    crit = VAELoss(cfg.loss, image_channels=3)
    last = LastLayer(*vae.last_layer())                   # records the decoder's last input every forward
    loss, logs = crit.autoencoder_loss(x, x_hat, posterior, kl, step, last_layer=last)
    d_loss, d_logs = crit.discriminator_loss(x, x_hat.detach(), step)   # when crit.discriminator is not None
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale.config import LossConfig
from vae_scale.eval.likelihood import (
    LOG_SCALE_MIN,
    discretized_logistic_log_prob,
    gaussian_nll,
    quantize_8bit,
)
from vae_scale.eval.lpips import LPIPS, LPIPS_MIN_SIZE, LossConfigError, find_lpips_weights
from vae_scale.train.alignment import Aligned, VFAlignment
from vae_scale.train.discriminator import NLayerDiscriminator, NLayerDiscriminator3D

if TYPE_CHECKING:
    from vae_scale.eval.equivariance import TransformedDecode
    from vae_scale.models.posterior import DiagonalGaussian


# --------------------------------------------------------------------------------------------------------
# KL terms


def free_bits_kl(kl_channels: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Free-bits KL of Kingma et al. 2016 (IAF): sum_c max(mean_b KL[b, c], free_bits), a 0-dim tensor.

    kl_channels: (B, C) per-channel KL in nats (DiagonalGaussian.kl_per_channel). The max is taken on the
    minibatch mean of each channel, so a channel whose mean KL is below free_bits costs a constant and gets
    no gradient at all.
    """
    return torch.clamp(kl_channels.mean(0), min=free_bits).sum()


class LastLayer:
    """The decoder's last convolution and the input it saw in the current forward.

    Enough for d(loss)/d(weight) from d(loss)/d(output) (`weight_grad`), which is what LDM's adaptive weight
    needs, without autograd through the weight itself: under FSDP the weight is a shard that the forward
    never touched, and under any wrapper a partial backward would run the wrapper's hooks. Attach it once;
    it records the input of every forward (detached) through a pre-forward hook. shuffle: the pixel-shuffle
    factor between the convolution's output and the image (1: the output is the image), from the model's
    `last_layer()`.
    """

    def __init__(self, conv: nn.Conv2d, shuffle: int = 1):
        self.conv = conv
        self.shuffle = shuffle
        self.input: torch.Tensor | None = None
        self._hook = conv.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.input = args[0].detach()

    def weight_grad(self, grad_output: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(conv.weight) in float32, given d(loss)/d(output) of the recorded forward."""
        if self.input is None:
            raise RuntimeError("LastLayer: the convolution has not run a forward since it was attached")
        c = self.conv
        if self.shuffle > 1:  # d(loss)/d(conv output) from d(loss)/d(image) = pixel_shuffle(conv output)
            grad_output = F.pixel_unshuffle(grad_output, self.shuffle)
        return torch.nn.grad.conv2d_weight(
            self.input.float(), c.weight.shape, grad_output.float(), c.stride, c.padding, c.dilation, c.groups
        )

    def remove(self) -> None:
        """Detach the hook."""
        self._hook.remove()


def frames(x: torch.Tensor) -> torch.Tensor:
    """Clips (B, C, T, H, W) as B*T images (B*T, C, H, W), clip-major; images unchanged."""
    return x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x


def _filled(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 tensor of `value` on like's device: a fill (the number is a kernel argument), not a
    tensor copied from the host, which on a GPU would wait for the copy."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def _whole(p: torch.Tensor) -> torch.Tensor:
    """The full value of a parameter: gathered when it is an FSDP shard (a collective), else itself."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


class LearnedScale(nn.Module):
    """The reconstruction likelihood's learned scale: Gaussian logvar (shape (1,)) or logistic log-scale (C,).

    A module of its own so that the trainer's wrapped model and the loss share it: when FSDP replaces the
    parameter with its shard, both see the replacement. Old checkpoints stored the Gaussian logvar as a
    0-dim tensor; loading reshapes it.
    """

    def __init__(self, cfg: LossConfig, image_channels: int):
        super().__init__()
        self.name = "logvar" if cfg.recon == "gaussian" else "log_scale"
        if cfg.recon == "gaussian":
            value = torch.full((1,), float(cfg.logvar_init))
        else:
            value = torch.full(
                (image_channels if cfg.logistic_per_channel else 1,), float(cfg.log_scale_init)
            )
        self.register_parameter(self.name, nn.Parameter(value))

    def value(self) -> torch.Tensor:
        """The current scale (the full tensor under FSDP outside a forward; differentiable)."""
        return _whole(getattr(self, self.name))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + self.name
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------
# The objective

LDM_D_WEIGHT_MAX = 1e4
"""LDM's cap on its adaptive weight's ratio of gradient norms, in its units (the NLL summed per image)."""


class VAELoss(nn.Module):
    """The whole VAE objective (see the module docstring): learned likelihood scale, LPIPS, discriminator.

    Holds `likelihood` (a LearnedScale for recon=gaussian | logistic, else None), optimised with the VAE
    (vae_parameters()); the frozen LPIPS net (perceptual_weight > 0); and `discriminator`, an
    NLayerDiscriminator (NLayerDiscriminator3D for clips) or None when disc_weight == 0, which the trainer
    optimises on its own. LPIPS weights are non-persistent buffers, so state_dict() holds only the learned
    scale and the discriminator.
    """

    def __init__(
        self,
        cfg: LossConfig,
        image_channels: int = 3,
        lpips_files: tuple[Path, Path] | None = None,
        clips: bool = False,
    ):
        """lpips_files: (heads, VGG16) as checks.check_run found them; None: find_lpips_weights. clips: the
        run trains on clips (data.frames > 1): the discriminator is the 3D one."""
        super().__init__()
        self.cfg = cfg
        self.likelihood: LearnedScale | None = None
        if cfg.recon in ("gaussian", "logistic"):
            self.likelihood = LearnedScale(cfg, image_channels)
        self.perceptual: LPIPS | None = None
        if cfg.perceptual_weight > 0:
            if image_channels != 3:
                raise LossConfigError(
                    f"loss.perceptual_weight > 0 needs RGB input, not {image_channels} channels"
                )
            self.perceptual = LPIPS.from_files(*(lpips_files or find_lpips_weights(cfg)))
        self.discriminator: nn.Module | None = None
        if cfg.disc_weight > 0:
            kind = NLayerDiscriminator3D if clips else NLayerDiscriminator
            self.discriminator = kind(image_channels, cfg.disc_channels, cfg.disc_layers)
        # The VF loss's frozen ViT (align_weight > 0); its projection lives in the trainer's Autoencoder.
        self.alignment = VFAlignment(cfg) if cfg.align_weight > 0 else None

    @property
    def logvar(self) -> torch.Tensor | None:
        """recon=gaussian: the learned log-variance, shape (1,); else None."""
        return self.likelihood.value() if self.cfg.recon == "gaussian" else None

    @property
    def log_scale(self) -> torch.Tensor | None:
        """recon=logistic: the learned log-scale per channel (or one); else None."""
        return self.likelihood.value() if self.cfg.recon == "logistic" else None

    def vae_parameters(self) -> list[nn.Parameter]:
        """Parameters to optimise with the VAE: the learned logvar / log-scale, or nothing."""
        return [] if self.likelihood is None else list(self.likelihood.parameters())

    def likelihood_state(self) -> dict[str, torch.Tensor]:
        """The learned scale by name ("logvar" | "log_scale"), full and on the CPU; {} for l1/l2.

        A collective under FSDP: call it on every rank.
        """
        if self.likelihood is None:
            return {}
        return {self.likelihood.name: self.likelihood.value().detach().cpu().clone()}

    # -- schedules -----------------------------------------------------------------------------------------

    def kl_weight(self, step: int) -> float:
        """w_kl(step) = kl_weight * min(1, step / kl_warmup_steps); kl_weight when there is no warm-up."""
        if self.cfg.kl_warmup_steps <= 0:
            return self.cfg.kl_weight
        return self.cfg.kl_weight * min(1.0, step / self.cfg.kl_warmup_steps)

    def disc_active(self, step: int) -> bool:
        """Whether the adversarial terms are on: a discriminator exists and step >= loss.disc_start."""
        return self.discriminator is not None and step >= self.cfg.disc_start

    def disc_factor(self, step: int) -> float:
        """1.0 from loss.disc_start on, 0.0 before (taming's adopt_weight)."""
        return 1.0 if self.disc_active(step) else 0.0

    # -- pieces --------------------------------------------------------------------------------------------

    def _reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, nll) per element, float32 (B, C, H, W) or (B, C, T, H, W); nll in nats for gaussian /
        logistic."""
        recon = self.cfg.recon
        ones = (1,) * (x.ndim - 2)  # the scale broadcast over every position of the image or clip
        if recon in ("l1", "logistic"):
            rec = (x - x_hat).abs()
        else:
            rec = (x - x_hat).square()
        if recon == "gaussian":
            nll = gaussian_nll(x, x_hat, self.logvar.view(1, 1, *ones))
        elif recon == "logistic":
            log_scale = self.log_scale.clamp(min=LOG_SCALE_MIN).view(1, -1, *ones)
            nll = -discretized_logistic_log_prob(quantize_8bit(x), x_hat, log_scale)
        else:  # l1 / l2: LDM's rec / exp(logvar) + logvar with its untrained logvar at 0
            nll = rec
        return rec, nll

    def _reconstruction_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, logs: dict[str, torch.Tensor], perceptual: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(LDM's nll_loss: NLL mean plus the perceptual term, the NLL mean, the distance mean)."""
        rec, nll = self._reconstruction(x.float(), x_hat.float())
        nll_loss = nll.mean()  # = mean_b(nll summed over the image) / P
        rec_loss = nll_loss
        if self.perceptual is not None and perceptual:
            perceptual = self.perceptual(frames(x_hat), frames(x)).mean()  # every frame of every clip
            rec_loss = rec_loss + self.cfg.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        return rec_loss, nll_loss, rec.mean()

    def _reconstruction_grad(
        self, x: torch.Tensor, x_rec: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(d rec_loss / d x_rec, (rec_loss, nll_loss, rec_mean, {"perceptual": ...} or {})); x_rec detached.

        torch.func rather than torch.autograd.grad, which torch.compile cannot trace: the objective compiles
        into one graph. rec_loss keeps its gradient w.r.t. the learned likelihood scale (an ordinary autograd
        input of the transformed function); the gradient returned is detached, as autograd.grad's is (it is
        a function of that scale too, which must not be differentiated).
        """

        def reconstruction(t: torch.Tensor):
            terms: dict[str, torch.Tensor] = {}
            rec_loss, nll_loss, rec_mean = self._reconstruction_loss(x, t, terms)
            return rec_loss, (rec_loss, nll_loss, rec_mean, terms)

        grad, aux = torch.func.grad(reconstruction, has_aux=True)(x_rec)
        return grad.detach(), aux

    def _generator_grad(self, x_rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d g_loss / d x_rec, g_loss) at a detached x_rec, through self.discriminator (in its current mode,
        so BatchNorm's running statistics update as in a plain forward).

        The discriminator runs with its parameters detached (the generator term trains no discriminator
        weight) and its buffers passed in: a torch.func transform updates buffers only when they are inputs.
        """
        disc = self.discriminator
        params = {k: v.detach() for k, v in disc.named_parameters()}

        def generator(t: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.generator_loss(torch.func.functional_call(disc, (params, buffers), (t.contiguous(),)))

        grad, g_loss = torch.func.grad_and_value(generator)(x_rec, dict(disc.named_buffers()))
        return grad.detach(), g_loss

    def generator_loss(self, logits_fake: torch.Tensor) -> torch.Tensor:
        """Generator term from reconstructions' patch logits: -mean (hinge) | mean softplus(-l) (non-sat.)."""
        logits_fake = logits_fake.float()
        if self.cfg.disc_loss == "hinge":
            return -logits_fake.mean()
        return F.softplus(-logits_fake).mean()

    def adaptive_weight(
        self, rec_grad: torch.Tensor, g_grad: torch.Tensor, last_layer: LastLayer | None, pixels: int
    ) -> torch.Tensor:
        """LDM's d_weight in this loss's units: ||d rec_loss / dW|| / (||d g_loss / dW|| + 1e-4), clamped to
        [0, 1e4 / pixels], detached, times loss.disc_weight; W = the decoder's last layer weight.

        LDM's reconstruction term is this rec_loss times pixels (P = C*H*W, it sums over the image) and its
        g_loss is this one, so its ratio is P times this one, the 1e-4 sitting with g_loss's gradient in
        both; LDM clamps its ratio at 1e4, which here is 1e4 / P. The result is LDM's d_weight / P, the
        weight of g_loss in a loss that is LDM's divided by P. rec_grad, g_grad: the two losses' gradients
        w.r.t. the reconstruction, from which `last_layer` gives theirs w.r.t. W. Falls back to
        loss.disc_weight without a last layer.
        """
        if last_layer is None:
            return _filled(self.cfg.disc_weight, g_grad)
        rec_w, g_w = last_layer.weight_grad(rec_grad), last_layer.weight_grad(g_grad)
        weight = rec_w.norm() / (g_w.norm() + 1e-4)
        return weight.clamp(0.0, LDM_D_WEIGHT_MAX / pixels).detach() * self.cfg.disc_weight

    def transformed_loss(
        self, x: torch.Tensor, transformed: Sequence[TransformedDecode], logs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The scale-equivariance and EQ-VAE terms: sum of weight * (NLL mean + perceptual) of each decode
        of a transformed latent against the image under the same transform, at its size (0-dim, float32).

        The perceptual term applies to targets of at least LPIPS_MIN_SIZE px a side (VGG16 pools four times).
        Logs se_loss / eq_loss, the weighted term, for each term that is on (0 when not drawn this time).
        """
        weights = {"se": self.cfg.se_weight, "eq": self.cfg.eq_weight}
        for term, weight in weights.items():
            if weight > 0:
                logs[f"{term}_loss"] = torch.zeros((), device=x.device)
        total = torch.zeros((), device=x.device)
        for d in transformed:
            if not weights.get(d.term, 0.0) > 0:
                raise ValueError(f"a transformed decode for term {d.term!r}, whose loss.{d.term}_weight is 0")
            target = d.target(x.float())
            rec_loss, _, _ = self._reconstruction_loss(
                target, d.x_hat, {}, perceptual=min(target.shape[-2:]) >= LPIPS_MIN_SIZE
            )
            term = weights[d.term] * rec_loss
            total = total + term
            logs[f"{d.term}_loss"] = term.detach()
        return total

    # -- the two steps -------------------------------------------------------------------------------------

    def autoencoder_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        posterior: DiagonalGaussian | None,
        kl: torch.Tensor,
        step: int,
        last_layer: LastLayer | None = None,
        transformed: Sequence[TransformedDecode] = (),
        aligned: Aligned | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The VAE's loss (0-dim, float32) and logs (0-dim detached tensors, no host sync).

        x, x_hat: (B, C, H, W) images or (B, C, T, H, W) clips in [-1, 1]; posterior: has .mean / .logvar
        (B, c, h, w) or (B, c, t, h, w), read only when free_bits > 0; kl: (B,) KL per image summed over the
        latent (posterior.sample_kl's); last_layer: the
        decoder's last convolution with the input of this forward, for the adaptive adversarial weight
        (None: loss.disc_weight). Logs: loss, rec, nll (nats per pixel for gaussian/logistic), kl (per
        image), kl_weight, [kl_free_bits], [perceptual], [g_loss, d_weight, disc_factor], [bits_per_dim],
        [logvar | log_scale], [se_loss], [eq_loss]. transformed: decodes of transformed latents from this
        forward, for the scale-equivariance and EQ-VAE terms (transformed_loss), added as ordinary terms.
        aligned: the projected latent of this forward, for the VF loss (alignment.py; loss.align_weight > 0),
        which logs align_loss, align_cos, align_distmat and align_adaptive.

        With the adversarial term on and gradients enabled, the terms that depend on x_hat are computed on a
        detached copy, their gradients w.r.t. it taken there, weighted, and sent into the model through x_hat
        in one backward: the discriminator's parameters get no gradient from the generator term, and nothing
        differentiates through the (possibly sharded or wrapped) decoder twice. The loss value is unchanged.
        """
        P = x[0].numel()
        logs: dict[str, torch.Tensor] = {}
        adversarial = self.discriminator is not None and self.disc_active(step)
        split = adversarial and torch.is_grad_enabled() and x_hat.requires_grad
        if split:
            x_rec = x_hat.detach().float()
            rec_grad, (rec_loss, nll_loss, rec_mean, perceptual) = self._reconstruction_grad(x, x_rec)
            logs |= perceptual
        else:
            rec_loss, nll_loss, rec_mean = self._reconstruction_loss(x, x_hat, logs)

        kl_mean = kl.float().mean()
        if self.cfg.free_bits > 0:
            if posterior is None:
                raise ValueError("loss.free_bits > 0 needs the posterior (its mean and logvar), got None")
            kl_term = free_bits_kl(posterior.kl_per_channel(), self.cfg.free_bits)
            logs["kl_free_bits"] = kl_term.detach()
        else:
            kl_term = kl_mean
        w_kl = self.kl_weight(step)
        loss = rec_loss + w_kl * kl_term / P

        if self.discriminator is not None:
            factor = self.disc_factor(step)
            if split:
                g_grad, g_loss = self._generator_grad(x_rec)
                d_weight = self.adaptive_weight(rec_grad, g_grad, last_layer, P)
                push = (x_hat.float() * (rec_grad + d_weight * factor * g_grad)).sum()
                loss = loss + (push - push.detach()) + (d_weight * factor * g_loss).detach()
            elif adversarial:  # no gradients wanted (validation): the value only
                g_loss = self.generator_loss(self.discriminator(x_hat.contiguous()))
                d_weight = _filled(self.cfg.disc_weight, x)
                loss = loss + d_weight * factor * g_loss
            else:  # before disc_start: no discriminator forward at all
                g_loss = d_weight = torch.zeros((), device=x.device)
            logs |= {
                "g_loss": g_loss.detach(),
                "d_weight": d_weight.detach(),
                "disc_factor": _filled(factor, x),
            }
        if self.cfg.se_weight > 0 or self.cfg.eq_weight > 0 or transformed:
            loss = loss + self.transformed_loss(x, transformed, logs)
        if self.alignment is not None:
            if aligned is None:
                raise ValueError("loss.align_weight > 0 needs the projected latent (aligned), got None")
            term, align_logs = self.alignment.loss(x, aligned, P)
            loss, logs = loss + term, logs | align_logs

        logs |= {
            "loss": loss.detach(),
            "rec": rec_mean.detach(),
            "nll": nll_loss.detach(),
            "kl": kl_mean.detach(),
            "kl_weight": _filled(w_kl, x),
        }
        if self.cfg.recon in ("gaussian", "logistic"):
            nats = nll_loss + kl_mean / P
            if self.cfg.recon == "gaussian":  # a density on [-1, 1]: probability of a bin ~ density * 2/255
                nats = nats + math.log(127.5)
            logs["bits_per_dim"] = (nats / math.log(2)).detach()
            # A copy: under FSDP the parameter's gathered storage is freed after backward.
            scale = self.likelihood.value().detach().clone()
            logs[self.likelihood.name] = scale.mean() if self.cfg.recon == "logistic" else scale.reshape(())
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, step: int, discriminator: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real x and detached reconstructions x_hat, times disc_factor(step).

        hinge: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))); non_saturating: 0.5 * (mean
        softplus(-D(x)) + mean softplus(D(x_hat))). Real and fake go through D separately (BatchNorm sees
        each on its own, as in taming). `discriminator` replaces self.discriminator for this call, e.g. its
        DDP wrapper (the generator term in autoencoder_loss always uses the plain self.discriminator).
        Logs: d_loss, logits_real, logits_fake (means), 0-dim detached.
        """
        if self.discriminator is None:
            raise RuntimeError("loss.disc_weight is 0: there is no discriminator to train")
        disc = self.discriminator if discriminator is None else discriminator
        logits_real = disc(x.detach().contiguous()).float()
        logits_fake = disc(x_hat.detach().contiguous()).float()
        if self.cfg.disc_loss == "hinge":
            d_loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        else:
            d_loss = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
        d_loss = self.disc_factor(step) * d_loss
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
