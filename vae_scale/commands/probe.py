"""`vae-scale probe`: how easily a diffusion model learns an autoencoder's latents, measured directly with a
short, fixed training budget that is the same for every autoencoder compared (its flags:
vae_scale/cli/probe.py; the guide: docs/diffusability.md).

    vae-scale encode --ckpt runs/a --data shards/ --out latents/a     # and the same for b
    vae-scale probe latents/a latents/b --names a b --seeds 3 --steps 2000 --out probe/

For each latent set (written by `vae-scale encode`: per-sample .safetensors or .npy latents in tar shards) the
probe trains a small unconditional SiT (vae_scale/eval/sit.py) with flow matching: x_t = (1 - t) x0 + t eps,
the model regresses the velocity eps - x0, t drawn logit-normal (sigmoid of a standard normal, as SD3 and
LightningDiT; uniform on request). Latents are standardised per channel with the mean and standard deviation
of the probe's own training latents: autoencoders differ in latent scale by orders of magnitude, and at a
fixed noise schedule the scale alone decides the signal-to-noise ratio at every t, so without it the probe
would compare scales, not how learnable the latents are.

Held-out latents (a separate folder per autoencoder, or a fixed share of the keys chosen by a hash of the
key, so the same images are held out for every autoencoder encoded from the same data) are scored with the
flow-matching loss at fixed times VAL_TIMES and with fixed noise: each held-out sample's noise is seeded by
its key, so every autoencoder and every seed sees the same noise for latents of one shape. The validation
loss is the mean over those times. With a TorchScript Inception and each autoencoder's VAE, the probe also
reports FID of decoded samples (Euler sampler) against held-out images, with vae_scale.eval.metrics' Inception
features and Frechet distance.

Several seeds (each seeds the model's initialisation, the batch order and the training noise) give each
figure's mean, standard deviation (over seeds, n - 1 in the denominator) and range. The output folder holds
probe.json (everything, budget included), probe.md (the table) and probe.svg (the curves side by side).
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from webdataset.tariterators import base_plus_ext

from vae_scale.commands.common import InputError
from vae_scale.commands.generate import LATENT_FORMATS, read_latent
from vae_scale.data.shard_reader import DataError, describe_error, expand_shards, open_shard
from vae_scale.eval.metrics import frechet_distance, key_noise
from vae_scale.eval.sit import SiT

VAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
"""The times at which held-out latents are scored: low t is nearly clean (fine detail), high t nearly noise
(global layout)."""
NOISE_SEED = 20240917
"""Seeds the held-out noise and the FID sampler's starting noise: fixed, never a run's seed, so that every
autoencoder and every seed of the probe is scored against the same draws."""
TIME_SAMPLING = ("logit-normal", "uniform")
STD_FLOOR = 1e-6
"""A latent channel whose standard deviation is below this (a dead channel) is divided by this instead."""


@dataclass(frozen=True)
class ProbeBudget:
    """The probe's fixed budget: identical for every autoencoder compared, and recorded in the output."""

    steps: int = 2000
    """Optimizer steps per seed."""
    batch_size: int = 128
    """Latents per step."""
    width: int = 384
    """Transformer width (SiT-S's)."""
    depth: int = 6
    """Transformer blocks (half of SiT-S's twelve: a probe, not a generator)."""
    heads: int = 6
    """Attention heads."""
    patch_size: int = 2
    """Latent patch side (SiT's /2); must divide the latent's height and width."""
    lr: float = 2e-4
    """AdamW learning rate, constant, betas (0.9, 0.999), no weight decay (DiT/SiT's, doubled for the short
    budget)."""
    grad_clip: float = 1.0
    """Gradient norm clip (0: none)."""
    time_sampling: str = "logit-normal"
    """Training times: logit-normal (sigmoid of N(0, 1)) or uniform on [0, 1]."""
    evals: int = 4
    """Held-out evaluations after the one at initialisation, evenly spaced: the learning curve."""
    val_samples: int = 1024
    """At most this many held-out latents (the first in key order)."""

    def check(self) -> None:
        """ValueError naming the first field out of range."""
        for name in ("steps", "batch_size", "width", "depth", "heads", "patch_size", "evals", "val_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.time_sampling not in TIME_SAMPLING:
            raise ValueError(
                f"time_sampling must be one of {', '.join(TIME_SAMPLING)}, got {self.time_sampling}"
            )
        if self.width % self.heads or self.width % 4:
            raise ValueError(f"width {self.width} must be a multiple of 4 and of heads {self.heads}")


# --------------------------------------------------------------------------------------------------------
# Latents


@dataclass
class LatentSet:
    """Latents of one autoencoder as `vae-scale encode` wrote them, in key order."""

    source: str
    keys: list[str]
    latents: torch.Tensor  # (N, C, h, w) float32
    index: dict[str, Any] = field(default_factory=dict)
    """The "latent" and "source" sections of the folder's index.json (format, kind, model), when found."""

    def subset(self, keep: list[int]) -> LatentSet:
        return LatentSet(self.source, [self.keys[i] for i in keep], self.latents[keep], self.index)


def read_latents(spec: str, what: str = "latents") -> LatentSet:
    """Every latent of the shards `spec` names (a folder written by `vae-scale encode`, a brace pattern, a
    list), sorted by key so that how encode dealt samples to processes and shards does not matter.

    DataError naming `what` and the offender: no shards, no latents, a key seen twice, or latents of more
    than one shape (the probe's model has one; encode with --shape square).
    """
    try:
        urls = expand_shards(spec, "train")
    except DataError as e:
        raise DataError(f"{what} {spec}: {e}") from None
    folder = Path(spec) if Path(spec).is_dir() else Path(urls[0]).parent
    try:  # what encode recorded: the latent format, and which model wrote them
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        index = {}
    fmt = index.get("latent", {}).get("format")
    found: dict[str, torch.Tensor] = {}
    for url in urls:
        try:
            with open_shard(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if not member.isreg() or key is None or ext not in ((fmt,) if fmt else LATENT_FORMATS):
                        continue
                    if key in found:
                        raise DataError(f"{what} {spec}: key {key!r} appears twice ({url})")
                    found[key] = read_latent(tar.extractfile(member).read(), ext).float()
        except DataError:
            raise
        except Exception as e:  # a damaged tar or latent member (safetensors and numpy raise their own)
            raise DataError(f"{what} {spec}: {url} cannot be read ({describe_error(e)})") from None
    if not found:
        raise DataError(f"{what} {spec}: no .safetensors or .npy latents in {len(urls)} shard(s)")
    keys = sorted(found)
    shapes = {tuple(found[k].shape) for k in keys}
    if len(shapes) > 1:
        listed = ", ".join("x".join(map(str, s)) for s in sorted(shapes)[:4])
        raise DataError(
            f"{what} {spec}: latents of {len(shapes)} shapes ({listed}); the probe needs one "
            "(encode with --shape square)"
        )
    kept = {k: index[k] for k in ("latent", "source") if k in index}
    return LatentSet(spec, keys, torch.stack([found[k] for k in keys]), kept)


def heldout_by_key(keys: list[str], fraction: float) -> list[bool]:
    """Whether each key is held out: a hash of the key below `fraction`, so the same images are held out
    for every autoencoder encoded from the same data, whatever the order or sharding."""
    return [
        int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") < fraction * 2**64
        for k in keys
    ]


def split_latents(
    latents: LatentSet, val: LatentSet | None, fraction: float, val_samples: int
) -> tuple[LatentSet, LatentSet]:
    """(training, held-out) latents: `val` when given, else the keys heldout_by_key picks; at most
    `val_samples` held out (the first in key order). DataError when either side is empty."""
    if val is None:
        out = heldout_by_key(latents.keys, fraction)
        train = latents.subset([i for i, o in enumerate(out) if not o])
        val = latents.subset([i for i, o in enumerate(out) if o])
    else:
        train = latents
        if val.latents.shape[1:] != train.latents.shape[1:]:
            raise DataError(
                f"held-out latents {val.source} are {tuple(val.latents.shape[1:])}, the training "
                f"latents {train.source} {tuple(train.latents.shape[1:])}"
            )
    val = val.subset(list(range(min(len(val.keys), val_samples))))
    for name, part in (("training", train), ("held-out", val)):
        if not part.keys:
            raise DataError(
                f"{latents.source}: no {name} latents ({len(latents.keys)} latents, held-out "
                f"share {fraction:g}); give more latents or another share"
            )
    return train, val


@dataclass(frozen=True)
class Standardisation:
    """Per-channel mean and standard deviation of the training latents (float64), applied to every split."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)

    @classmethod
    def of(cls, latents: torch.Tensor) -> Standardisation:
        z = latents.double()
        return cls(z.mean((0, 2, 3)), z.std((0, 2, 3), correction=0).clamp_min(STD_FLOOR))

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """(z - mean) / std per channel, computed in float64, returned in float32."""
        return ((latents.double() - self.mean[:, None, None]) / self.std[:, None, None]).float()

    def invert(self, latents: torch.Tensor) -> torch.Tensor:
        """The autoencoder's own scale back: z * std + mean per channel."""
        z = latents.double().cpu() * self.std[:, None, None] + self.mean[:, None, None]
        return z.float()


# --------------------------------------------------------------------------------------------------------
# Training and scoring one probe


def flow_loss(model: SiT, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss per sample (B,): mean squared error of the predicted velocity against eps - x0 at
    x_t = (1 - t) x0 + t eps."""
    tb = t.view(-1, 1, 1, 1)
    v = model((1 - tb) * x0 + tb * eps, t)
    return (v.float() - (eps - x0)).square().flatten(1).mean(1)


def heldout_noise(keys: list[str], shape: tuple[int, ...]) -> torch.Tensor:
    """(len(VAL_TIMES), N, C, h, w): each held-out sample's noise at each validation time, seeded by its key
    and NOISE_SEED only."""
    return torch.stack(
        [key_noise(keys, (len(keys), *shape), NOISE_SEED, k, 0) for k in range(len(VAL_TIMES))]
    )


@torch.no_grad()
def heldout_loss(model: SiT, val: torch.Tensor, noise: torch.Tensor, batch: int, device) -> list[float]:
    """The flow-matching loss of the held-out latents at each of VAL_TIMES, with `noise` (heldout_noise)."""
    model.eval()
    out = []
    for k, t in enumerate(VAL_TIMES):
        total = 0.0
        for i in range(0, len(val), batch):
            x0 = val[i : i + batch].to(device)
            tt = torch.full((len(x0),), t, device=device)
            total += float(flow_loss(model, x0, tt, noise[k, i : i + batch].to(device)).double().sum())
        out.append(total / len(val))
    model.train()
    return out


def train_probe(
    train: torch.Tensor,
    val: torch.Tensor,
    noise: torch.Tensor,
    budget: ProbeBudget,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[SiT, dict[str, Any]]:
    """Train one SiT on standardised latents `train` (N, C, h, w) for budget.steps; score `val` with `noise`
    at initialisation and budget.evals times after. Returns (model, figures).

    Every random draw (initialisation, batch order, times, noise) comes from CPU generators seeded by
    `seed`, so a seed gives the same draws on any device.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiT(tuple(train.shape[1:]), budget.width, budget.depth, budget.heads, budget.patch_size)
    start = time.perf_counter()
    train = train.to(device)  # once: the probe holds every latent in memory anyway
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    at = sorted({round(k * budget.steps / budget.evals) for k in range(1, budget.evals + 1)})
    curve = [(0, heldout_loss(model, val, noise, budget.batch_size, device))]
    order, pos, recent = torch.randperm(len(train), generator=g), 0, []
    for step in range(1, budget.steps + 1):
        if pos + budget.batch_size > len(order):  # a new epoch: reshuffled, a short tail dropped
            order, pos = torch.randperm(len(train), generator=g), 0
        idx = order[pos : pos + budget.batch_size]
        pos += budget.batch_size
        n = len(idx)
        draw = torch.randn(n, generator=g)
        t = torch.sigmoid(draw) if budget.time_sampling == "logit-normal" else torch.rand(n, generator=g)
        eps = torch.randn(n, *train.shape[1:], generator=g)
        loss = flow_loss(model, train[idx.to(train.device)], t.to(device), eps.to(device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if budget.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), budget.grad_clip)
        opt.step()
        recent = (recent + [loss.detach()])[-50:]  # no host sync per step
        if step in at:
            curve.append((step, heldout_loss(model, val, noise, budget.batch_size, device)))
    seconds = time.perf_counter() - start
    final = curve[-1][1]
    figures = {
        "seed": seed,
        "val_loss": sum(final) / len(final),
        "val_loss_t": dict(zip(map(str, VAL_TIMES), final)),
        "val_loss_init": sum(curve[0][1]) / len(curve[0][1]),
        "train_loss": float(torch.stack(recent).mean()),
        "curve": [[s, sum(v) / len(v)] for s, v in curve],
        "seconds": seconds,
    }
    return model, figures


@torch.no_grad()
def sample_latents(model: SiT, noise: torch.Tensor, steps: int, batch: int, device) -> torch.Tensor:
    """Euler integration of the learned flow from noise (t = 1) to data (t = 0) in `steps` equal steps:
    x <- x - dt v(x, t). Returns standardised latents on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(noise), batch):
        x = noise[i : i + batch].to(device)
        for k in range(steps, 0, -1):
            t = torch.full((len(x),), k / steps, device=device)
            x = x - model(x, t).float() / steps
        out.append(x.cpu())
    model.train()
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------
# FID of decoded samples (optional)


@dataclass
class FidSetup:
    """What FID needs: the Inception features (metrics.InceptionFeatures), and per autoencoder its VAE to
    decode with and the (mean, covariance) of the held-out images' features at its resolution; the samples
    to draw and the sampler's steps."""

    inception: Any
    vaes: list[Any]
    real: list[tuple[torch.Tensor, torch.Tensor]]
    samples: int = 1000
    sampler_steps: int = 50


def feature_stats(features: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (n - 1) of (n, D) feature batches, in float64."""
    f = torch.cat([x.double().cpu() for x in features])
    mean = f.mean(0)
    return mean, (f - mean).T @ (f - mean) / max(len(f) - 1, 1)


@torch.no_grad()
def image_stats(inception, batches: Iterable[dict[str, Any]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """feature_stats of the images of `batches` (dicts with "images" in [-1, 1] and "count")."""
    return feature_stats(inception(b["images"][: b["count"]].to(device)) for b in batches)


@torch.no_grad()
def sample_fid(model: SiT, std: Standardisation, i: int, fid: FidSetup, batch: int, device) -> float:
    """FID of fid.samples decoded samples of `model` (autoencoder i's) against the held-out images."""
    vae = fid.vaes[i]
    shape = model.latent_shape
    noise = key_noise(None, (fid.samples, *shape), NOISE_SEED, len(VAL_TIMES), 0)
    z = std.invert(sample_latents(model, noise, fid.sampler_steps, batch, device))
    vae.to(device).eval()
    feats = []
    for i in range(0, len(z), batch):
        images = vae.decode(z[i : i + batch].to(device)).float().clamp(-1, 1)
        feats.append(fid.inception(images))
    mean, cov = feature_stats(feats)
    return frechet_distance(mean, cov, *fid.real[i])


# --------------------------------------------------------------------------------------------------------
# The comparison


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (over seeds, n - 1 in the denominator; 0 for one seed), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def probe(
    sets: list[tuple[LatentSet, LatentSet | None]],
    names: list[str],
    budget: ProbeBudget,
    seeds: list[int],
    *,
    val_fraction: float = 0.1,
    device: torch.device | str = "cpu",
    fid: FidSetup | None = None,
    on_run: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The probe of every (latents, held-out latents or None) in `sets`, under one budget and seeds.

    Held-out latents None: the share `val_fraction` of the keys (heldout_by_key). fid: also FID per seed.
    on_run(name, figures) is called after each seed's run (progress lines). Returns the report that
    write_report writes.
    """
    budget.check()
    if len(names) != len(sets) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct name per latent set, got {names} for {len(sets)} sets")
    rows = []
    for i, (name, (latents, val_set)) in enumerate(zip(names, sets)):
        train, val = split_latents(latents, val_set, val_fraction, budget.val_samples)
        _, h, w = train.latents.shape[1:]
        if h % budget.patch_size or w % budget.patch_size:
            raise InputError(
                f"--patch-size {budget.patch_size}: latents {latents.source} are {h}x{w}, not a "
                "whole number of patches"
            )
        std = Standardisation.of(train.latents)
        x_train, x_val = std.apply(train.latents), std.apply(val.latents)
        noise = heldout_noise(val.keys, tuple(x_val.shape[1:]))
        runs = []
        for seed in seeds:
            model, figures = train_probe(x_train, x_val, noise, budget, seed, device)
            if fid is not None:
                figures["fid"] = sample_fid(model, std, i, fid, budget.batch_size, device)
            runs.append(figures)
            if on_run is not None:
                on_run(name, figures)
        metrics = ["val_loss", "val_loss_init", "train_loss", "seconds"] + (["fid"] if fid else [])
        summary = {m: spread([r[m] for r in runs]) for m in metrics}
        summary["val_loss_t"] = {t: spread([r["val_loss_t"][t] for r in runs]) for t in runs[0]["val_loss_t"]}
        rows.append(
            {
                "name": name,
                "latents": latents.source,
                "heldout": val_set.source if val_set is not None else f"{val_fraction:g} of the keys",
                "latent_shape": list(x_train.shape[1:]),
                "train_samples": len(train.keys),
                "val_samples": len(val.keys),
                "heldout_keys": hashlib.blake2b("\n".join(val.keys).encode(), digest_size=8).hexdigest(),
                "standardisation": {"mean": std.mean.tolist(), "std": std.std.tolist()},
                "index": latents.index,
                "runs": runs,
                "summary": summary,
            }
        )
    return {
        "budget": {
            **asdict(budget),
            "seeds": list(seeds),
            "val_times": list(VAL_TIMES),
            "noise_seed": NOISE_SEED,
            "val_fraction": val_fraction,
            "optimizer": "AdamW betas (0.9, 0.999), weight decay 0, constant lr",
            "fid_samples": fid.samples if fid else None,
            "fid_sampler_steps": fid.sampler_steps if fid else None,
        },
        "device": str(device) if torch.device(device).type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "autoencoders": rows,
    }
