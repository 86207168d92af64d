"""Data-loading throughput: vae-scale's shard loader against a plain folder-of-files Dataset.

Both read the same JPEG files (photographs at 1536 x 1024, q90: scikit-image's bundled photos resized,
with mild noise for camera-like texture) and deliver random 256 px crops as float32 (B, 3, 256, 256)
batches through the same DataLoader worker count. The folder baseline is what a first PyTorch loader
looks like: PIL open, full decode, RGB, bicubic resize of the short side, random crop, flip. The shard
loader reads tar shards, decodes with `Image.draft` (DCT scaling) and resamples only the crop's region.
For each worker count each loader is timed over windows of batches after a warm-up window (which absorbs
worker start-up and the shuffle-buffer fill); median with p20/p80.
Per worker divides by max(workers, 1); this process runs one torch thread, as a worker does. Images per
CPU-second (this process and its workers) is reported beside wall-clock images/s: on a shared machine it
is the steadier figure.

    python -m benchmarks.data [--quick] [--workers 0,1,2] [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.harness import (
    BusyMachine,
    LoadSampler,
    Timing,
    check_idle,
    environment,
    result_row,
    stamp_load,
    write_results,
)
from vae_scale.config import DataConfig
from vae_scale.data.loader import build_train_loader
from vae_scale.data.shards import write_shards

RESOLUTION = 256
SOURCE = (1536, 1024)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEG photographs (q90), landscape and portrait alternating, in `folder`."""
    import skimage.data

    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = SOURCE if i % 2 == 0 else SOURCE[::-1]
        base = bases[i % len(bases)]
        w, h = base.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        img = base.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-4, 5, (size[1], size[0], 3), dtype=np.int16)
        path = folder / f"photo{i:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


class FolderDataset(Dataset):
    """The baseline: one file per image, PIL full decode, resize the short side, random crop, flip."""

    def __init__(self, paths: list[Path], resolution: int):
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        r = self.resolution
        img = Image.open(self.paths[i]).convert("RGB")
        w, h = img.size
        s = r / min(w, h)
        img = img.resize((max(r, round(w * s)), max(r, round(h * s))), Image.BICUBIC)
        x, y = random.randint(0, img.size[0] - r), random.randint(0, img.size[1] - r)
        img = img.crop((x, y, x + r, y + r))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _forever(loader):
    while True:
        yield from loader


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (the DataLoader workers)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a process that just ended
            pass
    return total


def _rates(stream, batch: int, window: int, repeats: int) -> tuple[Timing, float]:
    """Wall time of `window` batches (after one warm-up window) and the median images per CPU-second.

    Images per CPU-second counts the CPU the loader burnt in this process and its workers, so it stays
    meaningful on a machine shared with other jobs, where wall time is not.
    """
    it = iter(stream)
    times, per_cpu = [], []
    for rep in range(repeats + 1):  # the first window warms up: worker start, shuffle-buffer fill
        c0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in range(window):
            next(it)
        t1, c1 = time.perf_counter(), _cpu_seconds()
        if rep:
            times.append((t1 - t0) * 1e3)
            per_cpu.append(window * batch / max(c1 - c0, 1e-9))
    ms = np.array(times)
    timing = Timing(float(np.median(ms)), float(np.percentile(ms, 20)), float(np.percentile(ms, 80)), len(ms))
    return timing, float(np.median(per_cpu))


def run(quick: bool = True, workers: list[int] | None = None) -> list[dict[str, Any]]:
    """Images/s of the shard loader and the folder baseline per worker count; returns result rows."""
    workers = workers if workers is not None else ([0, 1, 2] if quick else [0, 1, 2, 4])
    n, batch, window, repeats = (96, 16, 4, 3) if quick else (256, 32, 6, 5)
    env = environment("cpu")
    rows = []
    # One torch thread in this process too, as in DataLoader workers: with 0 workers the folder baseline's
    # per-image tensor ops otherwise pay for OpenMP threads fighting PIL for the same cores (2x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _run(n, batch, window, repeats, workers, env)
    finally:
        torch.set_num_threads(threads)
    return rows


def _run(
    n: int, batch: int, window: int, repeats: int, workers: list[int], env: dict[str, str]
) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        paths = make_photos(folder, n)
        # No --size and JPEG in, JPEG out: the shards hold the very same bytes as the folder.
        write_shards(
            str(folder), shards, max_per_shard=max(n // 8, 1), val_fraction=0.0, workers=2, progress=False
        )
        common = dict(
            source=f"{SOURCE[0]}x{SOURCE[1]} JPEG q90", resolution=RESOLUTION, batch=batch, dtype="fp32"
        )
        for w in workers:
            cfg = DataConfig(train=str(shards), resolution=RESOLUTION, batch_size=batch, workers=w)
            loader = build_train_loader(cfg, rank=0, world_size=1, seed=0)
            measured = {"shards": _rates(loader, batch, window, repeats)}
            loader.close()
            folder_loader = DataLoader(
                FolderDataset(paths, RESOLUTION),
                batch_size=batch,
                shuffle=True,
                num_workers=w,
                persistent_workers=w > 0,
                drop_last=True,
            )
            measured["folder"] = _rates(_forever(folder_loader), batch, window, repeats)
            del folder_loader
            ips = {name: t.throughput(window * batch) for name, (t, _) in measured.items()}
            cpu = {name: c for name, (_, c) in measured.items()}
            for name, (t, _) in measured.items():
                extra = {}
                if name == "shards":
                    extra = {
                        "speedup_vs_folder": ips["shards"] / ips["folder"],
                        "cpu_speedup_vs_folder": cpu["shards"] / cpu["folder"],
                    }
                rows.append(
                    result_row(
                        "data",
                        name,
                        t,
                        env,
                        workers=w,
                        **common,
                        images_per_s=ips[name],
                        images_per_s_per_worker=ips[name] / max(w, 1),
                        images_per_cpu_s=cpu[name],
                        **extra,
                    )
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images and repeats (~1 minute on 2 cores)")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default 0,1,2[,4])")
    p.add_argument(
        "--allow-busy",
        action="store_true",
        help="run and keep the figures when other processes load the machine (rows flagged busy)",
    )
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else None
    try:
        check_idle(args.allow_busy)
    except BusyMachine as e:
        print(f"data: {e}", file=sys.stderr)
        return 3
    with LoadSampler() as load:  # the loader's workers are this process's children: not counted as others
        rows = run(quick=args.quick, workers=workers)
    stamp_load(rows, load.summary(), args.allow_busy)
    cols = [
        "variant",
        "workers",
        "device",
        "source",
        "resolution",
        "batch",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "images_per_s",
        "images_per_s_per_worker",
        "speedup_vs_folder",
        "images_per_cpu_s",
        "cpu_speedup_vs_folder",
        "load_1m",
        "others_cores",
        "busy",
        "error",
    ]
    path = write_results(rows, "data", cols, args.out)
    print(path.with_suffix(".md").read_text())
    for r in rows:
        if r["variant"] == "shards" and "error" not in r:
            print(
                f"{r['workers']} workers: shards {r['images_per_s_per_worker']:.0f} images/s per worker "
                f"({r['speedup_vs_folder']:.2f}x the folder baseline), {r['images_per_cpu_s']:.0f} images "
                f"per CPU-second ({r['cpu_speedup_vs_folder']:.2f}x)"
            )
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
