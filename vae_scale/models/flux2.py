"""The FLUX.2 family: FLUX.2's KL autoencoder, with module names equal to diffusers' AutoencoderKLFlux2.

The network is the SD family's (vae_scale/models/sd.py) with three differences:

- 32 latent channels (a preset value, not a code difference);
- a decoder whose widths may differ from the encoder's (`decoder_block_out_channels`);
- `bn`, a BatchNorm2d (no affine weights) over the 2x2-patchified latent (4 * 32 = 128 channels), whose
  running statistics are FLUX.2's latent normalisation: the pipeline feeds its transformer
  (patchify(z) - running_mean) / sqrt(running_var + batch_norm_eps) and inverts that before decoding.

The bn is never called by the autoencoder's own forward (nor by diffusers'): its running statistics are not
learnt, they are a record of the latent distribution, as SD's scaling_factor is. So they never move during
training: a drop-in fine-tune keeps the imported statistics (the diffusion model was trained with them), and
`vae-scale export` writes statistics measured over the data (float64 sums over N samples, the same pass that
measures the SD family's scaling factors) for a VAE trained from scratch or with --measure-latents. A
running average taken during training would mix latents of weights long since changed.

FLUX.2's own keys live in `model.arch` (decoder_block_out_channels, batch_norm_eps, batch_norm_momentum,
patch_size); every other key is the SD family's ModelConfig field of the same meaning, so they are read from
cfg.arch directly (Flux2Arch) rather than through a separate config tree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from vae_scale.config import ConfigError, ModelConfig
from vae_scale.formats import weights
from vae_scale.models.interface import arch_config
from vae_scale.models.sd import VAE

DIFFUSERS_CLASS = "AutoencoderKLFlux2"


# --------------------------------------------------------------------------------------------------------
# FLUX.2's keys of model.arch


@dataclass(frozen=True)
class Flux2Arch:
    """What FLUX.2 adds to the SD family's ModelConfig; names and defaults are AutoencoderKLFlux2's."""

    decoder_block_out_channels: tuple[int, ...] | None = None
    """The decoder's widths per level, from the encoder's outermost level inwards; null: the encoder's."""
    batch_norm_eps: float = 1e-4
    """The eps of the latent normalisation: (z - running_mean) / sqrt(running_var + eps)."""
    batch_norm_momentum: float = 0.1
    """Recorded in config.json; the running statistics are measured, not averaged (module docstring)."""
    patch_size: tuple[int, int] = (2, 2)
    """The patchification of the latent the statistics are per channel of (FLUX.2's pipelines: 2x2)."""

    def __post_init__(self) -> None:  # YAML and JSON give lists
        if self.decoder_block_out_channels is not None:
            object.__setattr__(self, "decoder_block_out_channels", tuple(self.decoder_block_out_channels))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @classmethod
    def of(cls, cfg: ModelConfig) -> Flux2Arch:
        """The FLUX.2 keys of cfg.arch, checked against cfg; ConfigError naming model.arch.KEY."""
        arch = arch_config(cfg, cls, {})
        arch.check(cfg)
        return arch

    def check(self, cfg: ModelConfig) -> None:
        dec = self.decoder_block_out_channels
        if dec is not None:
            if len(dec) != len(cfg.block_out_channels):
                raise ConfigError(
                    f"model.arch.decoder_block_out_channels has {len(dec)} levels, model.block_out_channels "
                    f"{len(cfg.block_out_channels)}: the decoder must upsample as the encoder downsamples"
                )
            for c in dec:
                if c <= 0 or c % cfg.norm_num_groups:
                    raise ConfigError(
                        f"model.arch.decoder_block_out_channels entry {c} is not a positive multiple of "
                        f"model.norm_num_groups={cfg.norm_num_groups}"
                    )
        if not self.batch_norm_eps > 0:
            raise ConfigError(f"model.arch.batch_norm_eps must be > 0, got {self.batch_norm_eps}")
        if not 0 <= self.batch_norm_momentum <= 1:
            raise ConfigError(
                f"model.arch.batch_norm_momentum must be in [0, 1], got {self.batch_norm_momentum}"
            )
        if len(self.patch_size) != 2 or min(self.patch_size) < 1:
            raise ConfigError(
                f"model.arch.patch_size must be two positive sizes, got {list(self.patch_size)}"
            )


