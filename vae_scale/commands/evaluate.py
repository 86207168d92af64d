"""`vae-scale eval`: the metrics of vae_scale/eval/metrics.py over a dataset, as a table and JSON (its flags:
vae_scale/cli/evaluate.py).

    vae-scale eval --run runs/sd-ft --data '/data/val-{000..003}.tar' --out eval.json
    accelerate launch -m vae_scale eval --run runs/sd-ft --metrics psnr ssim bpd lpips --iw 64

What each metric means, and how the pass stays exact across processes: vae_scale/eval/metrics.py.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

from vae_scale.commands.common import (
    DataOptions,
    InputError,
    LoadedModel,
    Processes,
    check_resolution,
    processes,
    progress,
)
from vae_scale.data.synthetic import SYNTHETIC
from vae_scale.eval.metrics import (
    check_metrics,
    compression,
    evaluate,
    has_likelihood,
    load_eval_nets,
)

log = logging.getLogger(__name__)


def load_criterion(loaded: LoadedModel):
    """The run's likelihood for bits/dim: a VAELoss with the learned scale read from the checkpoint.

    None when loss.recon is l1/l2 (evaluate then fits a Gaussian). The scale is read from the checkpoint's
    loss.safetensors (VAELoss.state_dict names) or accelerate's model.safetensors (`loss_params.0`).
    """
    import dataclasses

    from vae_scale.formats.checkpoint import read_checkpoint_file
    from vae_scale.train.objective import VAELoss

    cfg = loaded.config.loss
    if cfg.recon not in ("logistic", "gaussian"):
        return None
    criterion = VAELoss(
        dataclasses.replace(cfg, perceptual_weight=0.0, disc_weight=0.0),
        image_channels=loaded.config.model.in_channels,
    )
    param = criterion.logvar if cfg.recon == "gaussian" else criterion.log_scale
    name = "logvar" if cfg.recon == "gaussian" else "log_scale"
    ckpt = loaded.checkpoint
    value = None
    if ckpt is not None and (ckpt / "loss.safetensors").is_file():
        value = read_checkpoint_file(ckpt, "loss.safetensors").get(name)
    if value is None and ckpt is not None and (ckpt / "model.safetensors").is_file():
        value = read_checkpoint_file(ckpt, "model.safetensors").get("loss_params.0")
    if value is not None and value.numel() == param.numel():
        value = value.reshape(param.shape)  # the Gaussian logvar was once saved 0-dim
    if value is None or value.shape != param.shape:
        raise InputError(
            f"{loaded.source}: no learned likelihood scale ({name}, loss.recon={cfg.recon}) in "
            "the checkpoint, so bits/dim cannot be computed; leave bpd out of --metrics"
        )
    with torch.no_grad():
        param.copy_(value)
    return criterion


def likelihood_name(criterion) -> str:
    """How bits/dim was measured, for the table and the JSON."""
    if criterion is None or not has_likelihood(criterion):
        return "gaussian, variance fit to the data"
    return {"logistic": "discretised logistic, learned scale", "gaussian": "gaussian, learned variance"}[
        criterion.cfg.recon
    ]


# --------------------------------------------------------------------------------------------------------
# `vae-scale eval`


def format_table(
    results: dict[str, float], likelihood: str = "", latent_channels: int | None = None, iw: int = 0
) -> str:
    """The results as a markdown table (what `vae-scale eval` prints), the likelihood of bits/dim below.

    With the baseline's results (evaluate(..., baseline=True)) the table says how many numbers the latent
    and the bicubic thumbnail keep per image against the pixels, and a line below says which reconstructs
    better.
    """
    rows = [("samples", f"{int(results['samples'])}")]
    base = "latent_values" in results and "psnr_bicubic" in results
    if base:
        pixels = results["pixel_values"]
        for name, key in (("latent", "latent_values"), ("bicubic thumbnail", "bicubic_values")):
            values = results[key]
            rows.append(
                (f"numbers kept per image: {name}", f"{values:,.0f} ({compression(values, pixels)} fewer)")
            )
    fmt = {
        "psnr": ("PSNR (dB)", "{:.2f}"),
        "ssim": ("SSIM", "{:.4f}"),
        "mse": ("MSE ([0, 1] scale)", "{:.5f}"),
        "lpips": ("LPIPS-VGG", "{:.4f}"),
        "rfid": ("rFID", "{:.2f}"),
    }
    for key in ("psnr", "ssim", "mse", "lpips", "rfid"):
        if key in results:
            rows.append((fmt[key][0], fmt[key][1].format(results[key])))
        if key == "psnr" and base:
            rows.append(("PSNR (dB), bicubic thumbnail", f"{results['psnr_bicubic']:.2f}"))
    if "bpd" in results:
        rows.append(("bits/dim (ELBO)", f"{results['bpd']:.4f}"))
    if "bpd_iw" in results:
        label = f"bits/dim (IW bound, K={iw})" if iw else "bits/dim (IW bound)"
        rows.append((label, f"{results['bpd_iw']:.4f}"))
    if "kl" in results:
        rows.append(("KL (nats per image)", f"{results['kl']:.2f}"))
        per = [
            results[k]
            for k in sorted(
                (k for k in results if k.startswith("kl_channel/")), key=lambda k: int(k.split("/")[1])
            )
        ]
        rows.append(("KL per latent channel", " ".join(f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in per)))
    if "active_units" in results:
        of = f" / {latent_channels}" if latent_channels else ""
        rows.append(("active latent channels", f"{int(results['active_units'])}{of}"))
    if "latent_hf_share" in results:
        rows.append(("high-frequency share, latent", f"{results['latent_hf_share']:.4f}"))
        per = _indexed(results, "latent_hf_share/")
        rows.append(("  per latent channel", " ".join(f"{v:.3f}" for v in per)))
        rows.append(("high-frequency share, RGB", f"{results['rgb_hf_share']:.4f}"))
        for side in ("latent", "rgb"):
            curve = _indexed(results, f"spectrum/{side}/")
            rows.append((f"spectrum, {side} (by frequency)", " ".join(f"{v:.3g}" for v in curve)))
    for key in sorted(k for k in results if k.startswith("equivariance/")):
        rows.append((f"equivariance PSNR, {key.split('/', 1)[1]} (dB)", f"{results[key]:.2f}"))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"| {'metric':<{width}} | {'value':>{vwidth}} |", f"|{'-' * (width + 2)}|{'-' * (vwidth + 1)}:|"]
    lines += [f"| {name:<{width}} | {value:>{vwidth}} |" for name, value in rows]
    if likelihood and "bpd" in results:
        lines.append(f"\nbits/dim likelihood: {likelihood}")
    if base and "psnr" in results:
        lines.append("\n" + baseline_verdict(results))
    return "\n".join(lines)


def _indexed(results: dict[str, float], prefix: str) -> list[float]:
    """The values of prefix<i> keys in the order of i."""
    keys = [k for k in results if k.startswith(prefix) and k[len(prefix) :].isdigit()]
    return [results[k] for k in sorted(keys, key=lambda k: int(k[len(prefix) :]))]


def baseline_verdict(results: dict[str, float]) -> str:
    """One line: which has the higher PSNR, the VAE or bicubic through a thumbnail of at least its numbers."""
    vae, bic = results["psnr"], results["psnr_bicubic"]
    latent, thumb, pixels = results["latent_values"], results["bicubic_values"], results["pixel_values"]
    same = (
        f"the same {latent:,.0f} numbers per image"
        if round(thumb) == round(latent)
        else f"{thumb:,.0f} numbers per image against the latent's {latent:,.0f}"
    )
    # the winner's figure first, as the demo's verdict says it
    who = f"the VAE beats bicubic ({vae:.2f}" if vae > bic else f"bicubic beats the VAE ({bic:.2f}"
    return (
        f"baseline: bicubic down to a thumbnail and back up, keeping {same} "
        f"({compression(thumb, pixels)} fewer than the pixels): {who} against {min(vae, bic):.2f} dB)"
    )


def run_metrics(cfg, metrics: list[str] | None, lpips_path: str = "", inception_path: str = "") -> list[str]:
    """The metrics asked for, checked; by default the run's eval.metrics, plus lpips / rfid when their weights
    are given (here or in the run's config)."""
    if metrics:
        return check_metrics(metrics)
    chosen = check_metrics(cfg.eval.metrics)
    if (lpips_path or cfg.loss.lpips_path) and "lpips" not in chosen:
        chosen.append("lpips")
    if (inception_path or cfg.eval.inception_path) and "rfid" not in chosen:
        chosen.append("rfid")
    return chosen


def evaluate_model(
    loaded: LoadedModel,
    data: DataOptions,
    *,
    metrics: list[str] | None = None,
    iw: int | None = None,
    shape: str = "square",
    tiling: Any = False,
    max_batches: int = 0,
    n: int = 0,
    seed: int = 0,
    lpips_path: str = "",
    vgg_path: str = "",
    inception_path: str = "",
    procs: Processes | None = None,
    progress_bar: bool = False,
) -> dict[str, Any]:
    """`vae-scale eval`: the metrics of a loaded VAE over `data`, summed exactly across `procs`.

    metrics None: run_metrics' default; iw None: the run's eval.iw. shape "square": center crops of
    data.resolution; "native": each image at its own size (tiled by `tiling`, a model.Tiling or False).
    n: how many images `synthetic` data has (default 256); seed: the sampled latents' noise (per sample key).
    Returns the report `--out` writes: {"metrics": {...}, "source", "step", "ema", "data", ...}.
    """
    cfg = loaded.config
    if not data.data:
        raise InputError(f"--data is needed: {loaded.source} has no data.{data.split}")
    metrics = run_metrics(cfg, metrics, lpips_path, inception_path)
    iw = cfg.eval.iw if iw is None else iw
    nets = load_eval_nets(
        cfg, metrics, lpips_path=lpips_path, vgg_path=vgg_path, inception_path=inception_path
    )
    criterion = load_criterion(loaded) if "bpd" in metrics or iw else None

    procs = procs or processes()
    vae = loaded.vae.to(procs.device)
    if shape == "native":
        if data.data == SYNTHETIC:
            raise InputError("--shape native: --data synthetic has square images only")
        batches = data.images(
            shape="native", multiple=vae.downsample_factor, rank=procs.rank, world=procs.world
        )
    else:
        check_resolution(vae, data.resolution, "--resolution")
        # synthetic images seeded apart from the training ones (train.seed), as held-out data is
        limit = n if data.data == SYNTHETIC else 0
        batches = data.batches(rank=procs.rank, world=procs.world, limit=limit, seed=cfg.train.seed + 1)
    results = evaluate(
        vae,
        progress(batches, enabled=procs.is_main and progress_bar, desc="eval"),
        metrics=metrics,
        device=procs.device,
        reduce=procs.reduce_sum,
        criterion=criterion,
        max_batches=max_batches,
        iw=iw,
        seed=seed,
        tiled=tiling,
        baseline="psnr" in metrics,
        **nets,
    )
    return {
        "metrics": results,
        "source": loaded.source,
        "step": loaded.step,
        "ema": loaded.ema,
        "data": data.data,
        "shape": shape,
        "resolution": data.resolution if shape == "square" else None,
        "tile": tiling.tile if tiling else None,
        "likelihood": (likelihood_name(criterion) if "bpd" in metrics else "") or None,
        "iw": iw,
        "seed": seed,
        "world_size": procs.world,
    }


def eval_heading(report: dict[str, Any]) -> str:
    """The line above `vae-scale eval`'s table: what was evaluated, on what, how."""
    return (
        f"{report['source']}"
        + (f" (step {report['step']})" if report["step"] is not None else "")
        + (" EMA" if report["ema"] else "")
        + f" on {report['data']}, {report['world_size']} process(es), "
        + ("native size" if report["shape"] == "native" else f"center crops of {report['resolution']} px")
    )


if __name__ == "__main__":  # `python -m vae_scale.commands.evaluate ...` is `vae-scale eval ...`
    from vae_scale.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))
