"""The flags several commands share, defined once: the model to load, tiled encode/decode, the data a command
reads, and the seed of the noise it draws.

The data options are one argument group for every command that reads data (`eval`, `export`, `encode`,
`train`): the same flags, the same help, and defaults that come from the config system, never from the
parser. A command that loads a run takes them from that run's config.yaml (a diffusers folder, which has
none, from DataConfig's defaults); `train` takes them from its --config and overrides.
"""

from __future__ import annotations

import argparse
import json
import logging

from vae_scale.commands.common import DataOptions, InputError, LoadedModel, load_model
from vae_scale.config import DataConfig

SPLITS = ("train", "val")

DATA_HELP = {
    "resolution": "center-crop size in pixels (default: data.resolution)",
    "batch_size": "images per process per batch (default: data.batch_size)",
    "workers": "data loader worker processes per process, 0: read in the process (default: data.workers)",
}
"""The help of the data flags whose meaning does not depend on the command."""
DATA_KEYS = {
    "data": None,
    "resolution": "data.resolution",
    "batch_size": "data.batch_size",
    "workers": "data.workers",
}
"""Each data flag's config key (--data's is data.<split>)."""


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (argparse reports anything else as a usage error, exit code 2)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def log_warnings() -> None:
    """Library warnings (skipped samples, fewer samples than asked) on stderr, one line each."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------------------------------------
# The model


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--run RUN | --ckpt PATH (required, exclusive) and --ema."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="run folder: its newest complete checkpoint")
    g.add_argument("--ckpt", help="a checkpoint folder (runs/x/checkpoints/step-...) or a diffusers folder")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    """--tile PX, --tile-norm and --tile-overlap F: tiled encode/decode of images larger than a tile."""
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="encode/decode images larger than this many pixels tile by tile (default: the model's "
        "sample_size; 0: never tile)",
    )
    p.add_argument(
        "--tile-norm",
        choices=("image", "tile"),
        default="image",
        help="image: every GroupNorm uses the whole image's statistics, the untiled result to rounding "
        "(default); tile: each tile alone, blended, as diffusers' enable_tiling()",
    )
    p.add_argument(
        "--tile-overlap",
        type=float,
        default=0.25,
        help="with --tile-norm tile: fraction of a tile its neighbour shares (default 0.25)",
    )


def tiling_from_args(args: argparse.Namespace, vae):
    """The Tiling --tile / --tile-norm / --tile-overlap ask for, its tile resolved (False for --tile 0);
    InputError for a bad geometry."""
    from vae_scale.models.tiling import Tiling

    if args.tile == 0:
        return False
    if args.tile is not None and args.tile < 0:
        raise InputError(f"--tile must be >= 0, got {args.tile}")
    tiling = Tiling(tile=args.tile or vae.config.sample_size, overlap=args.tile_overlap, norm=args.tile_norm)
    try:
        tiling.geometry(vae.downsample_factor, vae.config.sample_size)
    except ValueError as e:
        raise InputError(f"--tile / --tile-overlap: {e}") from None
    return tiling


def add_seed_arg(p: argparse.ArgumentParser) -> None:
    """--seed: the seed of the noise a command draws (sampled latents), the same for every command."""
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the noise of sampled latents: per sample key, or the prior's for sample (default 0)",
    )


# --------------------------------------------------------------------------------------------------------
# The data


def add_data_args(p: argparse.ArgumentParser, split: str | None) -> argparse._ArgumentGroup:
    """The shared data options: --data, --resolution, --batch-size, --workers, and --split when `split` names
    the split a command reads by default (a command that loads a run); split None: `train`, whose flags
    stand for its config keys."""
    if split is None:
        where = (
            "Shorthands for the config keys named in each help; defaults: the config (--config and key=value "
            "overrides over DataConfig's defaults). A flag and its own key=value together are an error."
        )
        data_help = "training shards: a brace pattern, folder, comma-separated list (\\, for a comma in "
        data_help += "a path) or URL, or 'synthetic'"
        data_help += " (default: data.train)"
    else:
        where = (
            "Defaults: the data section of the run's config.yaml (--run or a checkpoint); a diffusers folder "
            "has none, so DataConfig's defaults."
        )
        data_help = "shards: a brace pattern, folder, comma-separated list (\\, for a comma in a path) or "
        data_help += "URL, or 'synthetic' "
        data_help += f"(default: data.<split>, so data.{split} unless --split)"
    g = p.add_argument_group("data options (the same in every command that reads data)", where)
    g.add_argument("--data", metavar="SHARDS", help=data_help)
    if split is not None:
        g.add_argument(
            "--split",
            default=split,
            choices=SPLITS,
            help=f"which shards of a folder, and which of data.train / data.val --data defaults to "
            f"(default: {split})",
        )
    g.add_argument("--resolution", type=positive_int, metavar="PX", help=DATA_HELP["resolution"])
    g.add_argument("--batch-size", type=positive_int, metavar="N", help=DATA_HELP["batch_size"])
    g.add_argument("--workers", type=non_negative_int, metavar="N", help=DATA_HELP["workers"])
    return g


def add_clip_args(g: argparse._ArgumentGroup) -> None:
    """--frames N and --frame-stride S, for a command that reads clip shards (`eval`, `reconstruct`)."""
    g.add_argument(
        "--frames",
        type=positive_int,
        metavar="N",
        help="read the shards as clips of N = 1 + 4k frames, the first N of each video (default: "
        "data.frames; 1: images)",
    )
    g.add_argument(
        "--frame-stride",
        type=positive_int,
        metavar="S",
        help="a clip takes every S-th stored frame (default: data.frame_stride)",
    )


def data_options(args: argparse.Namespace, cfg: DataConfig, origin=None) -> DataOptions:
    """What the data flags ask for, each flag not given taken from `cfg` (the loaded run's data section,
    read from the file `origin`: a shell command there is refused unless --data gives it)."""
    return DataOptions.from_config(
        cfg,
        args.split,
        data=args.data,
        resolution=args.resolution,
        batch_size=args.batch_size,
        workers=args.workers,
        frames=getattr(args, "frames", None),  # the commands that read clips have these (add_clip_args)
        frame_stride=getattr(args, "frame_stride", None),
        origin=origin,
    )


def model_and_data(args: argparse.Namespace) -> tuple[LoadedModel, DataOptions]:
    """The model --run / --ckpt / --ema name, and the data flags over its run's data section."""
    loaded = load_model(args.run, args.ckpt, args.ema)
    return loaded, data_options(args, loaded.config.data, loaded.config_file)


def data_overrides(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[str]:
    """`train`'s data flags as config overrides (--data is data.train); a usage error when a flag and its
    own key=value are both given."""
    given = {k: getattr(args, k) for k in DATA_KEYS if getattr(args, k) is not None}
    out = []
    keys = {item.split("=", 1)[0].strip() for item in args.overrides}
    for name, value in given.items():
        key = DATA_KEYS[name] or "data.train"
        if key in keys:
            p.error(f"--{name.replace('_', '-')} and {key}=... both given; keep one")
        # a JSON string is a YAML string: a brace pattern such as {a,b} stays a shard pattern
        out.append(f"{key}={json.dumps(value)}")
    return out
