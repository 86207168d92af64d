"""Video as data: clips decoded from shard members, clips encoded for shards, camera-motion clips made from
photographs, and `vae-scale shards` for videos (clip shards).

    vae-scale shards ~/videos data/clips --frames 33 --size 256     # videos (and images) -> clip shards
    vae-scale shards sample-video data/demo-video --frames 9 --size 64    # no download: camera motion

Decoding is PyAV's (FFmpeg, bundled in its wheels; the optional extra `video`). torchcodec was the other
candidate: its wheels load the system's FFmpeg libraries, which a plain pip install does not bring, so it
does not import on a machine without them.

The clip shard format. A clip is one sample: `<key>.mp4` (H.264, every frame a keyframe, 4:4:4 chroma,
constant quality --crf) plus `<key>.json` (source, first frame, frames, fps, sizes). Why this and not
per-frame JPEGs or a uint8 array: one member per clip keeps WebDataset's grouping, the shuffle buffer and
the loader's raw replay unchanged; every frame being a keyframe lets the loader decode only the frames a
strided clip picks (the packets are demuxed, which costs no decoding, and only those are sent to the
decoder); intra-coded H.264 is smaller than 4:4:4 JPEG at a lower error (camera-motion clips at 256x256 on
the 2-core Xeon: 21 KiB a frame at crf 10, mean error 1.7 levels of 255; 30 KiB at crf 6, error 1.3; JPEG
q95 36 KiB, error 1.5), and a uint8 array is 192 KiB. The price is decoding: H.264 decodes several times
slower than JPEG (17 frames of 256x256: about 110-140 ms against 18-40 ms for PIL's JPEG, on the loaded
2-core machine), so a loader needs more workers per GPU than for images; per-frame JPEG members would
decode faster at about 1.7x the size. 4:4:4 because a VAE learns its data's artifacts, 4:2:0 chroma blur
too. What
video2dataset writes (`.mp4` + `.json` + `.txt`, inter-coded H.264 4:2:0) is read as it is: a clip whose
frames are not all keyframes is decoded in order up to its last picked frame.

Writing clips from videos. Each video is decoded once, each frame resized so its short side is --size
(Lanczos, never upscaled: a smaller video is skipped as too_small) and cropped to even sides, and cut into
consecutive clips of --frames frames (a remainder of at least --min-frames is kept as a shorter clip). A
video with fewer than --min-frames frames is skipped as too_short; one that cannot be decoded as
undecodable; both are counted in index.json. The train/val split is by source, so the clips of one video
never land on both sides. Images in the same folder are written as image samples (`.jpg`): the clip
loader reads them as one-frame clips.

Camera-motion clips (`sample-video`): scikit-image's colour photographs (SAMPLE_COLOR_IMAGES), each filmed
by a virtual camera: a square window that pans or zooms linearly across the photograph, every frame
resampled from the full-resolution photograph at sub-pixel positions (bicubic), so motion is smooth and
nothing is downloaded. Seeded: the same seed gives the same clips.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vae_scale.data.shard_reader import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, DataError, describe_error
from vae_scale.data.shards import (
    MAX_LISTED_SKIPS,
    SAMPLE_COLOR_IMAGES,
    ShardJob,
    ShardSink,
    Source,
    clear_old_shards,
    encode_job,
    load_sample,
)

log = logging.getLogger(__name__)

CLIP_EXTENSION = "mp4"
"""The member extension of the clips `vae-scale shards` writes."""
DEFAULT_CRF = 10
"""x264's constant quality of written clips (0 lossless, 51 worst)."""
SAMPLE_VIDEO = "sample-video"
"""The camera-motion source: clips made from SAMPLE_COLOR_IMAGES."""


def _describe(e: BaseException) -> str:
    """describe_error, with FFmpeg's message rather than its error number (PyAV's first argument)."""
    strerror = getattr(e, "strerror", None)
    return f"{type(e).__name__}: {strerror}" if strerror else describe_error(e)


def _av():
    try:
        import av
    except ImportError:
        raise DataError("video needs PyAV: pip install 'vae-scale[video]' (or pip install av)") from None
    return av


# --------------------------------------------------------------------------------------------------------
# Decoding


