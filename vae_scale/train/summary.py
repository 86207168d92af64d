"""What a run says on the console beyond its progress bar: a line per evaluation and, at the end, a summary
of the steps and time, the last logged losses, the last evaluation, and where the report, the last
checkpoint and the W&B run are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SUMMARY_LOSSES = ("loss", "rec", "kl", "perceptual", "g_loss", "d_loss", "se_loss", "eq_loss")
"""Logged losses the end-of-run summary repeats, in this order, when the run has them."""
HEADLINE_METRICS = ("psnr", "ssim", "lpips", "rfid", "bpd", "kl", "active_units", "latent_hf_share")
"""Evaluation results the console line and the summary show, in this order (all are in metrics.jsonl)."""


def headline(results: dict[str, float]) -> str:
    """The evaluation results worth a console line: `psnr 27.31, ssim 0.8123, ...`."""
    return ", ".join(f"{k} {results[k]:.4g}" for k in HEADLINE_METRICS if k in results) or "no metrics"


def summary(
    result: dict[str, Any],
    *,
    total_steps: int,
    seconds: float,
    last_eval: tuple[int, dict[str, float]] | None,
    report: Path,
    checkpoint: Path | None,
    wandb_run: Any = None,
) -> list[str]:
    """The end-of-run lines.

    result: the last logged metrics with "step" and "stopped_by" (Trainer.fit's return); last_eval: (step,
    results) of the last evaluation; wandb_run: the W&B run object, online or offline, or None.
    """
    how = f", stopped by {result['stopped_by']}" if result["stopped_by"] else ""
    lines = ["", f"done        step {result['step']} of {total_steps} in {seconds / 60:.1f} min{how}"]
    losses = {k: result[k] for k in SUMMARY_LOSSES if k in result}
    if losses:
        lines.append("losses      " + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
    if last_eval is not None:
        step, results = last_eval
        lines.append(f"eval        step {step}: {headline(results)}")
    lines.append(f"report      {report}")
    if checkpoint is not None:
        lines.append(f"checkpoint  {checkpoint}")
    if wandb_run is not None:
        url = getattr(wandb_run, "url", None)
        where = Path(wandb_run.dir).parent  # wandb/offline-run-*/files -> the run's own folder
        offline = f"offline: upload with `wandb sync {where}`"
        lines.append(f"W&B         {url or offline}")
    return lines
