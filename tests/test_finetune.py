"""Fine-tuning an imported diffusers VAE: export keeps the imported latent contract unless asked not to."""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import tiny_diffusers_vae, write_lpips_weights, write_photo_like_images

from vae_scale.cli.export import export_main, import_main
from vae_scale.config import load_config
from vae_scale.data.shards import write_shards
from vae_scale.models.sd import VAE
from vae_scale.train.trainer import train

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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft-data")
    src = write_photo_like_images(root / "photos", 20, ((40, 48), (48, 40), (44, 44)), prefix="photo")
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


@pytest.mark.numerics
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
        # Guards weights exported from the wrong copy or place: O(1e-2) or more. Our GroupNorm sums in
        # another order than diffusers' (~1e-6 of outputs ~1 after the decoder): atol 1e-4 (was 1e-5).
        assert torch.allclose(theirs.decode(z).sample, ours.decode(z), atol=1e-4)


def test_measure_latents_writes_the_measured_statistics_and_keeps_the_rest(sdxl_style, tmp_path, capsys):
    _, contract, run = sdxl_style
    out = tmp_path / "measured"
    export_main(["--run", str(run), "--out", str(out), "--n", "8", "--measure-latents", "--no-channel-stats"])
    config = json.loads((out / "config.json").read_text())
    stats = json.loads((out / "latent_statistics.json").read_text())
    # the same float64 numbers through JSON: equal but for the last digit of 1 / std
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


# --------------------------------------------------------------------------------------------------------
# The recipes and the walk-through in docs/finetune.md


def test_the_fine_tuning_recipes_resolve_with_latent_diffusions_loss():
    from vae_scale.cli import main

    for name, arch in (("sd-finetune", "sd-f8"), ("f8c16-finetune", "f8c16")):
        assert main(["config", "--config", name]) == 0
        cfg = load_config(name)
        loss = cfg.loss
        assert (loss.recon, loss.perceptual_weight, loss.kl_weight) == ("l1", 1.0, 1e-6)
        assert (loss.disc_weight, loss.disc_loss) == (0.5, "hinge") and loss.disc_start > 0
        assert cfg.optim.ema_decay == 0.9999 and cfg.optim.betas == [0.5, 0.9]
        assert not cfg.data.resize and cfg.data.resolution == 256
        assert "lpips" in cfg.eval.metrics
        ours, theirs = cfg.model, load_config(arch).model
        for key in ("block_out_channels", "latent_channels", "quant_convs", "scaling_factor", "shift_factor"):
            assert getattr(ours, key) == getattr(theirs, key), (name, key)


