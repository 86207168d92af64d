"""Flux2VAE against diffusers' AutoencoderKLFlux2: weights saved by diffusers load by name and give the same
posteriors and images, our export loads back into diffusers with the same outputs and bn statistics, the
latent normalisation is the FLUX.2 pipeline's, unsupported configs are refused by class and field, tiling
works with the decoder's own widths, and the preset builds diffusers' FLUX.2 VAE.
"""

import inspect
import json
import shutil

import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderKLFlux2
from safetensors.torch import load_file
from support import photo_like_shards

from vae_scale.cli.export import export_main, import_main
from vae_scale.commands.common import iter_batches
from vae_scale.commands.export import ExportError
from vae_scale.config import ConfigError, ModelConfig, load_config
from vae_scale.formats.weights import CONFIG_NAME, DiffusersFormatError
from vae_scale.models import interface
from vae_scale.models.flux2 import Flux2VAE, config_to_diffusers, count_parameters
from vae_scale.models.tiling import Tiling
from vae_scale.train.trainer import train

# f4, three levels; the decoder's widths differ from the encoder's at every level, and a GroupNorm of 8
# groups divides both. The bn has 4 * 4 = 16 channels.
SMALL = dict(
    block_out_channels=[16, 32, 32],
    decoder_block_out_channels=[8, 24, 48],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    batch_norm_eps=1e-3,
    batch_norm_momentum=0.05,
)
H, W = 44, 60  # multiples of 4, latents of 11 x 15: odd, not square


