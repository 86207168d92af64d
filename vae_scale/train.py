"""The training loop: one code path for a CPU, one GPU, or `accelerate launch` on many GPUs and nodes.

    vae-scale train --config sd-f8 data.train='/data/train-{000000..000999}.tar' run.name=sd-ft

Per step: grad_accum micro-batches of encode -> fused sample+KL -> decode -> loss -> backward (and the
discriminator's step on detached reconstructions once it is active); then the ranks agree in one small
all-reduce whether every loss and gradient is finite and whether anyone was asked to stop; then clip,
optimizer step, EMA. Checkpoints every `checkpoint.every` steps, at the end and on SIGTERM/SIGUSR1.
Re-running the same command resumes from the newest complete checkpoint of the run folder.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vae_scale.checkpoint import CheckpointManager, latest_checkpoint, resolve_checkpoint
from vae_scale.config import Config, ConfigError, load_config
from vae_scale.model import VAE, DiagonalGaussian
from vae_scale.monitor import Monitor, image_grid
from vae_scale.parallel import prepare_model, to_channels_last
from vae_scale.preflight import WillNotFit, preflight
from vae_scale.synthetic import SYNTHETIC, SyntheticLoader

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps with rollback off); the message says why."""


# --------------------------------------------------------------------------------------------------------
# Pieces the loop is built from


