"""The fused posterior (reparameterised sample + KL) against its eager reference run in float64.

The kernels run as support.KERNEL_TEST says: with impl="triton", through the interpreter on a CPU, into
NaN-filled buffers; the `gpu` tests repeat the checks on CUDA in fp32/bf16/fp16.
"""

import math

import pytest
import torch
import torch.utils.checkpoint
from support import KERNEL_TEST

from vae_scale import kernels
from vae_scale.kernels import common, gaussian
from vae_scale.kernels.gaussian import LOGVAR_MAX, LOGVAR_MIN, gaussian_sample_kl_reference

pytestmark = KERNEL_TEST

# Per-dtype tolerances against the float64 reference. They guard a wrong formula, clamp, broadcast or a
# missed element (NaN-filled buffers): errors of order 1. fp32: each output is a few ops (exp, log, fma) of a
# few ulp, and the KL a sum of nonnegative terms (its rounding stays relative: ~log2(4620) * 6e-8 = 7e-7,
# whatever order numpy's or torch's SIMD kernels sum in): ~1e-6 against 2e-5. Half dtypes: the output's own
# rounding (2^-8 bf16, 2^-11 fp16) plus the fp32 math inside, a few ulp of the dtype.
TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
# Odd sizes: nothing a multiple of a block; batch 1 and one channel; 1-D; one that splits samples across
# programs (4620 elements per sample is three 2048-element tiles).
SHAPES = [(3, 5, 7, 9), (1, 1, 3, 5), (5,), (2, 4, 33, 35)]
PRIORS = [None, "full", "per-channel"]


def make_logvar(shape, dtype, device, gen, prior=False):
    """Mostly moderate log-variances, some outside [-30, 20] and some exactly on its ends."""
    # fp16 holds KL sums up to 65504 only: narrower log-variances there
    lv = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 if dtype == torch.float16 else 3)
    pick = torch.rand(shape, generator=gen, dtype=torch.float64)
    extremes = [-45.0, -31.0, LOGVAR_MIN, LOGVAR_MAX, 21.0, 35.0]
    if dtype == torch.float16:
        # fp16 cannot hold exp(20) nor exp(30) (z or KL overflow in any implementation): the posterior's
        # logvar goes out on the low side only, the prior's not at all
        extremes = [] if prior else extremes[:3]
    for k, value in enumerate(extremes):
        lv = torch.where((pick > 0.02 * k) & (pick < 0.02 * k + 0.015), torch.full_like(lv, value), lv)
    return lv.to(device=device, dtype=dtype)


def make_inputs(shape, dtype, device, prior, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "mean": (torch.randn(shape, generator=gen) * 2).to(device, dtype),
        "logvar": make_logvar(shape, dtype, device, gen),
        "eps": torch.randn(shape, generator=gen).to(device, dtype),
    }
    if prior is not None:
        pshape = shape if prior == "full" or len(shape) < 2 else (1, shape[1]) + (1,) * (len(shape) - 2)
        t["prior_mean"] = torch.randn(pshape, generator=gen).to(device, dtype)
        t["prior_logvar"] = make_logvar(pshape, dtype, device, gen, prior=True)
    grad_z = torch.randn(shape, generator=gen).to(device, dtype)
    grad_kl = torch.randn(shape[0], generator=gen).to(device, dtype)
    return t, grad_z, grad_kl


def run(fn, inputs, grad_z, grad_kl):
    """Forward, then backward of sum(z * grad_z) + sum(kl * grad_kl); returns outputs and input grads."""
    leaves = {k: v.detach().clone().requires_grad_(k != "eps") for k, v in inputs.items()}
    z, kl = fn(**leaves)
    torch.autograd.backward((z, kl), (grad_z.to(z.dtype), grad_kl.to(kl.dtype)))
    return z, kl, {k: v.grad for k, v in leaves.items() if k != "eps"}


