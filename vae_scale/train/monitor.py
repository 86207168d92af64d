"""What a run shows: W&B (through Accelerate's tracker), a tqdm bar, and the run folder itself.

Everything logged also lands in the run folder -- metrics.jsonl, images/*.png and a static report.html
with loss curves, the latest grids and the config -- so a run is readable without W&B.
Only the main process writes; the other ranks' Monitor methods return at once. A write that fails (a full
disk) warns once per kind of file and training goes on: the run's state is in its checkpoints, not here.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import resource
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vae_scale.eval.spectrum import bin_centres
from vae_scale.files import write_atomic

log = logging.getLogger(__name__)


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Tile rows of image batches, each (N, 3, H, W) in [-1, 1], into one (3, H', W') grid in [0, 1]."""
    n = max(r.shape[0] for r in rows)
    _, c, h, w = rows[0].shape
    grid = torch.ones(c, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        row = ((row.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:n]
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y : y + h, x : x + w] = img
    return grid


def save_png(img: torch.Tensor, path: Path) -> None:
    """Write a (3, H, W) image in [0, 1] as PNG."""
    arr = (img.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LogWindow:
    """The steps since the last metrics row: averages come from its finite steps (a skipped step's values
    are not a measurement), throughput from every step it ran."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Empty, starting now."""
        self.totals: dict[str, torch.Tensor] = {}  # on the device
        self.host_totals: dict[str, float] = {}  # numbers the host already has (the learning rate)
        self.finite = self.ran = 0
        self.data_wait = 0.0  # seconds the steps waited for their batches
        self.start = time.time()

    def add(self, logs: dict[str, torch.Tensor | float], finite: bool) -> None:
        """One step's logs, tensors summed on the device and numbers on the host (no transfer either way);
        `finite`: whether the step was applied."""
        self.ran += 1
        if finite:
            self.finite += 1
            for k, v in logs.items():
                if isinstance(v, torch.Tensor):
                    self.totals[k] = self.totals.get(k, 0) + v
                else:
                    self.host_totals[k] = self.host_totals.get(k, 0.0) + float(v)

    def device_means(self) -> tuple[list[str], torch.Tensor | None]:
        """(names, a (len(names),) float32 tensor on the device) of the tensor logs averaged over the finite
        steps; ([], None) when no step was finite."""
        keys = sorted(self.totals)
        if not keys or not self.finite:
            return [], None
        return keys, torch.stack([self.totals[k].float() for k in keys]) / self.finite

    def host_means(self) -> dict[str, float]:
        """The number logs averaged over the finite steps (the same on every rank); {} when none was."""
        return {k: v / self.finite for k, v in self.host_totals.items()} if self.finite else {}


def peak_memory(device: torch.device) -> tuple[str, float]:
    """(name, GiB) of this process's peak: device memory held by tensors on a GPU (`peak_memory_gb`), the
    whole process's resident set on a CPU (`peak_rss_gb`)."""
    if device.type == "cuda":
        return "peak_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30
    unit = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, KiB on Linux
    return "peak_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit


class Monitor:
    """Scalars, images, progress and the local report for one run (main process only)."""

    def __init__(self, cfg, accelerator, start_step: int, total_steps: int):
        self.cfg, self.acc = cfg, accelerator
        self.main = accelerator.is_main_process
        self.run_dir = Path(cfg.run.dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.images_dir = self.run_dir / "images"
        self.latest_images: dict[str, str] = {}
        self.wandb = None
        self.bar = None
        self.failed_writes: set[str] = set()  # kinds of file a write of failed (warned about once)
        if not self.main:
            return
        self.images_dir.mkdir(parents=True, exist_ok=True)
        if cfg.log.wandb != "disabled":
            self._init_wandb()
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=cfg.run.name, dynamic_ncols=True)
        self._t0 = time.time()

    def _init_wandb(self) -> None:
        # The W&B run id lives in the run folder so a resumed run continues the same W&B run.
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        write_atomic(id_file, run_id + "\n")
        init = {
            "id": run_id,
            "resume": "allow",
            "name": self.cfg.run.name,
            "dir": str(self.run_dir),
            "mode": self.cfg.log.wandb,
        }
        if self.cfg.log.entity:
            init["entity"] = self.cfg.log.entity
        self.acc.init_trackers(self.cfg.log.project, config=self.cfg.to_dict(), init_kwargs={"wandb": init})
        self.wandb = self.acc.get_tracker("wandb", unwrap=True)

    # -- logging -------------------------------------------------------------------------------------------

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A write to the run folder that may fail (a full disk): the first failure of each kind warns, and
        training goes on without that file."""
        try:
            yield
        except OSError as e:
            if what not in self.failed_writes:
                self.failed_writes.add(what)
                log.warning(
                    "could not write %s in %s (%s); training goes on, and this is said once",
                    what,
                    self.run_dir,
                    e.strerror or e,
                )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log scalars at `step` to W&B and metrics.jsonl."""
        if not self.main:
            return
        values = {k: float(v) for k, v in values.items()}
        line = json.dumps({"step": step, "time": time.time(), **values}) + "\n"
        with self._writing("metrics.jsonl"):
            size = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
            try:
                with open(self.metrics_path, "a") as f:
                    f.write(line)
            except OSError:
                # A torn row would glue itself to the next one: cut the file back to its last whole row.
                try:
                    os.truncate(self.metrics_path, size)
                except OSError:
                    pass
                raise
        if self.wandb is not None:
            self.acc.log(values, step=step)

    def images(self, step: int, grids: dict[str, torch.Tensor]) -> None:
        """Log (3, H, W) grids in [0, 1] to W&B and images/<name>-<step>.png."""
        if not self.main:
            return
        for name, grid in grids.items():
            path = self.images_dir / f"{name}-{step:09d}.png"
            with self._writing("preview images"):
                save_png(grid, path)
                self.latest_images[name] = path.name
        if self.wandb is not None:
            import wandb

            self.wandb.log(
                {f"images/{k}": wandb.Image(str(self.images_dir / v)) for k, v in self.latest_images.items()},
                step=step,
            )

    def spectrum(self, step: int, results: dict[str, float]) -> None:
        """Plot the latent's and the images' radially averaged spectra (evaluate's spectrum/<side>/<k>) into
        spectrum.svg, which report.html shows, and to W&B as a line plot."""
        if not self.main:
            return
        curves = spectrum_curves(results)
        with self._writing(SPECTRUM_FILE):
            write_atomic(self.run_dir / SPECTRUM_FILE, spectrum_svg(curves, step))
        if self.wandb is not None:
            import wandb

            names = sorted(curves)
            plot = wandb.plot.line_series(
                xs=[[f for f, _ in curves[n]] for n in names],
                ys=[[v for _, v in curves[n]] for n in names],
                keys=names,
                title="radially averaged spectrum (1 = white noise)",
                xname="radial frequency / Nyquist",
            )
            self.wandb.log({"spectrum": plot}, step=step)

    def progress(self, step: int, **postfix: float) -> None:
        """Advance the bar to `step` with a short postfix (loss, img/s)."""
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """A line on the console that does not break the bar (main process)."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def report(self) -> Path | None:
        """(Re)write report.html from metrics.jsonl, the latest grids and the config; None when it could not
        be written (warned about once)."""
        if not self.main:
            return None
        with self._writing("report.html"):
            return write_report(self.run_dir, self.cfg.to_yaml(), self.latest_images)
        return None

    def close(self) -> None:
        """Write the report, finish W&B and close the bar."""
        if not self.main:
            return
        self.report()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.acc.end_training()


# --------------------------------------------------------------------------------------------------------
# The static report


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl (a torn last line, from a kill mid-write, is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# Curves in reading order: the objective and its terms first, then held-out metrics, the optimisation,
# throughput, and the data counters, with the per-kind bad-data counters (almost always 0) last.
LOSS_TERMS = (
    "loss",
    "rec",
    "nll",
    "kl",
    "perceptual",
    "g_loss",
    "d_loss",
    "d_weight",
    "disc_factor",
    "logits_real",
    "logits_fake",
    "bits_per_dim",
    "kl_free_bits",
    "logvar",
    "log_scale",
    "kl_weight",
)
OPTIMISATION = ("grad_norm", "lr", "active_units")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def metric_order(name: str) -> tuple:
    """Sort key of a metric name for reports: losses first (loss, rec, kl, ...), then val/*, the
    optimisation (grad_norm, lr, kl_channel/<c> in channel order), the rest, data/*, and data/bad/* last."""
    if name in LOSS_TERMS:
        return (0, LOSS_TERMS.index(name), name)
    if name.startswith("val/"):
        return (1, 0, name)
    if name in OPTIMISATION:
        return (2, OPTIMISATION.index(name), name)
    if name.startswith("kl_channel/"):
        suffix = name.split("/", 1)[1]
        return (3, int(suffix) if suffix.isdigit() else 0, name)
    if name.startswith("data/bad/"):
        return (6, 0, name)
    if name.startswith("data/"):
        return (5, 0, name)
    return (4, 0, name)


def metric_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value), ...]} of the finite numbers in metrics.jsonl rows, in report order."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                series.setdefault(k, []).append((r["step"], float(v)))
    return {k: series[k] for k in sorted(series, key=metric_order)}


def is_constant(points: list[tuple[float, float]]) -> bool:
    """A series worth a value rather than a chart: one point, or every value the same."""
    values = [v for _, v in points]
    return len(values) < 2 or max(values) - min(values) <= 1e-12 * max(1.0, abs(values[0]))


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About n round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if raw <= m * mag)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_chart(
    title: str, series: list[tuple[str, list[tuple[float, float]]]], w: int = 440, h: int = 230
) -> str:
    """One inline SVG chart of one or more (label, [(step, value)]) series, overlaid with a legend.

    The y axis spans the data with a 5% margin (a log axis when positive values span a factor over 20),
    with round ticks and grid lines; the caption gives each series' latest value.
    """
    series = [(label, pts) for label, pts in series if pts]
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    log_y = min(ys) > 0 and max(ys) / min(ys) > 20
    f = math.log10 if log_y else (lambda v: v)
    y0, y1 = f(min(ys)), f(max(ys))
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    left, right, top, bottom = 58, 10, 10, 34

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return top + (y1 - f(y)) / (y1 - y0) * (h - top - bottom)

    parts = [
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="#fafafa" stroke="#bbb"/>'
    ]
    if log_y:
        decades = range(math.floor(y0), math.ceil(y1) + 1)
        ticks = [m * 10.0**e for e in decades for m in (1, 2, 5) if y0 <= math.log10(m * 10.0**e) <= y1]
        if len(ticks) > 6:
            ticks = [t for t in ticks if f"{t:.0e}".startswith("1")]
    else:
        ticks = _nice_ticks(y0, y1)
    for t in ticks:
        y = top + (y1 - f(t)) / (y1 - y0) * (h - top - bottom)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{t:.4g}</text>')
    for t in _nice_ticks(x0, x1, 5):
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{h - bottom}" stroke="#eee"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{h - bottom + 13}" font-size="10" text-anchor="middle">{t:g}</text>'
        )
    parts.append(
        f'<text x="{(left + w - right) / 2:.0f}" y="{h - 4}" font-size="10" text-anchor="middle">step</text>'
    )
    captions = []
    for i, (label, pts) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        name = f'<span style="color:{colour}">&#9632; {html.escape(label)}</span> ' if len(series) > 1 else ""
        captions.append(f"{name}{pts[-1][1]:.5g} at step {pts[-1][0]:g}")
    scale = " (log scale)" if log_y else ""
    return (
        f'<figure><svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">{"".join(parts)}</svg>'
        f"<figcaption><b>{html.escape(title)}</b>{scale}<br>{'<br>'.join(captions)}</figcaption></figure>"
    )


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# What each grid's rows are, top to bottom (train.py logs them in this order).
GRID_ROWS = {
    "reconstruction": ("input", "reconstruction (posterior mean)", "EMA reconstruction"),
    "prior_samples": ("decodes of latents drawn from N(0, I)",),
}


def _latest_images(run_dir: Path) -> dict[str, str]:
    """{grid name: newest file} in images/ (files are <name>-<step:09d>.png)."""
    latest: dict[str, str] = {}
    folder = run_dir / "images"
    for path in sorted(folder.glob("*-*.png")) if folder.is_dir() else []:
        name, _, step = path.stem.rpartition("-")
        if step.isdigit():
            latest[name] = path.name  # sorted: the last one is the newest step
    return latest


def _grid_figure(run_dir: Path, name: str, file: str, ema: bool) -> str:
    """A grid at a readable size (small images scaled up, pixelated), with its step and row labels."""
    try:
        with Image.open(run_dir / "images" / file) as img:
            width = img.size[0]
    except OSError:
        width = 0
    scale = max(1, min(4, 640 // width)) if width else 1
    size = f' width="{width * scale}"' if width else ""
    rows = list(GRID_ROWS.get(name, ()))
    if name == "reconstruction" and not ema:
        rows = rows[:2]
    step = file.rsplit("-", 1)[-1].split(".")[0].lstrip("0") or "0"
    label = f"{html.escape(name)} at step {step}"
    if rows:
        label += ": rows, top to bottom: " + ", ".join(html.escape(r) for r in rows)
    return (
        f'<figure><img src="images/{html.escape(file)}"{size} style="image-rendering:pixelated">'
        f"<figcaption>{label}</figcaption></figure>"
    )


def write_report(
    run_dir: Path,
    config_yaml: str,
    latest_images: dict[str, str],
    sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """A self-contained report.html (inline SVG charts, no scripts) for a run folder.

    Sections: the caller's own `sections` first ((heading, HTML body) pairs, e.g. the demo's results), then
    latest values of every metric (losses first), the curves in the same order, the metrics that never
    changed as values, the latest image grids (labelled, scaled to a readable size), the config.
    """
    import yaml

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    series = metric_series(rows)
    varying = {k: pts for k, pts in series.items() if not is_constant(pts)}
    constant = {k: pts for k, pts in series.items() if is_constant(pts)}
    latest = _table(
        [
            [
                html.escape(k),
                f"{pts[-1][1]:.6g}",
                f"{pts[-1][0]:g}",
                f"{min(v for _, v in pts):.6g}",
                f"{max(v for _, v in pts):.6g}",
            ]  # fmt: skip
            for k, pts in varying.items()
        ],
        ["metric", "latest", "at step", "min", "max"],
    )
    charts = "".join(svg_chart(k, [(k, pts)]) for k, pts in varying.items())
    constants = _table(
        [[html.escape(k), f"{pts[-1][1]:.6g}", f"{len(pts)}"] for k, pts in constant.items()],
        ["metric", "value", "times logged"],
    )
    try:
        ema = float((yaml.safe_load(config_yaml) or {}).get("optim", {}).get("ema_decay", 0)) > 0
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        ema = False
    images = {**_latest_images(run_dir), **latest_images}
    grids = "".join(_grid_figure(run_dir, k, v, ema) for k, v in sorted(images.items()))
    step = f", step {rows[-1]['step']}" if rows else ""
    parts = [
        *sections,
        ("Latest values", latest if varying else "<p>No metrics yet.</p>"),
        ("Curves", charts or "<p>No curves yet.</p>"),
        ("Constant values", constants if constant else "<p>None.</p>"),
        ("Images", grids or "<p>No images yet.</p>"),
        ("Config", f"<pre>{html.escape(config_yaml)}</pre>"),
    ]
    spectrum = spectrum_figure(run_dir)
    if spectrum:
        parts.insert(-1, ("Latent spectrum", spectrum))
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in parts)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;margin:.5em;vertical-align:top}}
figcaption{{font-size:13px;max-width:640px}}table{{border-collapse:collapse}}
td,th{{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}}td:nth-child(n+2){{text-align:right}}
</style></head><body>
<h1>vae-scale run: {html.escape(run_dir.name)}{step}</h1>
{body}</body></html>
"""
    path = run_dir / "report.html"
    write_atomic(path, page)
    return path


# --------------------------------------------------------------------------------------------------------
# The latent spectrum plot (evaluation's `spectrum` metric)

SPECTRUM_FILE = "spectrum.svg"
"""The newest evaluation's spectrum plot in the run folder; report.html includes it when present."""


def spectrum_curves(results: dict[str, float]) -> dict[str, list[tuple[float, float]]]:
    """{"latent": [(frequency, value)], "rgb": [...]} from spectrum/<side>/<k> keys (bin centres as x)."""
    centres = bin_centres()
    curves: dict[str, list[tuple[float, float]]] = {}
    for key, value in results.items():
        _, side, k = key.split("/")
        curves.setdefault(side, []).append((centres[int(k)], float(value)))
    return {side: sorted(points) for side, points in curves.items()}


def spectrum_svg(curves: dict[str, list[tuple[float, float]]], step: int, w: int = 420, h: int = 240) -> str:
    """An SVG plot of spectra on a log axis: relative power (1 = white noise) against radial frequency."""
    colours = {"latent": "#1f77b4", "rgb": "#ff7f0e"}
    values = [v for pts in curves.values() for _, v in pts if v > 0]
    lo = math.floor(math.log10(min(values))) if values else -1
    hi = math.ceil(math.log10(max(values))) if values else 1
    hi = max(hi, lo + 1)
    left, right, top, bottom = 48, 90, 12, 34

    def sx(f: float) -> float:
        return left + f * (w - left - right)

    def sy(v: float) -> float:
        return top + (hi - math.log10(max(v, 10.0**lo))) / (hi - lo) * (h - top - bottom)

    parts = [
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="#fafafa" stroke="#bbb"/>'
    ]
    for e in range(lo, hi + 1):
        y = sy(10.0**e)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end">1e{e}</text>')
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<text x="{sx(f):.1f}" y="{h - bottom + 13}" font-size="10" text-anchor="middle">{f:g}</text>'
        )
    parts.append(
        f'<text x="{(left + w - right) / 2:.0f}" y="{h - 4}" font-size="10" text-anchor="middle">'
        "radial frequency / Nyquist</text>"
    )
    for i, (side, pts) in enumerate(sorted(curves.items())):
        colour = colours.get(side, "#2ca02c")
        path = " ".join(f"{sx(f):.1f},{sy(v):.1f}" for f, v in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts += [f'<circle cx="{sx(f):.1f}" cy="{sy(v):.1f}" r="2" fill="{colour}"/>' for f, v in pts]
        parts.append(
            f'<text x="{w - right + 6}" y="{top + 12 + 14 * i}" font-size="11" fill="{colour}">'
            f"{html.escape(side)}</text>"
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
        + "".join(parts)
        + "</svg>\n"
        + f"<!-- step {step}: mean energy per DCT coefficient over the mean of all, DC left out -->\n"
    )


def spectrum_figure(run_dir: Path) -> str:
    """The newest spectrum.svg inline as a figure for the report, or "" before the first evaluation."""
    path = Path(run_dir) / SPECTRUM_FILE
    if not path.is_file():
        return ""
    return (
        "<figure>"
        + path.read_text()
        + "<figcaption>radially averaged DCT spectrum of the latents (posterior means) and of the images "
        "at the newest evaluation; 1 = white noise</figcaption>"
        "</figure>"
    )
