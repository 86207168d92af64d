"""The scale-equivariance and EQ-VAE loss terms: by hand, through the trainer's Autoencoder (its extra
decodes are decode(T(z)) and run before the main one), with the adversarial weight, LPIPS, bf16 autocast,
gradient accumulation, and a short run that logs the terms, evaluates the spectrum and plots it."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support import TINY, photo_like_shards, tiny_vae

from vae_scale.config import LossConfig, load_config
from vae_scale.eval.equivariance import Transform, TransformedDecode
from vae_scale.formats.checkpoint import latest_checkpoint
from vae_scale.train.build import Autoencoder
from vae_scale.train.objective import LastLayer, VAELoss
from vae_scale.train.report import SPECTRUM_FILE, read_metrics
from vae_scale.train.trainer import train

# On TINY: no attention block, no checkpoints.
RUN = [*TINY, "model.mid_block_attention=false", "checkpoint.every=0"]


def tiny_model(seed: int = 0) -> Autoencoder:
    """support.tiny_vae in the trainer's wrapper, decoding the posterior mean."""
    return Autoencoder(tiny_vae(seed), None, sample_posterior=False)


def images(B: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 3, size, size, generator=g) * 2 - 1).clamp(-1, 1)


SE2 = Transform("down", factor=2)
ROT = Transform("rotate", turns=1)


def test_the_terms_by_hand():
    crit = VAELoss(LossConfig(recon="l1", kl_weight=0.0, se_weight=0.5, eq_weight=2.0))
    x = images(size=16)
    x_hat = x + 0.1
    d_se = TransformedDecode("se", SE2, torch.randn(2, 3, 8, 8, requires_grad=True), unit=2)
    d_eq = TransformedDecode("eq", ROT, torch.randn(2, 3, 16, 16, requires_grad=True), unit=2)
    loss, logs = crit.autoencoder_loss(x, x_hat, None, torch.zeros(2), step=0, transformed=[d_se, d_eq])
    se = 0.5 * (d_se.x_hat - F.avg_pool2d(x, 2)).abs().mean()
    eq = 2.0 * (d_eq.x_hat - torch.rot90(x, 1, (2, 3))).abs().mean()
    # Guards a weight, target or reduction off (x0.5, x2, sum for mean): O(1). fp32 means of <= 1,536 values,
    # cascade sums in any SIMD order: <= log2(n) * 6e-8 ~ 7e-7: rel 1e-5 (was 1e-6).
    assert logs["se_loss"].item() == pytest.approx(se.item(), rel=1e-5)
    assert logs["eq_loss"].item() == pytest.approx(eq.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.1 + se.item() + eq.item(), rel=1e-5)
    assert logs["loss"].item() == pytest.approx(loss.item())
    loss.backward()
    # elementwise: sign / 384 times 0.5, exact but for the last ulp (default fp32 tolerance)
    torch.testing.assert_close(
        d_se.x_hat.grad, 0.5 * torch.sign(d_se.x_hat - F.avg_pool2d(x, 2)).detach() / 384
    )
    # A step where neither term was drawn still logs both (0), so every step has the same keys on every rank.
    loss, logs = crit.autoencoder_loss(x, x_hat, None, torch.zeros(2), step=0)
    assert logs["se_loss"].item() == logs["eq_loss"].item() == 0.0
    assert loss.item() == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(ValueError, match="loss.eq_weight is 0"):
        VAELoss(LossConfig(se_weight=1.0)).autoencoder_loss(
            x, x_hat, None, torch.zeros(2), 0, transformed=[d_eq]
        )


def test_the_autoencoder_decodes_transformed_latents_before_the_main_one():
    model = tiny_model()
    x = images(size=16)
    last = LastLayer(model.vae.decoder.conv_out)
    model(x, {"se": SE2})
    assert last.input.shape[-2:] == (16, 16)  # conv_out last saw the main decode (16 px), not the 8 px one
    x_hat, post, kl, extra, _ = model(x, {"se": SE2, "eq": ROT})
    z = post.mode()
    with torch.no_grad():
        # guards the wrong latent decoded (O(1)); the same decoder on the same latents in one process
        torch.testing.assert_close(x_hat, model.vae.decode(z))
        assert [d.term for d in extra] == ["se", "eq"] and all(d.unit == 2 for d in extra)
        torch.testing.assert_close(extra[0].x_hat, model.vae.decode(F.avg_pool2d(z, 2)))
        torch.testing.assert_close(extra[1].x_hat, model.vae.decode(torch.rot90(z, 1, (2, 3))))
        assert extra[0].target(x).shape == extra[0].x_hat.shape == (2, 3, 8, 8)
    assert model(x)[3] == []
    last.remove()


