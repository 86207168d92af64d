"""The PatchGAN discriminators of the objective: latent diffusion's for images (taming's
NLayerDiscriminator) and a 3D one for clips."""

from __future__ import annotations

import torch
import torch.nn as nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN of pix2pix / taming: (B, C, H, W) image -> (B, 1, h, w) patch logits.

    Conv 4x4 stride 2 + LeakyReLU(0.2); n_layers - 1 more of those with BatchNorm (widths x2 up to x8);
    a stride-1 conv + BatchNorm + LeakyReLU; a stride-1 conv to one channel. 64 px in, n_layers=3: 6x6 out;
    256 px: 30x30; inputs need H, W >= 3 * 2**n_layers. Conv weights ~ N(0, 0.02), BatchNorm weights
    ~ N(1, 0.02) and biases 0, as in taming. Module names (main.N) match taming's, so its weights load.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, 2, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(channels * prev, channels * mult, 4, 1, 1, bias=False),
            nn.BatchNorm2d(channels * mult),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class NLayerDiscriminator3D(nn.Module):
    """The PatchGAN for clips: (B, C, T, H, W) -> (B, 1, t, h, w) spatio-temporal patch logits.

    The design of Open-Sora-Plan's causal video VAE (its NLayerDiscriminator3D, also used by CV-VAE): the
    taming layout above with Conv3d and BatchNorm3d, kernels 3x3x3 with padding 1 (so that a one-frame clip,
    an image of a mixed batch, passes through: a padded 3-frame window over one frame leaves one), stride 2
    in height and width at every downsampling layer and in time at the first two only (a 9-frame clip keeps
    3 frames of patches; a 5-frame one 2). Widths, LeakyReLU(0.2) and initialisation as taming's. Inputs need
    H, W >= 2**n_layers.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels, 3, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            stride = (2 if n == 1 else 1, 2, 2)
            layers += [
                nn.Conv3d(channels * prev, channels * mult, 3, stride, 1, bias=False),
                nn.BatchNorm3d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv3d(channels * prev, channels * mult, 3, 1, 1, bias=False),
            nn.BatchNorm3d(channels * mult),
            nn.LeakyReLU(0.2),
            nn.Conv3d(channels * mult, 1, 3, 1, 1),
        ]
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
