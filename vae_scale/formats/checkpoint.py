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
    trainer_state.json   step, samples seen, LR scale, skip counters, world size, whether it is healthy
    rank-<r>.json        each rank's data-loader position and bad-data counters
    config.yaml          the resolved config
    manifest.json        size and CRC-32 of every other file in the folder, at any depth

Checkpoints written before this layout (accelerate's save_state: model.safetensors, optimizer.bin, ...)
still load.

The manifest is written before the marker and checked before a checkpoint is used: a resume skips a
damaged checkpoint (naming the file) for the previous intact one; the inference commands refuse it in one
line. A checkpoint is *healthy* when no step since the previous checkpoint was skipped as non-finite;
rollback only goes back to healthy ones, and rotation always keeps the newest healthy one.

Checkpoints that the run will not continue from (newer than the one a run resumes or rolls back to, or all
of them when a run starts fresh with checkpoint.resume=never) are moved, never deleted, to
`checkpoints/set-aside-<time>/`. The run folder is locked while a run uses it (`run.lock`, see RunLock).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vae_scale.files import OutputError, fsync_dir, write_atomic
from vae_scale.formats.safe_dcp import UnsafeCheckpoint, check_dcp_folder

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
PREFIX = "step-"
MANIFEST = "manifest.json"
SET_ASIDE = "set-aside-"
LOCK = "run.lock"
OPTIMIZER_DIR = "optimizer"


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest (or cannot be read); the message names the file."""


class CheckpointNotWritten(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error) on some rank; raised on every
    rank after its partial files were removed. The previous checkpoint is untouched; the message says why
    and which checkpoint a rerun resumes from."""


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises on the way to disk: OSError (open, write, rename), torch.save's
    RuntimeError, safetensors' SafetensorError, and torch.distributed.checkpoint's CheckpointException,
    which carries every rank's failure."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    return (OSError, RuntimeError, SafetensorError, CheckpointException)


WRITE_ERRORS = _write_errors()


def describe_write_error(e: BaseException) -> str:
    """One line for a failed write: the OS's words when there are any (No space left on device, Disk quota
    exceeded), found through the exceptions DCP and torch wrap around it."""
    seen, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in seen):
            continue
        seen.append(x)
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        todo += [x.__cause__, x.__context__]
        todo += [f for f in getattr(x, "failures", {}).values() if isinstance(f, BaseException)]
        todo += [f[0] for f in getattr(x, "failures", {}).values() if isinstance(f, tuple) and f]
    text = str(e).strip().splitlines()
    message = text[-1] if text else ""
    for known in ("No space left on device", "Disk quota exceeded", "File too large"):
        if any(known in line for line in text):
            return known
    return f"{type(e).__name__}: {message}"[:300]


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


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
    # A link is never a checkpoint of this run: it could lead to any folder (another run's, anyone's).
    found = [
        p
        for p in ckpt_dir.iterdir()
        if p.name.startswith(PREFIX) and not p.is_symlink() and p.is_dir() and is_complete(p)
    ]
    return sorted(found, key=lambda p: p.name)


def _named_by_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint folder `latest` names, or None: no pointer, or one that leads outside `ckpt_dir` (a
    path, '..', or a link elsewhere), refused with a warning so that the caller scans instead."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    candidate = ckpt_dir / name
    inside = name.startswith(PREFIX) and "/" not in name and "\\" not in name
    if not inside or candidate.resolve().parent != ckpt_dir.resolve():
        log.warning("%s names %r, not a checkpoint of this run: ignored, scanning the folder", pointer, name)
        return None
    return candidate


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run folder (via `latest`, falling back to a scan), or None."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    candidate = _named_by_latest(ckpt_dir)
    if candidate is not None:
        if is_complete(candidate):
            return candidate
        log.warning("checkpoints/latest names %s, which is not complete; scanning", candidate.name)
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder was taken at, from its name."""
    return int(Path(path).name[len(PREFIX) :])


def is_healthy(path: Path) -> bool:
    """Whether a checkpoint is marked healthy (no skipped step since the previous checkpoint)."""
    try:
        return bool(json.loads((Path(path) / "trainer_state.json").read_text()).get("healthy", True))
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------
# Manifest: sizes and checksums of every file


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(folder: Path) -> None:
    """Record the size and CRC-32 of every file under `folder` (any depth) in its manifest.json."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in (MANIFEST, MARKER):
            files[rel] = {"bytes": p.stat().st_size, "crc32": _crc32(p)}
    write_atomic(folder / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1) + "\n")


