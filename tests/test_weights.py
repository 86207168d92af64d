import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from vae_scale.config import ModelConfig
from vae_scale.formats.weights import DiffusersFormatError, config_to_diffusers
from vae_scale.models.sd import VAE

# Small versions of the two families: SD-style (quant convs, 4 latent channels) and FLUX-style (none, 16).
STYLES = {
    "sd": dict(
        block_out_channels=[32, 64, 64],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8,
        quant_convs=True,
    ),
    "flux": dict(
        block_out_channels=[32, 32, 64],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        quant_convs=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
}


def reference(style: str) -> AutoencoderKL:
    cfg = ModelConfig(**STYLES[style])
    d = config_to_diffusers(cfg)
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    return AutoencoderKL(**d).eval()


def assert_parity(ours: VAE, ref: AutoencoderKL, latent_channels: int):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 40) * 2 - 1
    z = torch.randn(2, latent_channels, 8, 10)
    with torch.no_grad():
        ref_post = ref.encode(x).latent_dist
        post = ours.encode(x)
        # Guards a weight loaded into the wrong place (transposed, swapped, missing quant conv): O(0.1-1).
        # Rounding: our GroupNorm sums in another order than diffusers' (~1e-7 relative per norm), grown
        # through ~20 near-unit-gain layers to ~1e-6 of values ~1: 100x below 1e-4.
        assert (post.mean - ref_post.mean).abs().max() < 1e-4
        assert (post.logvar - ref_post.logvar).abs().max() < 1e-4
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() < 1e-4


@pytest.mark.numerics
@pytest.mark.parametrize("style", ["sd", "flux"])
def test_diffusers_folder_loads_into_ours_with_parity(style, tmp_path):
    torch.manual_seed(0)
    ref = reference(style)
    for p in ref.parameters():  # move GroupNorm affine params off their 1/0 init so they are really checked
        p.data.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path)
    ours = VAE.from_diffusers(tmp_path).eval()
    assert ours.config.quant_convs == STYLES[style]["quant_convs"]
    assert ours.config.latent_channels == STYLES[style]["latent_channels"]
    assert ours.config.scaling_factor == ref.config.scaling_factor
    assert_parity(ours, ref, ours.config.latent_channels)


@pytest.mark.numerics
@pytest.mark.parametrize("style", ["sd", "flux"])
def test_our_folder_loads_in_diffusers_unchanged_with_parity(style, tmp_path):
    torch.manual_seed(0)
    ours = VAE(ModelConfig(**STYLES[style])).eval()
    for p in ours.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    ours.save_diffusers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    ref = AutoencoderKL.from_pretrained(tmp_path).eval()
    assert ref.config.shift_factor == ours.config.shift_factor
    assert_parity(ours, ref, ours.config.latent_channels)


def test_deprecated_attention_names_and_conv_shaped_projections_load(tmp_path):
    torch.manual_seed(0)
    ours = VAE(ModelConfig(**STYLES["sd"]))
    ours.save_diffusers(tmp_path)
    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    old = {}
    for name, t in sd.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".{new}." in name:
                name = name.replace(f".{new}.", f".{legacy}.")
                t = t[:, :, None, None] if t.ndim == 2 else t
        old[name] = t
    assert any(".query." in n for n in old)
    save_file(old, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = VAE.from_diffusers(tmp_path)
    for name, t in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DiffusersFormatError, match="config.json is missing"):
        VAE.from_diffusers(tmp_path)
    VAE(ModelConfig(**STYLES["sd"])).save_diffusers(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DiffusersFormatError, match="no weights file"):
        VAE.from_diffusers(tmp_path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "down_block_types",
            ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"],
            "'down_block_types' has block type 'AttnDownEncoderBlock2D'",
        ),
        (
            "up_block_types",
            ["UpDecoderBlock2D"] * 2 + ["AttnUpDecoderBlock2D"],
            "'up_block_types' has block type 'AttnUpDecoderBlock2D'",
        ),
        ("_class_name", "AutoencoderKLWan", "'_class_name' is 'AutoencoderKLWan'"),
        ("act_fn", "gelu", "'act_fn' is 'gelu'"),
        ("use_post_quant_conv", False, "'use_post_quant_conv' is False while use_quant_conv is True"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(field, value, message, tmp_path):
    VAE(ModelConfig(**STYLES["sd"])).save_diffusers(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DiffusersFormatError) as e:
        VAE.from_diffusers(tmp_path)
    assert message in str(e.value)


def test_mismatched_weights_are_refused(tmp_path):
    VAE(ModelConfig(**STYLES["sd"])).save_diffusers(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DiffusersFormatError, match="weights do not match config.json"):
        VAE.from_diffusers(tmp_path)
