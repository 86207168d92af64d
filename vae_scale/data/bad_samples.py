"""Bad data, counted and reported in the main process from the tallies that come with each batch: the first
bad sample in full, a summary every data.log_bad_every, DataError naming the worst shards above
data.max_error_fraction.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from vae_scale.config import DataConfig
from vae_scale.data.decode import TOO_SMALL, too_small_remedy
from vae_scale.data.shard_reader import DataError

log = logging.getLogger("vae_scale.data.loader")  # the loader's warnings, under the loader's name

BAD_KINDS = (
    "undecodable",
    "empty",
    "no_image",
    "duplicate_key",
    "truncated_tar",
    "shard_unreadable",
)
"""Kinds of skipped data, as counted in `counters()` under "bad/<kind>"."""

# The error fraction is judged once this many samples are seen (and at each epoch end).
ERROR_CHECK_MIN_SAMPLES = 100


class BadLog:
    """Counters and bad-sample reporting in the main process, from the tallies that come with batches."""

    def __init__(self, cfg: DataConfig, what: str):
        self.cfg, self.what = cfg, what
        self.counts: Counter[str] = Counter()
        self.shards: Counter[str] = Counter()

    def add(self, meta: dict[str, Any]) -> None:
        bad, small = meta["bad"], meta["small"]
        before = self.counts["bad"]
        self.counts["samples"] += meta["samples"]
        if small["first"] and not self.counts[TOO_SMALL]:
            log.warning(
                "%s: skipped an image smaller than the %d px crop (%s); such images are counted as "
                "data/too_small, not as bad data. To train on them: %s",
                self.what,
                self.cfg.resolution,
                small["first"],
                too_small_remedy(self.cfg.resolution),
            )
        self.counts[TOO_SMALL] += sum(small["kinds"].values())
        for kind, n in bad["kinds"].items():
            self.counts[f"bad/{kind}"] += n
            self.counts["bad"] += n
        self.shards.update(bad["shards"])
        every = self.cfg.log_bad_every
        if before == 0 and bad["first"]:
            log.warning(
                "%s: skipped a bad sample (the first; a summary follows every %d): %s",
                self.what,
                every,
                bad["first"],
            )
        elif before // every != self.counts["bad"] // every:
            log.warning("%s: %s", self.what, self.summary())

    def read(self) -> int:
        """Samples read: delivered, bad and too small."""
        return self.counts["samples"] + self.counts["bad"] + self.counts[TOO_SMALL]

    def summary(self) -> str:
        bad, read = self.counts["bad"], self.read()
        kinds = ", ".join(f"{k} {self.counts[f'bad/{k}']}" for k in BAD_KINDS if self.counts[f"bad/{k}"])
        small = f"; {self.counts[TOO_SMALL]} smaller than the crop" if self.counts[TOO_SMALL] else ""
        return (
            f"skipped {bad} bad of {read} samples ({bad / max(read, 1):.1%}: {kinds}){small}; "
            f"worst shards: {self.worst()}"
        )

    def worst(self, n: int = 3) -> str:
        return ", ".join(f"{u} ({c} bad)" for u, c in self.shards.most_common(n)) or "none"

    def check(self, epoch_end: bool) -> None:
        bad, read = self.counts["bad"], self.read()
        if read >= ERROR_CHECK_MIN_SAMPLES or (epoch_end and read):
            if bad / read > self.cfg.max_error_fraction:
                raise DataError(
                    f"{self.what}: {bad} of {read} samples are bad ({bad / read:.1%} > "
                    f"data.max_error_fraction={self.cfg.max_error_fraction}); worst shards: "
                    f"{self.worst()}"
                )

    def counters(self) -> dict[str, int]:
        return {
            "samples": self.counts["samples"],
            "bad": self.counts["bad"],
            **{f"bad/{k}": self.counts[f"bad/{k}"] for k in BAD_KINDS},
            TOO_SMALL: self.counts[TOO_SMALL],
        }
