"""The trained weights of a run as its checkpoints hold them, and back: the VAE, the loss's learned
likelihood scale, the discriminator and the EMA, full tensors on the CPU however the model is sharded.
checkpoint.py writes, verifies and reads the folders; the trainer adds the optimizers, counters and data
position.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from vae_scale.ema import EMA
from vae_scale.fsdp import local_shard

log = logging.getLogger(__name__)


def trained_weights(
    model: nn.Module, criterion: nn.Module, disc: nn.Module | None, ema: EMA | None
) -> dict[str, dict[str, torch.Tensor] | None]:
    """{"vae", "ema", "loss", "discriminator"} -> full state dict (None: the run has none), the files of a
    checkpoint. model: the Autoencoder (VAE + learned likelihood). Gathered under FSDP: call on every rank.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {
        "vae": {k[len("vae.") :]: v for k, v in full.items() if k.startswith("vae.")},
        "ema": ema.state_dict() if ema is not None else None,
        "loss": criterion.likelihood_state(),
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
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
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
