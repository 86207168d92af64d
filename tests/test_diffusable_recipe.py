"""The diffusable-finetune recipe: it resolves, and docs/finetune.md's commands import a diffusers VAE with
it, fine-tune with the scale-equivariance term and LPIPS, and evaluate the spectrum and equivariance of the
VAE before and after (a random-weight diffusers AutoencoderKL stands in, at a tiny scale)."""

import json
import re
from pathlib import Path

import pytest
from support import tiny_diffusers_vae, write_lpips_weights, write_photo_like_images

from vae_scale.cli import main
from vae_scale.config import load_config

RECIPE = "diffusable-finetune"


def test_the_recipe_resolves_with_the_regularisers_on():
    assert main(["config", "--config", RECIPE]) == 0
    cfg = load_config(RECIPE)
    assert (cfg.loss.recon, cfg.loss.perceptual_weight, cfg.loss.kl_weight) == ("l1", 1.0, 1e-6)
    assert cfg.loss.se_weight > 0 and cfg.loss.se_prob == 1.0 and cfg.loss.se_factors == [2, 4]
    assert set(cfg.loss.eq_transforms) <= {"scale", "rotate", "flip"}
    assert {"spectrum", "equivariance"} <= set(cfg.eval.metrics)
    flux = load_config("f8c16").model
    for key in ("block_out_channels", "latent_channels", "quant_convs", "scaling_factor", "shift_factor"):
        assert getattr(cfg.model, key) == getattr(flux, key), key


@pytest.mark.slow
def test_the_documented_commands_import_fine_tune_and_evaluate(tmp_path, capsys):
    flux_vae = tmp_path / "vae"
    tiny_diffusers_vae(flux_vae)
    lpips = write_lpips_weights(tmp_path / "weights" / "lpips")
    data = tmp_path / "data"
    photos = write_photo_like_images(tmp_path / "photos", 12, ((48, 48), (56, 48)), prefix="photo")
    assert (
        main(["shards", str(photos), str(data), "--val-fraction", "0.25", "--quiet", "--workers", "1"]) == 0
    )
    run = tmp_path / "runs" / "flux-diffusable"
    tiny = [
        "data.resolution=32",
        "data.batch_size=2",
        "data.workers=0",
        "train.steps=2",
        "optim.warmup_steps=0",
        "checkpoint.every=0",
        "log.every=1",
        "log.images_every=0",
        "eval.every=2",
        "eval.metrics=[psnr,spectrum,equivariance]",
    ]
    argv = ["import", "--diffusers", str(flux_vae), "--config", RECIPE, "--out", str(run)]
    recipe = [f"loss.lpips_path={lpips}", f"data.train={data}", f"data.val={data}"]
    assert main([*argv, *recipe, *tiny]) == 0
    assert main(["train", "--config", str(run / "config.yaml")]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["se_loss"] > 0 and r["perceptual"] > 0 for r in rows if "loss" in r)
    assert {"val/latent_hf_share", "val/equivariance/down4"} <= set().union(*rows)
    assert "Latent spectrum" in (run / "report.html").read_text()

    results = {}
    common = ["--data", str(data), "--resolution", "32", "--metrics", "psnr", "spectrum", "equivariance"]
    for name, source in (("before", ["--ckpt", str(flux_vae)]), ("after", ["--run", str(run)])):
        assert main(["eval", *source, *common, "--out", str(tmp_path / f"{name}.json")]) == 0
        table = capsys.readouterr().out
        assert "high-frequency share, latent" in table and "equivariance PSNR, rotate (dB)" in table
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
    assert results["before"].keys() == results["after"].keys()
    assert results["before"]["latent_hf_share"] != results["after"]["latent_hf_share"]  # the encoder trained


def docs_section() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "finetune.md").read_text()
    start = text.index("## Latents a diffusion model learns faster")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_every_command_flag_and_key_in_the_docs_section_exists(capsys):
    section = docs_section()
    commands = re.findall(r"^    vae-scale (\w+)(.*(?:\\\n.*)*)", section, re.M)
    assert {c for c, _ in commands} >= {"import", "train", "eval", "export"}
    for command, rest in commands:
        assert main([command, "--help"]) == 0
        usage = capsys.readouterr().out
        for flag in re.findall(r"(?<!\S)(--[a-z-]+)", rest):
            assert flag in usage, f"vae-scale {command} {flag}"
        load_config(RECIPE, re.findall(r"(?<!\S)([a-z]+\.[a-z_]+=\S+)", rest))  # unknown keys raise
    keys = set(re.findall(r"`loss\.([a-z_]+)`", section))
    assert {
        "se_weight",
        "se_prob",
        "se_factors",
        "eq_weight",
        "eq_prob",
        "eq_transforms",
        "eq_scale_min",
    } <= keys
    cfg = load_config(RECIPE)
    assert all(hasattr(cfg.loss, k) for k in keys)
