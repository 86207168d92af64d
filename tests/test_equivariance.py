"""The transforms of the diffusability regularisers: each commutes with the latent grid as it should (the
latent transform is the image transform at the latent's scale), sizes for odd latents, both memory layouts,
independent references (PIL, numpy), and the per-step draws (repeatable, the same on every rank)."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vae_scale.config import ConfigError, LossConfig, load_config
from vae_scale.eval.equivariance import EVAL_TRANSFORMS, Transform, draw_transforms

F8 = 8  # pixels per latent position of an f8 model

TRANSFORMS = [
    Transform("down", factor=2),
    Transform("down", factor=4),
    Transform("scale", scale=0.25),
    Transform("scale", scale=0.6),
    Transform("scale", scale=0.999),
    Transform("rotate", turns=1),
    Transform("rotate", turns=2),
    Transform("rotate", turns=3),
    Transform("flip", axis="h"),
    Transform("flip", axis="v"),
]
IDS = [t.name for t in TRANSFORMS]


def smooth(B: int, C: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """Sums of a few low-frequency sinusoids: a band-limited image, on which resampling is nearly exact."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    out = torch.zeros(B, C, H, W)
    for b in range(B):
        for c in range(C):
            for _ in range(3):
                fy, fx, phase = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 6.28])).tolist()
                out[b, c] += torch.sin(2 * math.pi * (fy * yy + fx * xx) + phase) / 3
    return out


def box(t: torch.Tensor, f: int) -> torch.Tensor:
    """The image at the latent's scale: the mean of each f x f block."""
    return F.avg_pool2d(t, f)


@pytest.mark.numerics
@pytest.mark.parametrize("t", TRANSFORMS, ids=IDS)
def test_the_latent_transform_is_the_image_transform_at_the_latent_scale(t):
    errors = []
    for h in (24, 48):  # latents of 24 x 16 and 48 x 32; rotations change the aspect
        x = smooth(2, 3, h * F8, h * 2 // 3 * F8)
        at_image_scale = box(t.apply(x, unit=F8), F8)
        at_latent_scale = t.apply(box(x, F8))
        assert at_image_scale.shape == at_latent_scale.shape
        errors.append((at_image_scale - at_latent_scale).abs().max().item())
    if t.kind == "scale":
        # The bilinear filter spans a latent pixel at one scale and an image pixel at the other, so the two
        # agree only as the image gets smooth on the latent grid: the difference shrinks with resolution.
        assert errors[1] < 0.06 and errors[1] < errors[0] / 2, errors
    else:  # block means commute exactly with block averaging, rotations and flips
        # Guards a wrong direction or axis (~0.9 here) or a block off by a pixel (~1e-2). Rounding: means of
        # 64 then 16 values |x| < 1 in either order, <= (64 + 16) * 6e-8 = 5e-6 even in the worst case
        # (1e-6 assumed one summation order): 1e-4.
        assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("t", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 7), (7, 5)])
def test_odd_latents_give_integer_sizes_that_match_the_image_exactly(t, h, w):
    z = torch.randn(2, 16, h, w)
    x = torch.randn(2, 3, h * F8, w * F8)
    zt, xt = t.apply(z), t.apply(x, unit=F8)
    assert zt.shape[:2] == (2, 16) and xt.shape[:2] == (2, 3)
    assert (xt.shape[2], xt.shape[3]) == (zt.shape[2] * F8, zt.shape[3] * F8)
    assert (zt.shape[2], zt.shape[3]) == t.latent_size(h, w)
    if t.kind in ("down", "scale"):
        factor = 1 / t.factor if t.kind == "down" else t.scale
        assert zt.shape[2] == max(1, math.floor(h * factor + 1e-9))
        assert zt.shape[3] == max(1, math.floor(w * factor + 1e-9))
        assert zt.shape[2] <= h and zt.shape[3] <= w
    with pytest.raises(ValueError, match="not a multiple of 8"):
        t.apply(torch.randn(1, 3, h * F8 + 3, w * F8), unit=F8)


