"""Run a module on the cores the scaling benchmark assigned to this process, then exec nothing else.

    PINNED_CORES="0;1" python -m benchmarks.pinned vae_scale train ...

PINNED_CORES lists one core set per local rank (`;` between ranks, `,` between the cores of one); the
process takes the set of its LOCAL_RANK (0 when there is none: a single process) with
os.sched_setaffinity, then runs the module as `python -m` would. torchrun starts this module in every
worker, so each rank is pinned before torch creates its threads.
"""

from __future__ import annotations

import os
import runpy
import sys


def cores_of(spec: str, local_rank: int) -> set[int]:
    """The core set of `local_rank` in a PINNED_CORES spec ("0,1;2,3": rank 0 on 0-1, rank 1 on 2-3)."""
    sets = [s for s in spec.split(";") if s]
    if local_rank >= len(sets):
        raise SystemExit(f"PINNED_CORES={spec!r} has no core set for local rank {local_rank}")
    return {int(c) for c in sets[local_rank].split(",")}


def pin() -> set[int]:
    """Pin this process to its core set from PINNED_CORES and LOCAL_RANK; returns the set."""
    cores = cores_of(os.environ["PINNED_CORES"], int(os.environ.get("LOCAL_RANK", "0")))
    os.sched_setaffinity(0, cores)
    return cores


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: PINNED_CORES=... python -m benchmarks.pinned MODULE [ARGS...]")
    pin()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
