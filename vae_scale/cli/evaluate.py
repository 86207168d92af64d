"""`vae-scale eval`: its flags, checked, then vae_scale.commands.evaluate.evaluate_model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vae_scale.cli.options import (
    add_clip_args,
    add_data_args,
    add_model_args,
    add_seed_arg,
    add_tiling_args,
    log_warnings,
    model_and_data,
    non_negative_int,
    tiling_from_args,
)
from vae_scale.commands.common import processes
from vae_scale.eval.metrics import I3D_FILE, INCEPTION_FILE, METRICS
from vae_scale.files import check_writable_file


def eval_parser() -> argparse.ArgumentParser:
    """`vae-scale eval`'s flags."""
    p = argparse.ArgumentParser(prog="vae-scale eval", description="Evaluate a VAE on held-out shards.")
    add_model_args(p)
    p.add_argument(
        "--metrics",
        nargs="+",
        help=f"any of {' '.join(METRICS)} (default: the run's "
        "eval.metrics, plus lpips / rfid when their weights are given)",
    )
    p.add_argument(
        "--against",
        metavar="RUN_OR_DIR",
        help="a run folder, checkpoint or diffusers folder: adds latent_drift, how far the evaluated "
        "encoder's latents moved from its (PSNR, channel mean/std shift)",
    )
    p.add_argument("--iw", type=non_negative_int, help="importance samples for bpd_iw (default eval.iw)")
    p.add_argument("--out", help="write the results as JSON to this new file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--shape",
        default="square",
        choices=("square", "native"),
        help="square: short side resized to --resolution and center-cropped (default); native: each image "
        "at its own size, cropped to a multiple of the downsampling factor, tiled when larger than a tile",
    )
    add_tiling_args(p)
    p.add_argument("--max-batches", type=non_negative_int, default=0, help="batches per process; 0 is all")
    p.add_argument(
        "--n", type=non_negative_int, default=0, help="with --data synthetic: how many images (default 256)"
    )
    p.add_argument("--lpips-path", default="", help="folder with LPIPS' vgg.pth and vgg16-397923af.pth")
    p.add_argument("--vgg-path", default="", help="torchvision's vgg16-397923af.pth, if not beside vgg.pth")
    p.add_argument("--inception-path", default="", help=f"TorchScript Inception for rfid ({INCEPTION_FILE})")
    p.add_argument(
        "--i3d-path",
        default="",
        help=f"TorchScript I3D for fvd on clips ({I3D_FILE}, StyleGAN-V's; default eval.i3d_path); never "
        "downloaded",
    )
    p.add_argument(
        "--rfid-cache",
        help="folder of rfid's cached reference statistics, a file per protocol (default eval.rfid_cache: "
        "$XDG_CACHE_HOME/vae-scale/rfid); off: never cache",
    )
    p.add_argument(
        "--consistency-tile",
        type=non_negative_int,
        help="tile_consistency's tile in px (default eval.consistency_tile; 0: half the shorter side)",
    )
    add_seed_arg(p)
    add_clip_args(add_data_args(p, split="val"))
    return p


def eval_main(argv: list[str]) -> int:
    """`vae-scale eval --run RUN | --ckpt PATH [--data P] [--metrics ...] [--iw K] [--ema] [--out F]`."""
    from vae_scale.commands.evaluate import eval_heading, evaluate_model, format_table

    p = eval_parser()
    args = p.parse_args(argv)
    if args.frames is not None and (args.frames - 1) % 4:
        p.error(f"--frames must be 1 + 4k (1, 5, 9, 13, ...), got {args.frames}")
    log_warnings()
    if args.out:  # before the evaluation, not after it
        check_writable_file(args.out, "--out", overwrite=args.overwrite)
    loaded, data = model_and_data(args)
    procs = processes()
    report = evaluate_model(
        loaded,
        data,
        metrics=args.metrics,
        iw=args.iw,
        shape=args.shape,
        tiling=tiling_from_args(args, loaded.vae),
        max_batches=args.max_batches,
        n=args.n,
        seed=args.seed,
        lpips_path=args.lpips_path,
        vgg_path=args.vgg_path,
        inception_path=args.inception_path,
        i3d_path=args.i3d_path,
        rfid_cache=args.rfid_cache,
        consistency_tile=args.consistency_tile,
        procs=procs,
        progress_bar=sys.stderr.isatty(),
        against=args.against,
    )
    if procs.is_main:
        print(eval_heading(report))
        latent_channels = loaded.config.model.latent_channels
        protocols = {m: report[f"{m}_protocol"] for m in ("rfid", "fvd") if f"{m}_protocol" in report}
        print(
            format_table(
                report["metrics"], report["likelihood"] or "", latent_channels, report["iw"], protocols
            )
        )
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {out}")
    procs.barrier()
    return 0
