"""The layers of the SD-style encoder and decoder (latent diffusion's KL autoencoder, FLUX.1's and FLUX.2's),
with module names equal to diffusers' so weights move between them by name: GroupNorm (+ fused SiLU), the
ResNet block, single-head attention, down- and upsampling, and the blocks made of them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale import kernels

# --------------------------------------------------------------------------------------------------------
# Blocks


class GroupNorm(nn.Module):
    """GroupNorm with an optional fused SiLU; state-dict names and init of nn.GroupNorm (weight, bias)."""

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-6, silu: bool = True):
        super().__init__()
        self.num_groups, self.eps, self.silu = num_groups, eps, silu
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.kernels = "auto"  # set for the whole model by VAE.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.group_norm_silu(
            x, self.num_groups, self.weight, self.bias, self.eps, self.silu, impl=self.kernels
        )

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}, silu={self.silu}"


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv -> norm -> SiLU -> conv, plus a (1x1-projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(out_ch, groups, eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all positions, with a GroupNorm in front and a residual."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = GroupNorm(ch, groups, eps, silu=False)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers' name: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # channels-last strides
        # The sum takes x's memory format: left channels-last, every later layer of an NCHW model would
        # run NHWC (on a CPU the decoder's convolution backward was ~25% slower; benchmarks/train_step.py).
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        return x + h.contiguous(memory_format=layout)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (right/bottom) padding, as in latent diffusion."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then (except at the last level) a downsample."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, eps: float, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then (except at the last level) an upsample."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, eps: float, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """ResNet -> (self-attention) -> ResNet at the lowest resolution."""

    def __init__(self, ch: int, groups: int, eps: float, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups, eps), ResnetBlock(ch, ch, groups, eps)])
        self.attentions = nn.ModuleList([Attention(ch, groups, eps)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)