class VideoError(Exception):
    """A clip that cannot be used: `kind` is undecodable or too_short (how the loader counts it)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


class Clip:
    """An encoded video in memory, demuxed (no frame decoded yet): `len(clip)` frames, any of them decoded
    by one call of `frames(indices)`, which closes it."""

    def __init__(self, data: bytes):
        av = _av()
        self._container = None
        try:
            self._container = av.open(io.BytesIO(data))
            self._stream = self._container.streams.video[0]
            # one decoding thread: a loader's parallelism is its worker processes (FFmpeg's default, one
            # thread per core in every worker, oversubscribes the CPUs)
            self._stream.codec_context.thread_count = 1
            # one packet per frame; the demuxer's final empty packet is no frame
            self._packets = [p for p in self._container.demux(self._stream) if p.size]
        except Exception as e:
            self.close()
            raise VideoError("undecodable", _describe(e)) from None
        self._intra = all(p.is_keyframe for p in self._packets)

    def __len__(self) -> int:
        return len(self._packets)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()

    def frames(self, indices: list[int]) -> list[Image.Image]:
        """The frames at `indices` (ascending, presentation order) as RGB images."""
        want = set(indices)
        out: dict[int, Image.Image] = {}
        codec = self._stream.codec_context
        try:
            if self._intra:  # every packet decodes alone: send only the picked ones
                packets = sorted(self._packets, key=lambda p: p.pts if p.pts is not None else 0)
                decoded = [f for i in indices for f in codec.decode(packets[i])] + list(codec.decode(None))
                out = dict(zip(indices, (f.to_image() for f in decoded)))
            else:  # inter-coded: decode in order up to the last picked frame
                n = 0
                for p in [*self._packets, None]:
                    for f in codec.decode(p):
                        if n in want:
                            out[n] = f.to_image()
                        n += 1
                    if n > indices[-1]:
                        break
        except Exception as e:
            raise VideoError("undecodable", _describe(e)) from None
        finally:
            self.close()
        if len(out) < len(indices):
            raise VideoError("undecodable", f"decoded {len(out)} of the {len(indices)} frames asked for")
        return [out[i] for i in indices]


def clip_span(frames: int, stride: int) -> int:
    """Stored frames a clip of `frames` frames at `stride` covers."""
    return 1 + (frames - 1) * stride


def read_clip(data: bytes, frames: int, stride: int, rng: random.Random | None) -> list[Image.Image]:
    """`frames` frames at `stride` from an encoded video: a random start with rng, else the first frame.

    VideoError("too_short") when the video has fewer than clip_span(frames, stride) frames.
    """
    clip = Clip(data)
    span = clip_span(frames, stride)
    if len(clip) < span:
        clip.close()
        raise VideoError(
            "too_short",
            f"{len(clip)} frames, fewer than the {span} a {frames}-frame clip at stride {stride} spans",
        )
    start = rng.randint(0, len(clip) - span) if rng is not None else 0
    return clip.frames(list(range(start, start + span, stride)))


def read_frame(data: bytes, rng: random.Random | None) -> Image.Image:
    """One frame of an encoded video (random with rng, else the first): a clip's image for image batches."""
    clip = Clip(data)
    if not len(clip):
        clip.close()
        raise VideoError("undecodable", "no video frames")
    return clip.frames([rng.randrange(len(clip)) if rng is not None else 0])[0]


# --------------------------------------------------------------------------------------------------------
# Encoding


def encode_clip(frames: list[np.ndarray], fps: float = 8.0, crf: int = DEFAULT_CRF) -> bytes:
    """An `.mp4` of (H, W, 3) uint8 RGB frames (even H and W): H.264, every frame a keyframe, 4:4:4,
    tuned for decoding speed."""
    av = _av()
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        stream.codec_context.gop_size = 1  # intra only: any frame decodes alone
        # one thread: x264's output is then a function of the frames only (byte-identical shards)
        # fastdecode (CAVLC, no deblocking): decodes about 1.6x faster for about 3% more bytes
        stream.options = {"crf": str(crf), "preset": "medium", "tune": "fastdecode", "threads": "1"}
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Camera motion


def camera_motion(img: Image.Image, frames: int, size: int, rng: random.Random) -> list[np.ndarray]:
    """`frames` (size, size, 3) uint8 views of `img` by a virtual camera: a pan or a zoom, linear in time.

    The window is square, between 35% and 85% of the photograph's short side, kept inside it; each frame
    is resampled (bicubic) from the photograph at sub-pixel positions.
    """
    w, h = img.size
    short = min(w, h)
    if rng.random() < 0.5:  # pan: a fixed window that travels
        s0 = s1 = short * rng.uniform(0.35, 0.6)
    else:  # zoom in or out
        s0, s1 = short * rng.uniform(0.6, 0.85), short * rng.uniform(0.35, 0.55)
        if rng.random() < 0.5:
            s0, s1 = s1, s0

    def centre(s: float) -> tuple[float, float]:
        return rng.uniform(s / 2, w - s / 2), rng.uniform(s / 2, h - s / 2)

    (x0, y0), (x1, y1) = centre(s0), centre(s1)
    out = []
    for t in range(frames):
        a = t / max(frames - 1, 1)
        s, cx, cy = s0 + a * (s1 - s0), x0 + a * (x1 - x0), y0 + a * (y1 - y0)
        box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
        out.append(np.asarray(img.resize((size, size), Image.BICUBIC, box=box)))
    return out


