"""The streaming loader on real tar shards: bad data, image modes, img2dataset layout, ranks, resume, val."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from support import ROOT, free_port

from vae_scale.config import DataConfig
from vae_scale.data import loader as data
from vae_scale.data.bad_samples import BAD_KINDS
from vae_scale.data.loader import DataError, build_train_loader, build_val_loader

R = 32  # crop size in these tests


def _encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(seed, w=48, h=40):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write_tar(path, samples):
    """samples: list of (key, {ext: bytes}) written in order (duplicates allowed)."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for key, members in samples:
            w.write({"__key__": key, **members})
    return str(path)


def _uneven_shards(folder, sizes, prefix="train", index=False, bad_every=0):
    """Shards of `sizes` JPEG samples (keys unique over the set); with bad_every, every n-th is garbage."""
    folder.mkdir(parents=True, exist_ok=True)
    n, counts = 0, {}
    for s, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            jpg = (
                b"garbage"
                if bad_every and n % bad_every == bad_every - 1
                else _encode(_photo(n, 40 + n % 17))
            )
            samples.append((f"s{n:05d}", {"jpg": jpg, "txt": b"caption"}))
            n += 1
        name = f"{prefix}-{s:06d}.tar"
        _write_tar(folder / name, samples)
        counts[name] = size
    if index:
        (folder / "index.json").write_text(json.dumps({"splits": {prefix: {"shards": counts}}}))
    return f"{folder}/{prefix}-{{000000..{len(sizes) - 1:06d}}}.tar"


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("loader ended")


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


# --------------------------------------------------------------------------------------------------------
# Bad and odd data


@pytest.fixture
def zoo(tmp_path):
    """Shards holding one of every kind of bad data, every odd image mode, and the good keys expected."""
    good, d = [], tmp_path
    ok = [(f"good{i}", {"jpg": _encode(_photo(i)), "json": b"{}", "txt": b"x"}) for i in range(4)]
    good += [k for k, _ in ok]
    truncated_jpeg = _encode(_photo(9, 64, 64), quality=95)[:300]
    _write_tar(
        d / "zoo-0.tar",
        ok[:2]
        + [
            ("garbage", {"jpg": b"this is not an image"}),
            ("empty", {"jpg": b""}),
            ("small", {"png": _encode(_photo(5, 20, 20), "PNG")}),
            ("cut", {"jpg": truncated_jpeg}),
            ("noimage", {"txt": b"caption only"}),
            ok[2],
            ("good0", {"jpg": _encode(_photo(7))}),  # the key again, later in the shard
            ok[3],
        ],
    )
    # A tar cut in the middle of a member: the samples before it arrive.
    before = [(f"t{i}", {"jpg": _encode(_photo(20 + i))}) for i in range(4)]
    path = _write_tar(d / "zoo-1.tar", before)
    with tarfile.open(path) as tf:
        m = tf.getmember("t2.jpg")
    Path(path).write_bytes(Path(path).read_bytes()[: m.offset_data + m.size // 2])
    good += ["t0", "t1"]
    (d / "zoo-2.tar").write_bytes(b"\x00garbage, not a tar at all" * 50)
    # Every mode the decoder must turn into RGB.
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    p_trans = Image.new("P", (40, 40), 3)
    p_trans.putpalette([10, 20, 30] * 256)
    gray16 = Image.fromarray(np.full((40, 40), 60000, np.uint16))
    exif_img = Image.new("RGB", (64, 48), (255, 0, 0))
    exif_img.paste((0, 0, 255), (0, 24, 64, 48))  # top red, bottom blue; orientation 6 turns it 90 deg cw
    exif = Image.Exif()
    exif[0x0112] = 6
    modes = {
        "m_l": ("jpg", _encode(_photo(30).convert("L"))),
        "m_la": ("png", _encode(Image.new("LA", (40, 40), (0, 0)), "PNG")),
        "m_p": ("png", _encode(_photo(31).convert("P"), "PNG")),
        "m_ptrans": ("png", _encode(p_trans, "PNG", transparency=3)),
        "m_rgba": ("png", _encode(rgba, "PNG")),
        "m_cmyk": ("jpg", _encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)))),
        "m_16bit": ("png", _encode(gray16, "PNG")),
        "m_exif": ("jpg", _encode(exif_img, exif=exif.tobytes(), quality=95)),
        "m_tif": ("tif", _encode(_photo(32), "TIFF")),
        "m_bmp": ("bmp", _encode(_photo(33), "BMP")),
        "m_webp": ("webp", _encode(_photo(34), "WEBP")),
    }
    _write_tar(d / "zoo-3.tar", [(k, {ext: b}) for k, (ext, b) in modes.items()])
    good += list(modes)
    bad = {
        "undecodable": 2,
        "empty": 1,
        "no_image": 1,
        "duplicate_key": 1,
        "truncated_tar": 1,
        "shard_unreadable": 1,
    }
    return f"{d}/zoo-{{0..3}}.tar", good, bad


