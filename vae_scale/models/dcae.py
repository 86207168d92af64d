"""DC-AE, the deep compression autoencoder (Chen et al. 2024, arXiv 2410.10733), SANA's autoencoder.

A deterministic autoencoder with 32x to 128x spatial compression. What lets it train at such factors is
residual autoencoding: every resolution change adds a parameter-free shortcut (space-to-channel with channel
averaging going down, channel duplication with channel-to-space going up), so each stage learns a residual
over a plain rearrangement of its input. The shallow stages are ResBlocks, the deep ones EfficientViT
blocks (ReLU linear attention over multi-scale q/k/v, then a gated depthwise MLP), all normalised by RMSNorm
over channels, which the fused rms_norm_act kernel computes.

Module names equal diffusers' AutoencoderDC (0.42), so state_dict() keys are diffusers' keys and weights
move between the two with load_state_dict. The model is written for one device: activation checkpointing,
channels_last, compile and FSDP are applied from outside, at blocks().
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale import kernels
from vae_scale.config import ModelConfig, load_config
from vae_scale.formats import weights
from vae_scale.models.dcae_config import (
    ACTIVATIONS,
    FUSED_ACTS,
    SHARED,
    DCAEConfig,
    config_from_diffusers,
    config_to_diffusers,
)
from vae_scale.models.interface import arch_config, model_config
from vae_scale.models.posterior import DeterministicLatent
from vae_scale.models.tiling import refuse_tiles

# --------------------------------------------------------------------------------------------------------
# Blocks


class RMSNorm2d(nn.Module):
    """RMSNorm over the channels of each pixel, with an optional fused activation: diffusers' RMSNorm (eps
    1e-5, weight and bias) as DC-AE applies it, to x.movedim(1, -1), without the two transposes."""

    def __init__(self, channels: int, act: str = "none", eps: float = 1e-5):
        super().__init__()
        self.act, self.eps = act, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.kernels = "auto"  # set for the whole model by DCAE.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm_act(x, self.weight, self.bias, self.eps, self.act, impl=self.kernels)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, act={self.act}"


def make_norm(norm_type: str, channels: int) -> nn.Module:
    """diffusers' get_normalization for the types DC-AE uses (both eps 1e-5, with weight and bias)."""
    return RMSNorm2d(channels) if norm_type == "rms_norm" else nn.BatchNorm2d(channels, eps=1e-5)