_unverified: set[Path] = set()  # checkpoints without a manifest, warned about once


def verify_checkpoint(folder: Path, files: Iterable[str] | None = None) -> None:
    """Check a checkpoint's files (all, or the named ones that it lists) against its manifest.

    DamagedCheckpoint names the first file that is missing, has another size, or another checksum. A
    checkpoint without a manifest is accepted unchecked (a warning says so). Checking all files also reads
    the optimizer state's metadata and non-tensor values the way a resume does (safe_dcp: no code runs), so
    one that would be refused at load is damaged here, manifest or not.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if folder.resolve() not in _unverified:
            _unverified.add(folder.resolve())
            log.warning("%s has no %s: its files are not verified", folder, MANIFEST)
        if files is None:
            _check_optimizer_state(folder)
        return
    try:
        listed = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{folder}: {MANIFEST} cannot be read ({type(e).__name__})") from None
    names = sorted(listed) if files is None else [f for f in files if f in listed]
    for name in names:
        p, want = folder / name, listed[name]
        if not p.is_file():
            raise DamagedCheckpoint(f"{folder}: {name} is missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise DamagedCheckpoint(
                f"{folder}: {name} has {size} bytes, its manifest says {want['bytes']} "
                "(truncated or replaced)"
            )
        if _crc32(p) != want["crc32"]:
            raise DamagedCheckpoint(f"{folder}: {name} does not match its checksum (the file is corrupted)")
    if files is None:
        _check_optimizer_state(folder)


def _check_optimizer_state(folder: Path) -> None:
    """DamagedCheckpoint when the optimizer state (DCP) holds a pickle that a resume would refuse."""
    if not (folder / OPTIMIZER_DIR).is_dir():  # accelerate's older layout: optimizer.bin, weights only
        return
    if not (folder / OPTIMIZER_DIR / ".metadata").is_file():
        raise DamagedCheckpoint(f"{folder}: {OPTIMIZER_DIR}/.metadata is missing")
    try:
        check_dcp_folder(folder / OPTIMIZER_DIR)
    except (UnsafeCheckpoint, OSError) as e:
        raise DamagedCheckpoint(str(e)) from None


def _earlier(ckpt: Path) -> str:
    older = [p for p in complete_checkpoints(Path(ckpt).parent) if p.name < Path(ckpt).name]
    return f"; the previous complete checkpoint is {older[-1]}" if older else ""


def read_checkpoint_file(ckpt: Path, name: str) -> dict[str, torch.Tensor] | str:
    """A .safetensors file (its tensors) or a text file of a checkpoint, checked against its manifest first.

    DamagedCheckpoint names the file (and the previous complete checkpoint) when it does not match or
    cannot be read.
    """
    ckpt = Path(ckpt)
    try:
        verify_checkpoint(ckpt, [name])
        if name.endswith(".safetensors"):
            return load_file(ckpt / name)
        return (ckpt / name).read_text()
    except DamagedCheckpoint as e:
        raise DamagedCheckpoint(f"{e}{_earlier(ckpt)}") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # no manifest to tell, and the reader fails (SafetensorError, bad bytes)
        raise DamagedCheckpoint(f"{ckpt / name} cannot be read ({e}){_earlier(ckpt)}") from None


def checkpoints_newest_first(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first; the one `latest` names leads."""
    found = complete_checkpoints(ckpt_dir)[::-1]
    named = _named_by_latest(Path(ckpt_dir))
    if named in found:
        found.remove(named)
        found.insert(0, named)
    return found


