"""Training the Wan family on clips: real clip shards (`vae-scale shards sample-video`), mixed image and clip
batches, the 3D discriminator and EMA; exact resume, DDP against FSDP on two gloo processes, and the check
pass's refusals. The sharded run is evaluated on held-out clips; the metrics pass on clips is tested on its
own in tests/test_eval_video.py.
"""

import json

import pytest
import torch
from support import (
    accelerate_launch,
    assert_same_training,
    checkpoint_file,
    one_line_error,
    run,
    write_lpips_weights,
)

from vae_scale.cli import main as cli_main
from vae_scale.cli.shards import shards_main
from vae_scale.config import DataConfig, load_config
from vae_scale.data.clip_loader import batch_frames
from vae_scale.eval.lpips import LPIPS_FILE, VGG16_FILE
from vae_scale.formats.checkpoint import latest_checkpoint
from vae_scale.models.interface import build_model
from vae_scale.train.discriminator import NLayerDiscriminator3D
from vae_scale.train.objective import VAELoss, frames
from vae_scale.train.report import read_metrics
from vae_scale.train.trainer import train

pytest.importorskip("av")

FRAMES = 5
SEED = 5


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory):
    """12 training and 4 validation clips of 9 frames, 32 px, camera motion over the sample photographs."""
    out = tmp_path_factory.mktemp("clip-shards") / "shards"
    args = ["sample-video", str(out), "--frames", "9", "--size", "32", "--clips-per-image", "2"]
    assert shards_main([*args, "--quiet", "--workers", "1", "--val-fraction", "0.25"]) == 0
    return out


def _args(shards, *extra: str) -> list[str]:
    """wan-tiny on 24 px crops of 5-frame clips, 40% image batches, the 3D discriminator from step 1,
    and EMA; no evaluation, no image previews."""
    return [
        f"data.train={shards}",
        f"data.frames={FRAMES}",
        "data.frame_stride=2",
        "data.image_fraction=0.4",
        f"train.seed={SEED}",
        "data.resolution=24",
        "data.batch_size=2",
        "data.workers=0",
        "train.mixed_precision=no",
        "loss.disc_weight=0.5",
        "loss.disc_start=1",
        "loss.disc_layers=2",
        "loss.disc_channels=8",
        "optim.ema_decay=0.8",
        "eval.every=0",
        "log.wandb=disabled",
        "log.every=1",
        "log.images_every=0",
        "checkpoint.every=0",
        *extra,
    ]


def test_the_steps_see_clips_and_images_in_the_seeded_mix():
    """The resumed run takes 3 batches of an epoch of 6 (12 clips, batch 2): train.seed=5's schedule gives
    it both kinds before the resume and, after it, an image batch from a stream that has to be replayed
    (else the test would cover less)."""
    data = DataConfig(frames=FRAMES, image_fraction=0.4)
    assert [batch_frames(data, SEED, 0, i) for i in range(3)] == [1, FRAMES, 1]


def _rank_state(run_dir, rank: int) -> dict:
    """The loader position a rank saved in the run's newest checkpoint."""
    return json.loads((latest_checkpoint(run_dir) / f"rank-{rank}.json").read_text())["data"]


