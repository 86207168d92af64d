"""The diffusability regularisers on the demo data: latent high-frequency share, equivariance and PSNR.

    python -m benchmarks.diffusability                      # docs/finetune.md's table (~20 min, 2 CPU cores)
    python -m benchmarks.diffusability --pretrain-steps 200 --steps 100     # a quick look

A small f8 VAE with 16 latent channels is first trained on scikit-image's colour photographs (the `demo`
preset's data, optimiser and schedule; f8 from a fourth level). Then, from that checkpoint and with the same
seed and steps, it is fine-tuned three ways (the papers' use: a short fine-tune of a trained autoencoder):
without a regulariser, with scale equivariance and with EQ-VAE. Each is evaluated on every 64 px crop of the
held-out photographs with `vae_scale.eval.metrics.evaluate` (psnr, spectrum, equivariance): the latent's and
the images' high-frequency share, PSNR of decode(T(z)) against T(x) per transform family, and PSNR.

Writes benchmarks/results/diffusability-<device>-<date>.json (every metric of every variant, the commands'
config overrides, versions) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS_DIR, device_name, device_slug, environment
from vae_scale.commands.demo import DATA_SOURCE, EVAL_RESOLUTION, SHARD_SIZE, heldout_crops
from vae_scale.config import load_config
from vae_scale.eval.metrics import evaluate
from vae_scale.models.sd import VAE
from vae_scale.train.trainer import train

MODEL = [
    "model.block_out_channels=[16,32,64,64]",  # the demo's levels plus a fourth: f8
    "model.latent_channels=16",
    "model.norm_num_groups=8",
    "model.layers_per_block=1",
    "model.mid_block_attention=false",
]
COMMON = ["log.every=50", "log.images_every=0", "checkpoint.every=0", "data.workers=1"]
VARIANTS = {
    "none": [],
    "scale equivariance": ["loss.se_weight=0.5", "loss.se_prob=1", "loss.se_factors=[2,4]"],
    "EQ-VAE": ["loss.eq_weight=0.5", "loss.eq_prob=0.5"],
}
"""Fine-tuning overrides of each variant (the rest is shared)."""
FAMILIES = ("down2", "down4", "scale", "rotate", "flip")
COLUMNS = ("latent HF share", "RGB HF share", *(f"equiv. PSNR {f} (dB)" for f in FAMILIES), "PSNR (dB)")
"""Equivariance is a PSNR (higher: more equivariant): decode(T(encode(x))) against T(x), per family."""


def write_data(data: Path) -> None:
    """The demo's shards (a quarter of the photographs held out), unless they are already there."""
    from vae_scale.data.shards import write_shards

    index = data / "index.json"
    if not index.is_file() or json.loads(index.read_text()).get("source") != DATA_SOURCE:
        write_shards(DATA_SOURCE, data, size=SHARD_SIZE, val_fraction=0.25, seed=0, progress=False)


def measure(run_dir: Path, crops: torch.Tensor, batch: int = 20) -> dict[str, float]:
    """psnr, spectrum and equivariance of a run's newest checkpoint on the held-out crops."""
    vae = VAE.from_checkpoint(run_dir)
    batches = [
        {"images": crops[i : i + batch], "count": len(crops[i : i + batch])}
        for i in range(0, len(crops), batch)
    ]
    return evaluate(vae, batches, metrics=["psnr", "spectrum", "equivariance"], device="cpu")


def row(name: str, m: dict[str, float]) -> dict[str, str]:
    """One table row: HF shares to 3 decimals, PSNRs to 2."""
    out = {
        "regulariser": name,
        "latent HF share": f"{m['latent_hf_share']:.3f}",
        "RGB HF share": f"{m['rgb_hf_share']:.3f}",
    }
    for family in FAMILIES:
        out[f"equiv. PSNR {family} (dB)"] = f"{m[f'equivariance/{family}']:.2f}"
    out["PSNR (dB)"] = f"{m['psnr']:.2f}"
    return out