# Flux2Pipeline's static _patchify_latents and _unpatchify_latents (diffusers 0.42,
# pipelines/flux2/pipeline_flux2.py), copied line for line: importing the pipeline needs transformers, which
# nothing else here uses.
def pipeline_patchify(latents):
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 1, 3, 5, 2, 4)
    latents = latents.reshape(batch_size, num_channels_latents * 4, height // 2, width // 2)
    return latents


def pipeline_unpatchify(latents):
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.reshape(batch_size, num_channels_latents // (2 * 2), 2, 2, height, width)
    latents = latents.permute(0, 1, 4, 2, 5, 3)
    latents = latents.reshape(batch_size, num_channels_latents // (2 * 2), height * 2, width * 2)
    return latents


def rounding_bound(model: nn.Module, pixels: int) -> float:
    """A float32 bound on the relative difference of two correct evaluations of `model` that order their
    sums differently (our GroupNorm against torch's, attention as linear layers against diffusers').

    A sum of K float32 products is within K * u of exact (u = 2^-24, relative to the sum of magnitudes); an
    error entering a layer reaches the output with a gain near 1 (residual blocks, each branch normalised),
    so the errors of the L weighted layers add: L * K * u, K the largest reduction (a conv's fan-in or the
    attention's sum over `pixels` positions). The bugs this guards against (the encoder's widths in the
    decoder, a missing shortcut, a swapped norm weight and bias) change outputs by O(1) of their scale.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    fan_in = max(m.weight[0].numel() for m in layers)
    return len(layers) * max(fan_in, pixels) * 2.0**-24


def plain(config, keys) -> dict:
    """The `keys` of a config, tuples as lists (diffusers keeps what it was given, JSON gives lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in keys}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, diffusers model in eval mode, images): random weights with GroupNorms and bn statistics away
    from their identity init, as diffusers' save_pretrained writes them."""
    torch.manual_seed(0)
    ref = AutoencoderKLFlux2(**SMALL).eval()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm_out.weight" in name:
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif "norm" in name and name.endswith("bias"):
                t.copy_(0.2 * torch.randn_like(t))
        ref.bn.running_mean.copy_(torch.randn(16))
        ref.bn.running_var.uniform_(0.25, 4.0)
        ref.bn.num_batches_tracked.fill_(7)
    folder = tmp_path_factory.mktemp("flux2")
    ref.save_pretrained(folder)
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return folder, ref, x


@pytest.mark.numerics
def test_from_diffusers_same_posterior_and_images(saved):
    folder, ref, x = saved
    ours = interface.load_diffusers(folder, kernels="torch").eval()  # the family read off _class_name
    assert type(ours) is Flux2VAE and ours.config.family == "flux2"
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert [b.resnets[0].conv1.out_channels for b in ours.decoder.up_blocks] == [48, 24, 8]
    with torch.no_grad():
        post_ref = ref.encode(x).latent_dist
        post = ours.encode(x)
        z = post_ref.mean
        x_ref = ref.decode(z).sample
        x_hat = ours.decode(z)
    assert post.mean.shape == (2, *ours.latent_shape(H, W)) == (2, 4, 11, 15)
    # Worst seen on a 2-core Xeon (AVX-512 and AVX2): 5e-7 (posterior), 2.2e-6 (image); the bound is 1.2e-3.
    tol = rounding_bound(ours, (H // 4) * (W // 4))
    assert rel_err(post.mean, post_ref.mean) < tol
    assert rel_err(post.logvar, post_ref.logvar) < tol
    assert rel_err(x_hat, x_ref) < tol
    assert torch.equal(ours.bn.running_mean, ref.bn.running_mean)
    assert torch.equal(ours.bn.running_var, ref.bn.running_var)


def test_save_diffusers_loads_in_diffusers(saved, tmp_path):
    folder, ref, x = saved
    ours = Flux2VAE.from_diffusers(folder)
    ours.save_diffusers(tmp_path)
    written = json.loads((tmp_path / CONFIG_NAME).read_text())
    init_keys = set(inspect.signature(AutoencoderKLFlux2.__init__).parameters) - {"self"}
    assert set(written) - {"_class_name", "_diffusers_version"} == init_keys
    back = AutoencoderKLFlux2.from_pretrained(tmp_path).eval()
    assert plain(back.config, init_keys) == plain(ref.config, init_keys)
    # The same tensors through the same diffusers code: bit-identical.
    for name, t in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mean
        assert torch.equal(back.encode(x).latent_dist.mean, z)
        assert torch.equal(back.decode(z).sample, ref.decode(z).sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_latents_is_the_pipelines(saved, dtype):
    """The pipeline's normalisation is written inline in _encode_vae_image and __call__ (pipeline_flux2.py),
    so it is repeated here line for line, with its patchify (copied above)."""
    folder, ref, _ = saved
    ours = Flux2VAE.from_diffusers(folder)
    z = torch.randn(3, 4, 6, 10, generator=torch.Generator().manual_seed(2)).to(dtype)

    # Flux2Pipeline._encode_vae_image, after retrieve_latents
    latents = pipeline_patchify(z)
    mean = ref.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps).to(
        latents.device, latents.dtype
    )
    want = (latents - mean) / std
    # Flux2Pipeline.__call__, before vae.decode
    want_back = pipeline_unpatchify(want * std + mean)

    # The same operations in the same order and dtype: bit-identical.
    got = ours.normalize_latents(z)
    assert got.dtype == dtype and got.shape == (3, 16, 3, 5)
    assert torch.equal(got, want)
    assert torch.equal(ours.denormalize_latents(got), want_back)
    # and the statistics are used at all: the default (0, 1) statistics would give z's values back
    assert not torch.allclose(got.float(), pipeline_patchify(z).float(), atol=0.1)


def edit_config(folder, tmp_path, **changes):
    dst = tmp_path / "edited"
    shutil.copytree(folder, dst)
    config = json.loads((dst / CONFIG_NAME).read_text())
    config.update(changes)
    (dst / CONFIG_NAME).write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "change, field",
    [
        ({"_class_name": "AutoencoderKL"}, "_class_name"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"up_block_types": ["UpDecoderBlock2D"] * 2 + ["AttnUpDecoderBlock2D"]}, "up_block_types"),
        ({"use_post_quant_conv": False}, "use_post_quant_conv"),
        ({"norm_type": "spatial"}, "norm_type"),
        ({"decoder_block_out_channels": [8, 24]}, "decoder_block_out_channels"),
        ({"batch_norm_eps": 0.0}, "batch_norm_eps"),
    ],
)
def test_unsupported_configs_are_refused_by_class_and_field(saved, tmp_path, change, field):
    folder, _, _ = saved
    with pytest.raises(DiffusersFormatError, match=f"AutoencoderKLFlux2.*{field}"):
        Flux2VAE.from_diffusers(edit_config(folder, tmp_path, **change))


def test_other_refusals(saved, tmp_path):
    folder, _, _ = saved
    with pytest.raises(ValueError, match="latent_channels changes the architecture"):
        Flux2VAE.from_diffusers(folder, latent_channels=8)
    with pytest.raises(DiffusersFormatError, match="_class_name 'AutoencoderKLMochi' is not a VAE"):
        interface.load_diffusers(edit_config(folder, tmp_path, _class_name="AutoencoderKLMochi"))
    cfg = load_config("flux2-tiny").model
    with pytest.raises(ConfigError, match="model.arch.batch_norm_epsilon is not a flux2 key"):
        Flux2VAE(ModelConfig(**{**vars(cfg), "arch": {"batch_norm_epsilon": 1e-4}}))
    with pytest.raises(ConfigError, match="model.arch.decoder_block_out_channels entry 10"):
        Flux2VAE(ModelConfig(**{**vars(cfg), "arch": {"decoder_block_out_channels": [10, 16]}}))


@pytest.mark.numerics
def test_tiled_encode_and_decode(saved):
    """The SD family's tiling runs the decoder with its own widths: whole-image norms equal untiled to
    rounding, per-tile norms equal diffusers' AutoencoderKLFlux2 tiling."""
    folder, ref, _ = saved
    ours = Flux2VAE.from_diffusers(folder, kernels="torch").eval()
    x = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = torch.randn(1, 4, 10, 13, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        post, x_hat = ours.encode(x), ours.decode(z)
        tiled_post, tiled_x = ours.encode(x, tiled=Tiling(32)), ours.decode(z, tiled=Tiling(32))
        per_tile = ours.decode(z, tiled=Tiling(norm="tile"))
        ref.enable_tiling()  # tiles of sample_size = 32 px, overlap 0.25
        try:
            theirs = ref.decode(z).sample
        finally:
            ref.disable_tiling()
    # float32 rounding of the same sums in another order, ~1e-7 relative per op over ~20 layers of outputs
    # of order 1; what this guards against (per-tile statistics, a zero-padded tile border) is >= 1e-2.
    assert (tiled_post.moments - post.moments).abs().max().item() < 1e-4
    assert (tiled_x - x_hat).abs().max().item() < 1e-4
    assert (per_tile - theirs).abs().max().item() < 1e-4
    assert (per_tile - x_hat).abs().max().item() > 1e-2  # the per-tile pass did tile


def test_preset_builds_diffusers_flux2_vae():
    cfg = load_config("flux2").model
    with torch.device("meta"):
        ref = AutoencoderKLFlux2()  # FLUX.2-dev's VAE: the conversion script builds it with the defaults
        ours = Flux2VAE(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert count_parameters(cfg) == sum(p.numel() for p in ref.parameters()) == 84_046_115
    written = config_to_diffusers(cfg)
    init_keys = set(inspect.signature(AutoencoderKLFlux2.__init__).parameters) - {"self"}
    assert plain(written, init_keys) == plain(ref.config, init_keys)


def test_a_fine_tune_keeps_the_imported_statistics_and_export_measures_new_ones(saved, tmp_path, capsys):
    """import -> train (EMA on) -> export: the drop-in export keeps config.json key for key and bn's
    statistics (training never moves them); --measure-latents writes the statistics of the data into bn,
    with which the pipeline's normalisation gives the measured latents mean 0 and variance 1 per channel."""
    folder, ref, _ = saved
    shards = photo_like_shards(tmp_path / "data", 8, ((40, 36), (40, 48)), max_per_shard=8)
    run = tmp_path / "run"
    train_args = [f"data.train={shards}", "train.steps=2", "optim.ema_decay=0.5", "checkpoint.every=0"]
    assert import_main(["--diffusers", str(folder), "--out", str(run), "--config", "flux2-tiny"]) == 0
    train(load_config(str(run / "config.yaml"), [*train_args, "log.wandb=disabled", "data.workers=0"]))

    kept = tmp_path / "kept"
    assert (
        export_main(["--run", str(run), "--out", str(kept), "--ema", "--data", str(shards), "--n", "8"]) == 0
    )
    assert "kept from" in capsys.readouterr().out
    assert json.loads((kept / CONFIG_NAME).read_text()) == json.loads((folder / CONFIG_NAME).read_text())
    back = AutoencoderKLFlux2.from_pretrained(kept)
    assert torch.equal(back.bn.running_mean, ref.bn.running_mean)
    assert torch.equal(back.bn.running_var, ref.bn.running_var)
    assert not torch.equal(back.decoder.conv_out.weight, ref.decoder.conv_out.weight)  # it did train
    assert "normalised_mean" in json.loads((kept / "latent_statistics.json").read_text())

    measured = tmp_path / "measured"
    assert (
        export_main(
            [
                "--run",
                str(run),
                "--out",
                str(measured),
                "--data",
                str(shards),
                "--n",
                "8",
                "--measure-latents",
            ]
        )
        == 0
    )
    stats = json.loads((measured / "latent_statistics.json").read_text())
    back = AutoencoderKLFlux2.from_pretrained(measured).eval()
    assert load_file(measured / "diffusion_pytorch_model.safetensors").keys() == ref.state_dict().keys()
    x = torch.cat(
        [b["images"] for b in iter_batches(str(shards), split="train", resolution=32, batch_size=8)]
    )
    assert stats["samples"] == len(x) and len(stats["channel_mean"]) == 16  # every training image
    with torch.no_grad():
        latents = pipeline_patchify(back.encode(x).latent_dist.mode())
    mean = back.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(back.bn.running_var.view(1, -1, 1, 1) + back.config.batch_norm_eps)
    normalised = (latents - mean) / std
    # The same images measured (float64 sums of our float32 latents) and normalised here (diffusers'
    # float32 latents, which differ from ours by float32 rounding, ~1e-6 relative): per channel the mean is
    # 0 and the variance var / (var + eps) (var: the measured variance bn holds) to ~1e-5. A variance
    # written as a std, statistics of another channel or stale ones are off by far more than 1e-3. Worst seen
    # on a 2-core Xeon: 1e-7 (mean), 2.5e-7 (variance, relative).
    var = back.bn.running_var
    want = var / (var + back.config.batch_norm_eps)
    got = normalised.var((0, 2, 3), unbiased=False)
    assert normalised.mean((0, 2, 3)).abs().max() < 1e-3
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    with pytest.raises(ExportError, match="model.family=flux2 keeps its latent statistics"):
        export_main(["--run", str(run), "--out", str(tmp_path / "x"), "--no-shift", "--data", str(shards)])
