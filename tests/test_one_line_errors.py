"""Mistakes and bad inputs that once ended in a traceback, a late failure or a wrong result, each now met at
the start with one line that names the offending thing (or, for W&B without a network, an offline run that
says so): damaged and non-finite weights, a run that cannot fit in memory, another run's lock seen by the
dry run, a `latest` pointer that leads elsewhere, a symlinked caption, overrides after flags, a comma in a
data path, a run name that is not a folder name."""

import logging
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from support import ROOT, TINY, tiny_diffusers_vae, tiny_vae, write_photo_like_images

from vae_scale.cli import main
from vae_scale.config import load_config
from vae_scale.data.shard_reader import DataError, expand_shards
from vae_scale.data.shards import write_shards
from vae_scale.formats.checkpoint import MARKER, checkpoint_name, latest_checkpoint
from vae_scale.formats.weights import WEIGHTS_NAME, WeightsError
from vae_scale.models.sd import VAE


def one_line(capsys, *names: str) -> str:
    """The command's stderr, which must be one line (no traceback) naming each of `names`."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


# --------------------------------------------------------------------------------------------------------
# Weights: truncated files, non-finite values


@pytest.fixture
def diffusers_vae(tmp_path) -> Path:
    folder = tmp_path / "vae"
    tiny_diffusers_vae(folder)
    return folder


def test_a_truncated_diffusers_safetensors_is_named_on_import_export_and_eval(
    diffusers_vae, tmp_path, capsys
):
    weights = diffusers_vae / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(WeightsError, match=WEIGHTS_NAME):
        VAE.from_diffusers(diffusers_vae)
    commands = [
        ["import", "--diffusers", str(diffusers_vae), "--out", str(tmp_path / "run")],
        ["export", "--ckpt", str(diffusers_vae), "--out", str(tmp_path / "out"), "--no-stats"],
        ["eval", "--ckpt", str(diffusers_vae), "--data", "synthetic", "--max-batches", "1"],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        one_line(capsys, str(weights), "truncated")
    assert not (tmp_path / "run").exists()
    assert not any((tmp_path / "out").rglob("*"))  # no half-written export


def test_non_finite_weights_are_refused_on_import_naming_the_tensor(diffusers_vae, tmp_path, capsys):
    weights = diffusers_vae / WEIGHTS_NAME
    sd = load_file(weights)
    name = "decoder.conv_out.bias"
    sd[name][1] = float("nan")
    save_file(sd, weights)
    assert main(["import", "--diffusers", str(diffusers_vae), "--out", str(tmp_path / "run")]) == 2
    one_line(capsys, name, "non-finite", str(diffusers_vae))
    assert not (tmp_path / "run").exists()


def test_non_finite_init_from_weights_stop_the_run_naming_the_tensor(tmp_path, capsys):
    sd = tiny_vae(0, "model.mid_block_attention=true").state_dict()
    name = "encoder.conv_in.weight"
    sd[name] = sd[name].clone()
    sd[name][0, 0, 0, 0] = float("inf")
    save_file(sd, tmp_path / "init.safetensors")
    argv = ["train", *TINY, "data.train=synthetic", f"run.dir={tmp_path / 'run'}", "train.steps=1"]
    assert main([*argv, f"model.init_from={tmp_path / 'init.safetensors'}"]) == 2
    err = one_line(capsys, "model.init_from", name)
    assert "learning" not in err and "LR" not in err  # the weights are to blame, not the learning rate


# --------------------------------------------------------------------------------------------------------
# What the dry run now sees: memory beyond the host's, another run's lock


def test_the_dry_run_refuses_a_run_larger_than_the_host_memory(tmp_path, caplog):
    from vae_scale.train.preflight import host_memory_available

    # sd-f8 at 1024 px with 64 images per step needs terabytes; no test machine has that much free.
    argv = ["train", "--config", "sd-f8", "--resolution", "1024", "--batch-size", "64", "--dry-run"]
    argv += [
        "data.train=synthetic",
        "data.workers=0",
        "train.mixed_precision=no",
        f"run.dir={tmp_path / 'r'}",
    ]
    assert host_memory_available() is not None  # Linux: MemAvailable is always there
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    (err,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # one line, no more
    assert "\n" not in err and "GiB per process does not fit the" in err and "host memory free" in err
    for remedy in ("model.gradient_checkpointing=true", "data.batch_size=32", "data.resolution=512"):
        assert remedy in err, (remedy, err)
    assert not (tmp_path / "r").exists()


LOCK_HOLDER = """
import sys, time
from vae_scale.formats.checkpoint import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_the_dry_run_reports_a_folder_another_run_holds(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["train", *TINY, "data.train=synthetic", f"run.dir={run}", "--dry-run"]
        assert main(argv) == 2
        one_line(capsys, "in use by another run", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone, the same dry run passes: the check took no lock of its own.
    assert main(argv) == 0


# --------------------------------------------------------------------------------------------------------
# W&B online without a network


def test_wandb_reachability_is_bounded_even_when_name_resolution_hangs(monkeypatch):
    from vae_scale.train.checks import wandb_unreachable

    def hang(*args, **kwargs):
        time.sleep(30)
        raise socket.gaierror("never answered")

    monkeypatch.setattr(socket, "getaddrinfo", hang)  # a resolver that never answers, as on a cut-off node
    t0 = time.monotonic()
    why = wandb_unreachable(timeout_s=0.5)
    # 0.5 s of waiting plus a thread start; 5 s leaves room for a loaded machine and is far below 30 s.
    assert time.monotonic() - t0 < 5
    assert "did not answer within 0.5 s" in why


def test_wandb_online_without_a_network_logs_offline_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key that passes the login check; never sent
    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    run = tmp_path / "run"
    argv = ["train", *TINY, "data.train=synthetic", f"run.dir={run}", "train.steps=2", "log.wandb=online"]
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vae_scale.train.checks"):
        assert main(argv) == 0
    assert time.monotonic() - t0 < 300  # nothing waited on the network (W&B's own retries would be minutes)
    warning = next(r.getMessage() for r in caplog.records if "W&B cannot be reached" in r.getMessage())
    assert f"127.0.0.1:{port}" in warning and "wandb sync" in warning
    assert "wandb: offline" in (run / "config.yaml").read_text()
    assert list((run / "wandb").glob("offline-run-*"))


# --------------------------------------------------------------------------------------------------------
# Run folders: `latest` that leads elsewhere


def _fake_checkpoint(run: Path, step: int) -> Path:
    path = run / "checkpoints" / checkpoint_name(step)
    path.mkdir(parents=True)
    (path / MARKER).write_text("")
    return path


@pytest.mark.parametrize("pointer", ["../../victim/checkpoints/{name}", "{victim}/checkpoints/{name}", ".."])
def test_latest_pointing_outside_the_run_is_refused_and_the_run_scanned(tmp_path, caplog, pointer):
    ours = _fake_checkpoint(tmp_path / "run", 4)
    theirs = _fake_checkpoint(tmp_path / "victim", 9)
    text = pointer.format(name=theirs.name, victim=tmp_path / "victim")
    (tmp_path / "run" / "checkpoints" / "latest").write_text(text + "\n")
    with caplog.at_level(logging.WARNING, logger="vae_scale.formats.checkpoint"):
        assert latest_checkpoint(tmp_path / "run") == ours
    assert any("not a checkpoint of this run" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_that_is_a_link_elsewhere_is_not_this_runs(tmp_path):
    ours = _fake_checkpoint(tmp_path / "run", 4)
    theirs = _fake_checkpoint(tmp_path / "victim", 9)
    (ours.parent / checkpoint_name(10)).symlink_to(theirs)  # a name that looks like ours, leading elsewhere
    (ours.parent / "latest").write_text(checkpoint_name(10) + "\n")
    from vae_scale.formats.checkpoint import checkpoints_newest_first

    assert latest_checkpoint(tmp_path / "run") != ours.parent / checkpoint_name(10)
    assert checkpoints_newest_first(ours.parent)[0] != ours.parent / checkpoint_name(10)


# --------------------------------------------------------------------------------------------------------
# Shards: a caption that is a symbolic link


def test_a_symlinked_caption_is_not_followed_and_is_counted(tmp_path, caplog):
    src = write_photo_like_images(tmp_path / "photos", 3)
    secret = tmp_path / "secret.txt"
    secret.write_text("the password")
    (src / "img00.txt").symlink_to(secret)
    (src / "img01.txt").write_text("a real caption")
    with caplog.at_level(logging.WARNING, logger="vae_scale.data.shards"):
        index = write_shards(str(src), tmp_path / "shards", val_fraction=0, progress=False)
    assert index["totals"]["symlinked_captions"] == 1 and index["totals"]["captions"] == 1
    assert any("symbolic link" in r.getMessage() and "img00.txt" in r.getMessage() for r in caplog.records)
    texts = []
    for tar in (tmp_path / "shards").glob("train-*.tar"):
        with tarfile.open(tar) as t:
            texts += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".txt")]
    assert texts == [b"a real caption"]


# --------------------------------------------------------------------------------------------------------
# The command line: overrides after flags, commas in paths, run names


def test_overrides_may_follow_flags_in_any_order(tmp_path):
    run = tmp_path / "run"
    rest = [o for o in TINY if not o.startswith(("data.resolution=", "data.workers="))]
    argv = [
        "train",
        "--resolution",
        "32",
        *rest[:3],
        "train.steps=2",
        "--workers",
        "0",
        "data.train=synthetic",
    ]
    argv += [*rest[3:], f"run.dir={run}", "checkpoint.every=0"]
    assert main(argv) == 0
    saved = load_config(str(run / "config.yaml"))
    assert saved.train.steps == 2 and saved.data.resolution == 32 and saved.data.workers == 0
    assert latest_checkpoint(run).name == checkpoint_name(2)


def test_config_command_takes_overrides_around_its_flag(capsys):
    assert main(["config", "train.steps=3", "--config", "demo", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "lr: 0.5" in out


def test_an_escaped_comma_belongs_to_the_data_path(tmp_path):
    folder = tmp_path / "a,b"
    folder.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        tarfile.open(folder / name, "w").close()
    one = str(folder / "train-000000.tar").replace(",", "\\,")
    assert expand_shards(one) == [str(folder / "train-000000.tar")]
    # In a list, and inside a brace group (where braceexpand reads the escape itself).
    two = f"{one},{one.replace('000000', '000001')}"
    assert expand_shards(two) == [str(folder / n) for n in ("train-000000.tar", "train-000001.tar")]
    braces = str(tmp_path / "{a\\,b,a\\,b}" / "train-000000.tar")
    assert expand_shards(braces) == [str(folder / "train-000000.tar")] * 2
    with pytest.raises(DataError, match=r"shard .*/a does not exist|does not exist"):
        expand_shards(str(folder / "train-000000.tar"))  # unescaped: two paths, neither exists


@pytest.mark.parametrize("name", ["", " ", ".", "..", "a/b", "../elsewhere"])
def test_a_run_name_that_is_not_a_folder_name_is_a_usage_error(name, capsys):
    assert main(["config", f"run.name={name}"]) == 2
    one_line(capsys, "run.name")


def test_ordinary_run_names_still_work():
    assert load_config(None, ["run.name=sd ft 2"]).run.dir == "runs/sd ft 2"
