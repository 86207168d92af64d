"""train.trainable / train.frozen (which parameters train) and the latent_drift metric: a decoder-only run
leaves the encoder bit for bit as it started (drift exactly zero), a full run moves it (drift reported);
bad patterns stop the run before step 1; FSDP2 shards units that mix frozen and trainable parameters."""

import json
import math
from pathlib import Path

import pytest
import torch
from support import TINY, accelerate_launch, checkpoint_file, initial_weights, photo_like_shards, run

from vae_scale.cli.evaluate import eval_main
from vae_scale.config import ConfigError, load_config
from vae_scale.models.interface import load_checkpoint
from vae_scale.train.report import read_metrics
from vae_scale.train.startup import check_trainable
from vae_scale.train.trainable import trainable_names
from vae_scale.train.trainer import train

DECODER = ["train.trainable=[decoder,post_quant_conv]"]
"""sd-decoder-finetune.yaml's selection: what comes after the latent."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Training and validation shards of a few photo-like images."""
    root = tmp_path_factory.mktemp("trainable")
    return photo_like_shards(root, 16, ((40, 40), (40, 48)), max_per_shard=4, val_fraction=0.25)


def run_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A 2-step TINY run that evaluates latent_drift at its end and keeps an EMA."""
    return [
        *TINY,
        "model.mid_block_attention=false",
        f"data.train={shards}",
        f"data.val={shards}",
        f"run.dir={run_dir}",
        "train.steps=2",
        "eval.every=2",
        "eval.metrics=[psnr,latent_drift]",
        "optim.ema_decay=0.9",
        "checkpoint.every=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """A decoder-only run and a full run from the same seeded weights."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in (("decoder", DECODER), ("full", [])):
        out[name] = root / name
        train(load_config(None, run_args(shards, out[name], *extra)))
    return out


def test_a_decoder_only_run_keeps_the_encoder_bit_identical_and_reports_zero_drift(runs, shards):
    start = initial_weights(run_args(shards, runs["decoder"], *DECODER))["vae"]
    end = checkpoint_file(runs["decoder"])
    assert end.keys() == start.keys()  # the model's weights are all in vae.safetensors, once
    frozen = [k for k in start if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(end[k], start[k]) for k in frozen)
    assert any(not torch.equal(end[k], start[k]) for k in start if k.startswith("decoder."))
    # The EMA averages the trainable parameters only: the frozen ones are not stored twice.
    ema = checkpoint_file(runs["decoder"], "ema.safetensors")
    assert set(ema) == set(start) - set(frozen)
    # ... and the EMA model takes them from vae.safetensors (what export --ema writes).
    averaged = load_checkpoint(runs["decoder"], ema=True).state_dict()
    assert all(torch.equal(averaged[k], start[k]) for k in frozen)
    assert all(torch.equal(averaged[k], ema[k]) for k in ema)

    val = [r for r in read_metrics(runs["decoder"]) if "val/latent_drift_psnr" in r][-1]
    assert val["val/latent_drift_psnr"] == math.inf
    assert val["val/latent_drift_mse"] == 0.0
    assert val["val/latent_drift_mean_shift"] == 0.0 and val["val/latent_drift_std_shift"] == 0.0


def test_a_full_run_reports_its_drift(runs):
    val = [r for r in read_metrics(runs["full"]) if "val/latent_drift_psnr" in r][-1]
    assert math.isfinite(val["val/latent_drift_psnr"])
    assert val["val/latent_drift_mse"] > 0
    assert val["val/latent_drift_mean_shift"] > 0


def test_a_new_phase_may_train_other_parameters(runs, shards, tmp_path):
    """From the decoder-only run, a phase that trains the encoder alone: the decoder stays as phase 1 left
    it, the encoder moves, and the EMA of the encoder starts from its weights (phase 1's EMA has none)."""
    run_dir = tmp_path / "phase2"
    args = run_args(shards, run_dir, "train.trainable=[encoder]", f"model.init_from={runs['decoder']}")
    train(load_config(None, [*args, "eval.every=0"]))
    before, after = checkpoint_file(runs["decoder"]), checkpoint_file(run_dir)
    decoder = [k for k in before if not k.startswith("encoder.")]
    assert all(torch.equal(after[k], before[k]) for k in decoder)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("encoder."))
    assert set(checkpoint_file(run_dir, "ema.safetensors")) == set(before) - set(decoder)


