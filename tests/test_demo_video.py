"""`vae-scale demo --video` end to end: camera-motion clip shards, wan-tiny-video trained a few steps through
the very same path as the real demo (the test's overrides go after the demo's), the held-out table, report
and strips. The table's figures are checked against what they claim to be: the trilinear row against the
baseline computed here from the held-out clips, the VAE row against the metrics pass on the saved weights.
The verdict is checked on given numbers, every way.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from vae_scale.cli.train import demo_main
from vae_scale.commands import demo, demo_video
from vae_scale.commands.common import DataOptions
from vae_scale.commands.demo_video import ClipRow, clip_verdict
from vae_scale.data.shards import SAMPLE_COLOR_IMAGES
from vae_scale.eval.metrics import equal_values_clip_size, evaluate, psnr, trilinear_round_trip
from vae_scale.eval.registry import fold_frames
from vae_scale.eval.temporal import flicker_per_clip, frame_differences
from vae_scale.models.interface import load_checkpoint

TINY = ["train.steps=3", "data.batch_size=2", "data.workers=0", "log.every=1", "log.images_every=3"]
NUMBER = r"[-\d.]+"
TABLE_ROW = re.compile(
    rf"^\| (?P<name>[^|]+?) +\| (?P<kept>(?P<shape>\d+ x \d+ x \d+ x \d+) [a-z ]+?) +\| +(?P<values>[\d,]+) "
    rf"\| +(?P<factor>[\d.]+)x fewer \| +(?P<psnr>{NUMBER}) dB \| +(?P<flicker>{NUMBER}) "
    rf"\| +(?P<flicker_psnr>{NUMBER}) dB \|$",
    re.M,
)
# The table prints dB to 2 decimals and flicker to 4: a figure printed from a value v is within half a unit of
# its last digit of v. The figures recomputed here differ from the pass's by float64 summation order only
# (the same float32 per-frame values; ~1e-12), and for the VAE by the thread count's reordering of float32
# convolution sums (~1e-6 relative on the pixels: ~1e-5 dB, ~1e-7 in flicker); a wrong clip, frame or
# thumbnail size moves them by far more than these slacks.
DB = 0.005 + 1e-4
FLICKER = 0.00005 + 1e-6


def test_the_verdict_follows_the_table():
    def rows(vae_psnr: float, vae_flicker: float, latent: int = 1728) -> list[ClipRow]:
        return [
            ClipRow("VAE", "3 x 6 x 6 x 16 latent", latent, vae_psnr, vae_flicker, 18.0),
            ClipRow(
                "trilinear, equal values", "3 x 14 x 14 x 3 thumbnail clip", 1764, 20.5, 0.09, 17.9, True
            ),
        ]

    line = clip_verdict(rows(13.0, 0.12))
    assert line.startswith(
        "verdict: trilinear beats the VAE at equal values on per-frame PSNR, 20.50 against 13.00 dB, "
        "and trilinear flickers less, 0.0900 against 0.1200"
    )
    assert line.endswith("(the thumbnail clip keeps 1,764 numbers per clip, the latent 1,728)")
    assert ", but the VAE flickers less, 0.0800 against 0.0900" in clip_verdict(rows(13.0, 0.08))
    line = clip_verdict(rows(21.0, 0.08))
    assert line.startswith(
        "verdict: the VAE beats trilinear at equal values on per-frame PSNR, 21.00 against 20.50"
    )
    assert ", and the VAE flickers less, 0.0800 against 0.0900" in line
    assert ", but trilinear flickers less, 0.0900 against 0.1000" in clip_verdict(rows(21.0, 0.10))
    # a tie is no win, on either figure
    assert clip_verdict(rows(20.5, 0.09)).startswith("verdict: trilinear beats the VAE")
    assert "trilinear flickers less" in clip_verdict(rows(20.5, 0.09))
    assert "both keep 1,764 numbers per clip" in clip_verdict(rows(13.0, 0.12, latent=1764))


def test_video_demo_trains_and_scores_unseen_clips_against_trilinear(tmp_path, capsys):
    pytest.importorskip("skimage")
    pytest.importorskip("av")
    data, out = tmp_path / "data", tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert demo_main(["--video", "--data", str(data), "--out", str(out), *TINY]) == 0
        text = capsys.readouterr().out
        assert f"training the wan-tiny-video preset (3 steps; torch threads {demo.THREADS}, cores " in text
        assert "trained 3 steps" in text and "NOTE" not in text

        index = json.loads((data / "index.json").read_text())
        n_val = 2 * demo_video.CLIPS_PER_IMAGE  # the clips of 2 of the 8 photographs, never trained on
        assert index["source"] == "sample-video" and index["options"]["frames"] == demo_video.FRAMES
        assert index["totals"]["written"] == len(SAMPLE_COLOR_IMAGES) * demo_video.CLIPS_PER_IMAGE
        assert index["splits"]["val"]["samples"] == n_val

        t, r = demo_video.FRAMES, demo_video.SIZE
        assert f"held-out clips: {n_val} clips of {t} frames at {r} px from unseen photographs " in text
        assert "with the EMA of its weights, decay 0.98" in text
        rows = {m["name"]: m for m in TABLE_ROW.finditer(text)}
        assert list(rows) == ["VAE (f8, 4x in time, 16 latent channels)", "trilinear, equal values"]
        vae_row, base_row = rows.values()
        for row in rows.values():
            figures = [float(row[k]) for k in ("psnr", "flicker", "flicker_psnr")]
            assert all(math.isfinite(v) for v in figures) and figures[1] > 0
            # each row keeps the numbers its shape says
            assert int(row["values"].replace(",", "")) == math.prod(map(int, row["shape"].split(" x ")))
        latent = (3, r // 8, r // 8, 16)  # 1 + (9 - 1) / 4 latent frames
        assert vae_row["shape"] == " x ".join(map(str, latent))
        thumb = equal_values_clip_size(math.prod(latent), t, latent[0], r, r)
        assert base_row["shape"] == " x ".join(map(str, (*thumb, 3)))

        # the trilinear row: the baseline of the held-out clips, computed here from its parts
        held_out = DataOptions(str(data), "val", resolution=r, batch_size=8, workers=0, frames=t)
        clips = torch.cat([b["clips"][: b["count"]] for b in held_out.clip_batches()])
        assert clips.shape == (n_val, 3, t, r, r)
        base = trilinear_round_trip(clips, thumb)
        want_psnr = psnr(fold_frames(base), fold_frames(clips)).double().view(n_val, t).mean(1).mean().item()
        want_flicker, want_flicker_psnr = (v.mean().item() for v in flicker_per_clip(base, clips))
        assert float(base_row["psnr"]) == pytest.approx(want_psnr, abs=DB)
        assert float(base_row["flicker"]) == pytest.approx(want_flicker, abs=FLICKER)
        assert float(base_row["flicker_psnr"]) == pytest.approx(want_flicker_psnr, abs=DB)

        # the VAE row: the metrics pass on the run's saved EMA weights, on the demo's threads
        torch.set_num_threads(demo.THREADS)
        vae = load_checkpoint(out, ema=True)
        got = evaluate(vae, held_out.clip_batches(), metrics=["psnr", "flicker"], device="cpu", baseline=True)
        assert float(vae_row["psnr"]) == pytest.approx(got["psnr"], abs=DB)
        assert float(vae_row["flicker"]) == pytest.approx(got["flicker"], abs=FLICKER)
        assert float(vae_row["flicker_psnr"]) == pytest.approx(got["flicker_psnr"], abs=DB)
        assert got["psnr_trilinear"] == pytest.approx(want_psnr, abs=1e-9)  # one baseline, not two
        # the still clip's line: the held-out clips' own motion (a frame difference of zero everywhere)
        motion = (frame_differences(clips).double().abs() / 2).mean().item()
        still = re.search(
            rf"a clip that does not move \(its first frame held\) scores flicker ({NUMBER}) ", text
        )
        assert still and float(still[1]) == pytest.approx(motion, abs=FLICKER)
    finally:
        torch.set_num_threads(threads)

    # the verdict says it with the table's own figures (3 steps: trilinear wins on PSNR)
    assert re.search(
        rf"^verdict: trilinear beats the VAE at equal values on per-frame PSNR, {base_row['psnr']} against "
        rf"{vae_row['psnr']} dB, ",
        text,
        re.M,
    )
    strips = out / "images" / "heldout"
    assert f"strips      {strips}/" in text and f"report      {out / 'report.html'}" in text
    report = (out / "report.html").read_text()
    assert "Held-out clips" in report and "trilinear, equal values" in report and "for scale: " in report
    shown = sorted(p.name for p in strips.iterdir())
    assert len(shown) == demo_video.REPORT_CLIPS and all(f"images/heldout/{n}" in report for n in shown)