class ResBlock(nn.Module):
    """conv -> act -> conv -> norm, plus the identity. The norm comes last, on the residual branch only, so
    the block's output scale is the skip's plus a normalised correction."""

    def __init__(self, channels: int, norm_type: str, act_fn: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.nonlinearity = ACTIVATIONS[act_fn]()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = make_norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.nonlinearity(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """One extra scale of q/k/v: a depthwise k x k conv, then a 1x1 conv mixing channels within each head."""

    def __init__(self, channels: int, heads: int, kernel_size: int):
        super().__init__()
        self.proj_in = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False
        )
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


def _no_autocast(device: torch.device):
    """Autocast off on `device` (a no-op where autocast does not exist, e.g. the meta device)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class MultiscaleLinearAttention(nn.Module):
    """ReLU linear attention (EfficientViT) over q/k/v and their multi-scale aggregates, plus the identity.

    Cost is linear in the pixels: each head sums v k^T over all positions once ((d+1) x d), then applies it
    to every query. diffusers switches to the quadratic form (softmax-free k^T q, normalised) on maps of at
    most attention_head_dim pixels; that is the same function, so this uses the linear form throughout.
    """

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str):
        super().__init__()
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim, self.eps = head_dim, 1e-15
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(
            MultiscaleProjection(3 * inner, 3 * heads, k) for k in kernel_sizes
        )
        self.nonlinearity = nn.ReLU()
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = make_norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        # to_q, to_k and to_v are the three thirds of the original's single qkv projection, not q, k and v:
        # that projection lays each head out as its q, k and v (3d consecutive channels), as the reshape
        # below reads it. One 1x1 conv computes it as one GEMM over x in its own layout (NCHW or NHWC).
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])[:, :, None, None]
        qkv = F.conv2d(x, w_qkv)  # (B, 3 * inner, H, W)
        qkv = torch.cat([qkv, *(p(qkv) for p in self.to_qkv_multiscale)], dim=1)
        # fp32 even under autocast: the output divides by a sum over every position.
        with _no_autocast(x.device):
            qkv = qkv.float().reshape(B, -1, 3 * self.head_dim, H * W)  # (B, G, 3d, N)
            q, k, v = qkv.chunk(3, dim=2)  # (B, G, d, N) each
            q, k = self.nonlinearity(q), self.nonlinearity(k)
            v = F.pad(v, (0, 0, 0, 1), value=1.0)  # a row of ones: its output row is the normaliser
            out = (v @ k.transpose(-1, -2)) @ q  # (B, G, d + 1, N)
            out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        out = out.to(x.dtype).reshape(B, -1, H, W)
        return x + self.norm_out(F.conv2d(out, self.to_out.weight[:, :, None, None]))


class GLUMBConv(nn.Module):
    """Gated inverted bottleneck: 1x1 expand (x4, twice for the gate) -> SiLU -> depthwise 3x3 -> value *
    SiLU(gate) -> 1x1 project -> RMSNorm, plus the identity. The depthwise conv gives the attention block
    the local mixing linear attention lacks."""

    def __init__(self, channels: int, expand_ratio: float = 4):
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)
        return x + self.norm(self.conv_point(h * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """Global context (multi-scale linear attention), then local mixing (GLUMBConv), each residual."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm_type)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


def make_block(
    block_type: str, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str, act_fn: str
) -> nn.Module:
    """diffusers' get_block: a ResBlock, or an EfficientViTBlock (whose RMSNorms ignore act_fn)."""
    if block_type == "ResBlock":
        return ResBlock(channels, norm_type, act_fn)
    return EfficientViTBlock(channels, head_dim, kernel_sizes, norm_type)


class Downsample(nn.Module):
    """Halve H and W: a conv (stride 2, or stride 1 then space-to-channel), plus the residual shortcut.

    The shortcut is parameter-free: space-to-channel (4x the channels), then the mean over each run of
    4*in/out consecutive channels, so the conv only learns what the rearrangement misses.
    """

    def __init__(self, in_ch: int, out_ch: int, pixel_unshuffle: bool, shortcut: bool = True):
        super().__init__()
        self.pixel_unshuffle, self.shortcut = pixel_unshuffle, shortcut
        self.group = 4 * in_ch // out_ch
        self.conv = nn.Conv2d(
            in_ch, out_ch // 4 if pixel_unshuffle else out_ch, 3, 1 if pixel_unshuffle else 2, 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.pixel_unshuffle:
            h = F.pixel_unshuffle(h, 2)
        if not self.shortcut:
            return h
        return h + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group)).mean(2)  # (B, out, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest 2x then a conv, or a conv to 4x the channels then channel-to-space, plus the
    residual shortcut: each channel repeated 4*out/in times, then channel-to-space."""

    def __init__(self, in_ch: int, out_ch: int, interpolate: bool, shortcut: bool = True):
        super().__init__()
        self.interpolate, self.shortcut = interpolate, shortcut
        self.repeats = 4 * out_ch // in_ch
        self.conv = nn.Conv2d(in_ch, out_ch if interpolate else 4 * out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            h = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        else:
            h = F.pixel_shuffle(self.conv(x), 2)
        if not self.shortcut:
            return h
        return h + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)  # (B, out, 2H, 2W)


# --------------------------------------------------------------------------------------------------------
# Encoder and decoder


class Encoder(nn.Module):
    """Image (B, in, H, W) -> latent (B, latent_channels, H/f, W/f)."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        chs, layers, n = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block, cfg.stages
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            self.conv_in: nn.Module = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        else:  # no stage-0 blocks: the input conv takes the first resolution step itself
            self.conv_in = Downsample(cfg.in_channels, chs[1], unshuffle, shortcut=False)
        types, scales = cfg.per_stage("encoder_block_types"), cfg.encoder_qkv_multiscales
        stages = []
        for i in range(n):
            blocks = [
                make_block(types[i], chs[i], cfg.attention_head_dim, scales[i], "rms_norm", "silu")
                for _ in range(layers[i])
            ]
            if i < n - 1 and layers[i] > 0:
                blocks.append(Downsample(chs[i], chs[i + 1], unshuffle))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(chs[-1], cfg.latent_channels, 3, padding=1)
        self.out_group = chs[-1] // cfg.latent_channels if cfg.encoder_out_shortcut else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down_blocks:
            h = stage(h)
        z = self.conv_out(h)
        if self.out_group:  # residual autoencoding: the latent is a correction to averaged features
            z = z + h.unflatten(1, (-1, self.out_group)).mean(2)
        return z


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, in, h*f, w*f), not clamped."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        chs, layers, n = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block, cfg.stages
        interpolate = cfg.upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[-1], 3, padding=1)
        self.in_repeats = chs[-1] // cfg.latent_channels if cfg.decoder_in_shortcut else 0
        types, scales = cfg.per_stage("decoder_block_types"), cfg.decoder_qkv_multiscales
        norms, acts = cfg.per_stage("decoder_norm_types"), cfg.per_stage("decoder_act_fns")
        stages = []
        for i in range(n):  # stored highest resolution first, as diffusers does; run deepest first
            blocks: list[nn.Module] = []
            if i < n - 1 and layers[i] > 0:
                blocks.append(Upsample(chs[i + 1], chs[i], interpolate))
            blocks += [
                make_block(types[i], chs[i], cfg.attention_head_dim, scales[i], norms[i], acts[i])
                for _ in range(layers[i])
            ]
            stages.append(nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(stages)
        ch = chs[0] if layers[0] > 0 else chs[1]
        fused = FUSED_ACTS.get(cfg.decoder_conv_act_fn)
        self.norm_out = RMSNorm2d(ch, act=fused or "none")
        self.conv_act = None if fused else ACTIVATIONS[cfg.decoder_conv_act_fn]()
        if layers[0] > 0:
            self.conv_out: nn.Module = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        else:  # no stage-0 blocks: the output conv takes the last resolution step itself
            self.conv_out = Upsample(ch, cfg.in_channels, interpolate, shortcut=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.in_repeats:  # residual autoencoding: the features start as the duplicated latent
            h = h + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            h = stage(h)
        h = self.norm_out(h)
        if self.conv_act is not None:
            h = self.conv_act(h)
        return self.conv_out(h)


# --------------------------------------------------------------------------------------------------------
# The autoencoder


class DCAE(nn.Module):
    """The deep compression autoencoder: encode to a DeterministicLatent, decode a latent to an image."""

    family: ClassVar[str] = "dcae"
    diffusers_classes: ClassVar[tuple[str, ...]] = ("AutoencoderDC",)
    uses_every_parameter: ClassVar[bool] = True

    def __init__(self, config: ModelConfig | DCAEConfig):
        super().__init__()
        if isinstance(config, DCAEConfig):
            config = model_config(config, "dcae", SHARED)
        self.config = config
        self.arch = arch_config(config, DCAEConfig, SHARED)
        self.encoder = Encoder(self.arch)
        self.decoder = Decoder(self.arch)
        self.set_kernels(self.arch.kernels)

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, overrides: list[str] | None = None) -> DCAE:
        """Random-init DCAE of a preset (or a YAML path) with `model.key=value` overrides."""
        return cls(load_config(name, overrides).model)

    @classmethod
    def from_diffusers(cls, path: str | Path, **config_overrides: Any) -> DCAE:
        """Load a folder written by diffusers' AutoencoderDC.save_pretrained, or a pipeline folder's vae/.

        config_overrides set the fields that do not change the weights (kernels, scaling_factor).
        """
        bad = sorted(set(config_overrides) - {"kernels", "scaling_factor"})
        if bad:
            raise ValueError(
                f"{bad[0]} changes the architecture; only kernels and scaling_factor can be overridden"
            )
        cfg, sd = weights.read_diffusers_folder(path, config_from_diffusers)
        model = cls(dataclasses.replace(cfg, **config_overrides))
        weights.load_weights(
            model, sd, f"{path}:", weights.DiffusersFormatError, "weights do not match config.json"
        )
        return model

    def save_diffusers(self, path: str | Path, config: dict | None = None) -> None:
        """Write a folder (config.json + safetensors) that diffusers' AutoencoderDC.from_pretrained loads.

        config: the config.json to write (default: this model's), e.g. one with a measured scaling_factor.
        """
        config = self.diffusers_config() if config is None else config
        weights.write_diffusers(self.state_dict(), config, path)

    def diffusers_config(self) -> dict:
        """This model's config.json, from its ModelConfig as it stands (an export's measured latent
        statistics included)."""
        return config_to_diffusers(arch_config(self.config, DCAEConfig, SHARED))

    def blocks(self) -> list[str]:
        """Every ResBlock and EfficientViT block: where activation checkpointing and FSDP cut."""
        return [n for n, m in self.named_modules() if isinstance(m, (ResBlock, EfficientViTBlock))]

    def compile_units(self) -> list[nn.Module]:
        return [self.encoder, self.decoder]

    def last_layer(self) -> tuple[nn.Conv2d, int]:
        """The decoder's output convolution, and 2 when a pixel shuffle follows it (no stage-0 blocks)."""
        out = self.decoder.conv_out
        return (out, 1) if isinstance(out, nn.Conv2d) else (out.conv, 1 if out.interpolate else 2)

    def set_kernels(self, impl: str) -> None:
        """Choose the fused RMSNorm+activation backend of every RMSNorm2d: auto | triton | torch."""
        if impl not in kernels.IMPLS:
            raise ValueError(f"kernels must be one of {kernels.IMPLS}, got {impl!r}")
        self.kernels = impl
        for m in self.modules():
            if isinstance(m, RMSNorm2d):
                m.kernels = impl

    # -- shapes --------------------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return self.arch.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.arch.latent_channels

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of the given size."""
        width = height if width is None else width
        f = self.downsample_factor
        return (self.arch.latent_channels, height // f, width // f)

    # -- forward -------------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, tiled: bool = False) -> DeterministicLatent:
        """x: (B, in_channels, H, W) in [-1, 1], H and W multiples of f -> the latent (B, C, H/f, W/f).

        tiled: an image larger than one tile is refused: DC-AE has no tiled path here yet.
        """
        c, f = self.arch.in_channels, self.downsample_factor
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"expected an image batch of shape (B, {c}, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )
        refuse_tiles(self.family, tiled, tuple(x.shape[2:]), 1, self.config.sample_size)
        return DeterministicLatent(self.encoder(x))

    def decode(self, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """z: (B, latent_channels, h, w) -> image (B, in_channels, h*f, w*f) in [-1, 1] (not clamped)."""
        c = self.arch.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"expected a latent batch of shape (B, {c}, h, w), got {tuple(z.shape)}")
        refuse_tiles(self.family, tiled, tuple(z.shape[2:]), self.downsample_factor, self.config.sample_size)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DeterministicLatent]:
        """Reconstruct x through its latent; returns (x_hat, posterior). sample changes nothing here."""
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample else posterior.mode()), posterior

    # -- latent normalisation, as SANA's pipeline applies it ----------------------------------------------

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The latent a diffusion model sees: z * scaling_factor."""
        return z * self.arch.scaling_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The latent to decode from a diffusion model's output: z / scaling_factor."""
        return z / self.arch.scaling_factor


def count_parameters(config: ModelConfig | DCAEConfig) -> int:
    """Parameters of a DCAE with this config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DCAE(config).parameters())
