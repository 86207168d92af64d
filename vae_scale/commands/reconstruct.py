"""`vae-scale reconstruct` (its flags: vae_scale/cli/generate.py): inputs beside their reconstructions.

    vae-scale reconstruct --run runs/demo photos/*.jpg --out recon/
    vae-scale reconstruct --run runs/video clip.mp4 --frames 17 --out recon/      # recon/clip.mp4 + .png
    vae-scale reconstruct --run runs/video --data data/demo-video --frames 9 --n 4 --out recon/

Images: out/<name>.png, the image beside its reconstruction. Clips (video files, or clip shards with --data):
out/<name>.mp4, the reconstruction as a video (H.264 4:4:4, every frame a keyframe, as `vae-scale shards`
writes clips), and out/<name>.png, a strip of the input's frames over the reconstruction's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vae_scale.commands.common import DataOptions, InputError
from vae_scale.data.shard_reader import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, to_rgb
from vae_scale.data.video import Clip, VideoError, clip_span, encode_clip
from vae_scale.eval.metrics import key_noise, psnr
from vae_scale.eval.registry import fold_frames
from vae_scale.eval.temporal import flicker_per_clip
from vae_scale.files import write_atomic
from vae_scale.train.monitor import image_grid, save_png


@dataclass(frozen=True)
class Reconstruction:
    """One reconstructed input, as `reconstruct` reports it."""

    png: Path
    """The side-by-side image (an image) or the strip (a clip: input frames over reconstructed frames)."""
    width: int
    height: int
    psnr: float
    """dB; a clip's is the mean of its frames'."""
    frames: int = 1
    video: Path | None = None
    """A clip's reconstruction as an .mp4."""
    flicker: float | None = None
    """A clip's frame-difference error (eval/temporal.py's flicker, [0, 1] scale)."""


def _input_files(items: list[str]) -> list[Path]:
    media = (*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix[1:].lower() in media)
            if not found:
                raise FileNotFoundError(f"{path}: no images or videos ({', '.join(media)}) in the folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image or video file or folder")
    return files


def _crop(img: Image.Image, path: Path, multiple: int, resolution: int) -> np.ndarray:
    """(H, W, 3) float32 of an RGB image: the short side resized to `resolution` (when given) and
    center-cropped to that square, else center-cropped to multiples of `multiple`."""
    w, h = img.size
    if resolution:
        s = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        cw = ch = resolution
    else:
        cw, ch = w - w % multiple, h - h % multiple
        if not cw or not ch:
            raise InputError(f"{path}: {w}x{h} is smaller than the model's downsampling {multiple}")
    w, h = img.size
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return np.asarray(img.crop((x0, y0, x0 + cw, y0 + ch)), dtype=np.float32)


