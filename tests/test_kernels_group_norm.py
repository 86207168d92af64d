"""Fused GroupNorm(+SiLU) against its eager reference run in float64, NCHW and channels_last.

The kernels run as support.KERNEL_TEST says: with impl="triton", through the interpreter on a CPU, into
NaN-filled buffers; the `gpu` tests repeat the checks on CUDA in fp32/bf16/fp16.
"""

import pytest
import torch
from support import KERNEL_TEST

from vae_scale import kernels
from vae_scale.kernels import group_norm
from vae_scale.kernels.group_norm import group_norm_silu_reference

pytestmark = KERNEL_TEST

# Per-dtype tolerances against the float64 reference. They guard a wrong group or channel-block edge, a
# variance without a shift (x ~ 20 +- 3), a missing gradient term, a missed element: errors of order 0.1-1.
# fp32: the group statistics are sums of <= 13,065 terms, rounding ~log2(n) * 6e-8 relative to x ~ 20, i.e.
# ~2e-6 in (x - mean) / std, whatever order the interpreter's numpy sums in; 2e-5 is 10x that. Half dtypes:
# the output's own rounding (2^-8 bf16, 2^-11 fp16) times |y| <= ~5, plus fp32 math inside.
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
# (shape, groups, layout). Odd sizes throughout; batch 1 and a single channel; one channel per group and one
# group for all; groups cut by the edge of a program's channel block (C=6 in blocks of 4; C=300 in blocks of
# 256); a spatial extent split over programs in each layout; 3-D and 2-D inputs; the last two with whole
# channel blocks (no channel mask), full tiles before a partial one, and (NCHW) programs of several rows.
CASES = [
    ((3, 5, 7, 9), 5, "nchw"),
    ((1, 1, 3, 5), 1, "nchw"),
    ((2, 12, 5, 7), 6, "channels_last"),
    ((2, 12, 5, 7), 12, "nchw"),
    ((2, 12, 5, 7), 1, "channels_last"),
    ((2, 40, 9, 11), 4, "channels_last"),
    ((1, 6, 33, 35), 2, "nchw"),
    ((1, 300, 3, 5), 4, "channels_last"),
    ((1, 6, 65, 67), 2, "channels_last"),
    ((2, 6, 9), 3, "nchw"),
    ((4, 6), 2, "nchw"),
    ((2, 16, 41, 53), 4, "nchw"),
    ((2, 8, 37, 29), 4, "channels_last"),
]


