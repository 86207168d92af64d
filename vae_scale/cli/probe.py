"""`vae-scale probe`: its flags, checked, then vae_scale.commands.probe (the latent diffusion probe)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from vae_scale.cli.options import log_warnings, non_negative_int, positive_int
from vae_scale.commands.common import DataOptions, InputError, check_resolution, load_model, processes
from vae_scale.commands.probe import (
    TIME_SAMPLING,
    FidSetup,
    ProbeBudget,
    image_stats,
    probe,
    read_latents,
)
from vae_scale.commands.probe_report import write_report
from vae_scale.eval.metrics import INCEPTION_FILE, load_inception
from vae_scale.files import check_output_dir

DEFAULTS = ProbeBudget()


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def probe_parser() -> argparse.ArgumentParser:
    """`vae-scale probe`'s flags."""
    p = argparse.ArgumentParser(
        prog="vae-scale probe",
        description="Train the same small latent diffusion model (SiT, flow matching) on each autoencoder's "
        "latents for a fixed budget and compare their held-out losses: how easily each latent space is "
        "learned.",
    )
    p.add_argument(
        "latents", nargs="+", help="latent shards of each autoencoder (a folder written by encode)"
    )
    p.add_argument("--names", nargs="+", help="one name per latent set (default: the folders' names)")
    p.add_argument("--out", required=True, help="folder for probe.json, probe.md and probe.svg")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    held = p.add_argument_group("held-out latents")
    held.add_argument(
        "--val",
        nargs="+",
        metavar="LATENTS",
        help="held-out latent shards, one per latent set (e.g. encode --split val); default: a "
        "share of the keys",
    )
    held.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.1,
        help="without --val: the share of keys held out, picked by a hash of the key (default 0.1)",
    )
    b = p.add_argument_group("the budget (the same for every latent set; recorded in probe.json)")
    b.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1, each a full run (default 3)")
    b.add_argument(
        "--steps", type=positive_int, default=DEFAULTS.steps, help=f"steps (default {DEFAULTS.steps})"
    )
    b.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, help="latents per step")
    b.add_argument("--width", type=positive_int, default=DEFAULTS.width, help=f"default {DEFAULTS.width}")
    b.add_argument("--depth", type=positive_int, default=DEFAULTS.depth, help=f"default {DEFAULTS.depth}")
    b.add_argument("--heads", type=positive_int, default=DEFAULTS.heads, help=f"default {DEFAULTS.heads}")
    b.add_argument("--patch-size", type=positive_int, default=DEFAULTS.patch_size, help="latent patch side")
    b.add_argument(
        "--lr", type=positive_float, default=DEFAULTS.lr, help=f"AdamW lr (default {DEFAULTS.lr:g})"
    )
    b.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip, help="gradient norm clip, 0: none")
    b.add_argument(
        "--time-sampling", choices=TIME_SAMPLING, default=DEFAULTS.time_sampling, help="training t"
    )
    b.add_argument(
        "--evals", type=positive_int, default=DEFAULTS.evals, help="held-out evaluations after init"
    )
    b.add_argument(
        "--val-samples", type=positive_int, default=DEFAULTS.val_samples, help="at most this many held out"
    )
    f = p.add_argument_group("FID of decoded samples (optional: needs the Inception weights and each VAE)")
    f.add_argument("--inception-path", default="", help=f"TorchScript Inception ({INCEPTION_FILE})")
    vae = f.add_mutually_exclusive_group()
    vae.add_argument("--run", nargs="+", help="each latent set's run folder, to decode samples")
    vae.add_argument("--ckpt", nargs="+", help="each latent set's checkpoint or diffusers folder")
    f.add_argument("--ema", action="store_true", help="the checkpoints' EMA weights")
    f.add_argument("--fid-data", metavar="SHARDS", help="held-out images (their val split) to compare with")
    f.add_argument("--fid-samples", type=positive_int, default=1000, help="samples decoded per seed (1000)")
    f.add_argument("--sampler-steps", type=positive_int, default=50, help="Euler steps (default 50)")
    f.add_argument("--fid-batches", type=non_negative_int, default=0, help="held-out image batches, 0: all")
    return p


