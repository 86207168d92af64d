"""`vae-scale demo`: the whole job in minutes on a laptop CPU (a GPU is used when there is one).

1. writes WebDataset shards from scikit-image's sample photographs, some photographs held out (val);
2. trains the `demo` preset for a fixed wall-clock budget;
3. measures PSNR on every non-overlapping crop of the held-out photographs, next to bicubic 4x and 8x
   down-and-up baselines on the same crops, and says where the report, grids and checkpoint are.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vae_scale.config import load_config
from vae_scale.evaluate import bicubic_round_trip, psnr

DEFAULT_BUDGET_S = 270.0
"""A cap on training seconds; the demo preset's train.steps is sized to end within it on 2 CPU cores."""
DATA_SOURCE = "sample-color"  # vae_scale.shards.SAMPLE_COLOR_IMAGES; a quarter held out
SHARD_SIZE = 256  # short side of the photographs in the demo shards
EVAL_RESOLUTION = 64
"""Held-out crops are this size whatever the training crop: a convolutional VAE trained on 32 px crops
encodes any multiple of its downsampling factor, and bicubic 8x needs 8x8 thumbnails to be a fair baseline."""


def heldout_crops(val_dir: Path, resolution: int) -> torch.Tensor:
    """Every non-overlapping resolution x resolution crop of the val photographs, (N, 3, R, R) in [-1, 1]."""
    from vae_scale.shards import IMAGE_EXTENSIONS, to_rgb

    crops = []
    for shard in sorted(val_dir.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    img = to_rgb(Image.open(io.BytesIO(tar.extractfile(member).read())))
                    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                    h, w = a.shape[1] // resolution, a.shape[2] // resolution
                    crops += [
                        a[:, i * resolution : (i + 1) * resolution, j * resolution : (j + 1) * resolution]
                        for i in range(h)
                        for j in range(w)
                    ]
    if not crops:
        raise RuntimeError(f"no validation photographs in {val_dir}")
    return torch.stack(crops)


@torch.no_grad()
def heldout_psnr(vae, crops: torch.Tensor, batch: int = 32) -> dict[str, float]:
    """Mean PSNR (dB) of the VAE (posterior mean) and of bicubic 4x / 8x round trips on the same crops."""
    device = next(vae.parameters()).device
    vae.eval()
    scores: dict[str, list[torch.Tensor]] = {"vae": [], "bicubic 4x": [], "bicubic 8x": []}
    for i in range(0, len(crops), batch):
        x = crops[i : i + batch].to(device)
        scores["vae"].append(psnr(vae.decode(vae.encode(x).mode()).clamp(-1, 1), x).cpu())
        scores["bicubic 4x"].append(psnr(bicubic_round_trip(x, 4), x).cpu())
        scores["bicubic 8x"].append(psnr(bicubic_round_trip(x, 8), x).cpu())
    return {k: torch.cat(v).mean().item() for k, v in scores.items()}


def main(argv: list[str]) -> int:
    """`vae-scale demo [--budget S] [--out DIR] [key=value ...]`."""
    from vae_scale.model import VAE
    from vae_scale.shards import write_shards
    from vae_scale.train import train

    p = argparse.ArgumentParser(prog="vae-scale demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"at most this many seconds of training (default {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument(
        "--data", default="runs/demo-data", help="where the sample shards go (reused when present)"
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data = Path(args.data)
    index = data / "index.json"
    if not index.is_file() or json.loads(index.read_text()).get("source") != DATA_SOURCE:
        print(f"writing shards of scikit-image's colour photographs to {data}/")
        write_shards(DATA_SOURCE, data, size=SHARD_SIZE, val_fraction=0.25, seed=0, progress=False)
    run_dir = Path(args.out)
    if (run_dir / "checkpoints").exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = run_dir.with_name(f"{run_dir.name}-{stamp}")  # a demo always starts fresh
    cfg = load_config(
        "demo",
        [
            f"run.dir={run_dir}",
            f"data.train={data}",
            f"data.val={data}",
            f"train.time_budget_s={args.budget}",
            *args.overrides,
        ],
    )
    print(f"training the demo preset ({cfg.train.steps} steps, at most {args.budget:.0f} s) into {run_dir}/")
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    if summary["stopped_by"] not in ("", "time budget"):  # Ctrl-C or another stop signal: no scoring
        print(f"stopped by {summary['stopped_by']} after {summary['step']} steps; checkpoint in {run_dir}")
        return 0

    vae = VAE.from_checkpoint(run_dir, ema=cfg.optim.ema_decay > 0)
    crops = heldout_crops(data, EVAL_RESOLUTION)
    scores = heldout_psnr(vae, crops)
    print(f"\ntrained {summary['step']} steps in {wall:.0f} s")
    print(f"held-out PSNR on {len(crops)} crops of {EVAL_RESOLUTION} px from unseen photographs:")
    for name, value in scores.items():
        print(f"  {name:<12} {value:6.2f} dB")
    verdict = "beats" if scores["vae"] > scores["bicubic 8x"] else "does not beat"
    print(f"the VAE {verdict} the bicubic 8x baseline")
    print(f"\nreport      {run_dir / 'report.html'}")
    print(f"grids       {run_dir / 'images'}/")
    print(
        f"checkpoint  {run_dir / 'checkpoints' / 'latest'} -> "
        f"{(run_dir / 'checkpoints' / 'latest').read_text().strip()}"
    )
    return 0
