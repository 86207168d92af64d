"""`vae-scale demo --video`: the image demo's job on clips, in minutes on a CPU, nothing downloaded.

1. writes clip shards of camera-motion clips (`vae-scale shards sample-video`): CLIPS_PER_IMAGE pans and
   zooms over each of scikit-image's eight colour photographs, FRAMES frames of SIZE px, the clips of two
   photographs held out (val);
2. trains the `wan-tiny-video` preset (5-frame clips, 32 px crops, a quarter of the batches images) for
   STEPS steps, through the image demo's run (commands/demo.py: its threads, time guard and report);
3. scores the EMA of the weights on every held-out clip, whole (FRAMES frames of SIZE px), with the metrics
   pass of `vae-scale eval` (vae_scale.eval.metrics.evaluate): per-frame PSNR, flicker and flicker PSNR,
   and the same of its trilinear baseline, down and up through a thumbnail clip of at least the latent's
   numbers (baseline=True); the table says how many numbers each keeps per clip, the verdict which wins on
   each figure;
4. adds the table and strips of a few held-out clips (input, VAE, trilinear; frame by frame) to the run's
   report.html.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae_scale.commands.common import DataOptions
from vae_scale.commands.demo import Scored, html_table, markdown_table, weights_used
from vae_scale.config import Config
from vae_scale.eval.metrics import compression, equal_values_clip_size, evaluate, psnr, trilinear_round_trip
from vae_scale.eval.registry import fold_frames
from vae_scale.eval.temporal import flicker_per_clip

PRESET = "wan-tiny-video"
STEPS = 400
"""Training steps: a few minutes on one thread of a 2-core CPU (docs/video.md, "The video demo")."""
FRAMES = 9
"""Frames of a stored clip and of a held-out clip as scored. Training takes the preset's 5 (data.frames)
from a random start; scoring takes all 9 (3 latent frames, 8 frame differences for flicker): a causal VAE
runs a clip of any 1 + 4k frames."""
SIZE = 48
"""Side of the square clips, and of the held-out clips as scored (whole frames). At 48 px the f8 latent of
a 9-frame clip keeps 3 x 6 x 6 x 16 = 1,728 numbers and the trilinear thumbnail clip with at least as many
keeps 3 x 14 x 14 x 3 = 1,764 (2% more); at 32 px it would keep 17% more, at 64 px 6% more."""
CLIPS_PER_IMAGE = 8
"""Camera-motion clips per photograph: 48 to train on, 16 held out."""
VAL_FRACTION = 0.25
"""Photographs held out: 2 of 8, as in the image demo."""
REPORT_CLIPS = 4
"""Held-out clips shown as strips in report.html."""


@dataclass
class ClipRow:
    """One line of the video demo's table: a reconstruction, what it keeps per clip, and its held-out
    figures (means over the held-out clips)."""

    name: str
    kept: str  # what the numbers are, e.g. "3 x 6 x 6 x 16 latent"
    values: int  # numbers kept per clip
    psnr: float  # dB, per frame
    flicker: float  # frame-difference mean absolute error, [0, 1] scale; lower is better
    flicker_psnr: float  # dB
    equal: bool = False  # the baseline the verdict compares with


HEAD = (
    "reconstruction",
    "keeps per clip",
    "numbers",
    "vs pixels",
    "PSNR per frame",
    "flicker",
    "flicker PSNR",
)


def _t_h_w_c(t: int, h: int, w: int, c: int) -> str:
    return f"{t} x {h} x {w} x {c}"


def clip_rows(vae, results: dict[str, float], clip: tuple[int, int, int, int]) -> list[ClipRow]:
    """The table's rows from the metrics pass's `results` (evaluate with psnr, flicker and baseline=True) on
    clips of shape clip = (C, T, H, W): the VAE's and the trilinear baseline's."""
    c, t, h, w = clip
    z_c, z_t, z_h, z_w = vae.latent_shape(h, w, t)
    thumb = equal_values_clip_size(z_c * z_t * z_h * z_w, t, z_t, h, w, c)
    f, ft = vae.downsample_factor, vae.temporal_downsample_factor
    return [
        ClipRow(
            f"VAE (f{f}, {ft}x in time, {z_c} latent channels)",
            f"{_t_h_w_c(z_t, z_h, z_w, z_c)} latent",
            round(results["latent_values"]),
            results["psnr"],
            results["flicker"],
            results["flicker_psnr"],
        ),
        ClipRow(
            "trilinear, equal values",
            f"{_t_h_w_c(*thumb, c)} thumbnail clip",
            round(results["trilinear_values"]),
            results["psnr_trilinear"],
            results["flicker_trilinear"],
            results["flicker_psnr_trilinear"],
            equal=True,
        ),
    ]


def row_cells(rows: list[ClipRow], pixel_values: int) -> list[tuple[str, ...]]:
    """The cells of HEAD's columns for `rows`; pixel_values: numbers in a clip."""
    return [
        (
            r.name,
            r.kept,
            f"{r.values:,}",
            f"{compression(r.values, pixel_values)} fewer",
            f"{r.psnr:.2f} dB",
            f"{r.flicker:.4f}",
            f"{r.flicker_psnr:.2f} dB",
        )
        for r in rows
    ]