def probe_main(argv: list[str]) -> int:
    """`vae-scale probe LATENTS... [--names ...] [--seeds 3] [--steps N] --out DIR`."""
    p = probe_parser()
    args = p.parse_args(argv)
    n = len(args.latents)
    names = args.names or [Path(s.rstrip("/")).name or s for s in args.latents]
    if len(names) != n:
        p.error(f"--names gives {len(names)} names for {n} latent sets")
    if len(set(names)) != n:
        p.error(
            f"--names must be distinct, got {' '.join(names)}"
            if args.names
            else "latent folders of the same name: give --names"
        )
    if args.val is not None and len(args.val) != n:
        p.error(f"--val gives {len(args.val)} held-out sets for {n} latent sets")
    if args.grad_clip < 0:
        p.error(f"--grad-clip must be >= 0, got {args.grad_clip}")
    if args.width % args.heads or args.width % 4:
        p.error(f"--width {args.width} must be a multiple of 4 and of --heads {args.heads}")
    vaes = args.run or args.ckpt
    if args.inception_path:
        if vaes is None or args.fid_data is None:
            p.error("--inception-path (FID) needs --run or --ckpt (one per latent set) and --fid-data")
        if len(vaes) != n:
            p.error(f"{'--run' if args.run else '--ckpt'} gives {len(vaes)} models for {n} latent sets")
    elif vaes is not None or args.fid_data is not None:
        p.error("--run / --ckpt / --fid-data are for FID: give --inception-path too")
    budget = ProbeBudget(
        steps=args.steps,
        batch_size=args.batch_size,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        patch_size=args.patch_size,
        lr=args.lr,
        grad_clip=args.grad_clip,
        time_sampling=args.time_sampling,
        evals=args.evals,
        val_samples=args.val_samples,
    )
    log_warnings()
    reads = [s for s in args.latents + (args.val or []) if Path(s).is_dir()]
    check_output_dir(args.out, "--out", args.overwrite, reads)
    procs = processes()
    if procs.world > 1:
        raise InputError("probe runs in one process (each seed is a small model): run it without a launcher")
    sets = []
    for i, spec in enumerate(args.latents):
        held = read_latents(args.val[i], "--val") if args.val else None
        sets.append((read_latents(spec, "latents"), held))
    fid = _fid_setup(args, sets, vaes, procs.device) if args.inception_path else None
    seeds = list(range(args.seeds))
    print(f"probe: {n} latent sets x {len(seeds)} seeds, {budget.steps} steps each, on {procs.device}")

    def progress(name: str, figures: dict) -> None:
        fid_part = f", FID {figures['fid']:.2f}" if "fid" in figures else ""
        print(
            f"  {name} seed {figures['seed']}: held-out loss {figures['val_loss']:.4f} "
            f"(init {figures['val_loss_init']:.4f}){fid_part}, {figures['seconds']:.1f} s"
        )

    report = probe(
        sets,
        names,
        budget,
        seeds,
        val_fraction=args.val_fraction,
        device=procs.device,
        fid=fid,
        on_run=progress,
    )
    files = write_report(report, args.out)
    print((Path(args.out) / "probe.md").read_text(), end="")
    print("wrote " + ", ".join(map(str, files)))
    return 0


def _fid_setup(args: argparse.Namespace, sets, vaes: list[str], device) -> FidSetup:
    """The Inception network, each latent set's VAE, and the held-out images' features at each resolution."""
    inception = load_inception(args.inception_path).to(device)
    flag = "--run" if args.run else "--ckpt"
    models, real, cache = [], [], {}
    for path, (latents, _) in zip(vaes, sets):
        loaded = load_model(path if args.run else None, None if args.run else path, args.ema)
        vae = loaded.vae
        C, h, w = latents.latents.shape[1:]
        if C != vae.config.latent_channels:
            raise InputError(
                f"{flag} {path} has {vae.config.latent_channels} latent channels, the latents "
                f"{latents.source} {C}"
            )
        resolution = h * vae.downsample_factor
        if h != w:
            raise InputError(f"FID needs square latents, {latents.source} are {h}x{w}")
        check_resolution(vae, resolution, "--fid-data")
        if resolution not in cache:
            data = DataOptions(args.fid_data, split="val", resolution=resolution, batch_size=32, workers=0)
            batches = data.batches(limit=args.fid_batches * 32)
            cache[resolution] = image_stats(inception, batches, device)
        models.append(vae)
        real.append(cache[resolution])
    return FidSetup(inception, models, real, args.fid_samples, args.sampler_steps)