def reference(inputs, grad_z, grad_kl):
    as64 = {k: v.double() for k, v in inputs.items()}
    return run(gaussian_sample_kl_reference, as64, grad_z.double(), grad_kl.double())


def assert_matches(got, want, dtype):
    z, kl, grads = got
    z_ref, kl_ref, grads_ref = want
    assert z.dtype == kl.dtype == dtype
    torch.testing.assert_close(z.double(), z_ref, **TOL[dtype])
    # Every KL term is >= 0, so rtol on the KL is relative to the sum of the terms' magnitudes.
    torch.testing.assert_close(kl.double(), kl_ref, **TOL[dtype])
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None, name
        assert grads[name].shape == grads_ref[name].shape, name
        torch.testing.assert_close(grads[name].double(), grads_ref[name], **TOL[dtype], msg=name)


def triton_impl(**kw):
    return kernels.gaussian_sample_kl(**kw, impl="triton")


def check_against_reference(shape, prior, given_eps, dtype, device):
    inputs, grad_z, grad_kl = make_inputs(shape, dtype, device, prior)
    if given_eps:
        want = reference(inputs, grad_z, grad_kl)
        got = run(triton_impl, inputs, grad_z, grad_kl)
    else:
        # The kernel's own noise, read back through mean = 0, logvar = 0 (z = eps exactly) under the same
        # seed: the noise depends on the seed and the shape only, not on the values.
        no_eps = {k: v for k, v in inputs.items() if k != "eps"}
        torch.manual_seed(1234)
        got = run(triton_impl, no_eps, grad_z, grad_kl)
        torch.manual_seed(1234)
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        inputs["eps"], _ = kernels.gaussian_sample_kl(zeros, zeros, impl="triton")
        want = reference(inputs, grad_z, grad_kl)
    if dtype == torch.float16 and want[1].abs().max() > torch.finfo(torch.float16).max:
        pytest.skip("the KL of a sample this large is beyond float16's range in any implementation")
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("given_eps", [True, False], ids=["eps", "in-kernel-eps"])
@pytest.mark.parametrize("prior", PRIORS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_every_gradient_match_float64_reference(shape, prior, given_eps):
    check_against_reference(shape, prior, given_eps, torch.float32, "cpu")


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs_through_the_interpreter(dtype):
    check_against_reference((2, 3, 5, 7), "full", True, dtype, "cpu")


def test_split_reduction_is_deterministic():
    inputs, _, _ = make_inputs((1, 4, 33, 35), torch.float32, "cpu", "full")  # 3 tiles, 3 programs
    kl1 = kernels.gaussian_sample_kl(**inputs, impl="triton")[1]
    kl2 = kernels.gaussian_sample_kl(**inputs, impl="triton")[1]
    assert torch.equal(kl1, kl2)  # bit-identical: the same kernels twice in one process


# --------------------------------------------------------------------------------------------------------
# The in-kernel noise


def kernel_noise(shape, seed, device="cpu"):
    torch.manual_seed(seed)
    zeros = torch.zeros(shape, device=device)
    return kernels.gaussian_sample_kl(zeros, zeros, impl="triton")[0]  # z = 0 + exp(0) * eps = eps


def test_in_kernel_noise_is_standard_normal():
    eps = kernel_noise((3, 4, 47, 53), seed=0).double()  # 29,892 draws
    x = eps.flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.std().item() - 1) < 5 / math.sqrt(2 * n)
    tail = (x.abs() > 2).double().mean().item()
    p = math.erfc(2 / math.sqrt(2))
    assert abs(tail - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Kolmogorov-Smirnov distance to N(0, 1) below its 0.1% critical value
    xs = x.sort().values
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert max(
        (ranks - cdf).abs().max().item(), (cdf - (ranks - 1 / n)).abs().max().item()
    ) < 1.95 / math.sqrt(n)
    # Neighbours (the four outputs of one Philox call go to four neighbours), the next call, and the samples
    # of a batch are uncorrelated.
    per_sample = eps.flatten(1)
    for a, b in [
        (per_sample[:, :-1], per_sample[:, 1:]),
        (per_sample[:, :-2], per_sample[:, 2:]),
        (per_sample[:, :-3], per_sample[:, 3:]),
        (per_sample[:, :-4], per_sample[:, 4:]),
        (per_sample[0], per_sample[1]),
    ]:
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(a.numel()), r


def test_same_seed_same_noise_whatever_the_values_and_a_new_seed_new_noise():
    eps = kernel_noise((2, 3, 9, 11), seed=7)
    assert torch.equal(eps, kernel_noise((2, 3, 9, 11), seed=7))
    assert not torch.allclose(eps, kernel_noise((2, 3, 9, 11), seed=8))
    mean, logvar = torch.randn(2, 3, 9, 11), torch.randn(2, 3, 9, 11)
    torch.manual_seed(7)
    z, _ = kernels.gaussian_sample_kl(mean, logvar, impl="triton")
    # Another seed's noise differs by O(1). Recovering eps divides z's rounding (~6e-8 * |mean| <= 3e-7) by
    # std >= exp(-1.5): <= 2e-6, under the default fp32 atol 1e-5 (+ rtol 1.3e-6) on any kernels.
    torch.testing.assert_close((z - mean) / torch.exp(0.5 * logvar), eps)


@pytest.mark.slow
def test_noise_does_not_depend_on_the_tile_size(monkeypatch):
    """A launch with little work per slot takes smaller tiles (the forward and backward may differ); each
    element keeps its Philox counter, so the noise is the same."""
    shape = (4, 4, 32, 32)

    def block():
        return gaussian._grid(None, lambda *a: (), {}, torch.device("cpu"), 4, 4096)[0]

    before = block()
    eps = kernel_noise(shape, seed=11)
    monkeypatch.setattr(common, "INTERPRETER_SLOTS", 64)
    assert block() == gaussian.BLOCKS[-1] != before
    assert torch.equal(eps, kernel_noise(shape, seed=11))
    test_backward_regenerates_the_forward_noise(shape)


def test_backward_regenerates_the_forward_noise(shape=(2, 4, 33, 35)):
    zeros = torch.zeros(shape)
    mean, logvar = zeros.clone().requires_grad_(), zeros.clone().requires_grad_()
    z, kl = kernels.gaussian_sample_kl(mean, logvar, impl="triton")
    torch.autograd.backward((z, kl), (torch.ones_like(z), torch.zeros_like(kl)))
    # d z / d logvar = 0.5 * exp(0.5 * logvar) * eps = eps / 2 at logvar = 0, and z = eps: exactly equal
    assert torch.equal(2 * logvar.grad, z.detach())


def test_activation_checkpointing_recomputes_the_same_noise():
    """checkpoint() restores the RNG state before recomputing, so the seed drawn again is the same one."""
    mean, logvar = torch.randn(2, 3, 33, 35), torch.randn(2, 3, 33, 35)
    weight = torch.randn(2, 3, 33, 35)

    def loss(m, lv):
        z, kl = kernels.gaussian_sample_kl(m, lv, impl="triton")
        return (z * weight).sum() + kl.sum()

    grads = []
    for checkpointed in (False, True):
        leaves = [mean.clone().requires_grad_(), logvar.clone().requires_grad_()]
        torch.manual_seed(3)
        if checkpointed:
            torch.utils.checkpoint.checkpoint(loss, *leaves, use_reentrant=False).backward()
        else:
            loss(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)


def test_only_mean_logvar_and_the_seed_are_saved_without_eps():
    mean = torch.randn(2, 3, 4, 5, requires_grad=True)
    logvar = torch.randn(2, 3, 4, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.gaussian_sample_kl(mean, logvar, impl="triton")
    assert sorted(t.numel() for t in saved) == [1, 120, 120]


# --------------------------------------------------------------------------------------------------------
# Inputs: layouts, validation, autocast, torch.library


@pytest.mark.numerics
def test_halves_of_the_moments_tensor_are_read_in_place():
    moments = torch.randn(3, 8, 5, 7)
    mean, logvar = torch.chunk(moments, 2, dim=1)  # batch-strided views
    eps = torch.randn(3, 4, 5, 7)
    z, kl = kernels.gaussian_sample_kl(mean, logvar, eps, impl="triton")
    z_ref, kl_ref = gaussian_sample_kl_reference(mean.double(), logvar.double(), eps.double())
    torch.testing.assert_close(z.double(), z_ref, **TOL[torch.float32])
    torch.testing.assert_close(kl.double(), kl_ref, **TOL[torch.float32])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(logvar=torch.zeros(2, 3, 4, 4)), "logvar shape"),
        (dict(eps=torch.zeros(2, 3, 4)), "eps shape"),
        (dict(prior_mean=torch.zeros(2, 4, 4, 4)), "prior_mean and prior_logvar"),
        (dict(prior_mean=torch.zeros(2, 3, 4, 4), prior_logvar=torch.zeros(2, 3, 4, 4)), "prior_mean shape"),
        (dict(eps=torch.zeros(2, 4, 4, 4, dtype=torch.float64)), "mixed dtypes: mean=torch.float32"),
        (dict(logvar=torch.zeros(2, 4, 4, 4, device="meta")), "logvar is on meta"),
        (dict(logvar=torch.zeros(2, 4, 4, 4, dtype=torch.int32)), "mixed dtypes|logvar must be a floating"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_input_is_a_value_error_that_names_it(kwargs, message):
    args = dict(mean=torch.zeros(2, 4, 4, 4), logvar=torch.zeros(2, 4, 4, 4), impl="triton") | kwargs
    with pytest.raises(ValueError, match=message):
        kernels.gaussian_sample_kl(**args)


@pytest.mark.numerics
def test_autocast_promotes_mixed_dtypes_and_outside_autocast_they_are_an_error():
    mean, logvar = torch.randn(2, 3, 4, 5).bfloat16(), torch.randn(2, 3, 4, 5).bfloat16()
    prior_mean, prior_logvar = torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1)  # fp32 learned prior
    eps = torch.randn(2, 3, 4, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, kl = kernels.gaussian_sample_kl(mean, logvar, eps, prior_mean, prior_logvar, impl="triton")
    assert z.dtype == kl.dtype == torch.float32
    z_ref, kl_ref = gaussian_sample_kl_reference(
        mean.double(), logvar.double(), eps.double(), prior_mean.double(), prior_logvar.double()
    )
    torch.testing.assert_close(kl.double(), kl_ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="mixed dtypes"):
        kernels.gaussian_sample_kl(mean, logvar, eps, prior_mean, prior_logvar, impl="triton")


def test_torch_library_opcheck():
    inputs, _, _ = make_inputs((2, 3, 4, 5), torch.float32, "cpu", "full")
    seed = torch.tensor([5], dtype=torch.int64)
    grad = {"mean", "logvar", "prior_mean", "prior_logvar"}
    for eps, s in [(inputs["eps"], None), (None, seed)]:
        args = {k: inputs[k].clone().requires_grad_(k in grad) for k in ("mean", "logvar")}
        args |= {"eps": eps, "seed": s}
        args |= {k: inputs[k].clone().requires_grad_() for k in ("prior_mean", "prior_logvar")}
        torch.library.opcheck(gaussian._forward_op, tuple(args.values()))


# --------------------------------------------------------------------------------------------------------
# CUDA: the same checks on the real kernels, in every dtype


GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("given_eps", [True, False], ids=["eps", "in-kernel-eps"])
@pytest.mark.parametrize("prior", PRIORS, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(32, 4, 32, 32), (3, 16, 67, 65)], ids=str)
def test_gpu_matches_float64_reference(shape, prior, given_eps, dtype):
    check_against_reference(shape, prior, given_eps, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_noise_statistics_and_determinism():
    eps = kernel_noise((8, 16, 64, 64), seed=3, device="cuda").double().flatten()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.std().item() - 1) < 5 / math.sqrt(2 * n)
    inputs, _, _ = make_inputs((4, 16, 128, 128), torch.float32, "cuda", "full")  # many splits per sample
    kls = [kernels.gaussian_sample_kl(**inputs, impl="triton")[1] for _ in range(3)]
    assert all(torch.equal(kls[0], k) for k in kls[1:])
    z_ref, kl_ref = gaussian_sample_kl_reference(
        *(inputs[k].double() for k in ("mean", "logvar", "eps", "prior_mean", "prior_logvar"))
    )
    torch.testing.assert_close(kls[0].double(), kl_ref, **TOL[torch.float32])


# --------------------------------------------------------------------------------------------------------
# NaN and Inf: the kernels give the reference's pattern in z, the KL and every gradient


SPECIALS = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def assert_same_specials(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """NaN where the reference (rounded to dtype) has NaN, +-Inf where it has +-Inf, close elsewhere."""
    want = want.to(dtype).double()
    got = got.double()
    for what, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(mask(got), mask(want)), (
            f"{name}: {what} at {mask(got).nonzero().tolist()}, reference at {mask(want).nonzero().tolist()}"
        )
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], **TOL[dtype], msg=name)


