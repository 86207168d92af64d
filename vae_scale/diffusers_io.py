"""Weights in and out of diffusers' AutoencoderKL folders (config.json + diffusion_pytorch_model.safetensors).

Our module names equal diffusers' current ones, so the state-dict mapping is the identity for folders
written by recent diffusers; older folders with the deprecated attention names (query/key/value/proj_attn,
sometimes stored as 1x1 convs) are mapped on load. Configs this architecture cannot represent are refused
with a message naming the field. diffusers itself is not needed at run time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vae_scale.config import ConfigError, ModelConfig
from vae_scale.model import VAE

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"

_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class DiffusersFormatError(ValueError):
    """A diffusers folder that is missing a file or describes a model this VAE cannot represent."""


# --------------------------------------------------------------------------------------------------------
# Config mapping


def config_from_diffusers(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a diffusers AutoencoderKL config dict to a ModelConfig; refuse what we cannot represent."""

    def refuse(field: str, why: str) -> DiffusersFormatError:
        return DiffusersFormatError(
            f"{source}: field {field!r} {why}; vae-scale supports AutoencoderKL "
            "with DownEncoderBlock2D/UpDecoderBlock2D blocks and SiLU"
        )

    cls = d.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise refuse("_class_name", f"is {cls!r}")
    chs = list(d.get("block_out_channels", [64]))
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(key, [block]))
        bad = [t for t in types if t != block]
        if bad:
            raise refuse(key, f"has unsupported block type {bad[0]!r}")
        if len(types) != len(chs):
            raise refuse(key, f"has {len(types)} entries but block_out_channels has {len(chs)}")
    if d.get("act_fn", "silu") != "silu":
        raise refuse("act_fn", f"is {d['act_fn']!r}")
    if d.get("norm_type", "group") != "group":
        raise refuse("norm_type", f"is {d['norm_type']!r}")
    quant, post_quant = d.get("use_quant_conv", True), d.get("use_post_quant_conv", True)
    if quant != post_quant:
        raise refuse("use_post_quant_conv", f"is {post_quant} while use_quant_conv is {quant}")
    sample_size = d.get("sample_size", 256)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    try:
        return ModelConfig(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            block_out_channels=chs,
            layers_per_block=d.get("layers_per_block", 1),
            latent_channels=d.get("latent_channels", 4),
            norm_num_groups=d.get("norm_num_groups", 32),
            mid_block_attention=d.get("mid_block_add_attention", True),
            quant_convs=bool(quant),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=d.get("shift_factor"),
            latents_mean=d.get("latents_mean"),
            latents_std=d.get("latents_std"),
            sample_size=int(sample_size),
        )
    except ConfigError as e:
        raise DiffusersFormatError(f"{source}: {e}") from None


def config_to_diffusers(cfg: ModelConfig) -> dict[str, Any]:
    """The diffusers AutoencoderKL config.json for a ModelConfig."""
    if cfg.norm_eps != 1e-6:
        raise DiffusersFormatError(
            f"model.norm_eps={cfg.norm_eps}: diffusers' AutoencoderKL fixes it at 1e-6"
        )
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:
        diffusers_version = "0.30.0"
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": diffusers_version,
        "act_fn": "silu",
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "latents_mean": cfg.latents_mean,
        "latents_std": cfg.latents_std,
        "force_upcast": True,
        "use_quant_conv": cfg.quant_convs,
        "use_post_quant_conv": cfg.quant_convs,
        "mid_block_add_attention": cfg.mid_block_attention,
    }


# --------------------------------------------------------------------------------------------------------
# State-dict mapping


def state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map diffusers AutoencoderKL tensor names (current or deprecated) to ours."""
    out = {}
    for name, t in sd.items():
        parts = name.split(".")
        if "attentions" in parts and parts[-2] in _DEPRECATED_ATTENTION:
            name = ".".join(parts[:-2] + [_DEPRECATED_ATTENTION[parts[-2]], parts[-1]])
        if ".attentions." in name and name.endswith(".weight") and t.ndim == 4 and "group_norm" not in name:
            t = t[:, :, 0, 0]  # attention projections once stored as 1x1 convs
        out[name] = t
    return out


def state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers' current names: contiguous tensors, wrapper prefixes removed."""
    out = {}
    for name, t in sd.items():
        name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        out[name] = t.detach().contiguous()
    return out


# --------------------------------------------------------------------------------------------------------
# Folders


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_NAME).is_file():
        return load_file(path / WEIGHTS_NAME)
    if (path / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((path / WEIGHTS_INDEX_NAME).read_text())
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            if not (path / shard).is_file():
                raise DiffusersFormatError(f"{path}: shard {shard} named in {WEIGHTS_INDEX_NAME} is missing")
            sd.update(load_file(path / shard))
        return sd
    variants = sorted(path.glob("diffusion_pytorch_model.*.safetensors"))
    if variants:  # e.g. the fp16 variant SDXL ships
        return load_file(variants[0])
    if (path / LEGACY_WEIGHTS_NAME).is_file():
        return torch.load(path / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise DiffusersFormatError(f"{path}: no weights file ({WEIGHTS_NAME}) in the folder")


def load_diffusers(path: str | Path, **config_overrides: Any) -> VAE:
    """Build a VAE from a diffusers AutoencoderKL folder; config_overrides set ModelConfig fields."""
    path = Path(path)
    if path.is_dir() and (path / "vae" / CONFIG_NAME).is_file() and not (path / CONFIG_NAME).is_file():
        path = path / "vae"  # a whole pipeline folder: take its VAE
    if not path.is_dir():
        raise DiffusersFormatError(f"{path}: not a folder")
    if not (path / CONFIG_NAME).is_file():
        raise DiffusersFormatError(f"{path}: {CONFIG_NAME} is missing")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise DiffusersFormatError(f"{path / CONFIG_NAME}: not valid JSON ({e})") from None
    cfg = config_from_diffusers(raw, str(path / CONFIG_NAME))
    vae = VAE(dataclasses.replace(cfg, **config_overrides))
    sd = state_dict_from_diffusers(_read_weights(path))
    try:
        result = vae.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise DiffusersFormatError(f"{path}: weights do not match config.json: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise DiffusersFormatError(
            f"{path}: weights do not match config.json: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return vae


def save_diffusers(vae: VAE, path: str | Path, config: dict[str, Any] | None = None) -> None:
    """Write `vae` as a diffusers AutoencoderKL folder; files appear complete or not at all.

    config: the config.json to write (default: config_to_diffusers(vae.config)), e.g. the one a fine-tune
    was imported from, kept key for key.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config_to_diffusers(vae.config) if config is None else config
    sd = state_dict_to_diffusers(vae.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path))
    try:
        save_file(sd, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # weights first: a config never points at missing weights
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
