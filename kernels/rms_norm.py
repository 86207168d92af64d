"""RMSNorm over the channels of each pixel, with an optional fused activation (SiLU or ReLU), for NCHW and
channels_last inputs.

This is DC-AE's norm (diffusers' `RMSNorm` applied to `x.movedim(1, -1)`): at every (b, *spatial) position,
y_c = act(x_c / sqrt(mean_c(x^2) + eps) * w_c + bias_c), the mean over the C channels. The eager reference
below is the specification: statistics and the whole op in fp32 (float64 for float64 x), the result cast to
x's dtype once.

The Triton path sees x as (B, C, S), S the flattened spatial dims, through its strides (NCHW, channels_last
and batch-strided views of either are read in place, as in kernels/group_norm.py, whose streaming-kernel
helpers it uses). Two kinds of kernel:
  row kernels       program = a run of pixel tiles; for each tile, a loop over blocks of channels reduces
                    over C into one fp32 value per pixel;
  streaming kernels program = (b, channel block, run of pixel tiles), as GroupNorm's apply kernels, with the
                    per-pixel values loaded per tile instead of per-group ones per program.
Launches:
  forward   stats (rstd per pixel) -> apply (y = act(x * rstd * w + bias));
  backward  reduce (c per pixel = mean_c(g * w * xhat), g = dL/d(pre-activation), xhat = x * rstd)
            -> apply (dx = rstd * (g * w - xhat * c), and per-channel partial sums of g and g * xhat)
            -> param (dweight, dbias: the partials summed in a fixed order).
Bytes per element of x (s bytes each), the per-pixel fp32 values and the partials aside: forward 3 s (x read
by stats, x read and y written by apply); backward 5 s (x, dy read by reduce; x, dy read and dx written by
apply): 8 s in all, as GroupNorm+SiLU.

NaN and Inf follow the reference's arithmetic element by element: a NaN in a pixel's channels makes the
whole pixel NaN; an Inf makes its mean square Inf, rstd 0, and the element Inf * 0 = NaN while the pixel's
other channels come out as act(bias); ReLU keeps a NaN (relu(NaN) = NaN) and passes the gradient through a
NaN pre-activation, as torch's threshold_backward does.
"""

from __future__ import annotations

import math

import torch

from . import common
from .common import silu_parts, tl, triton
from .group_norm import (
    _bcs_strides,
    _channels_last_like,
    _empty_like_layout,
    _grid,
    _grid_args,
    _load_tile,
    _mask,
    _readable,
    _run,
    _store_tile,
    _tiling,
)

ACTS = ("silu", "relu", "none")
_ACT_CODE = {"none": 0, "relu": 1, "silu": 2}

# Elements per tile with 8 warps: 16 per thread in the forward; 4 in the backward, whose apply kernel holds
# x, dy, two accumulators and the per-pixel and per-channel values (8, GroupNorm's, spilled on sm_100 with
# 512 channels in channels_last).
TILE_FWD = 4096
TILE_BWD = 1024
NUM_WARPS = 8
# Pixel tiles a row kernel's grid aims for in NCHW: a few waves of a large GPU's programs.
ROW_TILES = 1024
# The row kernels run 4 warps on the backward's tile (8 values per thread): with 8 warps ptxas held them to
# 40-48 registers on sm_80 and spilled (the stats kernel at 512 channels, the backward reduce at 128, NCHW).
ROW_WARPS = 4

# --------------------------------------------------------------------------------------------------------
# Eager reference (the specification)


