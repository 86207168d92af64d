"""What `vae-scale probe` writes: probe.json, a markdown table and an SVG plot of the held-out losses."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from vae_scale.files import write_atomic
from vae_scale.train.report import PALETTE


def _pm(s: dict[str, float], digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per autoencoder, with the budget and how to read it."""
    b, rows = report["budget"], report["autoencoders"]
    has_fid = any("fid" in r["summary"] for r in rows)
    head = ["autoencoder", "latent", "train / held-out", "val loss", "min – max"]
    head += [f"t={t}" for t in b["val_times"]] + ["at init"] + (["FID"] if has_fid else []) + ["s / seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["summary"]
        cells = [
            r["name"],
            "x".join(map(str, r["latent_shape"])),
            f"{r['train_samples']} / {r['val_samples']}",
            _pm(s["val_loss"]),
            f"{s['val_loss']['min']:.4f} – {s['val_loss']['max']:.4f}",
            *(f"{s['val_loss_t'][str(t)]['mean']:.4f}" for t in b["val_times"]),
            f"{s['val_loss_init']['mean']:.4f}",
            *([_pm(s["fid"], 2) if "fid" in s else "–"] if has_fid else []),
            f"{s['seconds']['mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    budget = (
        f"{b['steps']} steps x {b['batch_size']} latents, SiT width {b['width']} depth {b['depth']} "
        f"heads {b['heads']} patch {b['patch_size']}, lr {b['lr']:g}, t {b['time_sampling']}, "
        f"seeds {', '.join(map(str, b['seeds']))}; on {report['device']}, {report['threads']} CPU threads"
    )
    notes = [
        "",
        f"Budget: {budget}.",
        "val loss: flow-matching loss on held-out latents (standardised per channel), mean over the times "
        "t; mean ± std over seeds. Lower is easier to learn. A model that predicts v = 0 scores 2.",
    ]
    if len({r["heldout_keys"] for r in rows}) > 1:
        notes.append(
            "Warning: the autoencoders' held-out sets hold different keys; their losses are not "
            "measured on the same images."
        )
    return "\n".join(lines + notes) + "\n"


def plot_svg(report: dict[str, Any], w: int = 460, h: int = 300) -> str:
    """Two charts side by side: held-out loss against training step, and the final held-out loss against
    t; each autoencoder's mean over seeds as a line, its range over seeds as a band (left) or whiskers
    (right)."""
    rows = report["autoencoders"]
    times = [float(t) for t in report["budget"]["val_times"]]
    left, right, top, bottom = 56, 12, 28, 40
    parts = []

    def panel(x_off: int, title: str, xlabel: str, series: list[list[tuple[float, float, float, float]]]):
        xs = [p[0] for s in series for p in s]
        ys = [v for s in series for p in s for v in p[1:]]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys)
        pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

        def sx(x: float) -> float:
            return x_off + left + (x - x0) / (x1 - x0) * (w - left - right)

        def sy(y: float) -> float:
            return top + (y1 - y) / (y1 - y0) * (h - top - bottom)

        parts.append(
            f'<rect x="{x_off + left}" y="{top}" width="{w - left - right}" '
            f'height="{h - top - bottom}" fill="#fafafa" stroke="#bbb"/>'
        )
        parts.append(
            f'<text x="{x_off + w / 2:.0f}" y="16" font-size="12" text-anchor="middle">'
            f"{html.escape(title)}</text>"
        )
        parts.append(
            f'<text x="{x_off + (left + w - right) / 2:.0f}" y="{h - 6}" font-size="10" '
            f'text-anchor="middle">{html.escape(xlabel)}</text>'
        )
        for k in range(5):
            y = y0 + (y1 - y0) * k / 4
            parts.append(
                f'<text x="{x_off + left - 4}" y="{sy(y) + 3:.1f}" font-size="10" '
                f'text-anchor="end">{y:.3g}</text>'
            )
            parts.append(
                f'<line x1="{x_off + left}" x2="{x_off + w - right}" y1="{sy(y):.1f}" '
                f'y2="{sy(y):.1f}" stroke="#e8e8e8"/>'
            )
        for x in sorted(set(xs)) if len(set(xs)) <= 6 else [x0 + (x1 - x0) * k / 4 for k in range(5)]:
            parts.append(
                f'<text x="{sx(x):.1f}" y="{h - bottom + 13}" font-size="10" '
                f'text-anchor="middle">{x:g}</text>'
            )
        for i, s in enumerate(series):
            colour = PALETTE[i % len(PALETTE)]
            if len(s) > 1 and xlabel == "step":  # the range over seeds as a band
                band = [(sx(x), sy(hi)) for x, _, _, hi in s] + [(sx(x), sy(lo)) for x, _, lo, _ in s[::-1]]
                points = " ".join(f"{a:.1f},{b:.1f}" for a, b in band)
                parts.append(f'<polygon points="{points}" fill="{colour}" fill-opacity="0.15"/>')
            else:
                for x, _, lo, hi in s:
                    parts.append(
                        f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(lo):.1f}" y2="{sy(hi):.1f}" '
                        f'stroke="{colour}"/>'
                    )
            line = " ".join(f"{sx(x):.1f},{sy(m):.1f}" for x, m, _, _ in s)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{line}"/>')
            for x, m, _, _ in s:
                parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(m):.1f}" r="2" fill="{colour}"/>')

    curves = []
    for r in rows:
        steps = [c[0] for c in r["runs"][0]["curve"]]
        per_step = [[run["curve"][k][1] for run in r["runs"]] for k in range(len(steps))]
        # from the first evaluation after init: the loss at init (about 2, in the table) would flatten them
        curves.append([(s, sum(v) / len(v), min(v), max(v)) for s, v in zip(steps, per_step)][1:])
    panel(0, "held-out flow-matching loss during training", "step", curves)
    by_t = [
        [
            (
                t,
                r["summary"]["val_loss_t"][str(t)]["mean"],
                r["summary"]["val_loss_t"][str(t)]["min"],
                r["summary"]["val_loss_t"][str(t)]["max"],
            )
            for t in times
        ]
        for r in rows
    ]
    panel(w, "final held-out loss at each t", "t", by_t)
    legend = "".join(
        f'<text x="{2 * w - 8}" y="{top + 14 + 14 * i}" font-size="11" text-anchor="end" '
        f'fill="{PALETTE[i % len(PALETTE)]}">{html.escape(r["name"])}</text>'
        for i, r in enumerate(rows)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" viewBox="0 0 {2 * w} {h}" '
        f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>{"".join(parts)}{legend}'
        "</svg>\n"
    )


def write_report(report: dict[str, Any], out: str | Path) -> list[Path]:
    """probe.json, probe.md and probe.svg in `out` (each written whole or not at all)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "probe.json": json.dumps(report, indent=2) + "\n",
        "probe.md": format_table(report),
        "probe.svg": plot_svg(report),
    }
    for name, text in files.items():
        write_atomic(out / name, text)
    return [out / name for name in files]
