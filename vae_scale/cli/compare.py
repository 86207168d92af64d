"""`vae-scale compare`: its flags, then vae_scale.commands.compare."""

from __future__ import annotations

import argparse


def compare_main(argv: list[str]) -> int:
    """`vae-scale compare RUN... [--metrics M ...] [--out compare.html]`."""
    from vae_scale.commands.compare import compare_runs

    p = argparse.ArgumentParser(
        prog="vae-scale compare", description="Latest and best metrics of runs, and their curves overlaid."
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with metrics.jsonl)")
    p.add_argument("--metrics", nargs="+", help="metrics to compare (default: every varying one)")
    p.add_argument("--out", default="compare.html", help="the HTML page (default compare.html)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out page")
    args = p.parse_args(argv)
    print(compare_runs(args.runs, args.metrics, args.out, args.overwrite))
    print(f"wrote {args.out}")
    return 0
