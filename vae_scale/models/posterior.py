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
    """The "posterior" of a deterministic autoencoder: a point mass at the encoder's output.

    It has DiagonalGaussian's methods so the trainer treats both families alike: every sample is the latent
    itself and every KL is zero (float32 zeros, no gradient), so loss.kl_weight has nothing to act on.
    """

    def __init__(self, latent: torch.Tensor):
        self.latent = latent  # (B, C, h, w)

    @property
    def mean(self) -> torch.Tensor:
        return self.latent

    def mode(self) -> torch.Tensor:
        """The latent."""
        return self.latent

    def sample(self, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The latent: there is no noise to add (eps is accepted for the common interface and ignored)."""
        return self.latent

    def sample_kl(
        self,
        eps: torch.Tensor | None = None,
        prior_mean: torch.Tensor | None = None,
        prior_logvar: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, zeros (B,) float32): the interface of DiagonalGaussian.sample_kl."""
        return self.latent, self.kl()

    def kl_per_channel(self) -> torch.Tensor:
        """Zeros (B, C), float32."""
        return torch.zeros(self.latent.shape[:2], dtype=torch.float32, device=self.latent.device)

    def kl(self) -> torch.Tensor:
        """Zeros (B,), float32."""
        return torch.zeros(self.latent.shape[0], dtype=torch.float32, device=self.latent.device)
