"""Video data: clip shards written from generated videos and from the sample photographs, and the clip
loader's shapes, frame stride, determinism, exact resume, rank split, skipped videos and mixed batches.

The videos are written here with PyAV: 48x40, 11 frames, each frame a gradient whose level rises 8 per
frame, so a clip's frame stride is visible in its pixel values.
"""

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from vae_scale.cli.shards import shards_main  # noqa: E402
from vae_scale.config import ConfigError, DataConfig  # noqa: E402
from vae_scale.data.clip_loader import batch_frames, build_clip_loader, build_clip_val_loader  # noqa: E402
from vae_scale.data.shard_reader import DataError  # noqa: E402

FRAMES = 11
STEP = 8  # level added per frame
# A clip's frame-to-frame change is STEP * stride levels everywhere. H.264 (4:2:0 or 4:4:4, limited-range
# YUV) and the Lanczos/bicubic resizes change a smooth gradient's mean by well under a level; the bound of
# 3 levels is far below the STEP-per-frame change it has to resolve (a stride off by one is 8 levels off).
LEVEL_TOLERANCE = 3 / 127.5


def _frames(n: int, base: int, w: int = 48, h: int = 40) -> list[np.ndarray]:
    y, x = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        a = base + STEP * i + x + y  # at most 40 + 80 + 47 + 39 < 255: never clipped
        out.append(np.stack([a, a + 1, a + 2], -1).clip(0, 255).astype(np.uint8))
    return out