def format_clip_rows(rows: list[ClipRow], pixel_values: int) -> str:
    """The rows as a markdown table."""
    return markdown_table(HEAD, row_cells(rows, pixel_values), (False, False, True, True, True, True, True))


def clip_verdict(rows: list[ClipRow]) -> str:
    """One line: whether the VAE (rows[0]) or the trilinear baseline at equal values wins on per-frame PSNR
    and on flicker (lower is better), and how many numbers each keeps. A tie is no win."""
    vae, base = rows[0], next(r for r in rows if r.equal)
    numbers = (
        f"both keep {vae.values:,} numbers per clip"
        if base.values == vae.values
        else f"the thumbnail clip keeps {base.values:,} numbers per clip, the latent {vae.values:,}"
    )
    wins = vae.psnr > base.psnr
    on_psnr = (
        f"{'the VAE beats trilinear' if wins else 'trilinear beats the VAE'} at equal values on per-frame "
        f"PSNR, {max(vae.psnr, base.psnr):.2f} against {min(vae.psnr, base.psnr):.2f} dB"
    )
    who = "the VAE" if vae.flicker < base.flicker else "trilinear"
    on_flicker = (
        f"{'and' if (who == 'the VAE') == wins else 'but'} {who} flickers less, "
        f"{min(vae.flicker, base.flicker):.4f} against {max(vae.flicker, base.flicker):.4f}"
    )
    return f"verdict: {on_psnr}, {on_flicker} ({numbers})"


def still_flicker(clips: torch.Tensor) -> tuple[float, float]:
    """(flicker, flicker_psnr) of clips that do not move, each of `clips` (n, 3, T, H, W) its first frame
    held, against `clips`: the clips' own motion, which flicker alone does not show (a reconstruction that
    never changes, a flat colour or a still frame, scores exactly this)."""
    held = clips[:, :, :1].expand_as(clips).contiguous()
    mae, db = flicker_per_clip(held, clips)
    return mae.mean().item(), db.mean().item()


@torch.no_grad()
def write_strips(
    vae, clips: torch.Tensor, thumb: tuple[int, int, int], out: Path
) -> list[tuple[str, float, float, float, float]]:
    """One PNG strip per clip of `clips` (n, 3, T, H, W) in out/: the input's frames in a row, over the VAE's
    (posterior mean) and the trilinear round trip's through a `thumb` (T', h, w) thumbnail clip. Returns
    per strip (file name, VAE PSNR, VAE flicker, trilinear PSNR, trilinear flicker)."""
    from vae_scale.train.monitor import image_grid, save_png

    out.mkdir(parents=True, exist_ok=True)
    x = clips.to(next(vae.parameters()).device)
    x_hat = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    base = trilinear_round_trip(x, thumb)
    shown = []
    for i in range(len(x)):
        name = f"{i:02d}.png"
        parts = [y[i : i + 1] for y in (x, x_hat, base)]
        save_png(image_grid([fold_frames(p).cpu() for p in parts]), out / name)
        scores = []
        for y in parts[1:]:
            scores += [psnr(fold_frames(y), fold_frames(parts[0])).mean().item()]
            scores += [flicker_per_clip(y, parts[0])[0].item()]
        shown.append((name, *scores))
    return shown