def with_specials(t: torch.Tensor, value: float) -> torch.Tensor:
    """t with `value` at two places: the first element of the first sample and one inside the last."""
    t = t.clone()
    flat = t.view(t.shape[0], -1)
    flat[0, 0] = value
    flat[-1, flat.shape[1] // 2] = value
    return t


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize(
    "where, special, dtype",
    [(w, s, torch.float32) for w in ("mean", "logvar", "prior_mean", "prior_logvar") for s in SPECIALS]
    + [(w, "nan", d) for w in ("mean", "logvar", "prior_logvar") for d in (torch.bfloat16, torch.float16)]
    + [("logvar", "-inf", torch.float16), ("mean", "+inf", torch.bfloat16)],
    ids=str,
)
def test_nan_and_inf_propagate_as_in_the_reference(where, special, dtype):
    gen = torch.Generator().manual_seed(5)
    shape = (3, 2, 5, 7)
    inputs = {
        "mean": torch.randn(shape, generator=gen),
        "logvar": torch.randn(shape, generator=gen),
        "eps": torch.randn(shape, generator=gen),
        "prior_mean": torch.randn(shape, generator=gen),
        "prior_logvar": torch.randn(shape, generator=gen),
    }
    inputs[where] = with_specials(inputs[where], SPECIALS[special])
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    grad_z, grad_kl = (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape[0], generator=gen).to(dtype),
    )
    z, kl, grads = run(triton_impl, inputs, grad_z, grad_kl)
    z_ref, kl_ref, grads_ref = reference(inputs, grad_z, grad_kl)
    assert_same_specials(z, z_ref, dtype, "z")
    assert_same_specials(kl, kl_ref, dtype, "kl")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_same_specials(grads[name], grads_ref[name], dtype, f"grad {name}")
    if special == "nan" or where == "mean":  # (an infinite logvar is clamped: finite, as in the reference)
        assert not torch.isfinite(kl[[0, -1]]).any()  # what the trainer's non-finite guard must see


def test_nan_logvar_reaches_z_and_kl_with_noise_drawn_in_the_kernel():
    """A diverging encoder: NaN log-variance, noise from the kernel. z and that sample's KL are NaN."""
    mean, logvar = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    logvar[1, 2, 3, 4] = float("nan")
    mean.requires_grad_()
    z, kl = kernels.gaussian_sample_kl(mean, logvar, impl="triton")
    assert torch.isnan(z[1, 2, 3, 4]) and torch.isnan(z).sum() == 1
    assert torch.isnan(kl[1]) and torch.isfinite(kl[0])
