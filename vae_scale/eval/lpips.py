"""LPIPS-VGG (Zhang et al. 2018, v0.1), frozen, from weights on local disk (never downloaded): the perceptual
term of the objective and the lpips metric."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale.config import ConfigError, LossConfig


class LossConfigError(ConfigError):
    """A loss setting that cannot be honoured (e.g. LPIPS weights not on disk); the message names the key."""


LPIPS_MIN_SIZE = 16
"""Smallest image side LPIPS-VGG takes: its fifth block sees 1/16 of the input's size."""

LPIPS_FILE = "vgg.pth"
"""The lpips package's weights/v0.1/vgg.pth: linear heads named lin0..lin4.model.1.weight."""
VGG16_FILE = "vgg16-397923af.pth"
"""torchvision's ImageNet VGG16 state dict: convolutions named features.N.weight / features.N.bias."""

# torchvision vgg16.features up to relu5_3: index -> (in, out) for the 13 convs; max-pools; ReLU elsewhere.
_VGG16_CONVS = {
    0: (3, 64), 2: (64, 64),
    5: (64, 128), 7: (128, 128),
    10: (128, 256), 12: (256, 256), 14: (256, 256),
    17: (256, 512), 19: (512, 512), 21: (512, 512),
    24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip
_VGG16_POOLS = (4, 9, 16, 23)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_TAP_CHANNELS = (64, 128, 256, 512, 512)


class _FrozenConv2d(nn.Module):
    """A conv whose weights are non-persistent buffers: moved by .to(), never trained, not in state_dict."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int, bias: bool = True):
        super().__init__()
        self.padding = padding
        self.register_buffer("weight", torch.zeros(out_ch, in_ch, kernel_size, kernel_size), persistent=False)
        self.register_buffer("bias", torch.zeros(out_ch) if bias else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


class _LinHead(nn.Module):
    """LPIPS' NetLinLayer: (dropout) then a 1x1 conv to one channel; index 0 kept so names read model.1.*."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), _FrozenConv2d(channels, 1, 1, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance, frozen and always in eval mode; weights only from local files.

    forward(x_hat, x): images (B, 3, H, W) in [-1, 1] -> (B,) distances (float32). Per tap of VGG16
    (relu1_2 ... relu5_3): unit-normalise features over channels, squared difference, learned non-negative
    channel weights (1x1 conv), spatial mean; summed over the five taps. Inputs first go through LPIPS'
    scaling layer (x - shift) / scale. An input that does not require grad is run under no_grad.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(_LPIPS_TAPS[-1] + 1):
            if i in _VGG16_CONVS:
                layers.append(_FrozenConv2d(*_VGG16_CONVS[i], kernel_size=3, padding=1))
            elif i in _VGG16_POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        for k, ch in enumerate(_LPIPS_TAP_CHANNELS):
            self.add_module(f"lin{k}", _LinHead(ch))
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.eval()

    @classmethod
    def from_files(cls, lpips_file: str | Path, vgg_file: str | Path) -> LPIPS:
        """Load the LPIPS heads (lpips' vgg.pth) and the VGG16 convolutions (torchvision's file) by name."""
        net = cls()
        files = {
            "features.": (vgg_file, torch.load(vgg_file, map_location="cpu", weights_only=True)),
            "lin": (lpips_file, torch.load(lpips_file, map_location="cpu", weights_only=True)),
        }
        for name, buf in net.named_buffers():
            if name in ("shift", "scale"):  # LPIPS constants, not in either file
                continue
            path, source = files["features." if name.startswith("features.") else "lin"]
            if name not in source:
                raise LossConfigError(f"{path} has no tensor {name}: is it the right file?")
            if source[name].shape != buf.shape:
                got, need = tuple(source[name].shape), tuple(buf.shape)
                raise LossConfigError(f"{path}: {name} has shape {got}, LPIPS-VGG needs {need}")
            buf.copy_(source[name])
        return net

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode whatever is asked: LPIPS is a fixed metric."""
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            h = (x.to(self.shift.dtype) - self.shift) / self.scale
            taps = []
            for i, layer in enumerate(self.features):
                h = layer(h)
                if i in _LPIPS_TAPS:
                    taps.append(h)
            return taps

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        distance = 0.0
        for k, (a, b) in enumerate(zip(self._taps(x_hat), self._taps(x), strict=True)):
            # unit-normalise in float32: an all-zero ReLU column gives 0 / eps, and 1e-10 underflows in fp16
            a, b = a.float(), b.float()
            a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            head = getattr(self, f"lin{k}")
            distance = distance + head((a - b).square()).float().mean((2, 3))  # (B, 1)
        return distance[:, 0]


def _lpips_package_weights() -> Path | None:
    """weights/v0.1/vgg.pth of an installed lpips package, found without importing it (needs torchvision)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / LPIPS_FILE


def find_lpips_weights(cfg: LossConfig) -> tuple[Path, Path]:
    """(lpips heads file, VGG16 file) on local disk, or LossConfigError naming the keys; never downloads.

    Heads: loss.lpips_path (a folder holding vgg.pth, or the file itself), else the installed lpips package's
    weights/v0.1/vgg.pth. VGG16: loss.vgg_path (file or folder), else vgg16-397923af.pth beside the heads file
    when loss.lpips_path is set, else the torch hub cache ($TORCH_HOME/hub/checkpoints, default
    ~/.cache/torch/hub/checkpoints), where torchvision and the lpips package leave it.
    """
    looked: list[Path] = []

    def given(key: str, value: str, filename: str) -> Path:
        p = Path(value).expanduser()
        f = p / filename if p.is_dir() else p
        if not f.is_file():
            raise LossConfigError(
                f"loss.{key}={value!r} is neither {filename} nor a folder holding it "
                f"(LPIPS-VGG weights are never downloaded)"
            )
        return f

    if cfg.lpips_path:
        heads = given("lpips_path", cfg.lpips_path, LPIPS_FILE)
    else:
        pkg = _lpips_package_weights()
        heads = pkg if pkg is not None and pkg.is_file() else None
        looked += [pkg] if pkg is not None else []
    if cfg.vgg_path:
        vgg = given("vgg_path", cfg.vgg_path, VGG16_FILE)
    else:
        candidates = [heads.parent / VGG16_FILE] if cfg.lpips_path else []
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE)
        looked += candidates
        vgg = next((c for c in candidates if c.is_file()), None)
    if heads is None or vgg is None:
        missing = " and ".join(n for n, f in ((LPIPS_FILE, heads), (VGG16_FILE, vgg)) if f is None)
        raise LossConfigError(
            f"loss.perceptual_weight > 0 needs LPIPS-VGG weights on local disk (never downloaded); missing "
            f"{missing}. Set loss.lpips_path to a folder holding {LPIPS_FILE} (the lpips package's "
            f"weights/v0.1/vgg.pth) and {VGG16_FILE} (torchvision's VGG16), or loss.vgg_path for the latter"
            f"; looked in: {', '.join(str(p) for p in looked) or 'nothing'}"
        )
    return heads, vgg
