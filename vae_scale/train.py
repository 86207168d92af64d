"""The training loop: one code path for a CPU, one GPU, or `accelerate launch` on many GPUs and nodes.

    vae-scale train --config sd-f8 data.train='/data/train-{000000..000999}.tar' run.name=sd-ft

Per step: grad_accum micro-batches of encode -> fused sample+KL -> decode -> loss -> backward (and the
discriminator's step on detached reconstructions once it is active); then the ranks agree in one small
all-reduce whether every loss and gradient is finite and whether anyone was asked to stop; then clip,
optimizer step, EMA. Checkpoints every `checkpoint.every` steps, at the end and on SIGTERM/SIGUSR1/SIGINT.
Re-running the same command resumes from the newest intact checkpoint of the run folder.

Before anything is written: the config's ranges, a model config that fits the checkpoint to resume, the
sharding the launch asks for, the run folder writable and not in use by another run (rank 0 locks it for the
run's life).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vae_scale.checkpoint import (
    CheckpointManager,
    DamagedCheckpoint,
    RunLock,
    checkpoints_newest_first,
    is_complete,
    verify_checkpoint,
)
from vae_scale.config import Config, ConfigError, ModelConfig, config_from_dict
from vae_scale.equivariance import Transform, TransformedDecode, draw_transforms
from vae_scale.fsdp import FSDPPlan, describe, fsdp_plan, fsdp_units, reshard, shard
from vae_scale.losses import LastLayer, VAELoss
from vae_scale.metrics import Lockstep, active_units, evaluate, load_eval_nets
from vae_scale.model import VAE, DiagonalGaussian
from vae_scale.monitor import Monitor, image_grid
from vae_scale.preflight import NotReady, preflight, problems_before_start
from vae_scale.synthetic import SYNTHETIC, SyntheticLoader
from vae_scale.transforms import prepare_model, to_channels_last
from vae_scale.weights import load_init_weights, plain_name

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps with rollback off); the message says why."""


# --------------------------------------------------------------------------------------------------------
# Pieces the loop is built from


class Autoencoder(nn.Module):
    """What DDP/FSDP wraps: the VAE plus the loss's learned likelihood scale (a module shared with VAELoss).

    forward is one training forward; encode/decode run the VAE outside it (image logging, evaluation),
    which FSDP is told about so that it gathers the root's parameters for them too.
    """

    def __init__(self, vae: VAE, likelihood: nn.Module | None, sample_posterior: bool = True):
        super().__init__()
        self.vae = vae
        self.likelihood = likelihood
        self.sample_posterior = sample_posterior

    @property
    def config(self):
        """The VAE's ModelConfig."""
        return self.vae.config

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of that size."""
        return self.vae.latent_shape(height, width)

    def forward(
        self, x: torch.Tensor, transforms: dict[str, Transform] | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor, list[TransformedDecode]]:
        """(x_hat, posterior, KL per image, decodes of the transformed latents).

        transforms: this micro-batch's {term: Transform} (equivariance.draw_transforms), decoded from the
        same latent as x_hat. They run here, inside the one forward, because under FSDP every unit's forward
        is a collective that all ranks must enter together.
        """
        posterior = self.vae.encode(x)
        if self.sample_posterior:
            z, kl = posterior.sample_kl()
        else:
            z, kl = posterior.mode(), posterior.kl()
        f = self.vae.downsample_factor
        # Before the main decode: LastLayer keeps the decoder's latest input, and the adversarial weight
        # must read the main reconstruction's.
        extra = [
            TransformedDecode(term, t, self.vae.decode(t.apply(z)), f)
            for term, t in (transforms or {}).items()
        ]
        return self.vae.decode(z), posterior, kl, extra

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior of x, (B, 3, H, W) in [-1, 1]."""
        return self.vae.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from latents."""
        return self.vae.decode(z)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 (DTensor) shard (a collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of parameters, kept in fp32 (`decay` per optimizer step).

    Under FSDP2 the shadow holds this rank's shard only (plain tensors); state_dict gathers full weights.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [_local(p).detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average afresh from the current weights."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(_local(p).detach().float())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) EMA weights on the CPU; a collective under FSDP: call it on every rank."""
        out = {}
        for name, p, s in zip(self.names, self.params, self.shadow):
            if hasattr(p, "device_mesh"):  # rebuild the sharded tensor, then gather it
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[name] = _full(s).detach().cpu().contiguous()
        return out

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model's parameters for the block, the trained ones restored after it.

        Under FSDP it writes the shards; reshard the model before and after running it (see
        Trainer.inference), so that no gathered copy of either set of weights outlives its block.
        """
        with torch.no_grad():
            backup = [_local(p).detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                _local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    _local(p).copy_(b)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, p, s in zip(self.names, self.params, self.shadow):
            full = state[name].to(s.device)
            if hasattr(p, "device_mesh"):  # take this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
            s.copy_(full)


def learning_rate(cfg: Config, step: int, scale: float = 1.0) -> float:
    """LR at `step`: linear warm-up to optim.lr, then constant or cosine down to min_lr_ratio * lr."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return scale * o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return scale * o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.train.steps - o.warmup_steps))
    return scale * o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def vae_names(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters with state-dict names (wrapper prefixes removed)."""
    return [(plain_name(n), p) for n, p in module.named_parameters() if p.requires_grad]


def check_trainable(cfg: Config) -> None:
    """Stop before any process group starts when the config cannot train."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give shards (a pattern, folder or list) or 'synthetic'")
    if cfg.model.downsample_factor > cfg.data.resolution or cfg.data.resolution % cfg.model.downsample_factor:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} is not a multiple of the model's "
            f"downsampling factor {cfg.model.downsample_factor}"
        )
    if cfg.eval.every and not cfg.data.val:
        raise ConfigError("eval.every > 0 needs validation shards in data.val")
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: no such file or folder")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r}: no such checkpoint or run folder")


