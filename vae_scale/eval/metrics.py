"""Reconstruction metrics and the evaluation pass that `vae-scale eval` (vae_scale/commands/evaluate.py) and
the trainer's periodic evaluation both run.

Images are in [-1, 1] everywhere in vae-scale; PSNR, SSIM, LPIPS and rFID compare the input with the
reconstruction from the posterior mean (clamped to [-1, 1]); bits/dim and KL are those of the VAE itself.

- psnr: dB per image on the [0, 1] scale (peak 1), averaged over images.
- ssim: scikit-image's `structural_similarity(a, b, data_range=1, channel_axis=-1)` with its defaults (7x7
  uniform window, K1 0.01, K2 0.03, sample covariance, border of 3 px left out), averaged over channels and
  images. torchmetrics' SSIM with a 7x7 uniform window differs from it by ~1e-3 (population covariance,
  reflect-padded border), so it is written here, in float64, and tested against scikit-image.
- bpd: the negative ELBO in bits per dimension of the 8-bit images, -(E_q log p(x|z) - KL) / (3HW ln 2),
  with one reparameterised sample per image, under the run's likelihood: loss.recon=logistic (discretised
  logistic, learned log-scale) or gaussian (learned variance; a density on [-1, 1] becomes a bin
  probability by the bin width 2/255). Runs trained with l1/l2 have no likelihood: theirs is a Gaussian
  whose single variance is the maximum-likelihood one on the evaluated images (sigma^2 = MSE of the
  sampled reconstructions), an optimistic bound. `iw=K` adds `bpd_iw`, the importance-weighted bound of
  Burda et al.: log p(x) >= E log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), which tightens with K.
- kl: KL(q(z|x) || N(0, I)) in nats per image, and per latent channel (`kl_channel/<c>`).
- active_units: latent channels whose posterior mean varies across images, Var(E_q[z_c]) > 0.01 (Burda et
  al.'s A_u; for convolutional latents pooled over positions, which are close to stationary).
- lpips: LPIPS-VGG v0.1 (vae_scale.eval.lpips.LPIPS) from weights on local disk, never downloaded.
- spectrum: how much high-frequency energy the latents (posterior means) carry next to the images
  (vae_scale/eval/spectrum.py): `latent_hf_share` (and per channel, `latent_hf_share/<c>`) and `rgb_hf_share`,
  the share of the 2D-DCT energy in the upper half of the radial frequencies, and the radially averaged
  spectra `spectrum/latent/<k>` and `spectrum/rgb/<k>` (bin k of 16, empty bins left out), normalised so
  that white noise is 1 everywhere.
- equivariance: `equivariance/<family>`, PSNR (dB) of decode(T(z)) against T(x), z the posterior mean, for
  one transform per family (vae_scale/eval/equivariance.py EVAL_TRANSFORMS: down2, down4, scale, rotate,
  flip). A decoder that commutes with T scores its plain reconstruction PSNR.
- rfid: the Frechet distance between Inception features of the inputs and of their reconstructions, with a
  TorchScript Inception read from disk (NVIDIA's inception-2015-12-05.pt, as used by StyleGAN2-ADA,
  StyleGAN3, EDM and clean-fid, called on uint8 images with return_features=True). Reference numbers
  need thousands of images: with fewer than the feature dimension (2048) the covariances are singular
  and rFID is biased upwards.

Exactness across processes: every metric is a sum over samples; each rank sums its own slice in float64
and `reduce` adds the ranks' sums once, at the end. The noise of the sampled latents is seeded by each
sample's key, so the stochastic metrics do not depend on how samples are dealt to ranks or batches.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale.config import Config, EvalConfig, LossConfig
from vae_scale.eval.equivariance import EVAL_TRANSFORMS
from vae_scale.eval.spectrum import BINS, hf_share, radial_spectrum, spectrum_sums

log = logging.getLogger(__name__)

METRICS = EvalConfig.METRICS
"""Metric names: psnr ssim bpd kl active_units lpips rfid spectrum equivariance."""
ACTIVE_THRESHOLD = 0.01
"""A latent channel is active when its posterior mean's variance over images and positions exceeds this."""


