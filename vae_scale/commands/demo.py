"""`vae-scale demo`: the whole job in minutes on a laptop CPU (a GPU is used when there is one).

1. writes WebDataset shards from scikit-image's sample photographs, some photographs held out (val);
2. trains the `demo` preset for its fixed number of steps on a fixed number of torch threads, so that a
   faster or slower machine adds the same floats in the same order and prints the same figures (a time
   guard far above the expected time only catches a machine that stalls, and the output says when it
   fired);
3. measures PSNR on every non-overlapping crop of the held-out photographs, next to bicubic down-and-up
   baselines on the same crops, each row with the numbers it keeps per crop; the verdict compares the VAE
   with the bicubic thumbnail that keeps as many numbers as its latent (or the fewest more, never fewer);
4. adds the table and a few held-out crops (input | VAE | bicubic) to the run's report.html.

`vae-scale demo --video` does the same for clips (vae_scale/commands/demo_video.py): camera-motion clips of
the same photographs, the `wan-tiny-video` preset, per-frame PSNR and flicker against trilinear. run_demo
drives both; a Demo says what differs (its preset, its shards, how it scores the held-out data).
"""

from __future__ import annotations

import html
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from vae_scale.config import Config, load_config
from vae_scale.eval.metrics import bicubic_round_trip, compression, equal_values_size, psnr

DEFAULT_TIME_GUARD_S = 7200.0
"""Stops training after this many seconds: over twenty times what the preset's steps take on an idle CPU
core (about 5 minutes), and above what a 2-core machine shared with five other jobs took (the earlier
1000-step preset trained there in 26 to 39 minutes), so it fires only on a machine that stalls. The figures
then come from fewer steps, and the demo says they are not the reference run's."""
THREADS = 1
"""torch's intra-op threads while the demo trains and scores, whatever the machine's core count: a parallel
sum splits its terms by thread, so the thread count decides the rounding of every convolution's gradient,
and the figures are those of docs/performance.md on one core or sixteen (only the time differs). One thread:
two are faster on idle cores, but on a shared 2-core machine their barrier waits made a step take 50 s instead
of about 2 s, and the data loader's worker has a second core to itself."""
DATA_SOURCE = "sample-color"  # vae_scale.data.shards.SAMPLE_COLOR_IMAGES; a quarter held out
SHARD_SIZE = 256  # short side of the photographs in the demo shards
EVAL_RESOLUTION = 96
"""Held-out crops are this size whatever the training crop (a convolutional VAE encodes any multiple of its
downsampling factor). 96 px is the smallest crop whose f8 latent of 4 channels (12 x 12 x 4 = 576 numbers)
has a square bicubic thumbnail with nearly as many numbers (14 x 14 x 3 = 588, 2% more); at 64 px the
nearest square thumbnail keeps 17% more (10 x 10 x 3 = 300 against 256)."""
BICUBIC_FACTORS = (8, 4)
"""Fixed bicubic rows beside the one at the VAE's number of values, for scale."""
REPORT_CROPS = 6
"""Held-out crops shown side by side in report.html."""


@dataclass
class Row:
    """One line of the demo's table: a reconstruction, what it keeps per crop, and its held-out PSNR."""

    name: str
    kept: str  # what the numbers are, e.g. "8 x 8 x 4 latent"
    values: int  # numbers kept per crop
    psnr: float  # mean dB over the held-out crops
    equal: bool = False  # the baseline the verdict compares with


