"""The evaluation pass that `vae-scale eval` (vae_scale/commands/evaluate.py) and the trainer's periodic
evaluation both run, over the registered metrics (vae_scale/eval/registry.py).

Images are in [-1, 1] everywhere in vae-scale; the reconstruction metrics compare the input with the
reconstruction from the posterior mean (clamped to [-1, 1]); bits/dim and KL are those of the VAE itself.
Each metric is a class in the module of its concern, registered by name:

- psnr, ssim, mse (always), lpips: vae_scale/eval/reconstruction.py
- bpd (and bpd_iw): vae_scale/eval/likelihood.py
- kl, active_units: vae_scale/eval/latent.py
- rfid, and its protocol and cached reference statistics: vae_scale/eval/rfid.py
- spectrum: vae_scale/eval/spectrum.py
- equivariance: vae_scale/eval/equivariance.py
- tile_consistency: vae_scale/eval/tile_consistency.py
- latent_drift (against a reference encoder): vae_scale/eval/drift.py
- flicker (clips: the error of the frame differences): vae_scale/eval/temporal.py
- fvd (clips, an I3D file on disk) and its protocol: vae_scale/eval/fvd.py

Clips: a batch may hold "clips" (n, 3, T, H, W) instead of "images"; the per-frame metrics fold the frames
into the batch and average each clip's frames (registry.Batch), so a clip counts once, whatever its T.

Exactness across processes: every metric is a sum over samples; each rank sums its own slice in float64
and `reduce` adds the ranks' sums once, at the end. The noise of the sampled latents is seeded by each
sample's key, so the stochastic metrics do not depend on how samples are dealt to ranks or batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from vae_scale.config import Config, EvalConfig

# The metric modules: importing each registers its metrics (a new metric module is added here).
from vae_scale.eval import (
    drift,
    equivariance,
    fvd,
    latent,
    likelihood,
    reconstruction,
    rfid,
    spectrum,
    temporal,
    tile_consistency,
)
from vae_scale.eval.drift import DriftReference
from vae_scale.eval.fvd import I3D_FILE, I3DFeatures, fvd_protocol, load_i3d
from vae_scale.eval.latent import ACTIVE_THRESHOLD, active_units, latent_stats
from vae_scale.eval.likelihood import has_likelihood, key_noise, log_likelihood
from vae_scale.eval.reconstruction import (
    bicubic_round_trip,
    compression,
    equal_values_clip_size,
    equal_values_size,
    load_lpips,
    psnr,
    ssim,
    trilinear_round_trip,
)
from vae_scale.eval.registry import METRICS as REGISTERED
from vae_scale.eval.registry import (
    Batch,
    EvalSetup,
    Metric,
    MetricError,
    Sums,
    check_metrics,
    metric_names,
)
from vae_scale.eval.rfid import (
    INCEPTION_FILE,
    InceptionFeatures,
    RFIDReference,
    find_inception,
    frechet_distance,
    load_inception,
)

__all__ = [  # the pass, and what callers of the pass import with it
    "ACTIVE_THRESHOLD",
    "I3D_FILE",
    "INCEPTION_FILE",
    "METRICS",
    "DriftReference",
    "EvaluationInterrupted",
    "I3DFeatures",
    "InceptionFeatures",
    "Lockstep",
    "MetricError",
    "RFIDReference",
    "active_units",
    "bicubic_round_trip",
    "check_metrics",
    "compression",
    "equal_values_clip_size",
    "equal_values_size",
    "evaluate",
    "find_inception",
    "frechet_distance",
    "fvd_protocol",
    "has_likelihood",
    "key_noise",
    "latent_stats",
    "load_eval_nets",
    "load_i3d",
    "load_inception",
    "load_lpips",
    "log_likelihood",
    "psnr",
    "ssim",
    "trilinear_round_trip",
]

METRIC_MODULES = (
    drift,
    equivariance,
    fvd,
    latent,
    likelihood,
    reconstruction,
    rfid,
    spectrum,
    temporal,
    tile_consistency,
)
"""The modules whose import registers the metrics."""

METRICS: tuple[str, ...] = tuple(metric_names())
"""The names eval.metrics / --metrics take, as registered."""


def identity(t: torch.Tensor) -> torch.Tensor:
    """The single-process `reduce`: the sums are already complete."""
    return t


def load_eval_nets(
    cfg: Config,
    metrics: Iterable[str] | None = None,
    *,
    lpips_path: str = "",
    vgg_path: str = "",
    inception_path: str = "",
    i3d_path: str = "",
) -> dict[str, nn.Module]:
    """The networks `evaluate` needs for `metrics` (default cfg.eval.metrics): {"lpips", "inception", "i3d"}.

    Call once at start, so missing weights stop a run before training (MetricError), then pass the dict
    to every `evaluate(..., **nets)` call. The path arguments override loss.lpips_path, loss.vgg_path,
    eval.inception_path and eval.i3d_path.
    """
    metrics = check_metrics(cfg.eval.metrics if metrics is None else metrics)
    nets: dict[str, nn.Module] = {}
    if "lpips" in metrics:
        nets["lpips"] = load_lpips(cfg.loss, lpips_path, vgg_path)
    if "rfid" in metrics:
        nets["inception"] = load_inception(inception_path or cfg.eval.inception_path)
    if "fvd" in metrics:
        nets["i3d"] = load_i3d(i3d_path or cfg.eval.i3d_path)
    return nets


# --------------------------------------------------------------------------------------------------------
# The evaluation pass


class _SumVector:
    """Every metric's named float64 sums in one fixed layout, so every rank builds the same vector for the
    one reduce."""

    def __init__(self, metrics: list[Metric], device: torch.device):
        self.parts: dict[str, torch.Tensor] = {
            "pass/samples": torch.zeros((), dtype=torch.float64, device=device)
        }
        for m in metrics:
            for name, shape in m.sums().items():
                self.parts[f"{m.name}/{name}"] = torch.zeros(shape, dtype=torch.float64, device=device)

    def of(self, metric: Metric) -> Sums:
        """The metric's own sums, by its names."""
        return Sums(self.parts, f"{metric.name}/")

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Every rank's sums added up (one call of `reduce`), as metric name -> its sums, on the CPU."""
        flat = torch.cat([t.reshape(-1) for t in self.parts.values()])
        total = reduce(flat).to(torch.float64).cpu()
        if total.shape != flat.shape:
            raise RuntimeError(f"reduce returned shape {tuple(total.shape)} for {tuple(flat.shape)}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        i = 0
        for key, t in self.parts.items():
            metric, name = key.split("/", 1)
            out.setdefault(metric, {})[name] = total[i : i + t.numel()].reshape(t.shape)
            i += t.numel()
        return out


class EvaluationInterrupted(Exception):
    """A stop request ended an evaluation between two batches (on every rank at the same batch under
    lockstep); nothing was reduced. `batches`: the batches this rank had evaluated."""

    def __init__(self, batches: int):
        super().__init__(f"evaluation interrupted by a stop request after {batches} batches")
        self.batches = batches


@dataclass
class Lockstep:
    """Ranks that take each evaluation batch together: before every batch one small all-reduce tells every
    rank whether any rank still has a batch and whether any rank was asked to stop.

    A sharded (FSDP) model needs it, since its every forward is a collective (a rank out of batches runs
    padding forwards until all are done); so does any multi-process evaluation a stop request may end:
    every rank must stop at the same batch, or one would wait in the final reduce for ranks that left.
    """

    agree: Callable[[bool, bool], tuple[bool, bool]]
    """(this rank has a batch, this rank was asked to stop) -> (any rank has one, any rank was asked)."""
    image_shape: tuple[int, ...] | None = None
    """(C, H, W) of the padding image, or (C, T, H, W) of the padding clip, of a rank that had no batch at
    all, for a sharded model; None: no padding forwards (a rank out of batches only takes part in the
    agreement)."""


def _in_step(
    batches: Iterable[dict[str, Any]],
    max_batches: int,
    lockstep: Lockstep | None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[dict[str, Any], bool]]:
    """(batch, real) pairs: this rank's batches (at most max_batches), then, under lockstep with an image
    shape, padding copies of its last batch (or a 1-image zero batch of that shape) until no rank has any
    left. EvaluationInterrupted before a batch when `stop` holds (on any rank, under lockstep)."""
    it = iter(batches)
    last: dict[str, Any] | None = None
    try:
        for i in itertools.count():
            batch = next(it, None) if not (max_batches and i >= max_batches) else None
            asked = stop is not None and stop()
            if lockstep is None:
                more = batch is not None
            else:
                more, asked = lockstep.agree(batch is not None, asked)
            if asked:
                raise EvaluationInterrupted(i)
            if not more:
                return
            if batch is not None:
                last = batch
                yield batch, True
            elif lockstep is not None and lockstep.image_shape is not None:
                shape = lockstep.image_shape
                kind = "clips" if len(shape) == 4 else "images"
                yield (last if last is not None else {kind: torch.zeros(1, *shape)}), False
    finally:
        close = getattr(it, "close", None)  # a loader's workers stop now, not at garbage collection
        if close is not None:
            close()


def check_applies(metrics: list[Metric], *, clips: bool) -> None:
    """MetricError naming the first metric that does not apply to this kind of batch (clips or images)."""
    for m in metrics:
        why = m.refuses_clips if clips else m.refuses_images
        if why:
            kind = "clips" if clips else "images"
            raise MetricError(f"metric {m.name} does not apply to {kind}: {why}")


@torch.no_grad()
def evaluate(
    vae,
    batches: Iterable[dict[str, Any]],
    *,
    metrics: list[str],
    device,
    reduce: Callable[[torch.Tensor], torch.Tensor] = identity,
    max_batches: int = 0,
    lockstep: Lockstep | None = None,
    stop: Callable[[], bool] | None = None,
    tiled: Any = False,
    seed: int = 0,
    criterion=None,
    iw: int = 0,
    baseline: bool = False,
    lpips: nn.Module | None = None,
    inception: nn.Module | None = None,
    i3d: nn.Module | None = None,
    config: EvalConfig | None = None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The registered `metrics` of `vae` over every sample of `batches`, the same on every rank.

    The pass: batches: dicts with "images" (n, 3, H, W) or "clips" (n, 3, T, H, W) in [-1, 1] and "count" n
    (optional "keys", which seed the latent noise); at most max_batches of them (0: all). A clip's per-frame
    figures (psnr, ssim, lpips) are means over its frames; a metric that does not apply to clips (rfid,
    equivariance, tile_consistency) or to images (flicker, fvd) is refused with a MetricError naming it.
    reduce: sums a 1-D float64 tensor across ranks (an all-reduce; identity in one process), called exactly
    once with every metric's sums stacked.
    lockstep: ranks that take each batch together (see Lockstep): for a sharded (FSDP) model a rank out of
    batches runs padding batches (the same forwards, counted nowhere) until every rank is done. stop: asked
    before each batch whether a stop was requested; when it was (on any rank, under lockstep),
    EvaluationInterrupted, on every rank at the same batch, and nothing is reduced. tiled: True or a
    model.Tiling encodes and decodes images larger than a tile tile by tile (batches may then hold images
    of any size, e.g. one native-size image each).

    What metrics read (EvalSetup): seed: of the latent noise. criterion: the run's VAELoss, whose learned
    likelihood scale bpd uses (None or l1/l2: the fitted Gaussian). iw: K importance samples for bpd_iw
    (needs a learned likelihood; adds bpd). baseline: psnr also measures bicubic through a thumbnail that
    keeps at least the latent's numbers (adds psnr); for clips trilinear through a thumbnail clip, which
    flicker scores too. lpips / inception / i3d: the networks of lpips, rfid and fvd (load_eval_nets); lpips
    falls back to criterion.perceptual. config: the eval section (the options of
    tile_consistency). inputs: further inputs by metric name (rfid: an RFIDReference; latent_drift: a
    DriftReference).

    Returns floats: samples, mse (always), and each asked metric's figures (see its class).
    """
    metrics = check_metrics(metrics)
    if iw and "bpd" not in metrics:
        metrics.append("bpd")
    if baseline and "psnr" not in metrics:
        metrics.append("psnr")
    device = torch.device(device)
    nets = {k: v for k, v in (("lpips", lpips), ("inception", inception), ("i3d", i3d)) if v is not None}
    setup = EvalSetup(
        vae,
        device,
        tiled=tiled,
        seed=seed,
        criterion=criterion,
        iw=iw,
        nets=nets,
        baseline=baseline,
        config=config if config is not None else EvalConfig(),
        inputs=dict(inputs or {}),
    )
    chosen = [cls(setup) for name, cls in REGISTERED.items() if cls.always or name in metrics]
    kept = sums = _SumVector(chosen, device)

    was_training = vae.training
    vae.eval()
    seen = 0
    try:
        for batch, real in _in_step(batches, max_batches, lockstep, stop):
            samples = batch["clips"] if "clips" in batch else batch["images"]
            n = int(batch.get("count", len(samples)))
            if n == 0:
                continue
            x = samples[:n].to(device, non_blocking=True).float()
            check_applies(chosen, clips=x.ndim == 5)
            keys = list(batch["keys"][:n]) if batch.get("keys") is not None else None
            # a padding batch: the same forwards, into sums that are dropped
            sums = kept if real else _SumVector(chosen, device)
            sums.parts["pass/samples"] += n
            evaluated = Batch(setup, x, keys, seen)
            for m in chosen:
                m.accumulate(evaluated, sums.of(m))
            if real:
                seen += n
    finally:
        vae.train(was_training)

    total = kept.reduced(reduce)  # the one collective: every rank's sums, stacked, added up
    n = float(total["pass"]["samples"])
    if n == 0:
        raise MetricError("no samples to evaluate (empty data on every rank)")
    out: dict[str, float] = {"samples": n}
    for m in chosen:
        out.update(m.figures(total.get(m.name, {}), n))
    return out