def active_units(mu_sum: torch.Tensor, mu2_sum: torch.Tensor, count: float) -> torch.Tensor:
    """Latent channels whose posterior mean varies over images and positions together (variance above
    ACTIVE_THRESHOLD), from per-channel sums of the mean and its square over `count` images x positions.
    The one definition: the trainer's logged `active_units` and eval's `val/active_units` both use it."""
    activity = mu2_sum / count - (mu_sum / count).square()
    return (activity > ACTIVE_THRESHOLD).sum()


@torch.no_grad()
def latent_stats(posterior) -> dict[str, torch.Tensor]:
    """KL per latent channel (`kl_channel/<c>`, averaged over the batch) and `active_units` of one batch's
    posterior (a DiagonalGaussian), as the trainer logs them."""
    mean = posterior.mean.float()
    out = {f"kl_channel/{c}": v for c, v in enumerate(posterior.kl_per_channel().mean(0))}
    count = mean.shape[0] * mean.shape[2] * mean.shape[3]
    out["active_units"] = active_units(mean.sum((0, 2, 3)), mean.square().sum((0, 2, 3)), count).float()
    return out


SSIM_WINDOW = 7
INCEPTION_FILE = "inception-2015-12-05.pt"
"""NVIDIA's TorchScript Inception-v3 (the TF FID network), looked for in the torch hub cache."""


class MetricError(ValueError):
    """A metric that cannot be computed as asked (unknown name, weights not on disk); the message says why."""


def identity(t: torch.Tensor) -> torch.Tensor:
    """The single-process `reduce`: the sums are already complete."""
    return t


# --------------------------------------------------------------------------------------------------------
# Metrics on image batches


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of (B, C, H, W) batches in [-1, 1] (peak 1 on the [0, 1] scale); shape (B,)."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def bicubic_round_trip(
    x: torch.Tensor, factor: int | None = None, *, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Downsample (antialiased bicubic) by `factor` or to a `size` (h, w) thumbnail, and back up (bicubic).

    The baseline a VAE must beat: the thumbnail keeps 3 * h * w numbers per image, its latent C * h' * w'.
    """
    h, w = x.shape[-2:]
    if size is None:
        if factor is None:
            raise ValueError("bicubic_round_trip needs a factor or a size")
        size = (h // factor, w // factor)
    small = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def equal_values_size(values: int, height: int, width: int, channels: int = 3) -> tuple[int, int]:
    """The smallest thumbnail (h, w) of an image's aspect ratio that keeps at least `values` numbers.

    channels * h * w >= values, so a baseline at this size never keeps fewer numbers than the latent it is
    compared with (exactly as many when they divide: 8 x 8 x 3 for an f8 latent of 3 channels). Capped at
    the image's own size.
    """
    for h in range(1, height + 1):
        w = max(1, round(h * width / height))
        if channels * h * w >= values:
            return h, min(w, width)
    return height, width


def compression(values: float, pixel_values: float) -> str:
    """How many times fewer numbers than the pixels: '64x', '2.8x' (one decimal unless near a whole)."""
    ratio = pixel_values / values
    return f"{ratio:.0f}x" if abs(ratio - round(ratio)) < 0.05 else f"{ratio:.1f}x"


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image of (B, C, H, W) batches in [-1, 1], shape (B,), float64; H, W >= 7.

    Equals scikit-image's structural_similarity(a, b, data_range=1, channel_axis=-1) on the [0, 1] images:
    7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1)), the mean over the positions
    whose window lies inside the image, averaged over channels.
    """
    if x.shape != y.shape or x.ndim != 4 or min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs two (B, C, H, W) batches of one shape with H, W >= 7, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    a, b = (x.double() + 1) / 2, (y.double() + 1) / 2
    C = a.shape[1]
    moments = F.avg_pool2d(torch.cat([a, b, a * a, b * b, a * b], 1), SSIM_WINDOW, stride=1)  # valid windows
    ux, uy, uxx, uyy, uxy = moments.split(C, 1)
    n = SSIM_WINDOW**2
    vx, vy, vxy = (n / (n - 1) * t for t in (uxx - ux * ux, uyy - uy * uy, uxy - ux * uy))
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) of two Gaussians, in float64.

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2, which
    is symmetric positive semi-definite, so singular covariances (fewer samples than features) are fine.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    vals, vecs = torch.linalg.eigh(cov1)
    root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ cov2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


