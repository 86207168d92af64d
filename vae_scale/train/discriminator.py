"""The PatchGAN discriminators of the objective: latent diffusion's for images (taming's
NLayerDiscriminator) and a 3D one for clips."""

from __future__ import annotations

import torch
import torch.nn as nn


def patchgan(
    conv: type[nn.Conv2d] | type[nn.Conv3d],
    norm: type[nn.BatchNorm2d] | type[nn.BatchNorm3d],
    in_channels: int,
    channels: int,
    n_layers: int,
    kernel: int,
    strides: list,
) -> nn.Sequential:
    """taming's PatchGAN layout with 2D or 3D layers: a conv (strides[0]) + LeakyReLU(0.2); n_layers - 1
    more (strides[n]) with BatchNorm, widths x2 up to x8; a stride-1 conv + BatchNorm + LeakyReLU; a
    stride-1 conv to one channel. Conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02) and biases 0."""
    layers: list[nn.Module] = [conv(in_channels, channels, kernel, strides[0], 1), nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        layers += [
            conv(channels * prev, channels * mult, kernel, strides[n], 1, bias=False),
            norm(channels * mult),
            nn.LeakyReLU(0.2),
        ]
    prev, mult = mult, min(2**n_layers, 8)
    layers += [
        conv(channels * prev, channels * mult, kernel, 1, 1, bias=False),
        norm(channels * mult),
        nn.LeakyReLU(0.2),
        conv(channels * mult, 1, kernel, 1, 1),
    ]
    main = nn.Sequential(*layers)
    for m in main.modules():
        if isinstance(m, conv):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, norm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return main


class NLayerDiscriminator(nn.Module):
    """PatchGAN of pix2pix / taming: (B, C, H, W) image -> (B, 1, h, w) patch logits.

    patchgan's layout with 4x4 convolutions, stride 2 at every downsampling layer. 64 px in, n_layers=3:
    6x6 out; 256 px: 30x30; inputs need H, W >= 3 * 2**n_layers. Module names (main.N) match taming's, so
    its weights load.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        self.main = patchgan(nn.Conv2d, nn.BatchNorm2d, in_channels, channels, n_layers, 4, [2] * n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class NLayerDiscriminator3D(nn.Module):
    """The PatchGAN for clips: (B, C, T, H, W) -> (B, 1, t, h, w) spatio-temporal patch logits.

    The design of Open-Sora-Plan's causal video VAE (its NLayerDiscriminator3D, also used by CV-VAE): the
    taming layout (patchgan) with Conv3d and BatchNorm3d, kernels 3x3x3 with padding 1 (so that a one-frame
    clip, an image of a mixed batch, passes through: a padded 3-frame window over one frame leaves one),
    stride 2 in height and width at every downsampling layer and in time at the first two only (a 9-frame
    clip keeps 3 frames of patches; a 5-frame one 2). Widths, LeakyReLU(0.2) and initialisation as taming's.
    Inputs need H, W >= 2**n_layers.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        strides = [2] + [(2 if n == 1 else 1, 2, 2) for n in range(1, n_layers)]
        self.main = patchgan(nn.Conv3d, nn.BatchNorm3d, in_channels, channels, n_layers, 3, strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