RESUME_MODEL_KEYS = ModelConfig.WEIGHT_KEYS


def check_resume(cfg: Config) -> None:
    """Refuse, before anything is written, to resume a checkpoint trained with another model.

    The checkpoint is the one checkpoint.resume names (auto, or a run folder: its newest complete checkpoint
    whose config.yaml is intact). ConfigError names the checkpoint and every differing key with both values.
    """
    import yaml

    resume = cfg.checkpoint.resume
    if resume == "never":
        return
    given = Path(cfg.run.dir if resume == "auto" else resume)
    candidates = [given] if is_complete(given) else checkpoints_newest_first(given / "checkpoints")
    # The newest whose config.yaml is intact and reads: a damaged checkpoint is passed over at resume too.
    for path in candidates:
        try:
            verify_checkpoint(path, ["config.yaml"])
            saved = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
            break
        except (DamagedCheckpoint, OSError, ValueError, yaml.YAMLError):  # ConfigError is a ValueError
            continue
    else:
        return
    pairs = [(f"model.{k}", getattr(saved.model, k), getattr(cfg.model, k)) for k in RESUME_MODEL_KEYS]
    # The loss's saved state: learned likelihood parameters, the discriminator and its optimizer.
    old, new = saved.loss, cfg.loss
    pairs.append(("loss.recon", old.recon, new.recon))
    if old.recon == new.recon == "logistic":
        pairs.append(("loss.logistic_per_channel", old.logistic_per_channel, new.logistic_per_channel))
    if old.disc_weight > 0 and new.disc_weight > 0:
        pairs += [(f"loss.{k}", getattr(old, k), getattr(new, k)) for k in ("disc_layers", "disc_channels")]
    differ = [f"{key} {a} -> {b}" for key, a, b in pairs if a != b]
    if (old.disc_weight > 0) != (new.disc_weight > 0):  # the discriminator comes or goes
        differ.append(f"loss.disc_weight {old.disc_weight:g} -> {new.disc_weight:g}")
    if differ:
        raise ConfigError(
            f"{path} was trained with another model than this config ({'; '.join(differ)}): give the "
            "checkpoint's values, another run.dir, or checkpoint.resume=never to start afresh (existing "
            "checkpoints are then moved aside, not deleted)"
        )


def prepare_run_dir(cfg: Config, dry_run: bool = False) -> RunLock | None:
    """Check that the run folder and its checkpoints can be written; rank 0 locks the folder and returns
    the lock. OutputError (one line naming the place or the run holding it) otherwise.

    dry_run: the same checks, creating and locking nothing (a missing run folder: its nearest existing
    parent must be writable).
    """
    from vae_scale.outputs import check_writable_dir, check_writable_file

    if dry_run:
        run_dir = Path(cfg.run.dir)
        existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == Path(p.anchor))
        what = "run.dir" if existing == run_dir else f"run.dir {run_dir}: its parent"
        check_writable_dir(existing, what, create=False)
        for sub in ("checkpoints", "images"):
            check_writable_dir(run_dir / sub, f"run.dir's {sub}/", create=False)
        return None
    run_dir = check_writable_dir(cfg.run.dir, "run.dir")
    for sub in ("checkpoints", "images"):
        check_writable_dir(run_dir / sub, f"run.dir's {sub}/", create=False)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = RunLock(run_dir).acquire()
    try:
        for name in ("config.yaml", "metrics.jsonl", "report.html"):
            if (run_dir / name).exists():
                check_writable_file(run_dir / name, f"run.dir's {name}")
    except BaseException:
        lock.release()
        raise
    return lock


def build_loader(cfg: Config, rank: int, world: int):
    """The training batches of this rank: shard loader, or synthetic images for `data.train=synthetic`."""
    if cfg.data.train == SYNTHETIC:
        return SyntheticLoader(
            cfg.data.resolution,
            cfg.data.batch_size,
            rank,
            world,
            cfg.train.seed,
            cfg.data.batches_per_epoch or 1000,
        )
    from vae_scale.data import build_train_loader

    return build_train_loader(cfg.data, rank=rank, world_size=world, seed=cfg.train.seed)


