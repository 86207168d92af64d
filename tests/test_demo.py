"""`vae-scale demo` end to end on scikit-image's photographs: shards, training, held-out PSNR, report.

The real preset trains for minutes; here a tiny model trains a few steps through the very same path (the
demo's overrides go after its own), so what is checked is the pipeline and the report it prints. The
verdict is checked on given numbers, both ways.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from vae_scale.cli.train import demo_main
from vae_scale.commands import demo
from vae_scale.commands.demo import Row, format_rows, verdict
from vae_scale.data.shards import SAMPLE_COLOR_IMAGES
from vae_scale.eval.metrics import bicubic_round_trip, equal_values_size, psnr
from vae_scale.models.layers import Attention, ResnetBlock
from vae_scale.models.sd import VAE

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
TABLE_ROW = re.compile(
    r"^\| (?P<name>[^|]+?) +\| (?P<kept>\d+ x \d+ x \d+ (?:latent|thumbnail)) +\| +(?P<values>[\d,]+) "
    r"\| +(?P<factor>[\d.]+)x fewer \| +(?P<psnr>[\d.]+) dB \|$",
    re.M,
)


def rows_of(vae_psnr: float, latent_channels: int = 4) -> list[Row]:
    """The table of an f8 VAE on 64 px crops with the bicubic figures measured on the demo's crops."""
    equal = (8, 192, 25.51) if latent_channels == 3 else (10, 300, 26.63)
    rows = [
        Row(
            f"VAE (f8, {latent_channels} latent channels)",
            f"8 x 8 x {latent_channels} latent",
            64 * latent_channels,
            vae_psnr,
        ),
        Row(
            "bicubic, equal values", f"{equal[0]} x {equal[0]} x 3 thumbnail", equal[1], equal[2], equal=True
        ),
    ]
    if latent_channels != 3:
        rows.append(Row("bicubic 8x", "8 x 8 x 3 thumbnail", 192, 25.51))
    rows.append(Row("bicubic 4x", "16 x 16 x 3 thumbnail", 768, 29.17))
    return rows


def test_the_verdict_follows_the_table():
    # the VAE loses to the thumbnail with more numbers, and even to bicubic 8x, which keeps fewer
    line = verdict(rows_of(24.0))
    assert line.startswith("verdict: bicubic at equal values beats the VAE, 26.63 against 24.00 dB")
    assert "the thumbnail keeps 300 numbers per crop, the latent 256" in line
    assert "so does bicubic 8x with fewer numbers (192, 25.51 dB)" in line
    # it loses to the equal one only: no baseline with fewer numbers is named
    line = verdict(rows_of(26.0))
    assert line.startswith("verdict: bicubic at equal values beats the VAE") and "so does" not in line
    # it wins: bicubic 4x (more numbers, higher PSNR) does not change the verdict
    line = verdict(rows_of(26.90))
    assert line.startswith("verdict: the VAE beats bicubic at equal values, 26.90 against 26.63 dB")
    # exactly as many numbers (f8 with 3 channels against the 8x thumbnail), both ways
    assert "both keep 192 numbers per crop" in verdict(rows_of(25.60, latent_channels=3))
    assert verdict(rows_of(25.60, latent_channels=3)).startswith("verdict: the VAE beats")
    assert verdict(rows_of(25.40, latent_channels=3)).startswith("verdict: bicubic at equal values beats")
    # a tie is no win
    assert verdict(rows_of(26.63)).startswith("verdict: bicubic at equal values beats")


def test_every_row_states_its_numbers_and_compression():
    table = format_rows(rows_of(24.0), pixel_values=64 * 64 * 3)
    got = {m["name"]: m for m in TABLE_ROW.finditer(table)}
    assert list(got) == ["VAE (f8, 4 latent channels)", "bicubic, equal values", "bicubic 8x", "bicubic 4x"]
    assert [(m["values"], m["factor"]) for m in got.values()] == [
        ("256", "48"),
        ("300", "41"),  # 40.96
        ("192", "64"),
        ("768", "16"),
    ]
    assert got["VAE (f8, 4 latent channels)"]["psnr"] == "24.00"


@torch.no_grad()
def test_heldout_rows_give_the_baseline_at_least_the_latents_numbers():
    torch.manual_seed(0)
    crops = torch.rand(5, 3, 64, 64) * 2 - 1
    for latent_channels, equal in ((4, (10, 10)), (3, (8, 8))):
        tiny_f8 = ["model.block_out_channels=[8,8,8,8]", "model.norm_num_groups=4"]
        vae = VAE.from_preset("demo", [*tiny_f8, f"model.latent_channels={latent_channels}"])
        rows, shown = demo.heldout_rows(vae, crops, batch=2)
        vae_row, base = rows[0], rows[1]
        assert (
            vae_row.values == 8 * 8 * latent_channels and vae_row.kept == f"8 x 8 x {latent_channels} latent"
        )
        assert base.equal and base.values >= vae_row.values and base.values == 3 * equal[0] * equal[1]
        assert base.psnr == pytest.approx(psnr(bicubic_round_trip(crops, size=equal), crops).mean().item())
        want = psnr(vae.decode(vae.encode(crops).mode()).clamp(-1, 1), crops).mean().item()
        # the same weights and crops, batched 2 against 4: convolution sums reorder, ~1e-6 relative on the
        # pixels, ~1e-5 dB; a crop decoded from the wrong latent or scored twice moves it by over 0.01 dB
        assert vae_row.psnr == pytest.approx(want, abs=1e-4)
        names = [r.name for r in rows]
        # the 8x thumbnail is the equal-values one for 3 channels: it is not listed twice
        assert names.count("bicubic 8x") == (latent_channels != 3) and "bicubic 4x" in names
        assert shown["input"].shape == shown["vae"].shape == shown["bicubic"].shape == (5, 3, 64, 64)


