"""sample / reconstruct / encode write what they promise; export loads in diffusers; import starts a run."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from support import TINY, accelerate_launch, photo_like_shards, tiny_config
from support import run as run_process

from vae_scale.cli.export import export_main, import_main
from vae_scale.cli.generate import encode_main, reconstruct_main, sample_main
from vae_scale.commands.common import iter_batches
from vae_scale.commands.export import ExportError
from vae_scale.commands.generate import read_latent
from vae_scale.config import ConfigError, load_config
from vae_scale.formats.weights import WeightsError, load_init_weights
from vae_scale.models.sd import VAE
from vae_scale.train.trainer import train

# On TINY, its attention block kept (export maps those weights too): a faster learning rate, a log line
# every 5 steps.
GEN_RUN = ["model.mid_block_attention=true", "optim.lr=2e-3", "log.every=5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, shards): a tiny VAE with EMA trained briefly on real shards of generated images."""
    root = tmp_path_factory.mktemp("gen")
    shards = photo_like_shards(root, 48, ((40, 36), (40, 42), (40, 48)), max_per_shard=10, val_fraction=0.25)
    run_dir = root / "run"
    train(
        tiny_config(run_dir, shards, *GEN_RUN, "train.steps=6", "checkpoint.every=0", "optim.ema_decay=0.5")
    )
    return run_dir, shards


def val_images(shards: Path) -> torch.Tensor:
    batches = iter_batches(str(shards), split="val", resolution=32, batch_size=8)
    return torch.cat([b["images"] for b in batches])


# --------------------------------------------------------------------------------------------------------
# export / import


