"""What a launch will do, said before the first step: scale, batch, precision, kernels, memory.

The memory estimate counts, per process:
- parameter state: fp32 weights + fp32 gradients + AdamW's two fp32 moments (+ the fp32 EMA copy), for
  the VAE and the discriminator; divided by the world size under FSDP (full shard), plus one block's
  unsharded parameters in flight;
- activations: the bytes autograd saves for backward in one forward + loss, measured by running the model
  on the meta device at the configured resolution with saved-tensor hooks (nothing is allocated), plus
  the gradients, recomputed norm values and workspace in flight at the largest activation, times the
  per-process batch; with activation checkpointing, the block-boundary tensors plus the largest block's
  recomputed activations; scaled by 0.6 under bf16/fp16 autocast (conv outputs in 16 bits, norms and
  the loss in fp32);
- a 10% allowance for allocator fragmentation and workspaces.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vae_scale.config import Config, ConfigError, DataConfig
from vae_scale.models.interface import Autoencoder as VAE
from vae_scale.models.interface import build_model

log = logging.getLogger(__name__)

OVERHEAD = 1.10
ADAMW_BYTES = 4 + 4 + 8  # weight, gradient, two moments (all fp32)


class WillNotFit(RuntimeError):
    """The estimated memory per device exceeds the device's; the message says what to change."""


@dataclass
class MemoryEstimate:
    """Bytes per process by kind."""

    parameters: int
    activations: int
    total: int
    activations_per_image: int


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


def saved_activation_bytes(vae: VAE, resolution: int, batch: int = 1) -> tuple[int, int]:
    """(total, largest) bytes of the tensors autograd saves for backward in encode -> sample -> decode ->
    L1 of one batch, measured on the meta device."""
    pack, saved = _storage_counter(vae)
    x = torch.zeros(batch, vae.config.in_channels, resolution, resolution, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        post = vae.encode(x)
        z, kl = post.sample_kl(torch.zeros_like(post.mean))
        loss = (vae.decode(z) - x).abs().mean() + kl.mean()
    del loss
    return sum(saved.values()), max(saved.values(), default=0)


def _meta_vae(cfg: Config, checkpointing: bool) -> VAE:
    from vae_scale.train.wrapping import apply_activation_checkpointing

    with torch.device("meta"):
        vae = build_model(dataclasses.replace(cfg.model, gradient_checkpointing=False, kernels="torch"))
    return apply_activation_checkpointing(vae) if checkpointing else vae


def _largest_block_bytes(cfg: Config) -> int:
    """Saved bytes of the most expensive checkpointed block (recomputed one at a time in backward)."""
    vae = _meta_vae(cfg, checkpointing=False)
    from vae_scale.train.wrapping import checkpointed_blocks

    shapes: dict[int, torch.Size] = {}
    blocks = [parent[int(n)] if n.isdigit() else getattr(parent, n) for parent, n in checkpointed_blocks(vae)]
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: shapes.__setitem__(i, a[0].shape))
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        x = torch.zeros(1, cfg.model.in_channels, cfg.data.resolution, cfg.data.resolution, device="meta")
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
    vae = _meta_vae(cfg, checkpointing)
    n_params = sum(p.numel() for p in vae.parameters())
    per_param = ADAMW_BYTES + (4 if cfg.optim.ema_decay > 0 else 0)
    params = n_params * per_param + disc_params * ADAMW_BYTES
    if fsdp and world_size > 1:
        from vae_scale.train.wrapping import checkpointed_blocks

        # Sharding units are about one level each: one is gathered, the next prefetched.
        blocks = [
            parent[int(n)] if n.isdigit() else getattr(parent, n) for parent, n in checkpointed_blocks(vae)
        ]
        largest = max(sum(p.numel() for p in b.parameters()) for b in blocks) * 4
        params = params // world_size + 2 * largest
    per_image, largest = saved_activation_bytes(vae, cfg.data.resolution)
    if checkpointing:
        per_image += _largest_block_bytes(cfg)
        largest = max(largest, saved_activation_bytes(_meta_vae(cfg, False), cfg.data.resolution)[1])
    # In backward, at the largest activation: its gradient, its input's gradient, the GroupNorm+SiLU
    # backward's recomputed normalised values and SiLU derivative (the fused op saves x, not them) and the
    # convolution's workspace: about five activation-sized buffers (calibrated against measured CPU peaks).
    per_image += 5 * largest
    if cfg.train.mixed_precision != "no":
        per_image = int(per_image * 0.6)  # conv outputs in 16 bits; norms and the loss stay fp32
    activations = per_image * cfg.data.batch_size
    return MemoryEstimate(params, activations, int((params + activations) * OVERHEAD), per_image)


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
) -> list[str]:
    """Lines describing the launch; raises WillNotFit when the estimate exceeds the device memory."""
    gib = 2**30
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    est = estimate_memory(cfg, world_size, fsdp, disc_params)
    mode = "FSDP full shard" if fsdp else "DDP" if world_size > 1 else "single process"
    ckpt = ", checkpointed" if cfg.model.gradient_checkpointing else ""
    accum = (
        "" if cfg.train.grad_accum == 1 else f" ({batches_per_epoch // cfg.train.grad_accum} optimizer steps)"
    )
    lines = [
        f"processes      {world_size} ({mode}) on {device.type}",
        f"batch          {cfg.data.batch_size} per process x {world_size} processes x {cfg.train.grad_accum} "
        f"accumulation = {global_batch} images per step at {cfg.data.resolution} px",
        f"precision      {cfg.train.mixed_precision} (weights fp32)",
        f"parallel       {strategy or mode}",
        f"kernels        {cfg.model.kernels} -> {kernels_backend}",
        f"parameters     {n_params:,} (VAE){f' + {disc_params:,} (discriminator)' if disc_params else ''}",
        f"memory/process ~{est.total / gib:.2f} GiB estimated: {est.parameters / gib:.2f} GiB parameters "
        f"+ {est.activations / gib:.2f} GiB activations "
        f"({est.activations_per_image / 2**20:.1f} MiB/image{ckpt})",
        f"data           {batches_per_epoch} steps per epoch per process{accum}",
        _disk_line(cfg, world_size),
    ]
    total = device_memory(device)
    if total is not None:
        gb = f"{total / gib:.1f} GiB"
        where = f"the device's {gb}" if device.type == "cuda" else f"the {gb} of host memory free per process"
        lines[6] += f" of {total / gib:.1f} GiB" + (" on the device" if device.type == "cuda" else " free")
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


