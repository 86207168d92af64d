"""The shard format, written: `vae-scale shards` (images into train/val tar shards) and the shard writer.

    vae-scale shards ~/photos data/shards --size 512 --val-fraction 0.02
    vae-scale shards sample data/demo --size 256          # scikit-image's bundled photographs
    vae-scale shards sample-color data/demo --size 256    # only the colour ones (the demo's data)

Writing. OUT gets `train-000000.tar ...`, `val-000000.tar ...` and `index.json` (samples per shard,
totals, source resolutions, what was skipped and why). A sample is `<key>.<ext>` (the image) plus
`<key>.json` (source path and sizes; the loader ignores it) and, when the image has a caption file beside
it (`photo.txt` for `photo.jpg`), `<key>.txt` with its bytes. Keys are `train-00000012`: numbers, never
source names, whose dots would break WebDataset's key/extension split. Sources are listed in sorted order,
split and shuffled with `--seed`, encoded by a process pool in order and written with fixed tar metadata,
so the same SRC and seed give byte-identical shards and index.json whatever `--workers` is. With `--size`
an image is resized (Lanczos) so its short side is N; smaller ones are skipped and counted, never
upscaled. Without `--size` a source already in the output format and RGB is stored byte for byte (no
generation loss). JPEG is written with 4:4:4 chroma: a VAE learns its data's artifacts, 4:2:0 blur too.

Reading shards (listing, counting, raw samples) is vae_scale/data/shard_reader.py's; `ShardWriter` here is the
one rotating, atomic tar writer, also used for `encode`'s latent shards.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import logging
import os
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vae_scale.data.shard_reader import IMAGE_EXTENSIONS, DataError, describe_error, to_rgb

log = logging.getLogger(__name__)

SAMPLE_IMAGES = tuple(
    "astronaut brick camera chelsea clock coffee coins grass gravel hubble_deep_field immunohistochemistry "
    "moon motorcycle page retina rocket text".split()
)
"""scikit-image's bundled photographs, which load offline (source "sample"); "motorcycle" is
stereo_motorcycle's left view."""
SAMPLE_COLOR_IMAGES = tuple(
    "astronaut chelsea coffee hubble_deep_field immunohistochemistry motorcycle retina rocket".split()
)
"""The colour ones (source "sample-color", the demo's data): grey photographs copied into three channels teach
an RGB autoencoder luminance only, and one trained mostly on them reconstructs colour photographs poorly."""
SAMPLE_SOURCES = {"sample": SAMPLE_IMAGES, "sample-color": SAMPLE_COLOR_IMAGES}

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.tar$")
MAX_LISTED_SKIPS = 1000  # index.json lists this many skipped files in full; the counts are always exact
TAR_MTIME = 0  # fixed tar metadata: byte-identical shards from the same input


def load_sample(name: str) -> Image.Image:
    """One of scikit-image's sample photographs (SAMPLE_COLOR_IMAGES) by name."""
    import skimage.data

    a = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return Image.fromarray(a)