def build_accelerator(cfg: Config, run_dir: Path):
    """Accelerate's process group, device, autocast, loss scaler and W&B tracker for this launch."""
    from accelerate import Accelerator

    return Accelerator(
        # cpu=True where there is no GPU makes a torchrun/accelerate-launched CPU job use gloo (MULTI_CPU).
        cpu=not torch.cuda.is_available(),
        mixed_precision=None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision,
        log_with=None if cfg.log.wandb == "disabled" else "wandb",
        project_dir=str(run_dir),
    )


def ensure_process_group(acc) -> None:
    """FSDP needs a process group even for one process (sharding then keeps everything on it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if acc.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def data_parallel(module: nn.Module, acc, reduce_dtype: str) -> str:
    """The start-up line of a DDP (or single-process) run; under reduce_dtype=compute, installs DDP's
    bf16/fp16 gradient compression hook."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(module, DistributedDataParallel):
        return f"one process on {acc.device.type}: nothing to shard or all-reduce"
    backend = torch.distributed.get_backend()
    reduce = "fp32"
    if reduce_dtype == "compute" and acc.mixed_precision in ("bf16", "fp16"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if acc.mixed_precision == "bf16" and backend != "nccl":
            reduce = "fp32 (train.reduce_dtype=compute: bf16 compression needs NCCL)"
        else:
            bf16 = acc.mixed_precision == "bf16"
            module.register_comm_hook(
                None, default_hooks.bf16_compress_hook if bf16 else default_hooks.fp16_compress_hook
            )
            reduce = str(acc.mixed_precision)
    return (
        f"DDP over {acc.num_processes} processes ({backend}): full weights, gradients and optimizer state on "
        f"every process; gradients all-reduced in {reduce}"
    )


def replicate(module: nn.Module, acc) -> nn.Module:
    """A small module data-parallel across ranks (DDP, buffers from rank 0), or itself in one process."""
    if acc.num_processes == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [acc.device.index] if acc.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=True)


