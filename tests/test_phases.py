"""A new phase of training from another run's checkpoint (model.init_from=RUN): the weights and EMA carry
over exactly, the loss and optimizer settings are the new phase's own, a newly switched-on discriminator
starts fresh, and a change of the model's shape is refused in one line."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import TINY, tiny_config

from vae_scale.cli import main
from vae_scale.config import ConfigError, load_config
from vae_scale.formats.checkpoint import latest_checkpoint
from vae_scale.train.startup import check_resume
from vae_scale.train.trainer import Trainer, train

PHASE_1 = ["train.steps=3", "checkpoint.every=0", "optim.ema_decay=0.9"]
"""Three steps, one checkpoint at the end, an EMA that has moved away from the weights by then."""
GAN_ON = ["loss.disc_weight=0.5", "loss.disc_start=0", "loss.disc_layers=1", "loss.disc_channels=8"]
"""The adversarial term from phase 2's first step, on a discriminator small enough for 32 px crops."""


@pytest.fixture(scope="module")
def phase_1(tmp_path_factory) -> Path:
    """A finished phase 1: three steps of TINY on synthetic images, no discriminator."""
    run = tmp_path_factory.mktemp("phases") / "phase1"
    train(tiny_config(run, "synthetic", *PHASE_1))
    return run


def test_phase_2_starts_from_phase_1s_weights_and_ema_with_a_fresh_discriminator(phase_1, tmp_path):
    ckpt = latest_checkpoint(phase_1)
    vae_end, ema_end = load_file(ckpt / "vae.safetensors"), load_file(ckpt / "ema.safetensors")
    # The EMA must differ from the weights, or "the EMA carried over" could not be told from "the EMA
    # restarted from the weights".
    assert any(not torch.equal(vae_end[k], ema_end[k]) for k in ema_end)

    cfg = tiny_config(
        tmp_path / "phase2", "synthetic", *PHASE_1, *GAN_ON, "optim.lr=5e-4", f"model.init_from={phase_1}"
    )
    # Resuming phase 1 with the GAN on is a model change; a new phase from it is not.
    with pytest.raises(ConfigError, match="start a new phase: model.init_from="):
        check_resume(tiny_config(phase_1, "synthetic", *PHASE_1, *GAN_ON))

    trainer = Trainer(cfg)
    try:
        # Exact equality: the weights are copied, not recomputed, so no rounding is involved.
        for name, t in trainer.vae.state_dict().items():
            assert torch.equal(t, vae_end[name]), name
        ema = trainer.ema.state_dict()
        for name, t in ema_end.items():
            assert torch.equal(ema[name], t), name
        assert trainer.step == 0
        assert trainer.disc is not None and trainer.criterion.disc_active(0)
        assert not trainer.opt.state and not trainer.disc_opt.state  # AdamW's moments start afresh
        assert trainer.opt.param_groups[0]["lr"] == 5e-4
    finally:
        trainer.close()

    result = train(cfg)
    assert result["step"] == 3
    # The run records the checkpoint it started from, not the run folder whose newest it was then.
    assert load_config(str(tmp_path / "phase2" / "config.yaml")).model.init_from == str(ckpt)
    phase_2 = latest_checkpoint(tmp_path / "phase2")
    assert (phase_2 / "discriminator.safetensors").is_file()


def test_a_new_phase_logs_what_it_continued(phase_1, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "p2", "synthetic", "train.steps=1", *GAN_ON, f"model.init_from={phase_1}")
    train(cfg)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("new phase from"))
    assert "VAE weights" in line and "discriminator" in line.split("continued;")[1]
    assert "EMA" not in line  # this phase has no EMA: none is taken or started


