"""What the inference commands (eval, sample, reconstruct, encode, export) share: the model they load from a
run folder, a checkpoint or a diffusers folder, the data they read (DataOptions) as finite batches, and the
processes they run on (one, or several under `accelerate launch` / torchrun). Their flags are parsed in
vae_scale/cli/.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae_scale.config import Config, DataConfig, config_from_dict
from vae_scale.data.image_reader import ImageReader
from vae_scale.data.shard_reader import expand_shards, refuse_commands_from_file, shard_counts


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
    ema: bool = False
    """Whether `vae` holds the checkpoint's EMA weights."""

    @property
    def config_file(self) -> Path | None:
        """The file `config` was read from (a checkpoint's config.yaml); None for a diffusers folder."""
        return None if self.checkpoint is None else self.checkpoint / "config.yaml"


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "vae" / "config.json").is_file()


def load_model(run: str | None = None, ckpt: str | None = None, ema: bool = False) -> LoadedModel:
    """The VAE of a run folder (newest checkpoint), a checkpoint folder, or a diffusers folder of any family.

    FileNotFoundError names the path when there is nothing to load; InputError for --ema without EMA.
    """
    import yaml

    from vae_scale.formats.checkpoint import is_complete, read_checkpoint_file, resolve_checkpoint
    from vae_scale.models.interface import load_checkpoint, load_diffusers

    flag = "--run" if run else "--ckpt"
    path = Path(run or ckpt or "")
    if not (run or ckpt):
        raise InputError("give --run RUN or --ckpt PATH")
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if ckpt and not is_complete(path) and _is_diffusers_folder(path):
        if ema:
            raise InputError(f"--ema: {path} is a diffusers folder, which holds one set of weights")
        vae = load_diffusers(path)
        return LoadedModel(vae, Config(model=vae.config), str(path))
    try:
        checkpoint = resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag} {e}") from None
    try:
        vae = load_checkpoint(checkpoint, ema=ema)  # checks its files against the manifest
    except FileNotFoundError as e:
        raise InputError(f"--ema: {e}" if ema else str(e)) from None
    cfg = config_from_dict(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    step = None
    if (checkpoint / "trainer_state.json").is_file():
        step = json.loads(read_checkpoint_file(checkpoint, "trainer_state.json")).get("step")
    return LoadedModel(vae, cfg, str(checkpoint), step, checkpoint, ema)


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
    its `split` shards). `synthetic`: images `limit` (default 256) of vae_scale.data.synthetic seeded by
    `seed`. limit > 0 stops this rank after that many samples.
    """
    from vae_scale.config import DataConfig
    from vae_scale.data.loader import ValLoader
    from vae_scale.data.synthetic import SYNTHETIC, synthetic_image

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


@dataclass(frozen=True)
class DataOptions:
    """What a command reads, and how: shards (or `synthetic`), the split of a folder, the center-crop size,
    images per process per batch, loader workers per process; and the frames of a clip (1: images).

    The same for every command that reads data; `from_config` takes what is not given from a config's
    data section (the command line passes the loaded run's)."""

    data: str
    split: str = "val"
    # the config system's defaults, as for a run that sets none of them
    resolution: int = DataConfig.resolution
    batch_size: int = DataConfig.batch_size
    workers: int = DataConfig.workers
    frames: int = DataConfig.frames
    """Frames per clip (data.frames): above 1, the shards are read as clips (`clip_batches`)."""
    frame_stride: int = DataConfig.frame_stride
    """Every frame_stride-th stored frame makes a clip (data.frame_stride)."""
    origin: str | None = None
    """The file `data` was read from (a run's config.yaml), None when the user gave it: shards from a file
    that are a shell command (`pipe:`) are refused (DataError) when read, never run."""

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        split: str,
        *,
        data: str | None = None,
        resolution: int | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        frames: int | None = None,
        frame_stride: int | None = None,
        origin: str | os.PathLike | None = None,
    ) -> DataOptions:
        """`cfg`'s data.<split> (the shards), resolution, batch_size and workers, each unless given.

        origin: the file `cfg` was read from (a run's config.yaml), kept when the shards come from it.
        """

        def pick(given, default):
            return default if given is None else given

        return cls(
            data=pick(data, getattr(cfg, split)),
            split=split,
            resolution=pick(resolution, cfg.resolution),
            batch_size=pick(batch_size, cfg.batch_size),
            workers=pick(workers, cfg.workers),
            frames=pick(frames, cfg.frames),
            frame_stride=pick(frame_stride, cfg.frame_stride),
            origin=None if data is not None or origin is None else str(origin),
        )

    def _refuse_commands(self) -> None:
        if self.origin is not None:
            refuse_commands_from_file(
                self.data, f"data.{self.split}", self.origin, "give it with --data '...' if you trust it"
            )

    def images(
        self, *, shape: str, multiple: int, rank: int = 0, world: int = 1, **reader: Any
    ) -> ImageReader:
        """This rank's finite batches of whole images of the shards (image_reader.ImageReader): `shape`
        square, native or buckets, cropped to multiples of `multiple`; `reader`: ImageReader's other
        arguments."""
        self._refuse_commands()
        urls = expand_shards(self.data, self.split)
        return ImageReader(
            urls,
            shard_counts(urls, scan=False),
            shape=shape,
            resolution=self.resolution,
            multiple=multiple,
            batch_size=self.batch_size,
            workers=self.workers,
            rank=rank,
            world=world,
            **reader,
        )

    @property
    def clips(self) -> bool:
        """Whether the data is read as clips (frames > 1)."""
        return self.frames > 1

    def clip_batches(self, *, rank: int = 0, world: int = 1, limit: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's finite batches of clips ("clips" (n, 3, T, R, R), "count", "keys"): the first `frames`
        frames at `frame_stride` of each video, center crops of `resolution` (data.clip_loader's val loader:
        every clip exactly once across ranks). limit > 0 stops this rank after that many clips."""
        from vae_scale.data.clip_loader import ClipValLoader

        self._refuse_commands()
        urls = expand_shards(self.data, self.split)
        cfg = DataConfig(
            val=self.data,
            resolution=self.resolution,
            batch_size=self.batch_size,
            workers=self.workers,
            frames=self.frames,
            frame_stride=self.frame_stride,
        )
        taken = 0
        for batch in ClipValLoader(urls, shard_counts(urls, scan=False), cfg, rank, world):
            if limit and taken + batch["count"] > limit:
                keep = limit - taken
                batch = {**batch, "clips": batch["clips"][:keep], "count": keep, "keys": batch["keys"][:keep]}
            taken += batch["count"]
            if batch["count"]:
                yield batch
            if limit and taken >= limit:
                return

    def batches(
        self, *, rank: int = 0, world: int = 1, limit: int = 0, seed: int = 0
    ) -> Iterator[dict[str, Any]]:
        """This rank's finite center-crop batches (`iter_batches`)."""
        self._refuse_commands()
        return iter_batches(
            self.data,
            split=self.split,
            resolution=self.resolution,
            batch_size=self.batch_size,
            workers=self.workers,
            rank=rank,
            world=world,
            limit=limit,
            seed=seed,
        )


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
