"""Checkpoints of a run: atomic save, rotation, resume.

A run folder holds

    checkpoints/step-000001000/   complete only once its COMPLETE marker exists
    checkpoints/latest            the name of the newest complete checkpoint, replaced last

Every checkpoint is written into `checkpoints/.tmp-<name>/` by all ranks, flushed, marked COMPLETE by the
main process, renamed into place, and only then is `latest` replaced: a kill at any moment leaves the
previous checkpoint loadable. Inside one:

    (accelerate's save_state files: model, optimizers, GradScaler, RNG state of every rank)
    vae.safetensors      the VAE's weights, diffusers names (full, even when training was sharded)
    ema.safetensors      the EMA weights, when EMA is on
    loss.safetensors     the loss's learned parameters (Gaussian logvar / logistic log-scale), if any
    trainer_state.json   step, samples seen, LR scale, skip counters
    rank-<r>.json        each rank's data-loader position and bad-data counters
    config.yaml          the resolved config
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
        model_state: dict[str, torch.Tensor],
        ema_state: dict[str, torch.Tensor] | None,
        config_yaml: str,
        loss_state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write checkpoint `step` on every rank; returns its final path once it is complete."""
        acc = self.acc
        name = checkpoint_name(step)
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        write_atomic(tmp / f"rank-{acc.process_index}.json", json.dumps(rank_state))
        if acc.is_main_process:
            save_file(model_state, tmp / "vae.safetensors", metadata={"format": "pt", "step": str(step)})
            if ema_state is not None:
                save_file(ema_state, tmp / "ema.safetensors", metadata={"format": "pt", "step": str(step)})
            if loss_state:
                save_file(loss_state, tmp / "loss.safetensors", metadata={"format": "pt", "step": str(step)})
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
        self, path: Path
    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor] | None]:
        """Restore accelerate's state from `path`; returns (trainer_state, this rank's state, EMA weights)."""
        acc = self.acc
        acc.load_state(str(path))
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        rank_file = path / f"rank-{acc.process_index}.json"
        rank_state = json.loads(rank_file.read_text()) if rank_file.is_file() else None
        if rank_state is None:
            log.warning("%s has no state for rank %d (world size changed?)", path.name, acc.process_index)
        ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
        return trainer_state, rank_state, ema
