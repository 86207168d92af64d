"""Saving, restoring and rolling back a run: the Trainer's checkpoint side.

    trainer.save()                  # this step's checkpoint (every rank: a collective)
    trainer.restore(path)           # weights, optimizers, counters, data position from one
    trainer.rollback()              # after repeated non-finite steps: the newest healthy one, a lower LR

A mixin of the Trainer (trainer.py), which owns the attributes these methods read and set: the counters
(step, samples_seen, lr_scale, skipped, consecutive_skips, rollbacks, rollbacks_in_a_row), the model, loss,
discriminator, EMA, optimizers, loader, accelerator, checkpoint manager and monitor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint import CheckpointException

from vae_scale.files import folder_bytes
from vae_scale.formats.checkpoint import CheckpointNotWritten, DamagedCheckpoint
from vae_scale.train.build import learning_rate
from vae_scale.train.run_state import load_trained_weights, trained_weights, weights_fingerprint

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps with rollback off); the message says why."""


class Checkpointing:
    """The Trainer's checkpoint and rollback methods (see the module docstring)."""

    def trainer_state(self) -> dict[str, Any]:
        """The counters a checkpoint keeps (trainer_state.json)."""
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
        """Checkpoint the run at this step (every rank: a collective); returns its folder.

        TrainingStopped, on every rank, when it cannot be written (a full disk): its partial files are
        removed and the previous checkpoint stays the newest.
        """
        try:
            path = self.ckpt.save(
                self.step,
                trainer_state=self.trainer_state(),
                rank_state={
                    "data": self.loader.state_dict(),
                    "weights_fingerprint": weights_fingerprint(self.model),
                },
                weights=trained_weights(self.model, self.criterion, self.disc, self.ema),
                optimizers=self.optimizers(),
                config_yaml=self.cfg.to_yaml(),
                scaler=self.acc.scaler,
            )
        except CheckpointNotWritten as e:
            raise TrainingStopped(str(e)) from None
        self.last_saved, self.last_path = self.step, path
        self._after_save_or_restore(healthy=self.skipped == self._skipped_at_save)
        if self.acc.is_main_process:
            size = folder_bytes(path)
            size = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
            self.monitor.write(f"checkpoint  step {self.step} -> {path} ({size})")
        return path

    def _after_save_or_restore(self, healthy: bool) -> None:
        """A healthy checkpoint is progress: rollbacks count again from zero."""
        self._skipped_at_save = self.skipped
        if healthy:
            self.rollbacks_in_a_row = 0

    def restore(self, path: Path) -> None:
        """Weights, optimizers, counters, data position and RNG state from the checkpoint at `path`."""
        try:
            state, rank_state, weights = self.ckpt.load(path, self.optimizers(), scaler=self.acc.scaler)
        except (OSError, ValueError, KeyError, RuntimeError, CheckpointException) as e:  # verified, yet fails
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DamagedCheckpoint(
                f"{path} cannot be restored ({why}); move it out of checkpoints/ to resume the one before"
            ) from None
        main = self.acc.is_main_process
        load_trained_weights(weights, self.model, self.criterion, self.disc, self.ema, path, main)
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
        self.last_saved = self.step
        self._after_save_or_restore(healthy=False)

    def resume_path(self) -> Path | None:
        """The intact checkpoint checkpoint.resume leads to (see CheckpointManager.select), or None."""
        return self.ckpt.select(self.cfg.checkpoint.resume)

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
        lr = learning_rate(cfg.optim, cfg.train.steps, self.step, self.lr_scale)
        tips = [f"a lower optim.lr (now {cfg.optim.lr:g})", "more optim.warmup_steps"]
        if cfg.optim.grad_clip == 0:
            tips.append("optim.grad_clip=1 (clipping is off)")
        if self.acc.mixed_precision == "fp16":
            tips.append("train.mixed_precision=bf16 instead of fp16")
        return (
            f"LR scale {self.lr_scale:g} (LR {lr:g}). Try {', '.join(tips)}, or look for bad data around "
            f"step {self.step}"
        )
