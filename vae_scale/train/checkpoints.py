"""A run's checkpoints written and restored through its Accelerator: the whole training state, atomically, on
every rank (the folder's layout, manifest and readers: vae_scale/formats/checkpoint.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vae_scale.files import free_bytes, fsync_dir, human_bytes, write_atomic
from vae_scale.formats.checkpoint import (
    LATEST,
    MARKER,
    OPTIMIZER_DIR,
    WRITE_ERRORS,
    CheckpointNotWritten,
    DamagedCheckpoint,
    checkpoint_name,
    complete_checkpoints,
    describe_write_error,
    fsync_tree,
    is_complete,
    is_healthy,
    latest_checkpoint,
    newest_intact,
    set_aside,
    verify_checkpoint,
    write_manifest,
)
from vae_scale.formats.safe_dcp import SafePlanner, SafeReader

log = logging.getLogger(__name__)


class CheckpointManager:
    """Saves and restores complete training state through an Accelerator, atomically, on every rank."""

    def __init__(self, run_dir: str | Path, keep: int, accelerator):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep
        self.acc = accelerator

    def clean_partial(self) -> None:
        """Remove folders left by a save that was killed (main process, at start)."""
        if self.acc.is_main_process and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".tmp-") and p.is_dir():
                    log.warning("removing partial checkpoint %s left by an interrupted save", p.name)
                    shutil.rmtree(p, ignore_errors=True)
        self.acc.wait_for_everyone()

    def save(
        self,
        step: int,
        *,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        weights: dict[str, dict[str, torch.Tensor] | None],
        optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
        config_yaml: str,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Path:
        """Write checkpoint `step` on every rank; returns its final path once it is complete.

        weights: file stem -> full state dict (main process; e.g. "vae", "ema", "loss", "discriminator";
        None or {} writes nothing); optimizers: name -> (the module its parameters belong to, optimizer),
        saved with torch.distributed.checkpoint (a collective: every rank calls save).
        """
        from accelerate.checkpointing import save_accelerator_state

        acc = self.acc
        name = checkpoint_name(step)
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        error = None
        if acc.is_main_process:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                error = e
        self._agree(error, name, tmp)
        try:
            save_optimizers(tmp / OPTIMIZER_DIR, optimizers)  # a collective: raises on every rank together
            save_accelerator_state(
                str(tmp),
                [],
                [],
                [],
                [],
                acc.process_index,
                step,
                scaler=scaler if acc.is_main_process else None,
            )
            write_atomic(tmp / f"rank-{acc.process_index}.json", json.dumps(rank_state))
            if acc.is_main_process:
                meta = {"format": "pt", "step": str(step)}
                for stem, state in weights.items():
                    if state:
                        save_file(
                            {k: v.contiguous() for k, v in state.items()}, tmp / f"{stem}.safetensors", meta
                        )
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
                (tmp / "config.yaml").write_text(config_yaml)
        except WRITE_ERRORS as e:
            error = e
        self._agree(error, name, tmp)  # in place of a barrier: every rank's files are written, or none stay
        if acc.is_main_process:
            try:
                fsync_tree(tmp)
                write_manifest(tmp)
                write_atomic(tmp / MARKER, f"{step}\n")
                if final.exists():  # the same step saved again (after a rollback): replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.dir)
            except OSError as e:
                error = e
        self._agree(error, name, tmp)
        if acc.is_main_process:
            try:
                write_atomic(self.dir / LATEST, name + "\n")
            except OSError as e:  # the checkpoint is complete: a scan finds it once the old pointer is gone
                (self.dir / LATEST).unlink(missing_ok=True)
                log.warning("%s is saved, but checkpoints/%s could not be updated (%s)", name, LATEST, e)
            self._rotate(keep_name=name)
        acc.wait_for_everyone()
        return final

    def _agree(self, error: BaseException | None, name: str, tmp: Path) -> None:
        """Every rank learns whether any rank's part of checkpoint `name` failed (one small all-reduce); if
        one did, the main process removes the partial folder and every rank raises CheckpointNotWritten."""
        acc = self.acc
        failed = torch.tensor(float(error is not None), device=acc.device)
        if acc.num_processes > 1:
            failed = acc.reduce(failed, reduction="sum")
        if not failed.item():
            return
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        why = describe_write_error(error) if error is not None else "the write failed on another rank"
        previous = latest_checkpoint(self.run_dir)
        kept = (
            f"the newest checkpoint, {previous}, is untouched and a rerun resumes from it"
            if previous is not None
            else "there is no earlier checkpoint of this run"
        )
        free = human_bytes(free_bytes(self.dir))
        raise CheckpointNotWritten(
            f"checkpoint {name} could not be written to {self.dir} ({why}; {free} free): its partial files "
            f"were removed and the run stops; {kept}"
        )

    def _rotate(self, keep_name: str) -> None:
        found = [p for p in complete_checkpoints(self.dir) if p.name != keep_name]
        if not is_healthy(self.dir / keep_name):  # rollback needs one healthy checkpoint to go back to
            healthy = [p for p in found if is_healthy(p)]
            found = [p for p in found if not healthy or p != healthy[-1]]
        for old in found[: max(0, len(found) + 1 - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def select(self, resume: str, healthy_only: bool = False) -> Path | None:
        """The checkpoint to continue from, agreed on every rank; newer ones of this run are set aside.

        resume: "auto" (the newest intact checkpoint of this run, passing over damaged ones with a warning
        that names them), "never" (none: every existing checkpoint is set aside), or a checkpoint or run
        folder. healthy_only: only healthy checkpoints (rollback). DamagedCheckpoint, on every rank, when
        the named checkpoint is damaged or every candidate is. The main process verifies and moves; the
        choice is broadcast.
        """
        acc = self.acc
        choice: list[str | None] = [None, None]  # (path, error)
        if acc.is_main_process:
            try:
                path = self._select(resume, healthy_only)
                choice = [None if path is None else str(path), None]
            except DamagedCheckpoint as e:
                choice = [None, str(e)]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(choice)
        if choice[1] is not None:
            raise DamagedCheckpoint(choice[1])
        return None if choice[0] is None else Path(choice[0])

    def _select(self, resume: str, healthy_only: bool) -> Path | None:
        path, damaged = None, []
        if resume == "auto":
            path, damaged = newest_intact(self.run_dir, healthy_only)
        elif resume != "never":
            given = Path(resume)
            if is_complete(given):
                verify_checkpoint(given)
                path = given
            else:
                path, damaged = newest_intact(given, healthy_only)
        for _, why in damaged:
            log.warning("skipping a damaged checkpoint: %s", why)
        if damaged and path is None and not healthy_only:
            raise DamagedCheckpoint(
                f"no intact checkpoint to resume from ({len(damaged)} damaged, the newest: {damaged[0][1]}); "
                "move them away or give checkpoint.resume=never to start afresh"
            )
        moved, dest = set_aside(self.dir, path)
        if moved:
            if resume == "never":
                why = "checkpoint.resume=never starts afresh"
            elif path is None:
                why = "no healthy checkpoint"
            else:
                why = f"continuing from {path}"
            names = ", ".join(moved)
            log.warning("%s: moved %d checkpoint(s) (%s) to %s, not deleted", why, len(moved), names, dest)
        return path

    def load(
        self,
        path: Path,
        optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
        scaler: torch.amp.GradScaler | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, dict[str, torch.Tensor]]]:
        """Restore RNG, loss scale and optimizer state from `path` (every rank; a collective).

        Returns (trainer_state, this rank's state or None, weights: file stem -> state dict of every
        *.safetensors file the checkpoint holds). Applying the weights to the model is the caller's job.
        """
        from accelerate.checkpointing import load_accelerator_state

        acc = self.acc
        if (path / OPTIMIZER_DIR).is_dir():
            load_optimizers(path / OPTIMIZER_DIR, optimizers)
        else:
            _load_legacy_optimizers(path, optimizers)
        load_accelerator_state(str(path), [], [], [], [], acc.process_index, scaler=scaler)
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        rank_file = path / f"rank-{acc.process_index}.json"
        rank_state = json.loads(rank_file.read_text()) if rank_file.is_file() else None
        if rank_state is None:
            log.warning("%s has no state for rank %d (world size changed?)", path.name, acc.process_index)
        weights = {p.stem: load_file(p) for p in sorted(path.glob("*.safetensors"))}
        if "discriminator" not in weights and "model_1" in weights:  # accelerate's layout: model_1 is D
            weights["discriminator"] = weights["model_1"]
        return trainer_state, rank_state, weights


# --------------------------------------------------------------------------------------------------------
# Optimizer state: torch.distributed.checkpoint, keyed by parameter names, resharded on load


def save_optimizers(
    folder: Path, optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]
) -> None:
    """Write every optimizer's state into `folder` (.distcp files); every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {name: get_optimizer_state_dict(module, opt) for name, (module, opt) in optimizers.items()}
    dcp.save(state, checkpoint_id=str(folder), no_dist=not _distributed())


