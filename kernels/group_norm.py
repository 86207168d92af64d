"""GroupNorm with an optional fused SiLU, for NCHW and channels_last inputs.

The eager reference below is the specification: F.group_norm, then SiLU when silu is True, with statistics
in fp32 and the result in x's dtype.

The Triton path sees x as (B, C, S), S the flattened spatial dims, through its strides: NCHW (channel stride
S, spatial stride 1), channels_last (channel stride 1, spatial stride C) and batch-strided views of either
are all read in place. A group of (32, 128, 256, 256) holds 4 * 65536 elements, far too much for one program,
so every reduction is split over (batch, channel block, spatial split) programs that write per-channel
partial sums, and a small kernel combines them per group. Launches:
  forward   stats (per-channel partial sums of x - shift) -> stats_finalize (mean, rstd per group)
            -> apply (y = silu(x * a_c + b_c), a_c = rstd * w_c, b_c = bias_c - mean * a_c);
  backward  reduce (per-channel partial sums of g and g * xhat, g = dL/d(pre-activation))
            -> finalize (per-group coefficients of dx, and dweight, dbias in the same launch)
            -> apply (dx).
Bytes per element of x (s bytes each), the partial sums (B * splits * C floats) aside:
  forward 3 s (x read by stats, x read and y written by apply);
  backward 5 s (x, dy read by reduce; x, dy read and dx written by apply): 8 s in all.
Variance: per-group sums of (x - shift) and (x - shift)^2 in fp32, shift being the group's first element,
which keeps E[d^2] - E[d]^2 from cancelling when |mean| >> std. Its floor at zero keeps a NaN, so a NaN or
an Inf anywhere in a group makes the whole group NaN (y and every gradient), as in the reference; a NaN or
Inf weight or bias spoils its channel as the reference's arithmetic does.

The streaming kernels' grids come from the compiled kernel's occupancy (kernels/common.py): programs walk
runs of spatial tiles, as many as fill whole waves of the GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import common
from .common import silu_parts, tl, triton

# Elements per tile of the streaming kernels (a (BLOCK_S, BLOCK_C) block) with 8 warps: 16 per thread in
# the forward, 8 in the backward, which holds x, dy and two accumulators per element (16 would take 160-plus
# registers in channels_last and leave one block per SM).
TILE_FWD = 4096
TILE_BWD = 2048
NUM_WARPS = 8

# --------------------------------------------------------------------------------------------------------
# Eager reference (the specification)


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    silu: bool = True,
) -> torch.Tensor:
    """Eager reference: F.group_norm followed by SiLU when silu is True, returned in x's dtype.

    With fp32 weights on a lower-precision x (mixed precision), the whole op runs in fp32 and the result is
    cast back, which is what the kernel computes.
    """
    mixed = any(p is not None and p.dtype != x.dtype for p in (weight, bias))
    xin = x.float() if mixed else x
    w = None if weight is None else weight.to(xin.dtype)
    b = None if bias is None else bias.to(xin.dtype)
    y = F.group_norm(xin, num_groups, w, b, eps)
    y = F.silu(y) if silu else y
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# Input checks, shared by both implementations


def check_inputs(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> None:
    """Raise ValueError, naming the argument, for anything either implementation would get wrong.

    weight and bias (each optional, shape (C,)) share one dtype: x's, or float32 with a bf16/fp16 x (fp32
    master weights under mixed precision).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x must be a (B, C, ...) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive integer dividing x's {C} channels")
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
#
# The streaming kernels (stats, apply, backward reduce, backward apply) share one program shape: program
# (b, channel block, run) walks a contiguous run of spatial tiles of one sample's block of channels. The
# per-channel values (the shift, or the group's scale and offset) are loaded once per program, and the loop
# only moves a base pointer: in-tile offsets are int32 and computed once. A program takes one run or several
# consecutive ones (kernels/common.py's grid rule). Full tiles load and store without masks (with a channel
# mask only when C is not a multiple of the channel block); the sample's partial last tile, if the run holds
# it, is the one tile masked in space.


