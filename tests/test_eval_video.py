"""Evaluating video: per-frame metrics of clip batches, flicker, the trilinear baseline at the latent's
numbers, FVD's protocol with an I3D file, `vae-scale eval` on clip shards and `reconstruct` of videos and
clip shards.

The model is wan-tiny with random weights on clips of 5 frames at 24 x 40 (a wan clip is 1 + 4k frames, sides
multiples of 8); the I3D is a stand-in TorchScript module with the I3D file's calling convention.
"""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

av = pytest.importorskip("av")

from vae_scale.cli.evaluate import eval_main  # noqa: E402
from vae_scale.cli.generate import reconstruct_main  # noqa: E402
from vae_scale.cli.shards import shards_main  # noqa: E402
from vae_scale.commands.common import InputError  # noqa: E402
from vae_scale.config import Config, LossConfig  # noqa: E402
from vae_scale.eval.metrics import (  # noqa: E402
    Lockstep,
    MetricError,
    equal_values_clip_size,
    evaluate,
    load_eval_nets,
    load_i3d,
    load_lpips,
    psnr,
    ssim,
    trilinear_round_trip,
)
from vae_scale.eval.rfid import frechet_distance  # noqa: E402
from vae_scale.models.posterior import DeterministicLatent  # noqa: E402
from vae_scale.models.wan import WanVAE  # noqa: E402

T, H, W = 5, 24, 40


