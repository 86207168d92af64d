"""`vae-scale shards`: its flags, checked, then the shard writer (vae_scale/data/shards.py).

`shards` writes data rather than reading it through the loader: its --workers are encoding processes and its
--seed seeds the train/val split, not the shared data options of the commands that read shards.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vae_scale.files import check_output_dir


def shards_main(argv: list[str]) -> int:
    """`vae-scale shards SRC OUT`: write WebDataset tar shards and index.json; returns 0."""
    from vae_scale.data.shards import FORMATS, skip_summary, write_shards

    p = argparse.ArgumentParser(prog="vae-scale shards", description=shards_main.__doc__)
    p.add_argument(
        "src",
        metavar="SRC",
        help="folder of images (recursive), a glob, 'sample' or 'sample-color'; with --frames a folder of "
        "videos (and images), or 'sample-video' (camera-motion clips of the sample photographs)",
    )
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize so the short side is N (smaller images are skipped unless --keep-small)",
    )
    p.add_argument(
        "--keep-small",
        action="store_true",
        help="with --size: keep images whose short side is below N at their own size (never upscaled)",
    )
    p.add_argument("--max-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--format", choices=sorted(FORMATS), default="jpg", help="image format in the shards")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality 1-100 (default 95)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the order (default 0)")
    p.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 16),
        help="image encoding processes (default: the CPU count, at most 16)",
    )
    video = p.add_argument_group("clips (videos; see docs/video.md)")
    video.add_argument(
        "--frames",
        type=int,
        default=None,
        help="write clip shards: frames per stored clip (videos are cut into these)",
    )
    video.add_argument(
        "--min-frames",
        type=int,
        default=None,
        help="shortest clip kept, and shortest video not skipped (default --frames)",
    )
    video.add_argument(
        "--crf", type=int, default=10, help="H.264 constant quality of the clips, 0-51 (default 10)"
    )
    video.add_argument(
        "--clips-per-image",
        type=int,
        default=4,
        help="sample-video: camera-motion clips per photograph (default 4)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT, replacing the train-/val- shards and index.json there",
    )
    args = p.parse_args(argv)
    if args.size is not None and args.size <= 0:
        p.error(f"--size must be > 0, got {args.size}")
    if args.max_per_shard <= 0:
        p.error(f"--max-per-shard must be > 0, got {args.max_per_shard}")
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must be in 1..100, got {args.quality}")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.keep_small and args.size is None:
        p.error("--keep-small needs --size (without it every image keeps its own size)")
    if args.src == "sample-video" and args.frames is None:
        p.error("sample-video needs --frames (frames per clip, e.g. --frames 9)")
    if args.frames is not None:
        return _clip_shards(p, args)
    src = Path(args.src)
    reads = [] if args.src in ("sample", "sample-color") else [src if src.is_dir() else src.parent]
    check_output_dir(args.out, "OUT", args.overwrite, reads)
    index = write_shards(
        args.src,
        args.out,
        size=args.size,
        max_per_shard=args.max_per_shard,
        image_format=args.format,
        quality=args.quality,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
        keep_small=args.keep_small,
    )
    t = index["totals"]
    small = f", {t['kept_small']} below --size kept at their own size" if t["kept_small"] else ""
    captions = f", {t['captions']} with a .txt caption" if t["captions"] else ""
    print(
        f"{args.out}: {t['train']} train + {t['val']} val samples in "
        f"{len(index['splits']['train']['shards'])} + {len(index['splits']['val']['shards'])} shards, "
        f"{t['skipped']} skipped{small}{captions}"
    )
    for line in skip_summary(index):
        print(line)
    if t["kept_small"]:
        print(
            f"  the {t['kept_small']} kept below --size {args.size}: training at data.resolution={args.size} "
            "skips them (counted apart from bad data) unless data.upscale_small=true"
        )
    return 0


def _clip_shards(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`vae-scale shards SRC OUT --frames N`: clip shards (vae_scale/data/video.py)."""
    from vae_scale.data.shards import skip_summary
    from vae_scale.data.video import SAMPLE_VIDEO, write_clip_shards

    if args.frames <= 0:
        p.error(f"--frames must be > 0, got {args.frames}")
    if args.min_frames is not None and not 1 <= args.min_frames <= args.frames:
        p.error(f"--min-frames must be in 1..--frames ({args.frames}), got {args.min_frames}")
    if not 0 <= args.crf <= 51:
        p.error(f"--crf must be in 0..51, got {args.crf}")
    if args.clips_per_image <= 0:
        p.error(f"--clips-per-image must be > 0, got {args.clips_per_image}")
    if args.keep_small or args.format != "jpg":
        p.error("--keep-small and --format apply to image shards, not to clip shards (--frames)")
    check_output_dir(args.out, "OUT", args.overwrite, [] if args.src == SAMPLE_VIDEO else [Path(args.src)])
    index = write_clip_shards(
        args.src,
        args.out,
        frames=args.frames,
        size=args.size,
        min_frames=args.min_frames,
        crf=args.crf,
        quality=args.quality,
        clips_per_image=args.clips_per_image,
        max_per_shard=args.max_per_shard,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    )
    t = index["totals"]
    print(
        f"{args.out}: {t['train']} train + {t['val']} val samples ({t['clips']} clips, {t['images']} "
        "images) in "
        f"{len(index['splits']['train']['shards'])} + {len(index['splits']['val']['shards'])} shards, "
        f"{t['skipped']} files skipped"
    )
    for line in skip_summary(index):
        print(line)
    return 0