class Autoencoder(nn.Module):
    """What DDP/FSDP wraps: the VAE plus the loss's learnable parameters (e.g. the Gaussian logvar)."""

    def __init__(self, vae: VAE, loss_params: list[nn.Parameter], sample_posterior: bool = True):
        super().__init__()
        self.vae = vae
        self.loss_params = nn.ParameterList(loss_params)
        self.sample_posterior = sample_posterior

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor]:
        posterior = self.vae.encode(x)
        if self.sample_posterior:
            z, kl = posterior.sample_kl()
        else:
            z, kl = posterior.mode(), posterior.kl()
        return self.vae.decode(z), posterior, kl


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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) EMA weights on the CPU; a collective under FSDP: call it on every rank."""
        out = {}
        for name, p, s in zip(self.names, self.params, self.shadow):
            if hasattr(p, "device_mesh"):  # rebuild the sharded tensor, then gather it
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[name] = _full(s).detach().cpu().contiguous()
        return out

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
    return [
        (n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""), p)
        for n, p in module.named_parameters()
        if p.requires_grad
    ]


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


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the ranks agree on it at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding app): signals stay as they were
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum  # a second signal during the save only sets it again

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Holds the prepared model, optimizers, loader and counters of one run."""

    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

        from vae_scale.losses import VAELoss

        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        log_with = None if cfg.log.wandb == "disabled" else "wandb"
        # find_unused_parameters stays off: every parameter of the wrapped module gets a gradient each step.
        # cpu=True where there is no GPU makes a torchrun/accelerate-launched CPU job use gloo (MULTI_CPU).
        self.acc = acc = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision,
            log_with=log_with,
            project_dir=str(self.run_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True)],
        )
        self.device = acc.device
        cfg.train.mixed_precision = str(acc.mixed_precision)  # "auto" resolved: what the run really uses
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        set_seed(cfg.train.seed, device_specific=True)  # different noise per rank, repeatable per rank
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        acc.wait_for_everyone()

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        vae = VAE(cfg.model)
        if cfg.model.init_from:  # fine-tuning; a checkpoint to resume from overrides it in fit()
            from vae_scale.export import load_init_weights

            load_init_weights(vae, cfg.model.init_from)
        vae = prepare_model(vae)
        self.criterion = VAELoss(cfg.loss, image_channels=cfg.model.in_channels).to(self.device)
        torch.manual_seed(cfg.train.seed + 1 + acc.process_index)
        ae = Autoencoder(vae, list(self.criterion.vae_parameters()), cfg.train.sample_posterior)
        if cfg.train.compile:
            ae.vae.encoder.compile()
            ae.vae.decoder.compile()
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(
            [p for p in ae.parameters() if p.requires_grad],
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            **({"fused": True} if fused else {}),
        )
        self.disc = self.criterion.discriminator
        if self.fsdp and self.disc is not None:
            raise TrainingStopped(
                "loss.disc_weight > 0 under FSDP: Accelerate prepares one model with FSDP2; "
                "train the adversarial phase with DDP (launch/accelerate/8gpu.yaml)"
            )
        if self.disc is not None:
            disc_opt = torch.optim.AdamW(
                self.disc.parameters(),
                lr=cfg.loss.disc_lr or cfg.optim.lr,
                betas=tuple(cfg.optim.betas),
                **({"fused": True} if fused else {}),
            )
            self.ae, self.opt, self.disc_ddp, self.disc_opt = acc.prepare(ae, opt, self.disc, disc_opt)
        else:
            self.ae, self.opt = acc.prepare(ae, opt)
            self.disc_ddp = self.disc_opt = None
        self.vae: VAE = acc.unwrap_model(self.ae).vae
        self.ema = EMA(vae_names(self.vae), cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

        self.loader = build_loader(cfg, acc.process_index, acc.num_processes)
        import kernels

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
        )
        if acc.is_main_process:
            print("\n".join(lines), flush=True)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep, acc)
        self.step = 0
        self.samples_seen = 0
        self.lr_scale = 1.0
        self.skipped = 0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.preview: torch.Tensor | None = None
        self._val = None
        self._eval_nets = {}
        if cfg.eval.every:  # missing LPIPS / Inception weights stop the run here, before any step
            from vae_scale.evaluate import load_eval_nets

            self._eval_nets = load_eval_nets(cfg, cfg.eval.metrics)

    # -- state -----------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "lr_scale": self.lr_scale,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "world_size": self.acc.num_processes,
        }

    def save(self) -> Path:
        ema = self.ema.state_dict() if self.ema is not None else None
        model_state = {
            k: v.detach().cpu().contiguous()
            for k, v in self.acc.get_state_dict(self.ae).items()
            if k.startswith("vae.")
        }
        model_state = {
            k[len("vae.") :].replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v
            for k, v in model_state.items()
        }
        path = self.ckpt.save(
            self.step,
            trainer_state=self.trainer_state(),
            rank_state={"data": self.loader.state_dict(), "weights_fingerprint": self.weights_fingerprint()},
            model_state=model_state,
            ema_state=ema,
            config_yaml=self.cfg.to_yaml(),
            loss_state={
                n: _full(p).detach().cpu().clone()
                for n, p in self.criterion.named_parameters()
                if n in ("logvar", "log_scale")
            },
        )
        self.last_saved = self.step
        return path

    @torch.no_grad()
    def weights_fingerprint(self) -> list[float]:
        """Sum and sum of squares of this rank's parameters in float64: equal on ranks in sync."""
        params = [_local(p).detach().double() for p in self.ae.parameters()]
        return [sum(p.sum() for p in params).item(), sum(p.pow(2).sum() for p in params).item()]

    def restore(self, path: Path) -> None:
        state, rank_state, ema = self.ckpt.load(path)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.lr_scale, self.skipped = state["lr_scale"], state["skipped"]
        self.rollbacks = state.get("rollbacks", 0)
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["data"])
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        self.last_saved = self.step

    def resume_path(self) -> Path | None:
        r = self.cfg.checkpoint.resume
        if r == "never":
            return None
        if r == "auto":
            return latest_checkpoint(self.run_dir)
        return resolve_checkpoint(r)

    # -- one step ----------------------------------------------------------------------------------------

    def _images(self) -> torch.Tensor:
        batch = next(self._it)
        x = batch["images"].to(self.device, non_blocking=True)
        return to_channels_last(x) if self.cfg.model.channels_last else x

    def train_step(self, stop_requested: bool, over_budget: bool) -> tuple[dict[str, torch.Tensor], bool]:
        """Accumulate, agree across ranks, step. Returns (detached logs, whether to stop)."""
        cfg, acc = self.cfg, self.acc
        accum = cfg.train.grad_accum
        disc_on = self.disc is not None and self.criterion.disc_active(self.step)
        # Under FSDP the last layer is a shard that the forward does not use directly, so the adaptive
        # weight falls back to loss.disc_weight (said at start).
        last_layer = None if self.fsdp else self.vae.decoder.conv_out.weight
        sums: dict[str, torch.Tensor] = {}
        finite = torch.ones((), device=self.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            x = self._images()
            self.data_wait += time.perf_counter() - t0
            sync = micro == accum - 1
            with acc.no_sync(self.ae) if not sync else nullcontext():
                with acc.autocast():
                    x_hat, posterior, kl = self.ae(x)
                    loss, logs = self.criterion.autoencoder_loss(
                        x, x_hat, posterior, kl, self.step, last_layer=last_layer
                    )
                if (
                    cfg.train.debug_nonfinite_step == self.step
                    and cfg.train.debug_nonfinite_rank == acc.process_index
                ):
                    loss = loss * float("nan")
                finite = finite * torch.isfinite(loss.detach())
                acc.backward(loss / accum)
            if disc_on:
                with acc.no_sync(self.disc_ddp) if not sync else nullcontext():
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

        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.ae.parameters(), clip)
        finite = finite * torch.isfinite(grad_norm)
        if disc_on:
            d_norm = acc.clip_grad_norm_(self.disc_ddp.parameters(), clip)
            finite = finite * torch.isfinite(d_norm)
        # The one host sync of the step: every rank learns whether any rank saw a non-finite value or a
        # stop request, so they all skip or stop together.
        flags = torch.stack(
            [
                1 - finite,
                torch.tensor(float(stop_requested), device=self.device),
                torch.tensor(float(over_budget), device=self.device),
            ]
        ).float()
        nonfinite, stop, budget = (acc.reduce(flags, reduction="sum") > 0).tolist()

        lr = learning_rate(cfg, self.step, self.lr_scale)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if nonfinite:
            if acc.mixed_precision == "fp16":
                self.opt.step()  # the GradScaler sees the inf, skips the update and lowers its scale
            self.skipped += 1
            self.consecutive_skips += 1
        else:
            self.opt.step()
            if self.opt.step_was_skipped:  # fp16 overflow caught by the scaler alone
                self.skipped += 1
                self.consecutive_skips += 1
            else:
                self.consecutive_skips = 0
                if self.ema is not None:
                    self.ema.update()
            if disc_on:
                for group in self.disc_opt.param_groups:
                    group["lr"] = (cfg.loss.disc_lr or cfg.optim.lr) * self.lr_scale
                self.disc_opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.disc_opt is not None:
            self.disc_opt.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += cfg.data.batch_size * accum * acc.num_processes
        sums["grad_norm"] = grad_norm.detach().float()
        sums["lr"] = torch.tensor(lr)
        return sums, bool(stop or budget)

    # -- rollback --------------------------------------------------------------------------------------

    def rollback(self) -> None:
        """After too many non-finite steps in a row: back to the newest checkpoint with a lower LR."""
        cfg = self.cfg.train
        path = latest_checkpoint(self.run_dir)
        if cfg.rollback_lr_scale == 0 or path is None:
            why = "train.rollback_lr_scale is 0" if path else "there is no checkpoint to roll back to"
            raise TrainingStopped(
                f"{self.consecutive_skips} non-finite steps in a row (train.max_consecutive_"
                f"skips={cfg.max_consecutive_skips}) at step {self.step}, and {why}"
            )
        scale = self.lr_scale * cfg.rollback_lr_scale
        skipped, rollbacks = self.skipped, self.rollbacks + 1
        self.restore(path)
        self.lr_scale, self.skipped, self.rollbacks = scale, skipped, rollbacks
        self.consecutive_skips = 0
        self._it = iter(self.loader)
        self.monitor.write(
            f"rolled back to {path.name} after repeated non-finite steps; LR scale now {scale:g}"
        )

    # -- logging -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def latent_stats(self) -> dict[str, torch.Tensor]:
        """KL per latent channel and active units (channels whose posterior mean varies over the batch)."""
        post = self.last_posterior
        mean, logvar = post.mean.float(), post.logvar.float()
        kl_c = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(2, 3)).mean(0)  # (C,)
        activity = (
            mean.var(dim=0, unbiased=False).mean(dim=(1, 2)) if mean.shape[0] > 1 else torch.zeros_like(kl_c)
        )
        out = {f"kl_channel/{c}": v for c, v in enumerate(kl_c)}
        out["active_units"] = (activity > 0.01).float().sum()
        return out

    @torch.no_grad()
    def log_images(self) -> None:
        if self.preview is None:
            return
        vae, x = self.vae, self.preview
        was_training = vae.training
        vae.eval()
        rows = [x, vae.decode(vae.encode(x).mode())]
        if self.ema is not None and not self.fsdp:  # an FSDP module is not copied; its EMA shows on export
            ema_vae = copy.deepcopy(vae)
            params = dict(vae_names(ema_vae))
            for name, s in zip(self.ema.names, self.ema.shadow):
                params[name].copy_(s)
            rows.append(ema_vae.decode(ema_vae.encode(x).mode()))
        g = torch.Generator(device="cpu").manual_seed(self.cfg.train.seed)
        z = torch.randn(x.shape[0], *vae.latent_shape(x.shape[2], x.shape[3]), generator=g).to(self.device)
        prior = vae.decode(z)
        vae.train(was_training)
        self.monitor.images(
            self.step, {"reconstruction": image_grid(rows), "prior_samples": image_grid([prior])}
        )

    def evaluate(self) -> dict[str, float]:
        """eval.metrics over every validation sample (each exactly once across ranks); logged as val/*."""
        from vae_scale.data import build_val_loader
        from vae_scale.evaluate import evaluate

        cfg, acc = self.cfg, self.acc
        if self.fsdp:  # ranks may hold different numbers of val batches: sharded forwards would deadlock
            self.monitor.write("eval.every is skipped under FSDP: run `vae-scale eval` on the checkpoint")
            return {}
        if self._val is None:
            self._val = build_val_loader(cfg.data, rank=acc.process_index, world_size=acc.num_processes)
        was_training = self.vae.training
        self.vae.eval()
        results = evaluate(
            self.vae,
            self._val,
            metrics=cfg.eval.metrics,
            device=self.device,
            reduce=lambda t: acc.reduce(t, reduction="sum"),
            criterion=self.criterion,
            max_batches=cfg.eval.max_batches,
            iw=cfg.eval.iw,
            seed=cfg.train.seed,
            **self._eval_nets,
        )
        self.vae.train(was_training)
        self.monitor.scalars(self.step, {f"val/{k}": v for k, v in results.items()})
        return results

    # -- the loop ----------------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
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
        stop = StopFlag()
        stop.install()
        self._it = iter(self.loader)
        self.data_wait, t_start, t_log, steps_at_log = 0.0, time.time(), time.time(), self.step
        totals: dict[str, torch.Tensor] = {}
        last: dict[str, float] = {}
        stopped_by = None
        self.ae.train()
        try:
            while self.step < cfg.train.steps:
                over = cfg.train.time_budget_s > 0 and time.time() - t_start > cfg.train.time_budget_s
                logs, should_stop = self.train_step(stop.signal is not None, over)
                if self.preview is None:
                    self.preview = self.last_x[:PREVIEW_IMAGES].detach().clone()
                for k, v in logs.items():
                    totals[k] = totals.get(k, 0) + v
                if self.consecutive_skips >= cfg.train.max_consecutive_skips:
                    self.rollback()
                    continue
                if self.step % cfg.log.every == 0 or should_stop or self.step == cfg.train.steps:
                    last = self._log(totals, self.step - steps_at_log, time.time() - t_log)
                    totals, t_log, steps_at_log, self.data_wait = {}, time.time(), self.step, 0.0
                if cfg.log.images_every and self.step % cfg.log.images_every == 0:
                    self.log_images()
                    self.monitor.report()
                if should_stop:
                    stopped_by = "signal" if stop.signal is not None or not over else "time budget"
                    break
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
            if self.last_saved != self.step:
                self.save()
            if stopped_by:
                self.monitor.write(f"stopped by {stopped_by} at step {self.step}; checkpoint saved")
        finally:
            stop.restore()
            self.loader.close()
            self.monitor.close()
        return {**last, "step": self.step, "stopped_by": stopped_by or ""}

    def _log(self, totals: dict[str, torch.Tensor], steps: int, seconds: float) -> dict[str, float]:
        acc = self.acc
        if steps == 0:
            return {}
        keys = sorted(totals)
        mean = torch.stack([torch.as_tensor(totals[k], device=self.device).float() / steps for k in keys])
        mean = acc.reduce(mean, reduction="mean")
        values = dict(zip(keys, mean.tolist()))
        values.update({k: float(v) for k, v in self.latent_stats().items()})
        counters = torch.tensor([float(v) for v in self.loader.counters().values()], device=self.device)
        counters = acc.reduce(counters, reduction="sum").tolist() if len(counters) else []
        values.update({f"data/{k}": v for k, v in zip(self.loader.counters(), counters)})
        images = steps * self.cfg.data.batch_size * self.cfg.train.grad_accum * acc.num_processes
        values.update(
            {
                "images_per_s": images / max(seconds, 1e-9),
                "images_per_s_per_device": images / max(seconds, 1e-9) / acc.num_processes,
                "samples_seen": self.samples_seen,
                "skipped_steps": self.skipped,
                "data_wait_fraction": self.data_wait / max(seconds, 1e-9),
            }
        )
        if self.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.monitor.scalars(self.step, values)
        self.monitor.progress(self.step, loss=values.get("loss", float("nan")), img_s=values["images_per_s"])
        return values


# --------------------------------------------------------------------------------------------------------
# Entry points


def train(cfg: Config) -> dict[str, float]:
    """Train with a resolved config; returns the last logged metrics plus the final step."""
    check_trainable(cfg)
    return Trainer(cfg).fit()


def main(argv: list[str]) -> int:
    """`vae-scale train --config NAME|PATH [key=value ...]`."""
    from vae_scale.cli import config_parser

    args = config_parser("vae-scale train", "Train a VAE.").parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        train(cfg)
    except WillNotFit as e:
        log.error("%s", e)
        return 2
    except TrainingStopped as e:
        log.error("%s", e)
        return 1
    return 0
