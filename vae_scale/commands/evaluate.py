"""`vae-scale eval`: the metrics of vae_scale/eval/metrics.py over a dataset, as a table and JSON (its flags:
vae_scale/cli/evaluate.py).

    vae-scale eval --run runs/sd-ft --data '/data/val-{000..003}.tar' --out eval.json
    accelerate launch -m vae_scale eval --run runs/sd-ft --metrics psnr ssim bpd lpips --iw 64
    vae-scale eval --run runs/sd-ft --against sd-vae-ft-mse/ --data ...   # + latent_drift against it

What each metric means, and how the pass stays exact across processes: vae_scale/eval/metrics.py.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from vae_scale.commands.common import (
    DataOptions,
    InputError,
    LoadedModel,
    Processes,
    check_resolution,
    load_model,
    processes,
    progress,
)
from vae_scale.data.shard_reader import DataError, count_samples, expand_shards
from vae_scale.data.synthetic import SYNTHETIC
from vae_scale.eval.metrics import (
    DriftReference,
    RFIDReference,
    check_metrics,
    evaluate,
    fvd_protocol,
    has_likelihood,
    load_eval_nets,
)
from vae_scale.eval.reconstruction import baseline_verdict  # noqa: F401  (callers import it from here)
from vae_scale.eval.registry import METRICS as REGISTERED
from vae_scale.eval.registry import TableInfo, by_note_position, by_table_position
from vae_scale.eval.rfid import default_cache, inception_protocol

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
    results: dict[str, float],
    likelihood: str = "",
    latent_channels: int | None = None,
    iw: int = 0,
    protocols: dict[str, str] | None = None,
) -> str:
    """The results as a markdown table (what `vae-scale eval` prints): each registered metric's rows, in
    their table order, then their lines below it (the likelihood of bits/dim, rFID's protocol (protocols:
    metric name -> one line), the bicubic baseline's verdict)."""
    info = TableInfo(likelihood, latent_channels, iw, dict(protocols or {}))
    rows = [("samples", f"{int(results['samples'])}")]
    for cls in by_table_position():
        rows += cls.rows(results, info)
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"| {'metric':<{width}} | {'value':>{vwidth}} |", f"|{'-' * (width + 2)}|{'-' * (vwidth + 1)}:|"]
    lines += [f"| {name:<{width}} | {value:>{vwidth}} |" for name, value in rows]
    for cls in by_note_position():
        lines += ["\n" + note for note in cls.notes(results, info)]
    return "\n".join(lines)


