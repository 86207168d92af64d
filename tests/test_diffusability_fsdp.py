"""The scale-equivariance and EQ-VAE terms under two gloo processes: FSDP2, whose decoder units then run
three times in one forward (the main decode and two transformed ones), ends with DDP's weights, and a
stopped and resumed sharded run redraws the same transforms and ends bit-identical to an uninterrupted one."""

import pytest
import torch
from support import (
    TINY,
    accelerate_launch,
    assert_same_training,
    checkpoint_file,
    initial_weights,
    run,
    uneven_val_shards,
)

from vae_scale.config import load_config
from vae_scale.eval.equivariance import draw_transforms
from vae_scale.train.report import read_metrics

FSDP = "fsdp.yaml"
DDP = "cpu-2proc.yaml"

TERMS = [
    "loss.se_weight=0.5",
    "loss.eq_weight=0.5",
    "train.steps=3",
    "train.grad_accum=2",
    "data.batch_size=2",
    "loss.disc_weight=0.5",  # the adversarial leaf and its weight from the decoder's last layer, alongside
    "loss.disc_start=1",
    "loss.disc_layers=2",
    "loss.disc_channels=16",
    "eval.every=3",
    "eval.metrics=[psnr,spectrum,equivariance]",  # lockstep: one rank runs a padding batch
    "checkpoint.every=0",
    "train.mixed_precision=no",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Real shards with 5 validation images: with batch 2 on two ranks, one rank has a batch more."""
    return uneven_val_shards(tmp_path_factory.mktemp("diffusability-shards"))


@pytest.mark.slow
@pytest.mark.numerics
def test_fsdp_and_ddp_end_with_the_same_weights_when_the_decoder_runs_three_times(tmp_path, shards):
    common = [
        *TINY,
        *TERMS,
        f"data.train={shards}",
        f"data.val={shards}",
        "loss.se_prob=1",  # every micro-batch: main decode, a downsampled one and a transformed one
        "loss.eq_prob=1",
        "loss.recon=gaussian",
    ]
    run(accelerate_launch(FSDP, 2, [*common, f"run.dir={tmp_path / 'fsdp'}"]))
    run(accelerate_launch(DDP, 2, [*common, f"run.dir={tmp_path / 'ddp'}"]))
    rows = {name: read_metrics(tmp_path / name) for name in ("fsdp", "ddp")}
    for name, r in rows.items():
        train_rows = [row for row in r if "loss" in row]
        assert len(train_rows) == 3 and all(row["se_loss"] > 0 and row["eq_loss"] > 0 for row in train_rows)
        val = [row for row in r if "val/psnr" in row][-1]
        assert val["val/samples"] == 5, name  # every validation image once, though one rank ran out first
        assert 0 < val["val/latent_hf_share"] < 1 and val["val/equivariance/rotate"] > 5
        assert (tmp_path / name / "spectrum.svg").is_file()
    f_val, d_val = ([row for row in rows[n] if "val/psnr" in row][-1] for n in ("fsdp", "ddp"))
    # Weights that differ by rounding (see below) give figures that differ by ~1e-5 relative; a decoder
    # unit run wrongly under FSDP moves a PSNR by far more than the 0.1% allowed.
    for key in ("val/latent_hf_share", "val/equivariance/down2", "val/equivariance/flip"):
        assert f_val[key] == pytest.approx(d_val[key], rel=1e-3), key
    # As in test_fsdp.py: only the order of fp32 reductions differs. The replicated discriminator sees
    # reconstructions that differ by that rounding and its Adam steps follow them; a decoder unit whose
    # second or third use went missing would change the reconstructions it sees, and every one of its steps.
    start = initial_weights(common)
    for file in ("vae", "loss", "discriminator"):
        fsdp = checkpoint_file(tmp_path / "fsdp", f"{file}.safetensors")
        ddp = checkpoint_file(tmp_path / "ddp", f"{file}.safetensors")
        assert_same_training(fsdp, ddp, start[file], file)


@pytest.mark.slow  # three launches of two processes
def test_a_stopped_and_resumed_sharded_run_redraws_the_same_transforms(tmp_path, shards):
    common = [
        *TINY,
        *TERMS,
        f"data.train={shards}",
        f"data.val={shards}",
        "loss.se_prob=0.5",  # the draws vary from step to step and must be redrawn alike after the resume
        "loss.eq_prob=0.5",
        "loss.recon=l1",
        "optim.ema_decay=0.8",
        "eval.every=0",
    ]
    run(accelerate_launch(FSDP, 2, [*common, "train.steps=4", f"run.dir={tmp_path / 'straight'}"]))
    resumed = tmp_path / "resumed"
    run(accelerate_launch(FSDP, 2, [*common, "train.steps=2", f"run.dir={resumed}"]))
    proc = run(accelerate_launch(FSDP, 2, [*common, "train.steps=4", f"run.dir={resumed}"]))
    assert "resumed from" in proc.stderr + proc.stdout
    straight = [r for r in read_metrics(tmp_path / "straight") if "loss" in r]
    again = [r for r in read_metrics(resumed) if "loss" in r]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(straight, again):
        assert (a["se_loss"], a["eq_loss"], a["loss"]) == (b["se_loss"], b["eq_loss"], b["loss"]), a["step"]
    # Each logged value is the mean over the step's two micro-batches of what their own draws decoded.
    cfg = load_config(None, common)
    for r in straight:
        for term in ("se", "eq"):
            drawn = any(term in draw_transforms(cfg.loss, 0, r["step"] - 1, m) for m in range(2))
            assert (r[f"{term}_loss"] > 0) == drawn, (r["step"], term)
    draws = [draw_transforms(cfg.loss, 0, s, m) for s in range(4) for m in range(2)]
    assert any("se" in d for d in draws) and any("se" not in d for d in draws)
    for file in ("vae", "ema", "discriminator"):
        a = checkpoint_file(tmp_path / "straight", f"{file}.safetensors")
        b = checkpoint_file(resumed, f"{file}.safetensors")
        for name in a:
            assert torch.equal(a[name], b[name]), (file, name)