@pytest.mark.numerics
def test_the_adversarial_weight_reads_the_main_reconstruction():
    """The adaptive weight is computed from the main decode's last-layer input, whatever else is decoded."""
    cfg = LossConfig(recon="l1", disc_weight=0.5, disc_start=0, disc_layers=1, disc_channels=8, se_weight=1.0)
    x = images(size=16)
    out = {}
    for name, transforms in (("plain", {}), ("with_se", {"se": SE2})):
        torch.manual_seed(1)
        crit = VAELoss(cfg)
        model = tiny_model()
        last = LastLayer(model.vae.decoder.conv_out)
        x_hat, post, kl, extra, _ = model(x, transforms)
        loss, logs = crit.autoencoder_loss(x, x_hat, post, kl, step=0, last_layer=last, transformed=extra)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out[name] = (logs, grads, extra)
        last.remove()
    plain, with_se = out["plain"][0], out["with_se"][0]
    assert with_se["d_weight"].item() == plain["d_weight"].item() != 0.5
    # the same fp32 terms summed in another order: ~1e-7; a term counted twice is O(1)
    assert with_se["loss"].item() == pytest.approx(plain["loss"].item() + with_se["se_loss"].item(), rel=1e-5)
    # and the gradient difference is exactly that of the extra term
    model = tiny_model()
    (d,) = out["with_se"][2]
    z = model.vae.encode(x).mode()
    se = (model.vae.decode(F.avg_pool2d(z, 2)) - F.avg_pool2d(x, 2)).abs().mean()
    se.backward()
    for n, p in model.named_parameters():
        want = out["plain"][1][n] + p.grad
        # Guards a d_weight read off the transformed decode or the term doubled: O(1). One backward of the
        # sum against two added: ~1e-6 relative (atol for gradients that cancel to ~0).
        torch.testing.assert_close(out["with_se"][1][n], want, rtol=1e-4, atol=1e-6, msg=n)


def test_perceptual_applies_to_the_transformed_reconstruction(lpips_dir):
    cfg = LossConfig(
        recon="l1", perceptual_weight=0.5, lpips_path=str(lpips_dir), se_weight=1.0, eq_weight=1.0
    )
    crit = VAELoss(cfg)
    x = images(size=16)
    d_eq = TransformedDecode("eq", ROT, torch.rand(2, 3, 16, 16) * 2 - 1, unit=2)
    d_se = TransformedDecode("se", SE2, torch.rand(2, 3, 8, 8) * 2 - 1, unit=2)  # 8 px: under LPIPS' 16
    _, logs = crit.autoencoder_loss(x, x, None, torch.zeros(2), step=0, transformed=[d_eq, d_se])
    target = torch.rot90(x, 1, (2, 3))
    with torch.no_grad():
        lpips = crit.perceptual(d_eq.x_hat, target).mean()
    want = (d_eq.x_hat - target).abs().mean() + 0.5 * lpips
    # guards the perceptual term on the wrong pair or unweighted: O(1); one net, one batch: ~1e-6
    assert lpips > 0 and logs["eq_loss"].item() == pytest.approx(want.item(), rel=1e-5)
    want_se = (d_se.x_hat - F.avg_pool2d(x, 2)).abs().mean()
    assert logs["se_loss"].item() == pytest.approx(want_se.item(), rel=1e-5)


@pytest.mark.numerics
def test_bf16_autocast_matches_fp32():
    cfg = LossConfig(recon="logistic", se_weight=0.5, eq_weight=0.5)
    x = images(size=16)
    transforms = {"se": Transform("down", factor=4), "eq": Transform("scale", scale=0.6)}
    values = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, crit = tiny_model(), VAELoss(cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            x_hat, post, kl, extra, _ = model(x, transforms)
            loss, logs = crit.autoencoder_loss(x, x_hat, post, kl, step=0, transformed=extra)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        values[dtype] = {k: logs[k].item() for k in ("loss", "se_loss", "eq_loss")}
    # Guards a term left in bf16 outside autocast's fp32 (the logistic likelihood's bin difference cancels
    # to O(1) error there). bf16 rounds each op at 2^-8 = 4e-3; over a tiny decoder's ~6 layers, ~1e-2 in
    # a random walk, on any CPU (bf16 products accumulate in fp32 whichever kernel runs).
    for k, v in values[torch.float32].items():
        assert values[torch.bfloat16][k] == pytest.approx(v, rel=3e-2), k


@pytest.mark.numerics
@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_batch(tmp_path):
    """batch 2 x 2 micro-batches = batch 4 with the term on every micro-batch (synthetic data gives both
    the same images); and the term changes the weights."""
    common = [*RUN, "data.train=synthetic", "train.sample_posterior=false", "train.steps=3"]
    se = ["loss.se_weight=1.0", "loss.se_factors=[2]"]
    train(
        load_config(
            None, [*common, *se, f"run.dir={tmp_path / 'accum'}", "data.batch_size=2", "train.grad_accum=2"]
        )
    )
    train(load_config(None, [*common, *se, f"run.dir={tmp_path / 'one'}", "data.batch_size=4"]))
    train(load_config(None, [*common, f"run.dir={tmp_path / 'off'}", "data.batch_size=4"]))
    w = {
        name: load_file(latest_checkpoint(tmp_path / name) / "vae.safetensors")
        for name in ("accum", "one", "off")
    }
    # Guards the term on one micro-batch only or a skipped micro-batch: the term's own move, > 1e-4 (next
    # line), halved. Same process, one kernel path; 2 x 2 against 4 sums gradients in another order (~1e-6
    # relative); AdamW at lr 1e-3 moves a weight lr * g / (|g| + 1e-8), so that shifts a weight by ~1e-9,
    # and by lr * dg / eps <= 6e-6 only where g cancels to below eps.
    for k in w["one"]:
        torch.testing.assert_close(w["accum"][k], w["one"][k], rtol=1e-4, atol=2e-5, msg=k)
    assert max((w["one"][k] - w["off"][k]).abs().max().item() for k in w["one"]) > 1e-4
    rows = read_metrics(tmp_path / "accum")
    assert all(r["se_loss"] > 0 for r in rows if "loss" in r)


def test_a_run_logs_the_terms_evaluates_the_spectrum_and_plots_it(tmp_path):
    shards = photo_like_shards(tmp_path, 8, val_fraction=0.25)
    run_dir = tmp_path / "run"
    train(
        load_config(
            None,
            [
                *RUN,
                "data.train=synthetic",
                f"data.val={shards}",
                "data.batch_size=2",
                "train.steps=4",
                "loss.se_weight=0.5",
                "loss.se_prob=0.5",
                "loss.eq_weight=0.5",
                "loss.eq_prob=0.5",
                "eval.every=2",
                "eval.max_batches=1",
                "eval.metrics=[psnr,spectrum,equivariance]",
                "log.wandb=offline",  # the plot goes to W&B too
                f"run.dir={run_dir}",
            ],
        )
    )
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 4 and all("se_loss" in r and "eq_loss" in r for r in train_rows)
    assert any(r["se_loss"] == 0 for r in train_rows) or any(r["eq_loss"] == 0 for r in train_rows)
    val = [r for r in rows if "val/psnr" in r]
    assert [r["step"] for r in val] == [2, 4]
    for key in (
        "val/latent_hf_share",
        "val/latent_hf_share/3",
        "val/rgb_hf_share",
        "val/equivariance/rotate",
    ):
        assert key in val[-1], key
    assert 0 < val[-1]["val/latent_hf_share"] < 1 and val[-1]["val/equivariance/down2"] > 0
    assert not any(k.startswith("val/spectrum/") for k in val[-1])  # a plot, not a curve per bin
    svg = (run_dir / SPECTRUM_FILE).read_text()
    assert "step 4" in svg and svg.count("<polyline") == 2
    assert "Latent spectrum" in (run_dir / "report.html").read_text()
    tables = sorted(run_dir.glob("wandb/offline-run-*/files/media/table/spectrum_table_*.table.json"))
    assert len(tables) == 2  # one W&B line plot per evaluation
    logged = json.loads(tables[-1].read_text())
    assert {row[1] for row in logged["data"]} == {"latent", "rgb"}  # (frequency, line, value)