def _wan(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    return WanVAE.from_preset("wan-tiny").eval()


def _clips(n: int, seed: int) -> torch.Tensor:
    """n smooth clips (n, 3, T, H, W) in [-0.8, 0.8] that move: a drifting blend of two random images."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.rand(n, 3, 1, H // 4, W // 4, generator=g) for _ in range(2))
    a, b = (torch.nn.functional.interpolate(t, size=(1, H, W), mode="trilinear") for t in (a, b))
    w = torch.linspace(0, 1, T).view(1, 1, T, 1, 1)
    return ((1 - w) * a + w * b) * 1.6 - 0.8


def _batches(x: torch.Tensor, size: int) -> list[dict]:
    keys = [f"clip{j}" for j in range(len(x))]
    return [
        {"clips": x[i : i + size], "count": len(x[i : i + size]), "keys": keys[i : i + size]}
        for i in range(0, len(x), size)
    ]


class _AddError(nn.Module):
    """An autoencoder whose latent is the clip itself and whose decoder adds a fixed error (broadcast over the
    batch): the pass then scores exactly the reconstruction x + error that a test wants to measure."""

    def __init__(self, error: torch.Tensor):
        super().__init__()
        self.error = error

    def encode(self, x):
        return DeterministicLatent(x)

    def decode(self, z):
        return z + self.error


def test_flicker_fails_a_flickering_reconstruction_that_per_frame_psnr_cannot_tell_apart():
    x = _clips(4, seed=1)
    a = 0.1  # every pixel of every frame is off by +-a in both reconstructions: the same per-frame PSNR
    g = torch.Generator().manual_seed(2)
    signs = torch.randint(0, 2, (1, 3, T, H, W), generator=g).float() * 2 - 1
    steady = _AddError(a * signs[:, :, :1].expand(-1, -1, T, -1, -1))  # the same error in every frame
    flickering = _AddError(a * signs)  # a new error in every frame
    got = {
        name: evaluate(model, _batches(x, 3), metrics=["psnr", "flicker"], device="cpu")
        for name, model in (("steady", steady), ("flickering", flickering))
    }
    # Per frame both have MSE (a/2)^2 on the [0, 1] scale exactly (|x| + a < 1: nothing is clamped), so PSNR
    # 26.02 dB; float32 rounding of x + e moves it by ~1e-6 dB.
    assert got["steady"]["psnr"] == pytest.approx(20 * math.log10(2 / a), abs=1e-4)
    assert got["flickering"]["psnr"] == pytest.approx(got["steady"]["psnr"], abs=1e-4)
    # Steady: the frame differences are the input's up to float32 rounding of x + e (~1e-7): flicker ~0 and
    # its PSNR at psnr's 120 dB ceiling. Flickering: consecutive signs differ half the time, so
    # |d_hat - d| / 2 is a on half the values: mean a / 2 (std of the mean over 46,080 values ~2e-4, so 5e-3
    # is > 20 sigma), and the MSE of the differences a^2 / 2: 10 log10(2 / a^2) = 23.0 dB.
    assert got["steady"]["flicker"] < 1e-6 and got["steady"]["flicker_psnr"] > 110
    assert got["flickering"]["flicker"] == pytest.approx(a / 2, abs=5e-3)
    assert got["flickering"]["flicker_psnr"] == pytest.approx(10 * math.log10(2 / a**2), abs=0.2)


@pytest.mark.numerics
def test_ssim_and_lpips_of_a_clip_are_the_means_of_its_frames(lpips_dir):
    x = _clips(2, seed=6)
    ramp = torch.linspace(0, 2, T).view(1, 1, T, 1, 1)  # an error that grows frame by frame
    error = 0.1 * ramp * torch.randn(1, 3, T, H, W, generator=torch.Generator().manual_seed(7))
    net = load_lpips(LossConfig(), str(lpips_dir))
    got = evaluate(_AddError(error), _batches(x, 1), metrics=["ssim", "lpips"], device="cpu", lpips=net)
    real = x.transpose(1, 2).reshape(-1, 3, H, W)  # frame t of clip i at i * T + t
    fake = (x + error).clamp(-1, 1).transpose(1, 2).reshape(-1, 3, H, W)
    with torch.no_grad():
        want_lpips = net(fake, real).double().mean()
    # Guards frames folded in the wrong order (channels mixed with time) or a clip scored as one image:
    # both change the figures by far more than 1e-3 here. Rounding: float32 VGG features of batches of 5
    # frames against 10 differ by ~1e-6 relative; SSIM is float64.
    assert got["ssim"] == pytest.approx(float(ssim(fake, real).mean()), rel=1e-6)
    assert got["lpips"] == pytest.approx(float(want_lpips), rel=1e-5)


@pytest.mark.numerics
def test_clip_figures_are_per_frame_means_whatever_the_batch_size():
    vae, x = _wan(), _clips(2, seed=3)
    metrics = ["psnr", "ssim", "flicker", "kl", "active_units", "spectrum"]
    runs = [evaluate(vae, _batches(x, size), metrics=metrics, device="cpu", baseline=True) for size in (1, 2)]
    with torch.no_grad():
        x_hat = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    frames = x.transpose(1, 2).reshape(-1, 3, H, W), x_hat.transpose(1, 2).reshape(-1, 3, H, W)
    per_frame = psnr(frames[1], frames[0]).double().view(2, T)
    whole_clip = psnr(x_hat.flatten(2), x.flatten(2)).double()  # PSNR of each clip's MSE: not the figure
    # Guards a clip's PSNR taken from its pooled MSE (the frames differ, so that differs by > 0.01 dB here,
    # checked below) or sums lost between batches (a whole clip: >= 1 dB). Rounding: float32 decodes of 1 or
    # 2 clips per batch differ by ~1e-6 relative; the sums are float64.
    assert abs(per_frame.mean(1).mean() - whole_clip.mean()) > 0.01
    for got in runs:
        assert got["samples"] == 2
        assert got["psnr"] == pytest.approx(float(per_frame.mean()), abs=1e-4)
    for k in runs[0]:
        assert runs[1][k] == pytest.approx(runs[0][k], rel=1e-5, abs=1e-6), k

    # The baseline: trilinear through a thumbnail clip of the latent's frames, at least its numbers.
    latent = 16 * 2 * (H // 8) * (W // 8)  # wan-tiny: 16 channels x (1 + (T - 1) / 4) x H/8 x W/8 = 480
    size = equal_values_clip_size(latent, T, 2, H, W)
    assert runs[0]["latent_values"] == latent and runs[0]["trilinear_values"] == 3 * math.prod(size)
    base = trilinear_round_trip(x, size)
    want = psnr(base.transpose(1, 2).reshape(-1, 3, H, W), frames[0]).double().mean()
    assert runs[0]["psnr_trilinear"] == pytest.approx(float(want), abs=1e-4)
    assert "flicker_trilinear" in runs[0] and "psnr_bicubic" not in runs[0]


def test_the_trilinear_baseline_keeps_at_least_the_latents_numbers_and_round_trips_a_still():
    for latent, frames, latent_frames in ((480, 5, 2), (81920, 17, 5), (16 * 9 * 32 * 32, 33, 9)):
        t, h, w = equal_values_clip_size(latent, frames, latent_frames, 256, 256)
        assert t == latent_frames and 3 * t * h * w >= latent
        assert 3 * t * (h - 1) * (w - 1) < latent  # the smallest square thumbnail clip of that many frames
    assert equal_values_clip_size(480, 5, 2, H, W) == (2, 7, 12)  # 504 numbers, aspect 5:3
    still = torch.full((2, 3, T, H, W), 0.3)
    still[1] = -0.5
    back = trilinear_round_trip(still, (2, 7, 12))
    # interpolation weights sum to 1, so a constant comes back up to float32 rounding (~1e-7)
    assert back.shape == still.shape and torch.allclose(back, still, atol=1e-6)


def test_metrics_that_do_not_apply_are_refused_by_name():
    vae = _wan()
    for name in ("equivariance", "tile_consistency"):  # rfid: by `vae-scale eval`, below (it needs weights)
        with pytest.raises(MetricError, match=f"metric {name} does not apply to clips"):
            evaluate(vae, _batches(_clips(1, 0), 1), metrics=[name], device="cpu")
    images = [{"images": torch.zeros(1, 3, H, W), "count": 1}]
    with pytest.raises(MetricError, match="metric flicker does not apply to images"):
        evaluate(vae, images, metrics=["flicker"], device="cpu")
    one_frame = [{"clips": torch.zeros(1, 3, 1, H, W), "count": 1}]
    with pytest.raises(MetricError, match="flicker needs clips of at least 2 frames"):
        evaluate(vae, one_frame, metrics=["flicker"], device="cpu")
    # fvd without its file: refused before any evaluation, naming the flag and the key; nothing downloaded
    with pytest.raises(MetricError, match=r"--i3d-path FILE \(eval.i3d_path\)"):
        load_eval_nets(Config(), ["fvd"], i3d_path="/nonexistent/i3d_torchscript.pt")


def test_a_rank_out_of_clips_runs_padding_clips_in_lockstep():
    seen = []

    class Recording(_AddError):
        def encode(self, x):
            seen.append(tuple(x.shape))
            return super().encode(x)

    # another rank still has two batches: this one, with none, runs two padding forwards of the clip shape
    # (a sharded model's forwards are collectives), counted nowhere
    answers = iter([(True, False), (True, False), (False, False)])
    lockstep = Lockstep(lambda has_batch, asked: next(answers), (3, T, H, W))
    with pytest.raises(MetricError, match="no samples to evaluate"):
        evaluate(Recording(torch.zeros(())), [], metrics=["psnr", "flicker"], device="cpu", lockstep=lockstep)
    assert seen == [(1, 3, T, H, W)] * 2


# --------------------------------------------------------------------------------------------------------
# FVD


D = 8
"""Features of the stand-in I3D: fewer than the test's clips, so every covariance has full rank."""


class _I3D(nn.Module):
    """A stand-in for i3d_torchscript.pt with its calling convention, detector(videos, rescale=...,
    resize=..., return_features=True) on (N, 3, T, 224, 224) in [-1, 1]: random 3D convolutions, D
    features (the logits when return_features is False)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv3d(3, 6, (2, 3, 3))
        self.conv2 = nn.Conv3d(6, D, (2, 3, 3))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if rescale or resize or x.shape[-2:] != (224, 224):  # the protocol hands it 224 x 224 in [-1, 1]
            raise RuntimeError("expected 224 x 224 videos in [-1, 1], rescale and resize off")
        x = torch.nn.functional.avg_pool3d(x, (1, 14, 14))  # (N, 3, T, 16, 16)
        f = self.conv2(torch.relu(self.conv1(x))).relu().mean((2, 3, 4))  # (N, D)
        return f if return_features else f.softmax(1)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_I3D()), str(path))
    return path


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_fvd_collects_every_clips_features_whatever_the_batch_size(i3d_file):
    i3d = load_i3d(str(i3d_file))
    assert i3d.dim == D and i3d.kwargs == {"rescale": False, "resize": False, "return_features": True}
    x = _clips(11, seed=4)
    error = 0.2 * torch.randn(1, 3, T, H, W, generator=torch.Generator().manual_seed(5))
    vae = _AddError(error)  # the pass's model is not what is tested here: a fixed, known reconstruction
    got = [
        evaluate(vae, _batches(x, size), metrics=["fvd"], device="cpu", i3d=i3d)["fvd"] for size in (4, 11)
    ]
    with torch.no_grad():
        real, fake = i3d(x), i3d((x + error).clamp(-1, 1))  # every clip's features at once
    want = frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
    # Guards features of some clips left out or counted twice, statistics per batch, a biased covariance
    # (11/10: 10%): all >= 1%. Rounding: float32 features of batches of 4 or 11 differ by ~1e-6 relative, the
    # sums are float64, and the distance (a difference of traces) cancels some: rel 1e-4.
    assert want > 1e-3
    for fvd in got:
        assert fvd == pytest.approx(want, rel=1e-4)
    with pytest.raises(MetricError, match="metric fvd does not apply to images"):
        evaluate(vae, [{"images": torch.zeros(1, 3, H, W)}], metrics=["fvd"], device="cpu", i3d=i3d)


# --------------------------------------------------------------------------------------------------------
# The commands


def _video(frames: int, seed: int, h: int = 40, w: int = 48) -> bytes:
    """An H.264 video of a pattern that drifts one pixel per frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, (h // 4, (w + frames) // 4, 3)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        s.options = {"crf": "10", "threads": "1"}
        for t in range(frames):
            frame = np.ascontiguousarray(base[:, t : t + w])
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    folder = root / "videos"
    folder.mkdir()
    for i in range(3):
        (folder / f"v{i}.mp4").write_bytes(_video(7, seed=i))
    shards = root / "shards"
    args = [str(folder), str(shards), "--frames", "5", "--size", "32", "--val-fraction", "0", "--quiet"]
    assert shards_main([*args, "--workers", "1"]) == 0
    model = root / "wan"
    _wan().save_diffusers(model)
    return folder, shards, model


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_eval_on_clip_shards_reports_per_frame_metrics_flicker_fvd_and_the_trilinear_baseline(
    videos, i3d_file, tmp_path, capsys
):
    _, shards, model = videos
    out = tmp_path / "eval.json"
    args = ["--ckpt", str(model), "--data", str(shards), "--split", "train", "--resolution", "32"]
    extra = ["--i3d-path", str(i3d_file), "--out", str(out)]
    assert eval_main([*args, "--frames", "5", "--workers", "0", *extra]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    got = report["metrics"]
    assert got["samples"] == 3 and report["frames"] == 5
    keys = ("psnr", "ssim", "flicker", "flicker_psnr", "psnr_trilinear", "flicker_trilinear", "bpd", "fvd")
    for key in keys:  # the run's default eval.metrics, flicker, and fvd since an I3D file is given
        assert math.isfinite(got[key]), key
    protocol = report["fvd_protocol"]
    assert "clips 3 of 5 frames at stride 1" in protocol and "i3d_torchscript.pt sha256:" in protocol
    assert f"FVD protocol: {protocol}" in printed
    assert "clips of 5 frames at stride 1 (per-frame figures)" in printed
    assert "| PSNR (dB), per frame " in printed and "| flicker (frame-difference MAE) " in printed
    assert "baseline: trilinear down to a thumbnail clip and back up" in printed
    # an image metric asked for on clips is a usage error naming it
    with pytest.raises(InputError, match="--metrics rfid: does not apply to clips"):
        eval_main([*args, "--frames", "5", "--workers", "0", "--metrics", "rfid"])


def test_reconstruct_writes_a_video_and_a_strip_of_input_over_reconstruction(videos, tmp_path, capsys):
    folder, shards, model = videos
    out = tmp_path / "recon"
    assert reconstruct_main(["--ckpt", str(model), str(folder / "v0.mp4"), "--out", str(out)]) == 0
    # 7 frames -> the longest 1 + 4k clip: 5 frames of 40 x 48 (multiples of 8)
    with av.open(str(out / "v0.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (40, 48, 3)
    from PIL import Image

    strip = np.asarray(Image.open(out / "v0.png"))
    assert strip.shape == (2 * (40 + 2) + 2, 5 * (48 + 2) + 2, 3)  # input frames over reconstructed frames
    assert "5 frames 48x40" in capsys.readouterr().out

    shard_out = tmp_path / "from-shards"
    args = ["--ckpt", str(model), "--data", str(shards), "--split", "train", "--frames", "5"]
    assert reconstruct_main([*args, "--resolution", "32", "--n", "1", "--out", str(shard_out)]) == 0
    assert sorted(p.name for p in shard_out.iterdir()) == ["train-00000000.mp4", "train-00000000.png"]
