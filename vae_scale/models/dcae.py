"""DC-AE, the deep compression autoencoder (Chen et al. 2024, arXiv 2410.10733), SANA's autoencoder.

A deterministic autoencoder with 32x to 128x spatial compression. What lets it train at such factors is
residual autoencoding: every resolution change adds a parameter-free shortcut (space-to-channel with channel
averaging going down, channel duplication with channel-to-space going up), so each stage learns a residual
over a plain rearrangement of its input. The shallow stages are ResBlocks, the deep ones EfficientViT
blocks (ReLU linear attention over multi-scale q/k/v, then a gated depthwise MLP), all normalised by RMSNorm
over channels, which the fused rms_norm_act kernel computes.

Module names equal diffusers' AutoencoderDC (0.42), so state_dict() keys are diffusers' keys and weights
move between the two with load_state_dict. The model is written for one device: activation checkpointing,
channels_last, compile and FSDP are applied from outside, to block_modules().
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale import kernels
from vae_scale.config import ModelConfig, load_config
from vae_scale.formats import weights
from vae_scale.models.interface import arch_config, model_config
from vae_scale.models.posterior import DeterministicLatent
from vae_scale.models.tiling import refuse_tiles

# --------------------------------------------------------------------------------------------------------
# Config


BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
# diffusers' get_activation table: the names a config may use for an activation.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "mish": nn.Mish,
}
# The activations rms_norm_act fuses, by their config names.
FUSED_ACTS = {"silu": "silu", "swish": "silu", "relu": "relu"}
# diffusers tests `== "pixel_unshuffle"` and `== "interpolate"` and takes the other type for any other
# value; SANA's released config writes "Conv". Other spellings are refused rather than guessed.
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "conv", "Conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")


class DCAEConfigError(ValueError):
    """A DCAEConfig field whose value DCAE cannot build; .field names it, .why says what is wrong."""

    def __init__(self, field: str, why: str):
        super().__init__(f"DCAEConfig.{field} {why}")
        self.field, self.why = field, why


@dataclass(frozen=True)
class DCAEConfig:
    """DC-AE's architecture; field names and meanings are diffusers' AutoencoderDC config.json keys.

    A field given as one string applies to every stage; a tuple gives one value per stage (stage 0 is the
    highest resolution).
    """

    in_channels: int = 3
    """Image channels."""
    latent_channels: int = 32
    """Latent channels."""
    attention_head_dim: int = 32
    """Channels per head of the EfficientViT blocks' linear attention (a stage's width must divide by it)."""
    encoder_block_types: str | tuple[str, ...] = "ResBlock"
    """Block type per encoder stage: ResBlock or EfficientViTBlock."""
    decoder_block_types: str | tuple[str, ...] = "ResBlock"
    """Block type per decoder stage: ResBlock or EfficientViTBlock."""
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    """Encoder width per stage; n stages downsample by 2**(n-1)."""
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    """Decoder width per stage (as many stages as the encoder)."""
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    """Blocks per encoder stage; 0 in stage 0 makes the input conv downsample straight to stage 1's width."""
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    """Blocks per decoder stage; 0 in stage 0 makes the output conv upsample from stage 1's width."""
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    """Per encoder stage, the kernel sizes of the extra depthwise q/k/v branches of the linear attention."""
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    """Per decoder stage, the kernel sizes of the extra depthwise q/k/v branches of the linear attention."""
    upsample_block_type: str = "pixel_shuffle"
    """Decoder upsampling: pixel_shuffle (conv to 4x channels, then channel-to-space) or interpolate
    (nearest 2x, then conv)."""
    downsample_block_type: str = "pixel_unshuffle"
    """Encoder downsampling: pixel_unshuffle (conv, then space-to-channel) or conv (Conv: stride-2 conv)."""
    decoder_norm_types: str | tuple[str, ...] = "rms_norm"
    """Norm per decoder stage: rms_norm (over channels) or batch_norm (the ImageNet DC-AEs' shallow
    stages; batch statistics in training, unsynchronised across ranks unless converted from outside)."""
    decoder_act_fns: str | tuple[str, ...] = "silu"
    """Activation inside the decoder stages' ResBlocks: silu, relu, gelu or mish."""
    encoder_out_shortcut: bool = True
    """Add the channel-averaged last encoder features to the latent (residual autoencoding)."""
    decoder_in_shortcut: bool = True
    """Add the channel-duplicated latent to the decoder's first features (residual autoencoding)."""
    decoder_conv_act_fn: str = "relu"
    """Activation between the decoder's output RMSNorm and its output conv."""
    scaling_factor: float = 1.0
    """Latent scale for diffusion: z * scaling_factor goes to the diffusion model (SANA's pipeline)."""
    kernels: str = "auto"
    """Fused RMSNorm+activation backend: auto | triton | torch (not part of diffusers' config)."""

    def __post_init__(self) -> None:
        for name in ("encoder_block_out_channels", "decoder_block_out_channels"):
            object.__setattr__(self, name, tuple(int(c) for c in getattr(self, name)))
        for name in ("encoder_layers_per_block", "decoder_layers_per_block"):
            object.__setattr__(self, name, tuple(int(n) for n in getattr(self, name)))
        for name in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            object.__setattr__(self, name, tuple(tuple(int(k) for k in s) for s in getattr(self, name)))
        for name in ("encoder_block_types", "decoder_block_types", "decoder_norm_types", "decoder_act_fns"):
            v = getattr(self, name)
            object.__setattr__(self, name, v if isinstance(v, str) else tuple(v))
        self._validate()

    @property
    def stages(self) -> int:
        return len(self.encoder_block_out_channels)

    def per_stage(self, name: str) -> tuple:
        """A per-stage field as a tuple of one value per stage (a single string repeated)."""
        v = getattr(self, name)
        return (v,) * self.stages if isinstance(v, str) else v

    def _validate(self) -> None:
        n = self.stages

        def check(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise DCAEConfigError(field, why)

        check(n >= 2, "encoder_block_out_channels", f"has {n} stage(s); DC-AE needs at least 2")
        for side in ("encoder", "decoder"):
            chs, layers = (
                getattr(self, f"{side}_block_out_channels"),
                getattr(self, f"{side}_layers_per_block"),
            )
            for name in (f"{side}_block_out_channels", f"{side}_layers_per_block", f"{side}_qkv_multiscales"):
                got = len(getattr(self, name))
                check(got == n, name, f"has {got} entries for {n} stages")
            for name, allowed in ((f"{side}_block_types", BLOCK_TYPES),) + (
                (("decoder_norm_types", NORM_TYPES), ("decoder_act_fns", tuple(ACTIVATIONS)))
                if side == "decoder"
                else ()
            ):
                v = getattr(self, name)
                check(isinstance(v, str) or len(v) == n, name, f"has {len(v)} entries for {n} stages")
                for t in self.per_stage(name):
                    check(
                        t in allowed, name, f"has unsupported value {t!r} (supported: {', '.join(allowed)})"
                    )
            check(all(c > 0 for c in chs), f"{side}_block_out_channels", f"has a width below 1: {chs}")
            check(
                all(k > 0 for k in layers[1:]) and layers[0] >= 0,
                f"{side}_layers_per_block",
                "may be 0 only in stage 0 (a stage without blocks elsewhere would skip its resampling)",
            )
            d = self.attention_head_dim
            for i, t in enumerate(self.per_stage(f"{side}_block_types")):
                check(
                    t != "EfficientViTBlock" or chs[i] % d == 0,
                    "attention_head_dim",
                    f"{d} does not divide {side} stage {i}'s width {chs[i]}",
                )
            for k in (k for s in getattr(self, f"{side}_qkv_multiscales") for k in s):
                check(k % 2 == 1, f"{side}_qkv_multiscales", f"has even kernel size {k} (must be odd)")
        check(
            self.downsample_block_type in DOWNSAMPLE_TYPES,
            "downsample_block_type",
            f"is {self.downsample_block_type!r} (supported: {', '.join(DOWNSAMPLE_TYPES)})",
        )
        check(
            self.upsample_block_type in UPSAMPLE_TYPES,
            "upsample_block_type",
            f"is {self.upsample_block_type!r} (supported: {', '.join(UPSAMPLE_TYPES)})",
        )
        check(
            self.decoder_conv_act_fn in ACTIVATIONS,
            "decoder_conv_act_fn",
            f"is {self.decoder_conv_act_fn!r} (supported: {', '.join(ACTIVATIONS)})",
        )
        # The parameter-free shortcuts average (encoder) or duplicate (decoder) whole groups of channels.
        c = self.latent_channels
        enc, dec = self.encoder_block_out_channels, self.decoder_block_out_channels
        check(
            not self.encoder_out_shortcut or enc[-1] % c == 0,
            "latent_channels",
            f"{c} must divide the last encoder width {enc[-1]} (encoder_out_shortcut averages groups)",
        )
        check(
            not self.decoder_in_shortcut or dec[-1] % c == 0,
            "latent_channels",
            f"{c} must divide the last decoder width {dec[-1]} (decoder_in_shortcut duplicates channels)",
        )
        unshuffle = self.downsample_block_type == "pixel_unshuffle"
        for i in range(n - 1):
            a, b = enc[i], enc[i + 1]
            check(
                (4 * a) % b == 0 and (not unshuffle or b % 4 == 0),
                "encoder_block_out_channels",
                f"stage {i} -> {i + 1} ({a} -> {b}): the shortcut averages 4*{a} channels in groups, "
                "so 4*in must be a multiple of out" + (" and out of 4" if unshuffle else ""),
            )
            a, b = dec[i + 1], dec[i]
            check(
                (4 * b) % a == 0,
                "decoder_block_out_channels",
                f"stage {i + 1} -> {i} ({a} -> {b}): the shortcut repeats channels, so {a} must divide 4*{b}",
            )
        check(
            self.kernels in kernels.IMPLS, "kernels", f"must be one of {kernels.IMPLS}, got {self.kernels!r}"
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.stages - 1)


# Released configurations, from diffusers' scripts/convert_dcae_to_diffusers.py (get_ae_config and
# convert_ae) and, for the f32c32 SANA model, its config.json on the Hub
# (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers: "downsample_block_type": "Conv").
SHARED = {
    "in_channels": "in_channels",
    "latent_channels": "latent_channels",
    "scaling_factor": "scaling_factor",
    "kernels": "kernels",
}
"""DCAEConfig fields that are ModelConfig's own keys (model.latent_channels, ...); the rest are model.arch."""


PRESETS = ("dc-ae-f32c32", "dc-ae-f64c128", "dc-ae-tiny")
"""This family's presets: vae_scale/configs/<name>.yaml, each citing where its architecture comes from."""


def preset(name: str) -> DCAEConfig:
    """The DCAEConfig of a preset (its YAML's model section)."""
    return arch_config(load_config(name).model, DCAEConfig, SHARED)


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
        config = config_to_diffusers(self.arch) if config is None else config
        weights.write_diffusers(self.state_dict(), config, path)

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

    def block_modules(self) -> list[nn.Module]:
        """The repeated blocks (ResBlock, EfficientViTBlock): FSDP's wrap units and the checkpointed units."""
        return [m for m in self.modules() if isinstance(m, (ResBlock, EfficientViTBlock))]

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


# --------------------------------------------------------------------------------------------------------
# diffusers' config.json


_DIFFUSERS_CLASS = "AutoencoderDC"
_FIELDS = tuple(f.name for f in dataclasses.fields(DCAEConfig) if f.name != "kernels")


def config_from_diffusers(d: dict[str, Any], source: str = "config.json") -> DCAEConfig:
    """A DCAEConfig from an AutoencoderDC config.json dict; DiffusersFormatError naming the class and the
    field for anything DCAE cannot build the same way.

    Keys diffusers adds (_class_name, _diffusers_version, _name_or_path ...) start with "_"; any other key
    DCAEConfig does not know is refused rather than ignored, since it may change the architecture.
    """

    def refuse(field: str, why: str) -> weights.DiffusersFormatError:
        return weights.DiffusersFormatError(f"{source}: {_DIFFUSERS_CLASS} field {field!r} {why}")

    cls = d.get("_class_name")
    if cls != _DIFFUSERS_CLASS:
        raise refuse("_class_name", f"is {cls!r}; DCAE reads {_DIFFUSERS_CLASS} folders only")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _FIELDS)
    if unknown:
        raise refuse(unknown[0], "is not a field DCAE knows; it may change the architecture")
    try:
        return DCAEConfig(**{k: d[k] for k in _FIELDS if k in d})
    except DCAEConfigError as e:
        raise refuse(e.field, e.why) from None
    except (TypeError, ValueError) as e:  # a value of the wrong type (a number for a list, ...)
        raise weights.DiffusersFormatError(f"{source}: {_DIFFUSERS_CLASS} config: {e}") from None


def config_to_diffusers(cfg: DCAEConfig) -> dict[str, Any]:
    """The AutoencoderDC config.json for a DCAEConfig (tuples as JSON lists)."""
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:
        diffusers_version = "0.42.0"

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, tuple) else v

    out: dict[str, Any] = {"_class_name": _DIFFUSERS_CLASS, "_diffusers_version": diffusers_version}
    out.update({k: plain(getattr(cfg, k)) for k in _FIELDS})
    return out
