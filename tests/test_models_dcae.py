"""DCAE against diffusers' AutoencoderDC: weights saved by diffusers load by name and give the same latents
and images, our export loads back into diffusers, unsupported configs are refused by field, the fused kernel
path equals the torch path, and the presets build the same modules as diffusers.
"""

import dataclasses
import inspect
import json
import shutil

import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderDC

from vae_scale import kernels
from vae_scale.formats.weights import CONFIG_NAME, DiffusersFormatError
from vae_scale.models.dcae import DCAE, DeterministicLatent, count_parameters
from vae_scale.models.dcae_config import PRESETS, DCAEConfig, config_to_diffusers, preset

RES, EVIT = "ResBlock", "EfficientViTBlock"
# Two small f32 configs (6 stages) that between them hold every block, norm, activation, resampling and
# shortcut type of the presets: SANA's (Conv down, interpolate up, multi-scale q/k/v, here with two kernels
# in one stage) and the ImageNet models' (no stage-0 blocks, so resampling input/output convs; pixel
# (un)shuffle; BatchNorm + ReLU decoder stages; attention without multi-scale branches).
SMALL = {
    "sana": dict(
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=[RES, RES, RES, EVIT, EVIT, EVIT],
        decoder_block_types=[RES, RES, RES, EVIT, EVIT, EVIT],
        encoder_block_out_channels=[8, 8, 16, 16, 32, 32],
        decoder_block_out_channels=[8, 16, 16, 16, 32, 32],
        encoder_layers_per_block=[1, 1, 1, 1, 1, 2],
        decoder_layers_per_block=[1, 1, 1, 2, 1, 1],
        encoder_qkv_multiscales=[[], [], [], [5], [5], [3, 5]],
        decoder_qkv_multiscales=[[], [], [], [5], [3, 5], [5]],
        downsample_block_type="Conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ),
    "imagenet": dict(
        latent_channels=16,
        attention_head_dim=8,
        encoder_block_types=[RES, RES, RES, EVIT, EVIT, EVIT],
        decoder_block_types=[RES, RES, RES, EVIT, EVIT, EVIT],
        encoder_block_out_channels=[8, 16, 16, 32, 32, 64],
        decoder_block_out_channels=[8, 16, 16, 32, 32, 64],
        encoder_layers_per_block=[0, 1, 2, 1, 1, 1],
        decoder_layers_per_block=[0, 2, 1, 1, 1, 1],
        encoder_qkv_multiscales=[[], [], [], [], [], []],
        decoder_qkv_multiscales=[[], [], [], [], [], []],
        decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3,
        decoder_act_fns=["relu"] * 3 + ["silu"] * 3,
    ),
}
H, W = 96, 160  # multiples of 32, neither square nor powers of two: latents of 3 x 5


def randomize_norms(model: nn.Module) -> None:
    """Norm weights and BatchNorm statistics away from their identity init, so a misplaced or missing norm,
    or a swapped weight and bias, shows in the outputs."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "norm" not in name or not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            else:  # bias, running_mean
                t.copy_(0.2 * torch.randn_like(t))


def rounding_bound(model: nn.Module, pixels: int) -> float:
    """A float32 bound on the relative difference of two correct evaluations of `model` that order their
    sums differently (one GEMM for q/k/v or three, conv against linear, a fused norm against torch's).

    A sum of K float32 products is within K * u of exact (u = 2^-24, relative to the sum of magnitudes); an
    error entering a layer reaches the output with a gain near 1 here (residual blocks, each branch
    normalised), so the errors of the L layers on the longest path add: L * K * u, with L the number of
    weighted layers (more than the path holds) and K the largest reduction (a conv's fan-in, or the
    attention's sum over `pixels` positions). Bugs this guards against (a wrong channel grouping, shortcut,
    norm, activation or resampling) change the outputs by O(1) of their scale.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    fan_in = max(m.weight[0].numel() for m in layers)
    return len(layers) * max(fan_in, pixels) * 2.0**-24


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(SMALL))
def saved(request, tmp_path_factory):
    """(folder, diffusers model in eval mode, images) for each small config, random weights as saved by
    diffusers' save_pretrained."""
    torch.manual_seed(0)
    ref = AutoencoderDC(**SMALL[request.param]).eval()
    randomize_norms(ref)
    folder = tmp_path_factory.mktemp(f"dcae-{request.param}")
    ref.save_pretrained(folder)
    x = torch.rand(2, 3, H, W) * 2 - 1
    return folder, ref, x


@pytest.mark.numerics
def test_from_diffusers_same_latents_and_images(saved):
    folder, ref, x = saved
    ours = DCAE.from_diffusers(folder, kernels="torch").eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    with torch.no_grad():
        z_ref = ref.encode(x).latent
        posterior = ours.encode(x)
        x_ref = ref.decode(z_ref).sample
        x_hat = ours.decode(z_ref)
    assert isinstance(posterior, DeterministicLatent)
    assert posterior.mode().shape == (2, *ours.latent_shape(H, W)) == z_ref.shape
    # Worst seen on a 2-core Xeon (AVX-512 and AVX2): 3e-7 (latent), 4e-7 (image); the bound is ~1e-3.
    tol = rounding_bound(ours, (H // 8) * (W // 8))
    assert rel_err(posterior.mode(), z_ref) < tol
    assert rel_err(x_hat, x_ref) < tol


def test_save_diffusers_loads_in_diffusers(saved, tmp_path):
    folder, ref, x = saved
    ours = DCAE.from_diffusers(folder)
    ours.save_diffusers(tmp_path)
    written = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert written["_class_name"] == "AutoencoderDC"
    back = AutoencoderDC.from_pretrained(tmp_path).eval()
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")
    }
    # The same weights in the same diffusers code, in one process: bit for bit the same outputs.
    with torch.no_grad():
        assert torch.equal(back(x).sample, ref(x).sample)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("_class_name", "AutoencoderKL"),
        ("decoder_norm_types", "layer_norm"),
        ("encoder_block_types", ["ResBlock"] * 5 + ["EViTS5_GLU"]),
        ("upsample_block_type", "InterpolateConv"),
        ("attention_head_dim", 12),
        ("encoder_layers_per_block", [1, 0, 1, 1, 1, 2]),
        ("use_quant_conv", True),
    ],
)
def test_unsupported_config_refused_naming_class_and_field(saved, tmp_path, key, value):
    folder, _, _ = saved
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg[key] = value
    shutil.copy(next(folder.glob("*.safetensors")), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(DiffusersFormatError) as e:
        DCAE.from_diffusers(tmp_path)
    assert "AutoencoderDC" in str(e.value) and repr(key) in str(e.value)


@pytest.mark.numerics
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_equal_torch(nan_kernel_outputs):
    """Every RMSNorm (alone, and fused with the decoder's output ReLU) through the Triton kernel, on a CPU
    through the interpreter, into NaN-filled buffers: the same images as the torch path."""
    torch.manual_seed(0)
    model = DCAE.from_preset("dc-ae-tiny").eval()
    randomize_norms(model)
    x = torch.rand(1, 3, 48, 80) * 2 - 1
    with torch.no_grad():
        model.set_kernels("torch")
        want = model(x)[0]
        model.set_kernels("triton")
        got = model(x)[0]
    # The kernel's fp32 norm differs from torch's by a few u per element, below a conv's K * u.
    assert rel_err(got, want) < rounding_bound(model, 48 * 80 // 64)


def test_config_defaults_are_diffusers_defaults():
    """A config.json without a key means diffusers' default for it: DCAEConfig's must be the same."""
    ours = config_to_diffusers(DCAEConfig())
    theirs = {
        name: p.default
        for name, p in inspect.signature(AutoencoderDC.__init__).parameters.items()
        if name != "self"
    }
    assert {f.name for f in dataclasses.fields(DCAEConfig)} - {"kernels"} == set(theirs)
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == json.loads(json.dumps(theirs))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_diffusers_on_meta(name):
    cfg = preset(name)
    with torch.device("meta"):
        ours = DCAE(cfg)
        ref = AutoencoderDC(**{k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert count_parameters(cfg) == sum(p.numel() for p in ref.parameters())
    assert ours.downsample_factor == ref.spatial_compression_ratio


def test_latent_interface():
    model = DCAE.from_preset("dc-ae-tiny", ["model.scaling_factor=0.5"])
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    x_hat, post = model(x)
    x_hat.square().mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert x_hat.shape == x.shape and post.mode().shape == (2, 16, 2, 3) == (2, *model.latent_shape(32, 48))
    z, kl = post.sample_kl()
    assert z is post.mode() and post.sample() is z
    assert kl.dtype == torch.float32 and torch.equal(kl, torch.zeros(2))
    assert torch.equal(post.kl_per_channel(), torch.zeros(2, 16))
    assert torch.equal(model.normalize_latents(z), z * 0.5)
    assert torch.equal(model.denormalize_latents(model.normalize_latents(z)), z)
    assert len(model.blocks()) == 10  # 5 encoder + 5 decoder blocks
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError, match="DCAEConfig.decoder_act_fns"):
        DCAEConfig(decoder_act_fns="relu6")
