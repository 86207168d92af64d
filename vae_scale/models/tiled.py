"""Tiled encode and decode with whole-image GroupNorm statistics: the untiled result, a tile at a time.

The encoder or decoder runs layer by layer over the whole image, each layer tile by tile (tiles do not
overlap). A convolution computes one output tile at a time from its input window: the tile plus the halo
its kernel reaches, read from the neighbouring tiles' values, zeros only outside the image, as untiled.
A GroupNorm first gathers each tile's per-group count, mean and sum of squared deviations (float64,
merged with Chan's parallel formula, every position counted once), then normalises every window with the
whole image's statistics. The mid-block attention runs on the whole lowest-resolution activation. Nothing
differs from the untiled computation but the order of floating-point sums, so the result equals the
untiled one to rounding, whatever the tile size.

Between layers a layer's whole activation waits in the store: host memory when `offload` and the model is
on an accelerator, else the model's device. The model's device then holds the weights, one window of a
layer at a time (its input, the normalised copy, the output tile) and, for attention, the whole
lowest-resolution activation; the store holds what an untiled pass holds (at most three whole activations
of a layer: a ResNet block's input for its skip, the hidden one, the output). Each layer's windows cross
to the device and back, which is the time offloading costs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

Span = tuple[int, int]


class TiledRun:
    """Where activations wait (store) and are computed (device), and the tile size in image pixels.

    moved: bytes read from the store to the device and written back, which cross between host and
    device when they differ (counted either way: the cost of offloading).
    """

    def __init__(self, tile: int, device: torch.device, store: torch.device):
        self.tile, self.device, self.store = tile, device, store
        self.moved = 0

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        self.moved += t.numel() * t.element_size()
        return t.to(self.device)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        self.moved += t.numel() * t.element_size()
        return t.to(self.store)

    def spans(self, n: int, scale: int) -> list[Span]:
        """The tiles along a side of n positions at a level where one position is `scale` image pixels."""
        t = self.tile // scale
        return [(a, min(a + t, n)) for a in range(0, n, t)]

    def tiles(self, h: int, w: int, scale: int) -> list[tuple[Span, Span]]:
        return [(r, c) for r in self.spans(h, scale) for c in self.spans(w, scale)]


def _pad_outside(win: torch.Tensor, rows: Span, cols: Span, h: int, w: int) -> torch.Tensor:
    """win (the part of rows x cols inside an h x w image) zero-padded to rows x cols: a conv's padding."""
    pad = (max(-cols[0], 0), max(cols[1] - w, 0), max(-rows[0], 0), max(rows[1] - h, 0))
    return F.pad(win, pad) if any(pad) else win


def _read(run: TiledRun, x: torch.Tensor, rows: Span, cols: Span, pre=None) -> torch.Tensor:
    """x[..., rows, cols] on the device after `pre` (a norm, a 1x1 conv), zeros where the range leaves x."""
    h, w = x.shape[2:]
    win = run.fetch(x[:, :, max(rows[0], 0) : min(rows[1], h), max(cols[0], 0) : min(cols[1], w)])
    return _pad_outside(win if pre is None else pre(win), rows, cols, h, w)