def run_metrics(
    cfg,
    metrics: list[str] | None,
    lpips_path: str = "",
    inception_path: str = "",
    *,
    clips: bool = False,
    i3d_path: str = "",
) -> list[str]:
    """The metrics asked for, checked; by default the run's eval.metrics, plus lpips / rfid when their weights
    are given (here or in the run's config).

    clips: the data are clips. Metrics asked for that do not apply to them are an InputError naming them; by
    default those of eval.metrics are left out (logged) and flicker is added, and fvd when an I3D file is
    given (here or as eval.i3d_path); rfid is not (it is refused for clips)."""
    if metrics:
        chosen = check_metrics(metrics)
        refused = [m for m in chosen if REGISTERED[m].refuses_clips] if clips else []
        refused += [m for m in chosen if REGISTERED[m].refuses_images] if not clips else []
        if refused:
            kind = "clips" if clips else "images"
            why = REGISTERED[refused[0]].refuses_clips or REGISTERED[refused[0]].refuses_images
            raise InputError(
                f"--metrics {' '.join(refused)}: does not apply to {kind} ({refused[0]}: {why})"
                + ("" if clips else "; clip shards need --frames N (or the run's data.frames)")
            )
        return chosen
    chosen = check_metrics(cfg.eval.metrics)
    if (lpips_path or cfg.loss.lpips_path) and "lpips" not in chosen:
        chosen.append("lpips")
    if clips:
        left_out = [m for m in chosen if REGISTERED[m].refuses_clips]
        if left_out:
            log.info("left out for clips (image metrics): %s", " ".join(left_out))
        chosen = [m for m in chosen if m not in left_out]
        chosen += [m for m in ("flicker",) if m not in chosen]
        if (i3d_path or cfg.eval.i3d_path) and "fvd" not in chosen:
            chosen.append("fvd")
        return chosen
    chosen = [m for m in chosen if not REGISTERED[m].refuses_images]
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
    i3d_path: str = "",
    rfid_cache: str | None = None,
    consistency_tile: int | None = None,
    procs: Processes | None = None,
    progress_bar: bool = False,
    against: str | None = None,
) -> dict[str, Any]:
    """`vae-scale eval`: the metrics of a loaded VAE over `data`, summed exactly across `procs`.

    metrics None: run_metrics' default; iw None: the run's eval.iw. shape "square": center crops of
    data.resolution; "native": each image at its own size (tiled by `tiling`, a model.Tiling or False).
    n: how many images `synthetic` data has (default 256); seed: the sampled latents' noise (per sample key).
    rfid_cache, consistency_tile: eval.rfid_cache and eval.consistency_tile unless given.
    against: a run folder, checkpoint or diffusers folder whose encoder latent_drift compares with (asked
    for by giving it); without it, a run's own eval.metrics' latent_drift compares with its model.init_from.
    Clips: data.frames > 1 reads the shards as clips (per-frame metrics, flicker, the trilinear baseline with
    psnr, fvd with an I3D file: i3d_path or eval.i3d_path).
    Returns the report `--out` writes: {"metrics": {...}, "source", "step", "ema", "data", ...}, with
    "rfid_protocol" / "fvd_protocol" (one line) when rfid / fvd was measured, "against" when latent_drift was.
    """
    cfg = loaded.config
    eval_cfg = dataclasses.replace(
        cfg.eval,
        rfid_cache=cfg.eval.rfid_cache if rfid_cache is None else rfid_cache,
        consistency_tile=cfg.eval.consistency_tile if consistency_tile is None else consistency_tile,
    )
    if not data.data:
        raise InputError(f"--data is needed: {loaded.source} has no data.{data.split}")
    asked = bool(metrics)
    if data.clips and (data.data == SYNTHETIC or shape == "native"):
        what = (
            "--data synthetic has images only" if data.data == SYNTHETIC else "--shape native is for images"
        )
        raise InputError(f"--frames {data.frames}: {what}; clips are read from clip shards as center crops")
    metrics = run_metrics(cfg, metrics, lpips_path, inception_path, clips=data.clips, i3d_path=i3d_path)
    metrics, against = drift_reference_path(cfg, metrics, against, asked)
    iw = cfg.eval.iw if iw is None else iw
    nets = load_eval_nets(
        cfg,
        metrics,
        lpips_path=lpips_path,
        vgg_path=vgg_path,
        inception_path=inception_path,
        i3d_path=i3d_path,
    )
    criterion = load_criterion(loaded) if "bpd" in metrics or iw else None

    procs = procs or processes()
    vae = loaded.vae.to(procs.device)
    if data.clips:
        check_resolution(vae, data.resolution, "--resolution")
        batches = data.clip_batches(rank=procs.rank, world=procs.world)
    elif shape == "native":
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
    inputs: dict[str, Any] = {}
    if "rfid" in metrics:
        synthetic_seed = cfg.train.seed + 1 if data.data == SYNTHETIC else None
        inputs["rfid"] = rfid_reference(
            data, nets["inception"], shape, n, max_batches, eval_cfg.rfid_cache, synthetic_seed, procs
        )
    if against is not None:
        ref = load_model(ckpt=against)
        inputs["latent_drift"] = DriftReference(ref.vae, ref.source)
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
        config=eval_cfg,
        inputs=inputs,
        **nets,
    )
    reference = inputs.get("rfid")
    if reference is not None:
        declared, evaluated = reference.protocol["images"], int(results["samples"])
        if declared is not None and declared != evaluated:  # some images skipped: not the declared set
            reference.cache = None
            reference.notes.append(f"not cached: the data declares {declared} images, {evaluated} evaluated")
        reference.protocol["images"] = evaluated
        if procs.is_main and reference.save():
            log.info("rfid reference statistics cached in %s", reference.cache)
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
        "frames": data.frames if data.clips else None,
        "frame_stride": data.frame_stride if data.clips else None,
        **({"rfid_protocol": reference.describe()} if reference is not None else {}),
        **(
            {
                "fvd_protocol": fvd_protocol(
                    nets["i3d"],
                    data=data.data,
                    frames=data.frames,
                    stride=data.frame_stride,
                    clips=int(results["samples"]),
                )
            }
            if "fvd" in metrics
            else {}
        ),
        **({"against": inputs["latent_drift"].source} if "latent_drift" in inputs else {}),
    }


