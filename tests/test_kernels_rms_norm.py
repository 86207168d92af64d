"""Fused RMSNorm(+activation) over channels against its eager reference run in float64, NCHW and
channels_last, and the reference against diffusers' RMSNorm as DC-AE applies it.

The kernels run as support.KERNEL_TEST says: with impl="triton", through the interpreter on a CPU, into
NaN-filled buffers; the `gpu` tests repeat the checks on CUDA in fp32/bf16/fp16.
"""

import pytest
import torch
from support import KERNEL_TEST

from vae_scale import kernels
from vae_scale.kernels import rms_norm
from vae_scale.kernels.rms_norm import rms_norm_act_reference

pytestmark = KERNEL_TEST

# What each row guards against, and why rounding stays far below it. The inputs are the same values for
# kernel and reference (the reference gets the kernel's x, weight, bias and grad_y converted to float64), so
# only the op's own arithmetic differs; outputs are O(1)..O(10) (xhat ~ N(0, 1), weight 1 + N(0, 1), bias
# N(0, 1)).
# - float32: the kernel's fp32 arithmetic against exact float64: a tree sum of C squares (C <= 300 here:
#   at most ~11 roundings deep, ~1e-6 relative), sqrt and a division (1 ulp each), a few products: ~1e-6
#   relative, ~1e-5 absolute at the largest outputs. 2e-5 sits above that and far below what a bug costs: a
#   missed or doubled channel block, or a mean over C +- 1, moves rstd by >= 1/(2 * 300) = 1.7e-3 relative;
#   a wrong backward term is O(1); a missed element stays NaN (the NaN-filled buffers).
# - bfloat16 / float16: fp32 inside, then one rounding of the result to the dtype: at most half an ulp,
#   2^-9 = 2.0e-3 (bf16) and 2^-11 = 4.9e-4 (fp16) relative. rtol is 10x (bf16) and 8x (fp16) that; atol
#   covers results near zero, whose relative rounding is unbounded but whose absolute error is at most
#   half an ulp of the O(1) terms they are made of. A wrong formula is off by O(1) relative.
# These are the arithmetic's bounds, not the CPU's: the interpreter's fp32 numpy ops and ATen's float64
# round correctly on any x86 CPU (AVX2 or AVX-512 vectorise the same IEEE operations).
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
# (shape, layout). Odd sizes throughout; batch 1 and a single channel; the row kernels' channel loop over
# several blocks with a partial last one (C=300: blocks of 256, and of 64 in the NCHW backward, both
# layouts); a spatial extent split over programs in each layout with full tiles before a partial one, and
# (NCHW backward) programs of several runs; 3-D and 2-D inputs; whole channel blocks (no channel mask).
CASES = [
    ((3, 5, 7, 9), "nchw"),
    ((1, 1, 3, 5), "nchw"),
    ((2, 12, 5, 7), "channels_last"),
    ((1, 300, 3, 5), "channels_last"),
    ((1, 300, 3, 5), "nchw"),
    ((1, 6, 33, 35), "nchw"),
    ((1, 6, 65, 67), "channels_last"),
    ((2, 6, 9), "nchw"),
    ((4, 6), "nchw"),
    ((2, 16, 41, 53), "nchw"),
    ((2, 8, 37, 29), "channels_last"),
]


def to_layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def make_inputs(shape, dtype, device, layout, param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    # A mean away from zero: RMSNorm does not subtract it, so the pre-activations straddle zero per channel
    # only through the bias, and ReLU's both sides are exercised.
    x = torch.randn(shape, generator=gen) * 3 + 1
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


def check_against_reference(shape, layout, act, dtype, device, param_dtype=None, weights=True):
    x, weight, bias, grad_y = make_inputs(shape, dtype, device, layout, param_dtype)
    if not weights:
        weight = bias = None
    y, grads = run(kernels.rms_norm_act, x, weight, bias, grad_y, act=act, impl="triton")
    as64 = [None if t is None else t.double() for t in (x, weight, bias, grad_y)]
    y_ref, grads_ref = run(rms_norm_act_reference, *as64, act=act)
    assert y.dtype == dtype
    if layout == "channels_last" and len(shape) == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    # dweight and dbias are sums over B * S terms per channel: their absolute rounding error grows with that
    reduced = (x.numel() // x.shape[1]) ** 0.5
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref, strict=True):
        if g_ref is None:
            continue
        assert g.dtype == (dtype if name == "x" else (param_dtype or dtype)), name
        tol = TOL[dtype] if name == "x" else dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * reduced)
        torch.testing.assert_close(g.double(), g_ref, **tol, msg=name)


