"""`vae-scale sample`, `reconstruct` and `encode`: their flags, checked, then the functions of
vae_scale.commands.generate and vae_scale.commands.reconstruct."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from vae_scale.cli.options import (
    SPLITS,
    add_clip_args,
    add_data_args,
    add_model_args,
    add_seed_arg,
    add_tiling_args,
    log_warnings,
    model_and_data,
    non_negative_int,
    positive_int,
    tiling_from_args,
)
from vae_scale.commands.common import DataOptions, InputError, check_resolution, load_model, processes
from vae_scale.commands.generate import (
    DTYPES,
    LATENT_FORMATS,
    encode_latents,
    sample_images,
    write_sample_grid,
)
from vae_scale.commands.reconstruct import reconstruct_files, reconstruct_shards
from vae_scale.data.image_reader import SHAPES
from vae_scale.files import check_output_dir, check_output_file


def sample_main(argv: list[str]) -> int:
    """`vae-scale sample --run RUN [--n 64] [--temperature T] [--seed S] --out grid.png`."""
    p = argparse.ArgumentParser(prog="vae-scale sample", description="Decode latents drawn from the prior.")
    add_model_args(p)
    p.add_argument("--n", type=int, default=64, help="images (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="std of the prior latents (default 1)")
    p.add_argument("--resolution", type=int, help="image size (default: the run's data.resolution)")
    p.add_argument("--nrow", type=int, default=0, help="images per grid row (default: about sqrt(n))")
    add_seed_arg(p)
    p.add_argument("--batch-size", type=int, default=16, help="latents decoded at once (default 16)")
    p.add_argument("--out", required=True, help="the grid, a .png file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    if args.n <= 0 or args.temperature < 0 or args.batch_size <= 0:
        p.error("--n and --batch-size must be > 0, --temperature >= 0")
    check_output_file(args.out, "--out", args.overwrite, [args.ckpt] if args.ckpt else [])
    loaded = load_model(args.run, args.ckpt, args.ema)
    resolution = args.resolution or loaded.config.data.resolution
    check_resolution(loaded.vae, resolution, "--resolution")
    device = processes().device
    images = sample_images(
        loaded.vae.to(device), args.n, resolution, args.temperature, args.seed, args.batch_size, device
    )
    out = write_sample_grid(images, args.out, args.nrow)
    print(f"wrote {out}: {args.n} samples at {resolution} px, temperature {args.temperature:g}")
    return 0


def reconstruct_main(argv: list[str]) -> int:
    """`vae-scale reconstruct --run RUN INPUTS... --out DIR`: side-by-side PNGs (input | reconstruction) of
    images; of videos, or of clip shards (--data), the reconstruction as an .mp4 and a strip PNG (input frames
    over reconstructed frames)."""
    p = argparse.ArgumentParser(
        prog="vae-scale reconstruct",
        description="Write each image beside its reconstruction; each video (or clip of --data shards) as "
        "its reconstruction's .mp4 and a strip of input frames over reconstructed frames.",
    )
    add_model_args(p)
    p.add_argument("images", nargs="*", help="image or video files, or folders of them")
    p.add_argument("--out", required=True, help="folder for <name>.png (and <name>.mp4 of a clip)")
    p.add_argument(
        "--resolution",
        type=int,
        default=0,
        help="resize the short side to this and center-crop a square (default: whole image, "
        "cropped to a multiple of the downsampling factor; with --data: data.resolution)",
    )
    p.add_argument("--sample", action="store_true", help="decode a posterior sample, not the posterior mean")
    add_seed_arg(p)
    add_tiling_args(p)
    g = p.add_argument_group("clips (a clip model, e.g. wan)")
    g.add_argument(
        "--data",
        metavar="SHARDS",
        help="clip shards (as `vae-scale shards --frames` writes) to reconstruct the first --n clips of",
    )
    g.add_argument("--split", default="val", choices=SPLITS, help="which shards of a --data folder (val)")
    g.add_argument("--n", type=positive_int, default=8, help="with --data: how many clips (default 8)")
    add_clip_args(g)
    g.add_argument("--fps", type=float, default=8.0, help="frame rate of the written .mp4 (default 8)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing the files of the same names (nothing else is removed)",
    )
    args = p.parse_args(argv)
    if bool(args.images) == bool(args.data):
        p.error("give image or video files (or folders), or --data SHARDS, not both")
    if args.frames is not None and (args.frames - 1) % 4:
        p.error(f"--frames must be 1 + 4k (1, 5, 9, 13, ...), got {args.frames}")
    if args.fps <= 0:
        p.error(f"--fps must be > 0, got {args.fps}")
    inputs = [Path(i) if Path(i).is_dir() else Path(i).parent for i in args.images]
    check_output_dir(args.out, "--out", args.overwrite, inputs)
    loaded = load_model(args.run, args.ckpt, args.ema)
    vae = loaded.vae
    if args.resolution:
        check_resolution(vae, args.resolution, "--resolution")
    device = processes().device
    if args.data:
        data = DataOptions.from_config(
            loaded.config.data,
            args.split,
            data=args.data,
            resolution=args.resolution or None,
            workers=0,
            frames=args.frames,
            frame_stride=args.frame_stride,
        )
        check_resolution(vae, data.resolution, "--resolution")
        done = reconstruct_shards(
            vae, data, args.out, n=args.n, sample=args.sample, seed=args.seed, device=device, fps=args.fps
        )
    else:
        done = reconstruct_files(
            vae,
            args.images,
            args.out,
            resolution=args.resolution,
            sample=args.sample,
            seed=args.seed,
            tiling=tiling_from_args(args, vae),
            device=device,
            frames=args.frames or 0,
            frame_stride=args.frame_stride or 1,
            fps=args.fps,
        )
    scores = []
    for r in done:
        scores.append(r.psnr)
        if r.video is None:
            print(f"{r.png}  {r.width}x{r.height}  PSNR {r.psnr:.2f} dB")
        else:
            shake = f"  flicker {r.flicker:.5f}" if r.flicker is not None else ""
            print(f"{r.video}  {r.png}  {r.frames} frames {r.width}x{r.height}  PSNR {r.psnr:.2f} dB{shake}")
    if not scores:
        raise InputError(f"--data {args.data}: no clips read")
    print(f"{len(scores)} inputs, mean PSNR {sum(scores) / len(scores):.2f} dB (per frame for clips)")
    return 0


def encode_parser() -> argparse.ArgumentParser:
    """`vae-scale encode`'s flags."""
    p = argparse.ArgumentParser(
        prog="vae-scale encode",
        description="Latent shards (WebDataset) of a dataset, for training a diffusion model on the latents: "
        "the source's keys and sidecars kept, each process writing its share.",
    )
    add_model_args(p)
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
        "buckets of about --resolution^2 pixels (--resolution: the buckets' side)",
    )
    p.add_argument("--bucket-step", type=int, default=64, help="buckets' sides are multiples of this (64)")
    p.add_argument(
        "--max-aspect", type=float, default=2.0, help="buckets' widest aspect ratio, either way (2.0)"
    )
    add_tiling_args(p)
    p.add_argument(
        "--shard-size", type=positive_int, default=1000, help="samples per output shard (default 1000)"
    )
    p.add_argument("--prefix", default="latents", help="output shard name prefix (default latents)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing the --prefix shards and index.json there",
    )
    p.add_argument(
        "--n",
        type=non_negative_int,
        default=0,
        help="at most this many samples per process (0: all); with --data synthetic, how many images",
    )
    add_seed_arg(p)
    add_data_args(p, split="train")
    return p


def encode_main(argv: list[str]) -> int:
    """`vae-scale encode --run RUN --data PATTERN --out DIR`: latent shards (WebDataset), keys preserved."""
    p = encode_parser()
    args = p.parse_args(argv)
    if args.format == "npy" and args.dtype == "bfloat16":
        p.error("--dtype bfloat16 needs --format safetensors (numpy has no bfloat16)")
    if args.bucket_step <= 0 or args.max_aspect < 1:
        p.error("--bucket-step must be > 0 and --max-aspect >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_.]+", args.prefix):
        p.error("--prefix may hold letters, digits, '_' and '.' only")
    log_warnings()
    check_output_dir(args.out, "--out", args.overwrite)
    loaded, data = model_and_data(args)
    lines = encode_latents(
        loaded,
        args.out,
        data,
        fmt=args.format,
        dtype=args.dtype,
        sample=args.sample,
        shape=args.shape,
        bucket_step=args.bucket_step,
        max_aspect=args.max_aspect,
        tiling=tiling_from_args(args, loaded.vae),
        shard_size=args.shard_size,
        prefix=args.prefix,
        n=args.n,
        seed=args.seed,
        procs=processes(),
        overwrite=args.overwrite,
    )
    for line in lines:
        print(line)
    return 0
