"""rfid: the Frechet distance between Inception features of the inputs and of their reconstructions, and
its protocol: what the reference statistics were computed on, cached, and said with every figure.

The feature extractor is a TorchScript Inception read from disk (NVIDIA's inception-2015-12-05.pt, as used
by StyleGAN2-ADA, StyleGAN3, EDM and clean-fid, called on uint8 images with return_features=True: the 2048
pool3 features of the TF FID network), never downloaded.

Statistics: the mean and the unbiased covariance (divided by n - 1, as numpy's np.cov, pytorch-fid,
torch-fidelity and torchmetrics do) of each side's features, from per-sample float64 sums of the features
and of their outer products, reduced once across ranks: so rFID does not depend on the batch size or the
number of processes. Reference numbers need thousands of images: with fewer than the feature dimension
(2048) the covariances are singular and rFID is biased upwards.

Reference statistics (the real images' mean and covariance) are cached to a file named by the hash of the
protocol (data, split, crop, resize, image count, the Inception file's SHA-256) and reused by the next
evaluation with the same protocol (`vae-scale eval`, eval.rfid_cache), which then runs Inception on the
reconstructions only.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vae_scale.eval.registry import Batch, EvalSetup, Metric, MetricError, Sums, TableInfo, register_metric
from vae_scale.files import write_atomic

INCEPTION_FILE = "inception-2015-12-05.pt"
"""NVIDIA's TorchScript Inception-v3 (the TF FID network), looked for in the torch hub cache."""

# --------------------------------------------------------------------------------------------------------
# The feature extractor


class InceptionFeatures(nn.Module):
    """A TorchScript feature extractor read from disk: (B, 3, H, W) in [-1, 1] -> (B, D) float64 features.

    The module receives uint8 images (B, 3, H, W) in [0, 255], as NVIDIA's inception-2015-12-05.pt expects
    (it resizes to 299 itself), with return_features=True when its forward takes that argument.
    """

    def __init__(self, module: torch.jit.ScriptModule, path: Path | None = None):
        super().__init__()
        self.net = module.eval()
        self.path = path
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


def find_feature_file(path: str, name: str, *, metric: str, network: str, option: str, use: str) -> Path:
    """A metric's TorchScript feature extractor on local disk: `path` (a file, or a folder holding `name`),
    else `name` in the torch hub cache; MetricError naming the flag and key (`option`, e.g. "inception_path"),
    where it looked and which file to use. Never downloads."""
    candidates = [Path(path).expanduser()] if path else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / name)
    files = [c / name if c.is_dir() else c for c in candidates]
    found = next((f for f in files if f.is_file()), None)
    if found is None or (path and found != files[0]):
        flag = "--" + option.replace("_", "-")
        where = f"{flag} / eval.{option}={path!r} is not a file" if path else "none given"
        raise MetricError(
            f"metric {metric} needs a TorchScript {network} feature extractor on local disk (never "
            f"downloaded): {where}; looked in {', '.join(map(str, files))}. Use {use} and pass {flag} FILE "
            f"(eval.{option})"
        )
    return found


def load_torchscript(found: Path) -> torch.jit.ScriptModule:
    """A feature extractor's TorchScript module on the CPU, or MetricError naming the file."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but the feature networks ship in it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(found), map_location="cpu")
    except Exception as e:
        raise MetricError(f"{found} is not a TorchScript module ({type(e).__name__}: {e})") from None


def find_inception(path: str = "") -> Path:
    """The rFID feature extractor's file (find_feature_file)."""
    use = f"NVIDIA's {INCEPTION_FILE} (the one StyleGAN2-ADA, StyleGAN3 and clean-fid use)"
    return find_feature_file(
        path, INCEPTION_FILE, metric="rfid", network="Inception", option="inception_path", use=use
    )


def load_inception(path: str = "") -> InceptionFeatures:
    """The rFID feature extractor from `path` (or the torch hub cache), or MetricError; never downloads."""
    found = find_inception(path)
    return InceptionFeatures(load_torchscript(found), found)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------
