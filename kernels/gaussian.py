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
backward regenerates it from the same seed: only mean, logvar and the seed are kept for backward.

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

        @staticmethod
        def constexpr(value):
            return value

    triton = tl = _MissingTriton
    HAS_TRITON, TRITON_IMPORT_ERROR = False, e

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0

# Elements per tile. It also fixes which Philox counter draws which element's eps (one 4-output Philox call
# per 4 elements), so the forward and the backward must use the same value.
BLOCK = 2048

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

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


@triton.jit
def _normal_tile(seed, b64, t, TILES, Q: tl.constexpr):
    """eps for tile t of sample b as a (4, Q) block: one 4-output Philox call per column."""
    counter = (b64 * TILES + t) * Q + tl.arange(0, Q)  # int64, unique across the whole tensor
    n0, n1, n2, n3 = tl.randn4x(seed, counter)
    row = tl.arange(0, 4)[:, None]
    eps = tl.where(row == 2, n2[None, :], n3[None, :])
    eps = tl.where(row == 1, n1[None, :], eps)
    return tl.where(row == 0, n0[None, :], eps)


@triton.jit
def _gaussian_fwd_kernel(
    mean_ptr, logvar_ptr, eps_ptr, seed_ptr, pmean_ptr, plogvar_ptr,
    z_ptr, kl_ptr, partial_ptr, count_ptr,
    N, TILES, TILES_PER_SPLIT, NUM_SPLITS,
    s_mean, s_logvar, s_eps, s_pmean, s_plogvar,
    LV_MIN: tl.constexpr, LV_MAX: tl.constexpr,
    HAS_EPS: tl.constexpr, HAS_PRIOR: tl.constexpr, SPLIT: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # One program: sample b, tiles [split * TILES_PER_SPLIT, ...) of it. Batch offsets are int64 because
    # B * N can pass 2**31; in-sample offsets are int64 too so that N itself may.
    pid = tl.program_id(0)
    b = pid // NUM_SPLITS
    split = pid % NUM_SPLITS
    b64 = b.to(tl.int64)
    Q: tl.constexpr = BLOCK // 4
    lanes = tl.arange(0, 4)[:, None] * Q + tl.arange(0, Q)[None, :]  # (4, Q): element order in a tile
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    acc = tl.full((4, Q), 0.0, tl.float32)
    t_start = split * TILES_PER_SPLIT
    t_end = tl.minimum(t_start + TILES_PER_SPLIT, TILES)
    tile_base = t_start.to(tl.int64) * BLOCK
    for t in range(t_start, t_end):
        i = tile_base + lanes
        tile_base += BLOCK
        mask = i < N
        m = tl.load(mean_ptr + b64 * s_mean + i, mask=mask, other=0.0).to(tl.float32)
        lv = tl.load(logvar_ptr + b64 * s_logvar + i, mask=mask, other=0.0).to(tl.float32)
        lv = tl.minimum(tl.maximum(lv, LV_MIN), LV_MAX)
        if HAS_EPS:
            eps = tl.load(eps_ptr + b64 * s_eps + i, mask=mask, other=0.0).to(tl.float32)
        else:
            eps = _normal_tile(seed, b64, t, TILES, Q)
        z = m + tl.exp(0.5 * lv) * eps
        tl.store(z_ptr + b64 * N + i, z.to(z_ptr.dtype.element_ty), mask=mask)
        if HAS_PRIOR:
            pm = tl.load(pmean_ptr + b64 * s_pmean + i, mask=mask, other=0.0).to(tl.float32)
            plv = tl.load(plogvar_ptr + b64 * s_plogvar + i, mask=mask, other=0.0).to(tl.float32)
            plv = tl.minimum(tl.maximum(plv, LV_MIN), LV_MAX)
            d = m - pm
            kl = 0.5 * (d * d * tl.exp(-plv) + tl.exp(lv - plv) - 1.0 - lv + plv)
        else:
            kl = 0.5 * (m * m + tl.exp(lv) - 1.0 - lv)
        acc += tl.where(mask, kl, 0.0)
    partial = tl.sum(tl.sum(acc, axis=1), axis=0)
    if SPLIT:
        # Publish this split's partial, then count arrivals; the last program of the sample sums all the
        # partials in split order (deterministic, whatever order the programs ran in). The barrier makes
        # every thread's store land before the release; .cg reads the partials from L2, not a stale L1.
        tl.store(partial_ptr + b64 * NUM_SPLITS + split, partial)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            offs = tl.arange(0, SPLIT_BLOCK)
            parts = tl.load(
                partial_ptr + b64 * NUM_SPLITS + offs, mask=offs < NUM_SPLITS, other=0.0, cache_modifier=".cg"
            )
            tl.store(kl_ptr + b, tl.sum(parts, axis=0).to(kl_ptr.dtype.element_ty))
    else:
        tl.store(kl_ptr + b, partial.to(kl_ptr.dtype.element_ty))


@triton.jit
def _gaussian_bwd_kernel(
    mean_ptr, logvar_ptr, eps_ptr, seed_ptr, pmean_ptr, plogvar_ptr, gz_ptr, gkl_ptr,
    dmean_ptr, dlogvar_ptr, dpmean_ptr, dplogvar_ptr,
    N, TILES,
    s_mean, s_logvar, s_eps, s_pmean, s_plogvar, s_gz,
    LV_MIN: tl.constexpr, LV_MAX: tl.constexpr,
    HAS_EPS: tl.constexpr, HAS_PRIOR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per tile; purely elementwise given grad_kl[b].
    pid = tl.program_id(0)
    b = pid // TILES
    t = pid % TILES
    b64 = b.to(tl.int64)
    Q: tl.constexpr = BLOCK // 4
    i = t.to(tl.int64) * BLOCK + tl.arange(0, 4)[:, None] * Q + tl.arange(0, Q)[None, :]
    mask = i < N
    gkl = tl.load(gkl_ptr + b).to(tl.float32)
    gz = tl.load(gz_ptr + b64 * s_gz + i, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mean_ptr + b64 * s_mean + i, mask=mask, other=0.0).to(tl.float32)
    lv_in = tl.load(logvar_ptr + b64 * s_logvar + i, mask=mask, other=0.0).to(tl.float32)
    # clamp passes the gradient where LV_MIN <= logvar <= LV_MAX (inclusive, as torch.clamp does)
    lv_pass = (lv_in >= LV_MIN) & (lv_in <= LV_MAX)
    lv = tl.minimum(tl.maximum(lv_in, LV_MIN), LV_MAX)
    if HAS_EPS:
        eps = tl.load(eps_ptr + b64 * s_eps + i, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = _normal_tile(tl.load(seed_ptr), b64, t, TILES, Q)  # the forward's eps, regenerated
    dm = gz
    dlv = 0.5 * gz * tl.exp(0.5 * lv) * eps
    if HAS_PRIOR:
        pm = tl.load(pmean_ptr + b64 * s_pmean + i, mask=mask, other=0.0).to(tl.float32)
        plv_in = tl.load(plogvar_ptr + b64 * s_plogvar + i, mask=mask, other=0.0).to(tl.float32)
        plv_pass = (plv_in >= LV_MIN) & (plv_in <= LV_MAX)
        plv = tl.minimum(tl.maximum(plv_in, LV_MIN), LV_MAX)
        inv_pvar = tl.exp(-plv)
        ratio = tl.exp(lv - plv)
        d = m - pm
        dm += gkl * d * inv_pvar
        dlv += 0.5 * gkl * (ratio - 1.0)
        dpm = -gkl * d * inv_pvar
        dplv = tl.where(plv_pass, 0.5 * gkl * (1.0 - d * d * inv_pvar - ratio), 0.0)
        tl.store(dpmean_ptr + b64 * N + i, dpm.to(dpmean_ptr.dtype.element_ty), mask=mask)
        tl.store(dplogvar_ptr + b64 * N + i, dplv.to(dplogvar_ptr.dtype.element_ty), mask=mask)
    else:
        dm += gkl * m
        dlv += 0.5 * gkl * (tl.exp(lv) - 1.0)
    dlv = tl.where(lv_pass, dlv, 0.0)
    tl.store(dmean_ptr + b64 * N + i, dm.to(dmean_ptr.dtype.element_ty), mask=mask)
    tl.store(dlogvar_ptr + b64 * N + i, dlv.to(dlogvar_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launchers


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fill goes through here, so a test can hand out NaN-filled ones instead."""
    return torch.empty(shape, dtype=dtype, device=device)


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


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: a few per SM on a GPU; a handful under the CPU interpreter."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _launch_forward(mean, logvar, eps, seed, prior_mean, prior_logvar):
    B = mean.shape[0]
    N = mean[0].numel() if B else 0
    z = _empty(mean.shape, mean.dtype, mean.device)
    if B == 0 or N == 0:
        return z, torch.zeros(B, dtype=mean.dtype, device=mean.device)
    kl = _empty((B,), mean.dtype, mean.device)
    mean, logvar = _rows(mean), _rows(logvar)
    eps = None if eps is None else _rows(eps)
    has_prior = prior_mean is not None
    if has_prior:
        prior_mean, prior_logvar = _rows(prior_mean), _rows(prior_logvar)
    tiles = triton.cdiv(N, BLOCK)
    splits = max(1, min(tiles, triton.cdiv(_target_programs(mean.device), B)))
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)  # no empty splits
    if splits > 1:
        partial = _empty((B * splits,), torch.float32, mean.device)
        count = torch.zeros(B, dtype=torch.int32, device=mean.device)
    else:
        partial = count = kl  # unused
    dummy = mean
    _gaussian_fwd_kernel[(B * splits,)](
        mean, logvar, dummy if eps is None else eps, dummy if seed is None else seed,
        prior_mean if has_prior else dummy, prior_logvar if has_prior else dummy,
        z, kl, partial, count,
        N, tiles, per_split, splits,
        mean.stride(0), logvar.stride(0), 0 if eps is None else eps.stride(0),
        prior_mean.stride(0) if has_prior else 0, prior_logvar.stride(0) if has_prior else 0,
        LV_MIN=LOGVAR_MIN, LV_MAX=LOGVAR_MAX,
        HAS_EPS=eps is not None, HAS_PRIOR=has_prior, SPLIT=splits > 1,
        SPLIT_BLOCK=triton.next_power_of_2(splits), BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return z, kl


def _launch_backward(grad_z, grad_kl, mean, logvar, eps, seed, prior_mean, prior_logvar):
    B = mean.shape[0]
    N = mean[0].numel() if B else 0
    has_prior = prior_mean is not None
    out_shape, dt, dev = mean.shape, mean.dtype, mean.device
    grads = [_empty(out_shape, dt, dev) for _ in range(4 if has_prior else 2)]
    if B == 0 or N == 0:
        return grads
    mean, logvar, grad_z = _rows(mean), _rows(logvar), _rows(grad_z)
    grad_kl = grad_kl.contiguous()
    eps = None if eps is None else _rows(eps)
    if has_prior:
        prior_mean, prior_logvar = _rows(prior_mean), _rows(prior_logvar)
    tiles = triton.cdiv(N, BLOCK)
    dummy = mean
    _gaussian_bwd_kernel[(B * tiles,)](
        mean, logvar, dummy if eps is None else eps, dummy if seed is None else seed,
        prior_mean if has_prior else dummy, prior_logvar if has_prior else dummy, grad_z, grad_kl,
        grads[0], grads[1], grads[2] if has_prior else dummy, grads[3] if has_prior else dummy,
        N, tiles,
        mean.stride(0), logvar.stride(0), 0 if eps is None else eps.stride(0),
        prior_mean.stride(0) if has_prior else 0, prior_logvar.stride(0) if has_prior else 0,
        grad_z.stride(0),
        LV_MIN=LOGVAR_MIN, LV_MAX=LOGVAR_MAX,
        HAS_EPS=eps is not None, HAS_PRIOR=has_prior, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
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
    if not HAS_TRITON:
        raise RuntimeError(
            f"impl='triton' needs the triton package, which did not import: {TRITON_IMPORT_ERROR}"
        )
    if mean.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32, bfloat16 or float16 tensors, got {mean.dtype}")
    seed = None
    if eps is None:
        seed = torch.randint(0, 2**62, (1,), device=mean.device, dtype=torch.int64)
    return _forward_op(mean, logvar, eps, seed, prior_mean, prior_logvar)
