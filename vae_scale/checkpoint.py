"""Checkpoints of a run: atomic save, rotation, resume.

A run folder holds

    checkpoints/step-000001000/   complete only once its COMPLETE marker exists
    checkpoints/latest            the name of the newest complete checkpoint, replaced last

Every checkpoint is written into `checkpoints/.tmp-<name>/` by all ranks, flushed, marked COMPLETE by the
main process, renamed into place, and only then is `latest` replaced: a kill at any moment leaves the
previous checkpoint loadable. Inside one (the weights stored once):

    vae.safetensors      the VAE's weights, diffusers names, full even when training was sharded: what
                         export, eval and VAE.from_checkpoint read, and what a resume loads the model from
    ema.safetensors      the EMA weights, when EMA is on
    loss.safetensors     the loss's learned scale (Gaussian logvar / logistic log-scale), if any
    discriminator.safetensors   the PatchGAN discriminator's weights and buffers, when it is on
    optimizer/           the optimizers' state, torch.distributed.checkpoint (.distcp files + .metadata):
                         sharded under FSDP, written once under DDP; it reshards on load, so a run may
                         resume on another number of processes or switch between DDP and FSDP
    random_states_<r>.pkl, scaler.pt   accelerate's RNG state of every rank, fp16 loss scale
    trainer_state.json   step, samples seen, LR scale, skip counters, world size
    rank-<r>.json        each rank's data-loader position and bad-data counters
    config.yaml          the resolved config

Checkpoints written before this layout (accelerate's save_state: model.safetensors, optimizer.bin, ...)
still load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a small file so that readers see the old content or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps."""
    return f"{PREFIX}{step:09d}"


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder was fully written."""
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.startswith(PREFIX) and p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run folder (via `latest`, falling back to a scan), or None."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        candidate = ckpt_dir / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
        log.warning("checkpoints/latest names %s, which is not complete; scanning", candidate.name)
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint path or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    if is_complete(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a folder with a {MARKER} marker) found")
    return found


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
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        save_optimizers(tmp / OPTIMIZER_DIR, optimizers)
        save_accelerator_state(
            str(tmp), [], [], [], [], acc.process_index, step, scaler=scaler if acc.is_main_process else None
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
        acc.wait_for_everyone()
        if acc.is_main_process:
            _fsync_tree(tmp)
            write_atomic(tmp / MARKER, f"{step}\n")
            if final.exists():  # the same step saved again (after a rollback): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            write_atomic(self.dir / LATEST, name + "\n")
            self._rotate(keep_name=name)
        acc.wait_for_everyone()
        return final

    def _rotate(self, keep_name: str) -> None:
        found = [p for p in complete_checkpoints(self.dir) if p.name != keep_name]
        for old in found[: max(0, len(found) + 1 - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

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

OPTIMIZER_DIR = "optimizer"


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
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {name: get_optimizer_state_dict(module, opt) for name, (module, opt) in optimizers.items()}
    dcp.load(state, checkpoint_id=str(folder), no_dist=not _distributed())
    for name, (module, opt) in optimizers.items():
        set_optimizer_state_dict(module, opt, optim_state_dict=state[name])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _load_legacy_optimizers(
    path: Path, optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]
) -> None:
    """accelerate's save_state layout: optimizer.bin (the VAE's), optimizer_1.bin (the discriminator's)."""
    for (_, opt), file in zip(optimizers.values(), ("optimizer.bin", "optimizer_1.bin")):
        if (path / file).is_file():
            opt.load_state_dict(torch.load(path / file, map_location="cpu", weights_only=True))
