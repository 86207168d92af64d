"""The latent diffusion probe's model: a small unconditional SiT (Ma et al. 2024), the DiT backbone (Peebles
and Xie 2023) trained as a flow: patchify, adaLN-Zero transformer blocks conditioned on the timestep, a
zero-initialised linear head, unpatchify. Class-free: the probe asks how easily the latents' distribution is
learned, not how well a label steers it.

The model is built for one latent shape (the fixed 2D sin-cos positional embedding has one grid) and
predicts the flow-matching velocity of a noised latent; vae_scale/commands/probe.py trains and scores it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """DiT's fixed positional embedding (gh * gw, dim): half the channels encode the row, half the column,
    each as sin and cos of the position at dim / 4 frequencies 1 / 10000^(k / (dim / 4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angle = pos[:, None] * omega[None]  # (N, dim / 4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1).float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, width): sinusoidal features of 1000 t (DiT's timestep range, so the 256
    frequencies span it as they do in DiT and SiT), then a two-layer MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angle = 1000 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angle.cos(), angle.sin()], 1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised, then scaled and shifted per sample (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """A DiT block with adaLN-Zero: attention and MLP, each gated by a per-sample factor that the timestep
    embedding sets and that starts at zero, so every block starts as the identity."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, 1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = (
            self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        )  # (B, nh, N, hs)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + gate1[:, None] * self.proj(h)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class SiT(nn.Module):
    """Velocity v(x_t, t) of latents (B, C, h, w) at times t (B,) in [0, 1]; h and w multiples of `patch`."""

    def __init__(
        self, latent_shape: tuple[int, int, int], width: int, depth: int, heads: int, patch: int
    ) -> None:
        super().__init__()
        C, h, w = latent_shape
        if h % patch or w % patch:
            raise ValueError(f"latent {h}x{w} is not a whole number of {patch}x{patch} patches")
        if width % heads or width % 4:
            raise ValueError(f"width {width} must be a multiple of 4 and of the {heads} heads")
        self.latent_shape, self.patch = (C, h, w), patch
        self.embed = nn.Conv2d(C, width, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(width, h // patch, w // patch)[None], persistent=False)
        self.time = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, patch * patch * C)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's: Xavier-uniform linears and patch embedding, N(0, 0.02) timestep MLP, and zeros for every
        adaLN modulation and the head (adaLN-Zero: the model starts out predicting v = 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.embed.weight.view(self.embed.weight.shape[0], -1))
        nn.init.zeros_(self.embed.bias)
        for layer in (self.time.mlp[0], self.time.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for ada in [b.ada for b in self.blocks] + [self.ada]:
            nn.init.zeros_(ada[1].weight)
            nn.init.zeros_(ada[1].bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        p = self.patch
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D), N = (h / p) * (w / p)
        c = self.time(t)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.ada(c).chunk(2, 1)
        out = self.head(modulate(self.norm(tokens), shift, scale))  # (B, N, p * p * C)
        out = out.view(B, h // p, w // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h / p, p, w / p, p)
        return out.reshape(B, C, h, w)
