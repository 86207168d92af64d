"""The SD family: latent diffusion's KL autoencoder (Stable Diffusion, SDXL, FLUX.1), Encoder, Decoder, VAE.

The architecture is the KL autoencoder of latent diffusion (Stable Diffusion, SDXL, FLUX), with module
names equal to diffusers' AutoencoderKL so weights move between the two by name. The model is written for
one device: activation checkpointing, channels_last and compile are applied from outside, in one ordered
place (vae_scale/train/wrapping.py), and FSDP sharding after them (vae_scale/train/fsdp.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from vae_scale import kernels
from vae_scale.config import ModelConfig, load_config
from vae_scale.formats import weights
from vae_scale.models.layers import Attention, DownBlock, GroupNorm, MidBlock, ResnetBlock, UpBlock
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.models.tiled import TiledRun, decode_image, encode_moments
from vae_scale.models.tiling import Tiling, tiled_apply

# --------------------------------------------------------------------------------------------------------
# Encoder and Decoder


class Encoder(nn.Module):
    """(B, in_channels, H, W) image -> (B, 2 * latent_channels, H/f, W/f) posterior moments."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chs, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block, g, eps, downsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.mid_block = MidBlock(chs[-1], g, eps, cfg.mid_block_attention)
        self.conv_norm_out = GroupNorm(chs[-1], g, eps)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) latent -> (B, out_channels, h*f, w*f) image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chs, g, eps = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g, eps, cfg.mid_block_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block + 1, g, eps, upsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.conv_norm_out = GroupNorm(chs[-1], g, eps)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


# --------------------------------------------------------------------------------------------------------
# The autoencoder