def test_bad_data_is_skipped_and_counted(zoo, caplog):
    pattern, good, bad = zoo
    cfg = DataConfig(
        train=pattern, val=pattern, resolution=R, batch_size=4, workers=0, max_error_fraction=0.5
    )
    val = build_val_loader(cfg, rank=0, world_size=1)
    batches = list(val)
    keys = [k.split("#")[1] for k in _keys(batches)]
    assert sorted(keys) == sorted(good)  # every good one arrives, once
    counters = val.counters()
    assert {k: counters[f"bad/{k}"] for k in BAD_KINDS} == bad
    assert counters["samples"] == len(good) and counters["bad"] == sum(bad.values())
    assert counters["too_small"] == 1  # "small", 20 px: not bad data, counted apart
    assert "the first" in caplog.text and "zoo-" in caplog.text

    images = {k.split("#")[1]: img for b in batches for k, img in zip(b["keys"], b["images"], strict=True)}
    assert all(img.shape == (3, R, R) and img.dtype == torch.float32 for img in images.values())
    assert all(-1 <= float(img.min()) and float(img.max()) <= 1 for img in images.values())
    # exact: 255 / 127.5 - 1 is 1; a 16-bit value within one 8-bit level (2 / 255) of exact; clipping 16-bit
    # to 255 gives 1.0 (0.17 off)
    assert torch.allclose(images["m_rgba"], torch.ones(3, R, R))  # transparent -> white
    assert torch.allclose(images["m_la"], torch.ones(3, R, R))
    assert torch.allclose(images["m_ptrans"], torch.ones(3, R, R))
    r, g, b = images["m_cmyk"].mean(dim=(1, 2))
    assert r > 0.8 and g < -0.8 and b < -0.8  # CMYK (0, 255, 255, 0) is red
    assert torch.allclose(images["m_16bit"], torch.full((3, R, R), 60000 / 257 / 127.5 - 1), atol=0.01)
    exif = images["m_exif"]  # after rotation: blue on the left, red on the right
    assert exif[2, :, :8].mean() > 0.8 and exif[0, :, -8:].mean() > 0.8

    # The training stream skips the same things without stopping.
    train = build_train_loader(cfg, rank=0, world_size=1, seed=0)
    assert train.batches_per_epoch == 5  # 21 samples with an image member // 4 (scan, no index.json)
    seen = _keys(_take(train, 2 * train.batches_per_epoch))
    assert {k.split("#")[1] for k in seen} == set(good)
    c = train.counters()
    assert c["samples"] == 40 and c["bad/shard_unreadable"] >= 1 and c["bad/truncated_tar"] >= 1


def test_error_fraction_stops_with_worst_shard(tmp_path, caplog):
    pattern = _uneven_shards(tmp_path, [30, 30], bad_every=3)
    cfg = DataConfig(train=pattern, resolution=R, batch_size=4, workers=0, max_error_fraction=0.1)
    with pytest.raises(DataError, match=r"samples are bad .*worst shards: .*train-00000[01]\.tar"):
        _take(build_train_loader(cfg, rank=0, world_size=1), 100)
    cfg = DataConfig(
        train=pattern, resolution=R, batch_size=4, workers=2, max_error_fraction=0.5, log_bad_every=10
    )
    assert len(_take(build_train_loader(cfg, rank=0, world_size=1), 30)) == 30
    assert "(the first; a summary follows every 10)" in caplog.text
    assert "skipped 20 bad of" in caplog.text and "worst shards" in caplog.text