@triton.jit
def _run(run, NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S: tl.constexpr):
    """(b, channel block, split, first spatial index, end of its full tiles, end of the run) of a run."""
    split = run % NUM_SPLITS
    cb = (run // NUM_SPLITS) % NUM_CBLOCKS
    b = run // (NUM_SPLITS * NUM_CBLOCKS)
    s_start = split * TILES_PER_SPLIT * BLOCK_S
    s_end = tl.minimum(s_start + TILES_PER_SPLIT * BLOCK_S, S)
    full_end = tl.minimum(s_end, (S // BLOCK_S) * BLOCK_S)
    return b, cb, split, s_start, full_end, s_end


@triton.jit
def _mask(s_loc, rem_s, cmask, MASK_C: tl.constexpr, MASK_S: tl.constexpr):
    if MASK_S:
        return (s_loc < rem_s)[:, None] & cmask[None, :]
    else:
        return (s_loc >= 0)[:, None] & cmask[None, :]


@triton.jit
def _load_tile(ptr, offs, s_loc, rem_s, cmask, MASK_C: tl.constexpr, MASK_S: tl.constexpr):
    if MASK_S or MASK_C:
        return tl.load(ptr + offs, mask=_mask(s_loc, rem_s, cmask, MASK_C, MASK_S), other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def _store_tile(ptr, offs, value, s_loc, rem_s, cmask, MASK_C: tl.constexpr, MASK_S: tl.constexpr):
    if MASK_S or MASK_C:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=_mask(s_loc, rem_s, cmask, MASK_C, MASK_S))
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))


@triton.jit
def _stats_tile(x, offs, shift, acc1, acc2, s_loc, rem_s, cmask, MASK_C: tl.constexpr, MASK_S: tl.constexpr):
    d = _load_tile(x, offs, s_loc, rem_s, cmask, MASK_C, MASK_S) - shift[None, :]
    if MASK_S or MASK_C:
        d = tl.where(_mask(s_loc, rem_s, cmask, MASK_C, MASK_S), d, 0.0)
    return acc1 + d, acc2 + d * d


@triton.jit(do_not_specialize=["NUM_SPLITS", "TILES_PER_SPLIT", "RUNS_PER_PROGRAM", "RUNS"])
def _gn_stats_kernel(
    x_ptr, sum_ptr, sq_ptr,
    C, S, CPG, s_xb, s_xc, s_xs,
    NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, MASK_C: tl.constexpr,
):  # fmt: skip
    # Per-channel sums of x - shift and (x - shift)^2 over the program's run, shift = the first element of
    # the channel's group (the same for the whole group, so the per-channel partials add up to group sums).
    # Offsets from b are int64: one sample may pass 2**31 elements.
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b, cb, split, s0, full_end, s_end = _run(run, NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S)
        s_loc = tl.arange(0, BLOCK_S)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        sample = x_ptr + b.to(tl.int64) * s_xb
        shift = tl.load(sample + ((c // CPG) * CPG).to(tl.int64) * s_xc, mask=cmask, other=0.0).to(tl.float32)
        offs = s_loc[:, None] * s_xs + tl.arange(0, BLOCK_C)[None, :] * s_xc
        x = sample + (cb * BLOCK_C).to(tl.int64) * s_xc + s0.to(tl.int64) * s_xs
        acc1 = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        acc2 = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        for _ in range(s0, full_end, BLOCK_S):
            acc1, acc2 = _stats_tile(x, offs, shift, acc1, acc2, s_loc, BLOCK_S, cmask, MASK_C, False)
            x += BLOCK_S * s_xs
        if s_end > full_end:
            acc1, acc2 = _stats_tile(x, offs, shift, acc1, acc2, s_loc, s_end - full_end, cmask, MASK_C, True)
        out = (b * NUM_SPLITS + split).to(tl.int64) * C + c
        tl.store(sum_ptr + out, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(sq_ptr + out, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _gn_stats_finalize_kernel(
    x_ptr, sum_ptr, sq_ptr, mean_ptr, rstd_ptr,
    C, G, CPG, s_xb, s_xc, NUM_SPLITS, NUM_GBLOCKS, INV_N, EPS,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
):  # fmt: skip
    # Program (b, block of groups): combine the (runs, channels) partials into each group's mean and rstd.
    pid = tl.program_id(0)
    b = pid // NUM_GBLOCKS
    g = (pid % NUM_GBLOCKS) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < G
    acc1 = tl.zeros((BLOCK_G, BLOCK_CG), tl.float32)
    acc2 = tl.zeros((BLOCK_G, BLOCK_CG), tl.float32)
    for c0 in range(0, CPG, BLOCK_CG):
        j = c0 + tl.arange(0, BLOCK_CG)
        ch = g[:, None] * CPG + j[None, :]
        mask = gmask[:, None] & (j < CPG)[None, :]
        for p in range(0, NUM_SPLITS):
            row = (b * NUM_SPLITS + p).to(tl.int64) * C
            acc1 += tl.load(sum_ptr + row + ch, mask=mask, other=0.0)
            acc2 += tl.load(sq_ptr + row + ch, mask=mask, other=0.0)
    d_mean = tl.sum(acc1, axis=1) * INV_N
    # E[d^2] - E[d]^2 may round below zero; a NaN (from a NaN or an Inf in the group) must stay NaN
    var = tl.maximum(tl.sum(acc2, axis=1) * INV_N - d_mean * d_mean, 0.0, propagate_nan=tl.PropagateNan.ALL)
    shift = tl.load(x_ptr + b.to(tl.int64) * s_xb + (g * CPG).to(tl.int64) * s_xc, mask=gmask, other=0.0)
    tl.store(mean_ptr + b * G + g, shift.to(tl.float32) + d_mean, mask=gmask)
    tl.store(rstd_ptr + b * G + g, 1.0 / tl.sqrt(var + EPS), mask=gmask)


@triton.jit
def _fwd_apply_tile(x, y, x_offs, y_offs, a, sh, s_loc, rem_s, cmask,
                    SILU: tl.constexpr, MASK_C: tl.constexpr, MASK_S: tl.constexpr):  # fmt: skip
    u = _load_tile(x, x_offs, s_loc, rem_s, cmask, MASK_C, MASK_S) * a[None, :] + sh[None, :]
    if SILU:
        _, u = silu_parts(u)
    _store_tile(y, y_offs, u, s_loc, rem_s, cmask, MASK_C, MASK_S)


@triton.jit(do_not_specialize=["NUM_SPLITS", "TILES_PER_SPLIT", "RUNS_PER_PROGRAM", "RUNS"])
def _gn_fwd_apply_kernel(
    x_ptr, y_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr,
    C, S, G, CPG, s_xb, s_xc, s_xs, s_yb, s_yc, s_ys,
    NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, MASK_C: tl.constexpr,
):  # fmt: skip
    # y = act(x * a_c + b_c), one FMA per element before the activation.
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b, cb, split, s0, full_end, s_end = _run(run, NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S)
        s_loc = tl.arange(0, BLOCK_S)
        c_loc = tl.arange(0, BLOCK_C)
        c = cb * BLOCK_C + c_loc
        cmask = c < C
        grp = b * G + c // CPG
        mu = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
        rs = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
        a = rs * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        sh = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32) - mu * a
        x_offs = s_loc[:, None] * s_xs + c_loc[None, :] * s_xc
        y_offs = s_loc[:, None] * s_ys + c_loc[None, :] * s_yc
        c0 = (cb * BLOCK_C).to(tl.int64)
        x = x_ptr + b.to(tl.int64) * s_xb + c0 * s_xc + s0.to(tl.int64) * s_xs
        y = y_ptr + b.to(tl.int64) * s_yb + c0 * s_yc + s0.to(tl.int64) * s_ys
        for _ in range(s0, full_end, BLOCK_S):
            _fwd_apply_tile(x, y, x_offs, y_offs, a, sh, s_loc, BLOCK_S, cmask, SILU, MASK_C, False)
            x += BLOCK_S * s_xs
            y += BLOCK_S * s_ys
        if s_end > full_end:
            _fwd_apply_tile(x, y, x_offs, y_offs, a, sh, s_loc, s_end - full_end, cmask, SILU, MASK_C, True)


@triton.jit
def _bwd_g_xhat(x, dy, x_offs, d_offs, mu, rs, w, bb, s_loc, rem_s, cmask,
                SILU: tl.constexpr, MASK_C: tl.constexpr, MASK_S: tl.constexpr):  # fmt: skip
    """(g, xhat) of a tile: g = dL/d(pre-activation), xhat the normalised x."""
    xv = _load_tile(x, x_offs, s_loc, rem_s, cmask, MASK_C, MASK_S)
    g = _load_tile(dy, d_offs, s_loc, rem_s, cmask, MASK_C, MASK_S)
    xhat = (xv - mu[None, :]) * rs[None, :]
    if SILU:  # silu'(u) = sig * (1 + u * (1 - sig)), u = xhat * w + bias the pre-activation
        u = xhat * w[None, :] + bb[None, :]
        sig, _ = silu_parts(u)
        g = g * sig * (1.0 + u * (1.0 - sig))
    return g, xhat


@triton.jit(do_not_specialize=["NUM_SPLITS", "TILES_PER_SPLIT", "RUNS_PER_PROGRAM", "RUNS"])
def _gn_bwd_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, gsum_ptr, gxsum_ptr,
    C, S, G, CPG, s_xb, s_xc, s_xs, s_db, s_dc, s_ds,
    NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, MASK_C: tl.constexpr,
):  # fmt: skip
    # Per-channel sums of g and g * xhat over the program's run.
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b, cb, split, s0, full_end, s_end = _run(run, NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S)
        s_loc = tl.arange(0, BLOCK_S)
        c_loc = tl.arange(0, BLOCK_C)
        c = cb * BLOCK_C + c_loc
        cmask = c < C
        grp = b * G + c // CPG
        mu = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
        rs = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        x_offs = s_loc[:, None] * s_xs + c_loc[None, :] * s_xc
        d_offs = s_loc[:, None] * s_ds + c_loc[None, :] * s_dc
        c0 = (cb * BLOCK_C).to(tl.int64)
        x = x_ptr + b.to(tl.int64) * s_xb + c0 * s_xc + s0.to(tl.int64) * s_xs
        dy = dy_ptr + b.to(tl.int64) * s_db + c0 * s_dc + s0.to(tl.int64) * s_ds
        acc_g = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        acc_gx = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        for _ in range(s0, full_end, BLOCK_S):
            g, xhat = _bwd_g_xhat(
                x, dy, x_offs, d_offs, mu, rs, w, bb, s_loc, BLOCK_S, cmask, SILU, MASK_C, False
            )
            if MASK_C:
                g = tl.where(cmask[None, :], g, 0.0)
            acc_g += g
            acc_gx += g * xhat
            x += BLOCK_S * s_xs
            dy += BLOCK_S * s_ds
        if s_end > full_end:
            rem = s_end - full_end
            g, xhat = _bwd_g_xhat(x, dy, x_offs, d_offs, mu, rs, w, bb, s_loc, rem, cmask, SILU, MASK_C, True)
            g = tl.where(_mask(s_loc, rem, cmask, MASK_C, True), g, 0.0)
            acc_g += g
            acc_gx += g * xhat
        out = (b * NUM_SPLITS + split).to(tl.int64) * C + c
        tl.store(gsum_ptr + out, tl.sum(acc_g, axis=0), mask=cmask)
        tl.store(gxsum_ptr + out, tl.sum(acc_gx, axis=0), mask=cmask)


@triton.jit
def _gn_bwd_finalize_kernel(
    gsum_ptr, gxsum_ptr, w_ptr, c1_ptr, c2_ptr, dw_ptr, db_ptr,
    B, C, G, CPG, NUM_SPLITS, NUM_GBLOCKS, INV_N,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_PC: tl.constexpr,
):  # fmt: skip
    # Programs [0, B * NUM_GBLOCKS), one per (b, block of groups): the per-group means of dxhat and of
    #   dxhat * xhat that dx needs, c1 = sum_c w_c * sum(g) / n and c2 = sum_c w_c * sum(g * xhat) / n.
    # The programs after them: dweight and dbias for a block of channels, summed over batch and runs.
    # Two jobs in one launch because each is tiny and a launch costs more than either.
    pid = tl.program_id(0)
    if pid < B * NUM_GBLOCKS:
        b = pid // NUM_GBLOCKS
        g = (pid % NUM_GBLOCKS) * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = g < G
        acc1 = tl.zeros((BLOCK_G, BLOCK_CG), tl.float32)
        acc2 = tl.zeros((BLOCK_G, BLOCK_CG), tl.float32)
        for c0 in range(0, CPG, BLOCK_CG):
            j = c0 + tl.arange(0, BLOCK_CG)
            ch = g[:, None] * CPG + j[None, :]
            mask = gmask[:, None] & (j < CPG)[None, :]
            w = tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
            for p in range(0, NUM_SPLITS):
                row = (b * NUM_SPLITS + p).to(tl.int64) * C
                acc1 += tl.load(gsum_ptr + row + ch, mask=mask, other=0.0) * w
                acc2 += tl.load(gxsum_ptr + row + ch, mask=mask, other=0.0) * w
        tl.store(c1_ptr + b * G + g, tl.sum(acc1, axis=1) * INV_N, mask=gmask)
        tl.store(c2_ptr + b * G + g, tl.sum(acc2, axis=1) * INV_N, mask=gmask)
    else:
        c = (pid - B * NUM_GBLOCKS) * BLOCK_PC + tl.arange(0, BLOCK_PC)
        cmask = c < C
        acc_b = tl.zeros((BLOCK_R, BLOCK_PC), tl.float32)
        acc_w = tl.zeros((BLOCK_R, BLOCK_PC), tl.float32)
        for r0 in range(0, B * NUM_SPLITS, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mask = (r < B * NUM_SPLITS)[:, None] & cmask[None, :]
            off = r.to(tl.int64)[:, None] * C + c[None, :]
            acc_b += tl.load(gsum_ptr + off, mask=mask, other=0.0)
            acc_w += tl.load(gxsum_ptr + off, mask=mask, other=0.0)
        tl.store(db_ptr + c, tl.sum(acc_b, axis=0).to(db_ptr.dtype.element_ty), mask=cmask)
        tl.store(dw_ptr + c, tl.sum(acc_w, axis=0).to(dw_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["NUM_SPLITS", "TILES_PER_SPLIT", "RUNS_PER_PROGRAM", "RUNS"])
def _gn_bwd_apply_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr,
    C, S, G, CPG, s_xb, s_xc, s_xs, s_db, s_dc, s_ds, s_ob, s_oc, s_os,
    NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, MASK_C: tl.constexpr,
):  # fmt: skip
    # dx = rstd * (g * w - c1 - xhat * c2), with rstd folded into the per-channel coefficients.
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b, cb, split, s0, full_end, s_end = _run(run, NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, S, BLOCK_S)
        s_loc = tl.arange(0, BLOCK_S)
        c_loc = tl.arange(0, BLOCK_C)
        c = cb * BLOCK_C + c_loc
        cmask = c < C
        grp = b * G + c // CPG
        mu = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
        rs = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        k_g = rs * w
        k_0 = rs * tl.load(c1_ptr + grp, mask=cmask, other=0.0)
        k_x = rs * tl.load(c2_ptr + grp, mask=cmask, other=0.0)
        x_offs = s_loc[:, None] * s_xs + c_loc[None, :] * s_xc
        d_offs = s_loc[:, None] * s_ds + c_loc[None, :] * s_dc
        o_offs = s_loc[:, None] * s_os + c_loc[None, :] * s_oc
        c0 = (cb * BLOCK_C).to(tl.int64)
        b64 = b.to(tl.int64)
        x = x_ptr + b64 * s_xb + c0 * s_xc + s0.to(tl.int64) * s_xs
        dy = dy_ptr + b64 * s_db + c0 * s_dc + s0.to(tl.int64) * s_ds
        dx = dx_ptr + b64 * s_ob + c0 * s_oc + s0.to(tl.int64) * s_os
        for _ in range(s0, full_end, BLOCK_S):
            g, xhat = _bwd_g_xhat(
                x, dy, x_offs, d_offs, mu, rs, w, bb, s_loc, BLOCK_S, cmask, SILU, MASK_C, False
            )
            out = g * k_g[None, :] - k_0[None, :] - xhat * k_x[None, :]
            _store_tile(dx, o_offs, out, s_loc, BLOCK_S, cmask, MASK_C, False)
            x += BLOCK_S * s_xs
            dy += BLOCK_S * s_ds
            dx += BLOCK_S * s_os
        if s_end > full_end:
            rem = s_end - full_end
            g, xhat = _bwd_g_xhat(x, dy, x_offs, d_offs, mu, rs, w, bb, s_loc, rem, cmask, SILU, MASK_C, True)
            out = g * k_g[None, :] - k_0[None, :] - xhat * k_x[None, :]
            _store_tile(dx, o_offs, out, s_loc, rem, cmask, MASK_C, True)


# --------------------------------------------------------------------------------------------------------
# Launchers


def _bcs_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, channel, spatial) strides of t seen as (B, C, S), or None if its spatial dims don't flatten."""
    spatial, expected = None, None
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:]), strict=True):
        if size == 1:
            continue
        if spatial is None:
            spatial = stride
        elif stride != expected:
            return None
        expected = stride * size
    return t.stride(0), t.stride(1), 1 if spatial is None else spatial


def _readable(t: torch.Tensor) -> torch.Tensor:
    """t if the kernels can read it in place, else a contiguous copy."""
    return t if _bcs_strides(t) is not None else t.contiguous()


def _channels_last_like(t: torch.Tensor) -> bool:
    return t.ndim > 2 and t.stride(1) == 1 and t.shape[1] > 1 and math.prod(t.shape[2:]) > 1


def _empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor shaped like x, channels-last if x is, else contiguous (NCHW)."""
    dtype = x.dtype if dtype is None else dtype
    if _channels_last_like(x):
        return common.empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype, x.device).movedim(-1, 1)
    return common.empty(x.shape, dtype, x.device)


def _tiling(x: torch.Tensor, C: int, S: int, tile: int) -> dict:
    """Tile shape for x: wide in channels for channels_last, long in space for NCHW."""
    if _channels_last_like(x):
        block_c = min(triton.next_power_of_2(C), 256)
        block_s = max(1, min(triton.next_power_of_2(S), tile // block_c))
    else:
        block_s = min(triton.next_power_of_2(S), 1024)
        block_c = max(1, min(triton.next_power_of_2(C), tile // block_s))
    return dict(BLOCK_S=block_s, BLOCK_C=block_c, MASK_C=C % block_c != 0)


def _grid(kernel, args, meta: dict, device: torch.device, B: int, C: int, S: int) -> common.Grid:
    """The grid of a streaming kernel over B * channel-block rows of spatial tiles, by the rule of
    kernels/common.py from this kernel's occupancy; args(grid) builds its arguments."""
    rows, tiles = B * triton.cdiv(C, meta["BLOCK_C"]), triton.cdiv(S, meta["BLOCK_S"])
    probe = common.Grid(1, tiles, 1, rows)  # the grid-derived arguments are not specialised on: any will do
    return common.grid(rows, tiles, common.slots(kernel, args(probe), meta, device))


def _grid_args(g: common.Grid, C: int, block_c: int, B: int) -> tuple[int, ...]:
    """NUM_CBLOCKS, NUM_SPLITS, TILES_PER_SPLIT, RUNS_PER_PROGRAM, RUNS."""
    cblocks = triton.cdiv(C, block_c)
    return cblocks, g.splits, g.tiles_per_split, g.runs_per_program, B * cblocks * g.splits


def _finalize_tiling(G: int, CPG: int) -> dict:
    """(groups, channels per group) tile of the finalize kernels: a sample's groups at once if small."""
    block_cg = min(triton.next_power_of_2(CPG), 256)
    block_g = max(1, min(triton.next_power_of_2(G), 2048 // block_cg))
    return dict(BLOCK_G=block_g, BLOCK_CG=block_cg, gblocks=triton.cdiv(G, block_g))


def _launch_forward(x, weight, bias, num_groups, eps, silu):
    B, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    G = num_groups
    CPG = C // G
    x = _readable(x)
    y = _empty_like_layout(x)
    if B == 0 or S == 0:
        return y, x.new_zeros((B, G), dtype=torch.float32), x.new_ones((B, G), dtype=torch.float32)
    mean = common.empty((B, G), torch.float32, x.device)
    rstd = common.empty((B, G), torch.float32, x.device)
    tile = _tiling(x, C, S, TILE_FWD)
    sx, sy = _bcs_strides(x), _bcs_strides(y)
    meta = dict(tile, num_warps=NUM_WARPS)

    def stats_args(g, part_sum=mean, part_sq=rstd):
        return (x, part_sum, part_sq, C, S, CPG, *sx, *_grid_args(g, C, tile["BLOCK_C"], B))

    g = _grid(_gn_stats_kernel, stats_args, meta, x.device, B, C, S)
    part_sum = common.empty((B, g.splits, C), torch.float32, x.device)
    part_sq = common.empty((B, g.splits, C), torch.float32, x.device)
    _gn_stats_kernel[(g.programs,)](*stats_args(g, part_sum, part_sq), **meta)
    fin = _finalize_tiling(G, CPG)
    _gn_stats_finalize_kernel[(B * fin["gblocks"],)](
        x, part_sum, part_sq, mean, rstd, C, G, CPG, sx[0], sx[1], g.splits, fin["gblocks"],
        1.0 / (CPG * S), eps, BLOCK_G=fin["BLOCK_G"], BLOCK_CG=fin["BLOCK_CG"],
    )  # fmt: skip

    def apply_args(g):
        return (x, y, weight, bias, mean, rstd, C, S, G, CPG, *sx, *sy, *_grid_args(g, C, tile["BLOCK_C"], B))

    meta = dict(meta, SILU=silu)
    g = _grid(_gn_fwd_apply_kernel, apply_args, meta, x.device, B, C, S)
    _gn_fwd_apply_kernel[(g.programs,)](*apply_args(g), **meta)
    return y, mean, rstd


def _launch_backward(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    B, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    G = num_groups
    CPG = C // G
    x, grad_y = _readable(x), _readable(grad_y)
    dx = _empty_like_layout(x)
    if B == 0 or S == 0:
        return dx.zero_(), torch.zeros_like(weight), torch.zeros_like(bias)
    dw = common.empty(weight.shape, weight.dtype, x.device)
    db = common.empty(bias.shape, bias.dtype, x.device)
    tile = _tiling(x, C, S, TILE_BWD)
    sx, sd, so = _bcs_strides(x), _bcs_strides(grad_y), _bcs_strides(dx)
    meta = dict(tile, SILU=silu, num_warps=NUM_WARPS)
    c1 = common.empty((B, G), torch.float32, x.device)
    c2 = common.empty((B, G), torch.float32, x.device)

    def reduce_args(g, part_g=c1, part_gx=c2):
        return (x, grad_y, weight, bias, mean, rstd, part_g, part_gx, C, S, G, CPG, *sx, *sd,
                *_grid_args(g, C, tile["BLOCK_C"], B))  # fmt: skip

    g = _grid(_gn_bwd_reduce_kernel, reduce_args, meta, x.device, B, C, S)
    splits = g.splits
    part_g = common.empty((B, splits, C), torch.float32, x.device)
    part_gx = common.empty((B, splits, C), torch.float32, x.device)
    _gn_bwd_reduce_kernel[(g.programs,)](*reduce_args(g, part_g, part_gx), **meta)
    fin = _finalize_tiling(G, CPG)
    block_pc = min(triton.next_power_of_2(C), 128)
    _gn_bwd_finalize_kernel[(B * fin["gblocks"] + triton.cdiv(C, block_pc),)](
        part_g, part_gx, weight, c1, c2, dw, db, B, C, G, CPG, splits, fin["gblocks"], 1.0 / (CPG * S),
        BLOCK_G=fin["BLOCK_G"], BLOCK_CG=fin["BLOCK_CG"],
        BLOCK_R=min(triton.next_power_of_2(B * splits), 32), BLOCK_PC=block_pc,
    )  # fmt: skip

    def apply_args(g):
        return (x, grad_y, dx, weight, bias, mean, rstd, c1, c2, C, S, G, CPG, *sx, *sd, *so,
                *_grid_args(g, C, tile["BLOCK_C"], B))  # fmt: skip

    g = _grid(_gn_bwd_apply_kernel, apply_args, meta, x.device, B, C, S)
    _gn_bwd_apply_kernel[(g.programs,)](*apply_args(g), **meta)
    return dx, dw, db


# --------------------------------------------------------------------------------------------------------
# torch.library ops and autograd (custom_op with fake rules; see kernels/gaussian.py for why not triton_op)


@torch.library.custom_op("vae_kernels::group_norm_silu", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, silu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(x, weight, bias, num_groups, eps, silu)


@_forward_op.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _empty_like_layout(_readable(x)), stats, torch.empty_like(stats)


@torch.library.custom_op("vae_kernels::group_norm_silu_backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_y, x, weight, bias, mean, rstd, num_groups, silu)


@_backward_op.register_fake
def _(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    return _empty_like_layout(_readable(x)), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _backward_op(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
    return dx, dw, db, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    silu: bool = True,
) -> torch.Tensor:
    """The fused Triton path, for inputs already through check_inputs. Returns y in x's dtype and layout.

    x is read in place if its spatial dims flatten to one stride (NCHW, channels_last, and batch-strided
    views of them); any other layout is first copied to a contiguous tensor. y is channels-last when x is,
    else contiguous. A missing weight or bias acts as ones or zeros.
    """
    common.require_triton(x.dtype)
    C = x.shape[1]
    pdtype = next((p.dtype for p in (weight, bias) if p is not None), torch.float32)
    weight = torch.ones(C, dtype=pdtype, device=x.device) if weight is None else weight.contiguous()
    bias = torch.zeros(C, dtype=pdtype, device=x.device) if bias is None else bias.contiguous()
    return _forward_op(x, weight, bias, num_groups, float(eps), bool(silu))[0]
