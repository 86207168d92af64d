"""DC-AE's configuration: DCAEConfig (the diffusers config.json's keys, checked), the
bridge to ModelConfig (model.arch plus the shared keys), the presets, and config.json in and out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from vae_scale import kernels
from vae_scale.config import load_config
from vae_scale.formats import weights
from vae_scale.models.interface import arch_config

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
