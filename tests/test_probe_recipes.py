"""benchmarks/probe_recipes.py's own machinery: the crops the probe's latents come from, and the job runner
that orders, times and skips the commands."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.probe_recipes import CROP, STRIDE, Job, run_jobs, write_crops


def _shard(path: Path, images: dict[str, np.ndarray]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, img in images.items():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{key}.png")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)


def test_crops_cover_the_photograph_at_the_stride(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 130, 3), dtype=np.uint8)  # odd sides: a partial last stride is dropped
    _shard(tmp_path / "train-000000.tar", {"train-0": img})
    n = write_crops(tmp_path, "train", tmp_path / "crops")
    rows, cols = (100 - CROP) // STRIDE + 1, (130 - CROP) // STRIDE + 1  # 2 x 3
    assert n == rows * cols == len(list((tmp_path / "crops").glob("*.png")))
    for i in range(rows):
        for j in range(cols):  # PNG is lossless: each crop is its window of the photograph exactly
            crop = np.asarray(Image.open(tmp_path / "crops" / f"train-0-{i:02d}-{j:02d}.png"))
            np.testing.assert_array_equal(
                crop, img[i * STRIDE : i * STRIDE + CROP, j * STRIDE : j * STRIDE + CROP]
            )
    with pytest.raises(SystemExit, match="no val"):
        write_crops(tmp_path, "val", tmp_path / "crops-val")


def _writer(out: Path, needs: Path | None = None) -> list[str]:
    """A command that fails unless `needs` exists, then writes `out`."""
    check = f"assert __import__('os').path.exists({str(needs)!r}); " if needs else ""
    return [sys.executable, "-c", f"{check}open({str(out)!r}, 'w').write('x')"]


def test_jobs_run_after_what_they_need_and_are_not_run_again(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    # b listed first but needs a: with 2 slots it must still wait for a (it fails if run before)
    jobs = [Job("b", _writer(b, needs=a), b, after=("a",)), Job("a", _writer(a), a)]
    run_jobs(jobs, tmp_path / "logs", parallel=2)
    assert a.is_file() and b.is_file()
    record = json.loads((tmp_path / "logs" / "b.json").read_text())
    assert record["timing"]["wall_s"] >= 0 and record["argv"] == jobs[0].argv
    # a second call finds the outputs: nothing runs (a would fail now), the timings are read back
    again = [Job("b", _writer(b, needs=a), b, after=("a",)), Job("a", [sys.executable, "-c", "1/0"], a)]
    run_jobs(again, tmp_path / "logs", parallel=2)
    assert again[0].timing == record["timing"]


def test_a_failed_job_stops_with_its_log(tmp_path: Path) -> None:
    jobs = [Job("bad", [sys.executable, "-c", "raise SystemExit('the reason')"], tmp_path / "never")]
    with pytest.raises(SystemExit, match=r"(?s)bad failed \(exit 1\).*the reason"):
        run_jobs(jobs, tmp_path / "logs", parallel=1)
