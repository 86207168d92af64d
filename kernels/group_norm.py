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
which keeps E[d^2] - E[d]^2 from cancelling when |mean| >> std.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON, TRITON_IMPORT_ERROR = True, None
except ImportError as e:  # triton is optional (macOS, Windows): the eager reference still works

    class _MissingTriton:
        """Stands in for triton and triton.language so the kernel definitions below still parse."""

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _MissingTriton
    HAS_TRITON, TRITON_IMPORT_ERROR = False, e

# Elements per tile of the streaming kernels (a (BLOCK_S, BLOCK_C) block).
TILE = 4096

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

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


@triton.jit
def _gn_stats_kernel(
    x_ptr, sum_ptr, sq_ptr,
    C, S, CPG, s_xb, s_xc, s_xs,
    NUM_CBLOCKS, NUM_SPLITS, S_PER_SPLIT,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Program (b, channel block, spatial split): per-channel sums of x - shift and (x - shift)^2 over its
    # spatial range, shift = the first element of the channel's group (the same for the whole group, so the
    # per-channel partials add up to group sums). Offsets are int64: one sample may pass 2**31 elements.
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    cb = (pid // NUM_SPLITS) % NUM_CBLOCKS
    b = pid // (NUM_SPLITS * NUM_CBLOCKS)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    x_base = x_ptr + b.to(tl.int64) * s_xb
    c_off = c.to(tl.int64) * s_xc
    shift = tl.load(x_base + ((c // CPG) * CPG).to(tl.int64) * s_xc, mask=cmask, other=0.0).to(tl.float32)
    acc1 = tl.full((BLOCK_S, BLOCK_C), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_S, BLOCK_C), 0.0, tl.float32)
    s_start = split * S_PER_SPLIT
    s_end = tl.minimum(s_start + S_PER_SPLIT, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_end)[:, None] & cmask[None, :]
        x = tl.load(x_base + s.to(tl.int64)[:, None] * s_xs + c_off[None, :], mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)
        acc1 += d
        acc2 += d * d
    out = (b * NUM_SPLITS + split).to(tl.int64) * C + c
    tl.store(sum_ptr + out, tl.sum(acc1, axis=0), mask=cmask)
    tl.store(sq_ptr + out, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _gn_stats_finalize_kernel(
    x_ptr, sum_ptr, sq_ptr, mean_ptr, rstd_ptr,
    C, G, CPG, s_xb, s_xc, NUM_SPLITS, NUM_GBLOCKS, INV_N, EPS,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
):  # fmt: skip
    # Program (b, block of groups): combine the (splits, channels) partials into each group's mean and rstd.
    pid = tl.program_id(0)
    b = pid // NUM_GBLOCKS
    g = (pid % NUM_GBLOCKS) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < G
    acc1 = tl.full((BLOCK_G, BLOCK_CG), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_G, BLOCK_CG), 0.0, tl.float32)
    for c0 in range(0, CPG, BLOCK_CG):
        j = c0 + tl.arange(0, BLOCK_CG)
        ch = g[:, None] * CPG + j[None, :]
        mask = gmask[:, None] & (j < CPG)[None, :]
        for p in range(0, NUM_SPLITS):
            row = (b * NUM_SPLITS + p).to(tl.int64) * C
            acc1 += tl.load(sum_ptr + row + ch, mask=mask, other=0.0)
            acc2 += tl.load(sq_ptr + row + ch, mask=mask, other=0.0)
    d_mean = tl.sum(acc1, axis=1) * INV_N
    var = tl.maximum(tl.sum(acc2, axis=1) * INV_N - d_mean * d_mean, 0.0)
    shift = tl.load(x_ptr + b.to(tl.int64) * s_xb + (g * CPG).to(tl.int64) * s_xc, mask=gmask, other=0.0)
    tl.store(mean_ptr + b * G + g, shift.to(tl.float32) + d_mean, mask=gmask)
    tl.store(rstd_ptr + b * G + g, 1.0 / tl.sqrt(var + EPS), mask=gmask)


@triton.jit
def _gn_fwd_apply_kernel(
    x_ptr, y_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr,
    C, S, G, CPG, s_xb, s_xc, s_xs, s_yb, s_yc, s_ys,
    NUM_CBLOCKS, NUM_SBLOCKS,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Program (b, channel block, spatial block): y = act(x * a_c + b_c), one FMA per element.
    pid = tl.program_id(0)
    sb = pid % NUM_SBLOCKS
    cb = (pid // NUM_SBLOCKS) % NUM_CBLOCKS
    b = pid // (NUM_SBLOCKS * NUM_CBLOCKS)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    grp = b * G + c // CPG
    mu = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
    rs = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
    a = rs * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    sh = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32) - mu * a
    s = (sb * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    mask = (s < S)[:, None] & cmask[None, :]
    x_off = b.to(tl.int64) * s_xb + s[:, None] * s_xs + c.to(tl.int64)[None, :] * s_xc
    u = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32) * a[None, :] + sh[None, :]
    if SILU:
        u = u / (1.0 + tl.exp(-u))
    y_off = b.to(tl.int64) * s_yb + s[:, None] * s_ys + c.to(tl.int64)[None, :] * s_yc
    tl.store(y_ptr + y_off, u.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, gsum_ptr, gxsum_ptr,
    C, S, G, CPG, s_xb, s_xc, s_xs, s_db, s_dc, s_ds,
    NUM_CBLOCKS, NUM_SPLITS, S_PER_SPLIT,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Program (b, channel block, spatial split): per-channel sums of g and g * xhat over its range.
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    cb = (pid // NUM_SPLITS) % NUM_CBLOCKS
    b = pid // (NUM_SPLITS * NUM_CBLOCKS)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    grp = b * G + c // CPG
    mu = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
    rs = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bb = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    x_base = x_ptr + b.to(tl.int64) * s_xb
    dy_base = dy_ptr + b.to(tl.int64) * s_db
    c64 = c.to(tl.int64)
    acc_g = tl.full((BLOCK_S, BLOCK_C), 0.0, tl.float32)
    acc_gx = tl.full((BLOCK_S, BLOCK_C), 0.0, tl.float32)
    s_start = split * S_PER_SPLIT
    s_end = tl.minimum(s_start + S_PER_SPLIT, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_end)[:, None] & cmask[None, :]
        s64 = s.to(tl.int64)[:, None]
        x = tl.load(x_base + s64 * s_xs + c64[None, :] * s_xc, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + s64 * s_ds + c64[None, :] * s_dc, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mu[None, :]) * rs[None, :]
        if SILU:  # g = dy * silu'(u), u = xhat * w + bias the pre-activation
            u = xhat * w[None, :] + bb[None, :]
            sig = 1.0 / (1.0 + tl.exp(-u))
            g = dy * sig * (1.0 + u * (1.0 - sig))
        else:
            g = dy
        acc_g += tl.where(mask, g, 0.0)
        acc_gx += tl.where(mask, g * xhat, 0.0)
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
    # The programs after them: dweight and dbias for a block of channels, summed over batch and splits.
    # Two jobs in one launch because each is tiny and a launch costs more than either.
    pid = tl.program_id(0)
    if pid < B * NUM_GBLOCKS:
        b = pid // NUM_GBLOCKS
        g = (pid % NUM_GBLOCKS) * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = g < G
        acc1 = tl.full((BLOCK_G, BLOCK_CG), 0.0, tl.float32)
        acc2 = tl.full((BLOCK_G, BLOCK_CG), 0.0, tl.float32)
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
        acc_b = tl.full((BLOCK_R, BLOCK_PC), 0.0, tl.float32)
        acc_w = tl.full((BLOCK_R, BLOCK_PC), 0.0, tl.float32)
        for r0 in range(0, B * NUM_SPLITS, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mask = (r < B * NUM_SPLITS)[:, None] & cmask[None, :]
            off = r.to(tl.int64)[:, None] * C + c[None, :]
            acc_b += tl.load(gsum_ptr + off, mask=mask, other=0.0)
            acc_w += tl.load(gxsum_ptr + off, mask=mask, other=0.0)
        tl.store(db_ptr + c, tl.sum(acc_b, axis=0).to(db_ptr.dtype.element_ty), mask=cmask)
        tl.store(dw_ptr + c, tl.sum(acc_w, axis=0).to(dw_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gn_bwd_apply_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr,
    C, S, G, CPG, s_xb, s_xc, s_xs, s_db, s_dc, s_ds, s_ob, s_oc, s_os,
    NUM_CBLOCKS, NUM_SBLOCKS,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Program (b, channel block, spatial block): dx = rstd * (g * w - c1 - xhat * c2).
    pid = tl.program_id(0)
    sb = pid % NUM_SBLOCKS
    cb = (pid // NUM_SBLOCKS) % NUM_CBLOCKS
    b = pid // (NUM_SBLOCKS * NUM_CBLOCKS)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    grp = b * G + c // CPG
    mu = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
    rs = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
    c1 = tl.load(c1_ptr + grp, mask=cmask, other=0.0)
    c2 = tl.load(c2_ptr + grp, mask=cmask, other=0.0)
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bb = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    s = (sb * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[:, None]
    c64 = c.to(tl.int64)[None, :]
    b64 = b.to(tl.int64)
    mask = (s < S) & cmask[None, :]
    x = tl.load(x_ptr + b64 * s_xb + s * s_xs + c64 * s_xc, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + b64 * s_db + s * s_ds + c64 * s_dc, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mu[None, :]) * rs[None, :]
    if SILU:
        u = xhat * w[None, :] + bb[None, :]
        sig = 1.0 / (1.0 + tl.exp(-u))
        g = dy * sig * (1.0 + u * (1.0 - sig))
    else:
        g = dy
    dx = rs[None, :] * (g * w[None, :] - c1[None, :] - xhat * c2[None, :])
    tl.store(dx_ptr + b64 * s_ob + s * s_os + c64 * s_oc, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launchers


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fill goes through here, so a test can hand out NaN-filled ones instead."""
    return torch.empty(shape, dtype=dtype, device=device)


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
        return _empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype, x.device).movedim(-1, 1)
    return _empty(x.shape, dtype, x.device)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: a few per SM on a GPU; a handful under the CPU interpreter."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _tiling(x: torch.Tensor, B: int, C: int, S: int) -> dict:
    """Tile shape and work split for x: wide in channels for channels_last, long in space for NCHW."""
    if _channels_last_like(x):
        block_c = min(triton.next_power_of_2(C), 256)
        block_s = max(1, min(triton.next_power_of_2(S), TILE // block_c))
    else:
        block_s = min(triton.next_power_of_2(S), 1024)
        block_c = max(1, min(triton.next_power_of_2(C), TILE // block_s))
    cblocks, sblocks = triton.cdiv(C, block_c), triton.cdiv(S, block_s)
    splits = max(1, min(sblocks, triton.cdiv(_target_programs(x.device), B * cblocks)))
    s_per_split = triton.cdiv(sblocks, splits) * block_s
    return dict(
        BLOCK_S=block_s, BLOCK_C=block_c, cblocks=cblocks, sblocks=sblocks,
        splits=triton.cdiv(S, s_per_split), s_per_split=s_per_split,
    )  # fmt: skip


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
    mean = _empty((B, G), torch.float32, x.device)
    rstd = _empty((B, G), torch.float32, x.device)
    t = _tiling(x, B, C, S)
    sx, sy = _bcs_strides(x), _bcs_strides(y)
    part_sum = _empty((B, t["splits"], C), torch.float32, x.device)
    part_sq = _empty((B, t["splits"], C), torch.float32, x.device)
    _gn_stats_kernel[(B * t["cblocks"] * t["splits"],)](
        x, part_sum, part_sq, C, S, CPG, *sx, t["cblocks"], t["splits"], t["s_per_split"],
        BLOCK_S=t["BLOCK_S"], BLOCK_C=t["BLOCK_C"], num_warps=8,
    )  # fmt: skip
    fin = _finalize_tiling(G, CPG)
    _gn_stats_finalize_kernel[(B * fin["gblocks"],)](
        x, part_sum, part_sq, mean, rstd, C, G, CPG, sx[0], sx[1], t["splits"], fin["gblocks"],
        1.0 / (CPG * S), eps, BLOCK_G=fin["BLOCK_G"], BLOCK_CG=fin["BLOCK_CG"],
    )  # fmt: skip
    _gn_fwd_apply_kernel[(B * t["cblocks"] * t["sblocks"],)](
        x, y, weight, bias, mean, rstd, C, S, G, CPG, *sx, *sy, t["cblocks"], t["sblocks"],
        SILU=silu, BLOCK_S=t["BLOCK_S"], BLOCK_C=t["BLOCK_C"], num_warps=8,
    )  # fmt: skip
    return y, mean, rstd


def _launch_backward(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    B, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    G = num_groups
    CPG = C // G
    x, grad_y = _readable(x), _readable(grad_y)
    dx = _empty_like_layout(x)
    if B == 0 or S == 0:
        return dx.zero_(), torch.zeros_like(weight), torch.zeros_like(bias)
    dw = _empty(weight.shape, weight.dtype, x.device)
    db = _empty(bias.shape, bias.dtype, x.device)
    t = _tiling(x, B, C, S)
    sx, sd, so = _bcs_strides(x), _bcs_strides(grad_y), _bcs_strides(dx)
    part_g = _empty((B, t["splits"], C), torch.float32, x.device)
    part_gx = _empty((B, t["splits"], C), torch.float32, x.device)
    c1 = _empty((B, G), torch.float32, x.device)
    c2 = _empty((B, G), torch.float32, x.device)
    _gn_bwd_reduce_kernel[(B * t["cblocks"] * t["splits"],)](
        x, grad_y, weight, bias, mean, rstd, part_g, part_gx, C, S, G, CPG, *sx, *sd,
        t["cblocks"], t["splits"], t["s_per_split"],
        SILU=silu, BLOCK_S=t["BLOCK_S"], BLOCK_C=t["BLOCK_C"], num_warps=8,
    )  # fmt: skip
    fin = _finalize_tiling(G, CPG)
    block_pc = min(triton.next_power_of_2(C), 128)
    _gn_bwd_finalize_kernel[(B * fin["gblocks"] + triton.cdiv(C, block_pc),)](
        part_g, part_gx, weight, c1, c2, dw, db, B, C, G, CPG, t["splits"], fin["gblocks"], 1.0 / (CPG * S),
        BLOCK_G=fin["BLOCK_G"], BLOCK_CG=fin["BLOCK_CG"],
        BLOCK_R=min(triton.next_power_of_2(B * t["splits"]), 32), BLOCK_PC=block_pc,
    )  # fmt: skip
    _gn_bwd_apply_kernel[(B * t["cblocks"] * t["sblocks"],)](
        x, grad_y, dx, weight, bias, mean, rstd, c1, c2, C, S, G, CPG, *sx, *sd, *so,
        t["cblocks"], t["sblocks"],
        SILU=silu, BLOCK_S=t["BLOCK_S"], BLOCK_C=t["BLOCK_C"], num_warps=8,
    )  # fmt: skip
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
    if not HAS_TRITON:
        raise RuntimeError(
            f"impl='triton' needs the triton package, which did not import: {TRITON_IMPORT_ERROR}"
        )
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32, bfloat16 or float16 tensors, got {x.dtype}")
    C = x.shape[1]
    pdtype = next((p.dtype for p in (weight, bias) if p is not None), torch.float32)
    weight = torch.ones(C, dtype=pdtype, device=x.device) if weight is None else weight.contiguous()
    bias = torch.zeros(C, dtype=pdtype, device=x.device) if bias is None else bias.contiguous()
    return _forward_op(x, weight, bias, num_groups, float(eps), bool(silu))[0]