class VideoDemo:
    """`vae-scale demo --video`: wan-tiny on camera-motion clips, per-frame PSNR and flicker against
    trilinear at equal numbers."""

    preset = PRESET
    # the preset's EMA decay (0.995: about the last 200 steps) lags far behind a run this short; 0.98 averages
    # about the last 50 steps, as the families' 300-step runs in README's table do
    overrides: tuple[str, ...] = (f"train.steps={STEPS}", "optim.ema_decay=0.98")
    data_name = "camera-motion clips of scikit-image's colour photographs"
    run_dir = "runs/demo-video"
    data_dir = "runs/demo-video-data"

    def reuses(self, index: dict[str, Any]) -> bool:
        from vae_scale.data.video import SAMPLE_VIDEO

        options = index.get("options", {})
        want = {
            "frames": FRAMES,
            "size": SIZE,
            "clips_per_image": CLIPS_PER_IMAGE,
            "val_fraction": VAL_FRACTION,
        }
        return index.get("source") == SAMPLE_VIDEO and all(options.get(k) == v for k, v in want.items())

    def write_shards(self, data: Path) -> None:
        from vae_scale.data.video import SAMPLE_VIDEO, write_clip_shards

        write_clip_shards(
            SAMPLE_VIDEO,
            data,
            frames=FRAMES,
            size=SIZE,
            clips_per_image=CLIPS_PER_IMAGE,
            val_fraction=VAL_FRACTION,
            seed=0,
            workers=1,
            progress=False,
        )

    def score(self, vae, cfg: Config, data: Path, run_dir: Path) -> Scored:
        device = next(vae.parameters()).device
        held_out = DataOptions(
            str(data), "val", resolution=SIZE, batch_size=8, workers=0, frames=FRAMES, frame_stride=1
        )
        batches = held_out.clip_batches()
        results = evaluate(vae, batches, metrics=["psnr", "flicker"], device=device, baseline=True)
        clips = torch.cat([b["clips"][: b["count"]] for b in held_out.clip_batches()])  # (n, 3, T, H, W)
        c, t, h, w = clips.shape[1:]
        still = still_flicker(clips)
        scale = (
            f"for scale: a clip that does not move (its first frame held) scores flicker {still[0]:.4f} "
            f"and flicker PSNR {still[1]:.2f} dB against these clips, the size of their own motion; a "
            "reconstruction that misses the motion scores about that, however good its frames"
        )
        rows = clip_rows(vae, results, (c, t, h, w))
        pixel_values = c * t * h * w
        text = "\n".join(
            [
                f"held-out clips: {int(results['samples'])} clips of {t} frames at {h} px from unseen "
                f"photographs ({pixel_values:,} pixel values each; the VAE decodes its posterior mean"
                f"{weights_used(cfg)}); per-frame PSNR and flicker (the frame differences' mean absolute "
                "error, lower is better) from the metrics pass of `vae-scale eval`:",
                format_clip_rows(rows, pixel_values),
                clip_verdict(rows),
                scale,
            ]
        )
        out = run_dir / "images" / "heldout"
        z_c, z_t, z_h, z_w = vae.latent_shape(h, w, t)
        thumb = equal_values_clip_size(z_c * z_t * z_h * z_w, t, z_t, h, w, c)
        strips = write_strips(vae, clips[:REPORT_CLIPS], thumb, out)
        width = 2 * (t * (w + 2) + 2)  # twice the strip's own width (image_grid pads 2 px)
        cells = "".join(
            f'<tr><td><img src="images/heldout/{name}" style="image-rendering:pixelated;width:{width}px">'
            f"</td><td>VAE {vp:.2f} dB, flicker {vf:.4f}<br>trilinear {bp:.2f} dB, flicker {bf:.4f}</td></tr>"
            for name, vp, vf, bp, bf in strips
        )
        section = (
            f"{html_table(HEAD, row_cells(rows, pixel_values))}<p>{html.escape(clip_verdict(rows))}</p>"
            f"<p>{html.escape(scale)}</p>"
            "<p>Each strip: the input's frames, the VAE's and trilinear's (top to bottom).</p>"
            f"<table>{cells}</table>"
        )
        return Scored(text, "Held-out clips", section, ("strips", out))


__all__ = ["ClipRow", "VideoDemo", "clip_rows", "clip_verdict", "format_clip_rows", "still_flicker"]
