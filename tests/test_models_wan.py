"""WanVAE (vae_scale/models/wan.py) against diffusers' AutoencoderKLWan and AutoencoderKLQwenImage: folders
they write load into ours with equal encodes and decodes, ours load back into them, the chunked causal pass
equals the whole-clip pass, unsupported folders are refused by class and field, and the presets have
diffusers' parameter counts."""

import dataclasses
import json
import math

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from vae_scale import kernels
from vae_scale.formats import weights
from vae_scale.formats.weights import DiffusersFormatError
from vae_scale.models.sd import DiagonalGaussian
from vae_scale.models.wan import CausalConv3d, RMSNorm, WanVAE, count_parameters
from vae_scale.models.wan_config import PRESETS, QWEN_IMAGE, WAN, WanConfig, config_to_diffusers, preset

CLASSES = {WAN: AutoencoderKLWan, QWEN_IMAGE: AutoencoderKLQwenImage}

# Two small configs that differ where the classes do: Wan's own keys (a wider decoder) and Qwen-Image's
# (input_channels), and where the temporal downsampling sits (Wan's levels 2 and 3; levels 1 and 3).
TINY = {
    WAN: WanConfig(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.3, -0.4],
        latents_std=[1.5, 0.5, 2.0, 1.0],
    ),
    QWEN_IMAGE: WanConfig(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, False, True],
        latents_mean=[0.1, -0.2, 0.3, -0.4],
        latents_std=[1.5, 0.5, 2.0, 1.0],
        diffusers_class=QWEN_IMAGE,
    ),
}
SIZE = (24, 40)  # odd multiples of 8: 3 x 5 latent positions