# --------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    """One input image: `name` (path relative to SRC, or a sample name), where to read it, and its caption
    file (`<stem>.txt` beside it, stored as the sample's `.txt` sidecar) if there is one."""

    name: str
    path: str | None  # None: a scikit-image sample, loaded by name
    caption: str | None = None


def _caption_of(path: str, exists) -> str | None:
    caption = os.path.splitext(path)[0] + ".txt"
    return caption if exists(caption) else None


def _read_caption(path: str) -> bytes | None:
    """A caption file's bytes; None when `path` is a symbolic link, which is never followed: a link could
    carry any file's text (a key, a password file) into shards that others train on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def list_sources(src: str) -> tuple[list[Source], int]:
    """The images SRC names (sorted), each with its `<stem>.txt` caption if present, and how many other
    files were ignored. Raises DataError if none."""
    if src in SAMPLE_SOURCES:
        return [Source(f"sample/{n}", None) for n in SAMPLE_SOURCES[src]], 0
    if os.path.isdir(src):
        found, others = [], set()
        for root, dirs, files in os.walk(src):
            dirs.sort()
            names = set(files)
            for f in sorted(files):
                path = os.path.join(root, f)
                if _is_image_name(f):
                    caption = _caption_of(f, names.__contains__)
                    rel = os.path.relpath(path, src)
                    found.append(Source(rel, path, caption and os.path.join(root, caption)))
                else:
                    others.add(path)
        found.sort(key=lambda s: s.name)
        if not found:
            raise DataError(f"{src} holds no images ({', '.join(IMAGE_EXTENSIONS)}, any case)")
        return found, len(others - {s.caption for s in found})
    if any(c in src for c in "*?["):
        paths = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
        found = [Source(p, p, _caption_of(p, os.path.isfile)) for p in paths if _is_image_name(p)]
        if not found:
            raise DataError(f"pattern {src} matches no image file")
        used = {s.caption for s in found}
        return found, len([p for p in paths if not _is_image_name(p) and p not in used])
    if os.path.isfile(src) and _is_image_name(src):
        return [Source(os.path.basename(src), src, _caption_of(src, os.path.isfile))], 0
    samples = " or ".join(repr(k) for k in SAMPLE_SOURCES)
    raise DataError(f"{src} does not exist (give a folder of images, a glob, {samples})")


# --------------------------------------------------------------------------------------------------------
# Encoding one image (runs in the process pool)


@dataclass(frozen=True)
class ShardJob:
    """One source to encode into a shard member: the size (short side; None keeps it), format, quality."""

    source: Source
    size: int | None
    fmt: str
    quality: int
    keep_small: bool = False


def encode_job(job: ShardJob) -> dict[str, Any]:
    """Encode one source: {"data", "size", "source_size"} or {"skip": reason, "detail", "source_size"}."""
    src = job.source
    source_size = None
    try:
        if src.path is None:
            img, raw = load_sample(src.name.split("/", 1)[1]), None
        else:
            with open(src.path, "rb") as f:
                raw = f.read()
            if not raw:
                return {"skip": "empty", "detail": "zero-length file", "source_size": None}
            img = Image.open(io.BytesIO(raw))
        source_size = img.size
        fmt_name = FORMATS[job.fmt]
        size = job.size
        if size is not None and min(img.size) < size:
            if not job.keep_small:
                return {
                    "skip": "too_small",
                    "detail": f"{img.size[0]}x{img.size[1]} is below --size {size}",
                    "source_size": source_size,
                }
            size = None  # kept at its own size, never upscaled
        orientation = img.getexif().get(0x0112, 1) if raw is not None else 1
        passthrough = (
            size is None
            and raw is not None
            and img.format == fmt_name
            and img.mode == "RGB"
            and orientation == 1
        )
        if passthrough:
            img.load()  # decodable?
            return {"data": raw, "size": img.size, "source_size": source_size, "kept_small": size != job.size}
        if size is not None and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (2 * size, 2 * size))  # DCT downscale, leaving >= 2x for Lanczos
        img.load()
        img = to_rgb(img)
        if size is not None:
            w, h = img.size
            s = size / min(w, h)
            new = (max(size, round(w * s)), max(size, round(h * s)))
            if new != img.size:
                img = img.resize(new, Image.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        if job.fmt == "jpg":
            img.save(buf, "JPEG", quality=job.quality, subsampling=0)
        elif job.fmt == "webp":
            img.save(buf, "WEBP", quality=job.quality, method=4)
        else:
            img.save(buf, "PNG")
        return {
            "data": buf.getvalue(),
            "size": img.size,
            "source_size": source_size,
            "kept_small": size != job.size,
        }
    except Exception as e:  # any decoder failure: this file is skipped and reported, never fatal
        return {"skip": "undecodable", "detail": describe_error(e), "source_size": source_size}


def _encoded(jobs: list[ShardJob], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        yield from map(encode_job, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(encode_job, jobs, chunksize=4)


# --------------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Samples into numbered tar shards, `per_shard` each: `name(i)` names shard i; each is written as
    `<name>.tmp` and renamed when full or closed, so a shard that exists is complete. Tar metadata is fixed
    (TAR_MTIME, owner vae-scale): the same samples give byte-identical shards."""

    def __init__(self, out: Path, name, per_shard: int):
        self.out, self.name, self.per_shard = Path(out), name, per_shard
        self.counts: dict[str, int] = {}  # shard name -> samples, in order
        self.writer = None
        self.tmp: Path | None = None

    def write(self, sample: dict[str, Any]) -> None:
        """One sample: {"__key__": key, extension: bytes, ...}."""
        import webdataset as wds

        if self.writer is None or self.counts[self.tmp.name[: -len(".tmp")]] == self.per_shard:
            self._close()
            shard = self.name(len(self.counts))
            self.tmp = self.out / f"{shard}.tmp"
            self.writer = wds.TarWriter(
                str(self.tmp), encoder=False, mtime=TAR_MTIME, user="vae-scale", group="vae-scale"
            )
            self.counts[shard] = 0
        self.writer.write(sample)
        self.counts[self.tmp.name[: -len(".tmp")]] += 1

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.tmp.with_suffix(""))
            self.writer = None

    def close(self) -> dict[str, int]:
        """Finish the last shard; the samples per shard."""
        self._close()
        return dict(self.counts)