def _video(frames: list[np.ndarray], fmt: str = "mp4") -> bytes:
    """Inter-coded H.264 4:2:0 (I, P and B frames), as video2dataset and most cameras write."""
    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "12", "threads": "1"}
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """10 good videos, one too short (3 frames), one truncated, one zero-length, one image."""
    d = tmp_path_factory.mktemp("videos")
    for v in range(10):
        (d / f"v{v:02d}.mp4").write_bytes(_video(_frames(FRAMES, base=4 * v)))
    (d / "short.mp4").write_bytes(_video(_frames(3, base=0)))
    whole = _video(_frames(FRAMES, base=0))
    (d / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (d / "empty.mp4").write_bytes(b"")
    from PIL import Image

    Image.fromarray(_frames(1, base=30, w=64, h=48)[0]).save(d / "still.png")
    return d


@pytest.fixture(scope="module")
def clip_shards(video_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip-shards") / "shards"
    args = [str(video_dir), str(out), "--frames", "9", "--size", "32", "--val-fraction", "0"]
    assert shards_main([*args, "--workers", "1", "--quiet", "--max-per-shard", "6"]) == 0
    return out


@pytest.fixture(scope="module")
def v2d_shard(tmp_path_factory):
    """A shard as video2dataset writes it: `.mp4` + `.json` + `.txt` per key, no index.json; with a
    truncated and a too-short video among 6 good ones."""
    path = tmp_path_factory.mktemp("v2d") / "00000.tar"
    with tarfile.open(path, "w") as tf:
        for k in range(8):
            data = _video(_frames(3 if k == 5 else FRAMES, base=4 * k))
            if k == 2:
                data = data[: len(data) // 2]
            for ext, payload in (("mp4", data), ("json", b'{"url": "x"}'), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{k:05d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return path


def _cfg(train, **kw) -> DataConfig:
    base = dict(train=str(train), resolution=32, batch_size=2, workers=0, frames=5, shuffle_buffer=4)
    return DataConfig(**{**base, **kw})


def _take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


def test_clip_shards_from_a_folder_of_videos(clip_shards):
    index = json.loads((clip_shards / "index.json").read_text())
    t = index["totals"]
    # 11 frames -> one 9-frame clip each (the 2-frame remainder is below --min-frames 9); the image as is
    assert (t["clips"], t["images"], t["train"], t["val"]) == (10, 1, 11, 0)
    assert index["skipped"]["counts"] == {"empty": 1, "too_short": 1, "undecodable": 1}
    assert len(index["splits"]["train"]["shards"]) == 2  # --max-per-shard 6
    with tarfile.open(clip_shards / "train-000000.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert {n.rsplit(".", 1)[1] for n in names} <= {"mp4", "json", "png", "jpg"}
    assert (meta["frames"], meta["start_frame"], meta["width"], meta["height"]) == (9, 0, 38, 32)


@pytest.mark.parametrize("source", ["clip_shards", "v2d_shard"])
def test_clips_have_the_shape_range_and_frame_stride(source, request):
    """Intra-coded clips (ours) and inter-coded ones (video2dataset's) give the frames a stride picks."""
    loader = build_clip_loader(_cfg(request.getfixturevalue(source), frame_stride=2), 0, 1, seed=3)
    for batch in _take(loader, 3):
        x = batch["clips"]
        assert x.shape == (2, 3, 5, 32, 32) and batch["frames"] == 5 and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        step = (x[:, :, 1:] - x[:, :, :-1]).mean(dim=(1, 3, 4))  # (B, T - 1): mean change per frame
        assert torch.allclose(step, torch.full_like(step, 2 * STEP / 127.5), atol=LEVEL_TOLERANCE), step


def test_two_loaders_with_the_same_seed_give_the_same_batches(clip_shards):
    cfg = _cfg(clip_shards, image_fraction=0.5)
    a, b, c = (_take(build_clip_loader(cfg, 0, 1, seed=s), 6) for s in (7, 7, 8))
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and torch.equal(x["clips"], y["clips"])
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_same_batches(clip_shards, workers):
    cfg = _cfg(clip_shards, image_fraction=0.4, workers=workers, frame_stride=1)
    loader = build_clip_loader(cfg, 0, 1, seed=5)
    it = iter(loader)
    _take(it, 3)
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
    expected = _take(it, 5)  # across the epoch end (5 batches per epoch)
    loader.close()
    resumed = build_clip_loader(cfg, 0, 1, seed=5)
    resumed.load_state_dict(state)
    got = _take(resumed, 5)
    resumed.close()
    assert {b["frames"] for b in expected} == {1, 5}  # both streams' cursors are exercised
    for x, y in zip(expected, got):
        assert x["keys"] == y["keys"] and torch.equal(x["clips"], y["clips"])
    assert resumed.counters() == loader.counters()


def test_two_ranks_see_disjoint_clips_and_the_same_frame_schedule(clip_shards):
    cfg = _cfg(clip_shards)
    keys = []
    for rank in (0, 1):
        loader = build_clip_loader(cfg, rank, 2, seed=1)
        batches = _take(loader, loader.batches_per_epoch)
        keys.append([k for b in batches for k in b["keys"]])
    assert len(keys[0]) == len(keys[1]) == 4  # 11 samples // (2 ranks x 2) = 2 batches each
    assert not set(keys[0]) & set(keys[1])
    mixed = _cfg(clip_shards, image_fraction=0.5)
    got = [[b["frames"] for b in _take(build_clip_loader(mixed, rank, 2, seed=1), 8)] for rank in (0, 1)]
    P = 2  # batches per epoch
    schedule = [batch_frames(mixed, 1, g // P, g % P) for g in range(8)]
    assert got[0] == got[1] == schedule and set(schedule) == {1, 5}


def test_broken_and_too_short_videos_are_skipped_and_counted(v2d_shard):
    cfg = _cfg(v2d_shard, frame_stride=2, batches_per_epoch=4, max_error_fraction=0.5)
    loader = build_clip_loader(cfg, 0, 1, seed=0)
    batches = _take(loader, 4)  # 8 clips from 6 good videos: one whole pass over the shard, then part of one
    c = loader.counters()
    assert c["samples"] == 8
    assert 1 <= c["bad/undecodable"] <= 2 and 1 <= c["too_short"] <= 2
    assert c["bad"] == c["bad/undecodable"]  # too short is not bad data
    assert not any("00002" in k or "00005" in k for b in batches for k in b["keys"])


def test_a_clip_loader_on_image_only_shards_with_frames_stops_with_a_clear_error(tmp_path):
    shards_main(["sample-color", str(tmp_path / "img"), "--size", "32", "--quiet", "--workers", "1"])
    loader = build_clip_loader(_cfg(tmp_path / "img"), 0, 1)
    with pytest.raises(DataError, match="clips need a video member of at least 5 frames"):
        _take(loader, 1)


def test_mixed_batches_take_images_as_one_frame_clips(clip_shards):
    loader = build_clip_loader(_cfg(clip_shards, image_fraction=0.5), 0, 1, seed=2)
    batches = _take(loader, 20)  # about 10 image batches: a whole pass of the image stream (11 samples)
    image_batches = [b for b in batches if b["frames"] == 1]
    clip_batches = [b for b in batches if b["frames"] == 5]
    assert image_batches and clip_batches
    assert all(b["clips"].shape == (2, 3, 1, 32, 32) for b in image_batches)
    still = _keys_with(clip_shards, ".jpg")  # the folder's one image (re-encoded: --size)
    assert still & {k.split("#")[1] for b in image_batches for k in b["keys"]}
    assert not still & {k.split("#")[1] for b in clip_batches for k in b["keys"]}
    only_images = build_clip_loader(_cfg(clip_shards, frames=1), 0, 1)
    assert {tuple(b["clips"].shape) for b in _take(only_images, 3)} == {(2, 3, 1, 32, 32)}


def _keys_with(folder, suffix: str) -> set[str]:
    keys = set()
    for shard in sorted(folder.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            keys |= {n.rsplit(".", 1)[0] for n in tf.getnames() if n.endswith(suffix)}
    assert keys, f"no {suffix} member in {folder}"
    return keys


def test_sample_video_writes_camera_motion_clips(tmp_path):
    out = tmp_path / "demo"
    args = ["sample-video", str(out), "--frames", "9", "--size", "32", "--clips-per-image", "2", "--quiet"]
    assert shards_main([*args, "--workers", "1", "--val-fraction", "0.25"]) == 0
    t = json.loads((out / "index.json").read_text())["totals"]
    assert (t["clips"], t["train"], t["val"], t["skipped"]) == (16, 12, 4, 0)  # 8 photographs, 2 held out
    batch = _take(build_clip_loader(_cfg(out, frames=9, batch_size=4), 0, 1), 1)[0]
    x = batch["clips"]
    assert x.shape == (4, 3, 9, 32, 32)
    # the camera moves: the last frame differs from the first far beyond codec error
    assert ((x[:, :, -1] - x[:, :, 0]).abs().mean(dim=(1, 2, 3)) > 10 * LEVEL_TOLERANCE).all()
    # validation: finite, every val clip once across two ranks, center crops of the first 9 frames
    val = _cfg(out, val=str(out), frames=9, batch_size=3)
    seen = []
    for rank in (0, 1):
        for b in build_clip_val_loader(val, rank, 2):
            assert b["clips"].shape == (b["count"], 3, 9, 32, 32) and b["count"] <= 3
            seen += b["keys"]
    assert len(seen) == len(set(seen)) == 4


def test_clip_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="data.frames must be 1 \\+ 4k"):
        DataConfig(frames=4)
    with pytest.raises(ConfigError, match="data.image_fraction"):
        DataConfig(frames=9, image_fraction=1.5)
    with pytest.raises(ConfigError, match="data.frame_stride"):
        DataConfig(frame_stride=0)