def rms_norm_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    act: str = "silu",
) -> torch.Tensor:
    """Eager reference: RMSNorm over dim 1 of (B, C, *spatial), affine, then act; returned in x's dtype.

    Computed in fp32 (float64 for float64 x). diffusers' RMSNorm with bf16/fp16 weights rounds the normalised
    x to the weights' dtype before the affine step and returns that dtype; with fp32 weights it returns fp32.
    This op rounds once, at the end, to x's dtype (the conv after it would cast to that dtype anyway).
    """
    xin = x.double() if x.dtype == torch.float64 else x.float()
    view = (x.shape[1],) + (1,) * (x.ndim - 2)
    y = xin * torch.rsqrt(xin.square().mean(1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xin.dtype).view(view)
    if bias is not None:
        y = y + bias.to(xin.dtype).view(view)
    if act == "silu":
        y = torch.nn.functional.silu(y)
    elif act == "relu":
        y = torch.relu(y)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# Input checks, shared by both implementations


def check_inputs(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, act: str) -> None:
    """Raise ValueError, naming the argument, for anything either implementation would get wrong.

    weight and bias (each optional, shape (C,)) share one dtype: x's, or float32 with a bf16/fp16 x (fp32
    master weights under mixed precision).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[1] < 1:
        raise ValueError(
            f"x must be a (B, C, ...) tensor with C >= 1, got {getattr(x, 'shape', type(x).__name__)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    C = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or p.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},), got {tuple(getattr(p, 'shape', ()))}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
        if p.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{name} dtype {p.dtype} must be x's dtype ({x.dtype}) or float32")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise ValueError(f"weight ({weight.dtype}) and bias ({bias.dtype}) must share one dtype")


# --------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _act(u, ACT: tl.constexpr):
    """act(u) for ACT 0 (none), 1 (relu), 2 (silu). ReLU as a select, not tl.maximum: max drops a NaN."""
    if ACT == 2:
        _, u = silu_parts(u)
    elif ACT == 1:
        u = tl.where(u <= 0.0, 0.0, u)
    return u


@triton.jit
def _act_grad(dy, u, ACT: tl.constexpr):
    """dL/du from dL/dy = dy at pre-activation u. ReLU's zeroes the gradient where u <= 0 and passes it
    where u is NaN, as torch's threshold_backward; silu'(u) = sig * (1 + u * (1 - sig))."""
    if ACT == 2:
        sig, _ = silu_parts(u)
        dy = dy * sig * (1.0 + u * (1.0 - sig))
    elif ACT == 1:
        dy = tl.where(u <= 0.0, 0.0, dy)
    return dy


@triton.jit(do_not_specialize=["NUM_SPLITS", "TILES_PER_SPLIT", "RUNS_PER_PROGRAM", "RUNS"])
def _rms_stats_kernel(
    x_ptr, rstd_ptr,
    C, S, s_xb, s_xc, s_xs,
    NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS, INV_C, EPS,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # rstd = 1 / sqrt(mean_c(x^2) + eps) per pixel. A NaN stays NaN; an Inf gives a mean square of Inf and
    # rstd 0, as torch.rsqrt(inf) does.
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b, _, split, s0, full_end, s_end = _run(run, 1, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S)
        s_loc = tl.arange(0, BLOCK_S)
        c_loc = tl.arange(0, BLOCK_C)
        offs = s_loc[:, None] * s_xs + c_loc[None, :] * s_xc
        tile = x_ptr + b.to(tl.int64) * s_xb + s0.to(tl.int64) * s_xs
        rstd = rstd_ptr + b.to(tl.int64) * S + s0
        for s in range(s0, s_end, BLOCK_S):
            smask = s_loc < s_end - s
            x = tile
            acc = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                m = smask[:, None] & (c_loc < C - c0)[None, :]
                v = tl.load(x + offs, mask=m, other=0.0).to(tl.float32)
                acc += v * v
                x += BLOCK_C * s_xc
            ms = tl.sum(acc, axis=1) * INV_C
            tl.store(rstd + s_loc, 1.0 / tl.sqrt(ms + EPS), mask=smask)
            tile += BLOCK_S * s_xs
            rstd += BLOCK_S


@triton.jit
def _fwd_apply_tile(x, y, x_offs, y_offs, rstd, w, bb, s_loc, rem_s, cmask,
                    ACT: tl.constexpr, MASK_C: tl.constexpr, MASK_S: tl.constexpr):  # fmt: skip
    if MASK_S:
        r = tl.load(rstd + s_loc, mask=s_loc < rem_s, other=0.0)
    else:
        r = tl.load(rstd + s_loc)
    # xhat first, then the affine step, as the reference: an Inf element times rstd 0 is NaN there and 0
    # in the pixel's other channels, whatever the weight
    xhat = _load_tile(x, x_offs, s_loc, rem_s, cmask, MASK_C, MASK_S) * r[:, None]
    _store_tile(y, y_offs, _act(xhat * w[None, :] + bb[None, :], ACT), s_loc, rem_s, cmask, MASK_C, MASK_S)


@triton.jit(do_not_specialize=["NUM_SPLITS", "TILES_PER_SPLIT", "RUNS_PER_PROGRAM", "RUNS"])
def _rms_fwd_apply_kernel(
    x_ptr, y_ptr, w_ptr, bias_ptr, rstd_ptr,
    C, S, s_xb, s_xc, s_xs, s_yb, s_yc, s_ys,
    NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, MASK_C: tl.constexpr,
):  # fmt: skip
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b, cb, split, s0, full_end, s_end = _run(run, NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S)
        s_loc = tl.arange(0, BLOCK_S)
        c_loc = tl.arange(0, BLOCK_C)
        c = cb * BLOCK_C + c_loc
        cmask = c < C
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        x_offs = s_loc[:, None] * s_xs + c_loc[None, :] * s_xc
        y_offs = s_loc[:, None] * s_ys + c_loc[None, :] * s_yc
        c0 = (cb * BLOCK_C).to(tl.int64)
        b64 = b.to(tl.int64)
        x = x_ptr + b64 * s_xb + c0 * s_xc + s0.to(tl.int64) * s_xs
        y = y_ptr + b64 * s_yb + c0 * s_yc + s0.to(tl.int64) * s_ys
        rstd = rstd_ptr + b64 * S + s0
        for _ in range(s0, full_end, BLOCK_S):
            _fwd_apply_tile(x, y, x_offs, y_offs, rstd, w, bb, s_loc, BLOCK_S, cmask, ACT, MASK_C, False)
            x += BLOCK_S * s_xs
            y += BLOCK_S * s_ys
            rstd += BLOCK_S
        if s_end > full_end:
            rem = s_end - full_end
            _fwd_apply_tile(x, y, x_offs, y_offs, rstd, w, bb, s_loc, rem, cmask, ACT, MASK_C, True)


@triton.jit(do_not_specialize=["NUM_SPLITS", "TILES_PER_SPLIT", "RUNS_PER_PROGRAM", "RUNS"])
def _rms_bwd_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, bias_ptr, rstd_ptr, c_ptr,
    C, S, s_xb, s_xc, s_xs, s_db, s_dc, s_ds,
    NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS, INV_C,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # c = mean_c(g * w * xhat) per pixel: the part of dx that flows through rstd.
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b, _, split, s0, full_end, s_end = _run(run, 1, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S)
        s_loc = tl.arange(0, BLOCK_S)
        c_loc = tl.arange(0, BLOCK_C)
        x_offs = s_loc[:, None] * s_xs + c_loc[None, :] * s_xc
        d_offs = s_loc[:, None] * s_ds + c_loc[None, :] * s_dc
        b64 = b.to(tl.int64)
        x_tile = x_ptr + b64 * s_xb + s0.to(tl.int64) * s_xs
        d_tile = dy_ptr + b64 * s_db + s0.to(tl.int64) * s_ds
        rstd = rstd_ptr + b64 * S + s0
        cpix = c_ptr + b64 * S + s0
        for s in range(s0, s_end, BLOCK_S):
            smask = s_loc < s_end - s
            r = tl.load(rstd + s_loc, mask=smask, other=0.0)
            x = x_tile
            dy = d_tile
            acc = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cmask = c_loc < C - c0
                m = smask[:, None] & cmask[None, :]
                w = tl.load(w_ptr + c0 + c_loc, mask=cmask, other=0.0).to(tl.float32)
                bb = tl.load(bias_ptr + c0 + c_loc, mask=cmask, other=0.0).to(tl.float32)
                xhat = tl.load(x + x_offs, mask=m, other=0.0).to(tl.float32) * r[:, None]
                g = tl.load(dy + d_offs, mask=m, other=0.0).to(tl.float32)
                g = _act_grad(g, xhat * w[None, :] + bb[None, :], ACT)
                acc += tl.where(m, g * w[None, :] * xhat, 0.0)
                x += BLOCK_C * s_xc
                dy += BLOCK_C * s_dc
            tl.store(cpix + s_loc, tl.sum(acc, axis=1) * INV_C, mask=smask)
            x_tile += BLOCK_S * s_xs
            d_tile += BLOCK_S * s_ds
            rstd += BLOCK_S
            cpix += BLOCK_S


@triton.jit
def _bwd_apply_tile(x, dy, dx, x_offs, d_offs, o_offs, rstd, cpix, w, bb, acc_g, acc_gx, s_loc, rem_s, cmask,
                    ACT: tl.constexpr, MASK_C: tl.constexpr, MASK_S: tl.constexpr):  # fmt: skip
    if MASK_S:
        r = tl.load(rstd + s_loc, mask=s_loc < rem_s, other=0.0)
        k = tl.load(cpix + s_loc, mask=s_loc < rem_s, other=0.0)
    else:
        r = tl.load(rstd + s_loc)
        k = tl.load(cpix + s_loc)
    xhat = _load_tile(x, x_offs, s_loc, rem_s, cmask, MASK_C, MASK_S) * r[:, None]
    g = _load_tile(dy, d_offs, s_loc, rem_s, cmask, MASK_C, MASK_S)
    g = _act_grad(g, xhat * w[None, :] + bb[None, :], ACT)
    out = r[:, None] * (g * w[None, :] - xhat * k[:, None])
    _store_tile(dx, o_offs, out, s_loc, rem_s, cmask, MASK_C, MASK_S)
    if MASK_S or MASK_C:
        g = tl.where(_mask(s_loc, rem_s, cmask, MASK_C, MASK_S), g, 0.0)
        xhat = tl.where(_mask(s_loc, rem_s, cmask, MASK_C, MASK_S), xhat, 0.0)
    return acc_g + g, acc_gx + g * xhat


@triton.jit(do_not_specialize=["NUM_SPLITS", "TILES_PER_SPLIT", "RUNS_PER_PROGRAM", "RUNS"])
def _rms_bwd_apply_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, bias_ptr, rstd_ptr, c_ptr, gsum_ptr, gxsum_ptr,
    C, S, s_xb, s_xc, s_xs, s_db, s_dc, s_ds, s_ob, s_oc, s_os,
    NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, MASK_C: tl.constexpr,
):  # fmt: skip
    # dx = rstd * (g * w - xhat * c), and the run's per-channel sums of g and g * xhat (dbias, dweight).
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b, cb, split, s0, full_end, s_end = _run(run, NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S)
        s_loc = tl.arange(0, BLOCK_S)
        c_loc = tl.arange(0, BLOCK_C)
        c = cb * BLOCK_C + c_loc
        cmask = c < C
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        x_offs = s_loc[:, None] * s_xs + c_loc[None, :] * s_xc
        d_offs = s_loc[:, None] * s_ds + c_loc[None, :] * s_dc
        o_offs = s_loc[:, None] * s_os + c_loc[None, :] * s_oc
        c0 = (cb * BLOCK_C).to(tl.int64)
        b64 = b.to(tl.int64)
        x = x_ptr + b64 * s_xb + c0 * s_xc + s0.to(tl.int64) * s_xs
        dy = dy_ptr + b64 * s_db + c0 * s_dc + s0.to(tl.int64) * s_ds
        dx = dx_ptr + b64 * s_ob + c0 * s_oc + s0.to(tl.int64) * s_os
        rstd = rstd_ptr + b64 * S + s0
        cpix = c_ptr + b64 * S + s0
        acc_g = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        acc_gx = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        for _ in range(s0, full_end, BLOCK_S):
            acc_g, acc_gx = _bwd_apply_tile(
                x, dy, dx, x_offs, d_offs, o_offs, rstd, cpix, w, bb, acc_g, acc_gx, s_loc, BLOCK_S, cmask,
                ACT, MASK_C, False,
            )  # fmt: skip
            x += BLOCK_S * s_xs
            dy += BLOCK_S * s_ds
            dx += BLOCK_S * s_os
            rstd += BLOCK_S
            cpix += BLOCK_S
        if s_end > full_end:
            acc_g, acc_gx = _bwd_apply_tile(
                x, dy, dx, x_offs, d_offs, o_offs, rstd, cpix, w, bb, acc_g, acc_gx, s_loc, s_end - full_end,
                cmask, ACT, MASK_C, True,
            )  # fmt: skip
        out = (b * NUM_SPLITS + split).to(tl.int64) * C + c
        tl.store(gsum_ptr + out, tl.sum(acc_g, axis=0), mask=cmask)
        tl.store(gxsum_ptr + out, tl.sum(acc_gx, axis=0), mask=cmask)


@triton.jit
def _rms_bwd_param_kernel(
    gsum_ptr, gxsum_ptr, dw_ptr, db_ptr, C, ROWS, BLOCK_R: tl.constexpr, BLOCK_PC: tl.constexpr
):
    # dweight, dbias of a block of channels: the (b, split) partials summed in a fixed order.
    c = tl.program_id(0) * BLOCK_PC + tl.arange(0, BLOCK_PC)
    cmask = c < C
    acc_b = tl.zeros((BLOCK_R, BLOCK_PC), tl.float32)
    acc_w = tl.zeros((BLOCK_R, BLOCK_PC), tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < ROWS)[:, None] & cmask[None, :]
        off = r.to(tl.int64)[:, None] * C + c[None, :]
        acc_b += tl.load(gsum_ptr + off, mask=mask, other=0.0)
        acc_w += tl.load(gxsum_ptr + off, mask=mask, other=0.0)
    tl.store(db_ptr + c, tl.sum(acc_b, axis=0).to(db_ptr.dtype.element_ty), mask=cmask)
    tl.store(dw_ptr + c, tl.sum(acc_w, axis=0).to(dw_ptr.dtype.element_ty), mask=cmask)


# --------------------------------------------------------------------------------------------------------
# Launchers


def _row_grid(kernel, args, meta: dict, device: torch.device, B: int, S: int) -> common.Grid:
    """The grid of a row kernel: B rows of pixel tiles (each tile all C channels), by the common rule."""
    tiles = triton.cdiv(S, meta["BLOCK_S"])
    probe = common.Grid(1, tiles, 1, B)
    return common.grid(B, tiles, common.slots(kernel, args(probe), meta, device))


def _row_grid_args(g: common.Grid, B: int) -> tuple[int, ...]:
    """NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS of a row kernel."""
    return g.splits, g.tiles_per_split, g.runs_per_program, B * g.splits


def _row_tiling(x: torch.Tensor, C: int, S: int, tile: int) -> dict:
    """Tile of a row kernel: wide in channels for channels_last (as the streaming tile); in NCHW, pixels
    enough for coalesced rows but few enough that the B * S pixels make about ROW_TILES tiles, since every
    tile carries all C channels (a 1024-pixel tile would leave (32, 512, 64, 64) 128 programs)."""
    if _channels_last_like(x):
        t = _tiling(x, C, S, tile)
        return dict(BLOCK_S=t["BLOCK_S"], BLOCK_C=t["BLOCK_C"])
    want = triton.next_power_of_2(max(1, x.shape[0] * S // ROW_TILES))
    block_s = max(1, min(triton.next_power_of_2(S), max(32, min(256, want))))
    return dict(BLOCK_S=block_s, BLOCK_C=max(1, min(triton.next_power_of_2(C), tile // block_s)))


def _launch_forward(x, weight, bias, eps, act):
    B, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    x = _readable(x)
    y = _empty_like_layout(x)
    if B == 0 or S == 0:
        return y, x.new_ones((B, S), dtype=torch.float32)
    rstd = common.empty((B, S), torch.float32, x.device)
    sx, sy = _bcs_strides(x), _bcs_strides(y)
    row = dict(_row_tiling(x, C, S, TILE_BWD), num_warps=ROW_WARPS)

    def stats_args(g):
        return (x, rstd, C, S, *sx, *_row_grid_args(g, B), 1.0 / C, eps)

    g = _row_grid(_rms_stats_kernel, stats_args, row, x.device, B, S)
    _rms_stats_kernel[(g.programs,)](*stats_args(g), **row)

    tile = _tiling(x, C, S, TILE_FWD)
    meta = dict(tile, ACT=_ACT_CODE[act], num_warps=NUM_WARPS)

    def apply_args(g):
        return (x, y, weight, bias, rstd, C, S, *sx, *sy, *_grid_args(g, C, tile["BLOCK_C"], B))

    g = _grid(_rms_fwd_apply_kernel, apply_args, meta, x.device, B, C, S)
    _rms_fwd_apply_kernel[(g.programs,)](*apply_args(g), **meta)
    return y, rstd


def _launch_backward(grad_y, x, weight, bias, rstd, act):
    B, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    x, grad_y = _readable(x), _readable(grad_y)
    dx = _empty_like_layout(x)
    if B == 0 or S == 0:
        return dx.zero_(), torch.zeros_like(weight), torch.zeros_like(bias)
    sx, sd, so = _bcs_strides(x), _bcs_strides(grad_y), _bcs_strides(dx)
    code = _ACT_CODE[act]
    cpix = common.empty((B, S), torch.float32, x.device)
    row = dict(_row_tiling(x, C, S, TILE_BWD), ACT=code, num_warps=ROW_WARPS)

    def reduce_args(g):
        return (x, grad_y, weight, bias, rstd, cpix, C, S, *sx, *sd, *_row_grid_args(g, B), 1.0 / C)

    g = _row_grid(_rms_bwd_reduce_kernel, reduce_args, row, x.device, B, S)
    _rms_bwd_reduce_kernel[(g.programs,)](*reduce_args(g), **row)

    tile = _tiling(x, C, S, TILE_BWD)
    meta = dict(tile, ACT=code, num_warps=NUM_WARPS)

    def apply_args(g, part_g=cpix, part_gx=cpix):
        return (x, grad_y, dx, weight, bias, rstd, cpix, part_g, part_gx, C, S, *sx, *sd, *so,
                *_grid_args(g, C, tile["BLOCK_C"], B))  # fmt: skip

    g = _grid(_rms_bwd_apply_kernel, apply_args, meta, x.device, B, C, S)
    part_g = common.empty((B, g.splits, C), torch.float32, x.device)
    part_gx = common.empty((B, g.splits, C), torch.float32, x.device)
    _rms_bwd_apply_kernel[(g.programs,)](*apply_args(g, part_g, part_gx), **meta)

    dw = common.empty(weight.shape, weight.dtype, x.device)
    db = common.empty(bias.shape, bias.dtype, x.device)
    block_pc = min(triton.next_power_of_2(C), 128)
    _rms_bwd_param_kernel[(triton.cdiv(C, block_pc),)](
        part_g, part_gx, dw, db, C, B * g.splits,
        BLOCK_R=min(triton.next_power_of_2(B * g.splits), 32), BLOCK_PC=block_pc,
    )  # fmt: skip
    return dx, dw, db


# --------------------------------------------------------------------------------------------------------
# torch.library ops and autograd (custom_op with fake rules; see kernels/gaussian.py for why not triton_op)


@torch.library.custom_op("vae_kernels::rms_norm_act", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(x, weight, bias, eps, act)


@_forward_op.register_fake
def _(x, weight, bias, eps, act):
    rstd = x.new_empty((x.shape[0], math.prod(x.shape[2:])), dtype=torch.float32)
    return _empty_like_layout(_readable(x)), rstd


@torch.library.custom_op("vae_kernels::rms_norm_act_backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    rstd: torch.Tensor,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_y, x, weight, bias, rstd, act)


@_backward_op.register_fake
def _(grad_y, x, weight, bias, rstd, act):
    return _empty_like_layout(_readable(x)), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, act = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, bias, rstd)
    ctx.act = act


def _backward(ctx, grad_y, grad_rstd):
    x, weight, bias, rstd = ctx.saved_tensors
    dx, dw, db = _backward_op(grad_y, x, weight, bias, rstd, ctx.act)
    return dx, dw, db, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_act_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    act: str = "silu",
) -> torch.Tensor:
    """The fused Triton path, for inputs already through check_inputs. Returns y in x's dtype and layout.

    x is read in place if its spatial dims flatten to one stride (NCHW, channels_last, x.movedim(-1, 1) of a
    contiguous (B, ..., C) tensor, and batch-strided views of them); any other layout is first copied to a
    contiguous tensor. y is channels-last when x is, else contiguous. A missing weight or bias acts as ones
    or zeros.
    """
    common.require_triton(x.dtype)
    C = x.shape[1]
    pdtype = next((p.dtype for p in (weight, bias) if p is not None), torch.float32)
    weight = torch.ones(C, dtype=pdtype, device=x.device) if weight is None else weight.contiguous()
    bias = torch.zeros(C, dtype=pdtype, device=x.device) if bias is None else bias.contiguous()
    return _forward_op(x, weight, bias, float(eps), act)[0]