# The distance


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) of two Gaussians, in float64.

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2, which
    is symmetric positive semi-definite, so singular covariances (fewer samples than features) are fine.
    (torchmetrics takes the eigenvalues of the non-symmetric S1 S2 and pytorch-fid scipy's sqrtm of it; the
    three agree, tests/test_rfid.py checks torchmetrics'.)
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    vals, vecs = torch.linalg.eigh(cov1)
    root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ cov2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


def feature_statistics(
    feature_sum: torch.Tensor, outer_sum: torch.Tensor, n: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased covariance) of n features from their sum (D,) and the sum of their outer products."""
    mu = feature_sum / n
    cov = (outer_sum - n * torch.outer(mu, mu)) / max(n - 1, 1)
    return mu, cov


# --------------------------------------------------------------------------------------------------------
# The protocol and the cached reference statistics


def default_cache() -> Path:
    """Where reference statistics are cached by default: $XDG_CACHE_HOME/vae-scale/rfid (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vae-scale" / "rfid"


@dataclass
class RFIDReference:
    """The reference side of rFID: the protocol that defines it and, once known, its statistics.

    protocol: what the real images are and how their features are computed (data, split, crop, resize,
    images, features: the Inception file's name and SHA-256); cache: the file that holds the statistics
    for this protocol, None when they are not cached (the image count is not known before the pass).
    Given to `evaluate(..., inputs={"rfid": reference})`: with statistics, the pass runs Inception on the
    reconstructions only; without, it fills them in from the real images it evaluated.
    """

    protocol: dict[str, Any]
    cache: Path | None = None
    mu: torch.Tensor | None = None
    cov: torch.Tensor | None = None
    source: str = "computed"
    """computed | cached (read from `cache`)."""
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, protocol: dict[str, Any], cache_dir: Path | None) -> RFIDReference:
        """The reference for `protocol`, its statistics read from `cache_dir` when a file there matches; no
        caching when cache_dir is None or the protocol has no image count (None)."""
        ref = cls(dict(protocol))
        if cache_dir is None or protocol.get("images") is None:
            ref.notes.append("not cached: the image count is not known before the pass")
            return ref
        key = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:24]
        ref.cache = Path(cache_dir) / f"rfid-reference-{key}.safetensors"
        if ref.cache.is_file():
            from safetensors.torch import load_file, safe_open

            with safe_open(str(ref.cache), "pt") as f:
                stored = json.loads((f.metadata() or {}).get("protocol", "null"))
            if stored == protocol:  # the hash named it; the stored protocol confirms it
                tensors = load_file(str(ref.cache))
                ref.mu, ref.cov, ref.source = tensors["mu"].double(), tensors["cov"].double(), "cached"
        return ref

    def save(self) -> bool:
        """Write the statistics to the cache file (atomically) unless they came from it; True when written."""
        if self.cache is None or self.source == "cached" or self.mu is None:
            return False
        from safetensors.torch import save

        self.cache.parent.mkdir(parents=True, exist_ok=True)
        data = save(
            {"mu": self.mu.contiguous(), "cov": self.cov.contiguous()},
            metadata={"protocol": json.dumps(self.protocol, sort_keys=True)},
        )
        write_atomic(self.cache, data)
        return True

    def describe(self) -> str:
        """The protocol in one line, as printed with every rFID."""
        p = self.protocol
        parts = [f"{k} {p[k]}" for k in ("data", "split", "crop", "resize", "images") if p.get(k) is not None]
        parts.append(f"features {p.get('features', '?')}")
        where = f"{self.source}" + (f" ({self.cache})" if self.cache else "") if self.source else ""
        return "; ".join([*parts, f"reference statistics {where}", *self.notes])


def inception_protocol(inception: InceptionFeatures) -> str:
    """The features part of the protocol: the file's name and SHA-256, and the feature dimension."""
    if inception.path is None:
        return f"in-memory extractor ({inception.dim} features)"
    return f"{inception.path.name} sha256:{file_sha256(inception.path)} ({inception.dim} features)"


# --------------------------------------------------------------------------------------------------------
# The metric


@register_metric("rfid")
class RFID(Metric):
    """The Frechet distance of the inputs' and the reconstructions' Inception features (see the module
    docstring); EvalSetup.nets["inception"] computes them; an RFIDReference in EvalSetup.inputs["rfid"]
    supplies or receives the real side's statistics."""

    higher_is_better = False
    table_position = 50
    refuses_clips = (
        "its Inception features and cached reference statistics are of images; for clips, fvd (an I3D "
        "file, --i3d-path / eval.i3d_path) compares the distributions of the clips"
    )

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        net = setup.nets.get("inception")
        if net is None:
            raise MetricError("metric rfid needs the Inception network (load_eval_nets or load_inception)")
        self.net = net.to(setup.device)
        self.reference: RFIDReference | None = setup.inputs.get("rfid")
        self.cached = self.reference is not None and self.reference.mu is not None

    def sums(self) -> dict[str, tuple[int, ...]]:
        D = self.net.dim
        sides = ("fake",) if self.cached else ("real", "fake")
        out: dict[str, tuple[int, ...]] = {}
        for side in sides:
            out.update({f"feat_{side}": (D,), f"outer_{side}": (D, D)})
        return out

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        sides = (("fake", batch.reconstruction),)
        if not self.cached:
            sides = (("real", batch.images), *sides)
        for side, images in sides:
            f = self.net(images).to(self.setup.device)
            sums[f"feat_{side}"] += f.sum(0)
            sums[f"outer_{side}"] += f.T @ f

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        ref = self.reference
        if self.cached:
            expected = ref.protocol.get("images")
            if expected is not None and expected != int(samples):
                raise MetricError(
                    f"rfid: the cached reference statistics {ref.cache} are of {expected} images, this pass "
                    f"evaluated {int(samples)}: the data changed since; delete the file to recompute them"
                )
            real = (ref.mu, ref.cov)
        else:
            real = feature_statistics(total["feat_real"], total["outer_real"], samples)
            if ref is not None:
                ref.mu, ref.cov = real
        fake = feature_statistics(total["feat_fake"], total["outer_fake"], samples)
        return {"rfid": frechet_distance(*real, *fake)}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        return [("rFID", f"{results['rfid']:.2f}")] if "rfid" in results else []

    @classmethod
    def notes(cls, results: dict[str, float], info: TableInfo) -> list[str]:
        protocol = info.protocols.get("rfid")
        return [f"rFID protocol: {protocol}"] if protocol and "rfid" in results else []
