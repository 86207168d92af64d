"""The trained weights of a run as its checkpoints hold them, and back: the VAE, the loss's learned
likelihood scale, the discriminator and the EMA, full tensors on the CPU however the model is sharded.
checkpoint.py writes, verifies and reads the folders; the trainer adds the optimizers, counters and data
position. A new phase (model.init_from naming a run or a checkpoint) takes the weights without the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from vae_scale.config import Config, ConfigError, config_from_dict
from vae_scale.formats.checkpoint import DamagedCheckpoint, is_complete, newest_intact, read_checkpoint_file
from vae_scale.formats.weights import check_finite, plain_name
from vae_scale.train.ema import EMA
from vae_scale.train.fsdp import local_shard

log = logging.getLogger(__name__)

ALIGN_PREFIX = "align."
"""The VF loss's latent projection in the Autoencoder's and the loss file's names."""


def _align_weights(model: nn.Module, saved: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The saved projection weights that fit this model's projection; {} when it has none or they differ
    (a run that starts aligning, or aligns to another encoder, starts its projection afresh)."""
    own = {k: p.shape for k, p in model.named_parameters() if k.startswith(ALIGN_PREFIX)}
    saved = {k: v for k, v in (saved or {}).items() if k.startswith(ALIGN_PREFIX)}
    if not own or saved.keys() != own.keys() or any(saved[k].shape != own[k] for k in own):
        return {}
    return saved


def _buffers(model: nn.Module, vae: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of the VAE's state dict that are not parameters (buffers)."""
    params = {plain_name(n) for n, _ in model.named_parameters()}
    return {k: v for k, v in vae.items() if f"vae.{k}" not in params}


def trained_weights(
    model: nn.Module, criterion: nn.Module, disc: nn.Module | None, ema: EMA | None
) -> dict[str, dict[str, torch.Tensor] | None]:
    """{"vae", "ema", "loss", "discriminator"} -> full state dict (None: the run has none), the files of a
    checkpoint. model: the Autoencoder (VAE + learned likelihood + the VF loss's projection, which goes
    into "loss" under its own names, align.*). Gathered under FSDP: call on every rank.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    align = {k: v for k, v in full.items() if k.startswith(ALIGN_PREFIX)}
    vae = {k[len("vae.") :]: v for k, v in full.items() if k.startswith("vae.")}
    return {
        "vae": vae,
        # The averaged (trainable) parameters and the model's buffers, which are not averaged (FLUX.2's latent
        # statistics, BatchNorm running statistics); frozen parameters are vae's only (stored once).
        "ema": {**_buffers(model, vae), **ema.state_dict()} if ema is not None else None,
        "loss": criterion.likelihood_state() | align,
        "discriminator": disc.state_dict() if disc is not None else None,
    }


def load_trained_weights(
    weights: dict[str, dict[str, torch.Tensor]],
    model: nn.Module,
    criterion: nn.Module,
    disc: nn.Module | None,
    ema: EMA | None,
    path: Path,
    main: bool,
) -> None:
    """A checkpoint's weights (as trained_weights gives them) into the run's parts, on every rank. An EMA
    the checkpoint lacks (switched on at resume) starts from the loaded weights; `main` says so once."""
    full = {f"vae.{k}": v for k, v in weights["vae"].items()}
    if criterion.likelihood is not None:
        name = criterion.likelihood.name
        full[f"likelihood.{name}"] = weights["loss"][name].reshape(-1)  # once saved 0-dim
    align = _align_weights(model, weights.get("loss"))
    fresh_align = not align and any(k.startswith(ALIGN_PREFIX) for k, _ in model.named_parameters())
    full |= align
    options = StateDictOptions(full_state_dict=True, strict=not fresh_align)
    set_model_state_dict(model, full, options=options)
    if fresh_align and main:
        log.info("VF alignment on: %s has no projection of this shape; it starts afresh", path)
    if disc is not None and "discriminator" in weights:
        disc.load_state_dict(weights["discriminator"])
    if ema is not None and "ema" in weights:
        ema.load_state_dict(weights["ema"])
    elif ema is not None:  # average from here, not from the initial weights
        ema.reset()
        if main:
            log.info("EMA on: %s has no EMA weights; the EMA starts from its weights", path)


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> list[float]:
    """Sum and sum of squares of this rank's parameters (its shards under FSDP) in float64: the ranks of a
    data-parallel run hold the same weights when theirs agree."""
    params = [local_shard(p).detach().double() for p in model.parameters()]
    return [sum(p.sum() for p in params).item(), sum(p.pow(2).sum() for p in params).item()]


# --------------------------------------------------------------------------------------------------------
# A new phase: another run's weights, new loss and optimizer settings


def phase_start(init_from: str) -> tuple[Path, Config] | None:
    """(checkpoint, the config it was trained with) when model.init_from names a checkpoint folder or a run
    folder (its newest intact checkpoint); None for a diffusers folder or a .safetensors file.

    ConfigError naming model.init_from when the run has no intact checkpoint or the checkpoint is damaged.
    """
    path = Path(init_from).expanduser()
    key = f"model.init_from={init_from!r}"
    if not is_complete(path):
        if not (path / "checkpoints").is_dir():
            return None
        found, damaged = newest_intact(path)
        if found is None:
            why = f" ({len(damaged)} damaged, the newest: {damaged[0][1]})" if damaged else ""
            raise ConfigError(f"{key}: the run has no intact checkpoint to start from{why}")
        path = found
    try:
        saved = config_from_dict(yaml.safe_load(read_checkpoint_file(path, "config.yaml")))
    except (DamagedCheckpoint, OSError, ValueError, yaml.YAMLError) as e:  # ConfigError is a ValueError
        raise ConfigError(f"{key}: {path}/config.yaml cannot be used ({e})") from None
    return path, saved


def read_phase_weights(path: Path, name: str) -> dict[str, torch.Tensor] | None:
    """A weights file (vae, ema, loss, discriminator) of the checkpoint a new phase starts from, checked
    against its manifest and for non-finite values; None when the checkpoint has none."""
    if not (path / f"{name}.safetensors").is_file():
        return None
    sd = read_checkpoint_file(path, f"{name}.safetensors")
    check_finite(sd, f"model.init_from: {path / name}.safetensors")
    return sd


def load_phase_start(
    path: Path,
    saved: Config,
    cfg: Config,
    model: nn.Module,
    criterion: nn.Module,
    disc: nn.Module | None,
    ema: EMA | None,
) -> str:
    """Into a new run whose VAE already holds `path`'s weights (build_vae loaded them): the EMA, the loss's
    learned likelihood scale and the discriminator that `path` holds, each where this run has the same
    one; the others start afresh. The optimizers and counters are this run's own (from step 0). Every rank
    calls it. Returns the line that says what was continued and what starts afresh."""
    kept, fresh = ["VAE weights"], ["optimizer state", "step counter", "data order"]
    if ema is not None:
        weights = read_phase_weights(path, "ema")
        if weights is not None:
            # A parameter this phase trains that the checkpoint's EMA lacks (frozen there) starts from its
            # weights.
            missing = ema.load_state_dict(weights)
            kept.append(f"EMA ({len(missing)} tensors from the weights)" if missing else "EMA")
        else:
            fresh.append("EMA (from the VAE weights)")
    if criterion.likelihood is not None:
        old, new = saved.loss, cfg.loss
        same = old.recon == new.recon and (
            new.recon != "logistic" or old.logistic_per_channel == new.logistic_per_channel
        )
        weights = read_phase_weights(path, "loss") if same else None
        name = criterion.likelihood.name
        if weights is not None and name in weights:
            full = {f"likelihood.{name}": weights[name].reshape(-1)}
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, full, options=options)
            kept.append(f"loss {name}")
        else:
            fresh.append(f"loss {name}")
    if any(k.startswith(ALIGN_PREFIX) for k, _ in model.named_parameters()):
        align = _align_weights(model, read_phase_weights(path, "loss"))
        if align:
            set_model_state_dict(model, align, options=StateDictOptions(full_state_dict=True, strict=False))
            kept.append("VF projection")
        else:
            fresh.append("VF projection")
    if disc is not None:
        old, new = saved.loss, cfg.loss
        shape = ("disc_layers", "disc_channels")
        same = old.disc_weight > 0 and all(getattr(old, k) == getattr(new, k) for k in shape)
        weights = read_phase_weights(path, "discriminator") if same else None
        if weights is not None:
            disc.load_state_dict(weights)
            kept.append("discriminator")
        else:
            fresh.append("discriminator")
    return f"new phase from {path}: {', '.join(kept)} continued; {', '.join(fresh)} afresh"
