"""Fine-tuning an imported diffusers VAE: export keeps the imported latent contract unless asked not to."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_scale.config import load_config
from vae_scale.export import export_main, import_main
from vae_scale.model import VAE
from vae_scale.shards import write_shards
from vae_scale.train import train

SMALL_RUN = [
    "data.resolution=32",
    "data.batch_size=4",
    "data.workers=0",
    "optim.lr=2e-3",
    "train.steps=3",
    "checkpoint.every=0",
    "log.wandb=disabled",
    "log.every=1",
    "log.images_every=0",
]


def tiny_diffusers_vae(folder: Path, **config) -> dict:
    """A random-weight diffusers AutoencoderKL (f2, 4 latent channels) saved with save_pretrained; its
    config.json as a dict."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kwargs = {
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        **config,
    }
    AutoencoderKL(**kwargs).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def photo_folder(folder: Path, n: int, sizes=((40, 48), (48, 40), (44, 44))) -> Path:
    """n smooth, noisy RGB images of a few sizes (w, h), as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 2) + yy * (4 - c) + 15 * i) % 256 for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"photo{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft-data")
    src = photo_folder(root / "photos", 20)
    write_shards(str(src), root / "shards", image_format="png", val_fraction=0.2, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def sdxl_style(tmp_path_factory, shards) -> tuple[Path, dict, Path]:
    """(diffusers folder, its config.json, run folder): an SDXL-style contract (per-channel statistics, no
    upcast, its own sample_size) imported and fine-tuned for 3 steps."""
    root = tmp_path_factory.mktemp("ft-sdxl")
    src = root / "vae"
    contract = tiny_diffusers_vae(
        src,
        scaling_factor=0.13025,
        sample_size=96,
        force_upcast=False,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.1, 0.9, 1.0, 1.2],
    )
    run = root / "run"
    assert import_main(["--diffusers", str(src), "--out", str(run), *SMALL_RUN, f"data.train={shards}"]) == 0
    train(load_config(str(run / "config.yaml")))
    return src, contract, run


def test_export_of_an_imported_fine_tune_keeps_its_config_json_and_loads_in_diffusers(
    sdxl_style, shards, tmp_path, capsys
):
    from diffusers import AutoencoderKL

    src, contract, run = sdxl_style
    capsys.readouterr()
    out = tmp_path / "exported"
    assert export_main(["--run", str(run), "--out", str(out), "--n", "8"]) == 0
    printed = capsys.readouterr().out
    assert json.loads((out / "config.json").read_text()) == contract  # key for key, version string included

    stats = json.loads((out / "latent_statistics.json").read_text())
    assert stats["samples"] == 8
    assert "scaling_factor 0.13025" in printed and "sample_size 96" in printed
    assert f"scaling_factor {1 / stats['std']:.6g}" in printed and "--measure-latents" in printed

    theirs = AutoencoderKL.from_pretrained(out).eval()
    original = AutoencoderKL.from_pretrained(src).eval()
    ours = VAE.from_checkpoint(run).eval()
    assert theirs.config.scaling_factor == 0.13025 and theirs.config.force_upcast is False
    changed = [k for k, v in theirs.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert changed, "the fine-tune changed no weight"
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs.decode(z).sample, ours.decode(z), atol=1e-5)


def test_measure_latents_writes_the_measured_statistics_and_keeps_the_rest(sdxl_style, tmp_path, capsys):
    _, contract, run = sdxl_style
    out = tmp_path / "measured"
    export_main(["--run", str(run), "--out", str(out), "--n", "8", "--measure-latents", "--no-channel-stats"])
    config = json.loads((out / "config.json").read_text())
    stats = json.loads((out / "latent_statistics.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1 / stats["std"])
    assert config["shift_factor"] == pytest.approx(stats["mean"])
    assert config["latents_mean"] is None and config["latents_std"] is None
    measured = {"scaling_factor", "shift_factor", "latents_mean", "latents_std"}
    assert {k: v for k, v in config.items() if k not in measured} == {
        k: v for k, v in contract.items() if k not in measured
    }  # sample_size, force_upcast, ... as imported
    assert "measured on 8 samples" in capsys.readouterr().out


def test_export_flags_that_contradict_the_kept_contract_are_usage_errors(sdxl_style, tmp_path, capsys):
    from vae_scale.cli import main

    _, contract, run = sdxl_style
    for flags in (["--no-shift"], ["--no-channel-stats"], ["--measure-latents", "--no-stats"]):
        assert main(["export", "--run", str(run), "--out", str(tmp_path / "x"), *flags]) == 2
        assert "--measure-latents" in capsys.readouterr().err
    # --no-stats: nothing measured, nothing advised, the contract written as it is
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "plain"), "--no-stats"]) == 0
    assert json.loads((tmp_path / "plain" / "config.json").read_text()) == contract
    assert not (tmp_path / "plain" / "latent_statistics.json").exists()


def test_a_diffusers_folder_exported_as_is_keeps_its_contract_without_data(sdxl_style, tmp_path, capsys):
    src, contract, _ = sdxl_style
    out = tmp_path / "copy"
    assert export_main(["--ckpt", str(src), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text()) == contract
    assert "not measured" in capsys.readouterr().out  # no data to measure on: said, and the export done


def test_a_run_from_scratch_still_exports_measured_statistics(shards, tmp_path):
    run = tmp_path / "scratch"
    tiny = ["model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=4"]
    train(load_config(None, [*tiny, *SMALL_RUN, f"run.dir={run}", f"data.train={shards}"]))
    out = tmp_path / "exported"
    export_main(["--run", str(run), "--out", str(out), "--n", "8"])
    config = json.loads((out / "config.json").read_text())
    stats = json.loads((out / "latent_statistics.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1 / stats["std"])
    assert config["sample_size"] == 32  # the training resolution