# --------------------------------------------------------------------------------------------------------
# Likelihoods


def log_likelihood(x: torch.Tensor, x_hat: torch.Tensor, criterion) -> torch.Tensor:
    """log p(x | x_hat) in nats per image (B,), float64, of 8-bit images under the criterion's likelihood.

    criterion: a VAELoss with loss.recon logistic (discretised logistic, learned log-scale per channel)
    or gaussian (learned scalar logvar; density times the bin width 2/255).
    """
    from vae_scale.eval.likelihood import (
        LOG_SCALE_MIN,
        discretized_logistic_log_prob,
        gaussian_nll,
        quantize_8bit,
    )

    x, x_hat = x.float(), x_hat.float()
    if criterion.cfg.recon == "logistic":
        log_scale = criterion.log_scale.detach().float().clamp(min=LOG_SCALE_MIN).view(1, -1, 1, 1)
        lp = discretized_logistic_log_prob(quantize_8bit(x), x_hat, log_scale)
    elif criterion.cfg.recon == "gaussian":
        lp = -gaussian_nll(x, x_hat, criterion.logvar.detach().float()) - math.log(127.5)
    else:
        raise MetricError(f"loss.recon={criterion.cfg.recon} has no likelihood")
    return lp.double().flatten(1).sum(1)


def has_likelihood(criterion) -> bool:
    """Whether the criterion is a normalised likelihood (recon logistic or gaussian)."""
    return criterion is not None and criterion.cfg.recon in ("logistic", "gaussian")


def key_noise(keys: list[str] | None, shape: tuple[int, ...], seed: int, k: int, first: int) -> torch.Tensor:
    """Standard normal noise (B, *shape), each sample's seeded by its key (or its index without keys)."""
    out = []
    for i in range(shape[0]):
        name = keys[i] if keys else f"#{first + i}"
        digest = hashlib.blake2b(repr((seed, name, k)).encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        out.append(torch.randn(shape[1:], generator=g))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------------
# Weights of the network metrics (never downloaded)


def load_lpips(loss: LossConfig, lpips_path: str = "", vgg_path: str = ""):
    """LPIPS-VGG from local files (flags first, then loss.lpips_path / loss.vgg_path, then the caches)."""
    import dataclasses

    from vae_scale.eval.lpips import LPIPS, LossConfigError, find_lpips_weights

    cfg = dataclasses.replace(
        loss, lpips_path=lpips_path or loss.lpips_path, vgg_path=vgg_path or loss.vgg_path
    )
    try:
        return LPIPS.from_files(*find_lpips_weights(cfg))
    except LossConfigError as e:
        raise MetricError(
            f"metric lpips needs its weights on disk (pass --lpips-path DIR with vgg.pth and "
            f"vgg16-397923af.pth, or --vgg-path): {e}"
        ) from None


class InceptionFeatures(nn.Module):
    """A TorchScript feature extractor read from disk: (B, 3, H, W) in [-1, 1] -> (B, D) float64 features.

    The module receives uint8 images (B, 3, H, W) in [0, 255], as NVIDIA's inception-2015-12-05.pt expects
    (it resizes to 299 itself), with return_features=True when its forward takes that argument.
    """

    def __init__(self, module: torch.jit.ScriptModule):
        super().__init__()
        self.net = module.eval()
        try:
            names = [a.name for a in module.forward.schema.arguments]
        except (AttributeError, RuntimeError):
            names = []
        self.kwargs = {"return_features": True} if "return_features" in names else {}
        with torch.no_grad():
            self.dim = int(self(torch.zeros(1, 3, 64, 64)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.net.parameters()), torch.empty(0)).device
        images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(device)
        return self.net(images, **self.kwargs).double().flatten(1)


def find_inception(path: str = "") -> Path:
    """The rFID feature extractor's file: `path` (a file, or a folder holding it), else the torch hub cache;
    MetricError naming where it looked. Never downloads."""
    candidates = [Path(path).expanduser()] if path else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    files = [c / INCEPTION_FILE if c.is_dir() else c for c in candidates]
    found = next((f for f in files if f.is_file()), None)
    if found is None or (path and found != files[0]):
        where = f"--inception-path / eval.inception_path={path!r} is not a file" if path else "not found"
        raise MetricError(
            f"metric rfid needs a TorchScript Inception feature extractor on local disk (never downloaded): "
            f"{where}; looked in {', '.join(map(str, files))}. Use NVIDIA's {INCEPTION_FILE} (the one "
            f"StyleGAN2-ADA, StyleGAN3 and clean-fid use) and pass --inception-path FILE"
        )
    return found


def load_inception(path: str = "") -> InceptionFeatures:
    """The rFID feature extractor from `path` (or the torch hub cache), or MetricError; never downloads."""
    found = find_inception(path)
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but the FID network ships in it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(found), map_location="cpu")
    except Exception as e:
        raise MetricError(f"{found} is not a TorchScript module ({type(e).__name__}: {e})") from None
    return InceptionFeatures(module)