# --------------------------------------------------------------------------------------------------------
# Disk space

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
    """Estimated bytes of one checkpoint of `cfg`: fp32 weights (and EMA, discriminator), AdamW's two fp32
    moments per trainable parameter, and the per-tensor and per-process overheads of the formats."""
    from vae_scale.train.discriminator import NLayerDiscriminator

    vae = _meta_vae(cfg, checkpointing=False)
    modules = [vae]
    if cfg.loss.disc_weight > 0:
        with torch.device("meta"):
            modules.append(
                NLayerDiscriminator(cfg.model.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers)
            )
    total = RANK_FILES_BYTES * world_size + 16 * 2**10  # + config.yaml, manifest, trainer state
    for i, module in enumerate(modules):
        state = module.state_dict()
        params = [p for p in module.parameters() if p.requires_grad]
        copies = 2 if i == 0 and cfg.optim.ema_decay > 0 else 1  # the EMA's weights
        weights = sum(t.numel() * 4 + SAFETENSORS_BYTES_PER_TENSOR for t in state.values())
        total += copies * weights + sum(p.numel() * 8 + DCP_BYTES_PER_TENSOR for p in params)
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


def _disk_problem(cfg: Config) -> str | None:
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


def _disk_line(cfg: Config, world_size: int) -> str:
    """The plan's line on disk space: what the run will write into run.dir, and what is free there."""
    from vae_scale.files import free_bytes, human_bytes

    need = disk_need(cfg, world_size)
    return (
        f"disk           ~{human_bytes(need.total)} in {cfg.run.dir} ({need.checkpoints} x "
        f"{human_bytes(need.checkpoint)} checkpoints + {human_bytes(need.logs)} logs) of "
        f"{human_bytes(free_bytes(cfg.run.dir))} free"
    )


# --------------------------------------------------------------------------------------------------------
# A sample of the data, read as the loader reads it

SAMPLE_SIZE = 100
"""Samples the start-up check reads (the loader judges its bad fraction once it has seen as many)."""
SAMPLE_SHARDS = 4
"""Shards they come from: the first, the last and evenly spaced ones between."""


@dataclass
class DataSample:
    """What the loader makes of the first samples of a few shards of one split: usable crops, images
    smaller than the crop (skipped unless data.upscale_small) and bad samples by kind."""

    key: str
    shards: int
    total_shards: int
    usable: int = 0
    too_small: int = 0
    small_sides: tuple[int, int] = (0, 0)
    """Smallest and largest short side of the images smaller than the crop."""
    bad: dict[str, int] = dataclasses.field(default_factory=dict)
    first_bad: str | None = None

    @property
    def read(self) -> int:
        return self.usable + self.too_small + sum(self.bad.values())

    def line(self, resolution: int) -> str:
        """The dry-run's line: how many of each."""
        small = f"{self.too_small} smaller than the {resolution} px crop"
        if self.too_small:
            lo, hi = self.small_sides
            small += f" (short sides {lo}-{hi} px; skipped and counted as data/too_small)"
        bad = ", ".join(f"{k} {n}" for k, n in self.bad.items())
        return (
            f"data sample    {self.key}: {self.read} samples from {self.shards} of {self.total_shards} "
            f"shards: {self.usable} usable, {small}, {sum(self.bad.values())} bad{f' ({bad})' if bad else ''}"
        )