def test_a_new_phase_with_another_model_shape_is_refused_in_one_line(phase_1, tmp_path, capsys):
    argv = [
        "train",
        "model.block_out_channels=[8,16]",
        "model.layers_per_block=1",
        "model.norm_num_groups=4",
        "model.latent_channels=8",
        "data.resolution=32",
        "data.workers=0",
        "data.train=synthetic",
        f"run.dir={tmp_path / 'p2'}",
        f"model.init_from={phase_1}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.init_from" in err and "model.latent_channels 4 -> 8" in err
    assert not (tmp_path / "p2").exists()  # refused before anything is written


def test_a_new_phase_in_its_own_run_folder_is_refused(phase_1, capsys):
    ckpt = latest_checkpoint(phase_1)
    cfg = tiny_config(phase_1, "synthetic", *PHASE_1, f"model.init_from={ckpt}")
    with pytest.raises(ConfigError, match="this run's own folder"):
        train(cfg)


def test_export_of_a_phase_follows_the_chain_to_where_phase_1_started(phase_1, tmp_path):
    from vae_scale.commands.export import first_origin

    phase_2 = tmp_path / "phase2"
    train(tiny_config(phase_2, "synthetic", "train.steps=1", f"model.init_from={phase_1}"))
    phase_3 = tmp_path / "phase3"
    train(tiny_config(phase_3, "synthetic", "train.steps=1", f"model.init_from={phase_2}"))
    # Phase 1 started from random weights: the export measures statistics, as for any run from scratch.
    assert first_origin(str(phase_2)) == "" and first_origin(str(phase_3)) == ""
    out = tmp_path / "exported"
    assert main(["export", "--run", str(phase_3), "--out", str(out), "--data", "synthetic", "--n", "8"]) == 0
    assert (out / "latent_statistics.json").is_file()
    # An imported start is where the chain ends (its config.json is the latent contract to keep).
    weights = tmp_path / "init" / "vae.safetensors"
    weights.parent.mkdir()
    save_file(load_file(latest_checkpoint(phase_1) / "vae.safetensors"), weights)
    phase_a = tmp_path / "from-import"
    train(tiny_config(phase_a, "synthetic", "train.steps=1", f"model.init_from={weights}"))
    assert first_origin(str(phase_a)) == str(weights)


@pytest.mark.slow
def test_a_new_phase_under_fsdp_starts_from_every_carried_weight_exactly(tmp_path):
    """Phase 1 in one process; phase 2 sharded over two gloo processes with the GAN on. Phase 2's only step
    is made non-finite (support.poison_loss at step 0), so every rank skips it and phase 2's checkpoint holds
    its starting weights: they must equal phase 1's end exactly, gathered back from the shards."""
    from support import nonfinite_train_command, run

    likelihood = ["loss.recon=gaussian", "loss.logvar_init=0.5"]  # a learned scale to carry over
    phase_1 = tmp_path / "phase1"
    train(tiny_config(phase_1, "synthetic", *PHASE_1, *likelihood, "optim.lr=1e-2"))
    end = latest_checkpoint(phase_1)
    args = [*TINY, "data.train=synthetic", f"run.dir={tmp_path / 'phase2'}", *PHASE_1, *GAN_ON, *likelihood]
    args += [f"model.init_from={phase_1}", "train.steps=1", "train.mixed_precision=no"]
    proc = run(nonfinite_train_command(args, step=0, nproc=2, config="fsdp.yaml"), timeout=600)
    assert "new phase from" in proc.stdout
    start = latest_checkpoint(tmp_path / "phase2")
    for name in ("vae", "ema", "loss"):
        want, got = load_file(end / f"{name}.safetensors"), load_file(start / f"{name}.safetensors")
        assert want.keys() == got.keys(), name
        for k in want:  # copied and gathered, never recomputed: exact
            assert torch.equal(want[k], got[k]), (name, k)
    assert load_file(end / "loss.safetensors")["logvar"].item() != 0.5  # phase 1 moved it: a real check
    assert (start / "discriminator.safetensors").is_file()


def test_every_command_in_docs_phases_resolves():
    """The recipes in docs/phases.md use config keys and presets that exist, with values they accept."""
    import re
    import shlex

    from vae_scale.cli.options import data_overrides
    from vae_scale.cli.train import train_parser

    text = (Path(__file__).resolve().parents[1] / "docs" / "phases.md").read_text()
    commands = re.findall(r"vae-scale train [^`\n]*", re.sub(r"\\\n\s*", "", text))
    assert len(commands) >= 8
    for command in commands:
        argv = shlex.split(command.replace("=...", "=synthetic"))[2:]
        p = train_parser()
        args = p.parse_intermixed_args(argv)
        load_config(args.config, [*args.overrides, *data_overrides(args, p)])
