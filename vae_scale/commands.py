"""What the inference commands (eval, sample, reconstruct, encode, export) share: the model they load from a
run folder, a checkpoint or a diffusers folder, finite batches of shards, and the processes they run on
(one, or several under `accelerate launch` / torchrun).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae_scale.config import Config, config_from_dict


class InputError(ValueError):
    """A command's input that cannot be used (wrong kind of folder, missing weights); the message names it."""


@dataclass
class LoadedModel:
    """A VAE read for a command, with the config of its run and where it came from."""

    vae: Any
    config: Config
    source: str
    step: int | None = None
    checkpoint: Path | None = None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--run RUN | --ckpt PATH (required, exclusive) and --ema."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="run folder: its newest complete checkpoint")
    g.add_argument("--ckpt", help="a checkpoint folder (runs/x/checkpoints/step-...) or a diffusers folder")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    """--tile PX and --tile-overlap F: tiled encode/decode of images larger than a tile."""
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="encode/decode images larger than this many pixels tile by tile, blended as diffusers' "
        "enable_tiling() does (default: the model's sample_size; 0: never tile)",
    )
    p.add_argument(
        "--tile-overlap",
        type=float,
        default=0.25,
        help="fraction of a tile its neighbour shares (default 0.25)",
    )


def tiling_from_args(args: argparse.Namespace, vae) -> Any:
    """The Tiling --tile / --tile-overlap ask for, its tile resolved (False for --tile 0); InputError for a
    bad geometry."""
    from vae_scale.model import Tiling

    if args.tile == 0:
        return False
    if args.tile is not None and args.tile < 0:
        raise InputError(f"--tile must be >= 0, got {args.tile}")
    tiling = Tiling(tile=args.tile or vae.config.sample_size, overlap=args.tile_overlap)
    try:
        tiling.geometry(vae.downsample_factor, vae.config.sample_size)
    except ValueError as e:
        raise InputError(f"--tile / --tile-overlap: {e}") from None
    return tiling


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "vae" / "config.json").is_file()


def load_model(run: str | None = None, ckpt: str | None = None, ema: bool = False) -> LoadedModel:
    """The VAE of a run folder (newest checkpoint), a checkpoint folder, or a diffusers AutoencoderKL folder.

    FileNotFoundError names the path when there is nothing to load; InputError for --ema without EMA.
    """
    import yaml

    from vae_scale.checkpoint import is_complete, read_checkpoint_file, resolve_checkpoint
    from vae_scale.model import VAE

    flag = "--run" if run else "--ckpt"
    path = Path(run or ckpt or "")
    if not (run or ckpt):
        raise InputError("give --run RUN or --ckpt PATH")
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if ckpt and not is_complete(path) and _is_diffusers_folder(path):
        if ema:
            raise InputError(f"--ema: {path} is a diffusers folder, which holds one set of weights")
        vae = VAE.from_diffusers(path)
        return LoadedModel(vae, Config(model=vae.config), str(path))
    try:
        checkpoint = resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag} {e}") from None
    try:
        vae = VAE.from_checkpoint(checkpoint, ema=ema)  # checks its files against the manifest
    except FileNotFoundError as e:
        raise InputError(f"--ema: {e}" if ema else str(e)) from None
    cfg = config_from_dict(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    step = None
    if (checkpoint / "trainer_state.json").is_file():
        step = json.loads(read_checkpoint_file(checkpoint, "trainer_state.json")).get("step")
    return LoadedModel(vae, cfg, str(checkpoint), step, checkpoint)


def check_resolution(vae, resolution: int, flag: str) -> None:
    """InputError naming `flag` unless `resolution` is a positive multiple of the model's downsampling."""
    f = vae.downsample_factor
    if resolution <= 0 or resolution % f:
        raise InputError(f"{flag}={resolution} is not a positive multiple of the model's downsampling {f}")


def iter_batches(
    spec: str,
    *,
    split: str,
    resolution: int,
    batch_size: int,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    limit: int = 0,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Finite center-crop batches ("images", "count", "keys") of this rank's share of shards or `synthetic`.

    Shards: every good sample exactly once across ranks (data.build_val_loader's reader; a folder gives
    its `split` shards). `synthetic`: images `limit` (default 256) of vae_scale.synthetic seeded by `seed`.
    limit > 0 stops this rank after that many samples.
    """
    from vae_scale.config import DataConfig
    from vae_scale.data import ValLoader
    from vae_scale.shard_reader import expand_shards, shard_counts
    from vae_scale.synthetic import SYNTHETIC, synthetic_image

    if spec == SYNTHETIC:
        indices = list(range(rank, limit or 256, world))
        for i in range(0, len(indices), batch_size):
            chunk = indices[i : i + batch_size]
            images = torch.stack([synthetic_image(seed, j, resolution) for j in chunk])
            yield {"images": images, "count": len(chunk), "keys": [f"synthetic#{j}" for j in chunk]}
        return
    urls = expand_shards(spec, split)
    cfg = DataConfig(val=spec, resolution=resolution, batch_size=batch_size, workers=workers)
    taken = 0
    for batch in ValLoader(urls, shard_counts(urls, scan=False), cfg, rank, world):
        if limit and taken + batch["count"] > limit:
            keep = limit - taken
            batch = {"images": batch["images"][:keep], "count": keep, "keys": batch["keys"][:keep]}
        taken += batch["count"]
        if batch["count"]:
            yield batch
        if limit and taken >= limit:
            return


@dataclass
class Processes:
    """This process's place in an `accelerate launch` / torchrun job (one process: rank 0 of 1)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    acc: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (float64 all-reduce)."""
        return t if self.acc is None else self.acc.reduce(t.to(self.device), reduction="sum")

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if self.acc is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter tears down: a gloo group left to the C++
    destructors at exit can abort the process ("terminate called without an active exception")
    after the command itself has succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def processes() -> Processes:
    """Join the process group when launched with several processes (gloo on CPU, NCCL on GPUs).

    The group is left again when the process exits."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        # cpu=True without a GPU makes accelerate-launched CPU processes join over gloo, as in the trainer
        acc = Accelerator(cpu=not torch.cuda.is_available())
        atexit.register(_leave_process_group)
        return Processes(acc.device, acc.process_index, acc.num_processes, acc)
    return Processes(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def progress(iterable: Iterable, *, enabled: bool, desc: str, total: int | None = None, unit: str = "batch"):
    """A tqdm bar on the main process (to stderr), the bare iterable elsewhere."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False)
