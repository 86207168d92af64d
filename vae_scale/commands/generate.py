"""Images and latents from a trained VAE: `vae-scale sample` and `encode` (their flags:
vae_scale/cli/generate.py; `reconstruct` is vae_scale/commands/reconstruct.py).

    vae-scale sample --run runs/demo --n 64 --temperature 0.8 --out samples.png
    accelerate launch -m vae_scale encode --run runs/sd-ft --data '/data/train-{000..099}.tar' --out latents/

`encode` writes WebDataset shards for training a diffusion model on the latents: per sample `<key>.npy` or
`<key>.safetensors` (tensor "latent", (C, h, w)), `<key>.latent.json` (source shard and key, the encoded image
size, the latent shape and dtype) and the sidecars of the source sample as they were (captions and metadata of
the extensions in SIDECAR_EXTENSIONS only: a `.pickle` or `.pyd` one, which webdataset's decode() would
unpickle for whoever trains on the latents, is left out and counted), under the source's keys. A sample whose
key is not a plain relative name (absolute, `..`, control characters) is skipped and counted: a tar member
named `../../x.safetensors` would land outside the folder it is extracted into. Images are encoded as square
crops, at their native size, or in aspect-ratio buckets (vae_scale.data.image_reader), tile by tile when
larger than the tile. The latent is the posterior mean unless --sample (a reparameterised sample, seeded by
the sample's key), and raw: a diffusion model applies the scale and shift recorded in the output's index.json
(the model config's scaling_factor / shift_factor; `vae-scale export` measures them). Each process writes its
own shards `<prefix>-<rank>-<shard>.tar` from its share of the data (every sample exactly once); the main
process writes index.json with the per-shard counts once every rank is done.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_scale.commands.common import (
    DataOptions,
    InputError,
    LoadedModel,
    Processes,
    check_resolution,
    processes,
)
from vae_scale.data.shard_reader import IMAGE_EXTENSIONS, DataError, expand_shards, shard_counts
from vae_scale.data.shards import ShardWriter
from vae_scale.data.synthetic import SYNTHETIC
from vae_scale.eval.metrics import key_noise
from vae_scale.files import check_output_dir
from vae_scale.train.monitor import image_grid, save_png

log = logging.getLogger(__name__)

LATENT_FORMATS = ("safetensors", "npy")
META_EXT = "latent.json"
"""The member of each latent sample that describes it (the source's own `.json` sidecar is kept apart)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SIDECAR_EXTENSIONS = ("json", "txt", "cls", *IMAGE_EXTENSIONS, *LATENT_FORMATS)
"""The sidecars encode copies, by last extension: data that webdataset decodes without running code."""
_EXT = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def safe_key(key: str) -> bool:
    """Whether a sample key makes tar member names that stay inside the folder they are extracted into:
    relative, no `.` / `..` / empty parts, no backslash or control characters."""
    parts = key.split("/")
    return (
        bool(key)
        and all(p not in ("", ".", "..") for p in parts)
        and "\\" not in key
        and all(ch.isprintable() for ch in key)
    )


def safe_sidecars(sidecars: dict[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
    """(the sidecars encode copies, the extensions it leaves out): see SIDECAR_EXTENSIONS."""
    kept, dropped = {}, []
    for ext, data in sidecars.items():
        if _EXT.fullmatch(ext) is not None and ext.rsplit(".", 1)[-1] in SIDECAR_EXTENSIONS:
            kept[ext] = data
        else:
            dropped.append(ext)
    return kept, dropped


# --------------------------------------------------------------------------------------------------------
# sample


@torch.no_grad()
def sample_images(
    vae,
    n: int,
    resolution: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """n images (n, 3, R, R) in [-1, 1] decoded from prior latents z ~ N(0, temperature^2 I), seeded."""
    vae.eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *vae.latent_shape(resolution), generator=g) * temperature
    out = [
        vae.decode(z[i : i + batch_size].to(device)).float().clamp(-1, 1).cpu()
        for i in range(0, n, batch_size)
    ]
    return torch.cat(out)


def write_sample_grid(images: torch.Tensor, out: str | Path, nrow: int = 0) -> Path:
    """A grid PNG of images (n, 3, H, W) in [-1, 1], nrow per row (default: about sqrt(n))."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid([images[i : i + nrow] for i in range(0, len(images), nrow)]), out)
    return out


# --------------------------------------------------------------------------------------------------------
# encode


def latent_bytes(z: torch.Tensor, fmt: str) -> bytes:
    """One latent (C, h, w) as the bytes of a .safetensors file (tensor "latent") or a .npy file."""
    z = z.detach().cpu().contiguous()
    if fmt == "safetensors":
        from safetensors.torch import save

        return save({"latent": z})
    buf = io.BytesIO()
    np.save(buf, z.numpy())
    return buf.getvalue()


def read_latent(data: bytes, fmt: str) -> torch.Tensor:
    """The latent tensor from the bytes `latent_bytes` wrote."""
    if fmt == "safetensors":
        from safetensors.torch import load

        return load(data)["latent"]
    return torch.from_numpy(np.load(io.BytesIO(data)))


class LatentShardWriter:
    """Latents of one rank into `<prefix>-<rank:03d>-<shard:06d>.tar`, `shard_size` per shard, atomically."""

    def __init__(self, out: Path, prefix: str, rank: int, shard_size: int, fmt: str):
        self.fmt = fmt
        self.shards = ShardWriter(out, lambda i: f"{prefix}-{rank:03d}-{i:06d}.tar", shard_size)

    def write(
        self,
        key: str,
        source: str,
        z: torch.Tensor,
        sidecars: dict[str, bytes] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        """One sample: the latent, its metadata (`latent.json`) and the source's sidecars, as they were."""
        meta = {"source": source, "key": key, "shape": list(z.shape), "dtype": str(z.dtype).split(".")[-1]}
        if image_size is not None:
            meta["image_size"] = list(image_size)  # (width, height) of what was encoded
        ours = {self.fmt: latent_bytes(z, self.fmt), META_EXT: json.dumps(meta, sort_keys=True).encode()}
        # a sidecar that would collide with our own members keeps its bytes under a "source." name
        kept = {(f"source.{ext}" if ext in ours else ext): data for ext, data in (sidecars or {}).items()}
        self.shards.write({"__key__": key, **kept, **ours})

    def close(self) -> dict[str, int]:
        """Finish the last shard; the samples per shard this writer wrote."""
        return self.shards.close()


def _split_key(key: str) -> tuple[str, str]:
    """("shard url", "sample key") from the loader's "url#key"."""
    url, _, k = key.rpartition("#")
    return url, k


def encode_batches(
    data: DataOptions,
    vae,
    procs: Processes,
    *,
    shape: str = "square",
    bucket_step: int = 64,
    max_aspect: float = 2.0,
    resize: bool = True,
    n: int = 0,
    seed: int = 0,
):
    """(batches, reader): this rank's batches for `encode` (reader None for `synthetic`, which has no
    sidecars and only square images)."""
    if data.data == SYNTHETIC:
        if shape != "square":
            raise InputError(f"--shape {shape}: --data synthetic has square images only")
        return data.batches(rank=procs.rank, world=procs.world, limit=n, seed=seed), None
    try:
        reader = data.images(
            shape=shape,
            multiple=vae.downsample_factor,
            rank=procs.rank,
            world=procs.world,
            bucket_step=bucket_step,
            max_aspect=max_aspect,
            resize=resize,
            limit=n,
            sidecars=True,
        )
    except ValueError as e:
        raise InputError(f"--shape {shape}: {e}") from None
    return reader, reader


def encode_latents(
    loaded: LoadedModel,
    out: str | Path,
    data: DataOptions,
    *,
    fmt: str = "safetensors",
    dtype: str = "float32",
    sample: bool = False,
    shape: str = "square",
    bucket_step: int = 64,
    max_aspect: float = 2.0,
    tiling: Any = False,
    shard_size: int = 1000,
    prefix: str = "latents",
    n: int = 0,
    seed: int = 0,
    procs: Processes | None = None,
    overwrite: bool = False,
) -> list[str]:
    """`vae-scale encode`: latent shards of `data` in `out` (see the module docstring), this rank's share.

    A non-empty `out` is refused (OutputError) unless overwrite, and always when it holds the shards read;
    overwriting removes the `prefix` shards and index.json of an earlier encode first (maybe from more
    processes, which would otherwise mix in), nothing else.

    fmt: LATENT_FORMATS; dtype: a DTYPES name; shape: image_reader.SHAPES (buckets of about
    data.resolution^2 pixels, sides multiples of bucket_step, aspect at most max_aspect); tiling: a
    model.Tiling or False; n > 0: at most n samples per process (`synthetic`: how many images); seed: the
    noise of `sample`. The main process writes index.json once every rank is done; returns the lines it
    reports (none on the other ranks).
    """
    cfg, vae = loaded.config, loaded.vae
    if not data.data:
        raise InputError(f"--data is needed: {loaded.source} has no data.{data.split}")
    check_resolution(vae, data.resolution, "--resolution")
    procs = procs or processes()
    out = Path(out)
    check_output_dir(out, "--out", overwrite, _shard_folders(data))  # every rank, before any writes
    procs.barrier()
    if procs.is_main:
        stale = re.compile(rf"{re.escape(prefix)}-\d{{3}}-\d{{6}}\.tar(\.tmp)?|index\.json")
        for old in out.iterdir():  # shards of an earlier run (maybe with more ranks) would mix in
            if stale.fullmatch(old.name):
                old.unlink()
    procs.barrier()
    vae.to(procs.device).eval()
    batches, reader = encode_batches(
        data,
        vae,
        procs,
        shape=shape,
        bucket_step=bucket_step,
        max_aspect=max_aspect,
        resize=cfg.data.resize,
        n=n,
        seed=cfg.train.seed,
    )
    total = _expected_samples(data.data, data.split, n, procs.world)
    writer = LatentShardWriter(out, prefix, procs.rank, shard_size, fmt)
    bar = None
    if procs.is_main:
        from tqdm import tqdm

        bar = tqdm(desc="encode", total=total, unit="img", dynamic_ncols=True, leave=False)
    torch_dtype = DTYPES[dtype]
    shapes: dict[str, int] = {}
    bad_keys, dropped = 0, {}  # samples skipped for their key; sidecars left out, by extension
    first_bad_key = first_dropped = None
    with torch.no_grad():
        for batch in batches:
            x = batch["images"][: batch["count"]].to(procs.device).float()
            post = vae.encode(x, tiled=tiling)
            z = post.mode()
            if sample:
                z = post.sample(key_noise(batch["keys"], tuple(z.shape), seed, 0, 0).to(procs.device))
            z = z.to(torch_dtype).cpu()
            latent_shape = "x".join(map(str, z.shape[1:]))
            sidecars = batch.get("sidecars") or [None] * len(z)
            for full_key, zi, extra in zip(batch["keys"], z, sidecars, strict=True):
                url, key = _split_key(full_key)
                if not safe_key(key):
                    bad_keys += 1
                    first_bad_key = first_bad_key or f"unsafe_key: {url}: sample key {key!r}"
                    continue
                extra, left_out = safe_sidecars(extra or {})
                for ext in left_out:
                    dropped[ext] = dropped.get(ext, 0) + 1
                    first_dropped = first_dropped or f"{url}: member {key}.{ext}"
                writer.write(key, url, zi, extra, (x.shape[3], x.shape[2]))
                shapes[latent_shape] = shapes.get(latent_shape, 0) + 1
            if bar is not None:
                bar.update(len(z))
    counts = writer.close()
    if bar is not None:
        bar.close()
    skipped = dict(reader.skipped) if reader is not None else {}
    first = reader.first_skipped if reader is not None else None
    lines: list[str] = []
    if bad_keys:
        skipped["unsafe_key"] = bad_keys
        first = first or first_bad_key
    part = {"counts": counts, "shapes": shapes, "skipped": skipped, "first": first}
    everyone = procs.gather({**part, "dropped": dropped, "first_dropped": first_dropped})
    if procs.is_main:
        shards = {name: n for part in everyone for name, n in sorted(part["counts"].items())}
        all_shapes: dict[str, int] = {}
        all_skipped: dict[str, int] = {}
        all_dropped: dict[str, int] = {}
        for part in everyone:
            for k, v in part["shapes"].items():
                all_shapes[k] = all_shapes.get(k, 0) + v
            for k, v in part["skipped"].items():
                all_skipped[k] = all_skipped.get(k, 0) + v
            for k, v in part["dropped"].items():
                all_dropped[k] = all_dropped.get(k, 0) + v
        m = cfg.model
        index = {
            "splits": {data.split: {"samples": sum(shards.values()), "shards": shards}},
            "latent": {
                "format": fmt,
                "dtype": dtype,
                # one shape for square crops; per shape counts for native sizes and buckets
                "shape": [int(d) for d in next(iter(all_shapes)).split("x")]
                if len(all_shapes) == 1
                else None,
                "shapes": dict(sorted(all_shapes.items(), key=lambda kv: -kv[1])),
                "kind": "sample" if sample else "posterior mean",
                "seed": seed,
                "scaled": False,
                "scaling_factor": m.scaling_factor,
                "shift_factor": m.shift_factor,
                "latents_mean": m.latents_mean,
                "latents_std": m.latents_std,
                "meta": META_EXT,
            },
            "source": {
                "data": data.data,
                "shape": shape,
                "resolution": data.resolution,
                "buckets": [list(b) for b in reader.buckets]
                if reader is not None and reader.buckets
                else None,
                "tile": tiling.tile if tiling else None,
                "model": loaded.source,
                "step": loaded.step,
                "ema": loaded.ema,
            },
            "skipped": all_skipped,
            "sidecars_left_out": all_dropped,
        }
        (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        n_shapes = (
            f"{len(all_shapes)} latent shapes"
            if len(all_shapes) > 1
            else f"latents {index['latent']['shape']}"
        )
        lines.append(
            f"wrote {index['splits'][data.split]['samples']} {n_shapes} in "
            f"{len(shards)} shards to {out}/ ({procs.world} process(es))"
        )
        if all_skipped:
            firsts = next((part["first"] for part in everyone if part["first"]), "")
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(all_skipped.items()))
            lines.append(
                f"skipped {sum(all_skipped.values())} samples ({kinds}; never upscaled); first: {firsts}"
            )
        if all_dropped:
            firsts = next((part["first_dropped"] for part in everyone if part["first_dropped"]), "")
            kinds = ", ".join(f".{k} {v}" for k, v in sorted(all_dropped.items()))
            lines.append(
                f"left out {sum(all_dropped.values())} sidecars not on the safe list ({kinds}; copied: "
                f"{', '.join(SIDECAR_EXTENSIONS)}); first: {firsts}"
            )
    procs.barrier()
    return lines


def _shard_folders(data: DataOptions) -> list[Path]:
    """The local folders of the shards `data` reads ([] when none, or when the spec is bad: reading says)."""
    if data.data == SYNTHETIC:
        return []
    try:
        urls = expand_shards(data.data, data.split)
    except DataError:
        return []
    return sorted({Path(u).parent for u in urls if "://" not in u and not u.startswith("pipe:")})


def _expected_samples(data: str, split: str, limit: int, world: int) -> int | None:
    """This rank's approximate sample count, for the progress bar (None when unknown)."""
    if data == SYNTHETIC:
        return math.ceil((limit or 256) / world)
    counts = shard_counts(expand_shards(data, split), scan=False)
    if counts is None:
        return limit or None
    n = math.ceil(sum(counts.values()) / world)
    return min(n, limit) if limit else n


__all__ = [
    "LatentShardWriter",
    "encode_batches",
    "encode_latents",
    "latent_bytes",
    "read_latent",
    "sample_images",
    "write_sample_grid",
]