def load_image(path: Path, multiple: int, resolution: int = 0) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: RGB, the short side resized to `resolution` (when given) and center-cropped
    to that square, else center-cropped to multiples of `multiple`."""
    try:
        img = to_rgb(Image.open(path))
    except Exception as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(_crop(img, path, multiple, resolution) / 127.5 - 1).permute(2, 0, 1)


def load_video(
    path: Path, multiple: int, temporal: int, resolution: int = 0, frames: int = 0, stride: int = 1
) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1]: the first `frames` frames of a video at `stride` (0: as many as it has, cut
    to the longest 1 + temporal * k), each cropped as load_image crops."""
    try:
        clip = Clip(path.read_bytes())
    except VideoError as e:
        raise InputError(f"{path}: not a readable video ({e.detail})") from None
    available = 1 + (len(clip) - 1) // stride if len(clip) else 0
    t = frames or (1 + (available - 1) // temporal * temporal if available else 0)
    if not t or available < t:
        clip.close()
        raise InputError(
            f"{path}: {len(clip)} frames, fewer than the {clip_span(max(t, 1), stride)} a clip of "
            f"{max(t, 1)} frames at stride {stride} spans"
        )
    try:
        images = clip.frames([i * stride for i in range(t)])
    except VideoError as e:
        raise InputError(f"{path}: not a readable video ({e.detail})") from None
    a = np.stack([_crop(to_rgb(img), path, multiple, resolution) for img in images])  # (T, H, W, 3)
    return torch.from_numpy(a / 127.5 - 1).permute(3, 0, 1, 2)


def to_uint8_frames(clip: torch.Tensor) -> list[np.ndarray]:
    """A clip (3, T, H, W) in [-1, 1] as T (H, W, 3) uint8 RGB frames."""
    a = ((clip.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
    return list(a)


def _unique(name: str, used: set[str]) -> str:
    while name in used:
        name += "_"
    used.add(name)
    return name


@torch.no_grad()
def _round_trip(vae, x: torch.Tensor, sample: bool, seed: int, key: str, tiling: Any) -> torch.Tensor:
    """decode(posterior mean), or of a posterior sample seeded by `key`; float32, clamped to [-1, 1]."""
    post = vae.encode(x, tiled=tiling)
    z = post.mode()
    if sample:
        z = post.sample(key_noise([key], tuple(z.shape), seed, 0, 0).to(x.device))
    return vae.decode(z, tiled=tiling).float().clamp(-1, 1)


def write_clip_reconstruction(
    x: torch.Tensor, x_hat: torch.Tensor, out: Path, name: str, fps: float
) -> Reconstruction:
    """out/<name>.mp4 (the reconstruction) and out/<name>.png (input frames over reconstructed frames) of
    one clip x, x_hat (1, 3, T, H, W) in [-1, 1]; its per-frame PSNR and flicker."""
    png, video = out / f"{name}.png", out / f"{name}.mp4"
    save_png(image_grid([fold_frames(x).cpu(), fold_frames(x_hat).cpu()]), png)
    write_atomic(video, encode_clip(to_uint8_frames(x_hat[0]), fps=fps))
    score = psnr(fold_frames(x_hat), fold_frames(x)).double().mean().item()
    t, h, w = x.shape[2:]
    shake = flicker_per_clip(x_hat, x)[0].item() if t > 1 else None
    return Reconstruction(png, w, h, score, t, video, shake)


def reconstruct_files(
    vae,
    items: list[str],
    out: str | Path,
    *,
    resolution: int = 0,
    sample: bool = False,
    seed: int = 0,
    tiling: Any = False,
    device: torch.device | str = "cpu",
    frames: int = 0,
    frame_stride: int = 1,
    fps: float = 8.0,
) -> Iterator[Reconstruction]:
    """Reconstruct each image and video of `items` (files or folders) into `out`.

    An image: out/<name>.png, the image beside its reconstruction. A video (a clip model, e.g. wan): its
    first `frames` frames at `frame_stride` (0: all, cut to 1 + 4k), reconstructed as one clip, written as
    out/<name>.mp4 at `fps` and a strip out/<name>.png (write_clip_reconstruction). resolution 0 keeps the
    whole frame (cropped to a multiple of the downsampling); sample decodes a posterior sample (seeded by
    the path) instead of the mean; tiling: a model.Tiling for images larger than a tile, or False.
    """
    files = _input_files(items)
    vae.to(device).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    temporal = getattr(vae, "temporal_downsample_factor", None)
    for path in files:
        name = _unique(path.stem, used)
        if path.suffix[1:].lower() in VIDEO_EXTENSIONS:
            if temporal is None:
                raise InputError(
                    f"{path}: a video, and model.family={vae.config.family} encodes images only (wan: clips)"
                )
            x = load_video(path, vae.downsample_factor, temporal, resolution, frames, frame_stride)[None]
            x = x.to(device)
            yield write_clip_reconstruction(
                x, _round_trip(vae, x, sample, seed, str(path), tiling), out, name, fps
            )
            continue
        x = load_image(path, vae.downsample_factor, resolution)[None].to(device)
        x_hat = _round_trip(vae, x, sample, seed, str(path), tiling)
        save_png(image_grid([torch.cat([x, x_hat]).cpu()]), out / f"{name}.png")
        yield Reconstruction(out / f"{name}.png", x.shape[3], x.shape[2], psnr(x_hat, x).item())


def reconstruct_shards(
    vae,
    data: DataOptions,
    out: str | Path,
    *,
    n: int = 8,
    sample: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    fps: float = 8.0,
) -> Iterator[Reconstruction]:
    """Reconstruct the first `n` clips of clip shards (data.clip_batches: center crops of data.resolution, the
    first data.frames frames at data.frame_stride) into `out`, each as write_clip_reconstruction writes it,
    named by its sample key."""
    if not data.clips:
        raise InputError("--data: reconstructing shards reads clips; give --frames N (1 + 4k, N > 1)")
    if getattr(vae, "temporal_downsample_factor", None) is None:
        raise InputError(
            f"--data: clips, and model.family={vae.config.family} encodes images only (wan: clips)"
        )
    vae.to(device).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for batch in data.clip_batches(limit=n):
        for clip, full_key in zip(batch["clips"][: batch["count"]], batch["keys"], strict=True):
            key = full_key.rpartition("#")[2]  # the loader's "url#key"
            name = _unique(re.sub(r"[^A-Za-z0-9_.-]", "_", key) or "clip", used)
            x = clip[None].to(device)
            yield write_clip_reconstruction(
                x, _round_trip(vae, x, sample, seed, full_key, False), out, name, fps
            )


__all__ = [
    "Reconstruction",
    "load_image",
    "load_video",
    "reconstruct_files",
    "reconstruct_shards",
    "write_clip_reconstruction",
]
