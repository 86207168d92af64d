"""The trainer end to end on CPU: real shards, real checkpoints, real processes where processes matter."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file
from support import (
    TINY,
    assert_same_training,
    checkpoint_file,
    env,
    initial_weights,
    nonfinite_train_command,
    photo_like_shards,
    run,
    start,
    tiny_config,
    train_command,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

from vae_scale.cli import main as cli_main
from vae_scale.formats.checkpoint import complete_checkpoints, latest_checkpoint
from vae_scale.models.sd import VAE
from vae_scale.train.report import read_metrics
from vae_scale.train.trainer import TrainingStopped, train

# The runs here write reconstructions on the way (every 4 steps), as a real run does.
IMAGES = "log.images_every=4"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Real shards from 24 generated photographs-like images (smooth gradients plus noise)."""
    return photo_like_shards(tmp_path_factory.mktemp("shards"), 24, max_per_shard=7, val_fraction=0.2)


def tiny_cfg(run_dir: Path, data, *extra: str):
    """support.tiny_config with reconstructions written every 4 steps."""
    return tiny_config(run_dir, data, IMAGES, *extra)


def test_a_run_writes_checkpoints_metrics_images_and_report(tmp_path, shards):
    cfg = tiny_cfg(
        tmp_path / "run",
        shards,
        "train.steps=8",
        "checkpoint.every=3",
        "checkpoint.keep=2",
        "optim.ema_decay=0.9",
        "optim.warmup_steps=2",
        "optim.schedule=cosine",
        f"data.val={shards}",
        "eval.every=4",
        "eval.metrics=[psnr,kl]",
    )
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["step"] == 8
    names = [p.name for p in complete_checkpoints(run / "checkpoints")]
    assert names == ["step-000000006", "step-000000008"]  # keep=2 rotated step 3 away
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000000008"
    rows = read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val/psnr" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert [r["step"] for r in val_rows] == [4, 8]
    index = json.loads((shards / "index.json").read_text())
    assert val_rows[-1]["val/samples"] == index["splits"]["val"]["samples"]  # every val image, once
    assert 5 < val_rows[-1]["val/psnr"] < 60 and val_rows[-1]["val/kl"] > 0
    rows = train_rows
    for key in (
        "loss",
        "rec",
        "kl",
        "grad_norm",
        "lr",
        "images_per_s",
        "active_units",
        "kl_channel/0",
        "data/samples",
        "skipped_steps",
        "data_wait_fraction",
    ):
        assert key in rows[-1], key
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[-1]["lr"] < 1e-3  # warm-up, then cosine
    assert rows[-1]["data/samples"] == 8 * 4
    assert (run / "images" / "reconstruction-000000008.png").is_file()
    report = (run / "report.html").read_text()
    assert "reconstruction-000000008.png" in report and "<svg" in report and "latent_channels: 4" in report
    assert (run / "config.yaml").is_file()
    # The library API reads the run back, EMA included, and they differ.
    vae, ema = VAE.from_checkpoint(run), VAE.from_checkpoint(run, ema=True)
    assert vae.config.latent_channels == 4
    diff = sum((a - b).abs().sum() for a, b in zip(vae.state_dict().values(), ema.state_dict().values()))
    assert diff > 0


def test_discriminator_and_learned_likelihood_train_together(tmp_path):
    cfg = tiny_config(
        tmp_path / "gan",
        "synthetic",
        "train.steps=5",
        "checkpoint.every=0",
        "loss.recon=gaussian",
        "loss.disc_weight=0.5",
        "loss.disc_start=2",
        "loss.disc_layers=2",
    )
    train(cfg)
    rows = read_metrics(tmp_path / "gan")
    assert all("d_loss" not in r for r in rows[:2])  # the discriminator starts at step 2
    late = rows[2:]
    assert all(r["d_loss"] > 0 and r["disc_factor"] == 1 for r in late)
    assert any(r["d_weight"] != 0.5 for r in late)  # adaptive, not the fallback
    assert len({r["logvar"] for r in rows}) > 1  # the Gaussian log-variance is learned
    saved = load_file(latest_checkpoint(tmp_path / "gan") / "loss.safetensors")["logvar"]
    # Kept for bits/dim after training: the value after the last step (one Adam step, <= ~lr, past the log).
    assert saved.item() != 0.0 and saved.item() == pytest.approx(rows[-1]["logvar"], abs=2e-3)
    assert all(np.isfinite(r["bits_per_dim"]) for r in rows)