def diffusers_kwargs(cfg: WanConfig) -> dict:
    return {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A folder written by each diffusers class's save_pretrained, random weights, norms off their init."""
    out = {}
    for cls, cfg in TINY.items():
        torch.manual_seed(0)
        ref = CLASSES[cls](**diffusers_kwargs(cfg)).eval()
        with torch.no_grad():
            for name, p in ref.named_parameters():  # a gamma loaded into the wrong norm must show
                if name.endswith("gamma"):
                    p.mul_(1 + 0.2 * torch.randn_like(p))
        out[cls] = tmp_path_factory.mktemp(cls) / "vae"
        ref.save_pretrained(out[cls])
    return out


def tolerance(model: WanVAE, scale: float) -> float:
    """What float32 rounding can make of two correct implementations' results of magnitude `scale`.

    Each convolution sums n = fan-in products; two summation orders differ by about sqrt(n) float32 ulps
    relative (rounding errors add as a random walk), and the differences of the layers in series add up
    (each RMS norm rescales to O(1), so no layer amplifies them much). What this guards against, a weight in
    the wrong place, a missed frame or a wrong cache, moves outputs by O(0.1) or more.
    """
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    fan_in = max(m.weight[0].numel() for m in convs)
    return len(convs) * math.sqrt(fan_in) * 2**-24 * max(scale, 1.0)


@pytest.mark.numerics
@pytest.mark.parametrize("cls", [WAN, QWEN_IMAGE])
def test_diffusers_folder_loads_with_equal_encode_and_decode(cls, folders):
    ref = CLASSES[cls].from_pretrained(folders[cls]).eval()
    ours = WanVAE.from_diffusers(folders[cls], kernels="torch").eval()
    assert ours.arch == dataclasses.replace(TINY[cls], kernels="torch")
    assert set(ours.state_dict()) == set(ref.state_dict())
    torch.manual_seed(1)
    worst = 0.0
    for frames in (1, 5, 9):
        x = torch.rand(1, 3, frames, *SIZE) * 2 - 1
        with torch.no_grad():
            want = ref.encode(x).latent_dist
            post = ours.encode(x)
            assert post.mean.shape == (1, 4, 1 + (frames - 1) // 4, 3, 5)
            tol = tolerance(ours, max(want.mean.abs().max().item(), want.std.max().item()))
            for got, exp in ((post.mean, want.mean), (post.std, want.std)):
                err = (got - exp).abs().max().item()
                assert err < tol, (frames, err, tol)
                worst = max(worst, err)
            image = ref.decode(want.mean).sample  # diffusers clamps to [-1, 1]; ours does not
            ours_image = ours.decode(want.mean)
            assert ours_image.shape == x.shape
            # the comparison means something only where diffusers' clamp did not cut the value
            assert (ours_image.abs() < 1).float().mean() > 0.5
            err = (ours_image.clamp(-1, 1) - image).abs().max().item()
            assert err < tolerance(ours, 1.0), (frames, err)
            worst = max(worst, err)
    print(f"{cls}: worst difference from diffusers {worst:.2e}")


@pytest.mark.numerics
@pytest.mark.parametrize("cls", [WAN, QWEN_IMAGE])
def test_exported_folder_loads_in_diffusers_with_the_same_outputs(cls, folders, tmp_path):
    torch.manual_seed(2)
    ours = WanVAE(TINY[cls]).eval()  # our own random init, not diffusers'
    ours.save_diffusers(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == cls
    ref = CLASSES[cls].from_pretrained(tmp_path).eval()
    for name, t in ref.state_dict().items():
        assert torch.equal(t, ours.state_dict()[name]), name
    x = torch.rand(1, 3, 5, *SIZE) * 2 - 1
    with torch.no_grad():
        want, post = ref.encode(x).latent_dist, ours.encode(x)
        assert (post.mean - want.mean).abs().max() < tolerance(ours, want.mean.abs().max().item())
        image = ours.decode(post.mean)
        assert (image.abs() < 1).float().mean() > 0.5
        assert (image.clamp(-1, 1) - ref.decode(post.mean).sample).abs().max() < tolerance(ours, 1.0)


@pytest.mark.numerics
def test_chunked_pass_equals_whole_clip_pass_and_an_image_is_a_one_frame_clip(folders):
    ours = WanVAE.from_diffusers(folders[WAN], kernels="torch").eval()
    torch.manual_seed(3)
    x = torch.rand(1, 3, 9, *SIZE) * 2 - 1
    with torch.no_grad():
        chunked, whole = ours.encode(x, chunked=True), ours.encode(x, chunked=False)
        # the two see the same frames through differently shaped convolutions: rounding only
        assert (chunked.moments - whole.moments).abs().max() < tolerance(
            ours, whole.moments.abs().max().item()
        )
        z = whole.mean
        clip = ours.decode(z, chunked=True)
        assert (clip - ours.decode(z, chunked=False)).abs().max() < tolerance(ours, clip.abs().max().item())
        # a 4-D image is the one-frame clip, and comes back 4-D
        image_post = ours.encode(x[:, :, 0])
        assert image_post.mean.shape == (1, 4, 3, 5) == (1, *ours.latent_shape(*SIZE))
        assert torch.equal(image_post.mean, ours.encode(x[:, :, :1]).mean[:, :, 0])
        assert torch.equal(ours.decode(z[:, :, 0]), ours.decode(z[:, :, :1])[:, :, 0])
    assert z.shape[1:] == ours.latent_shape(*SIZE, frames=9)
    # causality: frames after t change no latent frame before t's
    x2 = x.clone()
    x2[:, :, 5:] = 0
    with torch.no_grad():
        early = ours.encode(x2, chunked=False).mean[:, :, :2]
        assert (early - z[:, :, :2]).abs().max() < tolerance(ours, z.abs().max().item())
        assert (ours.encode(x2, chunked=False).mean[:, :, 2] - z[:, :, 2]).abs().max() > 1e-2


def test_training_runs_the_whole_clip_and_refuses_chunks_under_autograd():
    torch.manual_seed(4)
    model = WanVAE(TINY[WAN])
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1

    def gradients(model: WanVAE) -> dict[str, torch.Tensor]:
        model.zero_grad()
        x_hat, post = model(x, sample=False)
        assert x_hat.shape == x.shape and post.kl().shape == (1,)
        (x_hat.square().mean() + post.kl().mean()).backward()
        return {weights.plain_name(n): p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients(model)
    assert len(plain) == len(list(model.parameters()))
    # the block modules recomputed in backward (as the trainer checkpoints them) give the same gradients
    blocks = {id(model.get_submodule(b)) for b in model.blocks()}
    places = [(p, n, c) for p in model.modules() for n, c in p.named_children() if id(c) in blocks]
    assert len(places) == len(blocks) > 0
    for parent, name, block in places:
        setattr(parent, name, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    recomputed = gradients(model)
    for name, g in plain.items():
        assert torch.allclose(recomputed[name], g, rtol=1e-5, atol=1e-8), name
    with pytest.raises(ValueError, match="chunked pass is for inference"):
        model.encode(x, chunked=True)
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        model.encode(torch.zeros(1, 3, 4, 16, 16))


@pytest.mark.parametrize(
    "cls, key, value",
    [
        (WAN, "_class_name", "AutoencoderKL"),
        (WAN, "is_residual", True),
        (WAN, "patch_size", 2),
        (WAN, "attn_scales", [1.0]),
        (WAN, "scale_factor_spatial", 16),
        (WAN, "temperal_downsample", [False, True]),
        (WAN, "latents_std", [1.0, 1.0]),
        (WAN, "dim_mult", None),
        (QWEN_IMAGE, "decoder_base_dim", 16),  # a Wan-only key in a Qwen-Image config
    ],
)
def test_unsupported_folders_are_refused_naming_class_and_field(cls, key, value, folders, tmp_path):
    config = json.loads((folders[cls] / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffusersFormatError) as e:
        WanVAE.from_diffusers(tmp_path)
    message = str(e.value)
    assert key in message and (value if key == "_class_name" else cls) in message, message


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_parameters_of_diffusers_class_on_the_same_config(name):
    cfg = preset(name)
    with torch.device("meta"):
        ref = CLASSES[cfg.diffusers_class](**diffusers_kwargs(cfg))
    shapes = {k: t.shape for k, t in ref.state_dict().items()}
    assert count_parameters(cfg) == sum(p.numel() for p in ref.parameters())
    with torch.device("meta"):
        assert {k: t.shape for k, t in WanVAE(cfg).state_dict().items()} == shapes


def test_fused_rms_norm_is_wans_rms_norm():
    """The fused kernel (Triton interpreter on a CPU) against Wan's eager F.normalize math, on positions
    whose channel norms span 1e-6..1e3 and an all-zero one."""
    torch.manual_seed(5)
    x = torch.randn(2, 24, 3, 5, 7, dtype=torch.float64)
    x = x * torch.logspace(-6, 3, 5, dtype=torch.float64).view(1, 1, 1, 5, 1)
    x[0, :, 0, 0, 0] = 0
    dense = x.float()
    strided = dense.transpose(1, 2).contiguous().transpose(1, 2)  # the layout a Resample hands on
    for act, x in (("silu", dense), ("none", dense), ("silu", strided)):
        norm = RMSNorm(24, act=act)
        with torch.no_grad():
            norm.gamma.mul_(1 + 0.2 * torch.randn_like(norm.gamma))
        norm.kernels = "torch"
        want = norm(x)
        norm.kernels = "triton"
        got = norm(x)
        # both compute in float32 and round differently: a few ulps of outputs of size ~1
        assert (got - want).abs().max() < 8 * 2**-24 * want.abs().max(), (act, x.stride())
        assert torch.equal(want[0, :, 0, 0, 0], torch.zeros(24)) and torch.equal(
            got[0, :, 0, 0, 0], torch.zeros(24)
        )


def test_posterior_over_clips_sums_kl_over_frames_too():
    torch.manual_seed(6)
    moments = torch.randn(2, 8, 3, 4, 5)
    eps = torch.randn(2, 4, 3, 4, 5)
    post = DiagonalGaussian(moments, "torch")
    mean, logvar = moments.chunk(2, dim=1)
    explicit = 0.5 * (mean.square() + logvar.exp() - 1 - logvar)
    assert torch.allclose(post.kl_per_channel(), explicit.sum((2, 3, 4)), rtol=1e-6)
    z, kl = post.sample_kl(eps)
    assert torch.allclose(kl, post.kl(), rtol=1e-6)
    fused = kernels.gaussian_sample_kl(mean, logvar, eps, impl="triton")  # the interpreter on a CPU
    assert torch.allclose(fused[0], z, atol=1e-6) and torch.allclose(fused[1], kl, rtol=1e-5)


def test_latent_normalisation_is_the_pipelines():
    model = WanVAE(TINY[WAN])
    z = torch.randn(2, 4, 3, 3, 5)
    mean = torch.tensor(TINY[WAN].latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(TINY[WAN].latents_std).view(1, 4, 1, 1, 1)
    # WanPipeline / QwenImagePipeline before decoding, as they write it
    assert torch.allclose(model.denormalize_latents(z), z / inv_std + mean, atol=1e-6)
    assert torch.allclose(model.normalize_latents(model.denormalize_latents(z)), z, atol=1e-6)
    assert model.normalize_latents(z[:, :, 0]).shape == (2, 4, 3, 5)


def test_the_causal_conv_pads_only_the_past():
    conv = CausalConv3d(1, 1, 3, padding=1)
    x = torch.zeros(1, 1, 4, 3, 3)
    x[:, :, 2] = 1
    with torch.no_grad():
        y = conv(x)
    assert y.shape == x.shape
    assert torch.equal(y[:, :, :2], conv(torch.zeros(1, 1, 2, 3, 3)))
