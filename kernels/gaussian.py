"""Reparameterised sample + KL of a diagonal Gaussian posterior.

The eager reference below is the specification: z = mean + exp(0.5 * clamp(logvar, -30, 20)) * eps and the
KL divergence to N(0, I) or to a diagonal Gaussian prior N(prior_mean, exp(prior_logvar)), summed over every
non-batch dimension. The prior's logvar is clamped the same way, as diffusers' DiagonalGaussianDistribution
.kl(other) uses the other distribution's clamped logvar; the clamp passes no gradient outside [-30, 20].

The Triton path is one kernel each way:
  forward  reads mean, logvar (, eps) (, prior_mean, prior_logvar), writes z and the per-sample KL, which is
           reduced inside the kernel (large samples are split over programs; the last program of a sample
           to finish sums the split partials in a fixed order, so the result is deterministic);
  backward reads mean, logvar (, eps) (, prior), grad_z and grad_kl, writes grad_mean, grad_logvar
           (, grad_prior_mean, grad_prior_logvar).
With eps=None, eps is drawn in the kernel from Philox with a seed taken from torch's generator, and the
backward regenerates it from the same seed: only mean, logvar and the seed are kept for backward. Each
program walks runs of tiles of a sample, as many programs as the compiled kernel's occupancy fits in whole
waves (kernels/common.py).

NaN and Inf behave as in the reference: the clamps keep a NaN (a NaN logvar makes z and its sample's KL
NaN; its gradient is 0, as torch.clamp gives outside its range), an infinite logvar is clamped, a NaN or
Inf in mean or the prior reaches z, the KL and the gradients as the reference's arithmetic takes it.

Bytes per latent element (s = bytes of the input dtype), with the count spelled out:
  eps=None,  N(0, I): forward 3 s (mean, logvar in; z out), backward 5 s (mean, logvar, grad_z in;
             grad_mean, grad_logvar out): 8 s in all;
  eps given, N(0, I): forward 4 s, backward 6 s: 10 s;
  a prior adds 2 s to the forward (its two tensors read) and 4 s to the backward (read, and their grads
  written).
"""

from __future__ import annotations

import functools

import torch

from . import common
from .common import clamp_nan, tl, triton

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0

# Elements per tile, 8 per thread (BLOCK // 256 warps; 16-byte loads in bf16): a launch with too little work
# to fill the GPU in tiles of 1024 takes smaller ones (see _grid). Each sample's noise counters are laid out
# for the largest tile, so the noise does not depend on the tile size.
BLOCKS = (1024, 512, 256)

# --------------------------------------------------------------------------------------------------------
# Eager reference (the specification)


