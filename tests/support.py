"""What tests that run the trainer share: the tiny model, shards of generated images, and real processes.

Imported as a plain module (pytest puts tests/ on sys.path); fixtures stay in conftest.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from vae_scale.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "accelerate"

TINY = [
    "model.block_out_channels=[8,16]",
    "model.layers_per_block=1",
    "model.latent_channels=4",
    "model.norm_num_groups=4",
    "data.resolution=32",
    "data.batch_size=4",
    "data.workers=0",
    "optim.lr=1e-3",
    "log.wandb=disabled",
    "log.every=1",
    "log.images_every=0",
]
"""A two-level model of 44k parameters on 32 px crops: a training step takes milliseconds."""


def write_photo_like_images(folder: Path, n: int, seed: int = 0) -> None:
    """n PNGs of smooth colour gradients plus noise, 48-64 x 56 px."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 48 + 8 * (i % 3), 56
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 1) + yy * (3 - c) + 20 * i) % 256 for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:02d}.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """The environment of a launched trainer: this checkout first, one thread per process, no W&B."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}
    e.pop("TRITON_INTERPRET", None)
    return e


def accelerate_launch(config: str, nproc: int, args: list[str], *launch_flags: str) -> list[str]:
    """`accelerate launch --config_file launch/accelerate/CONFIG -m vae_scale train ARGS`, on a free port."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(LAUNCH / config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        *launch_flags,
        "-m",
        "vae_scale",
        "train",
        *args,
    ]


def run(cmd: list[str], timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command to its end; with ok=True, fail the test (showing stderr's tail) unless it exits 0."""
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def checkpoint_file(run_dir: Path, name: str = "vae.safetensors") -> dict[str, torch.Tensor]:
    """A safetensors file of a run's newest complete checkpoint."""
    return load_file(latest_checkpoint(run_dir) / name)


def uneven_val_shards(root: Path) -> Path:
    """Real PNG shards of 20 photo-like images, 5 of them validation: with batch 2 on two ranks, one rank
    has a validation batch more (what the lockstep of sharded evaluation is for)."""
    from vae_scale.shards import write_shards

    write_photo_like_images(root / "src", 20)
    index = write_shards(
        str(root / "src"),
        root / "out",
        max_per_shard=4,
        image_format="png",
        val_fraction=0.25,
        seed=0,
        progress=False,
    )
    assert index["splits"]["val"]["samples"] == 5
    return root / "out"
