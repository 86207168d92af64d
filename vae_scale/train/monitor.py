"""What a run shows: W&B (through Accelerate's tracker), a tqdm bar, and the run folder itself.

Everything logged also lands in the run folder -- metrics.jsonl, images/*.png and a static report.html
with loss curves, the latest grids and the config (report.py) -- so a run is readable without W&B.
Only the main process writes; the other ranks' Monitor methods return at once. A write that fails (a full
disk) warns once per kind of file and training goes on: the run's state is in its checkpoints, not here.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vae_scale.files import write_atomic
from vae_scale.train.report import SPECTRUM_FILE, spectrum_curves, spectrum_svg, write_report

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
