"""Transforms applied to a single-device model from outside: activation checkpointing, memory format,
compilation. prepare_model applies them in their one order; FSDP shards the result (vae_scale/train/fsdp.py).

The model code never knows about these (see vae_scale/models/sd.py); the trainer and the tests apply them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper


def checkpointed_blocks(vae: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute-or-index) of every block that activation checkpointing wraps: the model's
    `blocks()` (for the SD family each encoder and decoder level and both mid blocks)."""
    places = []
    for name in vae.blocks():
        parent, _, attr = name.rpartition(".")
        places.append((vae.get_submodule(parent), attr))
    return places


def apply_activation_checkpointing(vae: nn.Module) -> nn.Module:
    """Recompute each level's activations in backward (non-reentrant checkpointing), in place.

    State-dict names are unchanged (the wrapper's prefix is stripped by its own hooks).
    """
    for parent, name in checkpointed_blocks(vae):
        block = parent[int(name)] if name.isdigit() else getattr(parent, name)
        wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        if name.isdigit():
            parent[int(name)] = wrapped
        else:
            setattr(parent, name, wrapped)
    return vae


def apply_channels_last(vae: nn.Module) -> nn.Module:
    """Store conv weights channels_last so convolutions run NHWC; feed inputs with to_channels_last."""
    return vae.to(memory_format=torch.channels_last)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """An image batch in channels_last memory format (a no-op when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def prepare_model(vae: nn.Module, sharded: bool = False, compile: bool = False) -> nn.Module:
    """Apply what the config asks for, in this order: activation checkpointing (wraps the levels), then
    channels_last (the weights' memory format), then torch.compile of the encoder and the decoder (which
    traces the two above).

    sharded: the model is about to be sharded with FSDP, which shards contiguous weights only, so
    channels_last then applies to the activations alone (convolutions still run NHWC when their input is).
    compile: train.compile (refused with FSDP before this is reached).
    """
    if vae.config.gradient_checkpointing:
        apply_activation_checkpointing(vae)
    if vae.config.channels_last and not sharded:
        apply_channels_last(vae)
    if compile:
        for unit in vae.compile_units():
            unit.compile()
    return vae
