"""The metric registry: a metric is one class, registered by name, that says what it sums per batch, what it
reports from the sums, and how its figures read in `vae-scale eval`'s table.

    @register_metric("psnr")
    class PSNR(Metric):
        higher_is_better = True
        table_position = 10

        def sums(self):                       # name -> shape of a float64 sum
            return {"psnr": ()}

        def accumulate(self, batch, sums):    # add this rank's batch into the sums, in place
            sums["psnr"] += psnr(batch.reconstruction, batch.images).double().sum()

        def figures(self, total, samples):    # the sums of every rank -> the reported figures
            return {"psnr": float(total["psnr"]) / samples}

        @classmethod
        def rows(cls, results, info):         # the table rows of these figures (when present)
            return [("PSNR (dB)", f"{results['psnr']:.2f}")] if "psnr" in results else []

Every sum is per sample, in float64; the evaluation pass (vae_scale/eval/metrics.py) keeps each metric's sums
apart, stacks every metric's into one vector and reduces it once across ranks, so a metric that only adds
per-sample terms is exact across processes and batch sizes by construction. A metric's figures are computed
from the reduced sums alone.

Clips: a batch of clips (n, 3, T, H, W) is one Batch of n samples. A per-frame metric scores
`batch.frame_reconstruction` against `batch.frame_images` (the frames folded into the batch) and adds
`batch.per_sample(values)`, each clip's mean over its frames, so a clip counts once whatever its T. A metric
that has no meaning for clips (or for images) says why in `refuses_clips` (`refuses_images`), and the pass
refuses such a batch with a MetricError that names it.

Adding a metric: one module (or a section of the module of its concern) with the class, its import in
vae_scale/eval/metrics.py (which imports every metric module, so the registry is complete wherever the pass
is), its name in EvalConfig.METRICS (config.py is below eval/ and validates `eval.metrics` against that list;
tests/test_metric_registry.py checks the two agree), and a test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn as nn

from vae_scale.config import EvalConfig


class MetricError(ValueError):
    """A metric that cannot be computed as asked (unknown name, weights not on disk); the message says why."""


# --------------------------------------------------------------------------------------------------------
# What a metric sees


@dataclass
class EvalSetup:
    """What stays fixed over one evaluation pass, for every metric to read: the model, where it runs, how, and
    the networks and options some metrics need."""

    vae: Any
    """The VAE (the model interface: encode, decode, config)."""
    device: torch.device
    tiled: Any = False
    """True or a models.tiling.Tiling: the pass encodes and decodes images larger than a tile tile by tile."""
    seed: int = 0
    """Of the sampled latents' noise (each sample's seeded by its key)."""
    criterion: Any = None
    """The run's VAELoss (its learned likelihood scale), or None."""
    iw: int = 0
    """Importance samples for bpd_iw."""
    nets: dict[str, nn.Module] = field(default_factory=dict)
    """Networks of the network metrics ("lpips", "inception"), on `device`."""
    baseline: bool = False
    """psnr also measures bicubic through a thumbnail of at least the latent's numbers."""
    config: EvalConfig = field(default_factory=EvalConfig)
    """The eval section: the options of the metrics that have some (tile_consistency)."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """Further inputs by metric name, for the metric of that name (rfid: an RFIDReference)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The pass's decode (tiled as the pass is), float32."""
        return (self.vae.decode(z, tiled=self.tiled) if self.tiled else self.vae.decode(z)).float()


