"""vae-scale: train and fine-tune large convolutional VAEs, from a laptop CPU to many GPU nodes."""

from vae_scale.config import Config, ConfigError, load_config
from vae_scale.models.interface import build_model, load_checkpoint, load_diffusers
from vae_scale.models.posterior import DeterministicLatent, DiagonalGaussian
from vae_scale.models.sd import VAE

__version__ = "0.1.0"
__all__ = [
    "VAE",
    "DiagonalGaussian",
    "DeterministicLatent",
    "Config",
    "ConfigError",
    "build_model",
    "load_checkpoint",
    "load_config",
    "load_diffusers",
    "__version__",
]