def drift_reference_path(
    cfg, metrics: list[str], against: str | None, asked: bool
) -> tuple[list[str], str | None]:
    """(metrics, the reference of latent_drift or None): --against adds latent_drift; latent_drift asked
    for without it is an InputError; from a run's own eval.metrics it compares with the run's
    model.init_from, and is left out (logged) when that is not on disk."""
    if against is not None:
        if not Path(against).exists():
            raise InputError(f"--against {against}: no such run, checkpoint or diffusers folder")
        return (metrics if "latent_drift" in metrics else [*metrics, "latent_drift"]), against
    if "latent_drift" not in metrics:
        return metrics, None
    init = cfg.model.init_from
    if asked:
        raise InputError(
            "latent_drift compares with a reference encoder: give --against RUN_OR_DIR (a run, a checkpoint "
            "or a diffusers folder)"
        )
    if init and Path(init).exists():
        return metrics, init
    log.info("latent_drift left out: the run's model.init_from is not on disk; give --against RUN_OR_DIR")
    return [m for m in metrics if m != "latent_drift"], None


def rfid_reference(
    data: DataOptions,
    inception,
    shape: str,
    n: int,
    max_batches: int,
    cache: str,
    synthetic_seed: int | None,
    procs: Processes,
) -> RFIDReference:
    """rFID's reference for this evaluation: its protocol and, when cached under it, its statistics.

    The image count is part of the protocol, so statistics are cached only when it is known before the
    pass: synthetic data (n images, 256 by default as iter_batches makes) and local shards, evaluated whole
    (no --max-batches). cache: a folder, "" for the default (rfid.default_cache), "off" for none.
    Cached statistics are used only when every process found them (see below).
    """
    images: int | None = None
    if max_batches == 0 and data.data == SYNTHETIC:
        images = n or 256
    elif max_batches == 0:
        images = declared_count(data)
    name = data.data if synthetic_seed is None else f"{data.data} (seed {synthetic_seed})"
    protocol = {
        "data": name,
        "split": data.split,
        "crop": "center" if shape == "square" else "none (native size)",
        "resize": f"shorter side to {data.resolution} px" if shape == "square" else "none",
        "images": images,
        "features": inception_protocol(inception),
    }
    folder = None if cache == "off" else Path(cache).expanduser() if cache else default_cache()
    reference = RFIDReference.open(protocol, folder)
    if max_batches:
        reference.notes[:] = ["not cached: --max-batches evaluates part of the data"]
    # Every process must keep the same sums for the one reduce, so a file that some processes do not see
    # (nodes that do not share the cache's file system) is used by none.
    found = procs.gather(reference.mu is not None)
    if not all(found):
        reference.mu = reference.cov = None
        reference.source = "computed"
        if any(found):
            reference.notes.append("the cached file is not on every process")
    return reference


def declared_count(data: DataOptions) -> int | None:
    """The samples in the shards (index.json, else their members counted), or None for remote shards."""
    try:
        return count_samples(expand_shards(data.data, data.split))
    except (DataError, OSError):  # the pass itself reports unreadable data; here it only means "not known"
        return None


def eval_heading(report: dict[str, Any]) -> str:
    """The line above `vae-scale eval`'s table: what was evaluated, on what, how."""
    return (
        f"{report['source']}"
        + (f" (step {report['step']})" if report["step"] is not None else "")
        + (" EMA" if report["ema"] else "")
        + f" on {report['data']}, {report['world_size']} process(es), "
        + ("native size" if report["shape"] == "native" else f"center crops of {report['resolution']} px")
        + (
            f", clips of {report['frames']} frames at stride {report['frame_stride']} (per-frame figures)"
            if report.get("frames")
            else ""
        )
    )


if __name__ == "__main__":  # `python -m vae_scale.commands.evaluate ...` is `vae-scale eval ...`
    from vae_scale.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))
