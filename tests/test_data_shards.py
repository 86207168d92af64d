"""`vae-scale shards`: real image folders in, real tar shards and index.json out."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vae_scale.cli.shards import shards_main
from vae_scale.config import DataConfig
from vae_scale.data.loader import DataError, build_train_loader, build_val_loader
from vae_scale.data.shards import SAMPLE_IMAGES


def _image(rng, w, h, mode="RGB"):
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


@pytest.fixture
def src(tmp_path):
    """A folder of 24 usable images (nested, mixed case, several formats and modes) and 3 that are not."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    (root / "a" / "b").mkdir(parents=True)
    exts = ["jpg", "JPG", "jpeg", "png", "PNG", "webp", "bmp", "tif", "TIFF"]
    for i in range(24):
        folder = root / ("a/b" if i % 4 == 0 else "a" if i % 4 == 1 else "")
        mode = (
            ["RGB", "L", "RGBA", "P"][i % 4]
            if exts[i % len(exts)].lower() in ("png", "tif", "tiff")
            else "RGB"
        )
        _image(rng, 48 + i, 40 + (i * 7) % 30, mode).save(folder / f"img {i}.v2.{exts[i % len(exts)]}")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _image(rng, 20, 30).save(root / "small.png")  # below --size 32: skipped, never upscaled
    (root / "notes.txt").write_text("not an image")
    return root


def _members(path):
    with tarfile.open(path) as tf:
        return [(m.name, m.size, m.mtime) for m in tf]


