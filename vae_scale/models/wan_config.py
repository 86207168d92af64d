"""Wan 2.1 / Qwen-Image's configuration: WanConfig (the diffusers config.json's keys, checked), the
bridge to ModelConfig (model.arch plus the shared keys), the presets, and config.json in and out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from vae_scale import kernels
from vae_scale.config import load_config
from vae_scale.formats.weights import DiffusersFormatError
from vae_scale.models.interface import arch_config

WAN = "AutoencoderKLWan"
QWEN_IMAGE = "AutoencoderKLQwenImage"

# Wan 2.1's latent statistics (AutoencoderKLWan's defaults; Qwen-Image's config.json repeats them).
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Config


@dataclass
class WanConfig:
    """The Wan 2.1 VAE's architecture and latent statistics; field names are diffusers' config.json keys."""

    base_dim: int = 96
    """Channels before the first level; level i has base_dim * dim_mult[i]."""
    decoder_base_dim: int | None = None
    """The decoder's base_dim (None: base_dim). AutoencoderKLWan only."""
    z_dim: int = 16
    """Latent channels."""
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    """Channel multiplier per level; every level after the first halves height and width."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder has one more per level)."""
    attn_scales: list[float] = field(default_factory=list)
    """Encoder resolutions with attention after each residual block: must be empty (diffusers' encoder cannot
    run such blocks with its frame cache)."""
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    """Per level transition (len(dim_mult) - 1 of them): halve the frame count too (diffusers' spelling); the
    decoder mirrors it."""
    dropout: float = 0.0
    """Dropout in the residual blocks, between the second norm and convolution (training only)."""
    latents_mean: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_MEAN))
    """Per-channel latent mean a diffusion model subtracts (normalize_latents)."""
    latents_std: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_STD))
    """Per-channel latent std a diffusion model divides by (normalize_latents)."""
    is_residual: bool = False
    """Wan 2.2's residual up/down blocks: must be False (Wan 2.1's architecture). AutoencoderKLWan only."""
    in_channels: int = 3
    """Clip channels in (AutoencoderKLQwenImage: input_channels, which must equal out_channels)."""
    out_channels: int = 3
    """Clip channels out."""
    patch_size: int | None = None
    """Wan 2.2's pixel patchify before the encoder: must be None. AutoencoderKLWan only."""
    scale_factor_temporal: int | None = 4
    """Frames per latent frame after the first, as recorded in AutoencoderKLWan's config (None or the
    architecture's 2 ** sum(temperal_downsample))."""
    scale_factor_spatial: int | None = 8
    """Pixels per latent position, as recorded in AutoencoderKLWan's config (None or the architecture's
    2 ** (len(dim_mult) - 1))."""
    diffusers_class: str = WAN
    """The diffusers class whose folders this model reads and writes: AutoencoderKLWan or
    AutoencoderKLQwenImage."""
    kernels: str = "auto"
    """Fused-op backend of the RMS norms and the posterior: auto | triton | torch."""

    # Keys of each class's config.json that map to fields here (AutoencoderKLQwenImage's input_channels is
    # in_channels and out_channels at once).
    COMMON_KEYS: ClassVar[tuple[str, ...]] = (
        "base_dim",
        "z_dim",
        "dim_mult",
        "num_res_blocks",
        "attn_scales",
        "temperal_downsample",
        "dropout",
        "latents_mean",
        "latents_std",
    )
    WAN_KEYS: ClassVar[tuple[str, ...]] = (
        "decoder_base_dim",
        "is_residual",
        "in_channels",
        "out_channels",
        "patch_size",
        "scale_factor_temporal",
        "scale_factor_spatial",
    )

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{self.diffusers_class}: field {name!r} is {value!r}; not a list")
            setattr(self, name, list(value))
        if problem := self.problem():
            name, why = problem
            raise ValueError(f"{self.diffusers_class}: field {name!r} is {getattr(self, name)!r}; {why}")

    def problem(self) -> tuple[str, str] | None:
        """(field, why) of the first value WanVAE cannot build or diffusers' class cannot hold, else None."""
        levels = len(self.dim_mult)
        if self.diffusers_class not in (WAN, QWEN_IMAGE):
            return "diffusers_class", f"WanVAE reads and writes {WAN} and {QWEN_IMAGE}"
        if self.kernels not in kernels.IMPLS:
            return "kernels", f"must be one of {kernels.IMPLS}"
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                return name, "must be a positive integer"
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            return "decoder_base_dim", "must be None or a positive integer"
        if levels < 1 or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            return "dim_mult", "must be a non-empty list of positive integers"
        if len(self.temperal_downsample) != levels - 1:
            return "temperal_downsample", f"needs {levels - 1} entries, one per level after the first"
        if self.attn_scales:
            return (
                "attn_scales",
                "must be empty: diffusers' encoder cannot run attention blocks with its cache",
            )
        if not 0.0 <= self.dropout < 1.0:
            return "dropout", "must be in [0, 1)"
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                return name, f"needs z_dim = {self.z_dim} entries"
        if any(s <= 0 for s in self.latents_std):
            return "latents_std", "must be positive"
        if self.is_residual:
            return "is_residual", "Wan 2.2's residual blocks are not supported (Wan 2.1's architecture only)"
        if self.patch_size is not None:
            return "patch_size", "Wan 2.2's patchified input is not supported (None only)"
        for name, factor in (
            ("scale_factor_temporal", 2 ** sum(map(bool, self.temperal_downsample))),
            ("scale_factor_spatial", 2 ** (levels - 1)),
        ):
            if getattr(self, name) not in (None, factor):
                return name, f"the architecture's factor is {factor}"
        if self.diffusers_class == QWEN_IMAGE:
            if self.in_channels != self.out_channels:
                return "out_channels", f"{QWEN_IMAGE} has one input_channels for both ({self.in_channels})"
            if self.decoder_base_dim is not None:
                return "decoder_base_dim", f"{QWEN_IMAGE} has none (None only)"
        return None

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim


