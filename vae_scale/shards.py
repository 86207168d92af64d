"""The shard format: writing shards (`vae-scale shards`), listing them, reading their raw samples.

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

Listing and reading (used by the loader in data.py, which adds ranks, workers, decoding and torch): shard
specs are expanded and checked here (`expand_shards`), counted from index.json or by scanning member
names (`shard_counts`), and read into raw samples with webdataset's tar iterator (`read_unit`), where the
problems visible without decoding are counted: unreadable shard, truncated tar, duplicate key, sample
without an image, zero-length image. This module does not import torch.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import io
import json
import logging
import os
import random
import re
import statistics
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from braceexpand import braceexpand
from PIL import Image, ImageOps
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from vae_scale.outputs import check_writable_dir

# webdataset re-exports the function gopen under the module's name; the scheme table needs the module.
wds_gopen = importlib.import_module("webdataset.gopen")

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
"""Image file extensions the writer reads from a folder and the loader decodes from a shard (any case)."""

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
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
MAX_LISTED_SKIPS = 1000  # index.json lists this many skipped files in full; the counts are always exact
TAR_MTIME = 0  # fixed tar metadata: byte-identical shards from the same input


class DataError(ValueError):
    """Unusable training data (missing shard, empty pattern, too many bad samples); the message names it."""


# --------------------------------------------------------------------------------------------------------
# Images


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB with EXIF orientation applied: L, LA, P, RGBA (composited on white), CMYK, 16-bit, float.

    The image is loaded; pass a freshly opened one (after any `draft`).
    """
    ImageOps.exif_transpose(img, in_place=True)
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # PIL's convert() clips 16-bit values to 255 instead of scaling them.
        a = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        a = a * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else a
        return Image.fromarray(np.clip(np.nan_to_num(a) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _load_sample(name: str) -> Image.Image:
    import skimage.data

    a = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return Image.fromarray(a)


# --------------------------------------------------------------------------------------------------------
# Shard lists


def _split_spec(spec: str) -> list[str]:
    """Split a comma- or '::'-separated list, leaving commas inside {a,b} brace groups alone."""
    items, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [p.strip() for item in items for p in item.split("::") if p.strip()]


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return os.path.expanduser(url[len("file://") :] if url.startswith("file://") else url)


def _read_index(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None


def _folder_shards(folder: str, split: str) -> list[str]:
    index = _read_index(folder)
    if index and split in index.get("splits", {}):
        names = list(index["splits"][split]["shards"])
        if not names:
            raise DataError(f"{folder}/index.json lists no {split} shards")
        return [os.path.join(folder, n) for n in names]
    tars = sorted(p for ext in ("*.tar", "*.tar.gz", "*.tgz") for p in glob.glob(os.path.join(folder, ext)))
    if not tars:
        raise DataError(f"folder {folder} holds no .tar shards")
    named = [t for t in tars if os.path.basename(t).startswith(f"{split}-")]
    other = "val" if split == "train" else "train"
    if not named and any(os.path.basename(t).startswith(f"{other}-") for t in tars):
        raise DataError(f"folder {folder} holds no {split}-*.tar shards")
    return named or tars


def expand_shards(spec: str | list[str], split: str = "train") -> list[str]:
    """Shard URLs from brace patterns, globs, folders, comma-separated lists or URLs (pipe:, fsspec).

    Local shards must exist and patterns must match (DataError naming the first offender); remote URLs
    are checked when read. A folder written by `vae-scale shards` gives its `split` shards.
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else _split_spec(spec)
    if not items:
        raise DataError(f"no {split} shards given (data.{split} is empty)")
    urls: list[str] = []
    for item in items:
        if not _is_local(item):
            urls += list(braceexpand(item))
            continue
        path = _local_path(item)
        if os.path.isdir(path):
            urls += _folder_shards(path, split)
            continue
        expanded, missing = [], []
        for p in braceexpand(path):
            if any(c in p for c in "*?["):
                matched = sorted(glob.glob(p))
                if not matched:
                    raise DataError(f"pattern {item} matches no file")
                expanded += matched
            else:
                (expanded if os.path.exists(p) else missing).append(p)
        if missing:
            n = f" ({len(missing)} shards of {item} are missing)" if len(missing) > 1 else ""
            raise DataError(f"shard {missing[0]} does not exist{n}")
        urls += expanded
    if not urls:
        raise DataError(f"{spec} names no shards")
    return urls


def _count_samples(url: str) -> int:
    """Samples (keys with an image member) in one shard, from member names only (a truncated tar counts
    what it holds; an unreadable one 0)."""
    names: list[str] = []
    try:
        if _is_local(url):  # random access: seeks from header to header
            with tarfile.open(_local_path(url)) as tf:
                names += (m.name for m in tf if m.isreg())
        else:  # a stream: member data is read past, not kept
            with open_shard(url) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
                names += (m.name for m in tf if m.isreg())
    except Exception as e:
        log.warning("counting samples in %s: %s", url, describe_error(e))
    keys = set()
    for name in names:
        key, ext = base_plus_ext(name)
        if key is not None and ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            keys.add(key)
    return len(keys)


def shard_counts(urls: list[str], scan: bool) -> dict[str, float] | None:
    """Samples per shard from index.json next to local shards; the rest scanned (scan) or estimated."""
    counts: dict[str, float] = {}
    folders: dict[str, dict[str, int]] = {}
    for url in urls:
        if not _is_local(url):
            continue
        folder, name = os.path.split(_local_path(url))
        if folder not in folders:
            index = _read_index(folder) or {}
            folders[folder] = {
                n: c for s in index.get("splits", {}).values() for n, c in s.get("shards", {}).items()
            }
        if name in folders[folder]:
            counts[url] = folders[folder][name]
    missing = [u for u in urls if u not in counts]
    if missing and scan:
        log.info(
            "counting samples in %d shards without index.json (member names only; set "
            "data.batches_per_epoch to skip this)",
            len(missing),
        )
        with ThreadPoolExecutor(max_workers=min(16, len(missing))) as pool:
            counts.update(zip(missing, pool.map(_count_samples, missing), strict=True))
    elif missing:
        if not counts:
            return None
        mean = sum(counts.values()) / len(counts)
        counts.update({u: mean for u in missing})
    return counts


def count_samples(urls: list[str]) -> int | None:
    """Samples in `urls` (index.json, else member names scanned); None when some are remote (not read)."""
    if not all(_is_local(u) for u in urls):
        return None
    return int(sum((shard_counts(urls, scan=True) or {}).values()))


# --------------------------------------------------------------------------------------------------------
# Reading shards: raw samples, with cheap problems counted


def describe_error(e: BaseException) -> str:
    """`Type: message` on one line, without object addresses (reports and index.json stay reproducible)."""
    msg = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(e.args[0]) if e.args else str(e))
    return f"{type(e).__name__}: {msg}".replace("\n", " ")[:300]


@dataclass(frozen=True)
class ShardUnit:
    """A shard, or one part of it: the samples whose index in the shard is `part` modulo `parts`."""

    url: str
    part: int = 0
    parts: int = 1


@dataclass
class RawSample:
    """One sample as read from a shard: its image member's bytes, not decoded, and (when asked for) its
    other members by extension (captions, metadata: "txt", "json", ...)."""

    url: str
    key: str
    data: bytes
    sidecars: dict[str, bytes] = field(default_factory=dict)


class BadTally:
    """Bad samples by kind and by shard, and the first one in full."""

    def __init__(self):
        self.kinds: Counter[str] = Counter()
        self.shards: Counter[str] = Counter()
        self.first: str | None = None

    def add(self, kind: str, url: str, key: str, detail: str) -> None:
        self.kinds[kind] += 1
        self.shards[url] += 1
        if self.first is None:
            self.first = f"{kind} in {url}" + (f" (key {key})" if key else "") + f": {detail}"

    def take(self) -> dict[str, Any]:
        """The counts so far, then reset (in place: readers hold a reference)."""
        out = {"kinds": dict(self.kinds), "shards": dict(self.shards), "first": self.first}
        self.kinds.clear()
        self.shards.clear()
        self.first = None
        return out


class _CountingReader:
    """A read-only stream that counts bytes, to spot a tar cut inside a header (tarfile just stops there)."""

    def __init__(self, f):
        self.f, self.n, self.head = f, 0, b""

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        if self.n < 8:
            self.head = (self.head + b[:8])[:8]
        self.n += len(b)
        return b

    def truncated(self) -> bool:
        return self.n % 512 != 0 and not self.head.startswith(_COMPRESSED_MAGIC)


def open_shard(url: str):
    """A binary stream of a shard: local paths and webdataset's schemes (pipe:, http, gs, ...) through
    webdataset's gopen, anything else (s3://, memory://, ...) through fsspec."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in wds_gopen.gopen_schemes:
        return wds_gopen.gopen(_local_path(url) if scheme in ("", "file") else url, "rb")
    import fsspec  # s3://, gcs://, memory://, ...: whatever fsspec opens

    return fsspec.open(url, "rb").open()


def _is_image_suffix(suffix: str) -> bool:
    return suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _image_member(members: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    for suffix, data in members.items():  # e.g. "input.jpg"
        if suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return data
    return None


def read_unit(unit: ShardUnit, tally: BadTally, sidecars: bool = False) -> Iterator[RawSample]:
    """The raw samples of one unit in tar order (WebDataset grouping: consecutive members share a key).

    Shard-level problems are counted by part 0 only, so a shard split into parts counts them once.
    sidecars: keep the bytes of the members that are not images (otherwise only their names are seen).
    """
    try:
        stream = open_shard(unit.url)
    except Exception as e:
        if unit.part == 0:
            tally.add("shard_unreadable", unit.url, "", describe_error(e))
        return
    reader, errors, seen = _CountingReader(stream), [], set()
    key, members, dup, dup_key, index, any_member = None, {}, 0, False, -1, False

    def on_error(e: Exception) -> bool:
        errors.append(e)
        return False  # stop reading this shard

    def finish() -> RawSample | None:
        if key is None or index % unit.parts != unit.part:
            return None
        if dup_key:
            tally.add("duplicate_key", unit.url, key, "key already seen earlier in this shard")
            return None
        for _ in range(dup):
            tally.add("duplicate_key", unit.url, key, "member repeated within the sample")
        data = _image_member(members)
        if data is None:
            tally.add("no_image", unit.url, key, f"no image member among {sorted(members)}")
        elif not data:
            tally.add("empty", unit.url, key, "zero-length image member")
        else:
            extra = {k: v for k, v in members.items() if not _is_image_suffix(k)} if sidecars else {}
            return RawSample(unit.url, key, data, extra)
        return None

    try:
        for member in tar_file_iterator(reader, handler=on_error):
            any_member = True
            k, suffix = base_plus_ext(member["fname"])
            if k is None:
                continue
            suffix = suffix.lower()
            if k != key:
                raw = finish()
                if raw is not None:
                    yield raw
                key, members, dup, dup_key, index = k, {}, 0, k in seen, index + 1
                seen.add(k)
            if suffix in members:
                dup += 1
            elif suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                members[suffix] = member["data"]
            else:  # a sidecar (.txt, .json, ...): for training only its presence matters
                members[suffix] = member["data"] if sidecars else b""
    except Exception as e:
        errors.append(e)
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe: whose command failed reports it here
            errors.append(e)
    raw = finish()  # members read before an error are whole; the broken one was never added
    if raw is not None:
        yield raw
    if unit.part == 0 and (errors or reader.truncated()):
        kind = "truncated_tar" if any_member else "shard_unreadable"
        tally.add(kind, unit.url, "", describe_error(errors[0]) if errors else "archive ends inside a header")


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
class _Job:
    source: Source
    size: int | None
    fmt: str
    quality: int
    keep_small: bool = False


def _encode(job: _Job) -> dict[str, Any]:
    """Encode one source: {"data", "size", "source_size"} or {"skip": reason, "detail", "source_size"}."""
    src = job.source
    source_size = None
    try:
        if src.path is None:
            img, raw = _load_sample(src.name.split("/", 1)[1]), None
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


def _encoded(jobs: list[_Job], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        yield from map(_encode, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_encode, jobs, chunksize=4)


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


class _ShardSink:
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


def _clear_old_shards(out: Path) -> None:
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
    _clear_old_shards(out)
    skipped: Counter[str] = Counter()
    skipped_files: list[dict[str, str]] = []
    kept_small = captions = 0
    source_sizes: list[tuple[int, int]] = []
    written: dict[str, Any] = {}
    bar = tqdm(total=len(sources), unit="img", desc="shards", disable=not progress, dynamic_ncols=True)
    for split in ("train", "val"):
        jobs = [_Job(sources[i], size, image_format, quality, keep_small) for i in splits[split]]
        sink = _ShardSink(out, split, max_per_shard)
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
            caption = Path(job.source.caption).read_bytes() if job.source.caption else None
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
    "undecodable": "not a readable image",
    "empty": "zero-length file",
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


def shards_main(argv: list[str]) -> int:
    """`vae-scale shards SRC OUT`: write WebDataset tar shards and index.json; returns 0."""
    p = argparse.ArgumentParser(prog="vae-scale shards", description=shards_main.__doc__)
    p.add_argument(
        "src", metavar="SRC", help="folder of images (recursive), a glob, 'sample' or 'sample-color'"
    )
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize so the short side is N (smaller images are skipped unless --keep-small)",
    )
    p.add_argument(
        "--keep-small",
        action="store_true",
        help="with --size: keep images whose short side is below N at their own size (never upscaled)",
    )
    p.add_argument("--max-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--format", choices=sorted(FORMATS), default="jpg", help="image format in the shards")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality 1-100 (default 95)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the order (default 0)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16), help="encoding processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.size is not None and args.size <= 0:
        p.error(f"--size must be > 0, got {args.size}")
    if args.max_per_shard <= 0:
        p.error(f"--max-per-shard must be > 0, got {args.max_per_shard}")
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must be in 1..100, got {args.quality}")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.keep_small and args.size is None:
        p.error("--keep-small needs --size (without it every image keeps its own size)")
    check_writable_dir(args.out, "OUT")
    index = write_shards(
        args.src,
        args.out,
        size=args.size,
        max_per_shard=args.max_per_shard,
        image_format=args.format,
        quality=args.quality,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
        keep_small=args.keep_small,
    )
    t = index["totals"]
    small = f", {t['kept_small']} below --size kept at their own size" if t["kept_small"] else ""
    captions = f", {t['captions']} with a .txt caption" if t["captions"] else ""
    print(
        f"{args.out}: {t['train']} train + {t['val']} val samples in "
        f"{len(index['splits']['train']['shards'])} + {len(index['splits']['val']['shards'])} shards, "
        f"{t['skipped']} skipped{small}{captions}"
    )
    for line in skip_summary(index):
        print(line)
    return 0
