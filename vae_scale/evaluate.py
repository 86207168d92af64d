"""`vae-scale eval`: the metrics of vae_scale/metrics.py over a dataset, as a table and JSON.

    vae-scale eval --run runs/sd-ft --data '/data/val-{000..003}.tar' --out eval.json
    accelerate launch -m vae_scale eval --run runs/sd-ft --metrics psnr ssim bpd lpips --iw 64

What each metric means, and how the pass stays exact across processes: vae_scale/metrics.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from vae_scale.commands import (
    InputError,
    LoadedModel,
    add_model_args,
    add_tiling_args,
    check_resolution,
    iter_batches,
    load_model,
    processes,
    progress,
    tiling_from_args,
)
from vae_scale.metrics import (
    INCEPTION_FILE,
    METRICS,
    check_metrics,
    compression,
    evaluate,
    has_likelihood,
    load_eval_nets,
)
from vae_scale.outputs import check_writable_file

log = logging.getLogger(__name__)


def load_criterion(loaded: LoadedModel):
    """The run's likelihood for bits/dim: a VAELoss with the learned scale read from the checkpoint.

    None when loss.recon is l1/l2 (evaluate then fits a Gaussian). The scale is read from the checkpoint's
    loss.safetensors (VAELoss.state_dict names) or accelerate's model.safetensors (`loss_params.0`).
    """
    import dataclasses

    from vae_scale.checkpoint import read_checkpoint_file
    from vae_scale.losses import VAELoss

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


def eval_main(argv: list[str]) -> int:
    """`vae-scale eval --run RUN | --ckpt PATH [--data P] [--metrics ...] [--iw K] [--ema] [--out F]`."""
    p = argparse.ArgumentParser(prog="vae-scale eval", description="Evaluate a VAE on held-out shards.")
    add_model_args(p)
    p.add_argument("--data", help="shards (pattern, folder, list) or 'synthetic' (default: data.val)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="which shards of a folder (val)")
    p.add_argument(
        "--metrics",
        nargs="+",
        help=f"any of {' '.join(METRICS)} (default: the run's "
        "eval.metrics, plus lpips / rfid when their weights are given)",
    )
    p.add_argument("--iw", type=int, default=None, help="importance samples for bpd_iw (default eval.iw)")
    p.add_argument("--out", help="write the results as JSON to this new file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--shape",
        default="square",
        choices=("square", "native"),
        help="square: short side resized to --resolution and center-cropped (default); native: each image "
        "at its own size, cropped to a multiple of the downsampling factor, tiled when larger than a tile",
    )
    p.add_argument("--resolution", type=int, help="center-crop size (default: the run's data.resolution)")
    add_tiling_args(p)
    p.add_argument("--batch-size", type=int, help="images per process per batch (default data.batch_size)")
    p.add_argument("--workers", type=int, default=0, help="data loader workers per process (default 0)")
    p.add_argument("--max-batches", type=int, default=0, help="batches per process; 0 is all")
    p.add_argument("--n", type=int, default=0, help="with --data synthetic: how many images (default 256)")
    p.add_argument("--lpips-path", default="", help="folder with LPIPS' vgg.pth and vgg16-397923af.pth")
    p.add_argument("--vgg-path", default="", help="torchvision's vgg16-397923af.pth, if not beside vgg.pth")
    p.add_argument("--inception-path", default="", help=f"TorchScript Inception for rfid ({INCEPTION_FILE})")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled latents (per sample key)")
    args = p.parse_args(argv)
    for flag in ("iw", "max_batches", "n", "workers"):
        if (getattr(args, flag) or 0) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.out:  # before the evaluation, not after it
        check_writable_file(args.out, "--out", overwrite=args.overwrite)

    loaded = load_model(args.run, args.ckpt, args.ema)
    cfg = loaded.config
    data = args.data or cfg.data.val
    if not data:
        raise InputError(f"--data is needed: {loaded.source} has no data.val")
    if args.metrics:
        metrics = check_metrics(args.metrics)
    else:
        metrics = check_metrics(cfg.eval.metrics)
        if (args.lpips_path or cfg.loss.lpips_path) and "lpips" not in metrics:
            metrics.append("lpips")
        if (args.inception_path or cfg.eval.inception_path) and "rfid" not in metrics:
            metrics.append("rfid")
    iw = cfg.eval.iw if args.iw is None else args.iw
    nets = load_eval_nets(
        cfg, metrics, lpips_path=args.lpips_path, vgg_path=args.vgg_path, inception_path=args.inception_path
    )
    criterion = load_criterion(loaded) if "bpd" in metrics or iw else None

    procs = processes()
    vae = loaded.vae.to(procs.device)
    resolution = args.resolution or cfg.data.resolution
    tiling = tiling_from_args(args, vae)
    if args.shape == "native":
        if data == "synthetic":
            raise InputError("--shape native: --data synthetic has square images only")
        from vae_scale.image_reader import ImageReader
        from vae_scale.shard_reader import expand_shards, shard_counts

        urls = expand_shards(data, args.split)
        batches = ImageReader(
            urls,
            shard_counts(urls, scan=False),
            shape="native",
            multiple=vae.downsample_factor,
            workers=args.workers,
            rank=procs.rank,
            world=procs.world,
        )
    else:
        check_resolution(vae, resolution, "--resolution")
        batches = iter_batches(
            data,
            split=args.split,
            resolution=resolution,
            batch_size=args.batch_size or cfg.data.batch_size,
            workers=args.workers,
            rank=procs.rank,
            world=procs.world,
            limit=args.n if data == "synthetic" else 0,
            seed=cfg.train.seed + 1,
        )
    results = evaluate(
        vae,
        progress(batches, enabled=procs.is_main and sys.stderr.isatty(), desc="eval"),
        metrics=metrics,
        device=procs.device,
        reduce=procs.reduce_sum,
        criterion=criterion,
        max_batches=args.max_batches,
        iw=iw,
        seed=args.seed,
        tiled=tiling,
        baseline="psnr" in metrics,
        **nets,
    )
    if procs.is_main:
        how = likelihood_name(criterion) if "bpd" in metrics else ""
        print(
            f"{loaded.source}"
            + (f" (step {loaded.step})" if loaded.step is not None else "")
            + (" EMA" if args.ema else "")
            + f" on {data}, {procs.world} process(es), "
            + ("native size" if args.shape == "native" else f"center crops of {resolution} px")
        )
        print(format_table(results, how, cfg.model.latent_channels, iw))
        if args.out:
            report = {
                "metrics": results,
                "source": loaded.source,
                "step": loaded.step,
                "ema": args.ema,
                "data": data,
                "shape": args.shape,
                "resolution": resolution if args.shape == "square" else None,
                "tile": tiling.tile if tiling else None,
                "likelihood": how or None,
                "iw": iw,
                "seed": args.seed,
                "world_size": procs.world,
            }
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {out}")
    procs.barrier()
    return 0


if __name__ == "__main__":  # `python -m vae_scale.evaluate ...` is `vae-scale eval ...`
    sys.exit(eval_main(sys.argv[1:]))