class LogWindow:
    """The steps since the last metrics row: averages come from its finite steps (a skipped step's values
    are not a measurement), throughput from every step it ran."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.finite = self.ran = 0
        self.start = time.time()

    def add(self, logs: dict[str, torch.Tensor], finite: bool) -> None:
        self.ran += 1
        if finite:
            self.finite += 1
            for k, v in logs.items():
                self.totals[k] = self.totals.get(k, 0) + v


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or SIGINT (Ctrl-C); the ranks agree on it in the step in flight.

    Every repeat only sets it again: a launcher that forwards the signal it got, or SLURM signalling every
    process, must not break the save that the first one started.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def install(self) -> None:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding app): signals stay as they were
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------------
# The trainer


SUMMARY_LOSSES = ("loss", "rec", "kl", "perceptual", "g_loss", "d_loss", "se_loss", "eq_loss")
"""Logged losses the end-of-run summary repeats, in this order, when the run has them."""
HEADLINE_METRICS = ("psnr", "ssim", "lpips", "rfid", "bpd", "kl", "active_units", "latent_hf_share")
"""Evaluation results the console line and the summary show, in this order (all are in metrics.jsonl)."""


def headline(results: dict[str, float]) -> str:
    """The evaluation results worth a console line: `psnr 27.31, ssim 0.8123, ...`."""
    return ", ".join(f"{k} {results[k]:.4g}" for k in HEADLINE_METRICS if k in results) or "no metrics"


class Trainer:
    """Holds the prepared model, optimizers, loader and counters of one run."""

    def __init__(self, cfg: Config, plan: FSDPPlan | None = None, dry_run: bool = False):
        """Everything a run needs, built and checked. dry_run: the same, but nothing is written (no
        config.yaml, no evaluation networks loaded); `plan_lines` say what the launch does."""
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.dry_run = dry_run
        self.run_dir = Path(cfg.run.dir)
        # What the launch asks for is checked before the process group starts (one line, exit 2); train()
        # checks it before the run folder is touched and passes the plan on.
        self.plan: FSDPPlan = plan if plan is not None else fsdp_plan(cfg, cuda=torch.cuda.is_available())
        self.fsdp = self.plan.enabled
        self.acc = acc = build_accelerator(cfg, self.run_dir)
        self.device = acc.device
        cfg.train.mixed_precision = str(acc.mixed_precision)  # "auto" resolved: what the run really uses
        set_seed(cfg.train.seed, device_specific=True)  # different noise per rank, repeatable per rank
        if acc.is_main_process and not dry_run:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        acc.wait_for_everyone()

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        vae = VAE(cfg.model)
        if cfg.model.init_from:  # fine-tuning; a checkpoint to resume from overrides it in fit()
            load_init_weights(vae, cfg.model.init_from)
        vae = prepare_model(vae, sharded=self.fsdp, compile=cfg.train.compile)
        self.criterion = VAELoss(cfg.loss, image_channels=cfg.model.in_channels).to(self.device)
        torch.manual_seed(cfg.train.seed + 1 + acc.process_index)
        self.model = model = Autoencoder(vae, self.criterion.likelihood, cfg.train.sample_posterior)
        model.to(self.device)
        self.vae: VAE = vae
        # The adversarial weight reads the decoder's last layer's input, recorded at every forward.
        self.disc = self.criterion.discriminator
        self.last_layer = LastLayer(vae.decoder.conv_out) if self.disc is not None else None
        if self.fsdp:
            ensure_process_group(acc)
            units = fsdp_units(model, self.plan.unit_classes)
            self.ae = shard(
                model,
                self.plan,
                units,
                self.device,
                cfg.train.mixed_precision,
                cfg.train.reduce_dtype,
                forward_methods=("encode", "decode"),
            )
            strategy = describe(self.plan, units, cfg.train.mixed_precision, cfg.train.reduce_dtype)
        else:
            self.ae = acc.prepare_model(model)
            strategy = data_parallel(self.ae, acc, cfg.train.reduce_dtype)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        # Made after sharding, so that it holds the shards (DTensors) under FSDP.
        self.opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            **fused,
        )
        self.disc_ddp = self.disc_opt = None
        if self.disc is not None:
            # Replicated (a few million parameters) and data-parallel on every strategy, sharded or not.
            self.disc_ddp = replicate(self.disc, acc)
            self.disc_opt = torch.optim.AdamW(
                self.disc.parameters(),
                lr=cfg.loss.disc_lr or cfg.optim.lr,
                betas=tuple(cfg.optim.betas),
                **fused,
            )
        self.ema = EMA(vae_names(self.vae), cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

        self.loader = build_loader(cfg, acc.process_index, acc.num_processes)
        from vae_scale import kernels

        lines = preflight(
            cfg,
            world_size=acc.num_processes,
            device=self.device,
            kernels_backend=kernels.auto_backend(self.device)
            if cfg.model.kernels == "auto"
            else cfg.model.kernels,
            n_params=sum(p.numel() for p in vae.parameters()),
            batches_per_epoch=self.loader.batches_per_epoch,
            fsdp=self.fsdp,
            disc_params=sum(p.numel() for p in self.disc.parameters()) if self.disc else 0,
            strategy=strategy,
        )
        self.plan_lines = lines
        if acc.is_main_process:
            print("\n".join(lines), flush=True)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep, acc)
        self.step = 0
        self.samples_seen = 0
        self.lr_scale = 1.0
        self.skipped = 0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.rollbacks_in_a_row = 0  # since the last healthy checkpoint
        self._skipped_at_save = 0  # self.skipped when the last checkpoint was saved or restored
        self.preview: torch.Tensor | None = None
        self._val = None
        self._eval_nets = {}
        self.started = time.time()
        self.last_path: Path | None = None
        self.last_eval: tuple[int, dict[str, float]] | None = None
        if cfg.eval.every and not dry_run:  # missing LPIPS / Inception weights stop the run here
            self._eval_nets = load_eval_nets(cfg, cfg.eval.metrics)

    # -- state -----------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        healthy = self.skipped == self._skipped_at_save  # no skipped step since the last checkpoint
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "lr_scale": self.lr_scale,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "rollbacks_in_a_row": 0 if healthy else self.rollbacks_in_a_row,
            "healthy": healthy,
            "world_size": self.acc.num_processes,
            "parallel": "fsdp" if self.fsdp else "ddp",
        }

    def optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """What checkpoints hold optimizer state for: name -> (module of its parameters, optimizer)."""
        out = {"vae": (self.model, self.opt)}
        if self.disc_opt is not None:
            out["discriminator"] = (self.disc, self.disc_opt)
        return out

    def save(self) -> Path:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Full weights, gathered to the main process under FSDP (a collective: every rank calls it).
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        vae_state = {k[len("vae.") :]: v for k, v in full.items() if k.startswith("vae.")}
        path = self.ckpt.save(
            self.step,
            trainer_state=self.trainer_state(),
            rank_state={"data": self.loader.state_dict(), "weights_fingerprint": self.weights_fingerprint()},
            weights={
                "vae": vae_state,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "loss": self.criterion.likelihood_state(),
                "discriminator": self.disc.state_dict() if self.disc is not None else None,
            },
            optimizers=self.optimizers(),
            config_yaml=self.cfg.to_yaml(),
            scaler=self.acc.scaler,
        )
        self.last_saved, self.last_path = self.step, path
        self._after_save_or_restore(healthy=self.skipped == self._skipped_at_save)
        if self.acc.is_main_process:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            size = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
            self.monitor.write(f"checkpoint  step {self.step} -> {path} ({size})")
        return path

    def _after_save_or_restore(self, healthy: bool) -> None:
        """A healthy checkpoint is progress: rollbacks count again from zero."""
        self._skipped_at_save = self.skipped
        if healthy:
            self.rollbacks_in_a_row = 0

    @torch.no_grad()
    def weights_fingerprint(self) -> list[float]:
        """Sum and sum of squares of this rank's parameters (its shards under FSDP) in float64."""
        params = [_local(p).detach().double() for p in self.model.parameters()]
        return [sum(p.sum() for p in params).item(), sum(p.pow(2).sum() for p in params).item()]

    def restore(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state, rank_state, weights = self.ckpt.load(path, self.optimizers(), scaler=self.acc.scaler)
        full = {f"vae.{k}": v for k, v in weights["vae"].items()}
        if self.criterion.likelihood is not None:
            name = self.criterion.likelihood.name
            full[f"likelihood.{name}"] = weights["loss"][name].reshape(-1)  # once saved 0-dim
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
        if self.disc is not None and "discriminator" in weights:
            self.disc.load_state_dict(weights["discriminator"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.lr_scale, self.skipped = state["lr_scale"], state["skipped"]
        self.rollbacks = state.get("rollbacks", 0)
        self.rollbacks_in_a_row = state.get("rollbacks_in_a_row", 0)
        if state.get("world_size", self.acc.num_processes) != self.acc.num_processes:
            log.warning(
                "%s was written by %d processes, this run has %d: weights and optimizer state resharded; "
                "the data stream restarts from its epoch plan",
                path.name,
                state["world_size"],
                self.acc.num_processes,
            )
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["data"])
        if self.ema is not None and "ema" in weights:
            self.ema.load_state_dict(weights["ema"])
        elif self.ema is not None:  # switched on at resume: average from here, not from initial weights
            self.ema.reset()
            if self.acc.is_main_process:
                log.info("EMA on: %s has no EMA weights; the EMA starts from its weights", path)
        self.last_saved = self.step
        self._after_save_or_restore(healthy=False)

    def resume_path(self) -> Path | None:
        """The intact checkpoint checkpoint.resume leads to (see CheckpointManager.select), or None."""
        return self.ckpt.select(self.cfg.checkpoint.resume)

    # -- one step ----------------------------------------------------------------------------------------

    def _images(self) -> torch.Tensor:
        batch = next(self._it)
        x = batch["images"].to(self.device, non_blocking=True)
        return to_channels_last(x) if self.cfg.model.channels_last else x

    def _accumulating(self, module: nn.Module, sync: bool):
        """No gradient all-reduce for a data-parallel module before the last micro-batch.

        Under FSDP gradients are reduce-scattered after every micro-batch and accumulate sharded: holding
        unsharded gradients across micro-batches would cost as much memory as the whole model's.
        """
        if sync or self.fsdp and module is self.ae or not hasattr(module, "no_sync"):
            return nullcontext()
        return module.no_sync()

    def _clip(self, params: list[nn.Parameter], opt: torch.optim.Optimizer) -> torch.Tensor:
        """Unscale (fp16), clip to optim.grad_clip; the global norm (across shards under FSDP)."""
        if self.acc.scaler is not None:
            self.acc.scaler.unscale_(opt)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return _full(torch.nn.utils.clip_grad_norm_(params, clip)).detach().float()

    def train_step(self, stop: StopFlag, over_budget: bool) -> tuple[dict[str, torch.Tensor], bool]:
        """Accumulate, agree across ranks, step. Returns (detached logs, whether to stop).

        `stop` is read at the agreement, so a signal that arrives before it stops the run after this step.
        """
        cfg, acc = self.cfg, self.acc
        accum = cfg.train.grad_accum
        disc_on = self.disc is not None and self.criterion.disc_active(self.step)
        sums: dict[str, torch.Tensor] = {}
        finite = torch.ones((), device=self.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            x = self._images()
            self.data_wait += time.perf_counter() - t0
            sync = micro == accum - 1
            # The same draw on every rank (FSDP needs the same forwards) and again after a resume.
            transforms = draw_transforms(cfg.loss, cfg.train.seed, self.step, micro)
            with self._accumulating(self.ae, sync):
                with acc.autocast():
                    x_hat, posterior, kl, transformed = self.ae(x, transforms)
                    loss, logs = self.criterion.autoencoder_loss(
                        x,
                        x_hat,
                        posterior,
                        kl,
                        self.step,
                        last_layer=self.last_layer,
                        transformed=transformed,
                    )
                if (
                    cfg.train.debug_nonfinite_step == self.step
                    and cfg.train.debug_nonfinite_rank == acc.process_index
                ):
                    loss = loss * float("nan")
                finite = finite * torch.isfinite(loss.detach())
                acc.backward(loss / accum)
            if disc_on:
                with self._accumulating(self.disc_ddp, sync):
                    with acc.autocast():
                        d_loss, d_logs = self.criterion.discriminator_loss(
                            x, x_hat.detach(), self.step, discriminator=self.disc_ddp
                        )
                    finite = finite * torch.isfinite(d_loss.detach())
                    acc.backward(d_loss / accum)
                logs = {**logs, **d_logs}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / accum
        self.last_posterior, self.last_x = posterior, x

        grad_norm = self._clip([p for p in self.model.parameters() if p.requires_grad], self.opt)
        finite = finite * torch.isfinite(grad_norm)
        if disc_on:
            finite = finite * torch.isfinite(self._clip(list(self.disc.parameters()), self.disc_opt))
        # The one host sync of the step: every rank learns whether any rank saw a non-finite value or a
        # stop request, so they all skip or stop together.
        flags = torch.stack(
            [
                1 - finite,
                torch.tensor(float(stop.requested), device=self.device),
                torch.tensor(float(over_budget), device=self.device),
            ]
        ).float()
        nonfinite, stop, budget = (acc.reduce(flags, reduction="sum") > 0).tolist()

        lr = learning_rate(cfg, self.step, self.lr_scale)
        for group in self.opt.param_groups:
            group["lr"] = lr
        scaler = acc.scaler
        if nonfinite:  # every rank skips; fp16 lowers its loss scale as the GradScaler would
            if scaler is not None:
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            self.skipped += 1
            self.consecutive_skips += 1
        else:
            optimizers = [self.opt]
            if disc_on:
                for group in self.disc_opt.param_groups:
                    group["lr"] = (cfg.loss.disc_lr or cfg.optim.lr) * self.lr_scale
                optimizers.append(self.disc_opt)
            for opt in optimizers:
                scaler.step(opt) if scaler is not None else opt.step()
            if scaler is not None:
                scaler.update()
            self.consecutive_skips = 0
            if self.ema is not None:
                self.ema.update()
        self.opt.zero_grad(set_to_none=True)
        if self.disc_opt is not None:
            self.disc_opt.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += cfg.data.batch_size * accum * acc.num_processes
        sums["grad_norm"] = grad_norm
        sums["lr"] = torch.tensor(lr)
        return sums, bool(stop or budget)

    # -- rollback --------------------------------------------------------------------------------------

    def rollback(self) -> None:
        """After too many non-finite steps in a row: back to the newest healthy checkpoint with a lower LR.

        TrainingStopped, naming the step, the LR scale and what to try, when rollback is off, there is no
        healthy checkpoint, or train.max_rollbacks rollbacks came in a row without a healthy checkpoint
        in between (rolling back again would only repeat them).
        """
        cfg = self.cfg.train
        stuck = (
            f"{self.consecutive_skips} non-finite steps in a row (train.max_consecutive_skips="
            f"{cfg.max_consecutive_skips}) at step {self.step}"
        )
        if cfg.rollback_lr_scale == 0:
            raise TrainingStopped(f"{stuck}, and train.rollback_lr_scale is 0. {self._advice()}")
        if self.rollbacks_in_a_row >= cfg.max_rollbacks:
            raise TrainingStopped(
                f"{stuck} after {self.rollbacks_in_a_row} rollbacks in a row with no healthy checkpoint in "
                f"between (train.max_rollbacks={cfg.max_rollbacks}); {self._advice()}"
            )
        path = self.ckpt.select("auto", healthy_only=True)  # newer (unhealthy) ones are moved aside
        if path is None:
            raise TrainingStopped(
                f"{stuck}, and there is no healthy checkpoint to roll back to. {self._advice()}"
            )
        scale = self.lr_scale * cfg.rollback_lr_scale
        skipped, rollbacks, in_a_row = self.skipped, self.rollbacks + 1, self.rollbacks_in_a_row + 1
        self.restore(path)
        self.lr_scale, self.skipped = scale, skipped
        self.rollbacks, self.rollbacks_in_a_row = rollbacks, in_a_row
        self._skipped_at_save = skipped
        self.consecutive_skips = 0
        self._it = iter(self.loader)
        self.monitor.write(
            f"rolled back to {path.name} after repeated non-finite steps; LR scale now {scale:g} "
            f"(rollback {in_a_row} of at most {cfg.max_rollbacks} in a row)"
        )

    def _advice(self) -> str:
        """The LR scale, the LR and what to try, for the message that stops a diverging run."""
        cfg = self.cfg
        lr = learning_rate(cfg, self.step, self.lr_scale)
        tips = [f"a lower optim.lr (now {cfg.optim.lr:g})", "more optim.warmup_steps"]
        if cfg.optim.grad_clip == 0:
            tips.append("optim.grad_clip=1 (clipping is off)")
        if self.acc.mixed_precision == "fp16":
            tips.append("train.mixed_precision=bf16 instead of fp16")
        return (
            f"LR scale {self.lr_scale:g} (LR {lr:g}). Try {', '.join(tips)}, or look for bad data around "
            f"step {self.step}"
        )

    # -- logging -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def latent_stats(self) -> dict[str, torch.Tensor]:
        """KL per latent channel and active units of the latest batch (metrics.active_units: channels whose
        posterior mean varies over the batch's images and positions)."""
        post = self.last_posterior
        mean = post.mean.float()
        kl_c = post.kl_per_channel().mean(0)  # (C,)
        out = {f"kl_channel/{c}": v for c, v in enumerate(kl_c)}
        count = mean.shape[0] * mean.shape[2] * mean.shape[3]
        out["active_units"] = active_units(mean.sum((0, 2, 3)), mean.square().sum((0, 2, 3)), count).float()
        return out

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Run the training model outside training (eval mode, no gradients), every rank together.

        Under FSDP every rank must take part in each forward; afterwards the gathered parameters are
        freed, so that neither a later training forward nor EMA weights (EMA.applied) reuse them.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.acc.autocast():
                yield
        finally:
            self.model.train(was_training)
            if self.fsdp:
                reshard(self.model)

    def log_images(self) -> None:
        if self.preview is None:
            return
        model, x = self.model, self.preview
        g = torch.Generator(device="cpu").manual_seed(self.cfg.train.seed)
        z = torch.randn(x.shape[0], *model.latent_shape(x.shape[2], x.shape[3]), generator=g).to(self.device)
        with self.inference():
            rows = [x, model.decode(model.encode(x).mode())]
            prior = model.decode(z)
        if self.ema is not None:
            with self.ema.applied(), self.inference():
                rows.append(model.decode(model.encode(x).mode()))
        self.monitor.images(
            self.step, {"reconstruction": image_grid(rows), "prior_samples": image_grid([prior])}
        )

    def evaluate(self) -> dict[str, float]:
        """eval.metrics over every validation sample (each exactly once across ranks); logged as val/*."""
        from vae_scale.data import build_val_loader

        cfg, acc = self.cfg, self.acc
        if self._val is None:
            self._val = build_val_loader(cfg.data, rank=acc.process_index, world_size=acc.num_processes)
        with self.inference():
            results = evaluate(
                self.model,
                self._val,
                metrics=cfg.eval.metrics,
                device=self.device,
                reduce=lambda t: acc.reduce(t, reduction="sum"),
                criterion=self.criterion,
                max_batches=cfg.eval.max_batches,
                iw=cfg.eval.iw,
                seed=cfg.train.seed,
                # Sharded forwards are collectives: a rank out of batches runs padding ones until all are.
                lockstep=Lockstep(self._any_rank, self._image_shape()) if self.fsdp else None,
                **self._eval_nets,
            )
        # The spectra are a plot (latent against RGB), not a curve per frequency bin.
        curves = {k: results.pop(k) for k in list(results) if k.startswith("spectrum/")}
        self.monitor.scalars(self.step, {f"val/{k}": v for k, v in results.items()})
        if curves:
            self.monitor.spectrum(self.step, curves)
        self.last_eval = (self.step, results)
        self.monitor.write(f"eval        step {self.step}: {headline(results)}")
        return results

    def _image_shape(self) -> tuple[int, int, int]:
        r = self.cfg.data.resolution
        return (self.cfg.model.in_channels, r, r)

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on at least one rank (a small all-reduce)."""
        return bool(self.acc.reduce(torch.tensor(float(flag), device=self.device), reduction="sum") > 0)

    # -- the loop ----------------------------------------------------------------------------------------

    def fit(self, stop: StopFlag | None = None) -> dict[str, float]:
        """Train to train.steps, a stop signal or the time budget; returns the last logged metrics.

        `stop`: an installed StopFlag (train() installs one before the Trainer is built); else one is
        installed here for the loop.
        """
        cfg, acc = self.cfg, self.acc
        self.ckpt.clean_partial()
        path = self.resume_path()
        if path is not None:
            self.restore(path)
        else:
            self.last_saved = -1
        self.monitor = Monitor(cfg, acc, start_step=self.step, total_steps=cfg.train.steps)
        if path is not None:
            self.monitor.write(f"resumed from {path} at step {self.step}")
        own_stop = stop is None
        if own_stop:
            stop = StopFlag()
            stop.install()
        self._it = iter(self.loader)
        self.data_wait, t_start = 0.0, time.time()
        window = LogWindow()
        last: dict[str, float] = {}
        stopped_by = None
        self.ae.train()
        try:
            while self.step < cfg.train.steps:
                if stop.requested and acc.num_processes == 1:  # came after the last step's agreement
                    stopped_by = stop.name
                    break
                over = cfg.train.time_budget_s > 0 and time.time() - t_start > cfg.train.time_budget_s
                logs, should_stop = self.train_step(stop, over)
                if self.preview is None:
                    self.preview = self.last_x[:PREVIEW_IMAGES].detach().clone()
                window.add(logs, finite=self.consecutive_skips == 0)
                if should_stop:
                    stopped_by = stop.name or ("time budget" if over else "signal")
                # A stop wins over a rollback: it saves this state (marked unhealthy), and the resumed run
                # rolls back if its steps are still non-finite.
                if self.consecutive_skips >= cfg.train.max_consecutive_skips and not should_stop:
                    last = self._log(window) or last  # the steps that led to it, at their own step
                    self.rollback()
                    continue
                if self.step % cfg.log.every == 0 or should_stop or self.step == cfg.train.steps:
                    last = self._log(window) or last
                if cfg.log.images_every and self.step % cfg.log.images_every == 0:
                    self.log_images()
                    self.monitor.report()
                if should_stop:
                    break
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
            last = self._log(window) or last  # steps not logged yet (a stop that came between steps)
            if self.last_saved != self.step:
                self.save()
            if stopped_by:
                self.monitor.write(f"stopped by {stopped_by} at step {self.step}; checkpoint saved")
        finally:
            if own_stop:
                stop.restore()
            self.loader.close()
            self.monitor.close()
        result = {**last, "step": self.step, "stopped_by": stopped_by or ""}
        if acc.is_main_process:
            print("\n".join(self.summary(result)), flush=True)
        return result

    def summary(self, result: dict[str, Any]) -> list[str]:
        """The end-of-run lines: steps and time, the last logged losses, the last evaluation, and where the
        report, the checkpoint and the W&B run are."""
        cfg, monitor = self.cfg, self.monitor
        seconds = time.time() - self.started
        how = f", stopped by {result['stopped_by']}" if result["stopped_by"] else ""
        lines = [
            "",
            f"done        step {result['step']} of {cfg.train.steps} in {seconds / 60:.1f} min{how}",
        ]
        losses = {k: result[k] for k in SUMMARY_LOSSES if k in result}
        if losses:
            lines.append("losses      " + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
        if self.last_eval is not None:
            step, results = self.last_eval
            lines.append(f"eval        step {step}: {headline(results)}")
        lines.append(f"report      {self.run_dir / 'report.html'}")
        if self.last_path is not None:
            lines.append(f"checkpoint  {self.last_path}")
        if monitor.wandb is not None:
            url = getattr(monitor.wandb, "url", None)
            where = Path(monitor.wandb.dir).parent  # wandb/offline-run-*/files -> the run's own folder
            lines.append(
                f"W&B         {url}" if url else f"W&B         offline: upload with `wandb sync {where}`"
            )
        return lines

    def _log(self, window: LogWindow) -> dict[str, float]:
        """One metrics row from the window's steps (then emptied); {} when it has none."""
        acc = self.acc
        if window.ran == 0:
            return {}
        totals, finite, ran, seconds = window.totals, window.finite, window.ran, time.time() - window.start
        window.reset()
        keys = sorted(totals)  # the same on every rank: the ranks skip the same steps
        values = {}
        if keys and finite:
            mean = torch.stack(
                [torch.as_tensor(totals[k], device=self.device).float() / finite for k in keys]
            )
            mean = acc.reduce(mean, reduction="mean")
            values = dict(zip(keys, mean.tolist()))
        if self.consecutive_skips == 0:  # the latest batch's latents, unless that step was skipped
            values.update({k: float(v) for k, v in self.latent_stats().items()})
        counters = torch.tensor([float(v) for v in self.loader.counters().values()], device=self.device)
        counters = acc.reduce(counters, reduction="sum").tolist() if len(counters) else []
        values.update({f"data/{k}": v for k, v in zip(self.loader.counters(), counters)})
        images = ran * self.cfg.data.batch_size * self.cfg.train.grad_accum * acc.num_processes
        values.update(
            {
                "images_per_s": images / max(seconds, 1e-9),
                "images_per_s_per_device": images / max(seconds, 1e-9) / acc.num_processes,
                "samples_seen": self.samples_seen,
                "skipped_steps": self.skipped,
                "data_wait_fraction": self.data_wait / max(seconds, 1e-9),
            }
        )
        # The largest over ranks: device memory held by tensors on a GPU, the whole process's RSS on a CPU.
        if self.device.type == "cuda":
            key, peak = "peak_memory_gb", torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            unit = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, KiB on Linux
            key, peak = "peak_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
        values[key] = float(acc.gather(torch.tensor([peak], device=self.device)).max())
        self.monitor.scalars(self.step, values)
        self.monitor.progress(self.step, loss=values.get("loss", float("nan")), img_s=values["images_per_s"])
        self.data_wait = 0.0
        return values


# --------------------------------------------------------------------------------------------------------
# Entry points


def train(cfg: Config, dry_run: bool = False) -> dict[str, float]:
    """Train with a resolved config; returns the last logged metrics plus the final step.

    Checks everything that can be checked before a process group starts or a file is written (NotReady
    lists every missing thing at once); a stop signal from then on ends the run with a checkpoint at the end
    of the step in flight. dry_run: the checks, then the Trainer built as the run would build it and its
    plan printed; nothing is trained or written. Returns {} then.
    """
    check_trainable(cfg)
    check_resume(cfg)
    plan = fsdp_plan(cfg, cuda=torch.cuda.is_available())  # a launch it cannot honour writes nothing
    problems = problems_before_start(cfg)
    if problems:
        raise NotReady(problems)
    lock = prepare_run_dir(cfg, dry_run=dry_run)
    if dry_run:
        trainer = Trainer(cfg, plan, dry_run=True)
        trainer.loader.close()
        if trainer.acc.is_main_process:
            print(f"dry run: every check passed; nothing was trained or written to {cfg.run.dir}")
        return {}
    stop = StopFlag()
    stop.install()
    try:
        return Trainer(cfg, plan).fit(stop)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