def load_eval_nets(
    cfg: Config,
    metrics: Iterable[str] | None = None,
    *,
    lpips_path: str = "",
    vgg_path: str = "",
    inception_path: str = "",
) -> dict[str, nn.Module]:
    """The networks `evaluate` needs for `metrics` (default cfg.eval.metrics): {"lpips", "inception"}.

    Call once at start, so missing weights stop a run before training (MetricError), then pass the dict
    to every `evaluate(..., **nets)` call. The path arguments override loss.lpips_path, loss.vgg_path and
    eval.inception_path.
    """
    metrics = check_metrics(cfg.eval.metrics if metrics is None else metrics)
    nets: dict[str, nn.Module] = {}
    if "lpips" in metrics:
        nets["lpips"] = load_lpips(cfg.loss, lpips_path, vgg_path)
    if "rfid" in metrics:
        nets["inception"] = load_inception(inception_path or cfg.eval.inception_path)
    return nets


def check_metrics(metrics: Iterable[str]) -> list[str]:
    """Metric names, deduplicated in order; MetricError naming an unknown one."""
    out: list[str] = []
    for m in metrics:
        for name in str(m).split(","):
            name = name.strip()
            if not name:
                continue
            if name not in METRICS:
                raise MetricError(f"unknown metric {name!r}; metrics: {' '.join(METRICS)}")
            if name not in out:
                out.append(name)
    return out


# --------------------------------------------------------------------------------------------------------
# The evaluation pass


