"""Images and latents from a trained VAE: `vae-scale sample`, `reconstruct` and `encode`.

    vae-scale sample --run runs/demo --n 64 --temperature 0.8 --out samples.png
    vae-scale reconstruct --run runs/demo photos/*.jpg --out recon/
    accelerate launch -m vae_scale encode --run runs/sd-ft --data '/data/train-{000..099}.tar' --out latents/

`encode` writes WebDataset shards for training a diffusion model on the latents: per sample `<key>.npy` or
`<key>.safetensors` (tensor "latent", (C, h, w)), `<key>.latent.json` (source shard and key, the encoded
image size, the latent shape and dtype) and every sidecar of the source sample as it was (`.txt`,
`.json`, ... captions and metadata), under the source's keys. Images are encoded as square crops, at
their native size, or in aspect-ratio buckets (vae_scale.image_reader), tile by tile when larger than the
tile. The latent is the posterior mean unless --sample (a reparameterised sample, seeded by the sample's
key), and raw: a diffusion model applies the scale and shift recorded in the output's index.json (the model
config's scaling_factor / shift_factor; `vae-scale export` measures them). Each process writes its own
shards `<prefix>-<rank>-<shard>.tar` from its share of the data (every sample exactly once); the main
process writes index.json with the per-shard counts once every rank is done.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vae_scale.commands import (
    InputError,
    add_model_args,
    add_tiling_args,
    check_resolution,
    load_model,
    processes,
    tiling_from_args,
)
from vae_scale.metrics import key_noise, psnr
from vae_scale.monitor import image_grid, save_png
from vae_scale.outputs import check_writable_dir, check_writable_file

log = logging.getLogger(__name__)

LATENT_FORMATS = ("safetensors", "npy")
META_EXT = "latent.json"
"""The member of each latent sample that describes it (the source's own `.json` sidecar is kept apart)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------
# sample


@torch.no_grad()
def sample_images(
    vae,
    n: int,
    resolution: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """n images (n, 3, R, R) in [-1, 1] decoded from prior latents z ~ N(0, temperature^2 I), seeded."""
    vae.eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *vae.latent_shape(resolution), generator=g) * temperature
    out = [
        vae.decode(z[i : i + batch_size].to(device)).float().clamp(-1, 1).cpu()
        for i in range(0, n, batch_size)
    ]
    return torch.cat(out)


def sample_main(argv: list[str]) -> int:
    """`vae-scale sample --run RUN [--n 64] [--temperature T] [--seed S] --out grid.png`."""
    p = argparse.ArgumentParser(prog="vae-scale sample", description="Decode latents drawn from the prior.")
    add_model_args(p)
    p.add_argument("--n", type=int, default=64, help="images (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="std of the prior latents (default 1)")
    p.add_argument("--resolution", type=int, help="image size (default: the run's data.resolution)")
    p.add_argument("--nrow", type=int, default=0, help="images per grid row (default: about sqrt(n))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="the grid, a .png file")
    args = p.parse_args(argv)
    if args.n <= 0 or args.temperature < 0 or args.batch_size <= 0:
        p.error("--n and --batch-size must be > 0, --temperature >= 0")
    check_writable_file(args.out, "--out")
    loaded = load_model(args.run, args.ckpt, args.ema)
    resolution = args.resolution or loaded.config.data.resolution
    check_resolution(loaded.vae, resolution, "--resolution")
    device = processes().device
    images = sample_images(
        loaded.vae.to(device), args.n, resolution, args.temperature, args.seed, args.batch_size, device
    )
    nrow = args.nrow or math.ceil(math.sqrt(args.n))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid([images[i : i + nrow] for i in range(0, args.n, nrow)]), out)
    print(f"wrote {out}: {args.n} samples at {resolution} px, temperature {args.temperature:g}")
    return 0


# --------------------------------------------------------------------------------------------------------
# reconstruct


def _image_files(items: list[str]) -> list[Path]:
    from vae_scale.shard_reader import IMAGE_EXTENSIONS

    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix[1:].lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    return files


def load_image(path: Path, multiple: int, resolution: int = 0) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: RGB, the short side resized to `resolution` (when given) and center-cropped
    to that square, else center-cropped to multiples of `multiple`."""
    from vae_scale.shard_reader import to_rgb

    try:
        img = to_rgb(Image.open(path))
    except Exception as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if resolution:
        s = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        cw = ch = resolution
    else:
        cw, ch = w - w % multiple, h - h % multiple
        if not cw or not ch:
            raise InputError(f"{path}: {w}x{h} is smaller than the model's downsampling {multiple}")
    w, h = img.size
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    a = np.asarray(img.crop((x0, y0, x0 + cw, y0 + ch)), dtype=np.float32)
    return torch.from_numpy(a / 127.5 - 1).permute(2, 0, 1)


def reconstruct_main(argv: list[str]) -> int:
    """`vae-scale reconstruct --run RUN IMAGES... --out DIR`: side-by-side PNGs (input | reconstruction)."""
    p = argparse.ArgumentParser(
        prog="vae-scale reconstruct", description="Write each image beside its reconstruction."
    )
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True, help="folder for <name>.png")
    p.add_argument(
        "--resolution",
        type=int,
        default=0,
        help="resize the short side to this and center-crop a square (default: whole image, "
        "cropped to a multiple of the downsampling factor)",
    )
    p.add_argument("--sample", action="store_true", help="decode a posterior sample, not the posterior mean")
    p.add_argument("--seed", type=int, default=0)
    add_tiling_args(p)
    args = p.parse_args(argv)
    check_writable_dir(args.out, "--out")
    loaded = load_model(args.run, args.ckpt, args.ema)
    vae = loaded.vae
    if args.resolution:
        check_resolution(vae, args.resolution, "--resolution")
    tiling = tiling_from_args(args, vae)
    files = _image_files(args.images)
    device = processes().device
    vae.to(device).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    scores = []
    for path in files:
        x = load_image(path, vae.downsample_factor, args.resolution)[None].to(device)
        with torch.no_grad():
            post = vae.encode(x, tiled=tiling)
            z = post.mode()
            if args.sample:
                z = post.sample(key_noise([str(path)], tuple(z.shape), args.seed, 0, 0).to(device))
            x_hat = vae.decode(z, tiled=tiling).float().clamp(-1, 1)
        name = path.stem
        while name in used:
            name += "_"
        used.add(name)
        save_png(image_grid([torch.cat([x, x_hat]).cpu()]), out / f"{name}.png")
        scores.append(psnr(x_hat, x).item())
        print(f"{out / (name + '.png')}  {x.shape[3]}x{x.shape[2]}  PSNR {scores[-1]:.2f} dB")
    print(f"{len(files)} images, mean PSNR {sum(scores) / len(scores):.2f} dB")
    return 0


# --------------------------------------------------------------------------------------------------------
# encode


def latent_bytes(z: torch.Tensor, fmt: str) -> bytes:
    """One latent (C, h, w) as the bytes of a .safetensors file (tensor "latent") or a .npy file."""
    z = z.detach().cpu().contiguous()
    if fmt == "safetensors":
        from safetensors.torch import save

        return save({"latent": z})
    buf = io.BytesIO()
    np.save(buf, z.numpy())
    return buf.getvalue()


def read_latent(data: bytes, fmt: str) -> torch.Tensor:
    """The latent tensor from the bytes `latent_bytes` wrote."""
    if fmt == "safetensors":
        from safetensors.torch import load

        return load(data)["latent"]
    return torch.from_numpy(np.load(io.BytesIO(data)))


class LatentShardWriter:
    """Latents of one rank into `<prefix>-<rank:03d>-<shard:06d>.tar`, `shard_size` per shard, atomically."""

    def __init__(self, out: Path, prefix: str, rank: int, shard_size: int, fmt: str):
        from vae_scale.shards import ShardWriter

        self.fmt = fmt
        self.shards = ShardWriter(out, lambda i: f"{prefix}-{rank:03d}-{i:06d}.tar", shard_size)

    def write(
        self,
        key: str,
        source: str,
        z: torch.Tensor,
        sidecars: dict[str, bytes] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        """One sample: the latent, its metadata (`latent.json`) and the source's sidecars, as they were."""
        meta = {"source": source, "key": key, "shape": list(z.shape), "dtype": str(z.dtype).split(".")[-1]}
        if image_size is not None:
            meta["image_size"] = list(image_size)  # (width, height) of what was encoded
        ours = {self.fmt: latent_bytes(z, self.fmt), META_EXT: json.dumps(meta, sort_keys=True).encode()}
        # a sidecar that would collide with our own members keeps its bytes under a "source." name
        kept = {(f"source.{ext}" if ext in ours else ext): data for ext, data in (sidecars or {}).items()}
        self.shards.write({"__key__": key, **kept, **ours})

    def close(self) -> dict[str, int]:
        """Finish the last shard; the samples per shard this writer wrote."""
        return self.shards.close()


def _split_key(key: str) -> tuple[str, str]:
    """("shard url", "sample key") from the loader's "url#key"."""
    url, _, k = key.rpartition("#")
    return url, k


def encode_batches(args, cfg, vae, procs, data: str):
    """(batches, reader): this rank's batches for `encode` (reader None for `synthetic`, which has no
    sidecars and only square images)."""
    from vae_scale.commands import iter_batches
    from vae_scale.image_reader import ImageReader
    from vae_scale.shard_reader import expand_shards, shard_counts
    from vae_scale.synthetic import SYNTHETIC

    batch_size = args.batch_size or cfg.data.batch_size
    if data == SYNTHETIC:
        if args.shape != "square":
            raise InputError(f"--shape {args.shape}: --data synthetic has square images only")
        batches = iter_batches(
            data,
            split=args.split,
            resolution=args.resolution or cfg.data.resolution,
            batch_size=batch_size,
            rank=procs.rank,
            world=procs.world,
            limit=args.n,
            seed=cfg.train.seed,
        )
        return batches, None
    urls = expand_shards(data, args.split)
    try:
        reader = ImageReader(
            urls,
            shard_counts(urls, scan=False),
            shape=args.shape,
            resolution=args.resolution or cfg.data.resolution,
            multiple=vae.downsample_factor,
            batch_size=batch_size,
            bucket_step=args.bucket_step,
            max_aspect=args.max_aspect,
            resize=cfg.data.resize,
            workers=args.workers,
            rank=procs.rank,
            world=procs.world,
            limit=args.n,
            sidecars=True,
        )
    except ValueError as e:
        raise InputError(f"--shape {args.shape}: {e}") from None
    return reader, reader


def encode_main(argv: list[str]) -> int:
    """`vae-scale encode --run RUN --data PATTERN --out DIR`: latent shards (WebDataset), keys preserved."""
    from vae_scale.image_reader import SHAPES

    p = argparse.ArgumentParser(prog="vae-scale encode", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--data", help="shards (pattern, folder, list) or 'synthetic' (default: data.train)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="which shards of a folder")
    p.add_argument("--out", required=True, help="output folder for the latent shards and index.json")
    p.add_argument("--format", default="safetensors", choices=LATENT_FORMATS, help="per-sample latent file")
    p.add_argument(
        "--dtype", default="float32", choices=tuple(DTYPES), help="latent dtype (bfloat16: safetensors only)"
    )
    p.add_argument("--sample", action="store_true", help="a posterior sample, not the posterior mean")
    p.add_argument(
        "--shape",
        default="square",
        choices=SHAPES,
        help="square: short side resized to --resolution and center-cropped (default); native: each image "
        "at its own size (cropped to a multiple of the downsampling factor); buckets: aspect-ratio "
        "buckets of about --resolution^2 pixels",
    )
    p.add_argument(
        "--resolution", type=int, help="square crop size, or the buckets' side (default: data.resolution)"
    )
    p.add_argument("--bucket-step", type=int, default=64, help="buckets' sides are multiples of this (64)")
    p.add_argument(
        "--max-aspect", type=float, default=2.0, help="buckets' widest aspect ratio, either way (2.0)"
    )
    add_tiling_args(p)
    p.add_argument("--batch-size", type=int, help="images per process per batch (default data.batch_size)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers per process (default 2)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard (default 1000)")
    p.add_argument("--prefix", default="latents", help="output shard name prefix (default latents)")
    p.add_argument(
        "--n",
        type=int,
        default=0,
        help="at most this many samples per process (0: all); with --data synthetic, how many images",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds --sample's noise (per sample key)")
    args = p.parse_args(argv)
    if args.format == "npy" and args.dtype == "bfloat16":
        p.error("--dtype bfloat16 needs --format safetensors (numpy has no bfloat16)")
    if args.shard_size <= 0 or args.n < 0 or args.workers < 0:
        p.error("--shard-size must be > 0, --n and --workers >= 0")
    if args.bucket_step <= 0 or args.max_aspect < 1:
        p.error("--bucket-step must be > 0 and --max-aspect >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_.]+", args.prefix):
        p.error("--prefix may hold letters, digits, '_' and '.' only")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    check_writable_dir(args.out, "--out")
    loaded = load_model(args.run, args.ckpt, args.ema)
    cfg, vae = loaded.config, loaded.vae
    data = args.data or cfg.data.train
    if not data:
        raise InputError(f"--data is needed: {loaded.source} has no data.train")
    resolution = args.resolution or cfg.data.resolution
    check_resolution(vae, resolution, "--resolution")
    tiling = tiling_from_args(args, vae)

    procs = processes()
    out = Path(args.out)
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        stale = re.compile(rf"{re.escape(args.prefix)}-\d{{3}}-\d{{6}}\.tar(\.tmp)?")
        for old in out.iterdir():  # shards of an earlier run (maybe with more ranks) would mix in
            if stale.fullmatch(old.name):
                old.unlink()
    procs.barrier()
    vae.to(procs.device).eval()
    batches, reader = encode_batches(args, cfg, vae, procs, data)
    total = _expected_samples(data, args.split, args.n, procs.world)
    writer = LatentShardWriter(out, args.prefix, procs.rank, args.shard_size, args.format)
    bar = None
    if procs.is_main:
        from tqdm import tqdm

        bar = tqdm(desc="encode", total=total, unit="img", dynamic_ncols=True, leave=False)
    dtype = DTYPES[args.dtype]
    shapes: dict[str, int] = {}
    with torch.no_grad():
        for batch in batches:
            x = batch["images"][: batch["count"]].to(procs.device).float()
            post = vae.encode(x, tiled=tiling)
            z = post.mode()
            if args.sample:
                z = post.sample(key_noise(batch["keys"], tuple(z.shape), args.seed, 0, 0).to(procs.device))
            z = z.to(dtype).cpu()
            shape = "x".join(map(str, z.shape[1:]))
            shapes[shape] = shapes.get(shape, 0) + len(z)
            sidecars = batch.get("sidecars") or [None] * len(z)
            for full_key, zi, extra in zip(batch["keys"], z, sidecars, strict=True):
                url, key = _split_key(full_key)
                writer.write(key, url, zi, extra, (x.shape[3], x.shape[2]))
            if bar is not None:
                bar.update(len(z))
    counts = writer.close()
    if bar is not None:
        bar.close()
    skipped = dict(reader.skipped) if reader is not None else {}
    first = reader.first_skipped if reader is not None else None
    everyone = procs.gather({"counts": counts, "shapes": shapes, "skipped": skipped, "first": first})
    if procs.is_main:
        shards = {name: n for part in everyone for name, n in sorted(part["counts"].items())}
        all_shapes: dict[str, int] = {}
        all_skipped: dict[str, int] = {}
        for part in everyone:
            for k, v in part["shapes"].items():
                all_shapes[k] = all_shapes.get(k, 0) + v
            for k, v in part["skipped"].items():
                all_skipped[k] = all_skipped.get(k, 0) + v
        m = cfg.model
        index = {
            "splits": {args.split: {"samples": sum(shards.values()), "shards": shards}},
            "latent": {
                "format": args.format,
                "dtype": args.dtype,
                # one shape for square crops; per shape counts for native sizes and buckets
                "shape": [int(d) for d in next(iter(all_shapes)).split("x")]
                if len(all_shapes) == 1
                else None,
                "shapes": dict(sorted(all_shapes.items(), key=lambda kv: -kv[1])),
                "kind": "sample" if args.sample else "posterior mean",
                "seed": args.seed,
                "scaled": False,
                "scaling_factor": m.scaling_factor,
                "shift_factor": m.shift_factor,
                "latents_mean": m.latents_mean,
                "latents_std": m.latents_std,
                "meta": META_EXT,
            },
            "source": {
                "data": data,
                "shape": args.shape,
                "resolution": resolution,
                "buckets": [list(b) for b in reader.buckets]
                if reader is not None and reader.buckets
                else None,
                "tile": tiling.tile if tiling else None,
                "model": loaded.source,
                "step": loaded.step,
                "ema": args.ema,
            },
            "skipped": all_skipped,
        }
        (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        n_shapes = (
            f"{len(all_shapes)} latent shapes"
            if len(all_shapes) > 1
            else f"latents {index['latent']['shape']}"
        )
        print(
            f"wrote {index['splits'][args.split]['samples']} {n_shapes} in "
            f"{len(shards)} shards to {out}/ ({procs.world} process(es))"
        )
        if all_skipped:
            firsts = next((part["first"] for part in everyone if part["first"]), "")
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(all_skipped.items()))
            print(f"skipped {sum(all_skipped.values())} samples ({kinds}; never upscaled); first: {firsts}")
    procs.barrier()
    return 0


def _expected_samples(data: str, split: str, limit: int, world: int) -> int | None:
    """This rank's approximate sample count, for the progress bar (None when unknown)."""
    from vae_scale.shard_reader import expand_shards, shard_counts
    from vae_scale.synthetic import SYNTHETIC

    if data == SYNTHETIC:
        return math.ceil((limit or 256) / world)
    counts = shard_counts(expand_shards(data, split), scan=False)
    if counts is None:
        return limit or None
    n = math.ceil(sum(counts.values()) / world)
    return min(n, limit) if limit else n


__all__ = [
    "LatentShardWriter",
    "encode_main",
    "latent_bytes",
    "load_image",
    "read_latent",
    "reconstruct_main",
    "sample_images",
    "sample_main",
]