@pytest.mark.numerics
def test_export_loads_in_diffusers_decodes_the_same_and_normalises_held_out_latents(run, tmp_path, capsys):
    from diffusers import AutoencoderKL

    run_dir, shards = run
    out = tmp_path / "exported"
    assert export_main(["--run", str(run_dir), "--out", str(out), "--data", str(shards), "--n", "64"]) == 0
    assert "scaling_factor" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    stats = json.loads((out / "latent_statistics.json").read_text())
    assert stats["samples"] == 36 and stats["latent"] == "posterior mean"  # all 36 training images (< 64)
    # the same float64 numbers through JSON: equal but for the last digit of 1 / std
    assert config["scaling_factor"] == pytest.approx(1 / stats["std"])
    assert config["shift_factor"] == pytest.approx(stats["mean"])
    assert len(config["latents_mean"]) == len(config["latents_std"]) == 4
    assert config["sample_size"] == 32

    ours = VAE.from_checkpoint(run_dir).eval()
    theirs = AutoencoderKL.from_pretrained(out).eval()
    assert theirs.config.scaling_factor == pytest.approx(config["scaling_factor"])
    assert theirs.config.shift_factor == pytest.approx(config["shift_factor"])
    x = val_images(shards)
    assert len(x) == 12
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mean
        # Guards weights exported to the wrong place or from the wrong copy: O(1e-2) or more. Our GroupNorm
        # sums in another order than diffusers' (~1e-6 of values ~1 after ~20 layers): atol 1e-4 (was 1e-5).
        assert torch.allclose(z, ours.encode(x).mode(), atol=1e-4)
        assert torch.allclose(theirs.decode(z).sample, ours.decode(z), atol=1e-4)
    # What a FLUX/SD3-style pipeline feeds its diffusion model: unit std on held-out images. Statistical
    # bounds (12 held-out images against 36 measured): a missing shift or scale is off by x2 or more, and
    # rounding (~1e-6) is nothing beside the sampling spread.
    scaled = (z - theirs.config.shift_factor) * theirs.config.scaling_factor
    assert abs(scaled.std().item() - 1) < 0.05
    assert abs(scaled.mean().item()) < 0.2

    # SD style (no shift) and no per-channel statistics, EMA weights.
    sd_style = tmp_path / "sd-style"
    export_main(
        [
            "--run",
            str(run_dir),
            "--out",
            str(sd_style),
            "--data",
            str(shards),
            "--n",
            "16",
            "--ema",
            "--no-shift",
            "--no-channel-stats",
        ]
    )
    config = json.loads((sd_style / "config.json").read_text())
    assert config["shift_factor"] is None and config["latents_mean"] is None and config["latents_std"] is None
    ema = VAE.from_checkpoint(run_dir, ema=True)
    exported = VAE.from_diffusers(sd_style)
    for (k, a), b in zip(ema.state_dict().items(), exported.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_export_safetensors_is_the_single_file_layout_diffusers_converts_back(run, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    run_dir, shards = run
    out = tmp_path / "vae.safetensors"
    export_main(
        [
            "--run",
            str(run_dir),
            "--out",
            str(out),
            "--format",
            "safetensors",
            "--data",
            str(shards),
            "--n",
            "8",
        ]
    )
    sd = load_file(out)
    assert "encoder.down.0.block.0.conv1.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert sd["encoder.mid.attn_1.q.weight"].ndim == 4  # attention as 1x1 convs, as latent diffusion has it
    with safe_open(str(out), "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config["scaling_factor"] > 0 and config["block_out_channels"] == [8, 16]
    ours = VAE.from_checkpoint(run_dir).state_dict()
    back = convert_ldm_vae_checkpoint(sd, config)
    assert back.keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(back[k], v), k


def test_import_starts_a_run_from_a_diffusers_folder(run, tmp_path, capsys):
    run_dir, shards = run
    src = tmp_path / "src-vae"
    VAE.from_checkpoint(run_dir).save_diffusers(src)
    new = tmp_path / "runs" / "ft"
    argv = ["--diffusers", str(src), "--out", str(new), "optim.lr=1e-5", "loss.disc_weight=0.5"]
    assert import_main(argv) == 0
    printed = capsys.readouterr().out
    assert "the discriminator is freshly initialised" in printed and "loss.disc_weight=0.5" in printed
    cfg = load_config(str(new / "config.yaml"))
    assert cfg.run.dir == str(new) and cfg.optim.lr == 1e-5 and cfg.loss.disc_weight == 0.5
    assert cfg.model.block_out_channels == [8, 16] and cfg.model.latent_channels == 4
    assert Path(cfg.model.init_from) == (new / "init" / "vae.safetensors").resolve()
    source = VAE.from_diffusers(src).state_dict()
    for init_from in (cfg.model.init_from, str(src)):  # the run's copy, or a diffusers folder directly
        fresh = VAE(cfg.model)
        load_init_weights(fresh, init_from)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, source[k]), k

    with pytest.raises(ExportError, match="--force"):
        import_main(["--diffusers", str(src), "--out", str(new)])
    with pytest.raises(ConfigError, match="model.latent_channels comes from"):
        import_main(["--diffusers", str(src), "--out", str(tmp_path / "other"), "model.latent_channels=8"])
    with pytest.raises(FileNotFoundError, match="missing-vae"):
        import_main(["--diffusers", str(tmp_path / "missing-vae"), "--out", str(tmp_path / "x")])
    wrong = VAE(load_config(None, [*TINY, *GEN_RUN, "model.latent_channels=8"]).model)
    with pytest.raises(WeightsError, match="model.init_from"):
        load_init_weights(wrong, cfg.model.init_from)
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        load_init_weights(wrong, str(tmp_path / "nothing.safetensors"))


# --------------------------------------------------------------------------------------------------------
# sample / reconstruct / encode


def test_sample_writes_a_grid_of_n_images(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "grid.png"
    assert (
        sample_main(
            ["--run", str(run_dir), "--n", "5", "--nrow", "3", "--temperature", "0.7", "--out", str(out)]
        )
        == 0
    )
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns, 2 rows of 32 px with 2 px gaps
    again = tmp_path / "again.png"
    sample_main(
        ["--run", str(run_dir), "--n", "5", "--nrow", "3", "--temperature", "0.7", "--out", str(again)]
    )
    # seeded, bit-identical: both runs in this process, on one kernel path
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_reconstruct_writes_input_and_reconstruction_side_by_side(run, tmp_path, capsys):
    run_dir, _ = run
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    out = tmp_path / "recon"
    assert (
        reconstruct_main(["--run", str(run_dir), str(folder), str(tmp_path / "b.jpg"), "--out", str(out)])
        == 0
    )
    a = np.asarray(Image.open(out / "a.png"))
    assert a.shape == (36 + 4, 2 * (50 + 2) + 2, 3)  # cropped to even sizes (f2), two panels
    assert np.array_equal(a[2:38, 2:52], np.asarray(Image.open(folder / "a.png"))[0:36])  # input, as is
    assert Image.open(out / "b.png").size == (2 * 42 + 2, 44)
    assert "mean PSNR" in capsys.readouterr().out
    reconstruct_main(
        ["--run", str(run_dir), str(folder / "a.png"), "--resolution", "16", "--out", str(out / "r")]
    )
    assert Image.open(out / "r" / "a.png").size == (2 * 18 + 2, 20)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        reconstruct_main(["--run", str(run_dir), str(tmp_path / "nope.png"), "--out", str(tmp_path / "new")])


def read_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every latent shard in a folder, read with webdataset's tar reader."""
    import webdataset as wds

    urls = sorted(str(p) for p in folder.glob("latents-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def source_keys(shards: Path, split: str) -> set[str]:
    keys = set()
    for tar in shards.glob(f"{split}-*.tar"):
        with tarfile.open(tar) as t:
            keys |= {m.name.split(".")[0] for m in t if m.name.endswith(".png")}
    return keys


@pytest.mark.numerics
def test_encode_writes_latent_shards_keyed_like_the_source(run, tmp_path):
    run_dir, shards = run
    out = tmp_path / "latents"
    assert (
        encode_main(
            [
                "--run",
                str(run_dir),
                "--data",
                str(shards),
                "--out",
                str(out),
                "--shard-size",
                "10",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 36 and len(index["splits"]["train"]["shards"]) == 4
    assert index["latent"]["shape"] == [4, 16, 16] and index["latent"]["kind"] == "posterior mean"
    samples = read_shards(out)
    assert set(samples) == source_keys(shards, "train")
    vae = VAE.from_checkpoint(run_dir).eval()
    batch = next(iter_batches(str(shards), split="train", resolution=32, batch_size=4))
    with torch.no_grad():
        want = vae.encode(batch["images"]).mode()
    for full_key, z in zip(batch["keys"], want, strict=True):
        url, key = full_key.rsplit("#", 1)
        got = read_latent(samples[key]["safetensors"], "safetensors")
        # Guards another image's latent, a sample for the mean, float16 storage (4.9e-4 relative). The
        # command encodes in other batches (conv kernels chosen per shape: ~1e-6 relative after the
        # encoder): rtol 1e-4, atol 1e-5 (were 1e-5, 1e-6).
        assert torch.allclose(got, z, rtol=1e-4, atol=1e-5)
        assert json.loads(samples[key]["latent.json"])["source"] == url
        assert json.loads(samples[key]["json"])["source"].endswith(".png")  # the source's sidecar, kept

    npy = tmp_path / "npy"
    encode_main(
        [
            "--run",
            str(run_dir),
            "--data",
            str(shards),
            "--split",
            "val",
            "--out",
            str(npy),
            "--format",
            "npy",
            "--dtype",
            "float16",
            "--sample",
            "--workers",
            "0",
        ]
    )
    samples = read_shards(npy)
    assert set(samples) == source_keys(shards, "val")
    z = read_latent(next(iter(samples.values()))["npy"], "npy")
    assert z.dtype == torch.float16 and z.shape == (4, 16, 16)


def test_encode_with_two_processes_writes_every_sample_once(run, tmp_path):
    run_dir, shards = run
    out = tmp_path / "latents"
    code = "import sys; from vae_scale.cli.generate import encode_main; sys.exit(encode_main(sys.argv[1:]))"
    script = tmp_path / "encode.py"
    script.write_text(code)
    args = ["--run", str(run_dir), "--data", str(shards), "--out", str(out), "--workers", "0"]
    run_process(accelerate_launch("cpu-2proc.yaml", 2, args, program=(str(script),)), timeout=240)
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["splits"]["train"]["shards"]) == ["latents-000-000000.tar", "latents-001-000000.tar"]
    assert index["splits"]["train"]["samples"] == 36
    assert set(read_shards(out)) == source_keys(shards, "train")
