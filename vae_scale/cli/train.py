"""`vae-scale train` and `vae-scale demo`: the commands that train."""

from __future__ import annotations

import argparse
import logging

from vae_scale.cli.options import add_data_args, data_overrides, log_warnings
from vae_scale.config import config_parser, load_config

log = logging.getLogger("vae_scale.train.trainer")


def train_parser() -> argparse.ArgumentParser:
    """`vae-scale train`'s flags: --config, key=value overrides, --dry-run and the shared data options."""
    p = config_parser("vae-scale train", "Train a VAE.")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything a run needs (data, validation samples, weights, W&B login, the checkpoint to "
        "resume, writable outputs), print the plan (processes, batch, precision, sharding, memory) and exit",
    )
    add_data_args(p, split=None)
    return p


def train_main(argv: list[str]) -> int:
    """`vae-scale train --config NAME|PATH [--dry-run] [data options] [key=value ...]`."""
    from vae_scale.train.preflight import WillNotFit
    from vae_scale.train.startup import check_config_commands
    from vae_scale.train.trainer import TrainingStopped, train

    p = train_parser()
    args = p.parse_intermixed_args(argv)  # key=value overrides before, between or after the flags
    overrides = [*args.overrides, *data_overrides(args, p)]
    cfg = load_config(args.config, overrides)
    check_config_commands(args.config, cfg, {item.split("=", 1)[0].strip() for item in overrides})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        train(cfg, dry_run=args.dry_run)
    except WillNotFit as e:
        log.error("%s", e)
        return 2
    except TrainingStopped as e:
        log.error("%s", e)
        return 1
    return 0


def demo_parser() -> argparse.ArgumentParser:
    """`vae-scale demo`'s flags. Its --data is where it writes the sample shards it then trains on; --video
    runs the same demo on clips (a flag rather than a command: the other commands read clips with a flag
    too, --frames, and both demos take the same flags)."""
    from vae_scale.commands import demo

    guard = demo.DEFAULT_TIME_GUARD_S
    p = argparse.ArgumentParser(prog="vae-scale demo", description=demo.__doc__.split("\n\n")[0])
    p.add_argument(
        "--video",
        action="store_true",
        help="the video demo: wan-tiny-video on camera-motion clips of the photographs, per-frame PSNR and "
        "flicker against trilinear down-and-up at equal numbers",
    )
    p.add_argument("--out", help="run folder (default runs/demo; runs/demo-video with --video)")
    p.add_argument(
        "--time-guard",
        type=float,
        default=guard,
        help=f"stop training after this many seconds (default {guard:.0f}): a stall guard",
    )
    p.add_argument(
        "--data",
        help="where the sample shards go, reused when present (default runs/demo-data; runs/demo-video-data "
        "with --video)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def demo_main(argv: list[str]) -> int:
    """`vae-scale demo [--video] [--time-guard S] [--out DIR] [--data DIR] [key=value ...]`."""
    from vae_scale.commands.demo import run_demo
    from vae_scale.commands.demo_video import VideoDemo

    p = demo_parser()
    args = p.parse_intermixed_args(argv)
    if args.time_guard <= 0:
        p.error(f"--time-guard must be > 0 seconds, got {args.time_guard}")
    log_warnings()
    return run_demo(args.out, args.data, args.time_guard, args.overrides, VideoDemo() if args.video else None)