def read_data_sample(data: DataConfig, split: str = "train", n: int = SAMPLE_SIZE) -> DataSample:
    """Decode up to n samples from up to SAMPLE_SHARDS shards of data.<split> with the loader's own decoding
    (resolution, resize, upscale_small), counting what it would do with each."""
    from contextlib import closing

    from vae_scale.data.loader import TOO_SMALL, _Bad, _decode
    from vae_scale.data.shard_reader import BadTally, ShardUnit, expand_shards, read_unit

    spec = data.train if split == "train" else data.val
    urls = expand_shards(spec, split)
    k = min(SAMPLE_SHARDS, len(urls))
    picks = sorted({round(i * (len(urls) - 1) / max(k - 1, 1)) for i in range(k)})
    sample = DataSample(f"data.{split}", len(picks), len(urls))
    tally, per_shard, sides = BadTally(), -(-n // len(picks)), []
    for index in picks:
        with closing(read_unit(ShardUnit(urls[index]), tally)) as raws:
            for taken, raw in enumerate(raws):
                if taken >= per_shard:
                    break
                try:
                    _decode(raw, data.resolution, None, False, data.resize, data.upscale_small)
                    sample.usable += 1
                except _Bad as b:
                    if b.kind == TOO_SMALL:
                        sides.append(b.short_side)
                    else:
                        tally.add(b.kind, raw.url, raw.key, b.detail)
    counted = tally.take()
    sample.too_small, sample.small_sides = len(sides), (min(sides, default=0), max(sides, default=0))
    sample.bad, sample.first_bad = counted["kinds"], counted["first"]
    return sample


def _sample_problems(cfg: Config) -> list[str]:
    """A sample of data.train (and data.val when evaluating) must hold usable images, and not more bad
    ones than data.max_error_fraction allows."""
    from vae_scale.data.loader import too_small_remedy
    from vae_scale.data.shard_reader import DataError
    from vae_scale.data.synthetic import SYNTHETIC

    problems = []
    for split in ("train", "val") if cfg.eval.every and cfg.data.val else ("train",):
        if (cfg.data.train if split == "train" else cfg.data.val) in (
            "",
            SYNTHETIC,
        ):  # none is said elsewhere
            continue
        try:
            sample = read_data_sample(cfg.data, split)
        except DataError as e:
            problems.append(f"data.{split}: {e}")
            continue
        where = f"{sample.read} samples read from {sample.shards} of {sample.total_shards} shards"
        bad = sum(sample.bad.values())
        if sample.usable == 0:
            why = []
            if sample.too_small:
                lo, hi = sample.small_sides
                why.append(
                    f"{sample.too_small} smaller than the {cfg.data.resolution} px crop (short sides "
                    f"{lo}-{hi} px): {too_small_remedy(cfg.data.resolution, hi)}"
                )
            if bad:
                why.append(f"{bad} bad, the first: {sample.first_bad}")
            reason = "; ".join(why) if why else "no samples at all"
            problems.append(f"{sample.key}: none of the {where} is usable: {reason}")
        elif sample.read >= SAMPLE_SIZE and bad / sample.read > cfg.data.max_error_fraction:
            problems.append(
                f"{sample.key}: {bad} of the {where} are bad ({bad / sample.read:.0%} > "
                f"data.max_error_fraction={cfg.data.max_error_fraction}), so the loader would stop the run; "
                f"the first: {sample.first_bad}"
            )
    return problems


def sample_lines(cfg: Config) -> list[str]:
    """The dry-run's lines on what the loader makes of a sample of the data (read_data_sample)."""
    from vae_scale.data.synthetic import SYNTHETIC

    lines = []
    for split in ("train", "val") if cfg.eval.every and cfg.data.val else ("train",):
        if (cfg.data.train if split == "train" else cfg.data.val) not in ("", SYNTHETIC):
            lines.append(read_data_sample(cfg.data, split).line(cfg.data.resolution))
    return lines


# --------------------------------------------------------------------------------------------------------
# What can fail at step N, checked before step 1


class NotReady(ConfigError):
    """Something the run will need at some step is missing; the message lists every such thing."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "".join(f"\n  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) found before step 1:{lines}")


def _val_problem(cfg: Config) -> str | None:
    """data.val must hold at least one sample when in-loop evaluation is on (local shards are counted;
    remote ones are read at the first evaluation)."""
    from vae_scale.data.shard_reader import DataError, count_samples, expand_shards

    if not cfg.data.val:
        return f"eval.every={cfg.eval.every} evaluates on data.val, which is empty (set it, or eval.every=0)"
    try:
        urls = expand_shards(cfg.data.val, "val")
    except DataError as e:
        return f"eval.every={cfg.eval.every}: data.val: {e}"
    if count_samples(urls) == 0:
        return (
            f"eval.every={cfg.eval.every}: data.val={cfg.data.val} holds no samples ({len(urls)} empty "
            "shards); write some with `vae-scale shards --val-fraction`, or set eval.every=0"
        )
    return None


def _wandb_problem(cfg: Config) -> str | None:
    """log.wandb=online needs W&B credentials on this machine (checked without the network)."""
    if cfg.log.wandb != "online":
        return None
    try:
        import wandb
    except ImportError:
        return "log.wandb=online needs the wandb package (pip install wandb), or log.wandb=disabled"
    mode = os.environ.pop("WANDB_MODE", None)  # log.wandb=online is what the run will use, whatever it says
    try:
        wandb.login(verify=False)
    except Exception as e:  # wandb's UsageError: no key, and no terminal to ask for one
        return (
            f"log.wandb=online cannot log in to W&B ({e}): run `wandb login` or set WANDB_API_KEY, or use "
            "log.wandb=offline (and `wandb sync` the run folder later)"
        )
    finally:
        if mode is not None:
            os.environ["WANDB_MODE"] = mode
    return None


WANDB_REACH_TIMEOUT_S = 5.0
"""How long the start of a log.wandb=online run waits to learn whether W&B's server answers."""


def wandb_unreachable(timeout_s: float = WANDB_REACH_TIMEOUT_S) -> str | None:
    """Why W&B's server (WANDB_BASE_URL, else api.wandb.ai) cannot be reached, or None when a TCP connection
    to it opens within `timeout_s`. Name resolution runs in a daemon thread, so a resolver that hangs
    cannot hold the run for longer than `timeout_s` either."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e.strerror or e}")

    thread = threading.Thread(target=connect, name="wandb-reachable", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout_s:g} s"
    return None if outcome[0] is None else f"{host}:{port}: {outcome[0]}"


def wandb_fallback(cfg: Config) -> Config:
    """cfg, or a copy logging offline (with a warning saying so) when log.wandb=online and W&B's server
    cannot be reached: the run's metrics are kept for `wandb sync` instead of failing at the first log."""
    if cfg.log.wandb != "online":
        return cfg
    why = wandb_unreachable()
    if why is None:
        return cfg
    log.warning(
        "log.wandb=online, but W&B cannot be reached (%s): logging offline to %s/wandb instead; "
        "`wandb sync %s/wandb/offline-run-*` uploads it later (log.wandb=offline says so up front)",
        why,
        cfg.run.dir,
        cfg.run.dir,
    )
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, wandb="offline"))


