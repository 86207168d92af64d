"""A run folder, a checkpoint, shards and a diffusers folder are data, never code; an output never clobbers.

Each attack is real: a crafted pickle that creates a marker file when unpickled, a config whose data is a
`pipe:` command that creates one, a tar with hostile member names and a pickled sidecar. Each test checks
that the marker is absent (and, where it cannot harm, that the payload does create it when run the unsafe
way, so the test would notice a broken attack)."""

import json
import os
import pickle
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from support import TINY, one_line_error

from vae_scale.cli import main as cli_main
from vae_scale.config import load_config
from vae_scale.formats.checkpoint import (
    DamagedCheckpoint,
    latest_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from vae_scale.formats.safe_dcp import (
    SafePlanner,
    SafeReader,
    UnsafeCheckpoint,
    check_dcp_folder,
    read_metadata,
)
from vae_scale.train.trainer import train

SYNTHETIC = [*TINY, "data.train=synthetic", "checkpoint.every=2", "optim.ema_decay=0.5"]


class Payload:
    """Unpickled, it creates `marker` (through the shell, as an attacker's command would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run with EMA and two checkpoints (steps 2 and 4), never modified by the tests."""
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    train(load_config(None, [*SYNTHETIC, f"run.dir={run_dir}", "train.steps=4"]))
    return run_dir


@pytest.fixture
def copy_of(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# --------------------------------------------------------------------------------------------------------
# 1. A checkpoint's optimizer state (torch.distributed.checkpoint) runs no code


def plant_in_metadata(ckpt: Path, marker: Path, manifest: bool) -> bytes:
    """Replace the checkpoint's real DCP .metadata by itself plus a payload (planner_data, which DCP keeps
    as it is), then recompute the manifest as an attacker can, or remove it. Returns the crafted bytes."""
    meta = read_metadata(ckpt / "optimizer")
    meta.planner_data = {"x": Payload(marker)}
    data = pickle.dumps(meta)
    (ckpt / "optimizer" / ".metadata").write_bytes(data)
    if manifest:
        write_manifest(ckpt)
    else:
        (ckpt / "manifest.json").unlink()
    return data


@pytest.mark.parametrize("manifest", ["recomputed", "removed"])
def test_a_pickle_planted_in_dcp_metadata_never_runs_and_resume_falls_back(
    copy_of, tmp_path, capsys, caplog, manifest
):
    marker = tmp_path / "pwned"
    newest = latest_checkpoint(copy_of)
    assert newest.name == "step-000000004"
    crafted = plant_in_metadata(newest, marker, manifest == "recomputed")
    args = [*SYNTHETIC, f"run.dir={copy_of}", "train.steps=6"]

    # The dry-run names the refused file and says where the run would resume from.
    assert cli_main(["train", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "resume         from" in out and "step-000000002, passing over 1 damaged" in out, out
    assert "optimizer/.metadata" in caplog.text and "refused posix.system" in caplog.text, caplog.text
    assert not marker.exists()

    caplog.clear()
    result = train(load_config(None, args))
    assert result["step"] == 6 and not marker.exists()
    assert "skipping a damaged checkpoint" in caplog.text and ".metadata" in caplog.text
    assert "step-000000002 at step 2" in capsys.readouterr().out  # "resumed from ... at step 2"
    # The refused checkpoint was moved aside, not deleted.
    assert list(copy_of.glob("checkpoints/set-aside-*/step-000000004/optimizer/.metadata"))

    # The payload is live: unpickled the way torch.distributed.checkpoint's own reader does, it runs.
    pickle.loads(crafted)
    assert marker.exists()


def test_every_checkpoint_damaged_by_a_planted_pickle_stops_with_one_line(copy_of, tmp_path, capsys):
    marker = tmp_path / "pwned"
    for ckpt in sorted(copy_of.glob("checkpoints/step-*")):
        plant_in_metadata(ckpt, marker, manifest=True)
    args = ["train", *SYNTHETIC, f"run.dir={copy_of}", "train.steps=6"]
    for dry in ([], ["--dry-run"]):
        capsys.readouterr()
        assert cli_main([*args, *dry]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "no intact checkpoint to resume from" in last and ".metadata" in last, err
        assert "Traceback" not in err and not marker.exists()
    with pytest.raises(DamagedCheckpoint, match=r"optimizer/\.metadata .*refused posix\.system"):
        verify_checkpoint(latest_checkpoint(copy_of))


def test_optimizer_state_without_its_metadata_is_damaged(copy_of):
    """Without .metadata, DCP falls back to per-rank metadata files: a checkpoint that lacks it is passed
    over like any damaged one rather than read another way."""
    newest = latest_checkpoint(copy_of)
    (newest / "optimizer" / ".metadata").unlink()
    write_manifest(newest)
    with pytest.raises(DamagedCheckpoint, match=r"optimizer/\.metadata is missing"):
        verify_checkpoint(newest)


def test_a_pickle_in_a_non_tensor_optimizer_value_is_refused(tmp_path):
    """DCP stores non-tensor values (param_groups: lr, betas) as pickles in the .distcp files and its default
    planner loads them with weights_only=False; ours loads them as weights only."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    folder = tmp_path / "optimizer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"vae": {"lr": torch.zeros(2), "param_groups": Payload(marker)}}, checkpoint_id=str(folder))
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpoint, match=r"__0_0\.distcp: the value of vae\.param_groups"):
        check_dcp_folder(folder)
    state = {"vae": {"lr": torch.ones(2), "param_groups": None}}
    with pytest.raises(BaseException, match="Unsupported global|posix.system|weights_only"):
        dcp.load(state, storage_reader=SafeReader(folder), planner=SafePlanner(), no_dist=True)
    assert not marker.exists()
    # DCP's own planner would run it.
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    assert marker.exists()


# --------------------------------------------------------------------------------------------------------
# 2. A run folder's config.yaml never makes a command run the shell


def plant_command(config: Path, marker: Path) -> str:
    """Set data.train and data.val of a saved config.yaml to a pipe: that creates `marker`."""
    import yaml

    command = f"pipe:touch {marker}; cat /dev/null"
    saved = yaml.safe_load(config.read_text())
    saved["data"]["train"] = saved["data"]["val"] = command
    config.write_text(yaml.safe_dump(saved))
    return command


def test_inference_commands_refuse_a_pipe_from_a_checkpoint_config(copy_of, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = latest_checkpoint(copy_of)
    command = plant_command(ckpt / "config.yaml", marker)
    write_manifest(ckpt)  # as an attacker with write access can
    r = ["--run", str(copy_of)]
    for argv in (
        ["export", *r, "--out", str(tmp_path / "exported")],
        ["eval", *r, "--n", "4", "--metrics", "psnr"],
        ["encode", *r, "--n", "4", "--out", str(tmp_path / "latents")],
    ):
        assert cli_main(argv) == 2, argv
        one_line_error(capsys, "data.", f"{ckpt}/config.yaml", "shell command", "--data")
        assert not marker.exists(), argv
    # An export that reads no data does not need it.
    assert cli_main(["export", *r, "--out", str(tmp_path / "stats-free"), "--no-stats"]) == 0
    assert not marker.exists()
    # Typed on the command line, the same command is the user's: it runs (so the payload is live).
    cli_main(["eval", *r, "--n", "4", "--metrics", "psnr", "--data", command])
    assert marker.exists()


def test_train_refuses_a_pipe_from_a_run_folders_config_unless_typed(copy_of, tmp_path, capsys):
    from vae_scale.train.startup import check_config_commands

    marker = tmp_path / "pwned"
    saved = copy_of / "config.yaml"
    plant_command(saved, marker)
    assert cli_main(["train", "--config", str(saved), "--dry-run"]) == 2
    one_line_error(capsys, "data.train", str(saved), "shell command", "on the command line")
    # data.val is read by in-loop evaluation: refused when that is on.
    train_typed = ["train", "--dry-run", "--config", str(saved), f"run.dir={copy_of}", "data.train=synthetic"]
    assert cli_main([*train_typed, "eval.every=2"]) == 2
    one_line_error(capsys, "data.val", str(saved))
    assert not marker.exists()
    # Typed: the saved file's commands are not used.
    assert cli_main(train_typed) == 0
    assert not marker.exists()
    # A YAML of the user's own, outside any run folder, may hold a command: the user named that file.
    own = tmp_path / "mine" / "config.yaml"
    own.parent.mkdir()
    shutil.copy(saved, own)
    check_config_commands(str(own), load_config(str(own)), set())


# --------------------------------------------------------------------------------------------------------
# 3. encode copies no hostile member name and no pickled sidecar


def png_bytes(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)  # as written: tarfile keeps "../" and a leading "/"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_encode_skips_hostile_member_names_and_leaves_pickled_sidecars_out(run, tmp_path, capsys):
    import webdataset as wds

    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(marker))
    shard = tmp_path / "src" / "hostile-000000.tar"
    shard.parent.mkdir()
    write_tar(
        shard,
        [
            ("../../../escape.png", png_bytes(0)),
            ("/abs/escape.png", png_bytes(1)),
            ("good.png", png_bytes(2)),
            ("good.txt", b"a caption"),
            ("good.json", b'{"width": 40}'),
            ("good.pickle", evil),
            ("good.pyd", evil),
            ("good.meta.pth", evil),
        ],
    )
    with tarfile.open(shard) as tar:  # the hostile names really are in the source
        assert {"../../../escape.png", "/abs/escape.png"} <= set(tar.getnames())
    out = tmp_path / "latents"
    argv = ["encode", "--run", str(run), "--data", str(shard), "--out", str(out), "--resolution", "32"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 latents" in printed and "unsafe_key 2" in printed, printed
    assert "left out 3 sidecars" in printed and ".pickle 1" in printed and ".pyd 1" in printed, printed

    names = [n for tar in out.glob("*.tar") for n in tarfile.open(tar).getnames()]
    assert sorted(names) == ["good.json", "good.latent.json", "good.safetensors", "good.txt"], names
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == {"unsafe_key": 2}
    assert index["sidecars_left_out"] == {"pickle": 1, "pyd": 1, "meta.pth": 1}
    assert not list(tmp_path.rglob("escape*")) and not Path("/abs").exists()

    # What a diffusion trainer does with the latents: webdataset decodes every member it finds.
    urls = sorted(str(p) for p in out.glob("*.tar"))
    (sample,) = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert sample["txt"] == "a caption" and sample["json"] == {"width": 40}
    assert not marker.exists()
    # The sidecar left out was live: webdataset's decoder runs it.
    source = wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False)
    list(source.decode(handler=wds.ignore_and_continue))  # .meta.pth is no torch file: that sample fails
    assert marker.exists()


# --------------------------------------------------------------------------------------------------------
# 4. Outputs never clobber


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_export_refuses_a_non_empty_folder_and_overwriting_removes_stale_variants_and_stats(
    run, tmp_path, capsys
):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    out = tmp_path / "exported"
    old_ckpt = run / "checkpoints" / "step-000000002"
    # An earlier export, with measured statistics, whose weights were also saved as the fp16 variant.
    assert cli_main(["export", "--ckpt", str(old_ckpt), "--out", str(out), "--n", "8"]) == 0
    shutil.copy(out / "diffusion_pytorch_model.safetensors", out / "diffusion_pytorch_model.fp16.safetensors")
    assert (out / "latent_statistics.json").is_file()
    before = tree(out)
    capsys.readouterr()

    newer = ["export", "--run", str(run), "--out", str(out), "--no-stats"]
    assert cli_main(newer) == 2
    one_line_error(capsys, str(out), "not empty", "--overwrite")
    assert tree(out) == before
    # The stale variant is what from_pretrained(variant="fp16") loads: the old weights.
    new_weights = load_file(latest_checkpoint(run) / "vae.safetensors")
    stale = AutoencoderKL.from_pretrained(out, variant="fp16")
    assert not torch.equal(
        stale.state_dict()["decoder.conv_out.weight"], new_weights["decoder.conv_out.weight"]
    )

    assert cli_main([*newer, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "diffusion_pytorch_model.fp16.safetensors, latent_statistics.json" in printed, printed
    assert sorted(tree(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = AutoencoderKL.from_pretrained(out)
    assert torch.equal(loaded.state_dict()["decoder.conv_out.weight"], new_weights["decoder.conv_out.weight"])
    with pytest.raises(OSError, match="fp16"):  # no variant left to load stale weights from
        AutoencoderKL.from_pretrained(out, variant="fp16")


def test_export_never_writes_over_the_folder_it_reads(tmp_path, capsys):
    from support import tiny_diffusers_vae

    source = tmp_path / "sd-vae"
    tiny_diffusers_vae(source)
    before = tree(source)
    for extra in ([], ["--overwrite"]):
        assert cli_main(["export", "--ckpt", str(source), "--out", str(source), "--no-stats", *extra]) == 2
        one_line_error(capsys, "is the folder being read")
        single = ["--format", "safetensors", "--out", str(source / "diffusion_pytorch_model.safetensors")]
        assert cli_main(["export", "--ckpt", str(source), *single, *extra]) == 2
        one_line_error(capsys, "in the folder being read")
    assert tree(source) == before


def test_encode_sample_compare_and_shards_refuse_to_replace_their_output(run, tmp_path, capsys):
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "latents-000-000009.tar").write_bytes(b"an earlier encode's shard")
    (latents / "notes.txt").write_text("mine")
    encode = ["encode", "--run", str(run), "--data", "synthetic", "--n", "4", "--out", str(latents)]
    assert cli_main(encode) == 2
    one_line_error(capsys, str(latents), "not empty", "--overwrite")
    assert cli_main([*encode, "--overwrite"]) == 0
    # the earlier shard (it would mix in) is gone, the user's file is not
    assert sorted(p.name for p in latents.iterdir()) == ["index.json", "latents-000-000000.tar", "notes.txt"]
    capsys.readouterr()  # the progress bar

    grid = tmp_path / "grid.png"
    grid.write_bytes(b"an earlier grid")
    sample = ["sample", "--run", str(run), "--n", "4", "--out", str(grid)]
    assert cli_main(sample) == 2
    one_line_error(capsys, str(grid), "exists", "--overwrite")
    assert grid.read_bytes() == b"an earlier grid"
    assert cli_main([*sample, "--overwrite"]) == 0 and grid.read_bytes().startswith(b"\x89PNG")

    # compare: never over a run's own files, whatever the flags
    for extra in ([], ["--overwrite"]):
        assert cli_main(["compare", str(run), "--out", str(run / "metrics.jsonl"), *extra]) == 2
        one_line_error(capsys, "metrics.jsonl", "the file being read")

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-000000.tar").write_bytes(b"earlier shards")
    assert cli_main(["shards", "sample", str(shards), "--size", "32", "--quiet", "--workers", "1"]) == 2
    one_line_error(capsys, str(shards), "not empty", "--overwrite")
    assert (shards / "train-000000.tar").read_bytes() == b"earlier shards"