def gaussian_sample_kl_reference(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    prior_mean: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference. Returns (z, kl) with z shaped like mean and kl of shape (B,), in fp32 statistics."""
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    if eps is None:
        eps = torch.randn_like(mean)
    z = mean + torch.exp(0.5 * logvar) * eps
    m, lv = mean.float(), logvar.float()
    if prior_mean is None:
        kl = 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv)
    else:
        pm, plv = prior_mean.float(), prior_logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
        kl = 0.5 * ((m - pm).pow(2) * torch.exp(-plv) + torch.exp(lv - plv) - 1.0 - lv + plv)
    kl = kl.flatten(1).sum(1) if kl.ndim > 1 else kl  # a 1-D mean holds one element per sample
    return z, kl.to(mean.dtype)


# --------------------------------------------------------------------------------------------------------
# Input checks, shared by both implementations


def check_inputs(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    prior_mean: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Validate the arguments (ValueError naming the culprit); returns them ready for either implementation.

    Under autocast for the tensors' device, mixed floating dtypes are promoted to the widest one, as autocast
    does for its "promote" ops; outside autocast they are an error. eps is treated as a constant (detached).
    A prior may broadcast to mean's shape (e.g. per channel, (1, C, 1, 1)); it is expanded here, so autograd
    sums its gradient back to its own shape.
    """
    named = {
        "mean": mean,
        "logvar": logvar,
        "eps": eps,
        "prior_mean": prior_mean,
        "prior_logvar": prior_logvar,
    }
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if (prior_mean is None) != (prior_logvar is None):
        raise ValueError("prior_mean and prior_logvar must be given together (or neither)")
    if mean.ndim == 0:
        raise ValueError("mean must have a batch dimension, got a 0-dim tensor")
    if logvar.shape != mean.shape:
        raise ValueError(f"logvar shape {tuple(logvar.shape)} does not match mean shape {tuple(mean.shape)}")
    if eps is not None and eps.shape != mean.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} does not match mean shape {tuple(mean.shape)}")
    for name in ("prior_mean", "prior_logvar"):
        t = named[name]
        if t is None:
            continue
        try:
            ok = torch.broadcast_shapes(t.shape, mean.shape) == mean.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} must equal or broadcast to mean shape {tuple(mean.shape)}"
            )
    given = {k: t for k, t in named.items() if t is not None}
    for name, t in given.items():
        if t.device != mean.device:
            raise ValueError(f"{name} is on {t.device} but mean is on {mean.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    dtypes = {t.dtype for t in given.values()}
    if len(dtypes) > 1:
        if not torch.is_autocast_enabled(mean.device.type):
            found = ", ".join(f"{k}={t.dtype}" for k, t in given.items())
            raise ValueError(f"mixed dtypes: {found}; pass one dtype (or run under autocast)")
        wide = functools.reduce(torch.promote_types, dtypes)
        mean, logvar, eps, prior_mean, prior_logvar = (
            None if t is None else t.to(wide) for t in (mean, logvar, eps, prior_mean, prior_logvar)
        )
    if eps is not None:
        eps = eps.detach()
    if prior_mean is not None:
        prior_mean, prior_logvar = prior_mean.expand_as(mean), prior_logvar.expand_as(mean)
    return mean, logvar, eps, prior_mean, prior_logvar


# --------------------------------------------------------------------------------------------------------
# Kernels
#
# With eps drawn in the kernel, one Philox4x32-10 call gives four neighbouring elements their noise
# (element i of a tile from call i // 4, output i % 4): the four outputs are joined into the tile in the
# layout the loads use, so the noise never goes through shared memory. Full tiles are read and written
# without masks; only a sample's last, partial tile is masked.
#
# Box-Muller's transcendentals are short polynomials on the ranges they see (fitted minimax, checked in
# float32: sin relative error 1.7e-7, cos absolute 8.5e-8, log1p relative 3.2e-7), not libdevice's full-range
# functions with their range reduction. The noise only has to be N(0, 1) and the same in forward and
# backward, and these run the same under the interpreter as on a GPU.


@triton.jit
def _log_unit(u):
    """ln(u) for a normal positive float32 u: exponent from the bits, mantissa in [sqrt(1/2), sqrt(2))."""
    tmp = u.to(tl.int32, bitcast=True) - 0x3F3504F3  # the bits of sqrt(1/2)
    k = tmp >> 23  # arithmetic: the power of two taken out
    x = (u.to(tl.int32, bitcast=True) - (tmp & -8388608)).to(tl.float32, bitcast=True) - 1.0
    k_f = (k + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0  # int -> float without a convert
    q = -0.098082443602
    q = q * x + 0.160821522235
    q = q * x - 0.172894733008
    q = q * x + 0.199201488148
    q = q * x - 0.249685244769
    q = q * x + 0.333343078955
    q = q * x - 0.500003777
    return k_f * 0.6931471805599453 + (x + x * x * q)


@triton.jit
def _box_muller(a, b):
    """Two independent N(0, 1) from two uint32 draws.

    u in [2^-23, 1] from 23 bits of a as a mantissa (no int -> float convert); the angle is a uniform one in
    [-pi/4, pi/4) (23 bits of b) moved by a uniform element of the square's symmetry group (b's top 3
    bits: swap x and y, negate x, negate y), which makes it uniform on the circle.
    """
    u = 2.0 - ((a >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    r = tl.sqrt(-2.0 * _log_unit(u))
    f = (((b << 3) >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 1.5  # [-0.5, 0.5): angle pi/2 * f
    f2 = f * f
    s = f * (1.570796321701 + f2 * (-0.645963459733 + f2 * (0.079680027514 + f2 * -0.004601643996)))
    c = 1.0 + f2 * (
        -1.233700540640 + f2 * (0.2536692037970 + f2 * (-0.02086007040814 + f2 * 0.0009036298816955))
    )
    swap = (b & 0x20000000) != 0
    x = tl.where(swap, s, c).to(tl.uint32, bitcast=True) ^ (b & 0x80000000)
    y = tl.where(swap, c, s).to(tl.uint32, bitcast=True) ^ ((b << 1) & 0x80000000)
    return r * x.to(tl.float32, bitcast=True), r * y.to(tl.float32, bitcast=True)


@triton.jit
def _noise_tile(seed, counter, BLOCK: tl.constexpr):
    """eps for one tile: BLOCK // 4 Philox4x32-10 calls (torch's and curand's round count) on counters
    counter + i, each giving four neighbouring elements their N(0, 1) values.

    Element i of sample b always draws from counter b * SAMPLE_COUNTERS + i // 4, whatever the tile size, so
    the forward and the backward may tile differently. counter is a multiple of BLOCK // 4, so the low words
    never carry into the high word within a tile: the high word is one scalar, only the low word per element.
    """
    lo = (counter & 0xFFFFFFFF).to(tl.uint32) + tl.arange(0, BLOCK // 4).to(tl.uint32)
    zero = lo * 0
    a, b, c, d = tl.random.philox(seed, lo, zero + (counter >> 32).to(tl.uint32), zero, zero)
    n0, n1 = _box_muller(a, b)
    n2, n3 = _box_muller(c, d)
    return tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), (BLOCK,))


@triton.jit
def _load(ptr, j, rem, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + j, mask=j < rem, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + j).to(tl.float32)


@triton.jit
def _store(ptr, j, value, rem, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + j, value.to(ptr.dtype.element_ty), mask=j < rem)
    else:
        tl.store(ptr + j, value.to(ptr.dtype.element_ty))


@triton.jit
def _exp(x):
    """exp as one MUFU.EX2 (flush-to-zero): tl.exp adds denormal handling that arguments here never need."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _fwd_tile(
    mean, logvar, eps, pmean, plogvar, z, seed, counter, rem,
    LV_MIN: tl.constexpr, LV_MAX: tl.constexpr, HAS_EPS: tl.constexpr, HAS_PRIOR: tl.constexpr,
    MASKED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """z for the tile at these row pointers (already offset to it); returns twice its KL terms (0 where
    masked)."""
    j = tl.arange(0, BLOCK)
    if HAS_EPS:
        e = _load(eps, j, rem, MASKED)
    else:
        e = _noise_tile(seed, counter, BLOCK)
    m = _load(mean, j, rem, MASKED)
    lv = clamp_nan(_load(logvar, j, rem, MASKED), LV_MIN, LV_MAX)
    sd = _exp(0.5 * lv)
    _store(z, j, m + sd * e, rem, MASKED)
    var = sd * sd  # exp(lv) without a second exponential
    # twice the KL terms: the caller halves the sum once
    if HAS_PRIOR:
        pm = _load(pmean, j, rem, MASKED)
        plv = clamp_nan(_load(plogvar, j, rem, MASKED), LV_MIN, LV_MAX)
        d = m - pm
        kl2 = (d * d + var) * _exp(-plv) + (plv - lv - 1.0)
    else:
        kl2 = (m * m + var) - (lv + 1.0)
    if MASKED:
        kl2 = tl.where(j < rem, kl2, 0.0)
    return kl2


@triton.jit(do_not_specialize=["TILES", "TILES_PER_SPLIT", "NUM_SPLITS", "RUNS_PER_PROGRAM", "RUNS"])
def _gaussian_fwd_kernel(
    mean_ptr, logvar_ptr, eps_ptr, seed_ptr, pmean_ptr, plogvar_ptr,
    z_ptr, kl_ptr, partial_ptr, count_ptr,
    N, TILES, SAMPLE_COUNTERS, TILES_PER_SPLIT, NUM_SPLITS, RUNS_PER_PROGRAM, RUNS,
    s_mean, s_logvar, s_eps, s_pmean, s_plogvar,
    LV_MIN: tl.constexpr, LV_MAX: tl.constexpr, HAS_EPS: tl.constexpr, HAS_PRIOR: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # Run r is tiles [split * TILES_PER_SPLIT, ...) of sample b = r // NUM_SPLITS: the full ones unmasked,
    # then the sample's partial last tile if the run holds it. A program takes RUNS_PER_PROGRAM consecutive
    # runs. Row offsets are int64 (B * N may pass 2**31).
    seed = 0
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b = run // NUM_SPLITS
        split = run % NUM_SPLITS
        b64 = b.to(tl.int64)
        t_start = split * TILES_PER_SPLIT
        t_end = tl.minimum(t_start + TILES_PER_SPLIT, TILES)
        full_end = tl.minimum(t_end, N // BLOCK)
        off = t_start.to(tl.int64) * BLOCK
        m, lv, e = mean_ptr + b64 * s_mean, logvar_ptr + b64 * s_logvar, eps_ptr + b64 * s_eps
        pm, plv, z = pmean_ptr + b64 * s_pmean, plogvar_ptr + b64 * s_plogvar, z_ptr + b64 * N
        acc = tl.zeros((BLOCK,), tl.float32)
        for t in range(t_start, full_end):
            acc += _fwd_tile(
                m + off, lv + off, e + off, pm + off, plv + off, z + off,
                seed, b64 * SAMPLE_COUNTERS + t * (BLOCK // 4), BLOCK,
                LV_MIN, LV_MAX, HAS_EPS, HAS_PRIOR, False, BLOCK,
            )  # fmt: skip
            off += BLOCK
        if t_end > full_end:  # the partial tile, at t = full_end
            acc += _fwd_tile(
                m + off, lv + off, e + off, pm + off, plv + off, z + off,
                seed, b64 * SAMPLE_COUNTERS + full_end * (BLOCK // 4), (N - off).to(tl.int32),
                LV_MIN, LV_MAX, HAS_EPS, HAS_PRIOR, True, BLOCK,
            )  # fmt: skip
        partial = 0.5 * tl.sum(acc, axis=0)
        if NUM_SPLITS > 1:
            # Publish this run's partial, then count arrivals; the last program of the sample sums all the
            # partials in run order (deterministic, whatever order the programs ran in). The barrier makes
            # every thread's store land before the release; .cg reads the partials from L2, not a stale L1.
            tl.store(partial_ptr + b64 * NUM_SPLITS + split, partial)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
            if arrived == NUM_SPLITS - 1:
                parts = tl.zeros((128,), tl.float32)
                for p0 in range(0, NUM_SPLITS, 128):
                    p = p0 + tl.arange(0, 128)
                    parts += tl.load(
                        partial_ptr + b64 * NUM_SPLITS + p,
                        mask=p < NUM_SPLITS,
                        other=0.0,
                        cache_modifier=".cg",
                    )
                tl.store(kl_ptr + b, tl.sum(parts, axis=0).to(kl_ptr.dtype.element_ty))
        else:
            tl.store(kl_ptr + b, partial.to(kl_ptr.dtype.element_ty))


@triton.jit
def _bwd_tile(
    mean, logvar, eps, pmean, plogvar, gz, dmean, dlogvar, dpmean, dplogvar, gkl, seed, counter, rem,
    LV_MIN: tl.constexpr, LV_MAX: tl.constexpr, HAS_EPS: tl.constexpr, HAS_PRIOR: tl.constexpr,
    MASKED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    j = tl.arange(0, BLOCK)
    if HAS_EPS:
        e = _load(eps, j, rem, MASKED)
    else:
        e = _noise_tile(seed, counter, BLOCK)  # the forward's eps, regenerated
    g = _load(gz, j, rem, MASKED)
    m = _load(mean, j, rem, MASKED)
    lv_in = _load(logvar, j, rem, MASKED)
    # clamp passes the gradient where LV_MIN <= logvar <= LV_MAX (inclusive, as torch.clamp does; a NaN
    # logvar gets none, as in torch, while its NaN reaches z and the KL in the forward)
    lv_pass = (lv_in >= LV_MIN) & (lv_in <= LV_MAX)
    sd = _exp(0.5 * clamp_nan(lv_in, LV_MIN, LV_MAX))
    var = sd * sd
    dm = g
    dlv = 0.5 * g * sd * e
    if HAS_PRIOR:
        pm = _load(pmean, j, rem, MASKED)
        plv_in = _load(plogvar, j, rem, MASKED)
        plv_pass = (plv_in >= LV_MIN) & (plv_in <= LV_MAX)
        inv_pvar = _exp(-clamp_nan(plv_in, LV_MIN, LV_MAX))
        ratio = var * inv_pvar
        d = m - pm
        dm += gkl * d * inv_pvar
        dlv += 0.5 * gkl * (ratio - 1.0)
        _store(dpmean, j, -gkl * d * inv_pvar, rem, MASKED)
        _store(
            dplogvar, j, tl.where(plv_pass, 0.5 * gkl * (1.0 - d * d * inv_pvar - ratio), 0.0), rem, MASKED
        )
    else:
        dm += gkl * m
        dlv += 0.5 * gkl * (var - 1.0)
    _store(dmean, j, dm, rem, MASKED)
    _store(dlogvar, j, tl.where(lv_pass, dlv, 0.0), rem, MASKED)


@triton.jit(do_not_specialize=["TILES", "TILES_PER_SPLIT", "NUM_SPLITS", "RUNS_PER_PROGRAM", "RUNS"])
def _gaussian_bwd_kernel(
    mean_ptr, logvar_ptr, eps_ptr, seed_ptr, pmean_ptr, plogvar_ptr, gz_ptr, gkl_ptr,
    dmean_ptr, dlogvar_ptr, dpmean_ptr, dplogvar_ptr,
    N, TILES, SAMPLE_COUNTERS, TILES_PER_SPLIT, NUM_SPLITS, RUNS_PER_PROGRAM, RUNS,
    s_mean, s_logvar, s_eps, s_pmean, s_plogvar, s_gz,
    LV_MIN: tl.constexpr, LV_MAX: tl.constexpr, HAS_EPS: tl.constexpr, HAS_PRIOR: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # Elementwise given grad_kl[b], over runs of tiles as in the forward (its own grid: other registers).
    seed = 0
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    run0 = tl.program_id(0) * RUNS_PER_PROGRAM
    for run in range(run0, tl.minimum(run0 + RUNS_PER_PROGRAM, RUNS)):
        b = run // NUM_SPLITS
        split = run % NUM_SPLITS
        b64 = b.to(tl.int64)
        gkl = tl.load(gkl_ptr + b).to(tl.float32)
        t_start = split * TILES_PER_SPLIT
        t_end = tl.minimum(t_start + TILES_PER_SPLIT, TILES)
        full_end = tl.minimum(t_end, N // BLOCK)
        off = t_start.to(tl.int64) * BLOCK
        m, lv, e = mean_ptr + b64 * s_mean, logvar_ptr + b64 * s_logvar, eps_ptr + b64 * s_eps
        pm, plv, gz = pmean_ptr + b64 * s_pmean, plogvar_ptr + b64 * s_plogvar, gz_ptr + b64 * s_gz
        dm, dlv, dpm, dplv = (
            dmean_ptr + b64 * N,
            dlogvar_ptr + b64 * N,
            dpmean_ptr + b64 * N,
            dplogvar_ptr + b64 * N,
        )
        for t in range(t_start, full_end):
            _bwd_tile(
                m + off, lv + off, e + off, pm + off, plv + off, gz + off, dm + off, dlv + off, dpm + off,
                dplv + off, gkl, seed, b64 * SAMPLE_COUNTERS + t * (BLOCK // 4), BLOCK,
                LV_MIN, LV_MAX, HAS_EPS, HAS_PRIOR, False, BLOCK,
            )  # fmt: skip
            off += BLOCK
        if t_end > full_end:
            _bwd_tile(
                m + off, lv + off, e + off, pm + off, plv + off, gz + off, dm + off, dlv + off, dpm + off,
                dplv + off, gkl, seed, b64 * SAMPLE_COUNTERS + full_end * (BLOCK // 4),
                (N - off).to(tl.int32),
                LV_MIN, LV_MAX, HAS_EPS, HAS_PRIOR, True, BLOCK,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Launchers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy unless each sample's elements are already one contiguous run.

    A batch stride of any size is taken as it is: that is how mean and logvar arrive when they are the two
    halves of the encoder's moments (torch.chunk along channels), so they are read in place.
    """
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


def _grid(kernel, args, meta: dict, device: torch.device, B: int, N: int) -> tuple[int, common.Grid]:
    """(tile size, grid) of `kernel` on `device`; args(block, grid) builds its arguments.

    Every tile size runs 8 elements per thread (BLOCK // 256 warps), so the cost of an element does not
    depend on it: the grid rule of kernels/common.py for each size in BLOCKS, and the cheapest in elements
    wins (ties to the largest). A smaller tile's blocks per SM are estimated from the largest's (fewer warps
    with the same registers per thread), and counted for real once it is chosen.
    """
    largest = BLOCKS[0]

    def occupancy(block: int):
        probe = common.Grid(1, triton.cdiv(N, block), 1, B)  # grid-derived arguments are not specialised on
        return common.occupancy(
            kernel, args(block, probe), dict(meta, BLOCK=block, num_warps=block // 256), device
        )

    per_sm, gpu = occupancy(largest)
    best = None
    for block in BLOCKS:
        if gpu is None:
            slots = common.INTERPRETER_SLOTS
        else:
            slots = min(per_sm * largest // block, gpu.max_blocks_per_sm) * gpu.sms
        g = common.grid(B, triton.cdiv(N, block), slots)
        overhead = common.PROGRAM_OVERHEAD_TILES * largest
        cost = triton.cdiv(g.programs, slots) * g.runs_per_program * (g.tiles_per_split * block + overhead)
        if best is None or cost < best[0]:
            best = (cost, block, g)
    _, block, g = best
    if block != largest and gpu is not None:
        g = common.grid(B, triton.cdiv(N, block), occupancy(block)[0] * gpu.sms)
    return block, g


def _grid_args(block: int, g: common.Grid, B: int, N: int) -> tuple[int, ...]:
    """TILES, SAMPLE_COUNTERS, TILES_PER_SPLIT, NUM_SPLITS, RUNS_PER_PROGRAM, RUNS."""
    return triton.cdiv(N, block), triton.cdiv(N, BLOCKS[0]) * BLOCKS[0] // 4, *_runs(g, B)


def _runs(g: common.Grid, B: int) -> tuple[int, int, int, int]:
    return g.tiles_per_split, g.splits, g.runs_per_program, B * g.splits


def _launch_forward(mean, logvar, eps, seed, prior_mean, prior_logvar):
    B = mean.shape[0]
    N = mean[0].numel() if B else 0
    z = common.empty(mean.shape, mean.dtype, mean.device)
    if B == 0 or N == 0:
        return z, torch.zeros(B, dtype=mean.dtype, device=mean.device)
    kl = common.empty((B,), mean.dtype, mean.device)
    mean, logvar = _rows(mean), _rows(logvar)
    eps = None if eps is None else _rows(eps)
    has_prior = prior_mean is not None
    if has_prior:
        prior_mean, prior_logvar = _rows(prior_mean), _rows(prior_logvar)
    dummy = mean
    meta = dict(LV_MIN=LOGVAR_MIN, LV_MAX=LOGVAR_MAX, HAS_EPS=eps is not None, HAS_PRIOR=has_prior)

    def args(block, g, partial=kl, count=kl):
        return (
            mean, logvar, dummy if eps is None else eps, dummy if seed is None else seed,
            prior_mean if has_prior else dummy, prior_logvar if has_prior else dummy,
            z, kl, partial, count,
            N, *_grid_args(block, g, B, N),
            mean.stride(0), logvar.stride(0), 0 if eps is None else eps.stride(0),
            prior_mean.stride(0) if has_prior else 0, prior_logvar.stride(0) if has_prior else 0,
        )  # fmt: skip

    block, g = _grid(_gaussian_fwd_kernel, args, meta, mean.device, B, N)
    if g.splits > 1:
        partial = common.empty((B * g.splits,), torch.float32, mean.device)
        count = torch.zeros(B, dtype=torch.int32, device=mean.device)
    else:
        partial = count = kl  # unused
    _gaussian_fwd_kernel[(g.programs,)](
        *args(block, g, partial, count), **meta, BLOCK=block, num_warps=block // 256
    )
    return z, kl


def _launch_backward(grad_z, grad_kl, mean, logvar, eps, seed, prior_mean, prior_logvar):
    B = mean.shape[0]
    N = mean[0].numel() if B else 0
    has_prior = prior_mean is not None
    out_shape, dt, dev = mean.shape, mean.dtype, mean.device
    grads = [common.empty(out_shape, dt, dev) for _ in range(4 if has_prior else 2)]
    if B == 0 or N == 0:
        return grads
    mean, logvar, grad_z = _rows(mean), _rows(logvar), _rows(grad_z)
    grad_kl = grad_kl.contiguous()
    eps = None if eps is None else _rows(eps)
    if has_prior:
        prior_mean, prior_logvar = _rows(prior_mean), _rows(prior_logvar)
    dummy = mean
    meta = dict(LV_MIN=LOGVAR_MIN, LV_MAX=LOGVAR_MAX, HAS_EPS=eps is not None, HAS_PRIOR=has_prior)

    def args(block, g):
        return (
            mean, logvar, dummy if eps is None else eps, dummy if seed is None else seed,
            prior_mean if has_prior else dummy, prior_logvar if has_prior else dummy, grad_z, grad_kl,
            grads[0], grads[1], grads[2] if has_prior else dummy, grads[3] if has_prior else dummy,
            N, *_grid_args(block, g, B, N),
            mean.stride(0), logvar.stride(0), 0 if eps is None else eps.stride(0),
            prior_mean.stride(0) if has_prior else 0, prior_logvar.stride(0) if has_prior else 0,
            grad_z.stride(0),
        )  # fmt: skip

    block, g = _grid(_gaussian_bwd_kernel, args, meta, mean.device, B, N)
    _gaussian_bwd_kernel[(g.programs,)](*args(block, g), **meta, BLOCK=block, num_warps=block // 256)
    return grads


# --------------------------------------------------------------------------------------------------------
# torch.library ops and autograd
#
# custom_op (opaque to torch.compile, with fake-tensor rules) rather than triton_op: triton_op registers its
# body as the fake kernel, which launches the kernel on fake tensors under the CPU interpreter, so it would
# only compose with torch.compile on CUDA. One registration path for both keeps the CPU tests honest.


@torch.library.custom_op("vae_kernels::gaussian_sample_kl", mutates_args=())
def _forward_op(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    seed: torch.Tensor | None,
    prior_mean: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(mean, logvar, eps, seed, prior_mean, prior_logvar)


@_forward_op.register_fake
def _(mean, logvar, eps, seed, prior_mean, prior_logvar):
    return torch.empty_like(mean, memory_format=torch.contiguous_format), mean.new_empty(mean.shape[0])


@torch.library.custom_op("vae_kernels::gaussian_sample_kl_backward", mutates_args=())
def _backward_op(
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    seed: torch.Tensor | None,
    prior_mean: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
) -> list[torch.Tensor]:
    return _launch_backward(grad_z, grad_kl, mean, logvar, eps, seed, prior_mean, prior_logvar)


@_backward_op.register_fake
def _(grad_z, grad_kl, mean, logvar, eps, seed, prior_mean, prior_logvar):
    n = 2 if prior_mean is None else 4
    return [torch.empty_like(mean, memory_format=torch.contiguous_format) for _ in range(n)]


def _setup_context(ctx, inputs, output):
    mean, logvar, eps, seed, prior_mean, prior_logvar = inputs
    ctx.save_for_backward(mean, logvar, eps, seed, prior_mean, prior_logvar)


def _backward(ctx, grad_z, grad_kl):
    mean, logvar, eps, seed, prior_mean, prior_logvar = ctx.saved_tensors
    grads = _backward_op(grad_z, grad_kl, mean, logvar, eps, seed, prior_mean, prior_logvar)
    d_prior = (grads[2], grads[3]) if prior_mean is not None else (None, None)
    return grads[0], grads[1], None, None, *d_prior


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def gaussian_sample_kl_triton(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    prior_mean: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton path, for inputs already through check_inputs. Returns (z, kl) in mean's dtype.

    With eps=None the seed is one int64 drawn from torch's generator on mean's device (so torch.manual_seed
    makes runs repeatable, and activation checkpointing, which restores the RNG state, recomputes the same z).
    """
    common.require_triton(mean.dtype)
    seed = None
    if eps is None:
        seed = torch.randint(0, 2**62, (1,), device=mean.device, dtype=torch.int64)
    return _forward_op(mean, logvar, eps, seed, prior_mean, prior_logvar)