@dataclass
class _Sums:
    """Named float64 sums in a fixed layout, so every rank builds the same vector for the one reduce."""

    device: torch.device
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, shape: tuple[int, ...] = ()) -> None:
        self.parts[name] = torch.zeros(shape, dtype=torch.float64, device=self.device)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.parts[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:  # `sums[k] += v` (in place) lands here
        self.parts[name] = value

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        flat = torch.cat([t.reshape(-1) for t in self.parts.values()])
        total = reduce(flat).to(torch.float64).cpu()
        if total.shape != flat.shape:
            raise RuntimeError(f"reduce returned shape {tuple(total.shape)} for {tuple(flat.shape)}")
        out, i = {}, 0
        for name, t in self.parts.items():
            out[name] = total[i : i + t.numel()].reshape(t.shape)
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
    image_shape: tuple[int, int, int] | None = None
    """(C, H, W) of the padding image of a rank that had no batch at all, for a sharded model; None: no
    padding forwards (a rank out of batches only takes part in the agreement)."""


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
                yield (last if last is not None else {"images": torch.zeros(1, *lockstep.image_shape)}), False
    finally:
        close = getattr(it, "close", None)  # a loader's workers stop now, not at garbage collection
        if close is not None:
            close()


@torch.no_grad()
def evaluate(
    vae,
    batches: Iterable[dict[str, Any]],
    *,
    metrics: list[str],
    device,
    reduce: Callable[[torch.Tensor], torch.Tensor] = identity,
    criterion=None,
    max_batches: int = 0,
    iw: int = 0,
    lpips: nn.Module | None = None,
    inception: nn.Module | None = None,
    seed: int = 0,
    lockstep: Lockstep | None = None,
    stop: Callable[[], bool] | None = None,
    tiled: Any = False,
    baseline: bool = False,
) -> dict[str, float]:
    """Metrics of `vae` over every sample of `batches`, the same on every rank (see the module docstring).

    batches: dicts with "images" (n, 3, H, W) in [-1, 1] and "count" n (optional "keys", which seed the
    latent noise); at most max_batches of them (0: all). reduce: sums a 1-D float64 tensor across ranks
    (an all-reduce; identity in one process), called exactly once with all sums stacked. criterion: the
    run's VAELoss, whose learned likelihood scale bpd uses (None or l1/l2: the fitted Gaussian). iw: K
    importance samples for bpd_iw (needs a learned likelihood). lpips / inception: the networks of those
    metrics (load_eval_nets); lpips falls back to criterion.perceptual. seed: of the latent noise.
    lockstep: ranks that take each batch together (see Lockstep): for a sharded (FSDP) model a rank out of
    batches runs padding batches (the same forwards, counted nowhere) until every rank is done. stop:
    asked before each batch whether a stop was requested; when it was (on any rank, under lockstep),
    EvaluationInterrupted, on every rank at the same batch, and nothing is reduced. tiled: True or a
    model.Tiling encodes and decodes images larger than a tile tile by tile (batches may then hold images
    of any size, e.g. one native-size image each).
    baseline: also measure, per image, the numbers the latent keeps (latent_values), the image's own
    (pixel_values), and the PSNR of bicubic through a thumbnail that keeps at least as many numbers
    (psnr_bicubic, bicubic_values; see equal_values_size).
    Returns floats: samples, mse (always), and those asked for of psnr, ssim, bpd, bpd_iw, kl and
    kl_channel/<c>, active_units, lpips, rfid, latent_hf_share[/<c>], rgb_hf_share, spectrum/latent|rgb/<k>,
    equivariance/<family>, and the baseline's.
    """
    metrics = check_metrics(metrics)
    device = torch.device(device)
    if "lpips" in metrics and lpips is None:
        lpips = getattr(criterion, "perceptual", None)
        if lpips is None:
            raise MetricError("metric lpips needs the LPIPS network (load_eval_nets or load_lpips)")
    if "rfid" in metrics and inception is None:
        raise MetricError("metric rfid needs the Inception network (load_eval_nets or load_inception)")
    learned = has_likelihood(criterion)
    if iw and "bpd" not in metrics:
        metrics.append("bpd")
    if iw and not learned:
        recon = criterion.cfg.recon if criterion is not None else "none"
        raise MetricError(
            f"the importance-weighted bound (iw={iw}) needs a learned likelihood "
            f"(loss.recon=logistic or gaussian), this run has loss.recon={recon}"
        )
    C = vae.config.latent_channels
    sum_shapes: list[tuple[str, tuple[int, ...]]] = [
        (name, ())
        for name in (
            "samples",
            "psnr",
            "ssim",
            "mse",
            "nll",
            "sq_err_sample",
            "kl",
            "iw",
            "lpips",
            "positions",
        )
    ]
    if baseline:
        sum_shapes += [
            (name, ()) for name in ("psnr_bicubic", "latent_values", "bicubic_values", "pixel_values")
        ]
    sum_shapes += [(name, (C,)) for name in ("kl_channel", "mu", "mu2")]
    if "spectrum" in metrics:
        sum_shapes += [("latent_energy", (C, BINS)), ("latent_count", (BINS,))]
        sum_shapes += [("latent_hf", (C,)), ("latent_total", (C,))]
        sum_shapes += [("rgb_energy", (BINS,)), ("rgb_count", (BINS,)), ("rgb_hf", ()), ("rgb_total", ())]
    if "equivariance" in metrics:
        sum_shapes += [(f"equivariance/{name}", ()) for name in EVAL_TRANSFORMS]
    if "rfid" in metrics:
        inception = inception.to(device)
        D = inception.dim
        for side in ("real", "fake"):
            sum_shapes += [(f"feat_{side}", (D,)), (f"outer_{side}", (D, D))]
    sums = kept = _Sums(device)
    for name, shape in sum_shapes:
        sums.add(name, shape)
    if lpips is not None:
        lpips = lpips.to(device)

    was_training = vae.training
    vae.eval()
    need_sample = "bpd" in metrics
    seen = 0
    try:
        for batch, real in _in_step(batches, max_batches, lockstep, stop):
            n = int(batch.get("count", len(batch["images"])))
            if n == 0:
                continue
            x = batch["images"][:n].to(device, non_blocking=True).float()
            keys = list(batch["keys"][:n]) if batch.get("keys") is not None else None
            if not real:
                sums = _Sums(device)  # a padding batch: the same forwards, into sums that are dropped
                for name, shape in sum_shapes:
                    sums.add(name, shape)
            post = vae.encode(x, tiled=tiled) if tiled else vae.encode(x)
            mean, logvar = post.mean.float(), post.logvar.float()
            x_rec = (vae.decode(post.mode(), tiled=tiled) if tiled else vae.decode(post.mode())).float()
            x_rec = x_rec.clamp(-1, 1)
            sums["samples"] += n
            sums["psnr"] += psnr(x_rec, x).double().sum()
            sums["mse"] += ((x_rec - x) / 2).double().square().flatten(1).mean(1).sum()
            if "ssim" in metrics:
                sums["ssim"] += ssim(x_rec, x).sum()
            kl_c = post.kl_per_channel().double()
            sums["kl"] += kl_c.sum()
            sums["kl_channel"] += kl_c.sum(0)
            sums["mu"] += mean.double().sum((0, 2, 3))
            sums["mu2"] += mean.double().square().sum((0, 2, 3))
            sums["positions"] += n * mean.shape[2] * mean.shape[3]
            if baseline:
                values, (H, W) = mean[0].numel(), x.shape[-2:]
                size = equal_values_size(values, H, W, x.shape[1])
                sums["psnr_bicubic"] += psnr(bicubic_round_trip(x, size=size), x).double().sum()
                sums["latent_values"] += n * values
                sums["bicubic_values"] += n * x.shape[1] * size[0] * size[1]
                sums["pixel_values"] += n * x[0].numel()
            if need_sample:
                std = torch.exp(0.5 * logvar)
                log_w = []
                for k in range(max(iw, 1)):
                    eps = key_noise(keys, tuple(mean.shape), seed, k, seen).to(device)
                    z = mean + std * eps
                    x_s = (vae.decode(z, tiled=tiled) if tiled else vae.decode(z)).float()
                    if k == 0:
                        sums["sq_err_sample"] += (x - x_s).double().square().sum()
                        if learned:
                            sums["nll"] -= log_likelihood(x, x_s, criterion).sum()
                    if iw:
                        # log p(z) - log q(z|x) for z = mean + std * eps: the 2 pi terms cancel
                        log_prior_ratio = (0.5 * (eps.square() - z.square()) + 0.5 * logvar).double()
                        log_w.append(log_likelihood(x, x_s, criterion) + log_prior_ratio.flatten(1).sum(1))
                if iw:
                    log_px = torch.logsumexp(torch.stack(log_w), 0) - math.log(iw)
                    sums["iw"] -= log_px.sum()
            if "spectrum" in metrics:
                for side, t in (("latent", mean), ("rgb", x)):
                    parts = spectrum_sums(t)
                    sums[f"{side}_energy"] += parts["energy"] if side == "latent" else parts["energy"].sum(0)
                    sums[f"{side}_count"] += parts["count"]
                    for name in ("hf", "total"):
                        sums[f"{side}_{name}"] += parts[name] if side == "latent" else parts[name].sum()
            if "equivariance" in metrics:
                f, z = vae.config.downsample_factor, post.mode()
                for name, t in EVAL_TRANSFORMS.items():
                    z_t = t.apply(z)
                    x_t = (vae.decode(z_t, tiled=tiled) if tiled else vae.decode(z_t)).float().clamp(-1, 1)
                    sums[f"equivariance/{name}"] += psnr(x_t, t.apply(x, f)).double().sum()
            if lpips is not None:
                sums["lpips"] += lpips(x_rec, x).double().sum()
            if "rfid" in metrics:
                for side, images in (("real", x), ("fake", x_rec)):
                    f = inception(images).to(device)
                    sums[f"feat_{side}"] += f.sum(0)
                    sums[f"outer_{side}"] += f.T @ f
            if real:
                seen += n
            sums = kept
    finally:
        vae.train(was_training)

    total = sums.reduced(reduce)  # the one collective: every rank's sums, stacked, added up
    n = float(total["samples"])
    if n == 0:
        raise MetricError("no samples to evaluate (empty data on every rank)")
    out: dict[str, float] = {"samples": n, "mse": float(total["mse"]) / n}
    if "psnr" in metrics:
        out["psnr"] = float(total["psnr"]) / n
    if "ssim" in metrics:
        out["ssim"] = float(total["ssim"]) / n
    if "bpd" in metrics:
        dims_total = _dims(total, vae)
        if learned:
            nats = (float(total["nll"]) + float(total["kl"])) / dims_total
        else:  # fitted Gaussian: at sigma^2 = MSE the squared-error term is exactly 1/2 per dimension
            var = max(float(total["sq_err_sample"]) / dims_total, 1e-12)
            nats = 0.5 * (1 + math.log(2 * math.pi * var)) + float(total["kl"]) / dims_total + math.log(127.5)
        out["bpd"] = nats / math.log(2)
        if iw:
            out["bpd_iw"] = float(total["iw"]) / dims_total / math.log(2)
    if "kl" in metrics:
        out["kl"] = float(total["kl"]) / n
        out.update({f"kl_channel/{c}": float(v) / n for c, v in enumerate(total["kl_channel"])})
    if "active_units" in metrics:
        out["active_units"] = float(active_units(total["mu"], total["mu2"], float(total["positions"])))
    if "spectrum" in metrics:
        out["latent_hf_share"] = float(hf_share(total["latent_hf"].sum(), total["latent_total"].sum()))
        per_channel = hf_share(total["latent_hf"], total["latent_total"])
        out.update({f"latent_hf_share/{c}": float(v) for c, v in enumerate(per_channel)})
        out["rgb_hf_share"] = float(hf_share(total["rgb_hf"], total["rgb_total"]))
        for side in ("latent", "rgb"):
            curve = radial_spectrum(total[f"{side}_energy"], total[f"{side}_count"])
            out.update({f"spectrum/{side}/{k}": float(v) for k, v in enumerate(curve) if not math.isnan(v)})
    if "equivariance" in metrics:
        out.update(
            {f"equivariance/{name}": float(total[f"equivariance/{name}"]) / n for name in EVAL_TRANSFORMS}
        )
    if "lpips" in metrics:
        out["lpips"] = float(total["lpips"]) / n
    if baseline:
        out.update({k: float(total[k]) / n for k in ("latent_values", "pixel_values", "bicubic_values")})
        out["psnr_bicubic"] = float(total["psnr_bicubic"]) / n
    if "rfid" in metrics:
        stats = []
        for side in ("real", "fake"):
            mu = total[f"feat_{side}"] / n
            cov = (total[f"outer_{side}"] - n * torch.outer(mu, mu)) / max(n - 1, 1)
            stats += [mu, cov]
        out["rfid"] = frechet_distance(*stats)
    return out


def _dims(total: dict[str, torch.Tensor], vae) -> float:
    """Image dimensions in all (n * 3 * H * W), from the latent positions counted (h * w per image)."""
    f = vae.config.downsample_factor
    return float(total["positions"]) * f * f * vae.config.in_channels


# --------------------------------------------------------------------------------------------------------
# The run's likelihood, for bits/dim