class Batch:
    """One evaluated batch, as every metric reads it; what several metrics share is computed once.

    images: the samples as the model encodes them, float32 in [-1, 1] on the pass's device: images
    (n, 3, H, W), or clips (n, 3, T, H, W) (`is_clip`); keys: the samples' keys (seed their latent noise) or
    None; first: how many real samples this rank evaluated before this batch.

    A per-frame metric reads `frame_images` and `frame_reconstruction` (a clip's frames folded into the batch,
    (n * T, 3, H, W); the images themselves for an image batch) and averages its per-frame values over each
    clip's frames with `per_sample`.
    """

    def __init__(self, setup: EvalSetup, images: torch.Tensor, keys: list[str] | None, first: int):
        self.setup, self.images, self.keys, self.first = setup, images, keys, first
        vae = setup.vae
        self.posterior = vae.encode(images, tiled=setup.tiled) if setup.tiled else vae.encode(images)
        self._shared: dict[str, Any] = {}

    @property
    def n(self) -> int:
        """Samples in the batch."""
        return self.images.shape[0]

    @property
    def is_clip(self) -> bool:
        """Whether the samples are clips (n, 3, T, H, W), of any T (a one-frame clip included)."""
        return self.images.ndim == 5

    @property
    def frames(self) -> int:
        """Frames per sample: T of a clip, 1 for an image."""
        return self.images.shape[2] if self.is_clip else 1

    @cached_property
    def frame_images(self) -> torch.Tensor:
        """The input's frames (n * T, 3, H, W), clip by clip (the images themselves for an image batch)."""
        return fold_frames(self.images)

    @cached_property
    def frame_reconstruction(self) -> torch.Tensor:
        """The reconstruction's frames (n * T, 3, H, W), in the order of frame_images."""
        return fold_frames(self.reconstruction)

    def per_sample(self, per_frame: torch.Tensor) -> torch.Tensor:
        """Per-frame values (n * T,) -> each sample's mean over its frames (n,), float64."""
        return per_frame.double().view(self.n, self.frames).mean(1)

    def shared(self, name: str, compute: Callable[[], Any]) -> Any:
        """What several metrics use of this batch (e.g. a baseline's reconstruction), computed once."""
        if name not in self._shared:
            self._shared[name] = compute()
        return self._shared[name]

    @cached_property
    def mean(self) -> torch.Tensor:
        """The posterior mean (n, C, h, w), float32."""
        return self.posterior.mean.float()

    @cached_property
    def logvar(self) -> torch.Tensor:
        """The posterior log-variance (n, C, h, w), float32."""
        return self.posterior.logvar.float()

    @cached_property
    def latent(self) -> torch.Tensor:
        """The posterior mode, the latent every reconstruction metric decodes."""
        return self.posterior.mode()

    @cached_property
    def reconstruction(self) -> torch.Tensor:
        """decode(posterior mode), float32, clamped to [-1, 1]."""
        return self.setup.decode(self.latent).clamp(-1, 1)

    @cached_property
    def kl_per_channel(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample and latent channel (n, C), float64, nats."""
        return self.posterior.kl_per_channel().double()


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """Clips (n, C, T, H, W) -> their frames (n * T, C, H, W), clip by clip; images (n, C, H, W) as is."""
    if x.ndim == 4:
        return x
    n, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w)


class Sums:
    """A metric's float64 sums, by its own names; `sums[k] += t` adds in place into the pass's vector."""

    def __init__(self, parts: dict[str, torch.Tensor], prefix: str):
        self._parts, self._prefix = parts, prefix

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._parts[self._prefix + name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:  # `sums[k] += v` lands here, in place
        self._parts[self._prefix + name] = value


@dataclass(frozen=True)
class TableInfo:
    """What the table knows besides the figures: the likelihood of bits/dim, the latent channels, K of bpd_iw,
    and how metrics were measured (metric name -> one line, e.g. rFID's protocol)."""

    likelihood: str = ""
    latent_channels: int | None = None
    iw: int = 0
    protocols: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# The metric interface


class Metric:
    """One metric: its per-batch sums, its figures, its table rows (see the module docstring).

    A metric is built once per pass from the EvalSetup (raise MetricError there when it cannot run: a network
    or an option missing). `name` is the registered name, set by register_metric.
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool | None] = None
    """The direction of the metric's headline figure (None: neither, a description such as a spectrum)."""
    table_position: ClassVar[float] = 1000.0
    """Where its rows go in the table, among the other metrics' (smaller first)."""
    note_position: ClassVar[float | None] = None
    """Where its lines below the table go (default: table_position)."""
    always: ClassVar[bool] = False
    """Part of every pass, whatever was asked (mse)."""
    refuses_clips: ClassVar[str] = ""
    """Why the metric does not apply to clip batches ("": it does); the pass refuses a clip batch with it."""
    refuses_images: ClassVar[str] = ""
    """Why the metric does not apply to image batches ("": it does)."""

    def __init__(self, setup: EvalSetup):
        self.setup = setup

    def sums(self) -> dict[str, tuple[int, ...]]:
        """The float64 sums it keeps: name -> shape."""
        return {}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        """Add the batch's terms into `sums` in place."""

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        """The reported figures from the sums of every rank (float64, on the CPU) and the sample count."""
        return {}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        """(label, value) table rows for its figures in `results`; [] when they are absent."""
        return []

    @classmethod
    def notes(cls, results: dict[str, float], info: TableInfo) -> list[str]:
        """Lines printed below the table (each after an empty line); [] when none."""
        return []


METRICS: dict[str, type[Metric]] = {}
"""The registered metrics by name, in registration order."""


def register_metric(name: str) -> Callable[[type[Metric]], type[Metric]]:
    """Class decorator: register a Metric subclass under `name` (ValueError when the name is taken)."""

    def add(cls: type[Metric]) -> type[Metric]:
        if name in METRICS and METRICS[name] is not cls:
            raise ValueError(
                f"metric {name!r} is registered twice ({METRICS[name].__name__}, {cls.__name__})"
            )
        cls.name = name
        METRICS[name] = cls
        return cls

    return add


def metric_names() -> list[str]:
    """The names `eval.metrics` / `--metrics` take (the always-on ones left out), in table order."""
    return [cls.name for cls in by_table_position() if not cls.always]


def check_metrics(metrics: Any) -> list[str]:
    """Metric names (also comma-separated), deduplicated in order; MetricError naming an unknown one."""
    out: list[str] = []
    for m in metrics:
        for name in str(m).split(","):
            name = name.strip()
            if not name:
                continue
            if name not in metric_names():
                raise MetricError(f"unknown metric {name!r}; metrics: {' '.join(metric_names())}")
            if name not in out:
                out.append(name)
    return out


def indexed(results: dict[str, float], prefix: str) -> list[float]:
    """The values of prefix<i> keys in the order of i (per-channel or per-bin figures, for table rows)."""
    keys = [k for k in results if k.startswith(prefix) and k[len(prefix) :].isdigit()]
    return [results[k] for k in sorted(keys, key=lambda k: int(k[len(prefix) :]))]


def by_table_position() -> list[type[Metric]]:
    """Every registered metric in the order of its table rows."""
    return sorted(METRICS.values(), key=lambda cls: cls.table_position)


def by_note_position() -> list[type[Metric]]:
    """Every registered metric in the order of its lines below the table."""
    return sorted(
        METRICS.values(),
        key=lambda cls: cls.table_position if cls.note_position is None else cls.note_position,
    )