def test_eval_against_a_run_measures_the_drift_between_two_encoders(runs, shards, tmp_path, capsys):
    """The decoder-only run's encoder is the starting one: the full run drifted from it, itself not."""
    reports = {}
    for name in ("full", "decoder"):
        out = tmp_path / f"{name}.json"
        args = ["--run", str(runs[name]), "--against", str(runs["decoder"]), "--data", str(shards)]
        assert eval_main([*args, "--metrics", "psnr", "--out", str(out)]) == 0
        reports[name] = json.loads(out.read_text())
    assert "latent drift PSNR (dB)" in capsys.readouterr().out
    full, same = reports["full"]["metrics"], reports["decoder"]["metrics"]
    assert full["latent_drift_mse"] > 0 and math.isfinite(full["latent_drift_psnr"])
    assert same["latent_drift_psnr"] == math.inf and same["latent_drift_std_shift"] == 0.0
    assert reports["full"]["against"]


# --------------------------------------------------------------------------------------------------------
# Bad selections


NAMES = ["encoder.conv_in.weight", "encoder.down_blocks.0.conv.weight", "decoder.conv_out.weight"]


def test_patterns_select_by_glob_and_by_module():
    train = load_config(None, ["train.trainable=[decoder,'encoder.down_blocks.*']"]).train
    assert trainable_names(NAMES, train) == NAMES[1:]
    train = load_config(None, ["train.frozen=[encoder.conv_in]"]).train
    assert trainable_names(NAMES, train) == NAMES[1:]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.trainable=[decoder,'encodr.*']", "train.trainable: pattern 'encodr.*' matches no parameter"),
        ("train.frozen=[decoder.mid]", "train.frozen: pattern 'decoder.mid' matches no parameter"),
        ("train.frozen=[encoder,decoder,quant_conv,post_quant_conv]", "leaves no parameter to train"),
    ],
)
def test_a_selection_that_cannot_train_stops_before_step_1(tmp_path, override, message):
    cfg = load_config(None, [*TINY, "data.train=synthetic", f"run.dir={tmp_path / 'r'}", override])
    with pytest.raises(ConfigError) as e:
        check_trainable(cfg)
    assert message in str(e.value)


def test_resuming_with_another_selection_is_refused(runs, shards):
    cfg = load_config(None, [*run_args(shards, runs["decoder"]), "train.steps=4"])  # everything trains
    with pytest.raises(ConfigError, match=r"train\.trainable \['decoder', 'post_quant_conv'\] -> \[\]"):
        train(cfg)


# --------------------------------------------------------------------------------------------------------
# FSDP2


def test_fsdp_shards_units_that_mix_frozen_and_trainable_parameters(tmp_path):
    """Each encoder level is a unit with its down-sampler frozen and its resnets trainable; the frozen
    weights end as they started on both ranks' gathered checkpoint."""
    run_dir = tmp_path / "fsdp"
    args = [
        *TINY,
        "model.mid_block_attention=false",
        "data.train=synthetic",
        f"run.dir={run_dir}",
        "train.steps=2",
        "train.frozen=['encoder.down_blocks.*.downsamplers.*',decoder]",
        "optim.ema_decay=0.9",
    ]
    proc = run(accelerate_launch("fsdp.yaml", 2, args))
    assert "FSDP2" in proc.stdout and "the rest frozen" in proc.stdout
    start, end = initial_weights(args)["vae"], checkpoint_file(run_dir)
    frozen = [k for k in start if ".downsamplers." in k or k.startswith("decoder.")]
    assert any(".downsamplers." in k for k in frozen)
    assert all(torch.equal(end[k], start[k]) for k in frozen)
    trained = [k for k in start if k.startswith("encoder.down_blocks.0.resnets.")]
    assert any(not torch.equal(end[k], start[k]) for k in trained)
    assert set(checkpoint_file(run_dir, "ema.safetensors")) == set(start) - set(frozen)