def test_the_eval_crop_gives_the_preset_a_square_thumbnail_of_nearly_its_numbers():
    r = demo.EVAL_RESOLUTION
    vae = VAE.from_preset("demo", ["model.block_out_channels=[8,8,8,8]", "model.norm_num_groups=4"])
    latent_values = int(torch.tensor(vae.latent_shape(r, r)).prod())
    h, w = equal_values_size(latent_values, r, r)
    assert h == w and latent_values <= 3 * h * w <= 1.03 * latent_values  # 576 latent, 588 thumbnail


def test_zero_init_residual_starts_every_block_as_its_skip_and_only_changes_the_init():
    small = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.mid_block_attention=true"]
    torch.manual_seed(0)
    plain = VAE.from_preset("demo", small)
    torch.manual_seed(0)
    zero = VAE.from_preset("demo", [*small, "model.zero_init_residual=true"])
    branch_ends = {
        f"{name}.{'conv2' if isinstance(m, ResnetBlock) else 'to_out.0'}.{p}"
        for name, m in zero.named_modules()
        if isinstance(m, (ResnetBlock, Attention))
        for p in ("weight", "bias")
    }
    # ResNet blocks: encoder 2 levels x 1 + 2 mid, decoder 2 levels x 2 + 2 mid; and 2 attentions
    assert len(branch_ends) == 2 * (4 + 6 + 2)
    a, b = plain.state_dict(), zero.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # loads into either model
    for k in a:  # the same draws for everything else: only the branches' last layers differ
        assert torch.equal(b[k], torch.zeros_like(b[k])) if k in branch_ends else torch.equal(a[k], b[k]), k
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for m in zero.modules():
        if isinstance(m, ResnetBlock):
            h = torch.randn(2, m.conv1.in_channels, 8, 8)
            skip = h if m.conv_shortcut is None else m.conv_shortcut(h)
            assert torch.equal(m(h), skip)
    # the branches learn: one step moves every zeroed layer off zero
    opt = torch.optim.Adam(zero.parameters(), lr=1e-3)
    (zero.decode(zero.encode(x).mode()) - x).square().mean().backward()
    opt.step()
    params = dict(zero.named_parameters())
    assert all(params[k].abs().sum() > 0 for k in branch_ends if k.endswith("weight"))


def test_demo_trains_and_scores_unseen_photographs_against_bicubic(tmp_path, capsys):
    pytest.importorskip("skimage")
    data, out = tmp_path / "data", tmp_path / "run"
    threads, caller = torch.get_num_threads(), demo.THREADS + 1
    torch.set_num_threads(caller)
    try:
        assert demo_main(["--data", str(data), "--out", str(out), *TINY]) == 0
        # trained and scored on the demo's own thread count, not the caller's, which is set back after
        assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert f"training the demo preset (3 steps; torch threads {demo.THREADS}, cores " in text

    index = json.loads((data / "index.json").read_text())
    assert index["source"] == "sample-color" and index["totals"]["written"] == len(SAMPLE_COLOR_IMAGES)
    assert index["splits"]["val"]["samples"] == 2  # a quarter of the 8 colour photographs, never trained on
    crops = demo.heldout_crops(data, demo.EVAL_RESOLUTION)
    r = demo.EVAL_RESOLUTION
    assert crops.shape[1:] == (3, r, r) and crops.min() >= -1 and crops.max() <= 1

    assert "trained 3 steps" in text and "NOTE" not in text
    assert f"held-out PSNR on {len(crops)} crops of {r} px from unseen photographs ({3 * r * r:,}" in text
    rows = {m["name"]: m for m in TABLE_ROW.finditer(text)}
    f4 = r // 4  # the tiny model has 3 levels: f4
    assert rows["VAE (f4, 4 latent channels)"]["kept"] == f"{f4} x {f4} x 4 latent"
    base = rows["bicubic, equal values"]
    assert int(base["values"].replace(",", "")) >= f4 * f4 * 4
    scores = {k: float(v["psnr"]) for k, v in rows.items()}
    assert scores["bicubic 4x"] > scores["bicubic 8x"] > scores["VAE (f4, 4 latent channels)"] > 0  # 3 steps
    # the tiny model loses, and the verdict line says so with the table's own figures
    vae_psnr, base_psnr = rows["VAE (f4, 4 latent channels)"]["psnr"], base["psnr"]
    assert float(base_psnr) > float(vae_psnr)
    assert re.search(
        rf"^verdict: bicubic at equal values beats the VAE, {base_psnr} against {vae_psnr} dB ", text, re.M
    )

    report = (out / "report.html").read_text()
    assert "Held-out photographs" in report and "bicubic, equal values" in report
    shown = sorted(p.name for p in (out / "images" / "heldout").iterdir())
    assert len(shown) == 3 * demo.REPORT_CROPS and all(f"images/heldout/{n}" in report for n in shown)
    assert "reconstruction-000000003.png" in report  # the training grids are still there
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest / "COMPLETE").is_file()

    # a second demo reuses the shards and starts a fresh run folder beside the first; a time guard that
    # fires stops it early, and the output says its figures are not the reference run's
    assert demo_main(["--data", str(data), "--out", str(out), "--time-guard", "1e-9", *TINY]) == 0
    text = capsys.readouterr().out
    assert "writing shards" not in text
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run")]) == 2
    assert re.search(
        r"NOTE: the time guard \(1e-09 s\) stopped training after [12] of 3 steps: these figures", text
    )
