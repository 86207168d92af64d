"""`vae-scale export` and `vae-scale import`: their flags, checked, then the functions of
vae_scale.commands.export."""

from __future__ import annotations

import argparse
from pathlib import Path

from vae_scale.cli.options import (
    add_data_args,
    add_model_args,
    add_seed_arg,
    log_warnings,
    model_and_data,
    positive_int,
)
from vae_scale.commands.common import processes
from vae_scale.commands.export import DEFAULT_STATS_SAMPLES, ExportError, export_vae, import_vae
from vae_scale.files import check_output_dir, check_output_file


def export_parser() -> argparse.ArgumentParser:
    """`vae-scale export`'s flags."""
    p = argparse.ArgumentParser(
        prog="vae-scale export",
        description="Write a diffusers AutoencoderKL. A fine-tune of imported weights keeps the imported "
        "config.json (scaling_factor, shift_factor, latents_mean/std, sample_size) and prints the measured "
        "latent statistics as advice; a VAE trained from scratch gets measured ones.",
    )
    add_model_args(p)
    p.add_argument(
        "--out",
        required=True,
        help="diffusers: a folder; safetensors: a .safetensors file "
        "(or a folder, which gets vae.safetensors)",
    )
    p.add_argument("--format", default="diffusers", choices=("diffusers", "safetensors"))
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the export in a non-empty --out folder (or an existing file), removing the weights "
        "variants and latent_statistics.json an earlier export left there",
    )
    p.add_argument(
        "--measure-latents",
        action="store_true",
        help="write measured statistics into config.json (FLUX.2: into bn's running statistics) even for a "
        "fine-tune of imported weights (for a new diffusion model trained on these latents; the imported "
        "one expects the kept values)",
    )
    p.add_argument(
        "--no-stats",
        action="store_true",
        help="measure nothing: keep scaling_factor, shift_factor and latents_mean/std as the model "
        "(or the imported config.json) has them",
    )
    p.add_argument(
        "--no-shift", action="store_true", help="measured: shift_factor null (SD style: scale only)"
    )
    p.add_argument(
        "--no-channel-stats",
        action="store_true",
        help="measured: latents_mean / latents_std null (for pipelines that pair them with scaling_factor)",
    )
    p.add_argument(
        "--n",
        type=positive_int,
        default=DEFAULT_STATS_SAMPLES,
        help=f"samples the statistics are measured on (default {DEFAULT_STATS_SAMPLES})",
    )
    p.add_argument("--sample", action="store_true", help="measure sampled latents, not posterior means")
    add_seed_arg(p)
    add_data_args(p, split="train")
    return p


def export_main(argv: list[str]) -> int:
    """`vae-scale export --run RUN --out DIR [--format diffusers|safetensors] [--ema] [--measure-latents]`."""
    p = export_parser()
    args = p.parse_args(argv)
    if args.measure_latents and args.no_stats:
        p.error("--measure-latents and --no-stats contradict each other")
    out = Path(args.out)
    # What is read, as far as the flags tell before loading: export_vae checks again with the checkpoint.
    reads = [Path(args.run or args.ckpt)]
    reads += [reads[0] / "vae"] if args.ckpt else []
    if args.format == "diffusers":
        if out.suffix == ".safetensors" or out.is_file():
            raise ExportError(f"--out {out}: --format diffusers writes a folder")
        check_output_dir(out, "--out", args.overwrite, reads)
    else:
        file = out if out.suffix == ".safetensors" else out / "vae.safetensors"
        check_output_file(file, "--out", args.overwrite, reads if args.ckpt else [])
    log_warnings()
    loaded, data = model_and_data(args)
    lines = export_vae(
        loaded,
        out,
        data,
        fmt=args.format,
        n=args.n,
        sample=args.sample,
        seed=args.seed,
        measure_latents=args.measure_latents,
        no_stats=args.no_stats,
        shift=not args.no_shift,
        channel_stats=not args.no_channel_stats,
        device=processes().device,
        overwrite=args.overwrite,
    )
    print("\n".join(lines))
    return 0


def import_main(argv: list[str]) -> int:
    """`vae-scale import --diffusers DIR --out RUN [--config PRESET] [key=value ...]`: a run to fine-tune."""
    p = argparse.ArgumentParser(
        prog="vae-scale import", description="Start a run folder from a diffusers AutoencoderKL."
    )
    p.add_argument("--diffusers", required=True, help="an AutoencoderKL folder (or a pipeline folder)")
    p.add_argument("--out", required=True, help="the new run folder")
    p.add_argument("--config", "-c", default="sd-f8", help="preset or YAML for the rest (default sd-f8)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config.yaml / init weights")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = p.parse_args(argv)
    print("\n".join(import_vae(args.diffusers, args.out, args.config, args.overrides, args.force)))
    return 0