# --------------------------------------------------------------------------------------------------------
# Patchification: the layout of FLUX.2's latent statistics


def patchify(z: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """(B, C, h, w) -> (B, C * ph * pw, h / ph, w / pw); channel c * ph * pw + i * pw + j holds the latent's
    channel c at offset (i, j) of each patch, as Flux2Pipeline._patchify_latents orders them."""
    (b, c, h, w), (ph, pw) = z.shape, patch
    if h % ph or w % pw:
        raise ValueError(f"a latent of size {h}x{w} does not split into {ph}x{pw} patches")
    z = z.view(b, c, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4)  # (B, C, ph, pw, h/ph, w/pw)
    return z.reshape(b, c * ph * pw, h // ph, w // pw)


def unpatchify(z: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """The inverse of patchify: (B, C * ph * pw, h, w) -> (B, C, h * ph, w * pw)."""
    (b, cp, h, w), (ph, pw) = z.shape, patch
    z = z.reshape(b, cp // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, h, ph, w, pw)
    return z.reshape(b, cp // (ph * pw), h * ph, w * pw)


# --------------------------------------------------------------------------------------------------------
# The autoencoder


class Flux2VAE(VAE):
    """FLUX.2's KL autoencoder: the SD family's VAE with its own decoder widths and the latent statistics."""

    family: ClassVar[str] = "flux2"
    diffusers_classes: ClassVar[tuple[str, ...]] = (DIFFUSERS_CLASS,)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.arch = arch = Flux2Arch.of(config)
        # Never called in forward (module docstring): its buffers are the latent statistics, measured.
        self.bn = nn.BatchNorm2d(
            math.prod(arch.patch_size) * config.latent_channels,
            eps=arch.batch_norm_eps,
            momentum=arch.batch_norm_momentum,
            affine=False,
            track_running_stats=True,
        )

    def decoder_config(self, config: ModelConfig) -> ModelConfig:
        """The model's config with the decoder's own widths (decoder_block_out_channels) when it has them."""
        dec = Flux2Arch.of(config).decoder_block_out_channels
        return config if dec is None else dataclasses.replace(config, block_out_channels=list(dec))

    # -- the latent statistics -------------------------------------------------------------------------------

    def statistics_layout(self, z: torch.Tensor) -> torch.Tensor:
        """The latent in the layout its normalisation's statistics are per channel of: patchified."""
        return patchify(z, self.arch.patch_size)

    @torch.no_grad()
    def set_latent_statistics(self, channel_mean: list[float], channel_var: list[float]) -> None:
        """Write measured statistics (per channel of statistics_layout) into bn's running statistics."""
        n = self.bn.num_features
        if len(channel_mean) != n or len(channel_var) != n:
            raise ValueError(
                f"expected {n} channel statistics, got {len(channel_mean)} and {len(channel_var)}"
            )
        self.bn.running_mean.copy_(torch.tensor(channel_mean, dtype=torch.float64))
        self.bn.running_var.copy_(torch.tensor(channel_var, dtype=torch.float64))

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """As Flux2Pipeline does: (patchify(z) - running_mean) / sqrt(running_var + batch_norm_eps), the
        statistics cast to z's dtype after the square root. (B, C, h, w) -> (B, 4C, h/2, w/2)."""
        mean, std = self._statistics(z)
        return (self.statistics_layout(z) - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse, as Flux2Pipeline does before decoding: unpatchify(z * std + mean)."""
        mean, std = self._statistics(z)
        return unpatchify(z * std + mean, self.arch.patch_size)

    def _statistics(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.arch.batch_norm_eps)
        return mean.to(z.device, z.dtype), std.to(z.device, z.dtype)

    # -- diffusers folders -----------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, path: str | Path, **config_overrides: Any) -> Flux2VAE:
        """Load a folder written by diffusers' AutoencoderKLFlux2.save_pretrained, or a pipeline folder's
        vae/; config_overrides set ModelConfig fields that do not change the weights (kernels, ...)."""
        bad = sorted(set(config_overrides) & {*ModelConfig.WEIGHT_KEYS, "arch", "family"})
        if bad:
            raise ValueError(f"{bad[0]} changes the architecture; it cannot be overridden on import")
        cfg, sd = weights.read_diffusers_folder(path, config_from_diffusers)
        vae = cls(dataclasses.replace(cfg, **config_overrides))
        weights.load_weights(
            vae, sd, f"{path}:", weights.DiffusersFormatError, "weights do not match config.json"
        )
        return vae

    def save_diffusers(self, path: str | Path, config: dict | None = None) -> None:
        """Write a folder that diffusers' AutoencoderKLFlux2.from_pretrained loads unchanged, bn statistics
        included. config: the config.json to write (default: this model's), e.g. the imported one."""
        config = config_to_diffusers(self.config) if config is None else config
        weights.write_diffusers(self.state_dict(), config, path)

    def diffusers_config(self) -> dict[str, Any]:
        """This model's AutoencoderKLFlux2 config.json."""
        return config_to_diffusers(self.config)


# --------------------------------------------------------------------------------------------------------
# config.json of AutoencoderKLFlux2

# Keys of FLUX.2-dev's config.json that AutoencoderKLFlux2 ignores (not arguments of its __init__).
_IGNORED = ("force_upcast",)
_SD_KEYS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)
_ARCH_KEYS = tuple(f.name for f in dataclasses.fields(Flux2Arch))


# diffusers' AutoencoderKLFlux2.__init__ defaults for the keys a config.json may leave out.
_FLUX2_DEFAULTS = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 32,
    "sample_size": 1024,
}


def config_from_diffusers(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A flux2 ModelConfig from an AutoencoderKLFlux2 config.json dict; DiffusersFormatError naming the class
    and the field for what this family cannot build the same way, and for keys it does not know."""

    def refuse(field: str, why: str) -> weights.DiffusersFormatError:
        return weights.DiffusersFormatError(f"{source}: {DIFFUSERS_CLASS} field {field!r} {why}")

    cls = d.get("_class_name")
    if cls != DIFFUSERS_CLASS:
        raise refuse("_class_name", f"is {cls!r}; the flux2 family reads {DIFFUSERS_CLASS} folders only")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in (*_SD_KEYS, *_ARCH_KEYS, *_IGNORED))
    if unknown:
        raise refuse(unknown[0], "is not a field the flux2 family knows; it may change the architecture")
    network = weights.sd_network_fields(d, refuse, _FLUX2_DEFAULTS)
    arch = {k: d[k] for k in _ARCH_KEYS if k in d}
    for key in ("decoder_block_out_channels", "patch_size"):
        if arch.get(key) is not None:
            arch[key] = list(arch[key])
    try:
        cfg = ModelConfig(family="flux2", **network, arch=arch)
        Flux2Arch.of(cfg)
    except ConfigError as e:
        raise weights.DiffusersFormatError(f"{source}: {DIFFUSERS_CLASS} config: {e}") from None
    return cfg


def config_to_diffusers(cfg: ModelConfig) -> dict[str, Any]:
    """The AutoencoderKLFlux2 config.json of a flux2 ModelConfig (every key of its __init__)."""
    if cfg.norm_eps != 1e-6:
        raise weights.DiffusersFormatError(
            f"model.norm_eps={cfg.norm_eps}: diffusers' {DIFFUSERS_CLASS} fixes it at 1e-6"
        )
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:
        diffusers_version = "0.42.0"
    arch = Flux2Arch.of(cfg)
    n = len(cfg.block_out_channels)
    dec = arch.decoder_block_out_channels
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": diffusers_version,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "decoder_block_out_channels": None if dec is None else list(dec),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        "use_quant_conv": cfg.quant_convs,
        "use_post_quant_conv": cfg.quant_convs,
        "mid_block_add_attention": cfg.mid_block_attention,
        "batch_norm_eps": arch.batch_norm_eps,
        "batch_norm_momentum": arch.batch_norm_momentum,
        "patch_size": list(arch.patch_size),
    }


def count_parameters(config: ModelConfig) -> int:
    """Parameters of a Flux2VAE with this config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Flux2VAE(config).parameters())
