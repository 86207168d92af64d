"""FSDP2 for the VAE: what the launch asked for, the wrap units, sharding, and the start-up description.

    plan = fsdp_plan(cfg, cuda=torch.cuda.is_available())   # before any process group starts
    ae = shard(ae, plan, units=fsdp_units(ae.vae), device=device, mixed_precision="bf16")

The same code shards on every machine. `accelerate launch --config_file launch/accelerate/fsdp.yaml` (or
`train.parallel=fsdp` under torchrun) asks for FSDP; Accelerate 1.15 turns its own FSDP state on only for GPU
launches and silently runs DDP over gloo otherwise, so the trainer reads the request itself (the FSDP_*
variables `accelerate launch` exports) and applies torch's `fully_shard` on every backend, GPU or gloo.

Units: one FSDP unit per encoder and decoder level (DownBlock, UpBlock) and per mid block, the places where
activation checkpointing also cuts the model (vae_scale/train/wrapping.py), plus the root for the rest
(conv_in, conv_out, the final norms, quant convs and the loss's learned likelihood scale). A level is the
natural unit: its blocks run back to back, so one all-gather per level overlaps with the previous level's
compute, and it is correct for every preset because it never wraps a container (nn.ModuleList has no forward,
which `fully_shard` refuses) and never a module too small to pay for its own collective.

Mixed precision: parameters are all-gathered in the compute dtype (bf16/fp16), gradients reduce-scattered in
fp32 (as DDP all-reduces fp32 gradients) unless `train.reduce_dtype=compute`, and the root returns fp32.
The root keeps its parameters after forward (they are needed again at once in backward, and the loss reads
the learned likelihood scale between the two).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vae_scale.config import Config, ConfigError
from vae_scale.train.wrapping import channels_last_choice

UNIT_CLASSES = ("DownBlock", "UpBlock", "MidBlock")
"""The SD family's unit classes, what launch/accelerate/fsdp.yaml names (by default the units are the
model's own blocks, which for the SD family are these)."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


@dataclass
class FSDPPlan:
    """How the model is sharded; `enabled` is False for DDP or a single process."""

    enabled: bool = False
    reshard_after_forward: bool = True
    """Free each unit's gathered parameters after its forward (ZeRO-3) or keep them for backward (ZeRO-2)."""
    unit_classes: tuple[str, ...] | None = None
    """Class names of the modules that get their own FSDP unit (the launch's
    fsdp_transformer_layer_cls_to_wrap), or None for the model's own blocks (its `blocks()`)."""
    offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in CPU memory (GPU runs only)."""
    source: str = ""
    """What asked for FSDP, for the start-up lines."""
    notes: list[str] = field(default_factory=list)


def launch_asked_for_fsdp() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it exports ACCELERATE_USE_FSDP=true)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def fsdp_plan(cfg: Config, cuda: bool) -> FSDPPlan:
    """The sharding the launch and the config ask for, validated before any process group starts.

    Raises ConfigError (one line naming the key or the launch setting) for what cannot be honoured.
    """
    launched = launch_asked_for_fsdp()
    asked = cfg.train.parallel
    if asked == "ddp" and launched:
        raise ConfigError(
            "train.parallel=ddp, but the launch asked for FSDP (ACCELERATE_USE_FSDP=true, e.g. "
            "launch/accelerate/fsdp.yaml): use one of them"
        )
    if not (asked == "fsdp" or (asked == "auto" and launched)):
        return FSDPPlan(enabled=False)
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"FSDP was asked for, but this torch {torch.__version__} has no FSDP2 (fully_shard): {e}"
        ) from None
    if not torch.distributed.is_available():
        raise ConfigError(f"FSDP was asked for, but this torch {torch.__version__} has no torch.distributed")

    source = "launch (ACCELERATE_USE_FSDP)" if launched else "train.parallel=fsdp"
    version = os.environ.get("FSDP_VERSION", "2").strip()
    if version != "2":
        raise ConfigError(
            f"fsdp_version: {version} is not supported: set fsdp_version: 2 (FSDP2) in the launch config"
        )
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    if policy == "SIZE_BASED_WRAP":
        raise ConfigError(
            "fsdp_auto_wrap_policy: SIZE_BASED_WRAP wraps nn.ModuleList containers, which fully_shard "
            "refuses: use TRANSFORMER_BASED_WRAP with fsdp_transformer_layer_cls_to_wrap: "
            f"{','.join(UNIT_CLASSES)} (launch/accelerate/fsdp.yaml)"
        )
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise ConfigError(f"fsdp_auto_wrap_policy: {policy} is not one of TRANSFORMER_BASED_WRAP | NO_WRAP")
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    if policy == "NO_WRAP":
        classes: tuple[str, ...] | None = ()
    elif names:
        classes = tuple(n.strip() for n in names.split(",") if n.strip())
    else:
        classes = None
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError(
            "fsdp_activation_checkpointing: true is not used: set it false and use "
            "model.gradient_checkpointing=true (checkpoints each FSDP unit, applied before sharding)"
        )
    if _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ConfigError(
            "fsdp_cpu_ram_efficient_loading: true is for transformers' from_pretrained: set it false "
            "(every rank builds the same initial weights from train.seed, then keeps its shard)"
        )
    state_dict = os.environ.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT").strip().upper()
    if state_dict != "SHARDED_STATE_DICT":
        raise ConfigError(
            f"fsdp_state_dict_type: {state_dict} is not used: set SHARDED_STATE_DICT (vae-scale always "
            "writes the optimizer state sharded with torch.distributed.checkpoint and the full weights to "
            "vae.safetensors)"
        )
    offload = _env_flag("FSDP_OFFLOAD_PARAMS")
    if offload and not cuda:
        raise ConfigError(
            "fsdp_offload_params: true needs a GPU (parameters are already in CPU memory): set it false"
        )
    if channels_last_choice(cfg.model, "cuda" if cuda else "cpu")[0]:
        notes = [
            "channels_last: activations only (FSDP shards contiguous weights; convolutions still run NHWC)"
        ]
    else:
        notes = []
    return FSDPPlan(
        enabled=True,
        reshard_after_forward=_env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        unit_classes=classes,
        offload=offload,
        source=source,
        notes=notes,
    )


def fsdp_units(root: nn.Module, classes: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every FSDP unit below `root`, innermost first.

    classes None: the model's own blocks (`vae.blocks()`, the places activation checkpointing also cuts:
    for the SD family each encoder and decoder level and both mid blocks). Otherwise a module counts when
    its class (or, behind activation checkpointing's wrapper, the wrapped module's class) is one of
    `classes`, the launch's fsdp_transformer_layer_cls_to_wrap; ConfigError when a name matches nothing.
    The wrapper is what gets sharded, so checkpointing and sharding cut at the same place.
    """
    if classes is None:
        vae = root.vae if hasattr(root, "vae") else root
        prefix = "vae." if vae is not root else ""
        wanted = {prefix + name for name in vae.blocks()}
        found = [
            (n, m) for n, m in root.named_modules() if n in wanted and next(m.parameters(), None) is not None
        ]
        return found[::-1]  # named_modules is parents first: reversed, every unit comes before its parents
    classes = tuple(classes)
    found: list[tuple[str, nn.Module]] = []
    seen_classes: set[str] = set()
    for name, module in root.named_modules():
        inner = getattr(module, "_checkpoint_wrapped_module", module)
        if name.endswith("_checkpoint_wrapped_module"):
            continue  # counted through its wrapper
        cls = type(inner).__name__
        if cls in classes and next(module.parameters(), None) is not None:
            found.append((name, module))
            seen_classes.add(cls)
    missing = [c for c in classes if c not in seen_classes]
    if missing:
        own = sorted(
            {type(getattr(m, "_checkpoint_wrapped_module", m)).__name__ for _, m in fsdp_units(root)}
        )
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which this model does not have "
            f"(its blocks: {', '.join(own)})"
        )
    return found[::-1]


