"""`vae-scale compare RUN...`: several runs side by side, from their run folders' metrics.jsonl (its flags:
vae_scale/cli/compare.py).

    vae-scale compare runs/sd-ft-a runs/sd-ft-b --out compare.html
    vae-scale compare runs/* --metrics loss val/psnr val/lpips

Prints a table (one row per metric, one column per run: the latest value, and the best one with its step
for metrics that have a direction: losses and distances lower, psnr / ssim / active units higher) and writes
one HTML page with each metric's curves of all runs overlaid on one chart. The metrics are those of the
runs in report order (losses first); constants and data/bad/* counters are left out unless named.
"""

from __future__ import annotations

import html
from pathlib import Path

from vae_scale.commands.common import InputError
from vae_scale.files import check_output_file, write_atomic
from vae_scale.train.report import is_constant, metric_order, metric_series, read_metrics, svg_chart

RUN_FILES = ("metrics.jsonl", "config.yaml", "report.html", "run.lock")
"""A run folder's own files, which compare's page never replaces."""

HIGHER_IS_BETTER = ("psnr", "ssim", "active_units")
LOWER_IS_BETTER = ("loss", "rec", "nll", "kl", "perceptual", "lpips", "rfid", "bpd", "mse", "bits_per_dim")


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is, 0 when neither (lr, throughput, counters)."""
    leaf = metric.rsplit("/", 1)[-1]
    if leaf in HIGHER_IS_BETTER or leaf.startswith(HIGHER_IS_BETTER):
        return 1
    if metric.startswith(("data/", "kl_channel/")) or leaf.endswith("_weight"):
        return 0
    if leaf in LOWER_IS_BETTER or leaf.startswith(("bpd", "kl")):
        return -1
    return 0


def _label(run: Path, runs: list[Path]) -> str:
    """A run's column name: its folder name, or the path when two runs share a name."""
    names = [r.name for r in runs]
    return run.name if names.count(run.name) == 1 else str(run)


def compare_runs(
    runs: list[str | Path],
    metrics: list[str] | None = None,
    out: str | Path = "compare.html",
    overwrite: bool = False,
) -> str:
    """`vae-scale compare`: the table of the runs' latest (best) metrics, returned; their curves, overlaid
    metric by metric, written to the HTML page `out`. metrics None: every metric that varies in a run.

    An existing `out` is refused (OutputError) unless overwrite, and always when it is a file of a run.
    """
    runs = [Path(r) for r in runs]
    data = {}
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise InputError(f"{run}: no metrics.jsonl (not a run folder, or a run that logged nothing yet)")
        data[run] = metric_series(read_metrics(run))
    names = set().union(*(d.keys() for d in data.values()))
    if metrics:
        unknown = [m for m in metrics if m not in names]
        if unknown:
            have = ", ".join(sorted(names, key=metric_order)[:12])
            raise InputError(f"--metrics {' '.join(unknown)}: in none of the runs (they have {have}, ...)")
        metrics = list(metrics)
    else:
        metrics = [
            m
            for m in sorted(names, key=metric_order)
            if not m.startswith("data/bad/") and any(m in d and not is_constant(d[m]) for d in data.values())
        ]

    check_output_file(out, "--out", overwrite, [run / name for run in runs for name in RUN_FILES])

    labels = [_label(run, runs) for run in runs]
    table = [["metric", *labels]]
    for m in metrics:
        row = [m]
        for run in runs:
            pts = data[run].get(m)
            if not pts:
                row.append("-")
                continue
            cell = f"{pts[-1][1]:.5g}"
            d = direction(m)
            if d and len(pts) > 1:
                step, best = max(pts, key=lambda p: d * p[1])
                cell += f" (best {best:.5g} @ {step:g})"
            row.append(cell)
        table.append(row)
    steps = ["last step", *(f"{max((p[0] for s in data[r].values() for p in s), default=0):g}" for r in runs)]
    table.insert(1, steps)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")

    charts = "".join(
        svg_chart(m, [(label, data[run].get(m, [])) for run, label in zip(runs, labels, strict=True)])
        for m in metrics
        if any(data[run].get(m) for run in runs)
    )
    title = " vs ".join(labels)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;margin:.5em;vertical-align:top}}
figcaption{{font-size:13px}}pre{{font-size:13px}}</style></head><body>
<h1>vae-scale compare</h1><p>{"<br>".join(html.escape(str(r)) for r in runs)}</p>
<h2>Latest (best)</h2><pre>{html.escape(chr(10).join(lines))}</pre>
<h2>Curves</h2>{charts or "<p>No metric to chart.</p>"}</body></html>
"""
    out = Path(out)
    write_atomic(out, page)
    return "\n".join(lines)