def keep_small_shards(root: Path, n: int = 100, small_every: int = 5, size: int = 40) -> Path:
    """Real shards as `vae-scale shards --size SIZE --keep-small` writes them: n photo-like images, every
    small_every-th one 36x30 (stored at its own size, below SIZE), 4 shards of n / 4."""
    from support import write_photo_like_images

    from vae_scale.data.shards import write_shards

    src = root / "src"
    write_photo_like_images(
        src, n, sizes=[(36, 30)] + [(56, 48)] * (small_every - 1) if small_every else [(56, 48)]
    )
    index = write_shards(
        str(src), root / "out", size=size, keep_small=True, image_format="png", val_fraction=0.0,
        max_per_shard=n // 4, seed=0, progress=False,
    )  # fmt: skip
    assert index["totals"]["kept_small"] == (n // small_every if small_every else 0)
    return root / "out"


def test_images_smaller_than_the_crop_are_counted_apart_and_never_stop_a_run(tmp_path, caplog):
    # A fine-tune on --keep-small shards: 20 of 100 images below the 40 px crop. They once counted as bad
    # data (20% > data.max_error_fraction=0.1) and stopped the run.
    shards = keep_small_shards(tmp_path)
    cfg = DataConfig(train=str(shards), resolution=40, batch_size=4, workers=0, max_error_fraction=0.1)
    loader = build_train_loader(cfg, rank=0, world_size=1)
    batches = _take(loader, 3 * loader.batches_per_epoch)  # 3 passes over the data: 300 samples read
    assert all(b["images"].shape == (4, 3, 40, 40) for b in batches)
    c = loader.counters()
    assert c["bad"] == 0 and c["too_small"] >= 3 * 20 - 20  # the last pass may stop before its small ones
    assert c["too_small"] / (c["too_small"] + c["samples"]) == pytest.approx(0.2, abs=0.05)
    (warning,) = [r.getMessage() for r in caplog.records if "smaller than the 40 px crop" in r.getMessage()]
    assert "36x30" in warning and "data/too_small, not as bad data" in warning
    assert "data.upscale_small=true" in warning and "data.resolution of" not in warning

    # data.upscale_small=true trains on them too, upscaled to the crop; validation reads them as well.
    every = f"{shards}/train-*.tar"
    up = DataConfig(train=every, val=every, resolution=40, batch_size=4, workers=0, upscale_small=True)
    loader = build_train_loader(up, rank=0, world_size=1)
    keys = _keys(_take(loader, loader.batches_per_epoch))
    assert loader.counters()["too_small"] == 0 and len(set(keys)) == 100
    val = build_val_loader(DataConfig(**{**up.__dict__, "upscale_small": False}), rank=0, world_size=1)
    assert sum(b["count"] for b in val) == 80 and val.counters()["too_small"] == 20
    assert sum(b["count"] for b in build_val_loader(up, rank=0, world_size=1)) == 100


def test_when_every_image_is_too_small_the_loader_says_so_and_what_to_do(tmp_path):
    shards = keep_small_shards(tmp_path, n=8, small_every=1)
    cfg = DataConfig(train=str(shards), resolution=40, batch_size=4, workers=0)
    with pytest.raises(DataError, match=r"smaller than the 40 px crop .*data.resolution of at most 30 px"):
        _take(build_train_loader(cfg, rank=0, world_size=1), 1)


def test_missing_shards_fail_at_start(tmp_path):
    pattern = _uneven_shards(tmp_path / "d", [3, 3])
    for spec, match in [
        (pattern.replace("000001}", "000004}"), r"shard .*train-000002\.tar does not exist \(3 shards"),
        (str(tmp_path / "d" / "nope-*.tar"), "pattern .*nope-\\*.tar matches no file"),
        (str(tmp_path / "missing.tar"), "missing.tar does not exist"),
        (str(tmp_path), "holds no .tar shards"),
        ("", "data.train is empty"),
    ]:
        with pytest.raises(DataError, match=match):
            build_train_loader(
                DataConfig(train=spec, resolution=R, batch_size=2, workers=0), rank=0, world_size=1
            )
    with pytest.raises(DataError, match="fewer than one batch per rank"):
        build_train_loader(DataConfig(train=pattern, resolution=R, batch_size=4), rank=0, world_size=2)


# --------------------------------------------------------------------------------------------------------
# Other shard sources


def test_img2dataset_shards_pipe_and_fsspec(tmp_path):
    """img2dataset's layout (NNNNN.tar, 9-digit keys, .txt/.json sidecars, no index.json); pipe:; fsspec."""
    keys = []
    for s in range(2):
        samples = []
        for i in range(5):
            key = f"{s:05d}{i:04d}"
            ext, fmt = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")][i % 3]
            samples.append(
                (
                    key,
                    {
                        ext: _encode(_photo(10 * s + i), fmt),
                        "txt": b"a caption",
                        "json": json.dumps({"key": key, "status": "success"}).encode(),
                    },
                )
            )
            keys.append(key)
        _write_tar(tmp_path / f"{s:05d}.tar", samples)
    (tmp_path / "00000.parquet").write_bytes(b"not read")
    cfg = DataConfig(
        train=str(tmp_path), val=str(tmp_path), resolution=R, batch_size=5, workers=0, shuffle_buffer=0
    )
    loader = build_train_loader(cfg, rank=0, world_size=1)
    assert loader.batches_per_epoch == 2
    assert sorted(k.split("#")[1] for k in _keys(_take(loader, 2))) == sorted(keys)
    assert sum(b["count"] for b in build_val_loader(cfg, rank=0, world_size=1)) == 10

    pipe = DataConfig(
        train=f"pipe:cat {tmp_path}/00000.tar,pipe:cat {tmp_path}/00001.tar",
        resolution=R,
        batch_size=5,
        workers=0,
        batches_per_epoch=2,
    )
    assert sorted(
        k.split("#")[1] for k in _keys(_take(build_train_loader(pipe, rank=0, world_size=1), 2))
    ) == sorted(keys)

    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for s in range(2):
        fs.pipe(f"/shards/{s:05d}.tar", (tmp_path / f"{s:05d}.tar").read_bytes())
    mem = DataConfig(train="memory://shards/{00000..00001}.tar", resolution=R, batch_size=5, workers=0)
    loader = build_train_loader(mem, rank=0, world_size=1)  # no index.json: counted by scanning names
    assert loader.batches_per_epoch == 2 and len(_keys(_take(loader, 2))) == 10


# --------------------------------------------------------------------------------------------------------
# Ranks


@pytest.mark.parametrize(
    "sizes,index", [([3, 17, 5, 11, 2, 9, 1], False), ([3, 17, 5, 11, 2, 9, 1], True), ([23], True)]
)
def test_ranks_disjoint_and_equal(tmp_path, monkeypatch, sizes, index):
    pattern = _uneven_shards(tmp_path, sizes, index=index)
    cfg = DataConfig(train=pattern, resolution=R, batch_size=3, workers=0, shuffle_buffer=4)
    seen, states = {}, {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        loader = build_train_loader(cfg, seed=5)
        assert loader.batches_per_epoch == sum(sizes) // 6
        seen[rank] = [_keys(_take(loader, loader.batches_per_epoch))]
        states[rank] = loader.state_dict()
        seen[rank].append(_keys(_take(loader, loader.batches_per_epoch)))
    for epoch in (0, 1):
        a, b = set(seen[0][epoch]), set(seen[1][epoch])
        assert not a & b, f"ranks share samples in epoch {epoch}"
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 3 * (sum(sizes) // 6)
    assert seen[0][0] != seen[0][1]  # a new shard permutation and shuffle each epoch
    assert states[0]["epoch"] == states[1]["epoch"] == 1 and states[0]["batch"] == 0


_RANK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from vae_scale.config import DataConfig
    from vae_scale.data.loader import build_train_loader
    dist.init_process_group("gloo")
    cfg = DataConfig(train=sys.argv[1], resolution=32, batch_size=2, workers=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, seed=1)   # rank and world size from torch.distributed
    keys, n = [], 0
    for batch in loader:
        t = torch.ones(1)
        dist.all_reduce(t)          # a collective per batch, as DDP does: hangs if a rank runs short
        keys += batch["keys"] if n < loader.batches_per_epoch else []
        n += 1
        if n == 2 * loader.batches_per_epoch:
            break
    json.dump({"keys": keys, "batches": n, "bpe": loader.batches_per_epoch}, open(sys.argv[2], "w"))
    dist.destroy_process_group()
""")


def test_two_processes_with_gloo(tmp_path):
    pattern = _uneven_shards(tmp_path / "s", [9, 2, 14, 1, 6])
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": str(ROOT),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _RANK_SCRIPT, pattern, str(tmp_path / f"{rank}.json")], env=env
            )
        )
    for p in procs:
        assert p.wait(timeout=120) == 0
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["bpe"] == r1["bpe"] == 32 // 4 and r0["batches"] == r1["batches"] == 16
    assert not set(r0["keys"]) & set(r1["keys"]) and len(r0["keys"]) == len(r1["keys"]) == 16


# --------------------------------------------------------------------------------------------------------
# Determinism and resume


def test_same_seed_same_stream_other_seed_other_stream(tmp_path):
    pattern = _uneven_shards(tmp_path, [7, 9, 4])
    cfg = DataConfig(train=pattern, resolution=R, batch_size=4, workers=0, shuffle_buffer=6)
    rng_state = torch.get_rng_state()
    a, b, c = (_take(build_train_loader(cfg, rank=0, world_size=1, seed=s), 6) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG (the trainer's) is left alone
    assert _keys(a) == _keys(b) and all(
        torch.equal(x["images"], y["images"]) for x, y in zip(a, b, strict=True)
    )
    assert _keys(a) != _keys(c)
    # 0 and 1 workers are the same stream (one lane); 2 workers is another deal of the same data.
    one = DataConfig(train=pattern, resolution=R, batch_size=4, workers=1, shuffle_buffer=6)
    assert _keys(_take(build_train_loader(one, rank=0, world_size=1, seed=0), 6)) == _keys(a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_stream(tmp_path, workers):
    pattern = _uneven_shards(tmp_path, [7, 12, 5, 9], bad_every=6)
    # 14 batches of 3 per epoch from ~28 good samples: lanes run dry and start new passes mid-epoch.
    bpe = 14
    cfg = DataConfig(
        train=pattern,
        resolution=R,
        batch_size=3,
        workers=workers,
        shuffle_buffer=8,
        max_error_fraction=0.5,
        batches_per_epoch=bpe,
    )
    full_loader = build_train_loader(cfg, rank=0, world_size=1, seed=3)
    total = 2 * bpe + 3
    data._stats.clear()
    full, decoded = [], [0]  # decoded[i]: images decoded (in this process, workers=0) for the first i batches
    for batch in full_loader:
        full.append(batch)
        decoded.append(data._stats["decoded"])
        if len(full) == total:
            break
    full_counters = full_loader.counters()
    # Leaving the loop and iterating again continues where the consumer stopped.
    again = build_train_loader(cfg, rank=0, world_size=1, seed=3)
    assert _keys(_take(again, 4) + _take(again, 5)) == _keys(full[:9])
    for stop in (1, bpe - 1, bpe + 5):
        first = build_train_loader(cfg, rank=0, world_size=1, seed=3)
        done = _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        assert len(json.dumps(state)) < 1000
        data._stats.clear()
        resumed = build_train_loader(cfg, rank=0, world_size=1, seed=3)
        resumed.load_state_dict(state)
        rest = _take(resumed, total - stop)
        got = done + rest
        assert _keys(got) == _keys(full)
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(got, full, strict=True))
        assert resumed.counters() == full_counters
        if workers == 0:  # in-process: the skipped part was read, not decoded
            assert data._stats["replayed"] > 0
            assert data._stats["decoded"] == decoded[total] - decoded[stop]
        # A rollback: the same loader, already iterated (workers alive), goes back to the saved position.
        resumed.load_state_dict(state)
        assert _keys(_take(resumed, 3)) == _keys(full[stop : stop + 3])


def test_resume_with_other_worker_count_keeps_position(tmp_path, caplog):
    pattern = _uneven_shards(tmp_path, [8, 8, 8])
    cfg = DataConfig(train=pattern, resolution=R, batch_size=2, workers=0)
    loader = build_train_loader(cfg, rank=0, world_size=1)
    _take(loader, loader.batches_per_epoch + 3)
    state = loader.state_dict()
    state["lanes"] = 3  # as if saved with 3 workers
    other = build_train_loader(cfg, rank=0, world_size=1)
    other.load_state_dict(state)
    assert "different layout" in caplog.text
    _take(other, loader.batches_per_epoch - 3)
    assert (other.epoch, other.batch) == (2, 0)


# --------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("sizes,workers", [([5, 1, 7, 3], 0), ([13], 2)])
def test_val_every_sample_once_across_ranks(tmp_path, sizes, workers):
    pattern = _uneven_shards(tmp_path, sizes, prefix="val", index=True)
    cfg = DataConfig(val=pattern, resolution=R, batch_size=4, workers=workers)
    all_keys = []
    for rank in (0, 1):
        batches = list(build_val_loader(cfg, rank=rank, world_size=2))
        assert all(b["images"].shape[0] == b["count"] == len(b["keys"]) <= 4 for b in batches)
        all_keys += _keys(batches)
    assert len(all_keys) == len(set(all_keys)) == sum(sizes)


def test_resize_false_crops_at_the_native_scale(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as w:
        w.write({"__key__": "a", "png": buf.getvalue()})
    for resize in (False, True):
        cfg = DataConfig(
            val=str(tmp_path / "val-000000.tar"), resolution=40, batch_size=1, workers=0, resize=resize
        )
        (batch,) = list(build_val_loader(cfg, rank=0, world_size=1))
        got = ((batch["images"][0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        native = pixels[20:60, 40:80]
        assert np.array_equal(got, native) is (not resize)
