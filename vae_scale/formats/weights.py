"""Weight files, read and written: diffusers' AutoencoderKL folders (config.json +
diffusion_pytorch_model.safetensors), the weights a fine-tune starts from (model.init_from), and the names
of parameters under the wrappers that training puts around a model.

Our module names equal diffusers' current ones, so the state-dict mapping is the identity for folders
written by recent diffusers; older folders with the deprecated attention names (query/key/value/proj_attn,
sometimes stored as 1x1 convs) are mapped on load. Configs this architecture cannot represent are refused
with a message naming the field. diffusers itself is not needed at run time.

This module sits below the model (it reads and writes tensors and configs, never builds a VAE):
VAE.from_diffusers and VAE.save_diffusers are built on it, and the other families' (vae_scale/models/) on
read_diffusers_folder and write_diffusers, with their own config mapping.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from vae_scale.config import ConfigError, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"

C = TypeVar("C")  # a family's config type

_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class WeightsError(ValueError):
    """Weights that cannot be read, or do not fit the model they are for; the message names the source."""


class DiffusersFormatError(WeightsError):
    """A diffusers folder that is missing a file or describes a model this VAE cannot represent."""


# The wrappers training puts around modules, and the prefixes they add to parameter names.
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")


def plain_name(name: str) -> str:
    """A parameter's name without the prefixes of torch.compile and activation checkpointing."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


# --------------------------------------------------------------------------------------------------------
# Config mapping


def sd_network_fields(
    d: dict[str, Any], refuse: Callable[[str, str], DiffusersFormatError], defaults: dict[str, Any]
) -> dict[str, Any]:
    """The ModelConfig fields of the SD network (AutoencoderKL's and AutoencoderKLFlux2's shared encoder and
    decoder) from a diffusers config dict, whose absent keys take the class's own __init__ defaults
    (`defaults`: block_out_channels, layers_per_block, latent_channels, sample_size). Refuses, through
    `refuse(field, why)`, what this network cannot build the same way: other block types, activations or
    norms, and one quant conv without the other."""
    chs = list(d.get("block_out_channels", defaults["block_out_channels"]))
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(key, [block] * len(defaults["block_out_channels"])))
        bad = [t for t in types if t != block]
        if bad:
            raise refuse(key, f"has block type {bad[0]!r}; only {block} is built")
        if len(types) != len(chs):
            raise refuse(key, f"has {len(types)} entries but block_out_channels has {len(chs)}")
    if d.get("act_fn", "silu") != "silu":
        raise refuse("act_fn", f"is {d['act_fn']!r}; only silu is built")
    if d.get("norm_type", "group") != "group":
        raise refuse("norm_type", f"is {d['norm_type']!r}; only group is built")
    quant, post_quant = d.get("use_quant_conv", True), d.get("use_post_quant_conv", True)
    if quant != post_quant:
        raise refuse("use_post_quant_conv", f"is {post_quant} while use_quant_conv is {quant}: both or none")
    sample_size = d.get("sample_size", defaults["sample_size"])
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return dict(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        block_out_channels=chs,
        layers_per_block=d.get("layers_per_block", defaults["layers_per_block"]),
        latent_channels=d.get("latent_channels", defaults["latent_channels"]),
        norm_num_groups=d.get("norm_num_groups", 32),
        mid_block_attention=d.get("mid_block_add_attention", True),
        quant_convs=bool(quant),
        sample_size=int(sample_size),
    )