# --------------------------------------------------------------------------------------------------------
# Writing clip shards


@dataclass(frozen=True)
class _ClipJob:
    source: Source
    kind: str  # video | image | motion
    size: int | None
    frames: int
    min_frames: int
    crf: int
    quality: int
    clips: int = 1  # motion: clips per photograph
    seed: int = 0


def _resize_even(img: Image.Image, size: int | None) -> np.ndarray:
    """Short side to `size` (Lanczos; never up), then cropped to even sides (x264 in 4:4:4 takes any, but
    players and other decoders want even)."""
    if size is not None:
        w, h = img.size
        s = size / min(w, h)
        new = (max(size, round(w * s)), max(size, round(h * s)))
        if new != img.size:
            img = img.resize(new, Image.LANCZOS, reducing_gap=3.0)
    a = np.asarray(img.convert("RGB"))
    return a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2]


def _encode_video(job: _ClipJob) -> dict[str, Any]:
    """One video: {"clips": [{"data", "start", "frames"}], "size", "source_size", "fps"} or {"skip", ...}."""
    av = _av()
    clips, buf, clip_frames, n, source_size, fps = [], [], [], 0, None, 8.0
    try:
        if os.path.getsize(job.source.path) == 0:
            return {"skip": "empty", "detail": "zero-length file", "source_size": None}
        with av.open(job.source.path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0) or fps
            for frame in container.decode(stream):
                img = frame.to_image()
                if source_size is None:
                    source_size = img.size
                    if job.size is not None and min(img.size) < job.size:
                        return {
                            "skip": "too_small",
                            "detail": f"{img.size[0]}x{img.size[1]} is below --size {job.size}",
                            "source_size": source_size,
                        }
                buf.append(_resize_even(img, job.size))
                n += 1
                if len(buf) == job.frames:
                    clip_frames = buf
                    clips.append(
                        {"data": encode_clip(buf, fps, job.crf), "start": n - len(buf), "frames": len(buf)}
                    )
                    buf = []
    except Exception as e:  # any decoder failure: this file is skipped and reported, never fatal
        return {"skip": "undecodable", "detail": _describe(e), "source_size": source_size}
    if n < job.min_frames:
        return {
            "skip": "too_short",
            "detail": f"{n} frames, fewer than --min-frames {job.min_frames}",
            "source_size": source_size,
        }
    if len(buf) >= job.min_frames:
        clips.append({"data": encode_clip(buf, fps, job.crf), "start": n - len(buf), "frames": len(buf)})
    h, w = (buf or clip_frames)[0].shape[:2]
    return {"clips": clips, "size": (w, h), "source_size": source_size, "fps": fps}


def _motion_clips(job: _ClipJob) -> dict[str, Any]:
    """Camera-motion clips of one sample photograph."""
    name = job.source.name.split("/", 1)[1]
    img = load_sample(name).convert("RGB")
    size = job.size or 64
    rng = random.Random(f"{job.seed}/{name}")
    clips = [
        {
            "data": encode_clip(camera_motion(img, job.frames, size, rng), 8.0, job.crf),
            "start": 0,
            "frames": job.frames,
        }
        for _ in range(job.clips)
    ]
    return {"clips": clips, "size": (size, size), "source_size": img.size, "fps": 8.0}


def _run(job: _ClipJob) -> dict[str, Any]:
    if job.kind == "video":
        return _encode_video(job)
    if job.kind == "motion":
        return _motion_clips(job)
    return encode_job(ShardJob(job.source, job.size, "jpg", job.quality))


