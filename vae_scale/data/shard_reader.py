"""The shard format, read: shard specs expanded and checked, samples counted, raw samples read out of tars.

Used by the loader in data.py (which adds ranks, workers, decoding and torch), by the image reader of
`eval` and `encode`, and by the pre-flight checks. Shard specs are expanded and checked here
(`expand_shards`), counted from index.json or by scanning member names (`shard_counts`), and read into raw
samples with webdataset's tar iterator (`read_unit`), where the problems visible without decoding are
counted: unreadable shard, truncated tar, duplicate key, sample without an image, zero-length image.
`to_rgb` is the one image conversion the writer and the readers share. This module does not import torch;
vae_scale/data/shards.py writes shards.
"""

from __future__ import annotations

import glob
import importlib
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
from braceexpand import braceexpand
from PIL import Image, ImageOps
from webdataset.tariterators import base_plus_ext, tar_file_iterator

# webdataset re-exports the function gopen under the module's name; the scheme table needs the module.
wds_gopen = importlib.import_module("webdataset.gopen")

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
"""Image file extensions the writer reads from a folder and the loader decodes from a shard (any case)."""
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
"""Video file extensions: what `vae-scale shards` reads as clips and the clip loader decodes (any case).
video2dataset's shards hold `.mp4` members."""

_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


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


# --------------------------------------------------------------------------------------------------------
# Shard lists


def _split_spec(spec: str) -> list[str]:
    """Split a comma- or '::'-separated list, leaving commas inside {a,b} brace groups alone; `\\,` is a
    comma that belongs to the path (`/data/a\\,b/x.tar` is the one shard /data/a,b/x.tar)."""
    items, depth, cur = [], 0, ""
    escaped = False
    for ch in spec:
        if escaped:
            # Only a comma is unescaped here; inside braces braceexpand unescapes it (and other backslashes)
            cur += "," if ch == "," and depth == 0 else "\\" + ch
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            continue
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur + ("\\" if escaped else ""))
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


COMMAND_SCHEMES = ("pipe",)
"""URL schemes whose shard "URL" webdataset runs as a shell command."""


def command_items(spec: str | list[str]) -> list[str]:
    """The shard URLs of a spec that webdataset would run as a shell command (`pipe:...`), braces expanded."""
    items = list(spec) if isinstance(spec, (list, tuple)) else _split_spec(spec or "")
    return [
        url
        for item in items
        if "pipe" in item.lower()  # skip expanding the many names of an ordinary brace pattern
        for url in braceexpand(item)
        if urlparse(url.strip()).scheme in COMMAND_SCHEMES
    ]


def refuse_commands_from_file(spec: str | list[str], key: str, file: str | os.PathLike, how: str) -> None:
    """DataError when `spec`, read as `key` from `file` rather than typed by the user, is a shell command.

    A run folder or checkpoint may come from someone else (a shared file system): what it says to run is
    never run. `how`: what the user types to run it anyway.
    """
    commands = command_items(spec)
    if commands:
        shown = commands[0] if len(commands[0]) <= 60 else commands[0][:57] + "..."
        raise DataError(
            f"{key} in {file} is a shell command ({shown!r}); a command read from a file is run only when "
            f"typed on the command line: {how}"
        )


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
    """Samples (keys with an image or video member) in one shard, from member names only (a truncated tar
    counts what it holds; an unreadable one 0)."""
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
        if key is not None and ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
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
    other members by extension (captions, metadata: "txt", "json", ...). `ext`: the extension of the data
    member (read_unit's `media` decides which members count as data)."""

    url: str
    key: str
    data: bytes
    sidecars: dict[str, bytes] = field(default_factory=dict)
    ext: str = ""


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


def _is_image_suffix(suffix: str, media: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    return suffix.rsplit(".", 1)[-1] in media


def _image_member(
    members: dict[str, bytes], media: tuple[str, ...] = IMAGE_EXTENSIONS
) -> tuple[bytes, str] | tuple[None, str]:
    """The data member's bytes and its extension (the first of `media` present), else (None, "")."""
    for ext in media:
        if ext in members:
            return members[ext], ext
    for suffix, data in members.items():  # e.g. "input.jpg"
        if suffix.rsplit(".", 1)[-1] in media:
            return data, suffix.rsplit(".", 1)[-1]
    return None, ""


def read_unit(
    unit: ShardUnit, tally: BadTally, sidecars: bool = False, media: tuple[str, ...] = IMAGE_EXTENSIONS
) -> Iterator[RawSample]:
    """The raw samples of one unit in tar order (WebDataset grouping: consecutive members share a key).

    Shard-level problems are counted by part 0 only, so a shard split into parts counts them once.
    sidecars: keep the bytes of the members that are not images (otherwise only their names are seen).
    media: the member extensions that are a sample's data, in order of preference (the clip loader adds
    VIDEO_EXTENSIONS); a sample with none of them is counted as no_image.
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
        data, ext = _image_member(members, media)
        if data is None:
            tally.add("no_image", unit.url, key, f"no image member among {sorted(members)}")
        elif not data:
            tally.add("empty", unit.url, key, "zero-length image member")
        else:
            extra = {k: v for k, v in members.items() if not _is_image_suffix(k, media)} if sidecars else {}
            return RawSample(unit.url, key, data, extra, ext)
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
            elif suffix.rsplit(".", 1)[-1] in media:
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
