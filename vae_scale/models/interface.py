"""The model interface: what the trainer, the objective, the exporters and the commands rely on, and the
registry of families behind it.

    vae = build_model(cfg.model)                 # the family named by model.family, randomly initialised
    vae = load_diffusers("flux2-vae/")           # the family is read off config.json's _class_name
    vae = load_checkpoint("runs/dcae-ft")        # the family is read off the checkpoint's config

A family is one module in vae_scale/models/ whose model class has the attributes and methods of
`Autoencoder` below; adding one is that module, an entry in FAMILIES, presets and tests. Nothing outside
vae_scale/models/ names a family's classes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import ClassVar, Protocol

import torch
import torch.nn as nn

from vae_scale.config import ConfigError, ModelConfig
from vae_scale.formats.weights import CONFIG_NAME, DiffusersFormatError

FAMILIES: dict[str, str] = {
    "sd": "vae_scale.models.sd:VAE",
    "flux2": "vae_scale.models.flux2:Flux2VAE",
    "dcae": "vae_scale.models.dcae:DCAE",
    "wan": "vae_scale.models.wan:WanVAE",
}
"""model.family -> "module:class" of its model; the module is imported when the family is used."""


class Posterior(Protocol):
    """What encode returns: a DiagonalGaussian, or a DeterministicLatent (vae_scale/models/posterior.py)."""

    mean: torch.Tensor

    def mode(self) -> torch.Tensor: ...
    def sample(self, eps: torch.Tensor | None = None) -> torch.Tensor: ...
    def sample_kl(self, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...
    def kl(self) -> torch.Tensor: ...
    def kl_per_channel(self) -> torch.Tensor: ...


class Autoencoder(Protocol):
    """A model family's autoencoder, as everything outside vae_scale/models/ sees it.

    Module names equal the family's diffusers class, so `state_dict()` is the diffusers folder's weights.
    The model is written for one device: activation checkpointing, memory format and compile are applied
    from outside (vae_scale/train/wrapping.py) at the places `blocks()` and `compile_units()` name, FSDP
    shards at `blocks()` too (vae_scale/train/fsdp.py).
    """

    family: ClassVar[str]
    """model.family of this class."""
    diffusers_classes: ClassVar[tuple[str, ...]]
    """The diffusers class names whose folders this family reads (the first is what it writes)."""
    uses_every_parameter: ClassVar[bool]
    """Whether every step's backward reaches every parameter (DDP then need not search for unused ones)."""
    config: ModelConfig

    def encode(self, x: torch.Tensor, tiled=False) -> Posterior: ...
    def decode(self, z: torch.Tensor, tiled=False) -> torch.Tensor: ...
    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, Posterior]: ...

    @property
    def downsample_factor(self) -> int: ...
    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, ...]: ...
    def set_kernels(self, impl: str) -> None: ...

    def blocks(self) -> list[str]:
        """Dotted names of the repeated blocks: where activation checkpointing and FSDP cut the model."""
        ...

    def compile_units(self) -> list[nn.Module]:
        """The modules train.compile compiles (each traced whole, with the checkpointing inside)."""
        ...

    def last_layer(self) -> tuple[nn.Conv2d, int] | None:
        """The decoder's last convolution, whose gradients latent diffusion's adaptive weight reads, and the
        pixel-shuffle factor between its output and the image (1: its output is the image); None when the
        family has no such 2D convolution (the adaptive weight is then loss.disc_weight itself)."""
        ...

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The latent as the family's diffusion pipeline feeds it to its denoiser (scale, shift, stats)."""
        ...

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of normalize_latents: what decode takes."""
        ...

    @classmethod
    def from_diffusers(cls, path: str | Path, **config_overrides) -> Autoencoder: ...
    def save_diffusers(self, path: str | Path, config: dict | None = None) -> None: ...
    def diffusers_config(self) -> dict:
        """The config.json this model writes (its diffusers class's keys), from its ModelConfig."""
        ...


def model_class(family: str) -> type:
    """The model class of a family (model.family)."""
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not one of {', '.join(FAMILIES)}")
    module, _, name = FAMILIES[family].partition(":")
    return getattr(importlib.import_module(module), name)


def build_model(cfg: ModelConfig) -> nn.Module:
    """A randomly initialised model of cfg.family (seeded by torch's global generator)."""
    return model_class(cfg.family)(cfg)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of a model with this config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def diffusers_family(path: str | Path) -> str:
    """The family whose classes include the `_class_name` of a diffusers folder's config.json (or of a
    pipeline folder's vae/); DiffusersFormatError names the class when no family reads it."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / "vae" / CONFIG_NAME).is_file():
        folder = folder / "vae"
    try:
        name = json.loads((folder / CONFIG_NAME).read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "sd"  # the SD family's reader says what is wrong with the folder
    for family in FAMILIES:
        if name in model_class(family).diffusers_classes:
            return family
    readable = sorted(c for f in FAMILIES for c in model_class(f).diffusers_classes)
    raise DiffusersFormatError(
        f"{folder / CONFIG_NAME}: _class_name {name!r} is not a VAE this trainer reads "
        f"({', '.join(readable)})"
    )


def load_diffusers(path: str | Path, **config_overrides) -> nn.Module:
    """The model of a diffusers folder, of whichever family its config.json names."""
    return model_class(diffusers_family(path)).from_diffusers(path, **config_overrides)


def load_checkpoint(path: str | Path, ema: bool = False, **config_overrides) -> nn.Module:
    """The weights of a checkpoint (or a run folder's newest complete one), in the family it was trained as.

    ema=True takes the EMA weights (an error if the run kept none); config_overrides set ModelConfig fields
    that do not change the weights (kernels, channels_last, ...).
    """
    import yaml

    from vae_scale.config import config_from_dict
    from vae_scale.formats.checkpoint import read_checkpoint_file, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    weights = ckpt / ("ema.safetensors" if ema else "vae.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{ckpt}: no {weights.name}" + (" (optim.ema_decay was 0)" if ema else ""))
    # Both files checked against the checkpoint's manifest: DamagedCheckpoint names a damaged one.
    cfg = config_from_dict(yaml.safe_load(read_checkpoint_file(ckpt, "config.yaml"))).model
    state = read_checkpoint_file(ckpt, weights.name)
    model = build_model(dataclasses.replace(cfg, **config_overrides))
    if ema and model.state_dict().keys() - state.keys():
        # The EMA averages the trainable parameters only (train.trainable): the frozen ones are vae's. A run
        # that trained everything needs nothing from vae.safetensors (which may be the damaged file).
        state = {**read_checkpoint_file(ckpt, "vae.safetensors"), **state}
    model.load_state_dict(state)
    return model


def arch_config(cfg: ModelConfig, arch_cls: type, shared: dict[str, str]):
    """A family's own config dataclass (field names: its diffusers config.json's) from a ModelConfig:
    model.arch, plus the keys the family shares with ModelConfig (`shared`: family field -> ModelConfig
    field; a None there keeps the family's default). ConfigError names the key that does not fit."""
    names = {f.name for f in dataclasses.fields(arch_cls)}
    for key in cfg.arch:
        if key in shared:
            raise ConfigError(f"model.arch.{key}: set model.{shared[key]} instead")
        if key not in names:
            own = sorted(names - set(shared))
            raise ConfigError(f"model.arch.{key} is not a {cfg.family} key (its keys: {', '.join(own)})")
    given = {f: getattr(cfg, m) for f, m in shared.items() if getattr(cfg, m) is not None}
    try:
        return arch_cls(**cfg.arch, **given)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.arch ({cfg.family}): {e}") from None


def _plain(v):
    """Tuples as lists, all the way down: what YAML and JSON write."""
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def model_config(arch, family: str, shared: dict[str, str], **fields) -> ModelConfig:
    """The ModelConfig of a family's own config dataclass: the inverse of arch_config."""
    own = {f.name: _plain(getattr(arch, f.name)) for f in dataclasses.fields(arch) if f.name not in shared}
    common = {m: _plain(getattr(arch, f)) for f, m in shared.items()}
    return ModelConfig(family=family, arch=own, **{**common, **fields})