# diffusers' AutoencoderKL.__init__ defaults for the keys a config.json may leave out.
_AUTOENCODER_KL_DEFAULTS = {
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 256,
}


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
    network = sd_network_fields(d, refuse, _AUTOENCODER_KL_DEFAULTS)
    try:
        return ModelConfig(
            **network,
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=d.get("shift_factor"),
            latents_mean=d.get("latents_mean"),
            latents_std=d.get("latents_std"),
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
    return {plain_name(name): t.detach().contiguous() for name, t in sd.items()}


# --------------------------------------------------------------------------------------------------------
# Folders


def read_safetensors(path: str | Path, what: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; WeightsError naming the file (after `what`, e.g. the config key
    that names it) when it is truncated, damaged or not safetensors at all."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError: a header or data shorter than it says, or no header at all
        prefix = f"{what}: " if what else ""
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{prefix}{path} cannot be read: truncated or not safetensors ({why})") from None


def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """WeightsError naming the first tensor of `sd` holding a NaN or an infinity: such weights only ever
    train to NaN, and the run would then blame its learning rate."""
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise WeightsError(
                f"{source}: tensor {name} holds {bad} non-finite value(s) (NaN or inf); these weights cannot "
                "be trained or used"
            )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_NAME).is_file():
        return read_safetensors(path / WEIGHTS_NAME)
    if (path / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((path / WEIGHTS_INDEX_NAME).read_text())
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            if not (path / shard).is_file():
                raise DiffusersFormatError(f"{path}: shard {shard} named in {WEIGHTS_INDEX_NAME} is missing")
            sd.update(read_safetensors(path / shard))
        return sd
    variants = sorted(path.glob("diffusion_pytorch_model.*.safetensors"))
    if variants:  # e.g. the fp16 variant SDXL ships
        return read_safetensors(variants[0])
    if (path / LEGACY_WEIGHTS_NAME).is_file():
        try:
            return torch.load(path / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip or pickle stream; weights_only refuses anything else
            raise WeightsError(f"{path / LEGACY_WEIGHTS_NAME} cannot be read ({type(e).__name__})") from None
    raise DiffusersFormatError(f"{path}: no weights file ({WEIGHTS_NAME}) in the folder")


def _folder(path: str | Path) -> Path:
    """A diffusers VAE folder: `path`, or its vae/ when it is a whole pipeline's folder."""
    path = Path(path)
    if path.is_dir() and (path / "vae" / CONFIG_NAME).is_file() and not (path / CONFIG_NAME).is_file():
        path = path / "vae"  # a whole pipeline folder: take its VAE
    return path


def read_diffusers_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, config.json as a dict) of a diffusers model folder, or of a pipeline folder's vae/.

    Any model family's reader starts here, then maps the dict to its own config (refusing what it cannot
    represent) before it reads the weights with read_diffusers_weights.
    """
    path = _folder(path)
    if not path.is_dir():
        raise DiffusersFormatError(f"{path}: not a folder")
    if not (path / CONFIG_NAME).is_file():
        raise DiffusersFormatError(f"{path}: {CONFIG_NAME} is missing")
    try:
        return path, json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise DiffusersFormatError(f"{path / CONFIG_NAME}: not valid JSON ({e})") from None


def read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model folder as stored (diffusers' names), checked finite."""
    sd = _read_weights(folder)
    check_finite(sd, str(folder))
    return sd


def read_diffusers_folder(
    path: str | Path, parse_config: Callable[[dict[str, Any], str], C]
) -> tuple[C, dict[str, torch.Tensor]]:
    """(parsed config, state dict as stored) of a diffusers model folder, or of a pipeline folder's vae/.

    parse_config(config.json's dict, its path) maps the config to a family's and refuses what the family
    cannot represent; it runs before any weights are read, so a refused folder costs no weight I/O.
    """
    folder, raw = read_diffusers_config(path)
    cfg = parse_config(raw, str(folder / CONFIG_NAME))
    return cfg, read_diffusers_weights(folder)


def read_diffusers(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, state dict in our names) of a diffusers AutoencoderKL folder or pipeline folder."""
    cfg, sd = read_diffusers_folder(path, config_from_diffusers)
    return cfg, state_dict_from_diffusers(sd)


def load_weights(
    module: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    source: str,
    error: type = WeightsError,
    mismatch: str = "does not fit the model config",
) -> None:
    """Load `sd` into `module` in place, every tensor and no other; else error("SOURCE MISMATCH: why")."""
    try:
        result = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise error(f"{source} {mismatch}: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise error(
            f"{source} {mismatch}: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def read_init_weights(path: str | Path, sd_names: bool = True) -> dict[str, torch.Tensor]:
    """The state dict (our names) of model.init_from: a diffusers folder or a .safetensors file.

    sd_names: map AutoencoderKL's deprecated names and 1x1-conv attention projections (the SD family's);
    the other families' module names are diffusers' own, taken as they are. FileNotFoundError or
    WeightsError naming model.init_from when it is missing or unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.init_from={str(path)!r}: no such file or folder")
    what = f"model.init_from={str(path)!r}"
    sd = _read_weights(_folder(path)) if path.is_dir() else read_safetensors(path, what)
    check_finite(sd, what)
    return state_dict_from_diffusers(sd) if sd_names else sd


def load_init_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load model.init_from into `module` (a model of any family) in place (see read_init_weights);
    WeightsError when it does not fit the model config."""
    sd = read_init_weights(path, sd_names=getattr(module, "family", "sd") == "sd")
    load_weights(module, sd, f"model.init_from={str(path)!r}")


def write_diffusers(sd: dict[str, torch.Tensor], config: dict[str, Any], path: str | Path) -> None:
    """Write a diffusers model folder (AutoencoderKL's, or another family's) from a state dict (our names)
    and its config.json dict; files appear complete or not at all."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = state_dict_to_diffusers(sd)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path))
    try:
        save_file(sd, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # weights first: a config never points at missing weights
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