def read_tar_samples(folder: Path, pattern: str) -> dict[str, dict[str, bytes]]:
    import webdataset as wds

    urls = sorted(str(p) for p in folder.glob(pattern))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_the_docs_walkthrough_fine_tunes_a_diffusers_vae_end_to_end(tmp_path, capsys):
    """docs/finetune.md, "Fine-tune the SD VAE on your photos", step by step at a tiny scale: a random-weight
    diffusers AutoencoderKL stands in for the SD VAE, 36-72 px photos for the user's, and the recipe's
    schedule is shortened (4 steps, the discriminator from step 2, EMA 0.9)."""
    from diffusers import AutoencoderKL

    from vae_scale.cli import main

    # 1. the weights: the VAE to fine-tune and the LPIPS files
    sd_vae = tmp_path / "sd-vae-ft-mse"
    contract = tiny_diffusers_vae(sd_vae)
    lpips = write_lpips_weights(tmp_path / "weights" / "lpips")

    # 2. shards of the photos (one below --size, kept at its own size), captions beside some of them
    sizes = ((56, 48), (48, 64), (72, 40), (64, 44))
    photos = write_photo_like_images(tmp_path / "photos", 16, sizes, prefix="photo")
    Image.new("RGB", (38, 34), (90, 140, 200)).save(photos / "small.png")
    for i in range(0, 16, 2):
        (photos / f"photo{i:02d}.txt").write_text(f"a photo number {i}")
    data = tmp_path / "data" / "photos"
    argv = ["shards", str(photos), str(data), "--size", "40", "--keep-small", "--val-fraction", "0.25"]
    assert main([*argv, "--quiet", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 below --size kept at their own size" in printed and "8 with a .txt caption" in printed
    index = json.loads((data / "index.json").read_text())
    n_train, n_val = index["totals"]["train"], index["totals"]["val"]
    assert n_train + n_val == 17 and n_val >= 1

    # 3. import with the recipe
    run = tmp_path / "runs" / "sd-ft"
    tiny = [
        "data.resolution=32",
        "data.batch_size=4",
        "data.workers=0",
        "train.steps=4",
        "loss.disc_start=2",
        "optim.lr=2e-3",
        "optim.warmup_steps=0",
        "optim.ema_decay=0.9",
        "checkpoint.every=0",
        "log.every=1",
        "log.images_every=2",
    ]
    argv = ["import", "--diffusers", str(sd_vae), "--config", "sd-finetune", "--out", str(run)]
    recipe = [f"loss.lpips_path={lpips}", f"data.train={data}", f"data.val={data}", "eval.every=4"]
    assert main([*argv, *recipe, *tiny]) == 0

    # 4. fine-tune
    assert main(["train", "--config", str(run / "config.yaml")]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert {"perceptual", "g_loss", "d_weight", "d_loss", "val/psnr", "val/lpips"} <= logged
    titles = re.findall(r"<figcaption><b>(.*?)</b>", (run / "report.html").read_text())
    assert titles[0] == "loss"
    assert main(["compare", str(run), "--out", str(tmp_path / "compare.html")]) == 0

    # 5. evaluate the fine-tune against the VAE it started from, whole held-out photos
    base, tuned = tmp_path / "base.json", tmp_path / "tuned.json"
    common = [
        "--data",
        str(data),
        "--shape",
        "native",
        "--metrics",
        "psnr",
        "ssim",
        "lpips",
        "--workers",
        "0",
    ]
    assert main(["eval", "--ckpt", str(sd_vae), *common, "--lpips-path", str(lpips), "--out", str(base)]) == 0
    assert main(["eval", "--run", str(run), "--ema", *common, "--out", str(tuned)]) == 0
    for report in (base, tuned):
        metrics = json.loads(report.read_text())["metrics"]
        assert metrics["samples"] == n_val and 0 < metrics["psnr"] < 100 and metrics["lpips"] >= 0

    # 6. a latent dataset in aspect-ratio buckets, captions kept
    latents = tmp_path / "latents"
    argv = [
        "encode",
        "--run",
        str(run),
        "--ema",
        "--data",
        str(data),
        "--shape",
        "buckets",
        "--out",
        str(latents),
    ]
    assert main([*argv, "--resolution", "40", "--bucket-step", "8", "--workers", "0"]) == 0
    encoded = read_tar_samples(latents, "latents-*.tar")
    sources = read_tar_samples(data, "train-*.tar")
    skipped = json.loads((latents / "index.json").read_text())["skipped"]
    assert len(encoded) + sum(skipped.values()) == n_train
    captioned = [k for k in encoded if "txt" in sources[k]]
    assert captioned and all(encoded[k]["txt"] == sources[k]["txt"] for k in encoded if "txt" in sources[k])

    # 7. export and load in diffusers: the imported config.json, fine-tuned EMA weights
    out = tmp_path / "sd-ft-vae"
    assert main(["export", "--run", str(run), "--ema", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text()) == contract
    theirs = AutoencoderKL.from_pretrained(out).eval()
    ema = VAE.from_checkpoint(run, ema=True).eval()
    original = AutoencoderKL.from_pretrained(sd_vae).state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in theirs.state_dict().items())
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # guards the live weights exported instead of the EMA ones; rounding as in the export test above
        assert torch.allclose(theirs.decode(z).sample, ema.decode(z), atol=1e-4)


def docs_walkthrough() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "finetune.md").read_text()
    start = text.index("## Fine-tune the SD VAE on your photos")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_every_flag_and_key_in_the_docs_walkthrough_exists(capsys):
    from vae_scale.cli import main

    commands = re.findall(r"^    vae-scale (\w+)(.*(?:\\\n.*)*)", docs_walkthrough(), re.M)
    assert {c for c, _ in commands} >= {"shards", "import", "train", "eval", "encode", "export"}
    for command, rest in commands:
        assert main([command, "--help"]) == 0
        usage = capsys.readouterr().out
        for flag in re.findall(r"(?<!\S)(--[a-z-]+)", rest):
            assert flag in usage, f"vae-scale {command} {flag}"
        load_config("sd-finetune", re.findall(r"(?<!\S)([a-z]+\.[a-z_]+=\S+)", rest))  # unknown keys raise