@pytest.mark.numerics
@pytest.mark.parametrize("t", TRANSFORMS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_in_channels_last_out_with_the_same_values(t, dtype):
    x = torch.randn(2, 3, 5 * F8, 3 * F8).to(dtype)
    nchw = t.apply(x, unit=F8)
    nhwc = t.apply(x.contiguous(memory_format=torch.channels_last), unit=F8)
    assert nchw.dtype == nhwc.dtype == dtype
    assert nchw.is_contiguous()
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    # Guards a layout mix-up (values from the wrong place: O(1) on randn). The two layouts run other kernels
    # (antialiased resize taps summed in another order: ~8 * 6e-8 * |x| <= 2e-6 at |x| ~ 4, above the old
    # atol 1e-6); bf16: one bf16 rounding apart, 2^-8 * |x|. Now rtol 1e-5 / 1.6e-2 with atol 1e-5 / 1e-2.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(nhwc, nchw, **tol)


@pytest.mark.numerics
def test_against_independent_references():
    rng = np.random.default_rng(0)
    # down: the mean of each 2x2 / 4x4 block (of a 4 x 8 latent's image)
    for f in (2, 4):
        b = rng.random((1, 2, 32, 64), dtype=np.float32)
        want = b.reshape(1, 2, 32 // f, f, 64 // f, f).mean((3, 5))
        got = Transform("down", factor=f).apply(torch.from_numpy(b), unit=F8).numpy()
        # Guards a misplaced block (~0.3 on uniform noise). numpy and torch sum <= 16 values in [0, 1) in
        # other orders: <= 16 * 6e-8 = 1e-6 worst case, which the old atol 1e-6 equalled: 1e-5.
        np.testing.assert_allclose(got, want, atol=1e-5)
    a = rng.random((1, 2, 40, 56), dtype=np.float32)
    x = torch.from_numpy(a)
    # scale: PIL's bilinear resize (antialiased: its filter widens with the reduction), channel by channel
    t = Transform("scale", scale=0.6)  # a 5 x 7 latent -> 3 x 4, so 40 x 56 px -> 24 x 32
    got = t.apply(x, unit=F8).numpy()
    for c in range(2):
        want = np.asarray(Image.fromarray(a[0, c], mode="F").resize((32, 24), Image.BILINEAR))
        # Guards a filter without antialiasing or another alignment: ~0.05-0.2 on noise. PIL and torch sum
        # ~4 x 4 taps of [0, 1) values in fp32 in other orders: ~1e-6 at most, 10x under atol 1e-5.
        np.testing.assert_allclose(got[0, c], want, atol=1e-5)
    # rotations are counter-clockwise, as numpy's; flips
    for k in (1, 2, 3):
        np.testing.assert_array_equal(Transform("rotate", turns=k).apply(x).numpy(), np.rot90(a, k, (2, 3)))
    np.testing.assert_array_equal(Transform("flip", axis="h").apply(x).numpy(), a[..., ::-1])
    np.testing.assert_array_equal(Transform("flip", axis="v").apply(x).numpy(), a[..., ::-1, :])


def test_bad_transforms_are_refused():
    for kwargs, message in [
        ({"kind": "shear"}, "not one of"),
        ({"kind": "scale", "scale": 0.0}, r"scale must be in \(0, 1\]"),
        ({"kind": "scale", "scale": 1.5}, r"scale must be in \(0, 1\]"),
        ({"kind": "rotate", "turns": 4}, "1, 2 or 3 quarter turns"),
        ({"kind": "flip", "axis": "d"}, "h or v"),
    ]:
        with pytest.raises(ValueError, match=message):
            Transform(**kwargs)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Transform("rotate", turns=1).apply(torch.zeros(3, 8, 8))
    assert set(EVAL_TRANSFORMS) == {"down2", "down4", "scale", "rotate", "flip"}


# --------------------------------------------------------------------------------------------------------
# The draws of a training step


def both(**kw) -> LossConfig:
    return LossConfig(se_weight=1.0, eq_weight=1.0, **kw)


def test_draws_depend_on_seed_step_and_micro_batch_only():
    cfg = both(se_prob=0.5, eq_prob=0.5)
    state = torch.get_rng_state()
    torch.manual_seed(123)  # another rank's global RNG: irrelevant
    first = [draw_transforms(cfg, seed=7, step=s, micro=m) for s in range(50) for m in range(2)]
    torch.manual_seed(456)
    second = [draw_transforms(cfg, seed=7, step=s, micro=m) for s in range(50) for m in range(2)]
    assert first == second
    torch.manual_seed(0)
    before = torch.get_rng_state()
    draw_transforms(cfg, seed=7, step=3)
    assert torch.equal(torch.get_rng_state(), before)  # the posterior noise's generator is not touched
    torch.set_rng_state(state)
    assert first != [draw_transforms(cfg, seed=8, step=s, micro=m) for s in range(50) for m in range(2)]
    micro0 = [d for i, d in enumerate(first) if i % 2 == 0]
    micro1 = [d for i, d in enumerate(first) if i % 2 == 1]
    assert micro0 != micro1  # accumulated micro-batches get their own transforms


def test_probabilities_families_and_ranges():
    n = 4000
    cfg = both(se_prob=0.3, eq_prob=0.6, se_factors=[2, 4], eq_scale_min=0.4)
    draws = [draw_transforms(cfg, seed=0, step=s) for s in range(n)]
    for term, p in (("se", 0.3), ("eq", 0.6)):
        freq = sum(term in d for d in draws) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (term, freq)
    se = [d["se"] for d in draws if "se" in d]
    assert all(t.kind == "down" for t in se) and set(Counter(t.factor for t in se)) == {2, 4}
    eq = [d["eq"] for d in draws if "eq" in d]
    families = Counter(t.kind for t in eq)
    assert set(families) == {"scale", "rotate", "flip"}
    assert min(families.values()) > len(eq) / 3 - 4 * math.sqrt(len(eq) * 2 / 9)
    scales = [t.scale for t in eq if t.kind == "scale"]
    assert 0.4 <= min(scales) < 0.45 and 0.95 < max(scales) < 1.0
    assert {t.turns for t in eq if t.kind == "rotate"} == {1, 2, 3}
    assert {t.axis for t in eq if t.kind == "flip"} == {"h", "v"}
    # probability 1 and 0, weight 0, a single factor or family
    always = both(se_prob=1.0, eq_prob=0.0, se_factors=[4])
    assert all(
        d == {"se": Transform("down", factor=4)} for d in (draw_transforms(always, 0, s) for s in range(50))
    )
    assert all(draw_transforms(LossConfig(), 0, s) == {} for s in range(50))
    only_rot = both(eq_prob=1.0, eq_transforms=["rotate"])
    assert all(draw_transforms(only_rot, 0, s)["eq"].kind == "rotate" for s in range(50))


def test_one_term_draws_the_same_whether_the_other_is_on():
    se_only = LossConfig(se_weight=1.0, se_prob=0.5)
    eq_only = LossConfig(eq_weight=1.0)
    for s in range(100):
        d = draw_transforms(both(se_prob=0.5), seed=3, step=s)
        assert d.get("se") == draw_transforms(se_only, seed=3, step=s).get("se")
        assert d.get("eq") == draw_transforms(eq_only, seed=3, step=s).get("eq")


def test_config_keys_are_validated_naming_the_key():
    for override, message in [
        ("loss.se_weight=-1", "loss.se_weight must be >= 0"),
        ("loss.eq_weight=-0.5", "loss.eq_weight must be >= 0"),
        ("loss.se_prob=1.5", r"loss.se_prob must be in \[0, 1\]"),
        ("loss.eq_prob=-0.1", r"loss.eq_prob must be in \[0, 1\]"),
        ("loss.se_factors=[3]", r"loss.se_factors must list factors from \{2, 4\}"),
        ("loss.se_factors=[]", r"loss.se_factors must list factors from \{2, 4\}"),
        (
            "loss.eq_transforms=[scale,shear]",
            "loss.eq_transforms='shear' is not one of scale | rotate | flip",
        ),
        ("loss.eq_transforms=[]", "loss.eq_transforms must list at least one"),
        ("loss.eq_scale_min=0", r"loss.eq_scale_min must be in \(0, 1\)"),
        ("loss.eq_scale_min=1", r"loss.eq_scale_min must be in \(0, 1\)"),
        ("loss.se_factors=two", "loss.se_factors expects a list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    cfg = load_config(
        None, ["loss.se_weight=0.25", "loss.se_factors=[2]", "loss.eq_transforms=[rotate,flip]"]
    )
    assert cfg.loss.se_factors == [2] and cfg.loss.eq_transforms == ["rotate", "flip"]