def load_optimizers(
    folder: Path, optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]
) -> None:
    """Load what save_optimizers wrote into the optimizers, resharded to this run's parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {name: get_optimizer_state_dict(module, opt) for name, (module, opt) in optimizers.items()}
    # A parameter no gradient has reached yet (Wan's temporal convolutions while it trains on images) has
    # no optimizer state in the folder, and must have none after the load either, as in the run that saved.
    saved = set(SafeReader(folder).read_metadata().state_dict_metadata)
    stateless: dict[str, bool] = {}
    for name, s in state.items():
        missing = [f for f, v in s["state"].items() if not any(f"{name}.state.{f}.{k}" in saved for k in v)]
        for fqn in missing:
            del s["state"][fqn]
        stateless[name] = bool(missing)
    # DCP's own reader and planner unpickle what the folder holds; these admit data only (safe_dcp).
    dcp.load(
        state,
        storage_reader=SafeReader(folder),
        planner=SafePlanner(),
        checkpoint_id=str(folder),
        no_dist=not _distributed(),
    )
    for name, (module, opt) in optimizers.items():
        options = StateDictOptions(strict=not stateless[name])
        set_optimizer_state_dict(module, opt, optim_state_dict=state[name], options=options)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _load_legacy_optimizers(
    path: Path, optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]
) -> None:
    """accelerate's save_state layout: optimizer.bin (the VAE's), optimizer_1.bin (the discriminator's)."""
    for (_, opt), file in zip(optimizers.values(), ("optimizer.bin", "optimizer_1.bin")):
        if (path / file).is_file():
            opt.load_state_dict(torch.load(path / file, map_location="cpu", weights_only=True))


# --------------------------------------------------------------------------------------------------------
# The run folder's lock