def config_from_diffusers(d: dict[str, Any], source: str = "config.json") -> WanConfig:
    """A WanConfig from an AutoencoderKLWan or AutoencoderKLQwenImage config.json dict; DiffusersFormatError
    naming the class and the field for anything else (another class, an unknown key, an unsupported value)."""
    cls = d.get("_class_name")
    if cls not in (WAN, QWEN_IMAGE):
        raise DiffusersFormatError(
            f"{source}: field '_class_name' is {cls!r}; WanVAE reads {WAN} and {QWEN_IMAGE} folders"
        )
    keys = WanConfig.COMMON_KEYS + (WanConfig.WAN_KEYS if cls == WAN else ("input_channels",))
    for key in d:
        if not key.startswith("_") and key not in keys:
            raise DiffusersFormatError(f"{source}: {cls} field {key!r} is not one WanVAE knows")
    kwargs = {k: d[k] for k in keys if k in d}
    if "input_channels" in kwargs:
        kwargs["in_channels"] = kwargs["out_channels"] = kwargs.pop("input_channels")
    try:
        return WanConfig(**kwargs, diffusers_class=cls)
    except ValueError as e:
        raise DiffusersFormatError(f"{source}: {e}") from None


def config_to_diffusers(cfg: WanConfig) -> dict[str, Any]:
    """The config.json of cfg.diffusers_class for this config (loads in that class unchanged)."""
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:
        diffusers_version = "0.42.0"
    d: dict[str, Any] = {"_class_name": cfg.diffusers_class, "_diffusers_version": diffusers_version}
    d.update({k: getattr(cfg, k) for k in WanConfig.COMMON_KEYS})
    if cfg.diffusers_class == WAN:
        d.update({k: getattr(cfg, k) for k in WanConfig.WAN_KEYS})
    else:
        d["input_channels"] = cfg.in_channels
    return d


# Presets. wan2.1: Wan-AI/Wan2.1's VAE, which diffusers' scripts/convert_wan_to_diffusers.py (convert_vae)
# builds as AutoencoderKLWan() with every default. qwen-image: Qwen/Qwen-Image's vae/config.json
# (AutoencoderKLQwenImage, diffusers 0.34.0.dev0): base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4],
# num_res_blocks 2, attn_scales [], temperal_downsample [false, true, true], dropout 0.0 and Wan 2.1's
# latents_mean / latents_std, i.e. the same architecture. wan-tiny: Wan's structure (f8, 4 frames per latent
# frame, 16 channels) at a width and depth a CPU runs in moments.
SHARED = {
    "z_dim": "latent_channels",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "latents_mean": "latents_mean",
    "latents_std": "latents_std",
    "kernels": "kernels",
}
"""WanConfig fields that are ModelConfig's own keys (z_dim is model.latent_channels); the rest go in
model.arch."""

PRESETS = ("wan2.1", "qwen-image", "wan-tiny")
"""This family's presets: vae_scale/configs/<name>.yaml, each citing where its architecture comes from."""


def preset(name: str) -> WanConfig:
    """The WanConfig of a preset (its YAML's model section)."""
    return arch_config(load_config(name).model, WanConfig, SHARED)
