"""One raw sample to one training crop, as the loader's workers (and the check before a run) decode it:
PIL decoding (JPEG drafts), RGB, a resize of the short side (down only, unless upscale) and a random or
centered crop; a sample that cannot be used raises Unusable naming its kind.
"""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from vae_scale.data.shard_reader import RawSample, describe_error, to_rgb

TOO_SMALL = "too_small"
"""Images smaller than the crop: skipped (unless data.upscale_small) and counted apart from bad data."""

stats: Counter[str] = Counter()
"""Process-local counts: images decoded, raw samples replayed by the loader (tests, debugging)."""


class Unusable(Exception):
    """A sample the loader cannot train on: bad (`kind` one of BAD_KINDS) or too small for the crop."""

    def __init__(self, kind: str, detail: str, short_side: int = 0):
        super().__init__(detail)
        self.kind, self.detail, self.short_side = kind, detail, short_side


def crop(
    img: Image.Image, size: int, rng: random.Random | None, flip: bool, resize: bool = True
) -> np.ndarray:
    """Resize the short side to `size` (down only; not at all with resize=False) and crop size x size:
    random with rng, else centered."""
    w, h = img.size
    s = size / min(w, h) if resize else 1.0
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if rng is None:
        x0, y0 = (nw - size) // 2, (nh - size) // 2
    else:
        x0, y0 = rng.randint(0, nw - size), rng.randint(0, nh - size)
    if (nw, nh) == (w, h):
        out = img.crop((x0, y0, x0 + size, y0 + size))
    else:  # resample only the crop's source region: the same pixels as resize-then-crop, less work
        box = (x0 / s, y0 / s, min(w, (x0 + size) / s), min(h, (y0 + size) / s))
        out = img.resize((size, size), Image.BICUBIC, box=box)
    if flip and rng is not None and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def too_small_remedy(resolution: int, largest: int = 0) -> str:
    """What to do about images smaller than the crop; largest: the largest short side among them, if known."""
    lower = f"a data.resolution of at most {largest} px" if largest else "a lower data.resolution"
    return (
        f"data.upscale_small=true resizes them up to the {resolution} px crop (bicubic: they train the "
        f"decoder on blurred images), or {lower} keeps them at their own scale"
    )


def decode_sample(
    raw: RawSample,
    size: int,
    rng: random.Random | None,
    flip: bool,
    resize: bool = True,
    upscale: bool = False,
) -> np.ndarray:
    """(size, size, 3) uint8 crop of one raw sample, or Unusable. upscale: an image smaller than the crop is
    resized up to it (bicubic) rather than refused as too_small."""
    stats["decoded"] += 1
    try:
        img = Image.open(io.BytesIO(raw.data))
    except Exception as e:
        raise Unusable("undecodable", describe_error(e)) from None
    w, h = img.size
    small = min(w, h) < size
    if small and not upscale:
        raise Unusable(TOO_SMALL, f"{w}x{h} is smaller than the {size} px crop", min(w, h))
    try:
        if resize and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (size, size))  # DCT-domain downscale by 1/2, 1/4 or 1/8; both sides stay >= size
        img.load()
        return crop(to_rgb(img), size, rng, flip, resize or small)  # resize scales a small image up
    except Exception as e:
        raise Unusable("undecodable", describe_error(e)) from None


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, R, R) float32 in [-1, 1] from B (R, R, 3) uint8 arrays."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    out = torch.empty(x.shape, dtype=torch.float32)
    if get_worker_info() is not None:  # built in shared memory, so passing it to the main process is no copy
        out.share_memory_()
    out.copy_(x)
    return out.div_(127.5).sub_(1.0)