def _results(jobs: list[_ClipJob], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        yield from map(_run, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_run, jobs)


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def list_clip_sources(src: str) -> list[tuple[Source, str]]:
    """(source, kind) for SRC: a folder's videos and images (sorted), or SAMPLE_VIDEO's photographs.
    DataError when there are none."""
    if src == SAMPLE_VIDEO:
        return [(Source(f"sample/{n}", None), "motion") for n in SAMPLE_COLOR_IMAGES]
    if not os.path.isdir(src):
        raise DataError(f"{src} is not a folder (give a folder of videos, or {SAMPLE_VIDEO!r})")
    found = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            kind = "video" if _ext(f) in VIDEO_EXTENSIONS else "image" if _ext(f) in IMAGE_EXTENSIONS else ""
            if kind:
                path = os.path.join(root, f)
                found.append((Source(os.path.relpath(path, src), path), kind))
    if not found:
        raise DataError(f"{src} holds no videos ({', '.join(VIDEO_EXTENSIONS)}) or images")
    return sorted(found, key=lambda s: s[0].name)


def write_clip_shards(
    src: str,
    out: str | os.PathLike,
    *,
    frames: int,
    size: int | None = None,
    min_frames: int | None = None,
    crf: int = DEFAULT_CRF,
    quality: int = 95,
    clips_per_image: int = 4,
    max_per_shard: int = 1000,
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Write clip shards (train/val) and index.json from a folder of videos (and images) or SAMPLE_VIDEO.

    frames: frames per stored clip; min_frames (default `frames`): the shortest clip kept, and the
    shortest video not skipped as too_short. clips_per_image: SAMPLE_VIDEO's clips per photograph. Earlier
    shards and index.json in OUT are replaced. DataError when nothing usable is written.
    """
    from tqdm import tqdm

    min_frames = frames if min_frames is None else min_frames
    if not 1 <= min_frames <= frames:
        raise DataError(f"min_frames must be in 1..frames ({frames}), got {min_frames}")
    sources = list_clip_sources(src)
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
    written: dict[str, Any] = {}
    kinds: Counter[str] = Counter()
    bar = tqdm(total=len(sources), unit="file", desc="clips", disable=not progress, dynamic_ncols=True)
    for split in ("train", "val"):
        jobs = [
            _ClipJob(
                sources[i][0], sources[i][1], size, frames, min_frames, crf, quality, clips_per_image, seed
            )
            for i in splits[split]
        ]
        sink = ShardSink(out, split, max_per_shard)
        for job, res in zip(jobs, _results(jobs, workers), strict=True):
            bar.update(1)
            if "skip" in res:
                skipped[res["skip"]] += 1
                if len(skipped_files) < MAX_LISTED_SKIPS:
                    skipped_files.append(
                        {"file": job.source.name, "reason": res["skip"], "detail": res["detail"]}
                    )
                if skipped[res["skip"]] == 1:
                    log.warning("skipping %s: %s (%s)", job.source.name, res["skip"], res["detail"])
                continue
            (sw, sh) = res["source_size"]
            if job.kind == "image":
                w, h = res["size"]
                meta = {
                    "source": job.source.name,
                    "width": w,
                    "height": h,
                    "source_width": sw,
                    "source_height": sh,
                }
                sink.write(res["data"], "jpg", {**meta, "frames": 1})
                kinds["images"] += 1
                continue
            w, h = res["size"]
            for clip in res["clips"]:
                meta = {
                    "source": job.source.name,
                    "start_frame": clip["start"],
                    "frames": clip["frames"],
                    "fps": res["fps"],
                    "width": w,
                    "height": h,
                    "source_width": sw,
                    "source_height": sh,
                }
                sink.write(clip["data"], CLIP_EXTENSION, meta)
                kinds["clips"] += 1
        written[split] = sink.close()
    bar.close()
    if written["train"]["samples"] == 0:
        raise DataError(f"no usable video or image in {src}: skipped {dict(skipped)}")
    index = {
        "format": "vae-scale shards",
        "version": 1,
        "source": src,
        "options": {
            "size": size,
            "frames": frames,
            "min_frames": min_frames,
            "crf": crf,
            "quality": quality,
            "clips_per_image": clips_per_image if src == SAMPLE_VIDEO else None,
            "max_per_shard": max_per_shard,
            "val_fraction": val_fraction,
            "seed": seed,
        },
        "totals": {
            "files": len(sources),
            "written": written["train"]["samples"] + written["val"]["samples"],
            "train": written["train"]["samples"],
            "val": written["val"]["samples"],
            "clips": kinds["clips"],
            "images": kinds["images"],
            "skipped": sum(skipped.values()),
        },
        "splits": written,
        "skipped": {"counts": dict(sorted(skipped.items())), "files": skipped_files},
    }
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    t = index["totals"]
    log.info(f"wrote {t['train']} train and {t['val']} val samples to {out} ({t['skipped']} files skipped)")
    return index