@pytest.mark.parametrize("act", rms_norm.ACTS)
@pytest.mark.parametrize("shape, layout", CASES, ids=lambda v: str(v))
def test_forward_and_every_gradient_match_float64_reference(shape, layout, act):
    check_against_reference(shape, layout, act, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["same-dtype-weights", "fp32-weights"])
def test_half_precision_through_the_interpreter(dtype, param_dtype):
    check_against_reference((2, 12, 5, 7), "channels_last", "relu", dtype, "cpu", param_dtype=param_dtype)


def test_without_weight_and_bias():
    check_against_reference((2, 12, 5, 7), "nchw", "silu", torch.float32, "cpu", weights=False)


def test_layouts_read_in_place_or_copied_and_mixed_between_x_and_grad():
    x, weight, bias, grad_y = make_inputs((2, 8, 6, 7), torch.float32, "cpu", "channels_last")
    big = torch.randn(2, 12, 6, 7) + 3
    features_last = torch.randn(2, 6, 7, 8)  # (B, H, W, C), normalised over its last dim
    cases = {
        "batch-strided view": (big[:, 2:10], grad_y),
        "transposed spatial (copied)": (x.transpose(2, 3), grad_y.transpose(2, 3)),
        "channels_last x, NCHW grad": (x, grad_y.contiguous()),
        "NCHW x, expanded grad": (x.contiguous(), torch.ones(1, 1, 1, 1).expand(2, 8, 6, 7)),
        "features-last through movedim": (features_last.movedim(-1, 1), grad_y),
    }
    for name, (xi, gi) in cases.items():
        y, grads = run(kernels.rms_norm_act, xi, weight, bias, gi, impl="triton")
        y_ref, grads_ref = run(
            rms_norm_act_reference, xi.double(), weight.double(), bias.double(), gi.double()
        )
        torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32], msg=name)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g.double(), g_ref, **TOL[torch.float32], msg=name)


