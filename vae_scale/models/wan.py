"""Wan 2.1's causal 3D VAE (also Qwen-Image's autoencoder): blocks, Encoder, Decoder, WanVAE.

Module names equal diffusers' AutoencoderKLWan and AutoencoderKLQwenImage, which share one module tree for
Wan 2.1's architecture (Qwen-Image fine-tuned Wan 2.1's weights; its class keeps the older config keys), so
weights move between them by name.

Every temporal convolution is causal: an output frame sees its own and earlier input frames, with zeros
before the clip. Wan encodes a clip of 1 + 4k frames as its first frame alone, then chunks of 4 frames, and
decodes one latent frame at a time; each causal convolution carries its last input frames from one chunk to
the next in a FrameCache, so memory follows the frame size, not the clip length. The same modules run a
whole clip at once (cache=None), the pass training uses: the two are one function of the input, equal up to
float rounding. The first frame keeps a latent frame of its own (temporal downsampling starts at frame 1),
which is why a single image is a one-frame clip: 1 + 4k frames in, 1 + k latent frames out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale import kernels
from vae_scale.config import ModelConfig, load_config
from vae_scale.formats import weights
from vae_scale.formats.weights import DiffusersFormatError
from vae_scale.models.interface import arch_config, model_config
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.models.tiling import refuse_tiles
from vae_scale.models.wan_config import (
    QWEN_IMAGE,
    SHARED,
    WAN,
    WanConfig,
    config_from_diffusers,
    config_to_diffusers,
)

FrameCache = dict  # dict[nn.Module, torch.Tensor]: each causal layer's frames from the previous chunk


# --------------------------------------------------------------------------------------------------------
# Blocks


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: the 2 * p_t frames of padding all go before the clip; height and width
    are padded p_h, p_w on each side.

    With a cache, the frames before a chunk are the previous chunk's last inputs (zeros before the first
    chunk), so a clip run chunk by chunk computes what it computes run whole.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0)
        p_t, p_h, p_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.past = 2 * p_t  # input frames before each window's last one
        self.space_pad = (p_w, p_w, p_h, p_h)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        front = self.past
        if cache is not None and self.past:
            past = cache.get(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)
                front -= past.shape[2]
            cache[self] = x[:, :, -self.past :].clone()  # a copy: a view would keep the whole chunk alive
        if front or any(self.space_pad):
            x = F.pad(x, (*self.space_pad, front, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """Wan's RMS_norm over the channels (dim 1) at each position, with an optional fused activation:
    y = act(F.normalize(x, dim=1) * sqrt(C) * gamma), F.normalize dividing by max(|x|_2, 1e-12).

    kernels="torch", or "auto" off CUDA, runs exactly Wan's math (float16/bfloat16 normalised in float32).
    "triton", or "auto" on CUDA, runs the fused rms_norm_act: x / sqrt(mean_c(x^2) + eps) * gamma equals
    x / |x|_2 * sqrt(C) * gamma when eps = 0; eps = 1e-24 / C takes the place of Wan's clamp at |x|_2 = 1e-12.
    eps moves the result by a relative 0.5e-24 / |x|_2^2, below float32's rounding (6e-8) once |x|_2 > 3e-9,
    and both give 0 at x = 0: the two differ beyond rounding only for channel vectors of norm in (0, 3e-9),
    numerically vanishing ones, where Wan's clamp and the added eps treat them differently.
    """

    def __init__(self, dim: int, images: bool = False, act: str = "silu"):
        super().__init__()
        # diffusers' shapes: (C, 1, 1) for the attention's per-frame images, (C, 1, 1, 1) for clips
        self.gamma = nn.Parameter(torch.ones(dim, *((1,) * (2 if images else 3))))
        self.scale, self.act, self.fused_eps = dim**0.5, act, 1e-24 / dim
        self.kernels = "auto"  # set for the whole model by WanVAE.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton" or (
            self.kernels == "auto" and kernels.auto_backend(x.device) == "triton"
        ):
            return kernels.rms_norm_act(x, self.gamma.view(-1), None, self.fused_eps, self.act, self.kernels)
        wide = x.dtype in (torch.float16, torch.bfloat16)
        y = F.normalize(x.float() if wide else x, dim=1).to(x.dtype) * self.scale * self.gamma
        return F.silu(y) if self.act == "silu" else y

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}, act={self.act}"


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> dropout -> causal conv, plus a (projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(in_ch)
        self.conv1 = CausalConv3d(in_ch, out_ch, 3, padding=1)
        self.norm2 = RMSNorm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x), cache)
        h = self.conv2(self.dropout(self.norm2(h)), cache)
        return h + self.conv_shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (frames never attend to each other, which keeps the
    block causal), with an RMS norm in front and a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True, act="none")
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        B, C, T, H, W = x.shape
        h = x.transpose(1, 2).reshape(B * T, C, H, W)
        qkv = (
            self.to_qkv(self.norm(h)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        )  # (BT, 1, HW, 3C)
        h = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # (BT, 1, HW, C)
        h = self.proj(h.squeeze(1).transpose(1, 2).reshape(B * T, C, H, W))
        return x + h.view(B, T, C, H, W).transpose(1, 2)


class Resample(nn.Module):
    """Halve (downsample*) or double (upsample*) height and width frame by frame; the *3d modes also halve or
    double the frame count. The clip's first frame is never merged or split: frames 1, 2 become one latent
    frame (a stride-2 causal conv over frames 0..2, 2..4, ...), and a latent frame after the first becomes
    two (a causal conv's two halves, interleaved), so 1 + 2k frames <-> 1 + k."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):  # the channels halve too, as in Wan
            up = nn.Upsample(scale_factor=2.0, mode="nearest-exact")
            self.resample = nn.Sequential(up, nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # asymmetric (right/bottom) padding, as in latent diffusion
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        B, C, T, H, W = x.shape
        y = self.resample(x.transpose(1, 2).reshape(B * T, C, H, W))  # frame by frame
        x = y.view(B, T, *y.shape[1:]).transpose(1, 2)
        return self._halve_frames(x, cache) if self.mode == "downsample3d" else x

    def _halve_frames(self, x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
        if cache is None:  # frame 0 alone, then windows 0..2, 2..4, ...
            return x if x.shape[2] == 1 else torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        prev = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        return x if prev is None else self.time_conv(torch.cat([prev, x], dim=2))

    def _double_frames(self, x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
        head = None
        if cache is None:
            head, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2] == 0:
                return head
        else:
            first = self not in cache
            cache[self] = x[:, :, -1:].clone()  # marks the first frame as seen
            if first:
                return x
        B, C, T, H, W = x.shape
        y = self.time_conv(x, cache).view(B, 2, C, T, H, W)
        y = torch.stack((y[:, 0], y[:, 1]), dim=3).view(B, C, 2 * T, H, W)  # frame t -> frames 2t, 2t + 1
        return y if head is None else torch.cat([head, y], dim=2)


class MidBlock(nn.Module):
    """Residual block -> attention -> residual block at the lowest resolution."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class UpBlock(nn.Module):
    """One decoder level: residual blocks, then (except at the last level) an upsample."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, dropout: float, mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Resample(out_ch, mode)]) if mode else None

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsamplers is None else self.upsamplers[0](x, cache)


# --------------------------------------------------------------------------------------------------------
# Encoder and Decoder


class Encoder(nn.Module):
    """(B, in_channels, T, H, W) clip -> (B, 2 * z_dim, 1 + (T - 1) / ft, H / fs, W / fs) moments."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []  # diffusers' flat list: residual blocks, then the level's downsample
        for i, (in_ch, out_ch) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_ch if j == 0 else out_ch, out_ch, cfg.dropout))
            if i < len(cfg.dim_mult) - 1:
                blocks.append(
                    Resample(out_ch, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d")
                )
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(self.norm_out(x), cache)


class Decoder(nn.Module):
    """(B, z_dim, t, h, w) latent -> (B, out_channels, 1 + (t - 1) * ft, h * fs, w * fs) clip."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dims = [cfg.decoder_dim * m for m in [cfg.dim_mult[-1], *cfg.dim_mult[::-1]]]
        temporal = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        ups = []
        for i, (in_ch, out_ch) in enumerate(zip(dims[:-1], dims[1:])):
            in_ch = in_ch // 2 if i > 0 else in_ch  # the previous level's upsample halved the channels
            mode = None if i == len(dims) - 2 else ("upsample3d" if temporal[i] else "upsample2d")
            ups.append(UpBlock(in_ch, out_ch, cfg.num_res_blocks + 1, cfg.dropout, mode))
        self.up_blocks = nn.ModuleList(ups)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(self.norm_out(x), cache)


# --------------------------------------------------------------------------------------------------------
# The autoencoder


class WanVAE(nn.Module):
    """Wan 2.1's causal 3D VAE: a clip (B, 3, T, H, W) in [-1, 1], T = 1 + 4k, to a DiagonalGaussian over
    (B, 16, 1 + k, H/8, W/8) and back. An image (B, 3, H, W) is a one-frame clip, and comes back 4-D."""

    family: ClassVar[str] = "wan"
    diffusers_classes: ClassVar[tuple[str, ...]] = (WAN, QWEN_IMAGE)
    uses_every_parameter: ClassVar[bool] = False  # its temporal layers sit out a one-frame clip (an image)

    def __init__(self, config: ModelConfig | WanConfig):
        super().__init__()
        if isinstance(config, WanConfig):
            config = model_config(config, "wan", SHARED)
        self.config = config
        self.arch = arch = arch_config(config, WanConfig, SHARED)
        z = arch.z_dim
        self.encoder = Encoder(arch)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder(arch)
        self.set_kernels(arch.kernels)

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, overrides: list[str] | None = None) -> WanVAE:
        """Random-init model of a preset (or a YAML path) with `model.key=value` overrides."""
        return cls(load_config(name, overrides).model)

    @classmethod
    def from_diffusers(cls, path: str | Path, **config_overrides) -> WanVAE:
        """Load a folder written by AutoencoderKLWan or AutoencoderKLQwenImage.save_pretrained (or a pipeline
        folder's vae/); config_overrides set WanConfig fields that do not change the weights (kernels)."""
        folder, raw = weights.read_diffusers_config(path)
        cfg = config_from_diffusers(raw, str(folder / weights.CONFIG_NAME))
        model = cls(dataclasses.replace(cfg, **config_overrides))
        sd = weights.read_diffusers_weights(folder)
        weights.load_weights(
            model, sd, f"{folder}:", DiffusersFormatError, "weights do not match config.json"
        )
        return model

    def save_diffusers(self, path: str | Path, config: dict | None = None) -> None:
        """Write a folder that model.arch.diffusers_class's from_pretrained loads unchanged (config: the
        config.json to write instead of this model's, e.g. with measured latent statistics)."""
        config = self.diffusers_config() if config is None else config
        weights.write_diffusers(self.state_dict(), config, path)

    def diffusers_config(self) -> dict:
        """This model's config.json, from its ModelConfig as it stands (an export's measured latent
        statistics included)."""
        return config_to_diffusers(arch_config(self.config, WanConfig, SHARED))

    def blocks(self) -> list[str]:
        """Residual blocks, attention blocks and resamples: where activation checkpointing and FSDP cut
        (sound for the whole-clip pass, which is what runs under autograd)."""
        kinds = (ResidualBlock, AttentionBlock, Resample)
        return [n for n, m in self.named_modules() if isinstance(m, kinds)]

    def compile_units(self) -> list[nn.Module]:
        return [self.encoder, self.decoder]

    def last_layer(self) -> None:
        """None: the output convolution is causal 3D (padded in its forward), which LastLayer does not
        differentiate; the discriminator's weight is then loss.disc_weight itself, not LDM's adaptive one."""
        return None

    def set_kernels(self, impl: str) -> None:
        """Choose the backend of every RMS norm and of the posterior: auto | triton | torch (see RMSNorm)."""
        if impl not in kernels.IMPLS:
            raise ValueError(f"kernels must be one of {kernels.IMPLS}, got {impl!r}")
        self.kernels = impl
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.kernels = impl

    # -- shapes --------------------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along height and width."""
        return 2 ** (len(self.arch.dim_mult) - 1)

    @property
    def temporal_downsample_factor(self) -> int:
        """Frames per latent frame after the first (the first frame has a latent frame of its own)."""
        return 2 ** sum(map(bool, self.arch.temperal_downsample))

    @property
    def latent_channels(self) -> int:
        return self.arch.z_dim

    def latent_shape(
        self, height: int, width: int | None = None, frames: int | None = None
    ) -> tuple[int, ...]:
        """(C, h, w) of an image's latent, or (C, t, h, w) of a clip of `frames` frames."""
        width = height if width is None else width
        f = self.downsample_factor
        if frames is None:
            return (self.arch.z_dim, height // f, width // f)
        return (
            self.arch.z_dim,
            1 + (frames - 1) // self.temporal_downsample_factor,
            height // f,
            width // f,
        )

    def _check_clip(self, x: torch.Tensor) -> torch.Tensor:
        c, f, ft = self.arch.in_channels, self.downsample_factor, self.temporal_downsample_factor
        frames = x.shape[2] if x.ndim == 5 else 1
        if x.ndim not in (4, 5) or x.shape[1] != c or x.shape[-2] % f or x.shape[-1] % f or (frames - 1) % ft:
            raise ValueError(
                f"expected a clip (B, {c}, T, H, W) with T = 1 + {ft}k, or an image (B, {c}, H, W), H and W "
                f"multiples of {f}; got {tuple(x.shape)}"
            )
        return x if x.ndim == 5 else x.unsqueeze(2)

    def _check_latent(self, z: torch.Tensor) -> torch.Tensor:
        c = self.arch.z_dim
        if z.ndim not in (4, 5) or z.shape[1] != c:
            raise ValueError(f"expected a latent (B, {c}, t, h, w) or (B, {c}, h, w), got {tuple(z.shape)}")
        return z if z.ndim == 5 else z.unsqueeze(2)

    @staticmethod
    def _chunked(chunked: bool | None) -> bool:
        if chunked is None:
            return not torch.is_grad_enabled()
        if chunked and torch.is_grad_enabled():
            raise ValueError(
                "the chunked pass is for inference (torch.no_grad): under autograd it saves no memory, since "
                "every chunk's activations are kept for the backward, and activation checkpointing would "
                "recompute blocks against a cache that has moved on; use the whole-clip pass (chunked=False)"
            )
        return chunked

    # -- forward -------------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, tiled: bool = False, chunked: bool | None = None) -> DiagonalGaussian:
        """x: clip (B, 3, T, H, W) or image (B, 3, H, W) in [-1, 1] -> posterior over (B, z_dim, 1 + (T-1)/4,
        H/8, W/8), or (B, z_dim, H/8, W/8) for an image.

        chunked: Wan's pass (frame 0, then chunks of 4 frames through the frame cache), the default without
        autograd; False: the whole clip at once, the default under autograd. Equal up to float rounding.
        """
        clip = self._check_clip(x)
        refuse_tiles(self.family, tiled, tuple(clip.shape[3:]), 1, self.config.sample_size)
        ft = self.temporal_downsample_factor
        if self._chunked(chunked) and clip.shape[2] > 1:
            cache: FrameCache = {}
            chunks = [clip[:, :, :1], *clip[:, :, 1:].split(ft, dim=2)]
            h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        else:
            h = self.encoder(clip)
        moments = self.quant_conv(h)  # (B, 2 * z_dim, t, h, w)
        return DiagonalGaussian(moments if x.ndim == 5 else moments.squeeze(2), self.kernels)

    def decode(self, z: torch.Tensor, tiled: bool = False, chunked: bool | None = None) -> torch.Tensor:
        """z: (B, z_dim, t, h, w) or (B, z_dim, h, w) -> clip (B, 3, 1 + 4(t-1), 8h, 8w) or image (B, 3, 8h,
        8w), nominally in [-1, 1] (not clamped; diffusers' decode clamps).

        chunked: one latent frame at a time through the frame cache (Wan's pass), the default without
        autograd; False: the whole latent at once, the default under autograd. Equal up to float rounding.
        """
        latent = self.post_quant_conv(self._check_latent(z))
        refuse_tiles(
            self.family, tiled, tuple(latent.shape[3:]), self.downsample_factor, self.config.sample_size
        )
        if self._chunked(chunked) and latent.shape[2] > 1:
            cache: FrameCache = {}
            out = torch.cat([self.decoder(frame, cache) for frame in latent.split(1, dim=2)], dim=2)
        else:
            out = self.decoder(latent)
        return out if z.ndim == 5 else out.squeeze(2)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled latent (or the posterior mean); returns (x_hat, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior

    # -- latent normalisation ------------------------------------------------------------------------------

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.arch.z_dim) + (1,) * (z.ndim - 2)
        mean = torch.tensor(self.arch.latents_mean, device=z.device, dtype=z.dtype).view(shape)
        std = torch.tensor(self.arch.latents_std, device=z.device, dtype=z.dtype).view(shape)
        return mean, std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - latents_mean) / latents_std per channel: what Wan's and Qwen-Image's diffusion models see
        (WanImageToVideoPipeline, QwenImageEditPipeline encode so)."""
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z * latents_std + latents_mean: the inverse, as WanPipeline and QwenImagePipeline apply before
        decoding (they write it latents / (1 / latents_std) + latents_mean)."""
        mean, std = self._latent_stats(z)
        return z * std + mean


def count_parameters(config: ModelConfig | WanConfig) -> int:
    """Parameters of a WanVAE with this config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in WanVAE(config).parameters())
