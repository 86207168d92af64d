"""`vae-scale demo` end to end on scikit-image's photographs: shards, training, held-out PSNR, report.

The real preset trains for minutes; here a tiny model trains a few steps through the very same path (the
demo's overrides go after its own), so what is checked is the pipeline and the report it prints.
"""

from __future__ import annotations

import json
import re

import pytest

from vae_scale import demo
from vae_scale.shards import SAMPLE_COLOR_IMAGES

pytest.importorskip("skimage")

TINY = [
    "model.block_out_channels=[8,16,16]",
    "model.layers_per_block=1",
    "model.latent_channels=4",
    "model.norm_num_groups=4",
    "data.batch_size=4",
    "data.workers=0",
    "train.steps=3",
    "log.every=1",
    "log.images_every=3",
]


def test_demo_trains_and_scores_unseen_photographs_against_bicubic(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    assert demo.main(["--data", str(data), "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out

    index = json.loads((data / "index.json").read_text())
    assert index["source"] == "sample-color" and index["totals"]["written"] == len(SAMPLE_COLOR_IMAGES)
    assert index["splits"]["val"]["samples"] == 2  # a quarter of the 8 colour photographs, never trained on
    crops = demo.heldout_crops(data, demo.EVAL_RESOLUTION)
    assert crops.shape[1:] == (3, 64, 64) and crops.min() >= -1 and crops.max() <= 1

    assert "trained 3 steps" in text
    # held-out crops are 64 px whatever the training crop (the demo preset trains on 32 px crops)
    assert f"held-out PSNR on {len(crops)} crops of 64 px" in text
    rows = re.findall(r"^  (vae|bicubic 4x|bicubic 8x)\s+([\d.]+) dB$", text, re.M)
    scores = {k: float(v) for k, v in rows}
    assert set(scores) == {"vae", "bicubic 4x", "bicubic 8x"}
    assert scores["bicubic 4x"] > scores["bicubic 8x"] > scores["vae"] > 0  # 3 steps of a tiny model
    assert "does not beat the bicubic 8x baseline" in text
    assert (out / "report.html").is_file() and any((out / "images").iterdir())
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest / "COMPLETE").is_file()

    # a second demo reuses the shards and starts a fresh run folder beside the first
    assert demo.main(["--data", str(data), "--out", str(out), *TINY]) == 0
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run")]) == 2
