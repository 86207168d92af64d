"""What a launch will do, said before the first step: scale, batch, precision, kernels, memory.

The memory estimate counts, per process, what is held at the step's worst moment:
- state held through the step: fp32 weights + AdamW's two fp32 moments (+ the fp32 EMA copy), for the VAE
  and the discriminator; under DDP (several processes, not sharded) also the reducer's gradient buckets, a
  gradient-sized buffer that lives as long as the model; divided by the world size under FSDP (full
  shard), plus one block's unsharded parameters in flight and the next one prefetched;
- the larger of the activations and the gradients: the optimizer sets the gradients to None after each
  step, so the next forward saves its activations while no gradient exists, and backward frees activations
  as it makes gradients (the largest, at the decoder's output, are freed first);
- activations: the bytes autograd saves for backward in one forward + loss, measured by running the model
  on the meta device at the configured resolution with saved-tensor hooks (nothing is allocated), plus two
  buffers the size of the largest activation (its gradient and its input's, which coexist in its backward),
  times the per-process batch; with activation checkpointing, the block-boundary tensors plus the largest
  block's recomputed activations; scaled by 0.85 under bf16/fp16 autocast (convolutions save 16-bit
  inputs, GroupNorm and SiLU fp32 ones), which also keeps a 16-bit copy of the weights for backward;
- a 10% allowance for allocator fragmentation and workspaces.

Against the peak resident memory of the trainer's own step on a CPU (benchmarks/memory.py, table in
docs/performance.md) the estimate is within 25%: from 1% under to 18% over the measured peak.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vae_scale.config import Config, ModelConfig
from vae_scale.models.interface import Autoencoder as VAE
from vae_scale.models.interface import build_model
from vae_scale.train.disk import disk_line

log = logging.getLogger(__name__)

OVERHEAD = 1.10
STATE_BYTES = 4 + 8  # per parameter through the whole step: fp32 weight, AdamW's two fp32 moments
GRAD_BYTES = 4  # per parameter: the fp32 gradient
AUTOCAST_ACTIVATIONS = 0.85  # of fp32's under bf16/fp16 autocast: convolutions save 16-bit inputs, but
# GroupNorm and SiLU run in fp32 and save fp32 copies beside them (measured on a CPU: 0.83-0.86)
TRANSIENT_ACTIVATIONS = 2  # buffers the size of the largest activation live in its backward (its gradient
# and its input's gradient); the CPU peaks measured one to 1.1 of them


class WillNotFit(RuntimeError):
    """The estimated memory per device exceeds the device's; the message says what to change."""


@dataclass
class MemoryEstimate:
    """Bytes per process by kind; total = (state + max(activations, gradients)) x OVERHEAD."""

    parameters: int  # what is held through the step: weights, optimizer moments, EMA, DDP's buckets
    gradients: int
    activations: int
    total: int
    activations_per_image: int

    def total_at(self, batch: int) -> int:
        """The total at another per-process batch (everything else alike): the estimate's one formula."""
        return int((self.parameters + max(self.activations_per_image * batch, self.gradients)) * OVERHEAD)