def to_layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def make_inputs(shape, dtype, device, layout, param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    # An offset well above the spread: a one-pass variance without a shift would cancel badly.
    x = torch.randn(shape, generator=gen) * 3 + 20
    grad_y = torch.randn(shape, generator=gen)
    p = param_dtype or dtype
    weight = (torch.randn(C, generator=gen) + 1).to(device, p)
    bias = torch.randn(C, generator=gen).to(device, p)
    return to_layout(x.to(device, dtype), layout), weight, bias, to_layout(grad_y.to(device, dtype), layout)


def run(fn, x, weight, bias, grad_y, **kw):
    """y = fn(...), then backward of sum(y * grad_y); returns y and the grads of x, weight, bias."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = fn(leaves[0], weight=leaves[1], bias=leaves[2], **kw)
    y.backward(grad_y.to(y.dtype))
    return y, [None if t is None else t.grad for t in leaves]


def check_against_reference(shape, groups, layout, silu, dtype, device, param_dtype=None, weights=True):
    x, weight, bias, grad_y = make_inputs(shape, dtype, device, layout, param_dtype)
    if not weights:
        weight = bias = None
    y, grads = run(
        kernels.group_norm_silu, x, weight, bias, grad_y, num_groups=groups, silu=silu, impl="triton"
    )
    as64 = [None if t is None else t.double() for t in (x, weight, bias, grad_y)]
    y_ref, grads_ref = run(group_norm_silu_reference, *as64, num_groups=groups, silu=silu)
    assert y.dtype == dtype
    if layout == "channels_last" and len(shape) == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    # dweight and dbias are sums over B * S elements per channel: their rounding error grows with that
    reduced = (x.numel() // x.shape[1]) ** 0.5
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref, strict=True):
        if g_ref is None:
            continue
        assert g.dtype == (dtype if name == "x" else (param_dtype or dtype)), name
        tol = TOL[dtype] if name == "x" else dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * reduced)
        torch.testing.assert_close(g.double(), g_ref, **tol, msg=name)


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no-silu"])
@pytest.mark.parametrize("shape, groups, layout", CASES, ids=lambda v: str(v))
def test_forward_and_every_gradient_match_float64_reference(shape, groups, layout, silu):
    check_against_reference(shape, groups, layout, silu, torch.float32, "cpu")


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_x_with_fp32_weights_through_the_interpreter(dtype):
    check_against_reference((2, 12, 5, 7), 6, "channels_last", True, dtype, "cpu", param_dtype=torch.float32)


def test_without_weight_and_bias():
    check_against_reference((2, 12, 5, 7), 4, "nchw", True, torch.float32, "cpu", weights=False)


@pytest.mark.numerics
def test_layouts_read_in_place_or_copied_and_mixed_between_x_and_grad():
    x, weight, bias, grad_y = make_inputs((2, 8, 6, 7), torch.float32, "cpu", "channels_last")
    big = torch.randn(2, 12, 6, 7) + 3
    cases = {
        "batch-strided view": (big[:, 2:10], grad_y),
        "transposed spatial (copied)": (x.transpose(2, 3), grad_y.transpose(2, 3)),
        "channels_last x, NCHW grad": (x, grad_y.contiguous()),
        "NCHW x, expanded grad": (x.contiguous(), torch.ones(1, 1, 1, 1).expand(2, 8, 6, 7)),
    }
    for name, (xi, gi) in cases.items():
        y, grads = run(kernels.group_norm_silu, xi, weight, bias, gi, num_groups=4, impl="triton")
        y_ref, grads_ref = run(
            group_norm_silu_reference, xi.double(), weight.double(), bias.double(), gi.double(), num_groups=4
        )
        torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32], msg=name)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g.double(), g_ref, **TOL[torch.float32], msg=name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_groups=5), "num_groups=5 must be a positive integer dividing x's 12 channels"),
        (dict(num_groups=0), "num_groups=0"),
        (dict(weight=torch.ones(11)), r"weight must have shape \(12,\)"),
        (dict(bias=torch.ones(12, device="meta")), "bias is on meta"),
        (dict(weight=torch.ones(12, dtype=torch.float16)), "weight dtype torch.float16 must be x's dtype"),
        (dict(x=torch.ones(2, 12, 3, 3, dtype=torch.float16)), "bias dtype torch.bfloat16|weight dtype"),
        (dict(x=torch.ones(12)), "x must be a"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_input_is_a_value_error_that_names_it(kwargs, message):
    args = dict(
        x=torch.ones(2, 12, 3, 3, dtype=torch.bfloat16),
        num_groups=4,
        weight=torch.ones(12, dtype=torch.bfloat16),
        bias=torch.ones(12, dtype=torch.bfloat16),
        impl="triton",
    )
    with pytest.raises(ValueError, match=message):
        kernels.group_norm_silu(**(args | kwargs))


def test_weight_and_bias_of_different_dtypes_are_an_error():
    x = torch.ones(2, 12, 3, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight .* and bias .* must share one dtype"):
        kernels.group_norm_silu(x, 4, torch.ones(12), torch.ones(12, dtype=torch.bfloat16), impl="triton")


@pytest.mark.numerics
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_autocast_keeps_x_dtype(impl):
    x, weight, bias, _ = make_inputs((2, 12, 5, 7), torch.bfloat16, "cpu", "channels_last", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.group_norm_silu(x, 6, weight, bias, impl=impl)
    assert y.dtype == torch.bfloat16
    y_ref = group_norm_silu_reference(x.double(), 6, weight.double(), bias.double())
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.bfloat16])


def test_torch_library_opcheck():
    x, weight, bias, _ = make_inputs((2, 6, 5, 7), torch.float32, "cpu", "channels_last")
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    torch.library.opcheck(group_norm._forward_op, (*args, 3, 1e-6, True))


# --------------------------------------------------------------------------------------------------------
# CUDA: the same checks on the real kernels, in every dtype

GPU_CASES = CASES + [
    ((8, 128, 64, 64), 32, "nchw"),
    ((8, 128, 64, 64), 32, "channels_last"),
    ((2, 512, 33, 31), 32, "channels_last"),
    ((1, 64, 300, 301), 32, "nchw"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no-silu"])
@pytest.mark.parametrize("shape, groups, layout", GPU_CASES, ids=lambda v: str(v))
def test_gpu_matches_float64_reference(shape, groups, layout, silu, dtype):
    check_against_reference(shape, groups, layout, silu, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_half_x_with_fp32_weights(dtype):
    check_against_reference((4, 256, 32, 32), 32, "channels_last", True, dtype, "cuda", torch.float32)


@pytest.mark.gpu
def test_gpu_autocast_and_auto_picks_triton():
    assert kernels.auto_backend("cuda") == "triton"
    x, weight, bias, _ = make_inputs((4, 128, 32, 32), torch.bfloat16, "cuda", "channels_last", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = kernels.group_norm_silu(x, 32, weight, bias, impl="auto")
    assert y.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------------
# NaN and Inf: the kernels give the reference's pattern in y and every gradient

SPECIALS = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def assert_same_specials(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str, atol_scale=1.0
):
    """NaN where the reference (rounded to dtype) has NaN, +-Inf where it has +-Inf, close elsewhere."""
    want = want.to(dtype).double()
    got = got.double()
    for what, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(mask(got), mask(want)), (
            f"{name}: {what} at {mask(got).nonzero().tolist()}, reference at {mask(want).nonzero().tolist()}"
        )
    finite = torch.isfinite(want)
    tol = dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * atol_scale)
    torch.testing.assert_close(got[finite], want[finite], **tol, msg=name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize(
    "where, special, layout, silu, dtype",
    [
        (w, s, lay, True, torch.float32)
        for w in ("x", "weight", "bias")
        for s in SPECIALS
        for lay in ("nchw", "channels_last")
    ]
    + [("x", "nan", "nchw", False, torch.float32), ("bias", "-inf", "channels_last", False, torch.float32)]
    + [(w, "nan", "channels_last", True, d) for w in ("x", "weight") for d in (torch.bfloat16, torch.float16)]
    + [("x", "+inf", "nchw", True, torch.bfloat16), ("bias", "-inf", "nchw", True, torch.float16)],
    ids=str,
)
def test_nan_and_inf_propagate_as_in_the_reference(where, special, layout, silu, dtype):
    x, weight, bias, grad_y = make_inputs((2, 6, 5, 7), dtype, "cpu", layout)
    value = SPECIALS[special]
    if where == "x":
        x = x.clone()
        x[0, 1, 2, 3] = value  # group 0 of sample 0 (3 groups of 2 channels)
        x[1, 5, 4, 6] = value  # group 2 of sample 1
    else:
        p = (weight if where == "weight" else bias).clone()
        p[3] = value
        weight, bias = (p, bias) if where == "weight" else (weight, p)
    y, grads = run(kernels.group_norm_silu, x, weight, bias, grad_y, num_groups=3, silu=silu, impl="triton")
    as64 = [t.double() for t in (x, weight, bias, grad_y)]
    y_ref, grads_ref = run(group_norm_silu_reference, *as64, num_groups=3, silu=silu)
    assert_same_specials(y, y_ref, dtype, "y")
    reduced = (x.numel() // x.shape[1]) ** 0.5  # dweight, dbias sum B * S terms
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref, strict=True):
        assert_same_specials(g, g_ref, dtype, f"grad {name}", 1.0 if name == "x" else reduced)
