"""vae-scale: train and fine-tune large convolutional VAEs, from a laptop CPU to many GPU nodes."""

from vae_scale.config import Config, ConfigError, load_config
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.models.sd import VAE

__version__ = "0.1.0"
__all__ = ["VAE", "DiagonalGaussian", "Config", "ConfigError", "load_config", "__version__"]
