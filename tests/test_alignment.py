"""Vision-foundation alignment (VA-VAE's VF loss): the loss against finite differences and by hand, its
margins, the adaptive weight against autograd through the whole model, a random-weight DINOv2 ViT saved and
loaded (and wrong files refused in one line), a short run that logs the terms and checkpoints and resumes
the projection, and FSDP against DDP over two gloo processes."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from support import (
    TINY,
    accelerate_launch,
    assert_same_training,
    checkpoint_file,
    initial_weights,
    run,
    tiny_vae,
)

from vae_scale.config import ConfigError, LossConfig, load_config
from vae_scale.eval.lpips import LossConfigError
from vae_scale.formats.checkpoint import latest_checkpoint
from vae_scale.models.sd import VAE
from vae_scale.train.alignment import FoundationEncoder, LatentProjection, encoder_weight_grad, vf_loss
from vae_scale.train.build import Autoencoder
from vae_scale.train.objective import VAELoss
from vae_scale.train.report import read_metrics
from vae_scale.train.startup import check_resume
from vae_scale.train.trainer import train


def random_vit(seed: int = 0) -> FoundationEncoder:
    """A DINOv2-shaped ViT (two blocks of width 64: one head) with random weights, layer scales of O(1)."""
    torch.manual_seed(seed)
    vit = FoundationEncoder(dim=64, depth=2, hidden=96, pos_grid=5)
    with torch.no_grad():
        for block in vit.blocks:
            block.ls1.gamma.uniform_(0.5, 1.0)
            block.ls2.gamma.uniform_(0.5, 1.0)
    return vit


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in random_vit().state_dict().items()}, str(path))
    return path


def align_cfg(vit_file, **kw) -> LossConfig:
    return LossConfig(align_weight=0.1, align_encoder=str(vit_file), **kw)


# --------------------------------------------------------------------------------------------------------
# The loss


def test_the_vf_loss_is_the_reference_formula_and_its_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64)
    vf, cos, distmat = vf_loss(p, f, 0.1, 0.05, cos_weight=0.5, distmat_weight=2.0)
    # By hand, one position and one pair at a time.
    pv, fv = p.detach().flatten(2), f.flatten(2)  # (B, D, N)
    cos_hand = (
        sum(
            max(0.0, 1 - 0.1 - F.cosine_similarity(pv[b, :, n], fv[b, :, n], dim=0).item())
            for b in range(2)
            for n in range(6)
        )
        / 12
    )
    dist_hand = (
        sum(
            max(
                0.0,
                abs(
                    F.cosine_similarity(pv[b, :, n], pv[b, :, m], dim=0).item()
                    - F.cosine_similarity(fv[b, :, n], fv[b, :, m], dim=0).item()
                )
                - 0.05,
            )
            for b in range(2)
            for n in range(6)
            for m in range(6)
        )
        / 72
    )
    # float64 sums of <= 72 terms: ~1e-15 relative; a wrong mean, margin or weight is O(1e-2) or more.
    assert cos.item() == pytest.approx(cos_hand, rel=1e-12)
    assert distmat.item() == pytest.approx(dist_hand, rel=1e-12)
    assert vf.item() == pytest.approx(0.5 * cos_hand + 2.0 * dist_hand, rel=1e-12)
    # gradcheck's float64 central differences (eps 1e-6) agree with a right gradient to ~1e-9; a wrong one
    # (a factor, a sign, a missing normalisation) misses by O(1). No pair sits within 1e-6 of a relu kink.
    assert torch.autograd.gradcheck(lambda q: vf_loss(q, f, 0.1, 0.05, 0.5, 2.0)[0], (p,))


def test_inside_the_margins_the_loss_and_its_gradient_are_zero():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 16, 3, 3, generator=g)
    # Close to the features: every cosine above 1 - 0.5, every pair's similarity within 0.25 of theirs.
    p = (f + 0.02 * torch.randn(f.shape, generator=g)).requires_grad_()
    vf, cos, distmat = vf_loss(p, f, cos_margin=0.5, distmat_margin=0.25)
    vf.backward()
    assert vf.item() == 0.0 and cos.item() == 0.0 and distmat.item() == 0.0
    assert torch.count_nonzero(p.grad) == 0
    # Without margins the same p costs something and gets a gradient.
    q = p.detach().clone().requires_grad_()
    vf0, _, _ = vf_loss(q, f, cos_margin=0.0, distmat_margin=0.0)
    vf0.backward()
    assert vf0.item() > 0 and torch.count_nonzero(q.grad) > 0
    # Opposite features: outside the cosine margin (1 - 0.5 - (-1) = 1.5 at every position), while the
    # distance matrices, equal under negation, stay inside theirs.
    r = (-f).requires_grad_()
    vf, cos, distmat = vf_loss(r, f, cos_margin=0.5, distmat_margin=0.25)
    vf.backward()
    assert cos.item() == pytest.approx(1.5) and distmat.item() == 0.0 and r.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------
# The adaptive weight


def test_the_encoder_weight_gradient_by_hand_is_autograds():
    vae = tiny_vae(0).double()
    inputs = []
    vae.encoder.conv_out.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        vae.quant_conv.bias[4] += 60.0  # the first logvar channel above its clamp: no gradient through it
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64) * 2 - 1
    post = vae.encode(x)
    assert (post._logvar[:, 0] > 20).all() and (post._logvar[:, 1:].abs() < 20).all()
    z = post.sample(torch.randn(post.mean.shape, dtype=torch.float64))
    g = torch.randn_like(z)
    (want,) = torch.autograd.grad(z, vae.encoder.conv_out.weight, g)
    got = encoder_weight_grad(g, z, post, inputs[-1], vae.encoder.conv_out, vae.quant_conv)
    # float64 convolutions summed in another order: ~1e-14 relative; a missing term (the logvar path, the
    # quant conv, the clamp) changes the gradient by O(1).
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_encoders_last_layer(vit_file):
    cfg = align_cfg(vit_file, recon="l1", kl_weight=1e-2)
    torch.manual_seed(0)
    vae = tiny_vae(0).double()
    crit = VAELoss(cfg).double()
    proj = LatentProjection(4, crit.alignment.feature_dim, cfg).double()
    model = Autoencoder(vae, None, True, proj)
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    x_hat, post, kl, _, aligned = model(x, eps=eps)
    loss, logs = crit.autoencoder_loss(x, x_hat, post, kl, 0, aligned=aligned)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # The reference: autograd through the whole model, the ratio from the reconstruction term alone.
    model.zero_grad()
    post = vae.encode(x)
    z, kl = post.sample_kl(eps)
    x_hat = vae.decode(z)
    rec = (x - x_hat).abs().mean()
    rest = rec + 1e-2 * kl.mean() / x[0].numel()
    f = crit.alignment.encoder.features(x, (6, 6))
    vf, _, _ = vf_loss(proj.proj(z), f, 0.5, 0.25)
    W = vae.encoder.conv_out.weight
    (g_rec,) = torch.autograd.grad(rec, W, retain_graph=True)
    (g_vf,) = torch.autograd.grad(vf, W, retain_graph=True)
    weight = 0.1 * g_rec.norm() / (g_vf.norm() + 1e-4)
    (rest + weight.detach() * vf).backward()
    # float64 throughout, the same sums in other orders: ~1e-12 relative. A weight taken from the KL's
    # gradient too, or from the VF term at another scale, or not applied to the projection, is off by
    # far more than 1e-6.
    assert logs["align_adaptive"].item() == pytest.approx(weight.item(), rel=1e-6)
    assert logs["align_loss"].item() == pytest.approx(vf.item(), rel=1e-9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-6, atol=1e-12, msg=name)


def test_without_the_adaptive_weight_the_term_is_align_weight_over_the_pixels(vit_file):
    cfg = align_cfg(vit_file, recon="l1", kl_weight=0.0, align_adaptive=False)
    vae = tiny_vae(0).double()
    crit = VAELoss(cfg).double()
    proj = LatentProjection(4, crit.alignment.feature_dim, cfg).double()
    model = Autoencoder(vae, None, False, proj)  # the posterior mean: z = mean
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64) * 2 - 1
    x_hat, post, kl, _, aligned = model(x)
    loss, logs = crit.autoencoder_loss(x, x_hat, post, kl, 0, aligned=aligned)
    vf, _, _ = vf_loss(proj.proj(post.mean), crit.alignment.encoder.features(x, (6, 6)), 0.5, 0.25)
    (g_want,) = torch.autograd.grad(0.1 / 432 * vf, proj.proj.weight, retain_graph=True)
    loss.backward()
    # float64, the same sums: ~1e-15 relative; the weight without / P (432) or the term left out is O(1) off.
    # The logged weight is a float32 constant: 6e-8 relative.
    assert logs["align_adaptive"].item() == pytest.approx(0.1 / 432, rel=1e-7)
    # The objective's L1 term is float32 (~1e-7 relative); the VF term is ~3e-4 of the loss.
    assert loss.item() == pytest.approx((x - x_hat).abs().mean().item() + 0.1 / 432 * vf.item(), rel=1e-6)
    torch.testing.assert_close(proj.proj.weight.grad, g_want, rtol=1e-9, atol=1e-15)


# --------------------------------------------------------------------------------------------------------
# The encoder file


def test_a_saved_random_vit_loads_and_other_files_are_refused_in_one_line(vit_file, tmp_path):
    vit = random_vit()
    x = torch.rand(2, 3, 20, 20) * 2 - 1
    loaded = FoundationEncoder.from_file(str(vit_file))
    pth = tmp_path / "dinov2.pth"
    torch.save(vit.state_dict(), pth)
    for net in (loaded, FoundationEncoder.from_file(str(pth))):
        assert not any(p.requires_grad for p in net.parameters()) and not net.train().training
        torch.testing.assert_close(net.features(x, (3, 4)), vit.features(x, (3, 4)), rtol=0, atol=0)
    assert loaded.features(x, (3, 4)).shape == (2, 64, 3, 4)

    def refused(path: str, *words: str) -> None:
        with pytest.raises(LossConfigError) as e:
            FoundationEncoder.from_file(path)
        assert len(str(e.value).splitlines()) == 1 and "loss.align_encoder" in str(e.value)
        for w in words:
            assert w in str(e.value), str(e.value)

    refused(str(tmp_path / "missing.safetensors"), "no such file")
    vae_file = tmp_path / "vae.safetensors"
    save_file(tiny_vae(0).state_dict(), str(vae_file))
    refused(str(vae_file), "not a DINOv2 ViT", "cls_token")
    sd = vit.state_dict()
    sd["blocks.1.attn.qkv.weight"] = sd["blocks.1.attn.qkv.weight"][:, :32].contiguous()
    save_file(sd, str(tmp_path / "cut.safetensors"))
    refused(str(tmp_path / "cut.safetensors"), "blocks.1.attn.qkv.weight")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file of tensors")
    refused(str(tmp_path / "junk.safetensors"), "cannot be read")
    refused("", "loss.align_weight > 0 needs")
    with pytest.raises(ConfigError, match="loss.align_cos_margin"):
        LossConfig(align_cos_margin=3.0)


# --------------------------------------------------------------------------------------------------------
# Training


RUN = [*TINY, "data.resolution=16", "checkpoint.every=2", "loss.align_weight=0.1"]


def test_a_short_run_logs_the_terms_and_checkpoints_and_resumes_the_projection(vit_file, tmp_path):
    overrides = [*RUN, f"loss.align_encoder={vit_file}", f"run.dir={tmp_path}", "data.train=synthetic"]
    train(load_config(None, [*overrides, "train.steps=2"]))
    first = load_file(latest_checkpoint(tmp_path) / "loss.safetensors")["align.proj.weight"]
    train(load_config(None, [*overrides, "train.steps=4"]))
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["align_loss"] == pytest.approx(r["align_cos"] + r["align_distmat"], rel=1e-5)
        assert 0 < r["align_adaptive"] < 1e8 / (3 * 16 * 16) and r["align_loss"] > 0
    last = load_file(latest_checkpoint(tmp_path) / "loss.safetensors")["align.proj.weight"]
    start = initial_loss_weights(overrides)["align.proj.weight"]
    assert not torch.equal(first, start) and not torch.equal(last, first)
    # Resuming without the term (or, the other way round, with it) is another model: refused in one line.
    with pytest.raises(ConfigError, match="loss.align_weight 0.1 -> 0"):
        check_resume(load_config(None, [*overrides, "loss.align_weight=0"]))


def initial_loss_weights(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The loss file a run of `overrides` starts from: the projection, drawn in the trainer's order."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    VAE(cfg.model)
    crit = VAELoss(cfg.loss)
    proj = LatentProjection(cfg.model.latent_channels, crit.alignment.feature_dim, cfg.loss)
    return {f"align.{k}": v for k, v in proj.state_dict().items()}


@pytest.mark.slow  # two launches of two processes
@pytest.mark.numerics
def test_fsdp_and_ddp_end_with_the_same_weights_with_the_adaptive_alignment(vit_file, tmp_path):
    common = [
        *RUN,
        f"loss.align_encoder={vit_file}",
        "data.train=synthetic",
        "data.batch_size=2",
        "train.steps=3",
        "train.grad_accum=2",
        "checkpoint.every=0",
        "train.mixed_precision=no",
    ]
    run(accelerate_launch("fsdp.yaml", 2, [*common, f"run.dir={tmp_path / 'fsdp'}"]))
    run(accelerate_launch("cpu-2proc.yaml", 2, [*common, f"run.dir={tmp_path / 'ddp'}"]))
    rows = {n: [r for r in read_metrics(tmp_path / n) if "loss" in r] for n in ("fsdp", "ddp")}
    # The adaptive weight is each rank's own ratio, averaged over ranks and micro-batches: the same
    # computation on both, apart from fp32 rounding (~1e-6), which 1e-3 leaves room for after 3 steps.
    for a, b in zip(rows["fsdp"], rows["ddp"], strict=True):
        assert a["align_adaptive"] == pytest.approx(b["align_adaptive"], rel=1e-3), a["step"]
    # support.SAME_TRAINING says why the bound holds; a projection left out of the reduce-scatter, or an
    # adaptive weight read from a shard, changes every step.
    start = {"vae": initial_weights(common)["vae"], "loss": initial_loss_weights(common)}
    for file in ("vae", "loss"):
        fsdp = checkpoint_file(tmp_path / "fsdp", f"{file}.safetensors")
        ddp = checkpoint_file(tmp_path / "ddp", f"{file}.safetensors")
        assert_same_training(fsdp, ddp, start[file], file)