def heldout_crops(val_dir: Path, resolution: int) -> torch.Tensor:
    """Every non-overlapping resolution x resolution crop of the val photographs, (N, 3, R, R) in [-1, 1]."""
    from vae_scale.data.shards import IMAGE_EXTENSIONS, to_rgb

    crops = []
    for shard in sorted(val_dir.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    img = to_rgb(Image.open(io.BytesIO(tar.extractfile(member).read())))
                    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                    h, w = a.shape[1] // resolution, a.shape[2] // resolution
                    crops += [
                        a[:, i * resolution : (i + 1) * resolution, j * resolution : (j + 1) * resolution]
                        for i in range(h)
                        for j in range(w)
                    ]
    if not crops:
        raise RuntimeError(f"no validation photographs in {val_dir}")
    return torch.stack(crops)


def _shape(c: int, h: int, w: int) -> str:
    return f"{h} x {w} x {c}"


@torch.no_grad()
def heldout_rows(vae, crops: torch.Tensor, batch: int = 32) -> tuple[list[Row], dict[str, torch.Tensor]]:
    """The table's rows on `crops` (N, 3, R, R): the VAE (posterior mean), bicubic at its number of values,
    and bicubic 8x / 4x; plus the reconstructions of the first REPORT_CROPS crops by the VAE and by the
    equal-values bicubic ({"input", "vae", "bicubic"}, each (n, 3, R, R))."""
    device = next(vae.parameters()).device
    vae.eval()
    c, r = crops.shape[1], crops.shape[-1]
    latent = vae.latent_shape(r, r)  # (C, h, w)
    latent_values = int(np.prod(latent))
    equal = equal_values_size(latent_values, r, r, c)
    sizes = {"equal": equal, **{f"{f}x": (r // f, r // f) for f in BICUBIC_FACTORS}}
    scores: dict[str, list[torch.Tensor]] = {k: [] for k in ("vae", *sizes)}
    for i in range(0, len(crops), batch):
        x = crops[i : i + batch].to(device)
        x_vae = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        scores["vae"].append(psnr(x_vae, x).cpu())
        for name, size in sizes.items():
            scores[name].append(psnr(bicubic_round_trip(x, size=size), x).cpu())
    mean = {k: torch.cat(v).mean().item() for k, v in scores.items()}
    x = crops[:REPORT_CROPS].to(device)
    shown = {
        "input": x.cpu(),
        "vae": vae.decode(vae.encode(x).mode()).clamp(-1, 1).cpu(),
        "bicubic": bicubic_round_trip(x, size=equal).cpu(),
    }
    f = vae.downsample_factor
    rows = [
        Row(
            f"VAE (f{f}, {latent[0]} latent channels)",
            f"{_shape(*latent)} latent",
            latent_values,
            mean["vae"],
        ),
        Row(
            "bicubic, equal values",
            f"{_shape(c, *equal)} thumbnail",
            c * equal[0] * equal[1],
            mean["equal"],
            True,
        ),
    ]
    for factor in BICUBIC_FACTORS:
        size = sizes[f"{factor}x"]
        if size != equal:  # the same thumbnail twice says nothing new
            rows.append(
                Row(
                    f"bicubic {factor}x",
                    f"{_shape(c, *size)} thumbnail",
                    c * size[0] * size[1],
                    mean[f"{factor}x"],
                )
            )
    return rows, shown


def markdown_table(head: tuple[str, ...], cells: list[tuple[str, ...]], right: tuple[bool, ...]) -> str:
    """A markdown table of `cells` under `head`, each column padded to its widest cell (right-aligned where
    `right` says, as numbers are)."""
    widths = [max(len(t[i]) for t in (head, *cells)) for i in range(len(head))]

    def line(cols: tuple[str, ...]) -> str:
        return (
            "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cols, widths, right)) + " |"
        )

    rule = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|"
    return "\n".join([line(head), rule, *(line(c) for c in cells)])


def html_table(head: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    """The same table as HTML for report.html (every cell escaped)."""

    def line(tag: str, cols: tuple[str, ...]) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cols) + "</tr>"

    return f"<table>{line('th', head)}{''.join(line('td', c) for c in cells)}</table>"


ROW_HEAD = ("reconstruction", "keeps per crop", "numbers", "vs pixels", "PSNR")


def row_cells(rows: list[Row], pixel_values: int) -> list[tuple[str, ...]]:
    """The table's cells: what each row keeps per crop, how many numbers, how many times fewer than the
    pixel_values of a crop, and PSNR."""
    return [
        (
            row.name,
            row.kept,
            f"{row.values:,}",
            f"{compression(row.values, pixel_values)} fewer",
            f"{row.psnr:.2f} dB",
        )
        for row in rows
    ]


def format_rows(rows: list[Row], pixel_values: int) -> str:
    """The rows as a markdown table (row_cells' columns)."""
    return markdown_table(ROW_HEAD, row_cells(rows, pixel_values), (False, False, True, True, True))


def verdict(rows: list[Row]) -> str:
    """One line that says whether the VAE (rows[0]) or the equal-values bicubic baseline reconstructs the
    held-out crops better, how many numbers each keeps, and which baselines with no more numbers than the
    latent beat the VAE when it loses."""
    vae, base = rows[0], next(r for r in rows if r.equal)
    numbers = (
        f"both keep {vae.values:,} numbers per crop"
        if base.values == vae.values
        else f"the thumbnail keeps {base.values:,} numbers per crop, the latent {vae.values:,}"
    )
    if vae.psnr > base.psnr:
        return (
            f"verdict: the VAE beats bicubic at equal values, {vae.psnr:.2f} against {base.psnr:.2f} dB "
            f"({numbers})"
        )
    line = (
        f"verdict: bicubic at equal values beats the VAE, {base.psnr:.2f} against {vae.psnr:.2f} dB "
        f"({numbers})"
    )
    fewer = [r for r in rows[1:] if not r.equal and r.values < vae.values and r.psnr >= vae.psnr]
    if fewer:
        line += "; so does " + " and ".join(
            f"{r.name} with fewer numbers ({r.values:,}, {r.psnr:.2f} dB)" for r in fewer
        )
    return line


def report_section(run_dir: Path, rows: list[Row], shown: dict[str, torch.Tensor], pixel_values: int) -> str:
    """HTML for report.html: the table, the verdict, and the shown crops side by side (PNGs written under
    images/heldout/)."""
    from vae_scale.train.monitor import save_png

    out = run_dir / "images" / "heldout"
    out.mkdir(parents=True, exist_ok=True)
    base = next(r for r in rows if r.equal)
    columns = (("input", "input"), ("vae", f"VAE ({rows[0].kept})"), ("bicubic", f"bicubic ({base.kept})"))
    body = []
    for i in range(len(shown["input"])):
        cells = []
        for key, _ in columns:
            name = f"{i:02d}-{key}.png"
            save_png((shown[key][i].float().clamp(-1, 1) + 1) / 2, out / name)
            score = (
                ""
                if key == "input"
                else f"<br>{psnr(shown[key][i : i + 1], shown['input'][i : i + 1]).item():.2f} dB"
            )
            cells.append(
                f'<td><img src="images/heldout/{name}" width="160" height="160" '
                f'style="image-rendering:pixelated">{score}</td>'
            )
        body.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    return (
        f"{html_table(ROW_HEAD, row_cells(rows, pixel_values))}<p>{html.escape(verdict(rows))}</p>"
        f"<table><tr>{head}</tr>{''.join(body)}</table>"
    )


@dataclass(frozen=True)
class Scored:
    """A demo's figures on its held-out data, for run_demo to print and to put in report.html."""

    text: str
    """What the console shows after training: what was scored, the table, the verdict."""
    title: str
    """report.html's section heading."""
    section: str
    """The section's HTML."""
    shown: tuple[str, Path]
    """A label and the folder of the held-out examples written (crops, strips)."""


class Demo(Protocol):
    """What differs between the demos (images, clips); run_demo does the rest: shards, training on the demo's
    threads with the time guard, the weights loaded, the report, the paths printed."""

    preset: str
    """The preset trained; the demo's `overrides`, then the user's, go over it."""
    overrides: tuple[str, ...]
    data_name: str
    """What its shards hold, as the console says it."""
    run_dir: str
    """Default run folder."""
    data_dir: str
    """Default folder of its shards."""

    def reuses(self, index: dict[str, Any]) -> bool:
        """Whether shards with this index.json are the demo's own (else they are written anew)."""
        ...

    def write_shards(self, data: Path) -> None:
        """Write the demo's train and val shards into `data`."""
        ...

    def score(self, vae, cfg: Config, data: Path, run_dir: Path) -> Scored:
        """The trained `vae` (cfg: the run's config) on the held-out shards of `data`; examples written in
        run_dir."""
        ...


class ImageDemo:
    """`vae-scale demo`: the `demo` preset on the colour photographs, held-out PSNR against bicubic."""

    preset = "demo"
    overrides: tuple[str, ...] = ()
    data_name = "scikit-image's colour photographs"
    run_dir = "runs/demo"
    data_dir = "runs/demo-data"

    def reuses(self, index: dict[str, Any]) -> bool:
        return index.get("source") == DATA_SOURCE

    def write_shards(self, data: Path) -> None:
        from vae_scale.data.shards import write_shards

        write_shards(DATA_SOURCE, data, size=SHARD_SIZE, val_fraction=0.25, seed=0, progress=False)

    def score(self, vae, cfg: Config, data: Path, run_dir: Path) -> Scored:
        crops = heldout_crops(data, EVAL_RESOLUTION)
        rows, shown = heldout_rows(vae, crops)
        pixel_values = crops[0].numel()
        text = "\n".join(
            [
                f"held-out PSNR on {len(crops)} crops of {EVAL_RESOLUTION} px from unseen photographs "
                f"({pixel_values:,} pixel values each; the VAE decodes its posterior mean"
                f"{weights_used(cfg)}):",
                format_rows(rows, pixel_values),
                verdict(rows),
            ]
        )
        section = report_section(run_dir, rows, shown, pixel_values)
        return Scored(text, "Held-out photographs", section, ("crops", run_dir / "images" / "heldout"))


def weights_used(cfg: Config) -> str:
    """How the demo's weights are named after "the VAE decodes its posterior mean": with the EMA of its
    weights when the run keeps one (what run_demo loads), else nothing."""
    decay = cfg.optim.ema_decay
    return f" with the EMA of its weights, decay {decay:g}" if decay > 0 else ""


def run_demo(
    out: str | None = None,
    data: str | None = None,
    time_guard: float = DEFAULT_TIME_GUARD_S,
    overrides: list[str] | tuple[str, ...] = (),
    demo: Demo | None = None,
) -> int:
    """`vae-scale demo` (demo None: ImageDemo) or `vae-scale demo --video` (demo_video.VideoDemo()): sample
    shards into `data` (reused when present), a run in `out` (a fresh one beside it when it holds
    checkpoints; both default to the demo's folders) stopped after `time_guard` seconds at the latest,
    `overrides` over the demo's own; returns the exit code. Trains and scores on THREADS torch threads, then
    sets the caller's back."""
    demo = ImageDemo() if demo is None else demo
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        run_dir, shards = Path(out or demo.run_dir), Path(data or demo.data_dir)
        return _run_demo(demo, run_dir, shards, time_guard, [*demo.overrides, *overrides])
    finally:  # the caller's own setting back (the demo also runs inside other programs, e.g. the tests)
        torch.set_num_threads(threads)


def _run_demo(demo: Demo, run_dir: Path, data: Path, time_guard: float, overrides: list[str]) -> int:
    """run_demo's work, on the current torch threads."""
    from vae_scale.models.interface import load_checkpoint
    from vae_scale.train.report import write_report
    from vae_scale.train.trainer import train

    index = data / "index.json"
    if not index.is_file() or not demo.reuses(json.loads(index.read_text())):
        print(f"writing shards of {demo.data_name} to {data}/")
        demo.write_shards(data)
    if (run_dir / "checkpoints").exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = run_dir.with_name(f"{run_dir.name}-{stamp}")  # a demo always starts fresh
    cfg = load_config(
        demo.preset,
        [
            f"run.dir={run_dir}",
            f"data.train={data}",
            f"data.val={data}",
            f"train.time_budget_s={time_guard}",
            *overrides,
        ],
    )
    print(
        f"training the {demo.preset} preset ({cfg.train.steps} steps; torch threads "
        f"{torch.get_num_threads()}, cores {os.cpu_count()}) into {run_dir}/"
    )
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    if summary["stopped_by"] not in ("", "time budget"):  # Ctrl-C or another stop signal: no scoring
        print(f"stopped by {summary['stopped_by']} after {summary['step']} steps; checkpoint in {run_dir}")
        return 0

    # the EMA: the average of the last steps' weights, steadier than the last step's (weights_used says so)
    vae = load_checkpoint(run_dir, ema=cfg.optim.ema_decay > 0)  # the preset's family, or model.preset=...'s
    print(f"\ntrained {summary['step']} steps in {wall:.0f} s")
    if summary["step"] < cfg.train.steps:
        why = (
            f"the time guard ({time_guard:g} s)"
            if summary["stopped_by"] == "time budget"
            else summary["stopped_by"] or "an early stop"
        )
        print(
            f"NOTE: {why} stopped training after {summary['step']} of {cfg.train.steps} steps: "
            "these figures are not the reference run's"
        )
    scored = demo.score(vae, cfg, data, run_dir)
    print(scored.text)
    # the run's own grids are found in its images/ folder
    report = write_report(run_dir, cfg.to_yaml(), {}, sections=[(scored.title, scored.section)])
    label, shown = scored.shown
    width = max(len(label), len("checkpoint"))
    print(f"\n{'report':<{width}}  {report}")
    print(f"{label:<{width}}  {shown}/")
    print(f"{'grids':<{width}}  {run_dir / 'images'}/")
    print(
        f"{'checkpoint':<{width}}  {run_dir / 'checkpoints' / 'latest'} -> "
        f"{(run_dir / 'checkpoints' / 'latest').read_text().strip()}"
    )
    return 0
