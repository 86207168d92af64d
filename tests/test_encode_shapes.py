"""encode and eval beyond square crops: native sizes, aspect-ratio buckets, tiling, captions kept."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_scale.cli.evaluate import eval_main
from vae_scale.cli.generate import encode_main
from vae_scale.commands.generate import read_latent
from vae_scale.config import load_config
from vae_scale.data.image_reader import aspect_buckets, cover_crop, nearest_bucket
from vae_scale.eval.metrics import psnr
from vae_scale.models.sd import VAE
from vae_scale.models.tiling import Tiling

# (width, height) of the source images; 12x10 is too small for any 16 px bucket
SIZES = [(48, 40), (40, 64), (72, 24), (36, 36), (12, 10), (50, 34)]


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (c + 2) + yy * (3 - c) + 20 * seed) % 256 for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, dict[str, dict[str, bytes]]]:
    """(shard folder, diffusers VAE folder, {key: source members}): img2dataset-style samples, each an
    image (png or jpg) with a .txt caption and a .json, and a tiny f2 VAE whose tile is 32 px."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("shapes")
    shards = root / "shards"
    shards.mkdir()
    samples = {}
    with wds.TarWriter(str(shards / "train-000000.tar")) as sink:
        for i, (w, h) in enumerate(SIZES):
            ext = "png" if i % 2 == 0 else "jpg"
            buf = io.BytesIO()
            image(w, h, i).save(buf, format="PNG" if ext == "png" else "JPEG", quality=95)
            key = f"{i:09d}"
            members = {
                ext: buf.getvalue(),
                "txt": f"a caption for photo {i}".encode(),
                "json": json.dumps({"url": f"http://example/{i}.{ext}", "width": w}).encode(),
            }
            samples[key] = members
            sink.write({"__key__": key, **members})
    torch.manual_seed(0)
    overrides = [
        "model.block_out_channels=[8,16]",
        "model.layers_per_block=1",
        "model.latent_channels=4",
        "model.norm_num_groups=4",
        "model.sample_size=32",
    ]
    vae_dir = root / "vae"
    VAE(load_config(None, overrides).model).save_diffusers(vae_dir)
    return shards, vae_dir, samples


def read_out(folder: Path) -> dict[str, dict[str, bytes]]:
    import webdataset as wds

    urls = sorted(str(p) for p in folder.glob("latents-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def test_aspect_buckets_cover_the_ratios_within_the_area():
    buckets = aspect_buckets(512, 64, max_aspect=2.0)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all(max(w / h, h / w) <= 2.0 for w, h in buckets)
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    assert nearest_bucket(1920, 1080, buckets) == (640, 384)  # 16:9 -> the widest bucket within 2:1
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    wide = aspect_buckets(512, 64, max_aspect=4.0)
    assert nearest_bucket(2000, 500, wide) == (1024, 256)
    with pytest.raises(ValueError, match="smaller than the 64x64 bucket"):
        cover_crop(Image.new("RGB", (100, 50)), 64, 64)
    assert cover_crop(Image.new("RGB", (300, 100)), 96, 64).size == (96, 64)


@pytest.mark.numerics
def test_encode_at_native_size_keeps_each_samples_captions(data, tmp_path, capsys):
    shards, vae_dir, samples = data
    out = tmp_path / "native"
    argv = ["--ckpt", str(vae_dir), "--data", str(shards), "--out", str(out), "--workers", "0"]
    assert encode_main([*argv, "--shape", "native"]) == 0
    written = read_out(out)
    assert set(written) == set(samples)  # 12x10 is fine natively (f2)
    vae = VAE.from_diffusers(vae_dir).eval()
    for key, source in samples.items():
        got = written[key]
        assert got["txt"] == source["txt"] and got["json"] == source["json"]  # the sidecars, byte for byte
        meta = json.loads(got["latent.json"])
        img = Image.open(io.BytesIO(source["png"] if "png" in source else source["jpg"]))
        w, h = img.size
        assert meta["image_size"] == [w - w % 2, h - h % 2]
        z = read_latent(got["safetensors"], "safetensors")
        assert z.shape == (4, h // 2, w // 2)
        x = as_tensor(img)[:, : h - h % 2, : w - w % 2][None]
        with torch.no_grad():  # larger than the 32 px tile: tiled, as the command did by default
            want = vae.encode(x, tiled=Tiling(32)).mode()[0]
        # Guards a crop on the wrong side, no tiling, another image: O(0.1). Same kernels in one process;
        # batches may differ (~1e-6 relative after the encoder): far below atol 1e-5 + rtol 1e-5 * |z|.
        assert torch.allclose(z, want, atol=1e-5), key
    index = json.loads((out / "index.json").read_text())
    assert index["latent"]["shape"] is None and sum(index["latent"]["shapes"].values()) == len(samples)
    assert index["source"]["shape"] == "native" and index["source"]["tile"] == 32
    assert "latent shapes" in capsys.readouterr().out


def test_encode_in_aspect_ratio_buckets(data, tmp_path, capsys):
    shards, vae_dir, samples = data
    out = tmp_path / "buckets"
    argv = ["--ckpt", str(vae_dir), "--data", str(shards), "--out", str(out), "--workers", "0"]
    assert encode_main([*argv, "--shape", "buckets", "--resolution", "32", "--bucket-step", "8"]) == 0
    buckets = aspect_buckets(32, 8, 2.0)
    written = read_out(out)
    assert set(written) == set(samples) - {"000000004"}  # the 12x10 image is below every bucket
    for key, got in written.items():
        w, h = SIZES[int(key)]
        bucket = nearest_bucket(w, h, buckets)
        assert json.loads(got["latent.json"])["image_size"] == list(bucket)
        assert read_latent(got["safetensors"], "safetensors").shape == (4, bucket[1] // 2, bucket[0] // 2)
        assert got["txt"] == samples[key]["txt"]
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == {"too_small": 1}
    assert index["source"]["buckets"] == [list(b) for b in buckets]
    printed = capsys.readouterr().out
    assert "skipped 1 samples (too_small 1" in printed and "000000004" in printed


@pytest.mark.numerics
def test_eval_at_native_size_scores_whole_images(data, tmp_path, capsys):
    shards, vae_dir, samples = data
    result = tmp_path / "eval.json"
    argv = ["--ckpt", str(vae_dir), "--data", str(shards), "--split", "train", "--workers", "0"]
    assert eval_main([*argv, "--shape", "native", "--metrics", "psnr", "--out", str(result)]) == 0
    report = json.loads(result.read_text())
    assert report["shape"] == "native" and report["tile"] == 32
    vae = VAE.from_diffusers(vae_dir).eval()
    scores = []
    for source in samples.values():
        img = Image.open(io.BytesIO(source["png"] if "png" in source else source["jpg"]))
        w, h = img.size
        x = as_tensor(img)[:, : h - h % 2, : w - w % 2][None]
        with torch.no_grad():
            x_hat = vae.decode(vae.encode(x, tiled=Tiling(32)).mode(), tiled=Tiling(32)).clamp(-1, 1)
        scores.append(psnr(x_hat, x).item())
    assert report["metrics"]["samples"] == len(samples)
    # Guards a mean over pooled pixels instead of images, a missing clamp or crop: >= 1e-2 dB. Rounding of
    # the fp32 round trip (~1e-6 relative) moves a PSNR by ~1e-5 dB.
    assert report["metrics"]["psnr"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    assert "native size" in capsys.readouterr().out
    assert math.isfinite(report["metrics"]["mse"])