def _weights_problems(cfg: Config) -> list[str]:
    """Weight files the losses and the in-loop metrics need, found (not loaded) on local disk."""
    from vae_scale.eval.lpips import LossConfigError, find_lpips_weights

    problems = []
    lpips_metric = cfg.eval.every and "lpips" in cfg.eval.metrics
    if cfg.loss.perceptual_weight > 0 or lpips_metric:
        try:
            find_lpips_weights(cfg.loss)
        except LossConfigError as e:
            problems.append(str(e) if cfg.loss.perceptual_weight > 0 else f"eval.metrics has lpips: {e}")
    if cfg.eval.every and "rfid" in cfg.eval.metrics:
        from vae_scale.eval.metrics import MetricError, find_inception

        try:
            find_inception(cfg.eval.inception_path)
        except MetricError as e:
            problems.append(f"eval.metrics has rfid: {e}")
    if cfg.model.init_from and not Path(cfg.model.init_from).expanduser().exists():
        problems.append(f"model.init_from={cfg.model.init_from} does not exist")
    return problems


def problems_before_start(cfg: Config) -> list[str]:
    """Everything a run needs later that is missing now: validation samples when eval is on, usable images
    in a sample of the data, the W&B login when online, LPIPS / Inception weights, the weights to start
    from, room on run.dir's disk for its checkpoints and logs. Empty when all is there."""
    problems = [p for p in (_val_problem(cfg) if cfg.eval.every else None, _wandb_problem(cfg)) if p]
    if not problems or not cfg.eval.every:  # data.val's sample only once it has samples
        problems += _sample_problems(cfg)
    return problems + _weights_problems(cfg) + [p for p in [_disk_problem(cfg)] if p]
