"""The training loop: one code path for a CPU, one GPU, or `accelerate launch` on many GPUs and nodes.

    vae-scale train --config sd-f8 data.train='/data/train-{000000..000999}.tar' run.name=sd-ft

Per step: grad_accum micro-batches (images, or clips when data.frames > 1) of encode -> fused sample+KL ->
decode -> loss -> backward (and the discriminator's step on detached reconstructions once it is active);
then the ranks agree in one small
all-reduce whether every loss and gradient is finite and whether anyone was asked to stop; then clip,
optimizer step, EMA. Checkpoints every `checkpoint.every` steps, at the end and on SIGTERM/SIGUSR1/SIGINT
(a stop request during an evaluation ends it before its next batch, on every rank, and the run saves).
Re-running the same command resumes from the newest intact checkpoint of the run folder.

Before anything is written: the config's ranges, a model config that fits the checkpoint to resume, the
sharding the launch asks for, the run folder writable and not in use by another run (startup.py). The
pieces a run is made of are built in build.py; a Trainer puts them together (saving, restoring and rolling
back are recovery.py's):

    trainer = Trainer(cfg)           # built, resumed from the run folder's newest checkpoint if any
    logs, stop = trainer.train_step()
    trainer.fit()                    # the loop: steps, logs, images, evaluations, checkpoints, summary
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate.utils import set_seed

from vae_scale import kernels
from vae_scale.config import Config
from vae_scale.data.source import BatchSource
from vae_scale.eval.equivariance import draw_transforms
from vae_scale.eval.metrics import load_eval_nets
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.train.build import (
    Autoencoder,
    build_accelerator,
    build_discriminator,
    build_drift_reference,
    build_ema,
    build_loader,
    build_optimizer,
    build_projection,
    build_vae,
    learning_rate,
    parallelize,
    resolved_config,
)
from vae_scale.train.checkpoints import CheckpointManager
from vae_scale.train.checks import WeightFiles, check_run, sample_lines, wandb_fallback
from vae_scale.train.fsdp import FSDPPlan, fsdp_plan, full_tensor, reshard
from vae_scale.train.log import TrainLog
from vae_scale.train.monitor import Monitor
from vae_scale.train.objective import LastLayer, VAELoss
from vae_scale.train.preflight import preflight
from vae_scale.train.recovery import Checkpointing, TrainingStopped
from vae_scale.train.run_state import load_phase_start, phase_start
from vae_scale.train.signals import StopFlag
from vae_scale.train.startup import prepare_run_dir, resume_plan
from vae_scale.train.summary import summary
from vae_scale.train.trainable import describe as describe_trainable
from vae_scale.train.wrapping import channels_last_choice, compiled_objective, to_channels_last

__all__ = ["Trainer", "TrainingStopped", "train"]  # TrainingStopped: recovery.py's, raised through here

log = logging.getLogger(__name__)


class Trainer(Checkpointing):
    """Holds the prepared model, optimizers, loader, monitor and counters of one run.

    Everything is made in __init__ (and restored there from the checkpoint to resume), so `train_step` runs
    on a new Trainer as it runs inside `fit`. The config it was given is not changed: `self.cfg` is a copy
    with what the launch decided (see build.resolved_config). Saving, restoring and rolling back are
    recovery.Checkpointing's.
    """

    def __init__(
        self,
        cfg: Config,
        plan: FSDPPlan | None = None,
        dry_run: bool = False,
        loader: BatchSource | None = None,
        weights: WeightFiles | None = None,
    ):
        """Everything a run needs, built, checked and resumed. dry_run: the same, but nothing is written or
        resumed (no config.yaml, no monitor, no evaluation networks loaded); `plan_lines` say what the launch
        does. loader: batches to train on in place of data.train's.

        plan, weights: what train()'s check pass found (checks.check_run); a Trainer built without them
        (a test's) makes the FSDP plan and looks the weight files up itself.
        """
        self.dry_run = dry_run
        self.plan: FSDPPlan = plan if plan is not None else fsdp_plan(cfg, cuda=torch.cuda.is_available())
        weights = weights or WeightFiles()
        self.fsdp = self.plan.enabled
        self.run_dir = Path(cfg.run.dir)
        self.acc = acc = build_accelerator(cfg, self.run_dir)
        channels_last, why = channels_last_choice(cfg.model, acc.device.type)
        layout = f"{'channels_last (NHWC)' if channels_last else 'NCHW'}: {why}"
        self.cfg = cfg = resolved_config(cfg, acc)
        self.device = acc.device
        set_seed(cfg.train.seed, device_specific=True)  # different noise per rank, repeatable per rank
        if acc.is_main_process and not dry_run:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        acc.wait_for_everyone()

        # The order below fixes what each seeded draw initialises: keep it, or runs stop being repeatable.
        self.vae = vae = build_vae(cfg, sharded=self.fsdp)
        clips = cfg.data.frames > 1  # the 3D discriminator
        self.criterion = VAELoss(cfg.loss, cfg.model.in_channels, weights.lpips, clips).to(self.device)
        align = build_projection(cfg, self.criterion)  # before the per-rank seed: the same on every rank
        self.autoencoder_loss = self.criterion.autoencoder_loss
        if cfg.train.compile:
            self.autoencoder_loss = compiled_objective(self.autoencoder_loss, cfg.train.compile_backend)
        torch.manual_seed(cfg.train.seed + 1 + acc.process_index)
        self.model = model = Autoencoder(vae, self.criterion.likelihood, cfg.train.sample_posterior, align)
        model.to(self.device)
        # The adversarial weight reads the decoder's last layer's input, recorded at every forward.
        self.disc = self.criterion.discriminator
        spec = vae.last_layer()
        self.last_layer = LastLayer(*spec) if self.disc is not None and spec is not None else None
        self.ae, strategy = parallelize(model, cfg.train, self.plan, acc)
        self.opt = build_optimizer(model, cfg.optim, self.device)
        self.disc_ddp, self.disc_opt = build_discriminator(self.disc, cfg, acc)
        self.ema = build_ema(vae, cfg.optim)
        if loader is None:
            loader = build_loader(cfg.data, cfg.train.seed, acc.process_index, acc.num_processes)
        self.loader: BatchSource = loader

        self.plan_lines = preflight(
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
            layout=layout,
        )
        if cfg.train.trainable or cfg.train.frozen:
            self.plan_lines.append(describe_trainable(vae, cfg.train))
        if acc.is_main_process:
            print("\n".join(self.plan_lines), flush=True)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep, acc)
        self.step = 0
        self.samples_seen = 0
        self.lr_scale = 1.0
        self.skipped = 0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.rollbacks_in_a_row = 0  # since the last healthy checkpoint
        self._skipped_at_save = 0  # self.skipped when the last checkpoint was saved or restored
        self.last_saved = -1  # the step of the newest checkpoint this run saved or restored
        self.last_path: Path | None = None
        self.last_posterior: DiagonalGaussian | None = None  # the latest micro-batch's, for the logs
        self.last_x: torch.Tensor | None = None
        self.started = time.time()
        if dry_run:  # nothing is written or resumed: no monitor, and no batch is drawn
            self.monitor: Monitor | None = None
            self.train_log = TrainLog(cfg, acc, None, {}, self.fsdp)
            self._it: Iterator[dict[str, Any]] | None = None
            return
        # Missing LPIPS / Inception weights stop the run here, before anything is resumed.
        eval_nets = load_eval_nets(cfg, cfg.eval.metrics, **weights.paths()) if cfg.eval.every else {}
        self.ckpt.clean_partial()
        path = self.resume_path()
        phase = phase_start(cfg.model.init_from) if cfg.model.init_from and path is None else None
        if path is not None:
            self.restore(path)
        elif phase is not None:  # build_vae loaded the VAE weights; the rest of what carries over
            started = load_phase_start(*phase, cfg, self.model, self.criterion, self.disc, self.ema)
        self.monitor = Monitor(cfg, acc, start_step=self.step, total_steps=cfg.train.steps)
        drift = build_drift_reference(cfg)
        inputs = {"latent_drift": drift} if drift is not None else {}
        self.train_log = TrainLog(cfg, acc, self.monitor, eval_nets, self.fsdp, inputs)  # rows, evals
        if path is not None:
            self.monitor.write(f"resumed from {path} at step {self.step}")
        elif phase is not None:
            self.monitor.write(started)
        self._it = iter(self.loader)

    def close(self) -> None:
        """Stop the loader's workers and close the monitor (report, W&B, progress bar)."""
        self.loader.close()
        if self.monitor is not None:
            self.monitor.close()

    # -- one step ----------------------------------------------------------------------------------------

    def _inputs(self) -> torch.Tensor:
        """The next micro-batch on the device: images (B, C, H, W) in the model's memory format, or clips
        (B, C, T, H, W) from the clip loader (T = 1 for a mixed run's image batches)."""
        batch = next(self._it)
        if "clips" in batch:
            return batch["clips"].to(self.device, non_blocking=True)
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

    def _clip(self, opt: torch.optim.Optimizer) -> torch.Tensor:
        """Unscale (fp16) and clip to optim.grad_clip the gradients of the parameters `opt` steps; their
        global norm (across shards under FSDP)."""
        if self.acc.scaler is not None:
            self.acc.scaler.unscale_(opt)
        params = [p for group in opt.param_groups for p in group["params"]]
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)).detach().float()

    def forward_loss(
        self, x: torch.Tensor, transforms: dict | None = None, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's training forward and VAE loss under autocast: (x_hat, posterior, loss, logs).

        transforms: the equivariance terms' draw (see train_step); eps: the posterior's noise, to compare
        the step with another implementation on the same sample (None draws it, as training does).
        """
        with self.acc.autocast():
            x_hat, posterior, kl, transformed, aligned = self.ae(x, transforms, eps=eps)
            loss, logs = self.autoencoder_loss(
                x,
                x_hat,
                posterior,
                kl,
                self.step,
                last_layer=self.last_layer,
                transformed=transformed,
                aligned=aligned,
            )
        return x_hat, posterior, loss, logs

    def train_step(
        self, stop: StopFlag | None = None, over_budget: bool = False
    ) -> tuple[dict[str, torch.Tensor | float], bool]:
        """Accumulate, agree across ranks, step. Returns (logs, whether to stop): detached device tensors,
        and the learning rate as a number.

        One device-to-host sync (the agreement) and no blocking host-to-device copy
        (tests/test_step_syncs.py).

        `stop` is read at the agreement, so a signal that arrives before it stops the run after this step;
        over_budget: this rank is past train.time_budget_s. Every rank calls it together.
        """
        cfg, acc = self.cfg, self.acc
        accum = cfg.train.grad_accum
        disc_on = self.disc is not None and self.criterion.disc_active(self.step)
        sums: dict[str, torch.Tensor] = {}
        finite = torch.ones((), device=self.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            x = self._inputs()
            self.train_log.window.data_wait += time.perf_counter() - t0
            sync = micro == accum - 1
            # The same draw on every rank (FSDP needs the same forwards) and again after a resume.
            transforms = draw_transforms(cfg.loss, cfg.train.seed, self.step, micro)
            with self._accumulating(self.ae, sync):
                x_hat, posterior, loss, logs = self.forward_loss(x, transforms)
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

        grad_norm = self._clip(self.opt)
        finite = finite * torch.isfinite(grad_norm)
        if disc_on:
            finite = finite * torch.isfinite(self._clip(self.disc_opt))
        # The one host sync of the step: every rank learns whether any rank saw a non-finite value or a
        # stop request, so they all skip or stop together. The host's two flags go in as fills (kernel
        # arguments), not as tensors copied from the host.
        asked = stop is not None and stop.requested
        flags = torch.stack(
            [1 - finite, finite.new_full((), float(asked)), finite.new_full((), float(over_budget))]
        )
        nonfinite, stop, budget = (acc.reduce(flags.float(), reduction="sum") > 0).tolist()

        lr = learning_rate(cfg.optim, cfg.train.steps, self.step, self.lr_scale)
        for group in self.opt.param_groups:
            group["lr"] = lr
        scaler = acc.scaler
        if nonfinite:  # every rank skips; fp16 lowers its loss scale as the GradScaler would
            if scaler is not None:  # reads the scale: one sync more, on a skipped step only
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            self.skipped += 1
            self.consecutive_skips += 1
        else:
            optimizers = [self.opt]
            if disc_on:
                for group in self.disc_opt.param_groups:
                    group["lr"] = (cfg.loss.disc_lr or cfg.optim.lr) * self.lr_scale
                optimizers.append(self.disc_opt)
            # Not scaler.step: every gradient is known finite on every rank (they were unscaled before the
            # norm that the agreement read), and scaler.step would read its own inf flags again, a sync
            # per optimizer. update() still grows the scale after growth_interval such steps.
            for opt in optimizers:
                opt.step()
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
        logs: dict[str, torch.Tensor | float] = {**sums, "lr": lr}  # a host number: no copy to the device
        return logs, bool(stop or budget)

    # -- forwards outside training -----------------------------------------------------------------------

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

    # -- the loop ----------------------------------------------------------------------------------------

    def fit(self, stop: StopFlag | None = None) -> dict[str, float]:
        """Train to train.steps, a stop signal or the time budget; returns the last logged metrics.

        `stop`: an installed StopFlag (train() installs one before the Trainer is built); else one is
        installed here for the loop.
        """
        cfg, acc = self.cfg, self.acc
        if self.dry_run:
            raise RuntimeError("a dry-run Trainer does not train")
        own_stop = stop is None
        if own_stop:
            stop = StopFlag()
            stop.install()
        t_start = time.time()
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
                self.train_log.add(logs, finite=self.consecutive_skips == 0, x=self.last_x)
                if should_stop:
                    stopped_by = stop.name or ("time budget" if over else "signal")
                # A stop wins over a rollback: it saves this state (marked unhealthy), and the resumed run
                # rolls back if its steps are still non-finite.
                if self.consecutive_skips >= cfg.train.max_consecutive_skips and not should_stop:
                    last = self._log() or last  # the steps that led to it, at their own step
                    self.rollback()
                    continue
                if self.step % cfg.log.every == 0 or should_stop or self.step == cfg.train.steps:
                    last = self._log() or last
                if cfg.log.images_every and self.step % cfg.log.images_every == 0:
                    self.train_log.images(self.step, self.model, self.ema, self.inference)
                    self.monitor.report()
                if should_stop:
                    break
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    # A stop request ends the evaluation between two batches: the run saves now, not after
                    # an evaluation that may outlast the time a scheduler leaves between signal and kill.
                    results = self.train_log.evaluate(
                        self.step, self.model, self.criterion, self.inference, lambda: stop.requested
                    )
                    if results is None:
                        stopped_by = stop.name or "a stop request on another rank"
                        break
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
            last = self._log() or last  # steps not logged yet (a stop that came between steps)
            if self.last_saved != self.step:
                self.save()
            if stopped_by:
                self.monitor.write(f"stopped by {stopped_by} at step {self.step}; checkpoint saved")
        finally:
            if own_stop:
                stop.restore()
            self.close()
        result = {**last, "step": self.step, "stopped_by": stopped_by or ""}
        if acc.is_main_process:
            lines = summary(
                result,
                total_steps=cfg.train.steps,
                seconds=time.time() - self.started,
                last_eval=self.train_log.last_eval,
                report=self.run_dir / "report.html",
                checkpoint=self.last_path,
                wandb_run=self.monitor.wandb,
            )
            print("\n".join(lines), flush=True)
        return result

    def _log(self) -> dict[str, float]:
        """One metrics row of the steps since the last (TrainLog.row); {} when there were none."""
        return self.train_log.row(
            self.step,
            posterior=self.last_posterior if self.consecutive_skips == 0 else None,  # not a skipped step's
            loader=self.loader,
            samples_seen=self.samples_seen,
            skipped=self.skipped,
        )


# --------------------------------------------------------------------------------------------------------
# Entry points


def train(cfg: Config, dry_run: bool = False) -> dict[str, float]:
    """Train with a resolved config; returns the last logged metrics plus the final step.

    The check pass (checks.check_run) runs first and stops the run with every problem it finds at once,
    before a process group starts or a file is written; a stop signal from then on ends the run with a
    checkpoint at the end of the step in flight. dry_run: the checks, then the Trainer built as the run
    would build it and its plan printed; nothing is trained or written. Returns {} then.
    """
    findings = check_run(cfg)
    findings.raise_if_any()
    cfg = wandb_fallback(findings.cfg)
    if dry_run:
        resume = resume_plan(cfg)
        trainer = Trainer(cfg, findings.plan, dry_run=True, weights=findings.weights)
        trainer.loader.close()
        if trainer.acc.is_main_process:
            print(resume)
            print("\n".join(sample_lines(cfg)))
            print(f"dry run: every check passed; nothing was trained or written to {cfg.run.dir}")
        return {}
    lock = prepare_run_dir(cfg.run.dir)
    stop = StopFlag()
    stop.install()
    try:
        return Trainer(cfg, findings.plan, weights=findings.weights).fit(stop)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
