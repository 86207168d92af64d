"""What a run will write into run.dir, estimated before it starts: its checkpoints (measured on the newest
when it resumes, else estimated from the config) and its logs; and whether run.dir's file system has room.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vae_scale.config import Config

# Measured on torch.distributed.checkpoint's and safetensors' files: DCP stores each tensor with its own
# serialisation header (about 5 KiB per parameter tensor for AdamW's two moments and step, with the
# metadata), safetensors about 128 bytes per tensor; accelerate's RNG state and the rank file are ~16 KiB
# per process.
DCP_BYTES_PER_TENSOR = 6 * 2**10
SAFETENSORS_BYTES_PER_TENSOR = 128
RANK_FILES_BYTES = 16 * 2**10
METRICS_ROW_BYTES = 1024  # a row of metrics.jsonl, about 40 numbers; report.html holds about as much again


@dataclass
class DiskNeed:
    """What a run will write into run.dir, in bytes, and where the checkpoint size came from."""

    checkpoint: int
    checkpoints: int
    """How many more checkpoints the folder must hold at the peak (the one being written included)."""
    logs: int
    measured: bool
    """Whether `checkpoint` is the size of the run's newest checkpoint (else estimated from the config)."""

    @property
    def total(self) -> int:
        return self.checkpoint * self.checkpoints + self.logs


def checkpoint_bytes(cfg: Config, world_size: int = 1) -> int:
    """Estimated bytes of one checkpoint of `cfg`: the model's fp32 weights (every family's, on the meta
    device), the EMA file (the averaged trainable parameters and the buffers: frozen weights are stored once),
    the discriminator (3D for clips), AdamW's two fp32 moments per trainable parameter, and the per-tensor
    and per-process overheads of the formats."""
    from vae_scale.models.interface import build_model
    from vae_scale.train.discriminator import NLayerDiscriminator, NLayerDiscriminator3D
    from vae_scale.train.trainable import freeze

    def file_bytes(tensors) -> int:
        return sum(t.numel() * 4 + SAFETENSORS_BYTES_PER_TENSOR for t in tensors)

    def moments_bytes(params) -> int:
        return sum(p.numel() * 8 + DCP_BYTES_PER_TENSOR for p in params if p.requires_grad)

    with torch.device("meta"):
        vae = build_model(dataclasses.replace(cfg.model, gradient_checkpointing=False, kernels="torch"))
    freeze(vae, cfg.train)
    total = RANK_FILES_BYTES * world_size + 16 * 2**10  # + config.yaml, manifest, trainer state
    total += file_bytes(vae.state_dict().values()) + moments_bytes(vae.parameters())
    if cfg.optim.ema_decay > 0:
        params = dict(vae.named_parameters())
        kept = [t for n, t in vae.state_dict().items() if n not in params or params[n].requires_grad]
        total += file_bytes(kept)
    if cfg.loss.disc_weight > 0:
        kind = NLayerDiscriminator3D if cfg.data.frames > 1 else NLayerDiscriminator
        with torch.device("meta"):
            disc = kind(cfg.model.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers)
        total += file_bytes(disc.state_dict().values()) + moments_bytes(disc.parameters())
    return total


def disk_need(cfg: Config, world_size: int = 1) -> DiskNeed:
    """What the run will add to run.dir: checkpoint.keep checkpoints (plus the one being written, since the
    oldest is removed only once the new one is complete) less those it resumes with, and its logs
    (metrics.jsonl, report.html, preview PNGs at their uncompressed size, an upper bound)."""
    from vae_scale.files import folder_bytes
    from vae_scale.formats.checkpoint import complete_checkpoints

    ckpts = complete_checkpoints(Path(cfg.run.dir) / "checkpoints")
    kept = 0 if cfg.checkpoint.resume == "never" else len(ckpts)  # "never" moves them aside, kept on disk
    if ckpts and kept:
        size, measured = folder_bytes(ckpts[-1]), True
    else:
        size, measured = checkpoint_bytes(cfg, world_size), False
    steps = cfg.train.steps
    rows = steps // cfg.log.every + (steps // cfg.eval.every if cfg.eval.every else 0)
    logs = 2 * rows * METRICS_ROW_BYTES + 64 * 2**10
    if cfg.log.images_every:
        side = cfg.data.resolution + 2  # each image with its padding in the grid
        images = (3 if cfg.optim.ema_decay > 0 else 2) * 8 + 8  # reconstructions (+ EMA's), prior samples
        logs += steps // cfg.log.images_every * images * side * side * cfg.model.in_channels
    if cfg.log.wandb != "disabled":
        logs *= 2  # W&B keeps its own copy of the scalars and images under run.dir/wandb
    return DiskNeed(size, max(1, cfg.checkpoint.keep + 1 - kept), logs, measured)


def disk_problem(cfg: Config) -> str | None:
    """run.dir's file system must have room for what the run will write (disk_need)."""
    from vae_scale.files import free_bytes, human_bytes

    need = disk_need(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    free = free_bytes(cfg.run.dir)
    if free >= need.total:
        return None
    how = "the newest's size" if need.measured else "estimated"
    return (
        f"run.dir {cfg.run.dir}: {human_bytes(free)} ({free} bytes) free, the run needs about "
        f"{human_bytes(need.total)} ({need.total} bytes): {need.checkpoints} checkpoint(s) of "
        f"{human_bytes(need.checkpoint)} ({how}; checkpoint.keep={cfg.checkpoint.keep} and the one being "
        f"written) and {human_bytes(need.logs)} of logs; free some space, lower checkpoint.keep, or give "
        "another run.dir"
    )


def disk_line(cfg: Config, world_size: int) -> str:
    """The plan's line on disk space: what the run will write into run.dir, and what is free there."""
    from vae_scale.files import free_bytes, human_bytes

    need = disk_need(cfg, world_size)
    return (
        f"disk           ~{human_bytes(need.total)} in {cfg.run.dir} ({need.checkpoints} x "
        f"{human_bytes(need.checkpoint)} checkpoints + {human_bytes(need.logs)} logs) of "
        f"{human_bytes(free_bytes(cfg.run.dir))} free"
    )