def test_bad_config_values_stop_before_training_naming_the_key(tmp_path, capsys):
    argv = ["train", "--config", "demo", f"run.dir={tmp_path / 'r'}", "data.train=synthetic"]
    assert cli_main(argv + ["optim.lr=-1"]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err
    assert cli_main(argv + ["data.resolution=66"]) == 2
    assert "data.resolution=66" in capsys.readouterr().err
    assert cli_main(["train", "--config", "demo", f"run.dir={tmp_path / 'r'}"]) == 2
    assert "data.train is empty" in capsys.readouterr().err
    assert cli_main(argv[:-1] + [f"data.train={tmp_path}/missing-{{000..003}}.tar"]) == 2
    assert "missing-000.tar" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------------
# Processes


@pytest.mark.slow
@pytest.mark.numerics
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    common = [
        *TINY,
        "data.train=synthetic",
        "train.sample_posterior=false",
        "train.steps=4",
        "checkpoint.every=0",
    ]
    run(train_command([*common, f"run.dir={tmp_path / 'two'}", "data.batch_size=2", "checkpoint.every=2"], 2))
    run(train_command([*common, f"run.dir={tmp_path / 'one'}", "data.batch_size=4"]))
    two, one = checkpoint_file(tmp_path / "two"), checkpoint_file(tmp_path / "one")
    # Both ranks finished with the same weights (each rank records a fingerprint of its own copy).
    ranks = [json.loads((latest_checkpoint(tmp_path / "two") / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["data"]["position"] for r in ranks] == [4, 4]
    assert ranks[0]["weights_fingerprint"] == ranks[1]["weights_fingerprint"]
    # Two processes all-reduce what one process sums: the same gradients up to the order of fp32 sums,
    # which support.SAME_TRAINING tells from a micro-batch missing or a gradient not reduced.
    assert_same_training(two, one, initial_weights(common)["vae"], "vae")


SIGNAL_RUN = [*TINY, IMAGES, "data.workers=2", "train.steps=12", "checkpoint.every=0", "optim.ema_decay=0.5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards) -> Path:
    """An uninterrupted run of SIGNAL_RUN: what every interrupted and resumed run must equal, bit for bit."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run(train_command([*SIGNAL_RUN, f"data.train={shards}", f"run.dir={run_dir}"]))
    return run_dir


def interrupt(args: list[str], run_dir: Path, sig: signal.Signals, target: str) -> tuple[str, str, int]:
    """Start a run in a process group of its own, signal it once 4 steps are logged; (stdout, stderr,
    returncode). target: "group" (the trainer and its loader workers, as Ctrl-C, `timeout` and SLURM do)
    or "trainer" (its pid only)."""
    proc = start(train_command([*args, f"run.dir={run_dir}"]))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(r["step"] >= 4 for r in read_metrics(run_dir)):
            time.sleep(0.02)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2, "the loader workers are not running"  # data.workers=2, in the group
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    return out, err, proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, target",
    [(signal.SIGTERM, "group"), (signal.SIGINT, "group"), (signal.SIGUSR1, "trainer")],
    ids=["SIGTERM-group", "SIGINT-group (Ctrl-C)", "SIGUSR1-trainer"],
)
def test_a_stop_signal_saves_one_checkpoint_and_the_rerun_is_bit_identical(
    tmp_path, shards, straight, sig, target
):
    args = [*SIGNAL_RUN, f"data.train={shards}"]
    interrupted = tmp_path / "interrupted"
    out, err, rc = interrupt(args, interrupted, sig, target)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err
    saved = complete_checkpoints(interrupted / "checkpoints")
    assert len(saved) == 1, saved  # one checkpoint, written at the stop
    stopped_at = int(saved[0].name.split("-")[1])
    assert 4 <= stopped_at < 12
    assert f"stopped by {sig.name} at step {stopped_at}; checkpoint saved" in out
    run(train_command([*args, f"run.dir={interrupted}"]))
    assert latest_checkpoint(interrupted).name == "step-000000012"
    for file in ("vae.safetensors", "ema.safetensors"):
        a, b = checkpoint_file(straight, file), checkpoint_file(interrupted, file)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (file, name)


def test_a_signal_during_a_step_stops_the_run_at_the_end_of_that_step(tmp_path):
    # The signal arrives inside the third optimizer step, after the ranks' agreement of that step: the
    # run must still stop once that step is done, not after the next one.
    steps_taken = []

    def signal_in_step_3(optimizer, args, kwargs):
        steps_taken.append(1)
        if len(steps_taken) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's stop flag while train() runs

    handle = register_optimizer_step_post_hook(signal_in_step_3)
    try:
        summary = train(tiny_cfg(tmp_path / "run", "synthetic", "train.steps=10", "checkpoint.every=0"))
    finally:
        handle.remove()
    assert summary["stopped_by"] == "SIGTERM"
    assert summary["step"] == 3 and len(steps_taken) == 3
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000000003"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_the_time_budget_stops_the_run_with_a_checkpoint(tmp_path):
    cfg = tiny_cfg(
        tmp_path / "run", "synthetic", "train.steps=100000", "train.time_budget_s=1", "checkpoint.every=0"
    )
    summary = train(cfg)
    assert summary["stopped_by"] == "time budget" and 1 <= summary["step"] < 100000
    assert latest_checkpoint(tmp_path / "run").name == f"step-{summary['step']:09d}"
    assert read_metrics(tmp_path / "run")[-1]["step"] == summary["step"]


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "data.train=synthetic",
        "train.steps=200",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        f"run.dir={run_dir}",
    ]
    proc = subprocess.Popen(train_command(args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = run_dir / "checkpoints"
    killed_mid_save = False
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (
            latest_checkpoint(run_dir) is not None
            and ckpt_dir.is_dir()
            and any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())
        ):
            proc.kill()
            proc.wait()
            killed_mid_save = any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())
            break
        time.sleep(0.0005)
    assert killed_mid_save, "the checkpoint writes were never caught in flight"
    previous = latest_checkpoint(run_dir)
    assert previous is not None
    VAE.from_checkpoint(run_dir)  # loadable
    step = int(previous.name.split("-")[1])
    run(
        train_command(
            [
                *TINY,
                "data.train=synthetic",
                f"train.steps={step + 2}",
                "checkpoint.every=1",
                f"run.dir={run_dir}",
            ]
        )
    )
    assert latest_checkpoint(run_dir).name == f"step-{step + 2:09d}"
    assert not any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())
    assert read_metrics(run_dir)[-1]["step"] == step + 2


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_is_skipped_on_all(tmp_path):
    run_dir = tmp_path / "run"
    run(
        nonfinite_train_command(
            [
                *TINY,
                "data.train=synthetic",
                "train.steps=5",
                "checkpoint.every=0",
                f"run.dir={run_dir}",
                "log.wandb=offline",
            ],
            step=2,
            rank=1,
            nproc=2,
        )
    )
    rows = read_metrics(run_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    for t in checkpoint_file(run_dir).values():
        assert torch.isfinite(t).all()
    # The W&B offline run folder holds the logged keys.
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1
    blob = wandb_files[0].read_bytes()
    for key in (b"skipped_steps", b"grad_norm", b"images_per_s", b"kl_channel/0"):
        assert key in blob, key
    assert (run_dir / "wandb_id").read_text().strip() in wandb_files[0].name


# --------------------------------------------------------------------------------------------------------
# Non-finite steps and rollback


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_non_finite_step_in_mixed_precision_changes_no_weight_and_is_left_out_of_the_averages(
    tmp_path, precision
):
    # On a CPU accelerate keeps no GradScaler for fp16: the skip must not hand NaN gradients to AdamW.
    # (A process of its own: accelerate's precision is fixed per process.)
    run(
        nonfinite_train_command(
            [
                *TINY,
                "data.train=synthetic",
                f"run.dir={tmp_path / 'run'}",
                "train.steps=3",
                "checkpoint.every=1",
                f"train.mixed_precision={precision}",
            ],
            step=1,
        )
    )
    ckpts = {int(p.name.split("-")[1]): p for p in complete_checkpoints(tmp_path / "run" / "checkpoints")}
    w = {step: load_file(p / "vae.safetensors") for step, p in ckpts.items()}
    for name in w[1]:
        assert torch.isfinite(w[3][name]).all(), name
        assert torch.equal(w[1][name], w[2][name]), name  # step 2 was skipped: no update
    assert any(not torch.equal(w[2][n], w[3][n]) for n in w[2])  # step 3 trained
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert "loss" not in rows[1] and "lr" not in rows[1] and rows[1]["images_per_s"] > 0
    assert np.isfinite(rows[2]["loss"]) and rows[2]["lr"] == pytest.approx(1e-3)
    healthy = [json.loads((ckpts[s] / "trainer_state.json").read_text())["healthy"] for s in (1, 2, 3)]
    assert healthy == [True, False, True]  # 2 was written after a skipped step


def test_a_diverging_run_rolls_back_to_the_last_healthy_checkpoint_a_bounded_number_of_times(
    tmp_path, capsys
):
    # optim.lr=1e3: step 1 is finite but ruins the weights, every later step is non-finite.
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(
        run_dir,
        "synthetic",
        "optim.lr=1e3",
        "train.steps=1000",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        "train.max_consecutive_skips=3",
        "train.max_rollbacks=2",
    )
    with pytest.raises(TrainingStopped) as e:
        train(cfg)
    message = str(e.value)
    for part in ("train.max_rollbacks=2", "at step 4", "LR scale 0.25", "(LR 250)", "optim.lr (now 1000)"):
        assert part in message, (part, message)
    out = capsys.readouterr().out
    assert out.count("rolled back to step-000000001") == 2
    # Step 1's checkpoint is the healthy one (rotation kept it though keep=2); the unhealthy ones written
    # after it were moved aside, not deleted, at each rollback.
    ckpt_dir = run_dir / "checkpoints"
    assert json.loads((ckpt_dir / "step-000000001" / "trainer_state.json").read_text())["healthy"]
    aside = sorted(ckpt_dir.glob("set-aside-*"))
    assert len(aside) == 2 and all(any(a.iterdir()) for a in aside)
    rows = read_metrics(run_dir)
    assert rows[0]["lr"] == 1000.0
    assert all("lr" not in r and "loss" not in r for r in rows[1:])  # no applied step after step 1
    assert all(r["images_per_s"] > 0 for r in rows) and [r["step"] for r in rows if r["step"] < 2] == [1]


def test_a_signal_during_repeated_rollbacks_still_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "data.train=synthetic",
        "train.steps=100000",
        "checkpoint.every=1",
        "train.max_consecutive_skips=1",
        "train.max_rollbacks=100000",
        f"run.dir={run_dir}",
    ]
    proc = start(nonfinite_train_command(args, step=2), new_session=False)  # step 3, each time it is taken
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(
            r.get("skipped_steps", 0) >= 3 for r in read_metrics(run_dir)
        ):
            time.sleep(0.02)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert out.count("rolled back to step-000000002") >= 2 and "stopped by SIGTERM" in out
    assert latest_checkpoint(run_dir).name in ("step-000000002", "step-000000003")


# --------------------------------------------------------------------------------------------------------
# Resuming


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "synthetic", "train.steps=3", "checkpoint.every=0"))
    caplog.set_level("INFO")
    train(tiny_cfg(run_dir, "synthetic", "train.steps=4", "checkpoint.every=0", "optim.ema_decay=0.9"))
    assert "the EMA starts from its weights" in caplog.text
    ckpt = run_dir / "checkpoints"
    w3, w4 = (
        load_file(ckpt / "step-000000003/vae.safetensors"),
        load_file(ckpt / "step-000000004/vae.safetensors"),
    )
    ema = load_file(ckpt / "step-000000004/ema.safetensors")
    for name, e in ema.items():  # one EMA update (decay 0.9) from the resumed weights
        torch.testing.assert_close(e, w3[name] + 0.1 * (w4[name] - w3[name]), rtol=1e-6, atol=1e-7, msg=name)


def test_resuming_with_another_model_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "synthetic", "train.steps=2", "checkpoint.every=1"))
    config = (run_dir / "config.yaml").read_bytes()
    argv = ["train", *TINY, IMAGES, "data.train=synthetic", f"run.dir={run_dir}", "train.steps=4"]
    wider = ["model.block_out_channels=[16,32]", "model.latent_channels=8"]
    capsys.readouterr()
    assert cli_main([*argv, *wider]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "model.block_out_channels [8, 16] -> [16, 32]" in err and "model.latent_channels 4 -> 8" in err
    assert "step-000000002" in err and "checkpoint.resume=never" in err
    # With the newest checkpoint's config.yaml damaged, the one a resume would fall back to is compared.
    (run_dir / "checkpoints" / "step-000000002" / "config.yaml").write_text("model: [")
    assert cli_main([*argv, *wider]) == 2
    assert "step-000000001 was trained with another model" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == config
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == [
        "step-000000001",
        "step-000000002",
    ]
    assert cli_main([*argv, *wider, "model.kernels=torch", "checkpoint.resume=never"]) == 0  # start afresh
    assert VAE.from_checkpoint(run_dir).config.latent_channels == 8
    (aside,) = (run_dir / "checkpoints").glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-000000001", "step-000000002"]  # not deleted


def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "synthetic", "train.steps=6", "checkpoint.every=2"))
    ckpt = run_dir / "checkpoints"
    newest = (ckpt / "step-000000006" / "vae.safetensors").read_bytes()
    caplog.set_level("WARNING")
    train(
        tiny_cfg(
            run_dir,
            "synthetic",
            "train.steps=4",
            "checkpoint.every=2",
            f"checkpoint.resume={ckpt}/step-000000002",
        )
    )
    assert "moved 2 checkpoint(s) (step-000000004, step-000000006)" in caplog.text
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step-000000002", "step-000000004"]
    (aside,) = ckpt.glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-000000004", "step-000000006"]
    assert (aside / "step-000000006" / "vae.safetensors").read_bytes() == newest
    assert latest_checkpoint(run_dir).name == "step-000000004"


def test_damaged_newest_checkpoints_are_named_and_the_previous_intact_one_resumed(tmp_path, caplog, capsys):
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "synthetic", "train.steps=6", "checkpoint.every=2"))
    ckpt = run_dir / "checkpoints"
    # What a resume reads: the weights, and the optimizer state (torch.distributed.checkpoint's files).
    for damaged in (
        ckpt / "step-000000006" / "vae.safetensors",
        ckpt / "step-000000004/optimizer/__0_0.distcp",
    ):
        damaged.write_bytes(damaged.read_bytes()[:1000])
    capsys.readouterr()
    caplog.set_level("WARNING")
    train(tiny_cfg(run_dir, "synthetic", "train.steps=4", "checkpoint.every=2"))
    assert "step-000000006: vae.safetensors has 1000 bytes" in caplog.text
    assert "step-000000004: optimizer/__0_0.distcp has 1000 bytes" in caplog.text
    assert f"resumed from {ckpt}/step-000000002 at step 2" in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step-000000002", "step-000000004"]
    assert torch.isfinite(torch.cat([t.flatten() for t in checkpoint_file(run_dir).values()])).all()
    (aside,) = ckpt.glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-000000004", "step-000000006"]  # kept
