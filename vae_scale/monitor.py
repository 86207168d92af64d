"""What a run shows: W&B (through Accelerate's tracker), a tqdm bar, and the run folder itself.

Everything logged also lands in the run folder -- metrics.jsonl, images/*.png and a static report.html
with loss curves, the latest grids and the config -- so a run is readable without W&B.
Only the main process writes; the other ranks' Monitor methods return at once.
"""

from __future__ import annotations

import html
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vae_scale.checkpoint import write_atomic


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
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


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

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log scalars at `step` to W&B and metrics.jsonl."""
        if not self.main:
            return
        values = {k: float(v) for k, v in values.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.wandb is not None:
            self.acc.log(values, step=step)

    def images(self, step: int, grids: dict[str, torch.Tensor]) -> None:
        """Log (3, H, W) grids in [0, 1] to W&B and images/<name>-<step>.png."""
        if not self.main:
            return
        for name, grid in grids.items():
            path = self.images_dir / f"{name}-{step:09d}.png"
            save_png(grid, path)
            self.latest_images[name] = path.name
        if self.wandb is not None:
            import wandb

            self.wandb.log(
                {f"images/{k}": wandb.Image(str(self.images_dir / v)) for k, v in self.latest_images.items()},
                step=step,
            )

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
        """(Re)write report.html from metrics.jsonl, the latest grids and the config."""
        if not self.main:
            return None
        return write_report(self.run_dir, self.cfg.to_yaml(), self.latest_images)

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


def _svg_chart(title: str, points: list[tuple[float, float]], w: int = 320, h: int = 160) -> str:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1

    def sx(x: float) -> float:
        return 40 + (x - x0) / ((x1 - x0) or 1) * (w - 50)

    def sy(y: float) -> float:
        return h - 20 - (y - y0) / (y1 - y0) * (h - 40)

    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (
        f'<figure><svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
        f'<rect x="40" y="20" width="{w - 50}" height="{h - 40}" fill="#fafafa" stroke="#ccc"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{path}"/>'
        f'<text x="2" y="26" font-size="10">{y1:.4g}</text>'
        f'<text x="2" y="{h - 20}" font-size="10">{y0:.4g}</text>'
        f'<text x="40" y="{h - 4}" font-size="10">step {x0:.0f}</text>'
        f'<text x="{w - 70}" y="{h - 4}" font-size="10">{x1:.0f}</text></svg>'
        f"<figcaption>{html.escape(title)} (last {ys[-1]:.4g})</figcaption></figure>"
    )


def write_report(run_dir: Path, config_yaml: str, latest_images: dict[str, str]) -> Path:
    """A self-contained report.html (inline SVG charts, no scripts) for a run folder."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, []).append((r["step"], v))
    charts = "".join(_svg_chart(k, pts) for k, pts in sorted(series.items()) if len(pts) >= 2)
    imgs = "".join(
        f'<figure><img src="images/{html.escape(v)}" style="image-rendering:pixelated;max-width:100%">'
        f"<figcaption>{html.escape(k)} ({html.escape(v)})</figcaption></figure>"
        for k, v in sorted(latest_images.items())
    )
    last = rows[-1] if rows else {}
    summary = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>"
        for k, v in last.items()
        if isinstance(v, (int, float)) and k != "time"
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;margin:.5em}}
table{{border-collapse:collapse}}td{{padding:2px 8px;border-bottom:1px solid #eee}}</style></head><body>
<h1>vae-scale run: {html.escape(run_dir.name)}</h1>
<h2>Latest metrics</h2><table>{summary}</table>
<h2>Curves</h2>{charts or "<p>No metrics yet.</p>"}
<h2>Images</h2>{imgs or "<p>No images yet.</p>"}
<h2>Config</h2><pre>{html.escape(config_yaml)}</pre></body></html>
"""
    path = run_dir / "report.html"
    write_atomic(path, page)
    return path
