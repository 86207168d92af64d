"""Which of the VAE's parameters train: `train.trainable` and `train.frozen`, glob patterns over the VAE's
parameter names (its state-dict names: decoder.up_blocks.3.resnets.0.conv1.weight).

    train.trainable=[decoder]                       # decoder-only fine-tuning (sd-vae-ft-mse's recipe)
    train.trainable=['encoder.down_blocks.3.*', 'decoder.up_blocks.0.*']

A parameter trains when it matches a trainable pattern (or train.trainable is empty) and no frozen pattern.
A pattern matches a name as fnmatch does, or as the module it names: `decoder` is `decoder` and
`decoder.*`. Frozen parameters get requires_grad=False before the model is wrapped, so everything after
follows from that one flag: the optimizer and gradient clipping take the trainable parameters only, DDP
and FSDP2 reduce their gradients only, the EMA averages them only (its file in a checkpoint holds them
alone; vae.safetensors holds every weight once), and the optimizer state holds theirs.

The loss's learned likelihood scale and the discriminator are not the VAE's: they train as before.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch.nn as nn

from vae_scale.config import ConfigError, TrainConfig


def matches(name: str, pattern: str) -> bool:
    """Whether a parameter name matches a pattern (a glob, or a module prefix: `decoder` is `decoder.*`)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def trainable_names(names: list[str], train: TrainConfig) -> list[str]:
    """The names of `names` that train under train.trainable / train.frozen, in their order.

    ConfigError naming the key and the pattern when a pattern matches no parameter (a typo would otherwise
    train everything, or nothing, silently), and when no parameter is left to train.
    """
    for key in ("trainable", "frozen"):
        for pattern in getattr(train, key):
            if not any(matches(n, pattern) for n in names):
                prefixes = sorted({n.split(".")[0] for n in names})
                raise ConfigError(
                    f"train.{key}: pattern {pattern!r} matches no parameter of the model (its parameters "
                    f"are under {', '.join(prefixes)}; e.g. {names[0]})"
                )
    chosen = [
        n
        for n in names
        if (not train.trainable or any(matches(n, p) for p in train.trainable))
        and not any(matches(n, p) for p in train.frozen)
    ]
    if not chosen:
        raise ConfigError(
            f"train.trainable={list(train.trainable)} with train.frozen={list(train.frozen)} leaves no "
            "parameter to train: nothing would change"
        )
    return chosen


def freeze(vae: nn.Module, train: TrainConfig) -> None:
    """Set requires_grad on the VAE's parameters as train.trainable / train.frozen say (left as they are,
    all trainable, when both are empty)."""
    if not train.trainable and not train.frozen:
        return
    named = dict(vae.named_parameters())
    chosen = set(trainable_names(list(named), train))
    for name, p in named.items():
        p.requires_grad_(name in chosen)


def describe(vae: nn.Module, train: TrainConfig) -> str:
    """The start-up line that says what trains (numel of a sharded parameter is its full size)."""
    params = list(vae.parameters())
    n, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    if n == total:
        return f"trainable      every parameter ({total / 1e6:.2f} M)"
    what = ", ".join(train.trainable) if train.trainable else "everything"
    if train.frozen:
        what += f" except {', '.join(train.frozen)}"
    return f"trainable      {n / 1e6:.2f} M of {total / 1e6:.2f} M parameters ({what}); the rest frozen"