class ShardSink:
    """One split's images into `<split>-NNNNNN.tar`, `max_per_shard` per shard, keys numbered in order."""

    def __init__(self, out: Path, split: str, max_per_shard: int):
        self.split = split
        self.shards = ShardWriter(out, lambda i: f"{split}-{i:06d}.tar", max_per_shard)
        self.total = 0

    def write(self, data: bytes, ext: str, meta: dict[str, Any], caption: bytes | None = None) -> None:
        sample = {
            "__key__": f"{self.split}-{self.total:08d}",
            ext: data,
            "json": json.dumps(meta, sort_keys=True).encode(),
        }
        if caption is not None:
            sample["txt"] = caption
        self.shards.write(sample)
        self.total += 1

    def close(self) -> dict[str, Any]:
        return {"samples": self.total, "shards": self.shards.close()}


def _resolution_summary(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    if not sizes:
        return {"images": 0}
    short = sorted(min(s) for s in sizes)
    edges = (0, 256, 512, 1024, 2048)
    names = ["<256"] + [f">={e}" for e in edges[1:]]
    counts = Counter(names[sum(s >= e for e in edges[1:])] for s in short)
    buckets = {n: counts[n] for n in names if counts[n]}
    return {
        "images": len(sizes),
        "short_side": {"min": short[0], "median": int(statistics.median(short)), "max": short[-1]},
        "width": {"min": min(s[0] for s in sizes), "max": max(s[0] for s in sizes)},
        "height": {"min": min(s[1] for s in sizes), "max": max(s[1] for s in sizes)},
        "megapixels_mean": round(sum(w * h for w, h in sizes) / len(sizes) / 1e6, 3),
        "short_side_histogram": buckets,
    }


def clear_old_shards(out: Path) -> None:
    """Remove the shards and index.json an earlier write left in `out` (a new write replaces them all)."""
    old = [p for p in out.iterdir() if SHARD_NAME.match(p.name) or p.name == "index.json"]
    for p in old:
        p.unlink()
    if old:
        log.info("removed %d shard files of an earlier run from %s", len(old), out)


def write_shards(
    src: str,
    out: str | os.PathLike,
    *,
    size: int | None = None,
    max_per_shard: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    keep_small: bool = False,
) -> dict[str, Any]:
    """Write train/val shards and index.json from SRC (folder, glob, "sample" or "sample-color"); returns the
    index.

    Earlier `train-NNNNNN.tar` / `val-NNNNNN.tar` / index.json in OUT are replaced; nothing else there is
    touched. Raises DataError when SRC names no images or none of them is usable. keep_small: images whose
    short side is below `size` are stored at their own size instead of skipped (never upscaled).
    """
    from tqdm import tqdm

    sources, ignored = list_sources(src)
    order = list(range(len(sources)))
    random.Random(seed).shuffle(order)
    n_val = round(len(sources) * val_fraction)
    if val_fraction > 0 and len(sources) >= 2:
        n_val = min(max(n_val, 1), len(sources) - 1)
    splits = {"val": order[:n_val], "train": order[n_val:]}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_old_shards(out)
    skipped: Counter[str] = Counter()
    skipped_files: list[dict[str, str]] = []
    kept_small = captions = linked_captions = 0
    linked_example = ""
    source_sizes: list[tuple[int, int]] = []
    written: dict[str, Any] = {}
    bar = tqdm(total=len(sources), unit="img", desc="shards", disable=not progress, dynamic_ncols=True)
    for split in ("train", "val"):
        jobs = [ShardJob(sources[i], size, image_format, quality, keep_small) for i in splits[split]]
        sink = ShardSink(out, split, max_per_shard)
        for job, res in zip(jobs, _encoded(jobs, workers), strict=True):
            bar.update(1)
            if res["source_size"] is not None:
                source_sizes.append(tuple(res["source_size"]))
            if "skip" in res:
                skipped[res["skip"]] += 1
                if len(skipped_files) < MAX_LISTED_SKIPS:
                    skipped_files.append(
                        {"file": job.source.name, "reason": res["skip"], "detail": res["detail"]}
                    )
                if skipped[res["skip"]] == 1:
                    log.warning("skipping %s: %s (%s)", job.source.name, res["skip"], res["detail"])
                continue
            kept_small += res["kept_small"]
            (w, h), (sw, sh) = res["size"], res["source_size"]
            caption = _read_caption(job.source.caption) if job.source.caption else None
            if job.source.caption and caption is None:
                linked_captions += 1
                linked_example = linked_example or job.source.caption
            captions += caption is not None
            sink.write(
                res["data"],
                image_format,
                {"source": job.source.name, "width": w, "height": h, "source_width": sw, "source_height": sh},
                caption,
            )
            bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
        written[split] = sink.close()
    bar.close()
    if linked_captions:
        log.warning(
            "%d caption file(s) are symbolic links, never followed: their samples have no caption (e.g. %s; "
            "index.json's totals.symlinked_captions counts them)",
            linked_captions,
            linked_example,
        )
    if written["train"]["samples"] == 0:
        raise DataError(f"no usable image in {src}: skipped {dict(skipped)}")

    index = {
        "format": "vae-scale shards",
        "version": 1,
        "source": src,
        "options": {
            "size": size,
            "max_per_shard": max_per_shard,
            "format": image_format,
            "quality": quality,
            "val_fraction": val_fraction,
            "seed": seed,
            "keep_small": keep_small,
        },
        "totals": {
            "files": len(sources),
            "written": written["train"]["samples"] + written["val"]["samples"],
            "train": written["train"]["samples"],
            "val": written["val"]["samples"],
            "skipped": sum(skipped.values()),
            "kept_small": kept_small,
            "captions": captions,
            "symlinked_captions": linked_captions,
            "ignored_non_images": ignored,
        },
        "splits": written,
        "source_resolution": _resolution_summary(source_sizes),
        "skipped": {"counts": dict(sorted(skipped.items())), "files": skipped_files},
    }
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    t = index["totals"]
    log.info(f"wrote {t['train']} train and {t['val']} val samples to {out} ({t['skipped']} skipped)")
    if val_fraction > 0 and t["val"] == 0:
        why = (
            f"the {n_val} image(s) drawn for val were skipped"
            if n_val
            else f"{len(sources)} image(s) x {val_fraction} rounds to 0"
        )
        log.warning(
            "--val-fraction %g wrote no val samples (%s): data.val=%s would find no val shards; raise "
            "--val-fraction or fix the skipped images",
            val_fraction,
            why,
            out,
        )
    return index


SKIP_REASONS = {
    "too_small": "short side below --size (never upscaled; --keep-small stores them at their own size)",
    "undecodable": "not a readable image (or video)",
    "empty": "zero-length file",
    "too_short": "a video with fewer frames than --min-frames",
}


def skip_summary(index: dict[str, Any]) -> list[str]:
    """Console lines saying how many images were skipped, why, and one example of each reason."""
    counts = index["skipped"]["counts"]
    if not counts:
        return []
    lines = [f"skipped {sum(counts.values())} of {index['totals']['files']} images:"]
    for reason, n in counts.items():
        example = next((f for f in index["skipped"]["files"] if f["reason"] == reason), None)
        eg = f"; e.g. {example['file']}: {example['detail']}" if example else ""
        lines.append(f"  {n} {reason}: {SKIP_REASONS.get(reason, reason)}{eg}")
    return lines
