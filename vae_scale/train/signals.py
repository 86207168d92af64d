"""Stop requests from outside: SIGTERM (SLURM's preemption and time limit, `kill`), SIGUSR1 (SLURM's
`--signal` warning) and SIGINT (Ctrl-C) set a flag that the trainer's ranks agree on at the end of the
step in flight, or before the next batch of an evaluation in progress, so that every rank saves the same
checkpoint soon after the signal and exits cleanly.
"""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or SIGINT (Ctrl-C); the ranks agree on it in the step in flight (or between
    two evaluation batches).

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
        """The signal's name (SIGTERM, ...), or "" when none has arrived."""
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def install(self) -> None:
        """Handle the stop signals from now on (in the main thread; elsewhere they stay as they were)."""
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding app): signals stay as they were
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        """Put back the handlers that install replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
