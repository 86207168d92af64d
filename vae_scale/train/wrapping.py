"""Transforms applied to a single-device model from outside: activation checkpointing, memory format,
compilation. prepare_model applies them in their one order; FSDP shards the result (vae_scale/train/fsdp.py),
compiling each of its units first (compile_per_unit); train.compile compiles the objective too
(compiled_objective).

The model code never knows about these (see vae_scale/models/sd.py); the trainer and the tests apply them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from vae_scale.config import ModelConfig

T = TypeVar("T")


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


CPU_CHANNELS_LAST = False
"""model.channels_last=auto on a CPU: NCHW. The trainer's sd-f8 step measured no faster channels_last there
(paired over 10 rounds on a 2-core Xeon: channels_last / NCHW time 1.02, 95% interval 0.79-1.11; level on
an AMD EPYC; docs/performance.md), and NCHW needs no conversion of the input. On CUDA, cuDNN's tensor-core
convolutions run NHWC and NCHW tensors pay a transpose around each, so auto is channels_last there."""


def channels_last_choice(model: ModelConfig, device_type: str) -> tuple[bool, str]:
    """(whether the convolutions run channels_last, why) for model.channels_last on a `device_type` device:
    true and false as given, auto by device (CPU_CHANNELS_LAST) and family (3D convolutions: NCHW)."""
    if not isinstance(model.channels_last, str):
        return model.channels_last, f"model.channels_last={str(model.channels_last).lower()}"
    if model.family == "wan":
        return False, "auto: model.family=wan convolves in 3D, which channels_last (4D) cannot hold"
    if device_type == "cuda":
        return True, "auto: channels_last on CUDA (cuDNN's tensor-core convolutions run NHWC)"
    why = "channels_last" if CPU_CHANNELS_LAST else "NCHW"
    return CPU_CHANNELS_LAST, f"auto: {why} on a {device_type} (measured: docs/performance.md)"


def apply_channels_last(vae: nn.Module) -> nn.Module:
    """Store conv weights channels_last so convolutions run NHWC; feed inputs with to_channels_last."""
    return vae.to(memory_format=torch.channels_last)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """An image batch in channels_last memory format (a no-op when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def compile_modules(modules: list[nn.Module], backend: str = "inductor") -> None:
    """torch.compile each module in place (`Module.compile`: state-dict names unchanged), each its own
    graphs, tracing whatever wraps its inside (activation checkpointing)."""
    for module in modules:
        module.compile(backend=backend)


def prepare_model(
    vae: nn.Module, sharded: bool = False, compile: bool = False, backend: str = "inductor"
) -> nn.Module:
    """Apply what the config asks for, in this order: activation checkpointing (wraps the levels), then
    channels_last (the weights' memory format), then torch.compile of the model's `compile_units()` (for the
    SD family the encoder and the decoder; each traces the two above).

    sharded: the model is about to be sharded with FSDP, which shards contiguous weights only, so
    channels_last then applies to the activations alone (convolutions still run NHWC when their input is);
    and train.compile is then applied per FSDP unit by the sharding step (compile_per_unit), not here: a
    compiled encoder would hold its units' FSDP hooks inside its graphs.
    """
    if vae.config.gradient_checkpointing:
        apply_activation_checkpointing(vae)
    device_type = next(vae.parameters()).device.type
    if channels_last_choice(vae.config, device_type)[0] and not sharded:
        apply_channels_last(vae)
    if compile and not sharded:
        compile_modules(vae.compile_units(), backend)
    return vae


def compiled_objective(loss: Callable[..., T], backend: str = "inductor") -> Callable[..., T]:
    """train.compile's objective (VAELoss.autoencoder_loss): compiled whole, the adaptive adversarial
    weight included (it takes its gradients by torch.func, which compiles), so the loss's many small ops
    fuse into a few kernels. The step number is an input: dynamo recompiles when it first changes (then
    treats it as dynamic) and where the schedules change branch (disc_start, the end of the KL warm-up)."""
    return torch.compile(loss, backend=backend)


def compile_per_unit(vae: nn.Module, units: list[nn.Module], backend: str = "inductor") -> list[nn.Module]:
    """train.compile under FSDP2, as torchtitan compiles a sharded transformer: each FSDP unit (a block)
    compiled on its own, before it is sharded, so that its all-gather and reduce-scatter hooks run at the
    unit's boundary, outside its graphs; the thin layers the root holds (conv_in, conv_out, the last norms)
    run eagerly. Without units (NO_WRAP: only the root is sharded) the model's `compile_units()`, which no
    FSDP hook cuts. Returns what was compiled."""
    modules = units or vae.compile_units()
    compile_modules(modules, backend)
    return modules
