"""`vae-scale train --dry-run` and what a run says on the console: every failure that would come at step N
is found before step 1, the plan is printed, nothing is written; a real run prints a line per checkpoint
and per evaluation, and a summary at the end."""

import io
import re
import tarfile

from support import TINY, write_photo_like_images

from vae_scale.cli import main as cli_main
from vae_scale.data.shards import write_shards
from vae_scale.train.report import read_metrics
from vae_scale.train.wrapping import CPU_CHANNELS_LAST


def _train(run_dir, *extra):
    return ["train", *TINY, "data.train=synthetic", f"run.dir={run_dir}", *extra]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "new"
    assert cli_main([*_train(run_dir, "train.steps=5"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = ("processes", "batch", "precision", "parallel", "layout", "parameters", "memory/process", "data")
    for line in lines:
        assert re.search(rf"^{line}\s", out, re.M), line
    # The layout model.channels_last=auto chose on this CPU, and why.
    layout = "channels_last \\(NHWC\\)" if CPU_CHANNELS_LAST else "NCHW"
    assert re.search(rf"^layout\s+{layout}: auto: .* on a cpu", out, re.M), out
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


def test_dry_run_reads_a_sample_and_a_keep_small_fine_tune_trains(tmp_path, capsys, caplog):
    from test_data_loader import keep_small_shards

    # 100 images in 4 shards, 20 of them 36x30, below the 40 px crop: the dry-run reads the 4 shards' first
    # 25 samples, every one of them, so its counts are the data's own.
    shards = keep_small_shards(tmp_path / "data")
    run_dir = tmp_path / "run"
    argv = ["train", *TINY, f"data.train={shards}", f"run.dir={run_dir}", "data.resolution=40"]
    assert cli_main([*argv, "train.steps=30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "data sample    data.train: 100 samples from 4 of 4 shards: 80 usable, 20 smaller than the 40 px "
        "crop (short sides 30-30 px; skipped and counted as data/too_small), 0 bad"
    ) in out
    assert not run_dir.exists()
    # The run itself trains past the loader's judgement at 100 samples (30 steps of 4, from 150 read): the
    # small images are counted, not bad.
    assert cli_main([*argv, "train.steps=30", "checkpoint.every=0"]) == 0
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 30 and last["data/bad"] == 0 and last["data/too_small"] >= 20
    assert "smaller than the 40 px crop" in caplog.text and "data.upscale_small=true" in caplog.text


def test_dry_run_refuses_data_with_nothing_usable_and_says_what_would_help(tmp_path, capsys):
    from test_data_loader import keep_small_shards

    shards = keep_small_shards(tmp_path / "data", n=8, small_every=1)  # every image 36x30
    run_dir = tmp_path / "run"
    argv = ["train", *TINY, f"data.train={shards}", f"run.dir={run_dir}", "data.resolution=40"]
    for dry in (["--dry-run"], []):
        assert cli_main([*argv, *dry]) == 2
        err = capsys.readouterr().err
        assert (
            "data.train: none of the 8 samples read from 4 of 4 shards is usable: 8 smaller than the 40 px"
            in err
        )
        assert "data.upscale_small=true" in err and "a data.resolution of at most 30 px" in err
        assert "Traceback" not in err and not run_dir.exists()
    assert cli_main([*argv, "data.upscale_small=true", "--dry-run"]) == 0
    assert "8 usable, 0 smaller than the 40 px crop, 0 bad" in capsys.readouterr().out

    # Undecodable members only: refused, naming the kind and the first one.
    garbage = tmp_path / "garbage.tar"
    with tarfile.open(garbage, "w") as tf:
        for i in range(3):
            info = tarfile.TarInfo(f"k{i}.jpg")
            info.size = 9
            tf.addfile(info, io.BytesIO(b"not a jpg"))
    assert cli_main(["train", *TINY, f"data.train={garbage}", f"run.dir={run_dir}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "none of the 3 samples read from 1 of 1 shards is usable: 3 bad, the first: undecodable in" in err