def mixed_precision(compute: str, reduce_dtype: str, root: bool):
    """FSDP2's MixedPrecisionPolicy for `train.mixed_precision` (resolved) and `train.reduce_dtype`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param = _DTYPES.get(compute)
    if param is None:  # fp32 training: nothing to cast
        return MixedPrecisionPolicy()
    reduce = param if reduce_dtype == "compute" else torch.float32
    return MixedPrecisionPolicy(
        param_dtype=param, reduce_dtype=reduce, output_dtype=torch.float32 if root else None
    )


def shard(
    model: nn.Module,
    plan: FSDPPlan,
    units: list[tuple[str, nn.Module]],
    device: torch.device,
    compute: str,
    reduce_dtype: str,
    forward_methods: Iterable[str] = (),
) -> nn.Module:
    """Apply `fully_shard` to every unit, then to `model` as the root; returns `model` (now an FSDPModule).

    Needs an initialised process group. `forward_methods` are root methods that run the model outside
    forward (encode/decode for image logging and evaluation): FSDP gathers the root's parameters for them.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    offload = CPUOffloadPolicy() if plan.offload else OffloadPolicy()
    for _, unit in units:
        fully_shard(
            unit,
            mesh=mesh,
            reshard_after_forward=plan.reshard_after_forward,
            mp_policy=mixed_precision(compute, reduce_dtype, root=False),
            offload_policy=offload,
        )
    fully_shard(
        model,
        mesh=mesh,
        reshard_after_forward=False,
        mp_policy=mixed_precision(compute, reduce_dtype, root=True),
        offload_policy=offload,
    )
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def reshard(model: nn.Module) -> None:
    """Free every gathered parameter of a sharded model (after forwards outside training, e.g. image logging).

    Without it the root would keep what it gathered, and a later training forward would reuse it.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def describe(plan: FSDPPlan, units: list[tuple[str, nn.Module]], compute: str, reduce_dtype: str) -> str:
    """One start-up line: what is sharded, where, and in which precision."""
    names = _compact([n.replace("vae.", "", 1) for n, _ in units[::-1]])
    if compute in _DTYPES:
        reduce = compute if reduce_dtype == "compute" else "fp32"
        precision = f"params gathered in {compute}, gradients reduce-scattered in {reduce}, outputs fp32"
    else:
        precision = "fp32 throughout"
    reshard = (
        "reshard after forward (ZeRO-3)"
        if plan.reshard_after_forward
        else "keep gathered to backward (ZeRO-2)"
    )
    parts = [
        f"FSDP2 ({plan.source}): parameters, gradients and optimizer state sharded",
        f"{len(units)} units [{names}] + root",
        reshard,
        precision,
    ]
    if plan.offload:
        parts.append("offloaded to CPU")
    return "; ".join(parts + plan.notes)


def _compact(names: list[str]) -> str:
    """'encoder.down_blocks.0', 'encoder.down_blocks.1' -> 'encoder.down_blocks.0-1'."""
    groups: dict[str, list[str]] = {}
    order: list[str] = []
    for n in names:
        head, _, tail = n.rpartition(".")
        key = head if tail.isdigit() else n
        if key not in groups:
            groups[key] = []
            order.append(key)
        if tail.isdigit():
            groups[key].append(tail)
    out = []
    for key in order:
        idx = groups[key]
        out.append(f"{key}.{idx[0]}-{idx[-1]}" if len(idx) > 1 else f"{key}.{idx[0]}" if idx else key)
    return ", ".join(out)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 (DTensor) shard (a collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
