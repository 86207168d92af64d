"""Evaluation: the metrics and their registry, likelihoods, LPIPS, latent spectra, equivariance, and the SiT
that `vae-scale probe` trains."""
