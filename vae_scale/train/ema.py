"""The exponential moving average of a model's weights, kept in fp32 beside them (`optim.ema_decay`).

It averages the trainable parameters only (train.trainable): a frozen weight's average is the weight itself,
so a checkpoint's ema.safetensors holds the trainable ones and readers take the rest from vae.safetensors.

Under FSDP2 the average holds this rank's shard of each parameter only; state_dict gathers full weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from vae_scale.train.fsdp import full_tensor, local_shard


class EMA:
    """Exponential moving average of parameters, kept in fp32 (`decay` per optimizer step).

    Under FSDP2 the shadow holds this rank's shard only (plain tensors); state_dict gathers full weights.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [local_shard(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the current weights."""
        torch._foreach_lerp_(
            self.shadow, [local_shard(p).detach().float() for p in self.params], 1.0 - self.decay
        )

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average afresh from the current weights."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(local_shard(p).detach().float())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) EMA weights on the CPU; a collective under FSDP: call it on every rank."""
        out = {}
        for name, p, s in zip(self.names, self.params, self.shadow):
            if hasattr(p, "device_mesh"):  # rebuild the sharded tensor, then gather it
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[name] = full_tensor(s).detach().cpu().contiguous()
        return out

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model's parameters for the block, the trained ones restored after it.

        Under FSDP it writes the shards; reshard the model before and after running it (see
        Trainer.inference), so that no gathered copy of either set of weights outlives its block.
        """
        with torch.no_grad():
            backup = [local_shard(p).detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                local_shard(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    local_shard(p).copy_(b)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Full weights (as state_dict gives them) into the average; this rank's shard of each under FSDP.

        A parameter `state` lacks (one that was frozen where the average was saved: the EMA keeps trainable
        parameters only) starts from its current weights. Returns the names of those.
        """
        missing = []
        for name, p, s in zip(self.names, self.params, self.shadow):
            if name not in state:
                s.copy_(local_shard(p).detach().float())
                missing.append(name)
                continue
            full = state[name].to(s.device)
            if hasattr(p, "device_mesh"):  # take this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
            s.copy_(full)
        return missing
