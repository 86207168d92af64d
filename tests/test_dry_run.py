"""`vae-scale train --dry-run` and what a run says on the console: every failure that would come at step N
is found before step 1, the plan is printed, nothing is written; a real run prints a line per checkpoint
and per evaluation, and a summary at the end."""

import re

from support import TINY, write_photo_like_images

from vae_scale.cli import main as cli_main
from vae_scale.shards import write_shards


def _train(run_dir, *extra):
    return ["train", *TINY, "data.train=synthetic", f"run.dir={run_dir}", *extra]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "new"
    assert cli_main([*_train(run_dir, "train.steps=5"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("processes", "batch", "precision", "parallel", "parameters", "memory/process", "data"):
        assert re.search(rf"^{line}\s", out, re.M), line
    assert "dry run: every check passed" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_names_every_missing_thing_at_once(tmp_path, capsys, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # An earlier in-process run leaves wandb's settings offline, where login asks for no key; a fresh
    # process (what the check is for) starts without them.
    wandb.teardown()
    monkeypatch.setenv("HOME", str(tmp_path))  # no W&B login on this machine
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached VGG16 / Inception
    write_photo_like_images(tmp_path / "photos", 4)
    write_shards(str(tmp_path / "photos"), tmp_path / "shards", size=32, val_fraction=0.0, progress=False)
    run_dir = tmp_path / "run"
    argv = _train(
        run_dir,
        "eval.every=2",
        f"data.val={tmp_path / 'shards'}",  # train shards only: no val samples
        "log.wandb=online",
        "loss.perceptual_weight=1",
        "eval.metrics=[psnr,rfid]",
    )
    assert cli_main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s) found before step 1" in err
    assert "data.val" in err and "WANDB_API_KEY" in err and "loss.lpips_path" in err and "rfid" in err
    assert "Traceback" not in err and not run_dir.exists()
    # The same checks stop a real run before its first step, with nothing written.
    assert cli_main(argv) == 2
    assert "4 problem(s)" in capsys.readouterr().err and not run_dir.exists()


def test_dry_run_refuses_a_checkpoint_of_another_model_and_an_unwritable_place(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli_main(_train(run_dir, "train.steps=2", "checkpoint.every=0")) == 0
    config = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    wider = _train(run_dir, "train.steps=4", "model.block_out_channels=[16,32]")
    assert cli_main([*wider, "--dry-run"]) == 2
    assert "model.block_out_channels [8, 16] -> [16, 32]" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == config
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert cli_main([*_train(a_file, "train.steps=2"), "--dry-run"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_run_says_each_checkpoint_and_evaluation_and_sums_up(tmp_path, capsys):
    write_photo_like_images(tmp_path / "photos", 8)
    write_shards(str(tmp_path / "photos"), tmp_path / "shards", size=32, val_fraction=0.25, progress=False)
    run_dir = tmp_path / "run"
    argv = [
        "train",
        *TINY,
        f"data.train={tmp_path / 'shards'}",
        f"data.val={tmp_path / 'shards'}",
        f"run.dir={run_dir}",
        "train.steps=4",
        "checkpoint.every=2",
        "eval.every=2",
        "eval.metrics=[psnr,kl]",
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    out, summary = out[: out.index("\ndone ")], out[out.index("\ndone ") :]
    saved = re.findall(r"^checkpoint  step (\d+) -> (\S+) \([\d.]+ [MG]iB\)$", out, re.M)
    assert [s for s, _ in saved] == ["2", "4"]
    assert all((run_dir / "checkpoints").samefile(p.rsplit("/", 1)[0]) for _, p in saved)
    evals = re.findall(r"^eval        step (\d+): psnr ([\d.]+), kl ([\d.]+)$", out, re.M)
    assert [s for s, *_ in evals] == ["2", "4"]
    assert re.search(r"^done        step 4 of 4 in [\d.]+ min$", summary, re.M)
    assert re.search(r"^losses      loss [\d.e+-]+, rec [\d.e+-]+, kl [\d.e+-]+$", summary, re.M)
    assert f"eval        step 4: psnr {evals[-1][1]}" in summary
    assert f"report      {run_dir / 'report.html'}" in summary and (run_dir / "report.html").is_file()
    assert f"checkpoint  {run_dir / 'checkpoints' / 'step-000000004'}" in summary
