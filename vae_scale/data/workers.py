"""The loader's worker processes and the stop signals: a cluster signals every process of a job, and the
trainer, not a worker, must handle it. Workers start with the stop signals blocked and then ignore them;
they are stopped (killed if need be) when their iterator is closed or the process exits.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""What ends a run cleanly: the trainer handles them; loader workers ignore them."""


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: the stop signals are the trainer's (workers start with them blocked)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def _stop_signals_blocked():
    """Block the stop signals while workers are forked (they inherit the mask), deliver them afterwards."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_live_iterators: weakref.WeakSet = weakref.WeakSet()


def iterate(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """iter(loader), with workers that cannot be killed by a stop signal meant for the trainer."""
    with _stop_signals_blocked():
        it = iter(loader)
    if hasattr(it, "_shutdown_workers"):
        _live_iterators.add(it)
    return it


def stop_workers(it: Any) -> None:
    """Stop an iterator's workers now: asked to finish, then SIGKILL for one that does not (they ignore
    SIGTERM, which is what DataLoader and multiprocessing send)."""
    it._shutdown_workers()
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join()


@atexit.register  # runs before multiprocessing's own exit handler, which would wait on them forever
def _stop_all_workers() -> None:
    for it in list(_live_iterators):
        stop_workers(it)


def dataloader(dataset: IterableDataset, workers: int, persistent: bool, seed: int) -> DataLoader:
    """A DataLoader of ready batches (batch_size=None), in order, whose workers ignore the stop signals."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=persistent and workers > 0,
        prefetch_factor=2 if workers else None,
        in_order=True,
        worker_init_fn=_ignore_stop_signals if workers else None,
        # Its own generator: DataLoader would otherwise draw worker seeds from (and advance) the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )
