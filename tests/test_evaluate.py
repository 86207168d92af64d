"""Evaluation: metrics against references and closed forms, the exact distributed sum, the eval command."""

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from support import TINY, accelerate_launch, env, photo_like_shards, tiny_config

from vae_scale.cli.evaluate import eval_main
from vae_scale.commands.evaluate import baseline_verdict, format_table
from vae_scale.config import load_config
from vae_scale.eval.metrics import (
    InceptionFeatures,
    MetricError,
    bicubic_round_trip,
    equal_values_size,
    evaluate,
    frechet_distance,
    load_inception,
    psnr,
    ssim,
)
from vae_scale.models.sd import VAE
from vae_scale.train.objective import VAELoss
from vae_scale.train.trainer import train

# On TINY: no attention block, a faster learning rate, a log line every 5 steps.
EVAL_RUN = ["model.mid_block_attention=false", "optim.lr=2e-3", "log.every=5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, shards) of a tiny VAE trained briefly with the discretised logistic likelihood."""
    root = tmp_path_factory.mktemp("eval")
    # 40 images, a quarter held out as val
    sizes = ((44, 40), (44, 48), (44, 56))
    shards = photo_like_shards(root, 40, sizes, max_per_shard=6, val_fraction=0.25)
    run_dir = root / "run"
    train(
        tiny_config(
            run_dir,
            shards,
            *EVAL_RUN,
            f"data.val={shards}",
            "loss.recon=logistic",
            "train.steps=6",
            "checkpoint.every=0",
        )
    )
    return run_dir, shards


# --------------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.numerics
def test_psnr_of_known_noise_levels_is_exact():
    x = torch.rand(3, 3, 16, 16) * 1.6 - 0.8
    signs = torch.randint(0, 2, x.shape).float() * 2 - 1
    for sigma in (0.01, 0.05, 0.2):  # on the [0, 1] scale; [-1, 1] errors are twice that
        got = psnr(x + 2 * sigma * signs, x)
        # Guards the data range ([-1, 1] vs [0, 1]: 6 dB), rmse for mse (x2), a batch mean: >= 1 dB. fp32
        # (x + d) - x is d within 6e-8 * |x| / d <= 3e-6 relative: <= 3e-5 dB, under atol 1e-4 + rtol 1e-5.
        assert torch.allclose(got, torch.full((3,), 10 * math.log10(1 / sigma**2)), atol=1e-4)


@pytest.mark.numerics
def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    for shape, noise in (((2, 3, 32, 32), 0.05), ((1, 3, 37, 45), 0.2), ((2, 1, 7, 9), 0.1)):
        a = rng.random(shape)
        b = np.clip(a + rng.normal(0, noise, shape), 0, 1)
        ours = ssim(torch.from_numpy(a) * 2 - 1, torch.from_numpy(b) * 2 - 1)
        for i in range(shape[0]):
            ref = structural_similarity(
                a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0), data_range=1.0, channel_axis=2
            )
            # Guards another window, constants or covariance normalisation (49/48: ~1e-3). Both in float64:
            # filter sums of 49 terms round at ~1e-14, so 1e-9 is far above rounding on any kernels.
            assert abs(ours[i].item() - ref) < 1e-3
            assert ours[i].item() == pytest.approx(ref, abs=1e-9)  # the same computation, in float64


@pytest.mark.numerics
def test_frechet_distance_matches_closed_forms():
    # Diagonal covariances: tr((S1 S2)^1/2) = sum sqrt(a_i b_i).
    a, b = torch.rand(6, dtype=torch.float64) + 0.1, torch.rand(6, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    want = (mu1 - mu2).square().sum() + (a + b - 2 * (a * b).sqrt()).sum()
    # float64 eigendecompositions of 6 x 6 and 5 x 5 matrices round at ~1e-14 relative (LAPACK on any
    # kernels); a wrong square root or a missing factor 2 is O(1)
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want.item(), rel=1e-9)
    # Full covariances, against scipy's matrix square root (pytorch-fid's computation).
    import scipy.linalg

    f1, f2 = torch.randn(50, 5, dtype=torch.float64), torch.randn(50, 5, dtype=torch.float64) * 1.5 + 0.3
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)
    ref = (
        (f1.mean(0) - f2.mean(0)).square().sum()
        + c1.trace()
        + c2.trace()
        - 2 * np.trace(scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real)
    )
    assert frechet_distance(f1.mean(0), c1, f2.mean(0), c2) == pytest.approx(float(ref), rel=1e-7)
    assert frechet_distance(f1.mean(0), c1, f1.mean(0), c1) == pytest.approx(0.0, abs=1e-9)


def trivial_vae() -> VAE:
    """A VAE whose posterior is N(0, I) for every image (KL 0) and whose decoder outputs 0 everywhere."""
    vae = VAE(load_config(None, [*TINY, *EVAL_RUN]).model)
    with torch.no_grad():
        for conv in (vae.quant_conv, vae.decoder.conv_out):
            conv.weight.zero_()
            conv.bias.zero_()
    return vae


def images_8bit(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).double() / 127.5 - 1


@pytest.mark.numerics
def test_bits_per_dim_of_a_trivial_model_matches_the_closed_form():
    x = images_8bit(6)
    batches = [{"images": x[:4].float(), "count": 4}, {"images": x[4:].float(), "count": 2}]
    vae = trivial_vae()
    xs = x.numpy()

    # Discretised logistic(0, s) per channel: P(bin) = sigmoid((x + 1/255)/s) - sigmoid((x - 1/255)/s),
    # the edge bins taking the tails.
    crit = VAELoss(load_config(None, ["loss.recon=logistic"]).loss)
    log_s = np.array([-1.5, -1.0, -0.5])
    with torch.no_grad():
        crit.log_scale.copy_(torch.from_numpy(log_s))
    s = np.exp(log_s).reshape(1, 3, 1, 1)

    def sig(t):
        return 1 / (1 + np.exp(-t))

    upper = np.where(xs > 1 - 1e-3, 1.0, sig((xs + 1 / 255) / s))
    lower = np.where(xs < -1 + 1e-3, 0.0, sig((xs - 1 / 255) / s))
    want = -np.log(upper - lower).mean() / math.log(2)
    got = evaluate(vae, batches, metrics=["bpd", "kl"], device="cpu", criterion=crit, iw=3)
    # Guards nats for bits (x1.44), a missing log 127.5 (~7 bits), the wrong normalisation: >= 10%. The
    # likelihood is fp32 per value (a few ulp through log and sigmoid, ~1e-6) averaged over 4,608 values;
    # the KL of mean 0, logvar 0 is exactly 0.
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["bpd"] == pytest.approx(want, rel=1e-5)
    assert got["bpd_iw"] == pytest.approx(want, rel=1e-5)  # p(x|z) does not depend on z, and q = p(z)

    # Gaussian with learned variance: 0.5 (x^2 / var + log var + log 2 pi) + log 127.5 nats per dimension.
    crit = VAELoss(load_config(None, ["loss.recon=gaussian"]).loss)
    with torch.no_grad():
        crit.logvar.fill_(-2.0)
    nats = 0.5 * (xs**2 / math.exp(-2.0) - 2.0 + math.log(2 * math.pi)) + math.log(127.5)
    want = nats.mean() / math.log(2)
    got = evaluate(vae, batches, metrics=["bpd"], device="cpu", criterion=crit)
    assert got["bpd"] == pytest.approx(want, rel=1e-5)

    # l1/l2 runs: a Gaussian with the maximum-likelihood variance, var = mean x^2.
    var = (xs**2).mean()
    want = (0.5 * (1 + math.log(2 * math.pi * var)) + math.log(127.5)) / math.log(2)
    got = evaluate(vae, batches, metrics=["bpd"], device="cpu", criterion=None)
    assert got["bpd"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(MetricError, match="learned likelihood"):
        evaluate(vae, batches, metrics=["bpd"], device="cpu", criterion=None, iw=2)


@pytest.mark.numerics
def test_sums_are_reduced_once_and_exactly(run):
    """Two 'ranks' with different numbers of batches: one reduce each, and the totals of a single pass."""
    run_dir, _ = run
    vae = VAE.from_checkpoint(run_dir)
    x = images_8bit(10, 32, seed=3).float()
    keys = [f"k{i}" for i in range(10)]

    def batches(lo, hi, size):
        return [
            {
                "images": x[i : min(i + size, hi)],
                "count": min(size, hi - i),
                "keys": keys[i : min(i + size, hi)],
            }
            for i in range(lo, hi, size)
        ]

    metrics = ["psnr", "ssim", "bpd", "kl", "active_units"]
    full = evaluate(vae, batches(0, 10, 4), metrics=metrics, device="cpu")
    calls, other = [], {}

    def rank1_reduce(v):
        calls.append(1)
        other["v"] = v.clone()
        return v

    evaluate(vae, batches(7, 10, 2), metrics=metrics, device="cpu", reduce=rank1_reduce)
    split = evaluate(
        vae,
        batches(0, 7, 3),
        metrics=metrics,
        device="cpu",
        reduce=lambda v: (calls.append(0), v + other["v"])[1],
    )
    assert calls == [1, 0]
    assert split.keys() == full.keys()
    # Guards a rank's sums lost or added twice, a mean of batch means (batches of 4/3/2): >= 1e-3. The
    # batches differ, so conv kernels may too (~1e-6 relative per image); the sums are float64.
    for k in full:
        assert split[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k


def test_the_bicubic_baseline_keeps_at_least_the_latents_numbers(run):
    # the smallest thumbnail of the image's shape with as many numbers; exactly as many when they divide
    assert equal_values_size(192, 64, 64) == (8, 8)  # f8, 3 channels: the 8x thumbnail
    assert equal_values_size(256, 64, 64) == (10, 10)  # f8, 4 channels: 300 (9 x 9 x 3 would be 243)
    assert equal_values_size(4096, 256, 256) == (37, 37)
    assert equal_values_size(100, 32, 64) == (5, 10)  # 4 x 8 x 3 = 96 is too few
    assert equal_values_size(10**6, 16, 16) == (16, 16)  # never above the image itself
    run_dir, _ = run
    vae = VAE.from_checkpoint(run_dir)  # f2, 4 latent channels: 16 x 16 x 4 = 1,024 numbers per 32 px image
    x = images_8bit(6, 32, seed=7).float()
    got = evaluate(
        vae,
        [{"images": x[:4], "count": 4}, {"images": x[4:], "count": 2}],
        metrics=["psnr"],
        device="cpu",
        baseline=True,
    )
    assert (got["latent_values"], got["pixel_values"], got["bicubic_values"]) == (1024, 3072, 3 * 19 * 19)
    # Guards another thumbnail size or a missing clamp/quantisation: >= 1e-2 dB. The per-image PSNRs are the
    # same, averaged over 4 + 2 images against 6 in fp32 (<= 6 * 6e-8 relative): rel 1e-5 (was 1e-6).
    want = psnr(bicubic_round_trip(x, size=(19, 19)), x).mean().item()
    assert got["psnr_bicubic"] == pytest.approx(want, rel=1e-5)
    assert "psnr_bicubic" not in evaluate(vae, [{"images": x, "count": 6}], metrics=["psnr"], device="cpu")

    table = format_table(got)
    assert re.search(r"^\| numbers kept per image: latent +\| +1,024 \(3x fewer\) \|$", table, re.M)
    assert re.search(
        r"^\| numbers kept per image: bicubic thumbnail \| +1,083 \(2.8x fewer\) \|$", table, re.M
    )
    assert re.search(rf"^\| PSNR \(dB\), bicubic thumbnail +\| +{got['psnr_bicubic']:.2f} \|$", table, re.M)
    assert table.splitlines()[-1] == baseline_verdict(got)


def test_the_baseline_verdict_follows_the_numbers():
    base = {"latent_values": 256.0, "bicubic_values": 300.0, "pixel_values": 12288.0, "psnr_bicubic": 26.63}
    line = baseline_verdict({**base, "psnr": 24.0})
    assert "bicubic beats the VAE (26.63 against 24.00 dB)" in line
    assert "300 numbers per image against the latent's 256 (41x fewer than the pixels)" in line
    assert "the VAE beats bicubic (27.00 against 26.63 dB)" in baseline_verdict({**base, "psnr": 27.0})
    same = {**base, "bicubic_values": 256.0, "psnr": 26.0}
    assert "keeping the same 256 numbers per image (48x fewer than the pixels)" in baseline_verdict(same)


class _Features(torch.nn.Module):
    """A stand-in feature extractor with the calling convention of NVIDIA's inception-2015-12-05.pt."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 3).flatten(1)  # (B, 27)
        return torch.cat([f, f.square()], 1) if return_features else f


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_rfid_is_the_frechet_distance_of_features(run, tmp_path):
    run_dir, _ = run
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(_Features()), str(path))
    inception = load_inception(str(path))
    assert isinstance(inception, InceptionFeatures) and inception.dim == 54
    vae = VAE.from_checkpoint(run_dir).eval()
    x = images_8bit(12, 32, seed=5).float()
    got = evaluate(
        vae,
        [{"images": x[:8], "count": 8}, {"images": x[8:], "count": 4}],
        metrics=["rfid"],
        device="cpu",
        inception=inception,
    )
    with torch.no_grad():
        x_rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    f1, f2 = inception(x), inception(x_rec)
    want = frechet_distance(f1.mean(0), torch.cov(f1.T), f2.mean(0), torch.cov(f2.T))
    # Guards an FD per batch (8 and 4 samples) or a biased covariance (x11/12): >= 8%. Rounding: the fp32
    # features of reconstructions decoded in batches of 8 + 4 against 12 (~1e-6 relative), a difference of
    # traces that may cancel some: rel 1e-4 (was 1e-6, one summation order assumed).
    assert got["rfid"] == pytest.approx(want, rel=1e-4)


def test_missing_lpips_and_inception_weights_give_a_clear_error(run, tmp_path, monkeypatch):
    run_dir, shards = run
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    base = ["--run", str(run_dir), "--data", str(shards)]
    with pytest.raises(MetricError, match="never downloaded") as e:
        eval_main([*base, "--metrics", "psnr", "lpips"])
    assert "--lpips-path" in str(e.value) and "vgg.pth" in str(e.value)
    with pytest.raises(MetricError, match="lpips_path"):
        eval_main([*base, "--metrics", "lpips", "--lpips-path", str(tmp_path / "nope")])
    with pytest.raises(MetricError, match="never downloaded") as e:
        eval_main([*base, "--metrics", "rfid"])
    assert "inception-2015-12-05.pt" in str(e.value)
    with pytest.raises(MetricError, match="not a file"):
        eval_main([*base, "--metrics", "rfid", "--inception-path", str(tmp_path / "missing.pt")])
    with pytest.raises(MetricError, match="unknown metric 'fid'"):
        eval_main([*base, "--metrics", "fid"])


# --------------------------------------------------------------------------------------------------------
# The command, one process and two


def test_eval_with_two_processes_gives_the_numbers_of_one(run, tmp_path, capsys):
    run_dir, shards = run
    args = ["eval", "--run", str(run_dir), "--data", str(shards), "--iw", "4", "--batch-size", "3"]
    cmd = accelerate_launch(
        "cpu-2proc.yaml",
        2,
        [*args[1:], "--out", str(tmp_path / "two.json")],
        program=("-m", "vae_scale.commands.evaluate"),
    )
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    assert eval_main([*args[1:], "--out", str(tmp_path / "one.json")]) == 0  # meanwhile, in this process
    table = capsys.readouterr().out
    for row in (
        "| PSNR (dB)",
        "| SSIM",
        "| bits/dim (ELBO)",
        "| bits/dim (IW bound, K=4)",
        "| KL per latent",
        "| active latent channels",
        "discretised logistic, learned scale",
        "| numbers kept per image: latent ",
        "| PSNR (dB), bicubic thumbnail ",
        "baseline: bicubic down to a thumbnail and back up",
    ):
        assert row in table, row
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["metrics"]["samples"] == 10 and set(one["metrics"]) == set(two["metrics"])
    # Guards a rank's sums lost or doubled: >= 1e-1. Two processes on one machine (one kernel path), other
    # batches per rank (~1e-6 relative per image), sums in float64.
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    m = one["metrics"]
    assert m["bpd_iw"] < m["bpd"] and 0 < m["ssim"] < 1 and m["kl"] > 0
    assert out.count("| PSNR (dB) ") == 1  # only the main process prints
