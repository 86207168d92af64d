"""What the trainer draws its batches from: the interface the shard loader (loader.TrainLoader), the
synthetic loader (synthetic.SyntheticLoader) and a benchmark's fixed batches share.

    source: BatchSource = build_loader(cfg.data, cfg.train.seed, rank, world)   # train/build.py
    for batch in source:                       # endless; batch["images"]: float32 (B, C, H, W) in [-1, 1]
        ...
    state = source.state_dict()                # the position, saved per rank in a checkpoint
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class BatchSource(Protocol):
    """Endless, resumable training batches for one rank."""

    batches_per_epoch: int
    """Batches every rank draws per epoch (the same on every rank)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on: {"images": (B, C, H, W) in [-1, 1], "keys": [...]}."""
        ...

    def counters(self) -> dict[str, int]:
        """Samples delivered and bad samples skipped so far ("samples", "bad", "bad/<kind>", ...)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches consumed so far (JSON-serialisable)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position state_dict returned."""
        ...

    def close(self) -> None:
        """Stop any worker processes."""
        ...