def test_reference_is_dc_ae_rmsnorm_over_channels():
    """The specification is DC-AE's norm: diffusers' RMSNorm(C, 1e-5, bias=True) on x.movedim(1, -1), in
    fp32 (then ReLU, as at the decoder's head). Both compute in fp32 in a different order: fp32 tolerance."""
    from diffusers.models.normalization import RMSNorm

    x, weight, bias, _ = make_inputs((2, 12, 5, 7), torch.float32, "cpu", "nchw")
    norm = RMSNorm(12, 1e-5, elementwise_affine=True, bias=True)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        want = torch.relu(norm(x.movedim(1, -1)).movedim(-1, 1))
    torch.testing.assert_close(
        rms_norm_act_reference(x, weight, bias, act="relu"), want, **TOL[torch.float32]
    )
    y = kernels.rms_norm_act(x, weight, bias, act="relu", impl="triton")
    torch.testing.assert_close(y, want, **TOL[torch.float32])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight=torch.ones(11)), r"weight must have shape \(12,\)"),
        (dict(bias=torch.ones(12, device="meta")), "bias is on meta"),
        (dict(weight=torch.ones(12, dtype=torch.float16)), "weight dtype torch.float16 must be x's dtype"),
        (dict(x=torch.ones(2, 12, 3, 3, dtype=torch.float16)), "bias dtype torch.bfloat16|weight dtype"),
        (dict(x=torch.ones(12)), "x must be a"),
        (dict(x=torch.ones(2, 0, 3)), r"C >= 1"),
        (dict(x=torch.ones(2, 12, 3, 3, dtype=torch.int32)), "floating-point"),
        (dict(act="gelu"), "act must be one of"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_input_is_a_value_error_that_names_it(kwargs, message):
    args = dict(
        x=torch.ones(2, 12, 3, 3, dtype=torch.bfloat16),
        weight=torch.ones(12, dtype=torch.bfloat16),
        bias=torch.ones(12, dtype=torch.bfloat16),
        impl="triton",
    )
    with pytest.raises(ValueError, match=message):
        kernels.rms_norm_act(**(args | kwargs))


def test_weight_and_bias_of_different_dtypes_are_an_error():
    x = torch.ones(2, 12, 3, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight .* and bias .* must share one dtype"):
        kernels.rms_norm_act(x, torch.ones(12), torch.ones(12, dtype=torch.bfloat16), impl="triton")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_autocast_keeps_x_dtype(impl):
    x, weight, bias, _ = make_inputs((2, 12, 5, 7), torch.bfloat16, "cpu", "channels_last", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.rms_norm_act(x, weight, bias, impl=impl)
    assert y.dtype == torch.bfloat16
    y_ref = rms_norm_act_reference(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.bfloat16])


def test_torch_library_opcheck():
    x, weight, bias, _ = make_inputs((2, 6, 5, 7), torch.float32, "cpu", "channels_last")
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    torch.library.opcheck(rms_norm._forward_op, (*args, 1e-5, "relu"))


# --------------------------------------------------------------------------------------------------------
# CUDA: the same checks on the real kernels, in every dtype

GPU_CASES = CASES + [
    ((8, 128, 64, 64), "nchw"),
    ((8, 128, 64, 64), "channels_last"),
    ((2, 1024, 17, 15), "channels_last"),
    ((2, 1024, 17, 15), "nchw"),
    ((1, 64, 300, 301), "nchw"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", rms_norm.ACTS)
@pytest.mark.parametrize("shape, layout", GPU_CASES, ids=lambda v: str(v))
def test_gpu_matches_float64_reference(shape, layout, act, dtype):
    check_against_reference(shape, layout, act, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_half_x_with_fp32_weights(dtype):
    check_against_reference((4, 256, 32, 32), "channels_last", "relu", dtype, "cuda", torch.float32)


@pytest.mark.gpu
def test_gpu_autocast_and_auto_picks_triton():
    assert kernels.auto_backend("cuda") == "triton"
    x, weight, bias, _ = make_inputs((4, 128, 32, 32), torch.bfloat16, "cuda", "channels_last", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = kernels.rms_norm_act(x, weight, bias, impl="auto")
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
    "where, special, layout, act, dtype",
    [
        (w, s, lay, act, torch.float32)
        for w in ("x", "weight", "bias")
        for s in SPECIALS
        for lay, act in (("nchw", "silu"), ("channels_last", "relu"))
    ]
    + [(w, s, "nchw", "none", torch.float32) for w in ("x", "weight") for s in ("nan", "+inf")]
    + [
        (w, "nan", "channels_last", "silu", d)
        for w in ("x", "weight")
        for d in (torch.bfloat16, torch.float16)
    ]
    + [("x", "+inf", "nchw", "relu", torch.bfloat16), ("bias", "-inf", "nchw", "silu", torch.float16)],
    ids=str,
)
def test_nan_and_inf_propagate_as_in_the_reference(where, special, layout, act, dtype):
    x, weight, bias, grad_y = make_inputs((2, 6, 5, 7), dtype, "cpu", layout)
    value = SPECIALS[special]
    if where == "x":
        x = x.clone()
        x[0, 1, 2, 3] = value  # one pixel of sample 0
        x[1, 5, 4, 6] = value  # one pixel of sample 1, in the last channel
    else:
        p = (weight if where == "weight" else bias).clone()
        p[3] = value
        weight, bias = (p, bias) if where == "weight" else (weight, p)
    y, grads = run(kernels.rms_norm_act, x, weight, bias, grad_y, act=act, impl="triton")
    as64 = [t.double() for t in (x, weight, bias, grad_y)]
    y_ref, grads_ref = run(rms_norm_act_reference, *as64, act=act)
    assert_same_specials(y, y_ref, dtype, "y")
    reduced = (x.numel() // x.shape[1]) ** 0.5  # dweight, dbias sum B * S terms
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref, strict=True):
        assert_same_specials(g, g_ref, dtype, f"grad {name}", 1.0 if name == "x" else reduced)