def _read_upsampled(run: TiledRun, x: torch.Tensor, rows: Span, cols: Span, pre=None) -> torch.Tensor:
    """rows x cols of x upsampled 2x (nearest, as Upsample), read from x's covering window only."""
    h, w = x.shape[2:]
    r0, r1, c0, c1 = max(rows[0], 0), min(rows[1], 2 * h), max(cols[0], 0), min(cols[1], 2 * w)
    a, c = r0 // 2, c0 // 2
    win = run.fetch(x[:, :, a : (r1 + 1) // 2, c : (c1 + 1) // 2])
    up = F.interpolate(win if pre is None else pre(win), scale_factor=2.0, mode="nearest")
    up = up[:, :, r0 - 2 * a : r1 - 2 * a, c0 - 2 * c : c1 - 2 * c]
    return _pad_outside(up, rows, cols, 2 * h, 2 * w)


def conv(
    run: TiledRun,
    x: torch.Tensor,
    layer: nn.Conv2d,
    scale: int,
    pre=None,
    post=None,
    trail: int | None = None,
    upsample: bool = False,
) -> torch.Tensor:
    """layer(pre(x)) tile by tile into a new stored tensor; `scale`: image pixels per output position.

    trail: zero padding after the last row/column (default the layer's padding; Downsample's 1 with a
    padding-0 layer); upsample: x is first upsampled 2x (Upsample); post(out_tile, rows, cols): a pointwise
    step on each output tile (a residual's skip).
    """
    k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
    trail = p if trail is None else trail
    read = _read_upsampled if upsample else _read
    h, w = (2 * x.shape[2], 2 * x.shape[3]) if upsample else x.shape[2:]
    ho, wo = (h + p + trail - k) // s + 1, (w + p + trail - k) // s + 1
    out = None
    for rows, cols in run.tiles(ho, wo, scale):
        # output positions o read input positions [s * o - p, s * o - p + k)
        need = [(s * a - p, s * (b - 1) - p + k) for a, b in (rows, cols)]
        t = F.conv2d(read(run, x, need[0], need[1], pre), layer.weight, layer.bias, stride=s)
        if post is not None:
            t = post(t, rows, cols)
        if out is None:
            out = torch.empty((x.shape[0], t.shape[1], ho, wo), dtype=t.dtype, device=run.store)
        out[:, :, rows[0] : rows[1], cols[0] : cols[1]] = run.put(t)
    return out


def group_norm_silu_given_stats(
    x: torch.Tensor, norm: nn.Module, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """norm (a model.GroupNorm: groups, affine, SiLU) applied to x with the given (B, groups) statistics.

    Eager (the fused kernel computes its own statistics). A bf16 / fp16 x is normalised in fp32 and cast
    back once, as the kernel and torch's own group_norm do.
    """
    B, C = x.shape[:2]
    xin = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    g = xin.reshape(B, norm.num_groups, -1)
    g = (g - mean.to(xin.dtype)[..., None]) * rstd.to(xin.dtype)[..., None]
    shape = (1, C) + (1,) * (x.ndim - 2)
    y = g.reshape(x.shape) * norm.weight.to(xin.dtype).view(shape) + norm.bias.to(xin.dtype).view(shape)
    return (F.silu(y) if norm.silu else y).to(x.dtype)


def normaliser(run: TiledRun, x: torch.Tensor, norm: nn.Module, scale: int):
    """norm with the whole image's statistics, gathered from x tile by tile, as a function of a window."""
    B, C, h, w = x.shape
    G = norm.num_groups
    count, mean, m2 = 0, torch.zeros(B, G, dtype=torch.float64, device=run.device), None
    for rows, cols in run.tiles(h, w, scale):
        t = run.fetch(x[:, :, rows[0] : rows[1], cols[0] : cols[1]]).double().reshape(B, G, -1)
        n = t.shape[2]
        t_mean = t.mean(2)
        t_m2 = (t - t_mean[..., None]).square().sum(2)
        if m2 is None:
            count, mean, m2 = n, t_mean, t_m2
            continue
        # Chan et al.'s pairwise merge: no sum of squares minus squared sum to cancel
        delta, total = t_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + t_m2 + delta.square() * (count * n / total)
        count = total
    rstd = (m2 / count + norm.eps).rsqrt()
    return lambda win: group_norm_silu_given_stats(win, norm, mean, rstd)


def resnet(run: TiledRun, x: torch.Tensor, block: nn.Module, scale: int) -> torch.Tensor:
    """A model.ResnetBlock: conv1(norm1(x)), then skip(x) + conv2(norm2(h)), tile by tile."""
    h = conv(run, x, block.conv1, scale, pre=normaliser(run, x, block.norm1, scale))

    def add_skip(t: torch.Tensor, rows: Span, cols: Span) -> torch.Tensor:
        skip = run.fetch(x[:, :, rows[0] : rows[1], cols[0] : cols[1]])
        return (skip if block.conv_shortcut is None else block.conv_shortcut(skip)) + t

    return conv(run, h, block.conv2, scale, pre=normaliser(run, h, block.norm2, scale), post=add_skip)


def mid_block(run: TiledRun, x: torch.Tensor, block: nn.Module, scale: int) -> torch.Tensor:
    """A model.MidBlock; its attention sees the whole lowest-resolution activation, on the device."""
    x = resnet(run, x, block.resnets[0], scale)
    if block.attentions is not None:
        x = run.put(block.attentions[0](run.fetch(x)))
    return resnet(run, x, block.resnets[1], scale)


def encode_moments(vae: nn.Module, x: torch.Tensor, run: TiledRun) -> torch.Tensor:
    """vae's posterior moments (B, 2C, H/f, W/f) of x, computed as the module docstring says."""
    enc, scale = vae.encoder, 1
    h = conv(run, x.to(run.store), enc.conv_in, scale)
    for block in enc.down_blocks:
        for layer in block.resnets:
            h = resnet(run, h, layer, scale)
        if block.downsamplers is not None:
            scale *= 2
            h = conv(run, h, block.downsamplers[0].conv, scale, trail=1)  # Downsample's (0, 1, 0, 1) pad
    h = mid_block(run, h, enc.mid_block, scale)
    quant = vae.quant_conv
    post = None if quant is None else lambda t, rows, cols: quant(t)
    return conv(run, h, enc.conv_out, scale, pre=normaliser(run, h, enc.conv_norm_out, scale), post=post)


def decode_image(vae: nn.Module, z: torch.Tensor, run: TiledRun, factor: int) -> torch.Tensor:
    """vae's image (B, 3, h*f, w*f) of the latent z, computed as the module docstring says."""
    dec, scale = vae.decoder, factor
    h = conv(run, z.to(run.store), dec.conv_in, scale, pre=vae.post_quant_conv)  # 1x1, before the padding
    h = mid_block(run, h, dec.mid_block, scale)
    for block in dec.up_blocks:
        for layer in block.resnets:
            h = resnet(run, h, layer, scale)
        if block.upsamplers is not None:
            scale //= 2
            h = conv(run, h, block.upsamplers[0].conv, scale, upsample=True)
    return conv(run, h, dec.conv_out, scale, pre=normaliser(run, h, dec.conv_norm_out, scale))
