"""fvd: the Frechet distance between I3D features of the input clips and of their reconstructions, and its
protocol, said with every figure.

The feature extractor is a TorchScript I3D read from disk, never downloaded: the Kinetics-400 I3D of
StyleGAN-V and of the FVD code derived from VideoGPT (universome/fvd-comparison, common_metrics_on_video_
quality), `i3d_torchscript.pt`, the torch port of the TF-Hub network that Unterthiner et al.'s FVD uses. It is
called as `detector(videos, rescale=False, resize=False, return_features=True)` on videos (N, 3, T, 224,
224) float in [-1, 1] and returns the 400 logits before the softmax (what FVD compares). The protocol here
is that calling convention's (the VideoGPT-derived one):

- each clip's frames quantised to 8 bits (as a video file would hold them), both sides;
- each frame's short side resized to 224 px (bilinear, align_corners False) and center-cropped to 224 x 224;
- in [-1, 1], the detector's own rescale and resize off; the T frames the pass evaluates (data.frames at
  data.frame_stride; FVD papers use 16 frames: the I3D needs at least about 10 for its temporal pooling,
  and fails on fewer, which is reported with the frame count).

Statistics: as rfid's (vae_scale/eval/rfid.py): per-sample float64 sums of the features and their outer
products, reduced once across ranks, the unbiased covariance, the project's frechet_distance; so FVD does
not depend on the batch size or the number of processes. The reference side is computed from the inputs of
the same pass (not cached). FVD needs hundreds of clips at least: with fewer clips than features (400) the
covariances are singular and the figure is biased upwards.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale.eval.registry import Batch, EvalSetup, Metric, MetricError, Sums, TableInfo, register_metric
from vae_scale.eval.rfid import (
    feature_statistics,
    file_sha256,
    find_feature_file,
    frechet_distance,
    load_torchscript,
)

I3D_FILE = "i3d_torchscript.pt"
"""The TorchScript I3D of StyleGAN-V / VideoGPT-derived FVD code, looked for in the torch hub cache."""
I3D_SIZE = 224
"""The frame size the I3D takes."""
PROBE_FRAMES = 16
"""Frames of the one clip run at load to learn the feature dimension (the frame count FVD papers use)."""


class I3DFeatures(nn.Module):
    """A TorchScript I3D read from disk: clips (B, 3, T, H, W) in [-1, 1] -> (B, D) float64 features, by
    the protocol of the module docstring."""

    def __init__(self, module: torch.jit.ScriptModule, path: Path | None = None):
        super().__init__()
        self.net = module.eval()
        self.path = path
        try:
            names = {a.name for a in module.forward.schema.arguments}
        except (AttributeError, RuntimeError):
            names = set()
        wanted = {"rescale": False, "resize": False, "return_features": True}
        self.kwargs = {k: v for k, v in wanted.items() if k in names}
        with torch.no_grad():
            self.dim = int(self(torch.zeros(1, 3, PROBE_FRAMES, I3D_SIZE, I3D_SIZE)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = x.shape
        device = next(iter(self.net.parameters()), torch.empty(0)).device
        x = torch.round((x.float().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # 8-bit levels
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        s = I3D_SIZE / min(h, w)
        size = (max(I3D_SIZE, round(h * s)), max(I3D_SIZE, round(w * s)))
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
        y0, x0 = (size[0] - I3D_SIZE) // 2, (size[1] - I3D_SIZE) // 2
        frames = frames[:, :, y0 : y0 + I3D_SIZE, x0 : x0 + I3D_SIZE]
        videos = frames.reshape(n, t, c, I3D_SIZE, I3D_SIZE).transpose(1, 2).contiguous().to(device)
        try:
            out = self.net(videos, **self.kwargs)
        except RuntimeError as e:
            raise MetricError(
                f"fvd: the I3D {self.path or '(in memory)'} failed on clips of {t} frames (it needs about 10 "
                f"or more; FVD papers use 16): {str(e).splitlines()[0]}"
            ) from None
        return out.double().flatten(1)


def find_i3d(path: str = "") -> Path:
    """The FVD feature extractor's file (rfid.find_feature_file)."""
    use = f"the {I3D_FILE} of StyleGAN-V and the VideoGPT-derived FVD code"
    return find_feature_file(path, I3D_FILE, metric="fvd", network="I3D", option="i3d_path", use=use)


def load_i3d(path: str = "") -> I3DFeatures:
    """The FVD feature extractor from `path` (or the torch hub cache), or MetricError; never downloads."""
    found = find_i3d(path)
    return I3DFeatures(load_torchscript(found), found)


def fvd_protocol(i3d: I3DFeatures, *, data: str, frames: int, stride: int, clips: int) -> str:
    """The protocol in one line, as printed with every FVD: the data, the clips, the preprocessing, the
    features (the file's name and SHA-256)."""
    features = (
        f"{i3d.path.name} sha256:{file_sha256(i3d.path)}" if i3d.path is not None else "in-memory extractor"
    )
    return (
        f"data {data}; clips {clips} of {frames} frames at stride {stride}; frames quantised to 8 bits, "
        f"short side resized to {I3D_SIZE} px (bilinear) and center-cropped to {I3D_SIZE}x{I3D_SIZE}, in "
        f"[-1, 1], rescale=False resize=False; features {features} ({i3d.dim} features); reference "
        "statistics computed from this pass's inputs (not cached)"
    )


@register_metric("fvd")
class FVD(Metric):
    """The Frechet distance of the input clips' and the reconstructions' I3D features (see the module
    docstring); EvalSetup.nets["i3d"] computes them."""

    higher_is_better = False
    table_position = 55
    refuses_images = "its I3D features are of clips; for images, rfid"

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        net = setup.nets.get("i3d")
        if net is None:
            raise MetricError(
                "metric fvd needs the I3D network: pass --i3d-path FILE (eval.i3d_path), an "
                f"{I3D_FILE} on local disk (load_eval_nets or load_i3d)"
            )
        self.net = net.to(setup.device)

    def sums(self) -> dict[str, tuple[int, ...]]:
        D = self.net.dim
        return {"feat_real": (D,), "outer_real": (D, D), "feat_fake": (D,), "outer_fake": (D, D)}

    def accumulate(self, batch: Batch, sums: Sums) -> None:
        for side, clips in (("real", batch.images), ("fake", batch.reconstruction)):
            f = self.net(clips).to(self.setup.device)
            sums[f"feat_{side}"] += f.sum(0)
            sums[f"outer_{side}"] += f.T @ f

    def figures(self, total: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        real = feature_statistics(total["feat_real"], total["outer_real"], samples)
        fake = feature_statistics(total["feat_fake"], total["outer_fake"], samples)
        return {"fvd": frechet_distance(*real, *fake)}

    @classmethod
    def rows(cls, results: dict[str, float], info: TableInfo) -> list[tuple[str, str]]:
        return [("FVD", f"{results['fvd']:.2f}")] if "fvd" in results else []

    @classmethod
    def notes(cls, results: dict[str, float], info: TableInfo) -> list[str]:
        protocol = info.protocols.get("fvd")
        return [f"FVD protocol: {protocol}"] if protocol and "fvd" in results else []
