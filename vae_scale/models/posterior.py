"""What an encoder returns: a diagonal Gaussian over the latent (the KL families) or a deterministic latent
(DC-AE), with one interface so the objective and the commands need not know which."""

from __future__ import annotations

import torch

from vae_scale import kernels

# --------------------------------------------------------------------------------------------------------
# The posterior


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)), diffusers' DiagonalGaussianDistribution math.

    logvar is clamped to [-30, 20] (zero gradient outside); KL is summed over every non-batch dim.
    """

    def __init__(self, moments: torch.Tensor, kernels_impl: str = "auto"):
        self.moments = moments  # (B, 2C, h, w), or (B, 2C, t, h, w) for a video latent
        self.mean, self._logvar = torch.chunk(moments, 2, dim=1)
        self.kernels = kernels_impl

    @property
    def logvar(self) -> torch.Tensor:
        return self._logvar.clamp(kernels.gaussian.LOGVAR_MIN, kernels.gaussian.LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """The posterior mean, the deterministic latent."""
        return self.mean

    def sample_kl(
        self,
        eps: torch.Tensor | None = None,
        prior_mean: torch.Tensor | None = None,
        prior_logvar: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised z (like mean) and KL per sample (B,) to N(0, I) or the given prior, in one op."""
        return kernels.gaussian_sample_kl(
            self.mean, self._logvar, eps, prior_mean, prior_logvar, impl=self.kernels
        )

    def sample(self, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample z = mean + std * eps."""
        return self.sample_kl(eps)[0]

    def kl_per_channel(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample and latent channel, summed over positions and frames: (B, C), float32.

        The eager math of the fused op's KL (logvar clamped as above), without drawing or computing z.
        """
        mean, logvar = self.mean.float(), self.logvar.float()
        kl = 0.5 * (mean.square() + torch.exp(logvar) - 1.0 - logvar)  # (B, C, h, w) or (B, C, t, h, w)
        return kl.sum(tuple(range(2, kl.ndim)))

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, shape (B,), float32."""
        return self.kl_per_channel().sum(1)


class DeterministicLatent:
    """The latent of an autoencoder without a posterior (DC-AE): z itself, KL zero.

    The same methods as DiagonalGaussian, so the objective, the metrics and the commands need not know
    which family they hold: sampling returns z (no noise is drawn), every KL is zeros of the right shape
    (float32, on z's device), and the loss's KL term therefore contributes nothing whatever its weight.
    """

    def __init__(self, z: torch.Tensor):
        self.mean = z

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample_kl(self, eps: torch.Tensor | None = None, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, zeros (B,)): a deterministic latent has no sample to draw and no KL to pay."""
        return self.mean, self.mean.new_zeros(self.mean.shape[0], dtype=torch.float32)

    def sample(self, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self.mean

    def kl_per_channel(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[:2], dtype=torch.float32)

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0], dtype=torch.float32)