class VAE(nn.Module):
    """The KL autoencoder: encode to a DiagonalGaussian, decode a latent back to an image in [-1, 1]."""

    family = "sd"
    diffusers_classes = ("AutoencoderKL",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(c, c, 1) if config.quant_convs else None
        self.post_quant_conv = nn.Conv2d(c // 2, c // 2, 1) if config.quant_convs else None
        if config.zero_init_residual:
            self._zero_residual_branches()
        self.set_kernels(config.kernels)

    def _zero_residual_branches(self) -> None:
        """Zero the last layer of every residual branch: each block starts as its skip path, and the gradient
        still reaches that layer (it sees the branch's nonzero input), so the branch grows as it learns."""
        for m in self.modules():
            if isinstance(m, (ResnetBlock, Attention)):
                last = m.conv2 if isinstance(m, ResnetBlock) else m.to_out[0]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, overrides: list[str] | None = None) -> VAE:
        """Random-init VAE of a preset (or a YAML path) with `model.key=value` overrides."""
        return cls(load_config(name, overrides).model)

    @classmethod
    def from_diffusers(cls, path: str | Path, **config_overrides) -> VAE:
        """Load a folder written by diffusers' AutoencoderKL.save_pretrained (config.json + safetensors), or
        a pipeline folder's vae/; config_overrides set ModelConfig fields that do not change the weights."""
        cfg, sd = weights.read_diffusers(path)
        vae = cls(dataclasses.replace(cfg, **config_overrides))
        weights.load_weights(
            vae, sd, f"{path}:", weights.DiffusersFormatError, "weights do not match config.json"
        )
        return vae

    @classmethod
    def from_checkpoint(cls, path: str | Path, ema: bool = False, **config_overrides) -> VAE:
        """Load the weights of a checkpoint, or of a run folder's newest complete checkpoint (see
        vae_scale.models.interface.load_checkpoint, which reads any family's)."""
        from vae_scale.models.interface import load_checkpoint

        model = load_checkpoint(path, ema=ema, **config_overrides)
        if not isinstance(model, cls):
            raise TypeError(f"{path}: a model.family={model.config.family} checkpoint, not an SD-family one")
        return model

    def save_diffusers(self, path: str | Path, config: dict | None = None) -> None:
        """Write a folder that diffusers' AutoencoderKL.from_pretrained loads unchanged.

        config: the config.json to write (default: this model's, in diffusers' keys), e.g. the one a
        fine-tune was imported from, kept key for key.
        """
        config = weights.config_to_diffusers(self.config) if config is None else config
        weights.write_diffusers(self.state_dict(), config, path)

    def set_kernels(self, impl: str) -> None:
        """Choose the fused-op backend for every GroupNorm and the posterior: auto | triton | torch."""
        if impl not in kernels.IMPLS:
            raise ValueError(f"kernels must be one of {kernels.IMPLS}, got {impl!r}")
        self.kernels = impl
        for m in self.modules():
            if isinstance(m, GroupNorm):
                m.kernels = impl

    # -- the places the trainer cuts, compiles and reads -----------------------------------------------------

    def blocks(self) -> list[str]:
        """Each encoder and decoder level and both mid blocks: where activation checkpointing and FSDP cut."""
        names = []
        for coder, levels in (("encoder", "down_blocks"), ("decoder", "up_blocks")):
            names.append(f"{coder}.mid_block")
            names += [f"{coder}.{levels}.{i}" for i in range(len(getattr(self, coder).get_submodule(levels)))]
        return names

    def compile_units(self) -> list[nn.Module]:
        return [self.encoder, self.decoder]

    def last_layer(self) -> tuple[nn.Conv2d, int]:
        return self.decoder.conv_out, 1

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """As diffusers' pipelines do: (z - latents_mean) * scaling_factor / latents_std when the config has
        per-channel statistics (SDXL), else (z - shift_factor) * scaling_factor (FLUX.1; SD: no shift)."""
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean, std = (
                torch.tensor(v, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                for v in (c.latents_mean, c.latents_std)
            )
            return (z - mean) * c.scaling_factor / std
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean, std = (
                torch.tensor(v, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                for v in (c.latents_mean, c.latents_std)
            )
            return z * std / c.scaling_factor + mean
        return z / c.scaling_factor + (c.shift_factor or 0.0)

    # -- shapes --------------------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of the given size."""
        width = height if width is None else width
        f = self.downsample_factor
        return (self.config.latent_channels, height // f, width // f)

    def _check_image(self, x: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.downsample_factor
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"expected an image batch of shape (B, {c}, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"expected a latent batch of shape (B, {c}, h, w), got {tuple(z.shape)}")

    # -- forward -------------------------------------------------------------------------------------------

    def tiling(self, tiled: bool | Tiling) -> Tiling | None:
        """The Tiling that `tiled` asks for: None for False, the default (sample_size, 0.25) for True."""
        if tiled is False or tiled is None:
            return None
        return Tiling() if tiled is True else tiled

    def encode(self, x: torch.Tensor, tiled: bool | Tiling = False) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] -> posterior over (B, latent_channels, H/f, W/f).

        tiled: True or a Tiling encodes an image larger than the tile tile by tile (see Tiling).
        """
        self._check_image(x)
        tiling = self.tiling(tiled)
        if tiling is not None:
            f = self.downsample_factor
            tile, stride, extent = tiling.geometry(f, self.config.sample_size)
            if max(x.shape[2:]) > tile and tiling.norm == "image":
                moments = encode_moments(self, x, self._tiled_run(tiling, tile))
                return DiagonalGaussian(moments.to(x.device), self.kernels)
            if max(x.shape[2:]) > tile:
                moments = tiled_apply(self._moments, x, tile, stride, tile // f, extent // f)
                return DiagonalGaussian(moments, self.kernels)
        return DiagonalGaussian(self._moments(x), self.kernels)

    def decode(self, z: torch.Tensor, tiled: bool | Tiling = False) -> torch.Tensor:
        """z: (B, latent_channels, h, w) -> image (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped).

        tiled: True or a Tiling decodes a latent larger than the tile tile by tile (see Tiling).
        """
        self._check_latent(z)
        tiling = self.tiling(tiled)
        if tiling is not None:
            f = self.downsample_factor
            tile, stride, extent = tiling.geometry(f, self.config.sample_size)
            if max(z.shape[2:]) > tile // f and tiling.norm == "image":
                return decode_image(self, z, self._tiled_run(tiling, tile), f).to(z.device)
            if max(z.shape[2:]) > tile // f:
                return tiled_apply(self._image, z, tile // f, stride // f, tile, extent)
        return self._image(z)

    def _tiled_run(self, tiling: Tiling, tile: int) -> TiledRun:
        device = self.decoder.conv_out.weight.device
        return TiledRun(tile, device, torch.device("cpu") if tiling.offload else device)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)  # (B, 2C, h, w)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled latent (or the posterior mean); returns (x_hat, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior


def count_parameters(config: ModelConfig) -> int:
    """Parameters of a VAE with this config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in VAE(config).parameters())