def newest_intact(run_dir: Path, healthy_only: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of a run folder that passes verification (and is healthy, if asked),
    with the damaged ones passed over on the way as (path, why)."""
    damaged = []
    for p in checkpoints_newest_first(Path(run_dir) / "checkpoints"):
        if healthy_only and not is_healthy(p):
            continue
        try:
            verify_checkpoint(p)
        except DamagedCheckpoint as e:
            damaged.append((p, str(e)))
            continue
        return p, damaged
    return None, damaged


def set_aside(ckpt_dir: Path, keep: Path | None) -> tuple[list[str], Path | None]:
    """Move the complete checkpoints newer than `keep` out of the way, to checkpoints/set-aside-<time>/, and
    point `latest` at `keep`. All of them move when `keep` is None or another run's checkpoint. Returns the
    names moved and where to."""
    ckpt_dir = Path(ckpt_dir)
    ours = keep is not None and keep.resolve().parent == ckpt_dir.resolve()
    found = complete_checkpoints(ckpt_dir)
    moved = [p for p in found if checkpoint_step(p) > checkpoint_step(keep)] if ours else found
    dest = None
    if moved:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = ckpt_dir / f"{SET_ASIDE}{stamp}", 1
        while dest.exists():
            dest, n = ckpt_dir / f"{SET_ASIDE}{stamp}-{n}", n + 1
        dest.mkdir()
        for p in moved:
            os.replace(p, dest / p.name)
        fsync_dir(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if ours:
        write_atomic(pointer, keep.name + "\n")
    elif pointer.exists():
        pointer.unlink()
    return [p.name for p in moved], dest


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint path or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    if is_complete(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a folder with a {MARKER} marker) found")
    return found


class RunLock:
    """An exclusive lock on a run folder, held by the main process for the run's life.

    `run.lock` carries a POSIX record lock (fcntl), which the kernel (or the NFS lock manager) releases when
    the holding process dies, so a lock left by a killed run is stale by construction, and forked children
    (data-loader workers) never hold it. The file also names the holder (host, pid, start time, command)
    for the message a second run gets. A requeued SLURM job (same SLURM_JOB_ID as the holder's) waits up to
    `requeue_wait_s` for its previous incarnation's lock to be released (a dead node's lock lease).
    """

    def __init__(self, run_dir: str | Path, requeue_wait_s: float = 120.0):
        self.path = Path(run_dir) / LOCK
        self.requeue_wait_s = requeue_wait_s
        self.fd: int | None = None

    @staticmethod
    def _holder(fd: int) -> dict[str, Any]:
        # Read through our descriptor: opening and closing another one would drop a POSIX lock we hold.
        try:
            holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:  # a holder killed while writing it
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> RunLock:
        """Take the lock or raise OutputError naming the holder's host and pid."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"run.dir {self.path.parent} is not writable ({e.strerror})") from None
        start = time.time()
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    self._without_locks(fd)
                    break
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
            holder = self._holder(fd)  # held by a live process
            job = os.environ.get("SLURM_JOB_ID")
            if job and holder.get("slurm_job_id") == job and time.time() - start < self.requeue_wait_s:
                time.sleep(1.0)
                continue
            os.close(fd)
            raise self._in_use(holder)
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def check_free(self) -> None:
        """OutputError naming the holder when a live process holds the lock; takes nothing (a dry run).

        Only for a process that does not hold this lock itself: closing any descriptor of the file drops
        the POSIX locks its process holds on it.
        """
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no lock file (never run), or unreadable (the writability checks say so)
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with a holder's exclusive lock
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise self._in_use(self._holder(fd)) from None
            # no locks on this file system: acquire() warns when the run starts
        finally:
            os.close(fd)

    def _in_use(self, holder: dict[str, Any]) -> OutputError:
        return OutputError(
            f"run.dir {self.path.parent} is in use by another run: pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')} (since {holder.get('started', '?')}); stop that run or give another "
            "run.dir"
        )

    def _without_locks(self, fd: int) -> None:
        """A file system without locks: refuse a live holder on this host, warn that others go unseen."""
        holder = self._holder(fd)
        if holder.get("host") == socket.gethostname() and holder.get("pid") not in (None, os.getpid()):
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                pass  # a dead holder's leftover file
            except PermissionError:  # alive, someone else's
                holder["alive"] = True
            else:
                holder["alive"] = True
            if holder.get("alive"):
                os.close(fd)
                raise self._in_use(holder)
        log.warning(
            "%s: the file system has no locks; a second run on this folder from another host would go unseen",
            self.path,
        )

    def release(self) -> None:
        """Give the lock up (emptying the holder's info first); also happens when the process ends."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
