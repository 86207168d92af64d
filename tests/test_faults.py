"""Faults around the run folder and the commands' outputs: damaged checkpoints, wrong or unwritable output
places, two runs on one folder. Each ends in one clear line (exit 2) and loses nothing."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from support import ROOT, TINY, env, nonfinite_train_command, one_line_error

from vae_scale.cli import main as cli_main
from vae_scale.config import load_config
from vae_scale.formats.checkpoint import (
    DamagedCheckpoint,
    complete_checkpoints,
    latest_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from vae_scale.models.sd import VAE
from vae_scale.train.report import read_metrics
from vae_scale.train.trainer import train

SYNTHETIC = [*TINY, "data.train=synthetic"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run with EMA and two checkpoints (steps 2 and 4), never modified by the tests."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    train(
        load_config(
            None,
            [*SYNTHETIC, f"run.dir={run_dir}", "train.steps=4", "checkpoint.every=2", "optim.ema_decay=0.5"],
        )
    )
    return run_dir


@pytest.fixture
def copy_of(run, tmp_path) -> Path:
    """A copy of the run folder this test may damage."""
    return Path(shutil.copytree(run, tmp_path / "run"))


# --------------------------------------------------------------------------------------------------------
# Manifests


def test_the_manifest_covers_every_file_at_any_depth_and_names_the_damaged_one(tmp_path):
    ckpt = tmp_path / "step-000000010"
    (ckpt / "extra").mkdir(parents=True)  # not optimizer/: that is read as DCP state too
    files = {
        "vae.safetensors": os.urandom(5000),
        "extra/__0_0.distcp": os.urandom(3000),
        "extra/__1_0.distcp": os.urandom(3000),
        "extra/.metadata": b"meta",
        "trainer_state.json": b"{}",
    }
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
    write_manifest(ckpt)
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert set(listed) == set(files) and listed["vae.safetensors"]["bytes"] == 5000
    verify_checkpoint(ckpt)

    shard = ckpt / "extra/__1_0.distcp"
    shard.write_bytes(files["extra/__1_0.distcp"][:1000])  # truncated
    with pytest.raises(DamagedCheckpoint, match=r"__1_0\.distcp has 1000 bytes, its manifest says 3000"):
        verify_checkpoint(ckpt)
    verify_checkpoint(ckpt, ["vae.safetensors"])  # a file not asked about is not read
    flipped = bytearray(files["extra/__1_0.distcp"])
    flipped[1234] ^= 0x01  # same size, one bit off
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DamagedCheckpoint, match=r"__1_0\.distcp does not match its checksum"):
        verify_checkpoint(ckpt)
    shard.unlink()
    with pytest.raises(DamagedCheckpoint, match=r"__1_0\.distcp is missing"):
        verify_checkpoint(ckpt)


def test_every_saved_checkpoint_has_a_manifest_of_all_its_files(run):
    for ckpt in complete_checkpoints(run / "checkpoints"):
        listed = set(json.loads((ckpt / "manifest.json").read_text())["files"])
        on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
        assert listed == on_disk - {"manifest.json", "COMPLETE"}
        # The weights once, the optimizer state as torch.distributed.checkpoint writes it, accelerate's RNG
        # state, the trainer's and the rank's state, the config.
        layout = {"vae.safetensors", "ema.safetensors", "optimizer/.metadata", "random_states_0.pkl"}
        assert layout | {"trainer_state.json", "rank-0.json", "config.yaml"} <= listed
        assert any(name.startswith("optimizer/") and name.endswith(".distcp") for name in listed)
        verify_checkpoint(ckpt)


# --------------------------------------------------------------------------------------------------------
# Damaged checkpoints in the inference commands


def _commands(run_dir: Path, tmp: Path) -> dict[str, list[str]]:
    r = ["--run", str(run_dir)]
    return {
        "eval": ["eval", *r, "--data", "synthetic", "--n", "8", "--metrics", "psnr"],
        "export": ["export", *r, "--out", str(tmp / "exported"), "--no-stats"],
        "sample": ["sample", *r, "--n", "4", "--out", str(tmp / "grid.png")],
        "reconstruct": ["reconstruct", *r, str(ROOT / "README.md"), "--out", str(tmp / "recon")],
        "encode": ["encode", *r, "--data", "synthetic", "--n", "8", "--out", str(tmp / "latents")],
    }


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_checkpoint_is_one_line_from_every_command(copy_of, tmp_path, capsys, damage):
    newest = latest_checkpoint(copy_of)
    weights = newest / "vae.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    for name, argv in _commands(copy_of, tmp_path).items():
        assert cli_main(argv) == 2, name
        err = one_line_error(capsys, "vae.safetensors", newest.name)
        assert "step-000000002" in err, err  # the previous complete one, to use instead
    assert not (tmp_path / "exported" / "config.json").exists()
    # --ema reads ema.safetensors, which is intact: it works.
    assert (
        cli_main(["sample", "--run", str(copy_of), "--ema", "--n", "4", "--out", str(tmp_path / "e.png")])
        == 0
    )


def test_a_damaged_checkpoint_without_a_manifest_is_still_one_line(copy_of, tmp_path, capsys):
    newest = latest_checkpoint(copy_of)
    (newest / "manifest.json").unlink()
    (newest / "ema.safetensors").write_bytes((newest / "ema.safetensors").read_bytes()[:300])
    assert (
        cli_main(["sample", "--run", str(copy_of), "--ema", "--n", "4", "--out", str(tmp_path / "g.png")])
        == 2
    )
    one_line_error(capsys, "ema.safetensors", "cannot be read")


# --------------------------------------------------------------------------------------------------------
# Output places


def test_wrong_output_places_are_one_line_before_any_work(run, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    r = ["--run", str(run)]
    cases = {
        "train run.dir": ["train", *SYNTHETIC, f"run.dir={a_file}"],
        "train run.dir below a file": ["train", *SYNTHETIC, f"run.dir={a_file}/run"],
        "reconstruct": ["reconstruct", *r, str(ROOT / "README.md"), "--out", str(a_file)],
        "encode": ["encode", *r, "--data", "synthetic", "--out", str(a_file)],
        "shards": ["shards", "sample", str(a_file)],
        "export": ["export", *r, "--out", str(a_file), "--no-stats"],
        "eval --out a folder": ["eval", *r, "--data", "synthetic", "--out", str(tmp_path)],
        "sample --out a folder": ["sample", *r, "--out", str(tmp_path)],
    }
    for what, argv in cases.items():
        assert cli_main(argv) == 2, what
        one_line_error(capsys, str(a_file) if "folder" not in what else str(tmp_path))
    assert a_file.read_text() == "not a folder"


def test_eval_never_overwrites_its_out_silently_and_checks_the_resolution(run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    out.write_text("earlier results")
    argv = [
        "eval",
        "--run",
        str(run),
        "--data",
        "synthetic",
        "--n",
        "8",
        "--metrics",
        "psnr",
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 2
    one_line_error(capsys, str(out), "--overwrite")
    assert out.read_text() == "earlier results"
    assert cli_main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["metrics"]["samples"] == 8
    capsys.readouterr()
    assert cli_main(["eval", "--run", str(run), "--data", "synthetic", "--n", "8", "--resolution", "31"]) == 2
    one_line_error(capsys, "--resolution=31", "downsampling 2")


# The probes run in a child process without CAP_DAC_OVERRIDE (or as the non-root user the suite runs as),
# so that a folder's permission bits apply as they do for a user: CI runs as root.
READ_ONLY_PROBES = """
    import contextlib, io, json, os, sys
    from pathlib import Path
    from vae_scale.cli import main
    ro = Path(sys.argv[1])
    try:
        (ro / "probe").write_text("x")
        print(json.dumps({"setup": "the read-only folder is writable: the capability drop did not work"}))
        sys.exit(0)
    except PermissionError:
        pass
    results = {}
    for name, argv in json.loads(sys.argv[2]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        results[name] = [rc, err.getvalue()]
    print(json.dumps(results))
"""


def _can_drop_capabilities() -> bool:
    """Whether this process may take capabilities out of its bounding set (CAP_SETPCAP is effective)."""
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    return bool(cap_eff & (1 << 8))  # CAP_SETPCAP


def _drop_dac_override() -> None:
    """preexec_fn: as root, lose the capabilities that ignore file permissions, for the exec'd program."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, out of the bounding set
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_output_places_are_found_at_start(run, tmp_path):
    if os.geteuid() == 0 and not _can_drop_capabilities():
        pytest.skip("root without CAP_SETPCAP: CAP_DAC_OVERRIDE cannot be dropped, so no folder is read-only")
    ro = tmp_path / "read-only"
    ro.mkdir()
    run_in_ro = tmp_path / "checkpoints-read-only"
    (run_in_ro / "checkpoints").mkdir(parents=True)
    r = ["--run", str(run)]
    cases = {
        "run.dir": ["train", *SYNTHETIC, f"run.dir={ro}"],
        "run.dir's checkpoints/": ["train", *SYNTHETIC, f"run.dir={run_in_ro}"],
        "reconstruct --out": ["reconstruct", *r, str(ROOT / "README.md"), "--out", str(ro)],
        "encode --out": ["encode", *r, "--data", "synthetic", "--out", str(ro / "latents")],
        "shards OUT": ["shards", "sample", str(ro)],
        "eval --out": ["eval", *r, "--data", "synthetic", "--out", str(ro / "eval.json")],
        "sample --out": ["sample", *r, "--n", "4", "--out", str(ro / "grid.png")],
        "export --out": ["export", *r, "--out", str(ro / "exported"), "--no-stats"],
    }
    for p in (ro, run_in_ro / "checkpoints"):
        p.chmod(0o555)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(READ_ONLY_PROBES), str(ro), json.dumps(cases)],
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_drop_dac_override,
        )
    finally:
        for p in (ro, run_in_ro / "checkpoints"):
            p.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "setup" not in results, results["setup"]
    for name, (rc, err) in results.items():
        lines = [line for line in err.strip().splitlines() if line.startswith("vae-scale")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (name, rc, err)
        assert "not writable" in lines[0], (name, lines[0])
    assert "checkpoints" in results["run.dir's checkpoints/"][1]
    assert not any(ro.iterdir()) and not (run_in_ro / "config.yaml").exists()


# --------------------------------------------------------------------------------------------------------
# Two runs on one folder


def test_a_second_run_on_a_folder_in_use_stops_at_once_naming_the_first(tmp_path, capsys):
    # The first run is a process of its own (it holds the lock, then dies holding it); the later ones run
    # in this process.
    run_dir = tmp_path / "run"
    argv = ["train", *SYNTHETIC, f"run.dir={run_dir}", "checkpoint.every=0"]
    first = subprocess.Popen(
        [sys.executable, "-m", "vae_scale", *argv, "train.steps=100000"],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while len(read_metrics(run_dir)) < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        capsys.readouterr()
        assert cli_main([*argv, "train.steps=5"]) == 2
        one_line_error(capsys, f"pid {first.pid} on host {socket.gethostname()}", str(run_dir))
        assert "steps: 100000" in (run_dir / "config.yaml").read_text()  # the first run's, untouched
        # The first run goes on undisturbed: every step logged once, in order.
        steps_before = len(read_metrics(run_dir))
        while len(read_metrics(run_dir)) < steps_before + 2 and time.time() < deadline:
            time.sleep(0.05)
        first.kill()  # dies holding the lock: the lock must not outlive it
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    logged = [r["step"] for r in read_metrics(run_dir)]
    assert logged == list(range(1, len(logged) + 1))
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == first.pid  # its leftover note
    assert cli_main([*argv, "train.steps=2"]) == 0
    assert latest_checkpoint(run_dir).name == "step-000000002"
    weights = VAE.from_checkpoint(run_dir).state_dict().values()
    assert torch.isfinite(torch.cat([t.flatten() for t in weights])).all()


# --------------------------------------------------------------------------------------------------------
# Rollback on two processes


@pytest.mark.slow
def test_two_processes_roll_back_together_and_stop_together_when_rollbacks_run_out(tmp_path):
    # Step 3 is non-finite on rank 1 only, each time it is taken: both ranks skip it, roll back to step 2
    # together, take it again, and stop together at train.max_rollbacks=1; neither rank is left waiting.
    run_dir = tmp_path / "run"
    args = [
        *SYNTHETIC,
        f"run.dir={run_dir}",
        "train.steps=10",
        "checkpoint.every=1",
        "train.max_consecutive_skips=1",
        "train.max_rollbacks=1",
    ]
    proc = subprocess.run(
        nonfinite_train_command(args, step=2, rank=1, nproc=2),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.count("rolled back to step-000000002") == 1
    # The first rank to stop ends the launch (torchrun then ends the other and prints its own report).
    stops = [line for line in proc.stderr.splitlines() if "train.max_rollbacks=1" in line]
    assert stops and all("at step 3" in line and "LR scale 0.5" in line for line in stops), stops
    assert f'File "{ROOT / "vae_scale"}' not in proc.stderr  # no traceback through the trainer's code
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step-000000002"  # the healthy one; step 3 was never saved
    ranks = [json.loads((ckpt / f"rank-{r}.json").read_text())["weights_fingerprint"] for r in (0, 1)]
    assert ranks[0] == ranks[1]
    verify_checkpoint(ckpt)
