import copy

import pytest
import torch

from vae_scale.config import ModelConfig, load_config, preset_names
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.models.sd import VAE, count_parameters
from vae_scale.train.wrapping import apply_activation_checkpointing, apply_channels_last, to_channels_last


def tiny(**kw) -> ModelConfig:
    base = dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8)
    return ModelConfig(**{**base, **kw})


def test_sd_f8_has_exactly_the_stable_diffusion_parameter_count():
    assert count_parameters(load_config("sd-f8").model) == 83_653_863


def test_every_preset_counts_on_meta_and_matches_a_real_build_where_small():
    counts = {name: count_parameters(load_config(name).model) for name in preset_names()}
    assert counts["xl"] >= 500_000_000
    assert counts["f8c16"] > counts["sd-f8"]  # 16-channel latent convs, no quant convs
    demo = VAE(load_config("demo").model)
    assert sum(p.numel() for p in demo.parameters()) == counts["demo"]


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5])
def test_shapes_for_each_downsampling_factor(levels):
    cfg = ModelConfig(
        block_out_channels=[8] * levels,
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=4,
        mid_block_attention=levels % 2 == 0,
    )
    vae = VAE(cfg)
    f = 2 ** (levels - 1)
    assert vae.downsample_factor == f
    x = torch.randn(2, 3, 16 * 2, 16 * 3)
    post = vae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, 3, 32 // f, 48 // f)
    assert vae.latent_shape(32, 48) == (3, 32 // f, 48 // f)
    z, kl = post.sample_kl()
    assert kl.shape == (2,)
    x_hat, post2 = vae(x)
    assert x_hat.shape == x.shape and isinstance(post2, DiagonalGaussian)


@pytest.mark.numerics
def test_posterior_math_is_diffusers():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 5, 7) * 20  # many logvars outside [-30, 20]
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    eps = torch.randn_like(mean)
    z, kl = post.sample_kl(eps)
    # Guards a missing clamp or factor 0.5: O(1). The same fp32 formula, at most a few ulp apart (default
    # rtol 1.3e-6; the KL terms are >= 0, so its 140-term sum keeps that relative error).
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * eps)
    expected = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(post.kl(), expected)
    assert torch.equal(post.mode(), mean)


def test_bad_image_shapes_name_the_expected_shape():
    vae = VAE(tiny())
    with pytest.raises(
        ValueError, match=r"expected an image batch of shape \(B, 3, H, W\).*multiples of 2.*\(1, 4, 8, 8\)"
    ):
        vae.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"multiples of 2, got \(1, 3, 9, 8\)"):
        vae.encode(torch.randn(1, 3, 9, 8))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), got \(1, 3, 4, 4\)"):
        vae.decode(torch.randn(1, 3, 4, 4))


def _loss_and_grads(vae, x, eps, channels_last=False):
    if channels_last:
        x = to_channels_last(x)
    post = vae.encode(x)
    z, kl = post.sample_kl(eps)
    loss = (vae.decode(z) - x).abs().mean() + 1e-3 * kl.mean()
    loss.backward()
    # the checkpoint wrapper adds a prefix to parameter names (not to state-dict names)
    return loss.detach(), {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in vae.named_parameters()
    }


@pytest.mark.numerics
@pytest.mark.parametrize("transform", ["checkpointing", "channels_last"])
def test_transforms_give_the_same_outputs_and_gradients(transform):
    torch.manual_seed(0)
    plain = VAE(tiny(block_out_channels=[16, 32, 32]))
    other = copy.deepcopy(plain)
    (apply_activation_checkpointing if transform == "checkpointing" else apply_channels_last)(other)
    x = torch.randn(2, 3, 16, 24)
    eps = torch.randn(2, 4, 4, 6)
    loss_a, grads_a = _loss_and_grads(plain, x, eps)
    loss_b, grads_b = _loss_and_grads(other, x, eps, channels_last=transform == "channels_last")
    assert set(grads_a) == set(grads_b) and len(grads_a) == len(list(plain.parameters()))
    # Guards a block skipped or recomputed differently, a wrongly permuted layout: O(1). Channels-last runs
    # other conv kernels (other summation orders): ~sqrt(K) * 6e-8 ~ 1e-6 relative per layer, so the loss
    # stays within ~1e-6 and grads, sums over 768 positions, within ~1e-5 (atol for grads that cancel).
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    assert other.state_dict().keys() == plain.state_dict().keys()


def test_set_kernels_reaches_every_group_norm():
    vae = VAE(tiny())
    vae.set_kernels("torch")
    assert {m.kernels for m in vae.modules() if hasattr(m, "kernels")} == {"torch"}
    with pytest.raises(ValueError, match="kernels must be one of"):
        vae.set_kernels("cuda")
