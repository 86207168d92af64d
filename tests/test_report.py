"""report.html reads in the order people look (losses first), and `vae-scale compare` lines runs up."""

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from vae_scale.cli import main
from vae_scale.config import load_config
from vae_scale.train.report import metric_order, svg_chart, write_report

BAD = [f"data/bad/{k}" for k in ("duplicate_key", "empty", "no_image", "too_small", "undecodable")]


def write_run(folder: Path, scale: float = 1.0, steps: int = 6) -> Path:
    """A run folder with the metrics a training run logs: losses, optimisation, counters; val/* in rows of
    their own (as the trainer logs them), the last row a training one."""
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        rows.append(
            {
                "step": step,
                "time": 1000.0 + step,
                "zeta_custom": step * 2.0,
                **{k: 0 for k in BAD},
                "data/samples": 4.0 * step,
                "images_per_s": 30.0 + step,
                "lr": 1e-4,
                "grad_norm": 1.0 / step,
                "kl_weight": 1e-6,
                "kl": 100.0 * step,
                "rec": scale * 0.5 / step,
                "loss": scale * (0.5 / step + 0.01),
            }
        )
        if step % 3 == 0:
            rows.append(
                {"step": step, "time": 1000.5 + step, "val/psnr": 20.0 + step * scale, "val/ssim": 0.5}
            )
    rows.append({"step": steps, "time": 2000.0, "loss": float("nan")})  # non-finite values are left out
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def chart_titles(page: str) -> list[str]:
    return re.findall(r"<figcaption><b>(.*?)</b>", page)


def section(page: str, title: str) -> str:
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end > 0 else None]


def test_report_puts_the_losses_first_and_constants_as_values(tmp_path):
    run = write_run(tmp_path / "run")
    images = run / "images"
    images.mkdir()
    grid = np.zeros((70, 104, 3), dtype=np.uint8)  # 3 rows of 32 px, a tiny grid
    Image.fromarray(grid).save(images / "reconstruction-000000004.png")
    Image.fromarray(grid).save(images / "reconstruction-000000006.png")
    config = load_config(None, ["optim.ema_decay=0.9"]).to_yaml()
    page = write_report(run, config, {}).read_text()

    titles = chart_titles(page)
    assert titles[:3] == ["loss", "rec", "kl"]  # not alphabetical: the objective first
    assert titles.index("val/psnr") < titles.index("grad_norm") < titles.index("zeta_custom")
    assert titles.index("zeta_custom") < titles.index("data/samples") == len(titles) - 1
    assert not {"lr", "kl_weight", "val/ssim", *BAD} & set(titles)  # constants get no flat chart

    constants = section(page, "Constant values")
    for name in ("lr", "kl_weight", "val/ssim", *BAD):
        assert f"<td>{name}</td>" in constants
    assert constants.index("kl_weight") < constants.index("lr") < constants.index("data/bad/")
    assert "<td>0.0001</td>" in constants

    latest = section(page, "Latest values")
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", latest)
    values = {name: (float(v), float(s)) for name, v, s in rows}
    assert values["val/psnr"] == (26.0, 6.0)  # from a val row, though the last row is a training one
    assert values["loss"] == (float(f"{0.5 / 6 + 0.01:.6g}"), 6.0)  # the finite latest, not the NaN
    assert list(values) == sorted(values, key=metric_order)

    images_html = section(page, "Images")
    assert "reconstruction-000000006.png" in images_html and "000000004" not in images_html  # the newest
    assert 'width="416"' in images_html  # 104 px scaled 4x to be readable, pixelated
    assert "rows, top to bottom: input, reconstruction (posterior mean), EMA reconstruction" in images_html
    assert "at step 6" in images_html


def tick_values(chart: str) -> list[float]:
    return [float(t) for t in re.findall(r'text-anchor="end">([^<]+)</text>', chart)]


def test_chart_axes_follow_the_data():
    chart = svg_chart("psnr", [("psnr", [(1, 24.1), (2, 24.6), (3, 25.3)])])
    ticks = tick_values(chart)
    assert ticks and all(24.0 <= t <= 25.4 for t in ticks)  # not -1..1, not 0..30
    log = svg_chart("loss", [("loss", [(1, 2.0), (2, 0.2), (3, 0.02)])])
    assert "(log scale)" in log and {1.0, 0.1} <= set(tick_values(log))
    flat_pad = svg_chart("x", [("x", [(1, 5.0), (2, 5.0)])])
    assert all(4.7 <= t <= 5.3 for t in tick_values(flat_pad))


def test_compare_prints_latest_and_best_and_overlays_the_curves(tmp_path, capsys):
    a = write_run(tmp_path / "a", scale=1.0)
    b = write_run(tmp_path / "b", scale=2.0, steps=9)
    out = tmp_path / "cmp.html"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
        for line in printed.splitlines()[2:]
        if line.startswith("|")
    }
    assert table["last step"] == ["6", "9"]
    assert table["loss"][0].startswith(f"{0.5 / 6 + 0.01:.5g} (best {0.5 / 6 + 0.01:.5g} @ 6)")
    assert table["val/psnr"] == ["26 (best 26 @ 6)", "38 (best 38 @ 9)"]  # higher is better
    assert table["images_per_s"] == ["36", "39"]  # no direction: no best
    assert "lr" not in table and not any(k.startswith("data/bad") for k in table)
    assert list(table)[1:4] == ["loss", "rec", "kl"]

    page = out.read_text()
    loss_chart = next(f for f in re.findall(r"<figure>.*?</figure>", page, re.S) if "<b>loss</b>" in f)
    assert loss_chart.count("<polyline") >= 2 and "#1f77b4" in loss_chart and "#d62728" in loss_chart
    assert chart_titles(page)[0] == "loss"

    assert main(["compare", str(a), str(b), "--metrics", "val/psnr", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and chart_titles(out.read_text())[0] == "loss"  # kept
    assert main(["compare", str(a), str(b), "--metrics", "val/psnr", "--out", str(out), "--overwrite"]) == 0
    assert chart_titles(out.read_text()) == ["val/psnr"]
    assert main(["compare", str(a), "--metrics", "nope", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