def _storage_counter(module: torch.nn.Module):
    """A saved-tensor pack hook that counts each storage once (views share one), parameters excluded."""
    params = {p.untyped_storage()._cdata for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    return pack, saved


def saved_activation_bytes(vae: VAE, resolution: int, batch: int = 1, frames: int = 1) -> tuple[int, int]:
    """(total, largest) bytes of the tensors autograd saves for backward in encode -> sample -> decode ->
    L1 of one batch (of clips of `frames` frames when frames > 1), measured on the meta device."""
    pack, saved = _storage_counter(vae)
    clip = (frames,) if frames > 1 else ()
    x = torch.zeros(batch, vae.config.in_channels, *clip, resolution, resolution, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        post = vae.encode(x)
        z, kl = post.sample_kl(torch.zeros_like(post.mean))
        loss = (vae.decode(z) - x).abs().mean() + kl.mean()
    del loss
    return sum(saved.values()), max(saved.values(), default=0)


def _meta_vae(model: ModelConfig, checkpointing: bool) -> VAE:
    """The model on the meta device (nothing allocated), with activation checkpointing when asked."""
    from vae_scale.train.wrapping import apply_activation_checkpointing

    with torch.device("meta"):
        vae = build_model(dataclasses.replace(model, gradient_checkpointing=False, kernels="torch"))
    return apply_activation_checkpointing(vae) if checkpointing else vae


def _largest_block_bytes(model: ModelConfig, resolution: int, frames: int = 1) -> int:
    """Saved bytes of the most expensive checkpointed block (recomputed one at a time in backward), on
    clips of `frames` frames when frames > 1."""
    vae = _meta_vae(model, checkpointing=False)
    from vae_scale.train.wrapping import checkpointed_blocks

    shapes: dict[int, torch.Size] = {}
    blocks = [parent[int(n)] if n.isdigit() else getattr(parent, n) for parent, n in checkpointed_blocks(vae)]
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: shapes.__setitem__(i, a[0].shape))
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        clip = (frames,) if frames > 1 else ()
        x = torch.zeros(1, model.in_channels, *clip, resolution, resolution, device="meta")
        vae.decode(vae.encode(x).mode())
    for h in hooks:
        h.remove()
    best = 0
    for i, block in enumerate(blocks):
        pack, saved = _storage_counter(block)
        inp = torch.zeros(shapes[i], device="meta", requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(inp)
        best = max(best, sum(saved.values()))
    return best


def estimate_memory(
    cfg: Config, world_size: int = 1, fsdp: bool = False, disc_params: int = 0
) -> MemoryEstimate:
    """Estimated peak bytes per process for training `cfg` (see the module docstring)."""
    checkpointing = cfg.model.gradient_checkpointing
    vae = _meta_vae(cfg.model, checkpointing)
    n_params = sum(p.numel() for p in vae.parameters())
    ema = 4 if cfg.optim.ema_decay > 0 else 0
    params = n_params * (STATE_BYTES + ema) + disc_params * STATE_BYTES
    grads = (n_params + disc_params) * GRAD_BYTES
    if cfg.train.mixed_precision in ("bf16", "fp16"):
        # autocast's 16-bit copies of the weights, kept for backward (FSDP2 gathers 16-bit units instead)
        params += n_params * 2
    if fsdp and world_size > 1:
        from vae_scale.train.wrapping import checkpointed_blocks

        # Sharding units are about one level each: one is gathered, the next prefetched.
        blocks = [
            parent[int(n)] if n.isdigit() else getattr(parent, n) for parent, n in checkpointed_blocks(vae)
        ]
        largest = max(sum(p.numel() for p in b.parameters()) for b in blocks) * 4
        params = params // world_size + 2 * largest
        grads = grads // world_size
    elif world_size > 1:
        params += grads  # DDP's buckets: a gradient-sized buffer held for the model's lifetime
    per_image, largest = saved_activation_bytes(vae, cfg.data.resolution, frames=cfg.data.frames)
    if checkpointing:
        per_image += _largest_block_bytes(cfg.model, cfg.data.resolution, cfg.data.frames)
        unwrapped = _meta_vae(cfg.model, False)
        largest = max(
            largest, saved_activation_bytes(unwrapped, cfg.data.resolution, frames=cfg.data.frames)[1]
        )
    per_image += TRANSIENT_ACTIVATIONS * largest
    # An unresolved "auto" (a config not yet launched; the trainer passes the precision the accelerator
    # chose) counts as fp32, the larger.
    if cfg.train.mixed_precision in ("bf16", "fp16"):
        per_image = int(per_image * AUTOCAST_ACTIVATIONS)
    est = MemoryEstimate(params, grads, per_image * cfg.data.batch_size, 0, per_image)
    est.total = est.total_at(cfg.data.batch_size)
    return est


def host_memory_available() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable, capped by the cgroup's limit); None where
    neither can be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:  # a container's limit (cgroup v2) is what the kernel enforces, whatever the host has free
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = free if available is None else min(available, free)
    except (OSError, ValueError):
        pass
    return available


def device_memory(device: torch.device) -> int | None:
    """Memory one process may use in bytes: a CUDA device's total; on a CPU, the host memory available now
    shared by this host's processes (LOCAL_WORLD_SIZE); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    available = host_memory_available()
    if available is None:
        return None
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def preflight(
    cfg: Config,
    *,
    world_size: int,
    device: torch.device,
    kernels_backend: str,
    n_params: int,
    batches_per_epoch: int,
    fsdp: bool,
    disc_params: int = 0,
    strategy: str = "",
    layout: str = "",
) -> list[str]:
    """Lines describing the launch; raises WillNotFit when the estimate exceeds the device memory."""
    gib = 2**30
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    est = estimate_memory(cfg, world_size, fsdp, disc_params)
    mode = "FSDP full shard" if fsdp else "DDP" if world_size > 1 else "single process"
    ckpt = ", checkpointed" if cfg.model.gradient_checkpointing else ""
    sample = f"clips of {cfg.data.frames} frames" if cfg.data.frames > 1 else "images"
    accum = (
        "" if cfg.train.grad_accum == 1 else f" ({batches_per_epoch // cfg.train.grad_accum} optimizer steps)"
    )
    total = device_memory(device)
    where = ""
    if total is not None:
        where = f" of {total / gib:.1f} GiB" + (" on the device" if device.type == "cuda" else " free")
    lines = [
        f"processes      {world_size} ({mode}) on {device.type}",
        f"batch          {cfg.data.batch_size} per process x {world_size} processes x {cfg.train.grad_accum} "
        f"accumulation = {global_batch} {sample} per step at {cfg.data.resolution} px",
        f"precision      {cfg.train.mixed_precision} (weights fp32)",
        f"parallel       {strategy or mode}",
        f"kernels        {cfg.model.kernels} -> {kernels_backend}",
        f"layout         {layout or ('channels_last (NHWC)' if cfg.model.channels_last else 'NCHW')}",
        f"parameters     {n_params:,} (VAE){f' + {disc_params:,} (discriminator)' if disc_params else ''}",
        f"memory/process ~{est.total / gib:.2f} GiB estimated{where}: {est.parameters / gib:.2f} GiB weights "
        f"and optimizer state + the larger of {est.activations / gib:.2f} GiB activations "
        f"({est.activations_per_image / 2**20:.1f} MiB/{sample.split()[0][:-1]}{ckpt}) and "
        f"{est.gradients / gib:.2f} GiB gradients",
        f"data           {batches_per_epoch} steps per epoch per process{accum}",
        disk_line(cfg, world_size),
    ]
    if total is not None:
        gb = f"{total / gib:.1f} GiB"
        where = f"the device's {gb}" if device.type == "cuda" else f"the {gb} of host memory free per process"
        if est.total > total:
            hints = []
            if not cfg.model.gradient_checkpointing:
                hints.append("model.gradient_checkpointing=true")
            if cfg.train.mixed_precision == "no" and device.type == "cuda":
                hints.append("train.mixed_precision=bf16")
            if cfg.data.batch_size > 1:
                hints.append(
                    f"data.batch_size={max(1, cfg.data.batch_size // 2)} with "
                    f"train.grad_accum={cfg.train.grad_accum * 2}"
                )
            half, factor = cfg.data.resolution // 2, cfg.model.downsample_factor
            if half >= factor and half % factor == 0:
                hints.append(f"data.resolution={half}")
            if not fsdp and device.type == "cuda":
                hints.append("FSDP (launch/accelerate/fsdp.yaml)")
            raise WillNotFit(
                f"estimated {est.total / gib:.1f} GiB per process does not fit {where}; try "
                f"{', or '.join(hints)}"
            )
    return lines