def test_shards_round_trip(src, tmp_path, capsys):
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    args = ["--size", "32", "--max-per-shard", "5", "--val-fraction", "0.2", "--seed", "7", "--quiet"]
    assert shards_main([str(src), str(out1), *args, "--workers", "1"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert shards_main([str(src), str(out2), *args, "--workers", "2"]) == 0

    index = json.loads((out1 / "index.json").read_text())
    t = index["totals"]
    assert (t["files"], t["written"], t["skipped"], t["ignored_non_images"]) == (26, 24, 2, 1)
    assert t["train"] + t["val"] == 24 and 3 <= t["val"] <= 5  # round(26 * 0.2) held out, some unusable
    assert index["skipped"]["counts"] == {"too_small": 1, "undecodable": 1}
    assert {s["file"] for s in index["skipped"]["files"]} == {"small.png", "corrupt.jpg"}
    assert (
        index["source_resolution"]["images"] == 25 and index["source_resolution"]["short_side"]["min"] == 20
    )

    # Byte-identical across runs and encoder process counts; counts in index.json match the tars.
    names = sorted(p.name for p in out1.iterdir())
    assert names == sorted(p.name for p in out2.iterdir())
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    for split in ("train", "val"):
        for shard, count in index["splits"][split]["shards"].items():
            members = _members(out1 / shard)
            assert len(members) == 2 * count  # image + json sidecar
            assert all(m[2] == 0 for m in members)
            assert all(c == 5 for c in list(index["splits"][split]["shards"].values())[:-1])
    with tarfile.open(out1 / "train-000000.tar") as tf:
        jpgs = [m for m in tf.getmembers() if m.name.endswith(".jpg")]
        img = Image.open(io.BytesIO(tf.extractfile(jpgs[0]).read()))
        meta = json.loads(tf.extractfile(jpgs[0].name[:-4] + ".json").read())
    assert min(img.size) == 32 and img.mode == "RGB" and meta["source"].startswith(("a", "img"))

    # The loader reads them: the folder gives each split its own shards, every sample once in val.
    cfg = DataConfig(train=str(out1), val=str(out1), resolution=32, batch_size=4, workers=0)
    val = build_val_loader(cfg, rank=0, world_size=1)
    assert sum(b["count"] for b in val) == t["val"]
    loader = build_train_loader(cfg, rank=0, world_size=1)
    assert loader.batches_per_epoch == t["train"] // 4
    assert next(iter(loader))["images"].shape == (4, 3, 32, 32)


def test_shards_seed_changes_split_and_no_size_keeps_bytes(src, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shards_main([str(src / "a"), str(a), "--seed", "1", "--val-fraction", "0.3", "--quiet", "--workers", "1"])
    shards_main([str(src / "a"), str(b), "--seed", "2", "--val-fraction", "0.3", "--quiet", "--workers", "1"])
    sources = {}
    for out in (a, b):
        with tarfile.open(out / "val-000000.tar") as tf:
            sources[out] = {
                json.loads(tf.extractfile(m).read())["source"] for m in tf if m.name.endswith(".json")
            }
    assert sources[a] != sources[b]
    # Without --size a JPEG source that is already RGB is stored byte for byte (no re-encoding loss).
    jpg = next(p for p in sorted((src / "a").rglob("*")) if p.suffix in (".jpg", ".JPG", ".jpeg"))
    stored = []
    for out in (a,):
        for shard in sorted(out.glob("*.tar")):
            with tarfile.open(shard) as tf:
                stored += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    assert jpg.read_bytes() in stored


def test_shards_sample_photographs(tmp_path):
    out = tmp_path / "demo"
    assert (
        shards_main(
            [
                "sample",
                str(out),
                "--size",
                "64",
                "--max-per-shard",
                "6",
                "--format",
                "webp",
                "--quality",
                "80",
                "--quiet",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["written"] == len(SAMPLE_IMAGES)
    assert index["totals"]["val"] == 1  # round(17 * 0.05) = 1
    with tarfile.open(out / "train-000000.tar") as tf:
        assert all(n.endswith((".webp", ".json")) for n in tf.getnames())


def test_shards_usage_errors(tmp_path, src):
    with pytest.raises(SystemExit) as e:
        shards_main([str(src), str(tmp_path / "o"), "--format", "gif"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        shards_main([str(src), str(tmp_path / "o"), "--size", "0"])
    with pytest.raises(DataError, match="nowhere"):
        shards_main([str(tmp_path / "nowhere"), str(tmp_path / "o")])
    with pytest.raises(DataError, match="matches no image"):
        shards_main([str(tmp_path / "*.png"), str(tmp_path / "o")])


def test_shards_keep_small_images_at_their_own_size_and_the_console_says_what_was_skipped(
    src, tmp_path, capsys
):
    out = tmp_path / "kept"
    args = ["--size", "32", "--val-fraction", "0.2", "--quiet", "--workers", "1"]
    assert shards_main([str(src), str(tmp_path / "skipping"), *args]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 of 26 images:" in printed
    assert "1 too_small: short side below --size" in printed and "--keep-small" in printed
    assert "small.png: 20x30 is below --size 32" in printed and "1 undecodable" in printed

    assert shards_main([str(src), str(out), *args, "--keep-small"]) == 0
    printed = capsys.readouterr().out
    assert "1 below --size kept at their own size" in printed and "too_small" not in printed
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["kept_small"] == 1 and index["skipped"]["counts"] == {"undecodable": 1}
    sizes = []
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            with tarfile.open(out / shard) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.loads(tf.extractfile(m).read())
                        sizes.append((meta["source"], meta["width"], meta["height"]))
    small = [s for s in sizes if s[0] == "small.png"]
    assert small == [("small.png", 20, 30)]  # as it was, not upscaled
    assert all(min(w, h) == 32 for name, w, h in sizes if name != "small.png")
    with pytest.raises(SystemExit):
        shards_main([str(src), str(tmp_path / "o"), "--keep-small"])  # needs --size


def test_shards_warn_when_the_val_fraction_yields_no_val_sample(tmp_path, caplog):
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        _image(rng, 40, 40).save(folder / f"p{i}.png")
    with caplog.at_level("WARNING"):
        shards_main([str(folder), str(tmp_path / "a"), "--val-fraction", "0.1", "--quiet", "--workers", "1"])
    assert not any("no val samples" in r.message for r in caplog.records)  # one image held out
    # the image drawn for val is too small: no val sample at all, said clearly
    order_index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert order_index["totals"]["val"] == 1
    val_shard = next(iter(order_index["splits"]["val"]["shards"]))
    with tarfile.open(tmp_path / "a" / val_shard) as tf:
        meta = json.loads(tf.extractfile(next(m for m in tf if m.name.endswith(".json"))).read())
    _image(rng, 16, 16).save(folder / meta["source"])
    with caplog.at_level("WARNING"):
        shards_main(
            [
                str(folder),
                str(tmp_path / "b"),
                "--size",
                "32",
                "--val-fraction",
                "0.1",
                "--quiet",
                "--workers",
                "1",
            ]
        )
    warning = [r.message for r in caplog.records if "no val samples" in r.message]
    assert len(warning) == 1 and "--val-fraction 0.1" in warning[0] and "were skipped" in warning[0]