def markdown(rows: list[dict[str, str]]) -> str:
    cols = ["regulariser", *COLUMNS]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if c == "regulariser" else "---:" for c in cols) + "|",
    ]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.diffusability", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data", default="runs/demo-data", help="the demo shards (written when missing)")
    p.add_argument("--runs", default="runs/diffusability", help="where the runs go (one folder per variant)")
    p.add_argument("--pretrain-steps", type=int, default=1000, help="steps of the shared starting point")
    p.add_argument("--steps", type=int, default=400, help="fine-tuning steps of every variant")
    p.add_argument("--resolution", type=int, default=64, help="training crop size (f8: 8 x 8 latents at 64)")
    p.add_argument("--batch", type=int, default=4, help="training batch")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (constant)")
    p.add_argument(
        "--variant",
        action="append",
        metavar="NAME[:key=value,...]",
        help=f"a fine-tune to run (repeatable): one of {', '.join(VARIANTS)}, or a new name with its loss "
        "overrides, e.g. 'se 0.25:loss.se_weight=0.25' (default: the three above)",
    )
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    p.add_argument("--tag", default="", help="appended to the result files' name (e.g. a sweep's name)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    variants: dict[str, list[str]] = {}
    for spec in args.variant or list(VARIANTS):
        name, _, overrides = spec.partition(":")
        if not overrides and name not in VARIANTS:
            p.error(f"variant {name!r} is not one of {', '.join(VARIANTS)} and gives no overrides")
        variants[name] = [o for o in overrides.split(",") if o] if overrides else VARIANTS[name]

    data, runs = Path(args.data), Path(args.runs)
    write_data(data)
    shared = [
        *MODEL,
        *COMMON,
        f"data.train={data}",
        f"data.resolution={args.resolution}",
        f"data.batch_size={args.batch}",
        *args.overrides,
    ]
    pretrain = [*shared, f"run.dir={runs / 'pretrain'}", f"train.steps={args.pretrain_steps}"]
    t0 = time.time()
    train(load_config("demo", pretrain))  # resumes, so a finished pretraining is reused as it is
    timings = {"pretrain": time.time() - t0}
    init = sorted((runs / "pretrain" / "checkpoints").glob("step-*"))[-1] / "vae.safetensors"
    finetune = [
        *shared,
        f"model.init_from={init}",
        f"train.steps={args.steps}",
        f"optim.lr={args.lr}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
    ]
    crops = heldout_crops(data, EVAL_RESOLUTION)
    results: dict[str, dict] = {
        "pretrained": {"metrics": measure(runs / "pretrain", crops), "overrides": pretrain}
    }
    for name, loss in variants.items():
        run_dir = runs / re.sub(r"[^a-zA-Z0-9.]+", "-", name)
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh fine-tune, never a resume of an older one
        overrides = [*finetune, *loss, f"run.dir={run_dir}"]
        t0 = time.time()
        train(load_config("demo", overrides))
        timings[name] = time.time() - t0
        results[name] = {"metrics": measure(run_dir, crops), "overrides": overrides}
        print(f"{name}: {timings[name]:.0f} s", flush=True)

    table = markdown([row(n, r["metrics"]) for n, r in results.items()])
    env = environment("cpu")
    stamp = env["date"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{re.sub(r'[^a-zA-Z0-9]+', '-', args.tag)}" if args.tag else ""
    stem = out / f"diffusability-{device_slug(device_name('cpu'))}-{stamp}{tag}"
    command = ["python", "-m", "benchmarks.diffusability", *(sys.argv[1:] if argv is None else argv)]
    report = {
        "command": command,
        "results": results,
        "timings_s": timings,
        "crops": len(crops),
        "environment": env,
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(
        f"`{shlex.join(command)}`\n\n{env['device']}, torch {env['torch']}, vae-scale {env['commit']}, "
        f"{stamp}, load {env['load_1m']}; held-out: {len(crops)} crops of {EVAL_RESOLUTION} px. "
        f"Equivariance: PSNR of decode(T(encode(x))) against T(x), higher is better.\n\n{table}\n"
    )
    print(table)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