def test_a_clip_run_resumes_onto_the_uninterrupted_run_bit_for_bit(tmp_path, clip_shards):
    train(load_config("wan-tiny", [*_args(clip_shards, "train.steps=3"), f"run.dir={tmp_path / 'straight'}"]))
    resumed = tmp_path / "resumed"
    train(load_config("wan-tiny", [*_args(clip_shards, "train.steps=2"), f"run.dir={resumed}"]))
    train(load_config("wan-tiny", [*_args(clip_shards, "train.steps=3"), f"run.dir={resumed}"]))
    for file in ("vae", "ema", "discriminator"):
        a = checkpoint_file(tmp_path / "straight", f"{file}.safetensors")
        b = checkpoint_file(resumed, f"{file}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    disc = checkpoint_file(resumed, "discriminator.safetensors")
    assert disc["main.0.weight"].ndim == 5  # the 3D discriminator trained
    states = [_rank_state(d, 0) for d in (tmp_path / "straight", resumed)]
    assert states[0] == states[1] and states[0]["kind"] == "clips" and states[0]["batch"] == 3


@pytest.mark.slow
@pytest.mark.numerics
def test_clip_training_sharded_is_the_training_of_ddp(tmp_path, clip_shards):
    # Evaluated at the end on the 4 held-out clips: the metrics pass takes clip batches from the clip val
    # loader under both wrappings (FSDP's ranks run it in lockstep).
    evaluation = [f"data.val={clip_shards}", "eval.every=3", "eval.metrics=[psnr,ssim,flicker]"]
    args = ["--config", "wan-tiny", *_args(clip_shards, "train.steps=3", "train.grad_accum=2"), *evaluation]
    run(accelerate_launch("fsdp.yaml", 2, [*args, f"run.dir={tmp_path / 'fsdp'}"]))
    run(accelerate_launch("cpu-2proc.yaml", 2, [*args, f"run.dir={tmp_path / 'ddp'}"]))
    cfg = load_config("wan-tiny", args[2:])
    torch.manual_seed(cfg.train.seed)
    start = build_model(cfg.model).state_dict()
    # The two reduce gradients in a different order: fp32 rounding only (support.SAME_TRAINING says why).
    assert_same_training(checkpoint_file(tmp_path / "fsdp"), checkpoint_file(tmp_path / "ddp"), start, "wan")
    val = {}
    for d in ("fsdp", "ddp"):
        (row,) = [r for r in read_metrics(tmp_path / d) if "val/psnr" in r]
        val[d] = row
        assert 0 <= row["val/flicker"] < 1 and 0 < row["val/ssim"] <= 1, d
    # Same weights up to fp32 reduction order (above), evaluated on the same 4 clips: a clip dropped,
    # counted twice or evaluated at another T moves PSNR by far more than 1e-3 dB.
    assert val["fsdp"]["val/psnr"] == pytest.approx(val["ddp"]["val/psnr"], abs=1e-3)
    assert val["fsdp"]["val/flicker"] == pytest.approx(val["ddp"]["val/flicker"], rel=1e-3)
    for d in ("fsdp", "ddp"):  # each rank kept its own clip position
        ranks = [_rank_state(tmp_path / d, r) for r in (0, 1)]
        assert [s["rank"] for s in ranks] == [0, 1] and all(s["kind"] == "clips" for s in ranks)


@pytest.mark.parametrize("preset", ["dc-ae-tiny", "flux2-tiny", None])
def test_clips_for_an_image_family_are_refused_naming_the_key(tmp_path, capsys, clip_shards, preset):
    config = ["--config", preset] if preset else []
    argv = ["train", *config, *_args(clip_shards, "data.resolution=32"), f"run.dir={tmp_path / 'run'}"]
    assert cli_main(argv) == 2
    one_line_error(capsys, "data.frames=5", "takes images only")
    assert not (tmp_path / "run").exists()


def test_image_only_loss_terms_are_refused_with_clips(tmp_path, capsys, clip_shards):
    argv = [
        "train",
        "--config",
        "wan-tiny",
        *_args(clip_shards, "loss.se_weight=0.5"),
        f"run.dir={tmp_path}/r",
    ]
    assert cli_main(argv) == 2
    one_line_error(capsys, "loss.se_weight", "data.frames=5")


def test_the_3d_discriminator_takes_clips_and_one_frame_clips():
    torch.manual_seed(0)
    disc = NLayerDiscriminator3D(3, 8, 3)
    for t in (1, 5, 9):
        logits = disc(torch.randn(2, 3, t, 24, 40))
        assert logits.shape[:2] == (2, 1) and logits.shape[2] >= 1 and logits.shape[-2:] == (3, 5), t
    # A patch logit of frame 0 depends on no frame beyond its receptive field, and a clip's later frames
    # do move the logits: the discriminator looks along time.
    x = torch.randn(1, 3, 9, 24, 24)
    y = x.clone()
    y[:, :, -1] += 1
    disc.eval()
    assert not torch.equal(disc(x), disc(y))


@pytest.mark.numerics
@pytest.mark.parametrize("recon", ["l1", "gaussian", "logistic"])
def test_the_clip_objective_is_the_objective_of_its_frames_as_images(tmp_path_factory, recon):
    """A clip's loss is its frames' as a batch of images, each frame's KL a T-th of the clip's: the
    reconstruction and LPIPS are means over every frame, and the KL is summed over the 5-D latent and
    divided by the clip's C*T*H*W as an image's is by C*H*W (so loss.kl_weight means the same)."""
    perceptual = recon == "l1"  # LPIPS once: its VGG16 takes seconds to load
    cfg = [f"loss.recon={recon}", f"loss.perceptual_weight={int(perceptual)}", "loss.kl_weight=0.1"]
    cfg = load_config(None, cfg).loss
    files = None
    if perceptual:
        folder = write_lpips_weights(tmp_path_factory.mktemp("lpips"))
        files = (folder / LPIPS_FILE, folder / VGG16_FILE)
    criterion = VAELoss(cfg, 3, files, clips=True)
    torch.manual_seed(0)
    b, t = 2, 5
    x = torch.rand(b, 3, t, 24, 16) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    kl = torch.rand(b) * 1e4  # with kl_weight 0.1, a KL term of the order of the reconstruction's
    loss, logs = criterion.autoencoder_loss(x, x_hat, None, kl, step=0)
    frame_kl = kl.repeat_interleave(t) / t
    as_images, image_logs = criterion.autoencoder_loss(frames(x), frames(x_hat), None, frame_kl, 0)
    # The same float32 sums taken in another order: agreement to a few ulps of the loss (1e-6 relative); a
    # frame left out, or the KL divided by C*H*W instead of C*T*H*W, is off by far more (over 1e-2).
    torch.testing.assert_close(loss, as_images, rtol=1e-6, atol=0)
    if perceptual:
        torch.testing.assert_close(logs["perceptual"], image_logs["perceptual"], rtol=1e-6, atol=0)
    (g_clip,) = torch.autograd.grad(loss, x_hat)
    assert g_clip.shape == x.shape and torch.isfinite(g_clip).all()


@pytest.mark.parametrize(
    "frames, metric, kind",
    [(FRAMES, "rfid", "clips"), (FRAMES, "equivariance", "clips"), (1, "flicker", "images")],
)
def test_in_loop_metrics_that_do_not_apply_to_the_val_data_are_refused_before_step_1(
    tmp_path, capsys, clip_shards, frames, metric, kind
):
    """An in-loop metric the validation batches cannot take would stop the run at its first evaluation;
    the check pass names it before anything starts."""
    evaluation = [f"data.val={clip_shards}", "eval.every=2", f"eval.metrics=[psnr,{metric}]"]
    args = [*_args(clip_shards, f"data.frames={frames}", *evaluation), f"run.dir={tmp_path / 'run'}"]
    assert cli_main(["train", "--config", "wan-tiny", *args]) == 2
    # One of the problems listed (rfid's missing Inception file, clip shards read as images, are others).
    (line,) = [x for x in capsys.readouterr().err.splitlines() if f"metric {metric} does not apply" in x]
    assert f"to {kind}:" in line and f"data.frames={frames}" in line
    assert not (tmp_path / "run").exists()
