"""Evaluation: metrics, latent spectra, equivariance, the latent diffusion probe."""
