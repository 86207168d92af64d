"""The latent diffusion probe on fine-tunes with and without the diffusability terms, on the demo photographs.

    make demo                                                  # runs/demo and runs/demo-data, the start
    python -m benchmarks.probe_recipes                         # docs/diffusability.md's table (80 min)
    python -m benchmarks.probe_recipes --ft-steps 50 --probe-steps 100 --seeds 1 --work /tmp/pr --out /tmp/pr

From one trained VAE (--start, `make demo`'s), with the same data, seed, batch and steps, three fine-tunes,
each once per --ft-seeds: the demo's objective unchanged (baseline), with scale equivariance (the
`diffusable-finetune` recipe's keys) and with EQ-VAE (the key its docs give, the recipe's transforms).
VA-VAE's alignment term is not among them: it needs a pretrained DINOv2 file, and one with random weights
would align the latent with noise.

Every stage is a vae-scale command, printed, logged under --work/logs and timed (wall and CPU time of the
command and its children, the load average before and after); at most --jobs run at once, each with
OMP_NUM_THREADS=1. A stage whose output is already in --work is not run again (delete --work to redo it).

1. crops: every 64 px crop at a stride of 32 px of the demo's train and val photographs (the probe needs more
   latents than 8 photographs give; docs/diffusability.md), as PNG files, then `vae-scale shards` of each.
2. `vae-scale train`: each fine-tune (model.init_from=--start), for each --ft-seeds.
3. `vae-scale eval` of the start and each fine-tune on the held-out crops: PSNR, SSIM, the latent's
   high-frequency share and the equivariance PSNRs (docs/finetune.md's diagnostics).
4. `vae-scale encode` of the start and each fine-tune: posterior means of the train and held-out crops.
5. `vae-scale probe`: one command per autoencoder, all with the same budget flags (docs/diffusability.md's:
   1000 steps, batch 64, width 128, depth 4, heads 4, lr 3e-4), merged into one table (probe.json, probe.md,
   probe.svg under --work/probe).

Writes benchmarks/results/probe_recipes-<device>-<date>.json (every command with its timing, every eval
metric, the merged probe report, the machine's load) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.harness import RESULTS_DIR, LoadSampler, device_name, device_slug, environment, load_average
from vae_scale.commands.probe_report import write_report

VARIANTS = {
    "baseline": [],
    "scale-equivariance": ["loss.se_weight=0.25", "loss.se_prob=1.0", "loss.se_factors=[2,4]"],
    "EQ-VAE": ["loss.eq_weight=0.5", "loss.eq_prob=0.5", "loss.eq_transforms=[scale,rotate]"],
}
"""Each fine-tune's loss keys: diffusable-finetune.yaml's scale equivariance; EQ-VAE as docs/finetune.md
turns it on (eq_weight 0.5) with the recipe's probability and transforms. The rest is the demo's objective."""
CROP, STRIDE = 64, 32
EVAL_METRICS = ["psnr", "ssim", "spectrum", "equivariance"]
FAMILIES = ("down2", "down4", "scale", "rotate", "flip")


@dataclass
class Job:
    """One command: its name (its log's), argv, the output that is there once it has run, the jobs it needs
    first, and what it took (wall and CPU seconds, the load average at its start and end)."""

    name: str
    argv: list[str]
    output: Path
    after: tuple[str, ...] = ()
    timing: dict[str, Any] = field(default_factory=dict)


def run_jobs(jobs: list[Job], logs: Path, parallel: int, run: bool = True) -> None:
    """Run `jobs`, at most `parallel` at once and each with one thread, the first ready one in list order
    whenever a slot frees. A job whose output is there already is not run again: its timing is read back
    from logs/<name>.json. A failed command stops the script with its log's tail. run False: only read
    back the timings of those that have run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    done = set()
    for job in jobs:
        if job.output.exists():
            done.add(job.name)
            record = logs / f"{job.name}.json"
            job.timing = json.loads(record.read_text())["timing"] if record.is_file() else {}
    pending, running = [j for j in jobs if j.name not in done and run], {}
    while pending or running:
        for job in [j for j in pending if done.issuperset(j.after)][: parallel - len(running)]:
            pending.remove(job)
            print(f"$ {shlex.join(job.argv)}", flush=True)
            log = open(logs / f"{job.name}.log", "w")  # noqa: SIM115 (closed when the job ends)
            proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            job.timing = {"load_1m_start": load_average()}
            running[proc.pid] = (job, log, time.monotonic())
        if not running:
            raise SystemExit(f"jobs wait on jobs that never run: {[j.name for j in pending]}")
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        job, log, start = running.pop(pid)
        log.close()
        job.timing.update(
            wall_s=round(time.monotonic() - start, 1),
            cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
            load_1m_end=load_average(),
        )
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            tail = (logs / f"{job.name}.log").read_text()[-3000:]
            raise SystemExit(f"{job.name} failed (exit {code}):\n{tail}")
        (logs / f"{job.name}.json").write_text(json.dumps({"argv": job.argv, "timing": job.timing}) + "\n")
        done.add(job.name)
        print(f"  {job.name}: {job.timing['wall_s']} s wall, {job.timing['cpu_s']} s CPU", flush=True)


def write_crops(data: Path, split: str, out: Path) -> int:
    """Every CROP px crop at a stride of STRIDE px of the `split` photographs in `data` as PNG files in
    `out`, named <photo key>-<row>-<column>; returns how many."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    shards = sorted(data.glob(f"{split}-*.tar"))
    if not shards:
        raise SystemExit(f"no {split}-*.tar shards in {data}: run `make demo` (or give --data)")
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not (member.isfile() and member.name.lower().endswith((".jpg", ".png", ".webp"))):
                    continue
                img = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                key = member.name.rsplit(".", 1)[0]
                for i in range(0, img.shape[0] - CROP + 1, STRIDE):
                    for j in range(0, img.shape[1] - CROP + 1, STRIDE):
                        crop = img[i : i + CROP, j : j + CROP]
                        Image.fromarray(crop).save(out / f"{key}-{i // STRIDE:02d}-{j // STRIDE:02d}.png")
                        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.probe_recipes", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--start", default="runs/demo", help="the trained VAE every fine-tune starts from (a run)")
    p.add_argument("--data", default="runs/demo-data", help="the demo's shards (train and val photographs)")
    p.add_argument("--work", default="runs/probe-recipes", help="folder for crops, runs, latents, probe")
    p.add_argument("--jobs", type=int, default=2, help="commands at once, one thread each (default 2)")
    p.add_argument("--ft-steps", type=int, default=400, help="steps of each fine-tune (default 400)")
    p.add_argument(
        "--ft-seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each fine-tune (0 1 2)"
    )
    p.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning lr, constant (default 5e-4)")
    p.add_argument("--ft-batch", type=int, default=4, help="fine-tuning batch of 64 px crops (default 4)")
    p.add_argument("--seeds", type=int, default=2, help="probe seeds (default 2)")
    p.add_argument("--probe-steps", type=int, default=1000, help="probe steps (default 1000)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    p.add_argument("--tag", default="", help="appended to the result files' name")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: the results of what --work holds (autoencoders not yet probed get no probe loss)",
    )
    args = p.parse_args(argv)
    start, data, work = Path(args.start), Path(args.data), Path(args.work)
    if not (start / "checkpoints" / "latest").is_file():
        p.error(f"--start {start} is not a run with a checkpoint: run `make demo` first")
    vae_scale = [sys.executable, "-m", "vae_scale"]
    read = ["--resolution", str(CROP), "--batch-size", "32", "--workers", "0", "--split", "train"]
    budget = [
        "--seeds", str(args.seeds), "--steps", str(args.probe_steps), "--batch-size", "64",
        "--width", "128", "--depth", "4", "--heads", "4", "--lr", "3e-4", "--evals", "4",
    ]  # fmt: skip

    # 1. crops and their shards
    jobs = []
    for split in ("train", "val"):
        crops, shards = work / "crops" / split, work / f"crops-{split}"
        if not (shards / "index.json").is_file() and not args.report_only:
            write_crops(data, split, crops)
        cmd = ["shards", str(crops), str(shards), "--format", "png", "--val-fraction", "0", "--workers", "1"]
        jobs.append(Job(f"shards-{split}", [*vae_scale, *cmd, "--quiet"], shards / "index.json"))

    def measure(label: str, run: Path, after: tuple[str, ...]) -> list[Job]:
        """3, 4 and 5 for one autoencoder: eval, encode of both splits, the probe of its latents."""
        name = slug(label)
        cmd = ["eval", "--run", str(run), "--data", str(work / "crops-val"), *read]
        out = work / "eval" / f"{name}.json"
        cmd += ["--metrics", *EVAL_METRICS, "--out", str(out)]
        out_jobs = [Job(f"eval-{name}", [*vae_scale, *cmd], out, (*after, "shards-val"))]
        for split in ("train", "val"):
            out = work / "latents" / f"{name}-{split}"
            cmd = ["encode", "--run", str(run), "--data", str(work / f"crops-{split}"), *read]
            cmd += ["--out", str(out)]
            out_jobs.append(
                Job(
                    f"encode-{name}-{split}",
                    [*vae_scale, *cmd],
                    out / "index.json",
                    (*after, f"shards-{split}"),
                )
            )
        out = work / f"probe-{name}"
        cmd = [
            "probe",
            str(work / "latents" / f"{name}-train"),
            "--val",
            str(work / "latents" / f"{name}-val"),
        ]
        cmd += ["--names", name, *budget, "--out", str(out), "--overwrite"]
        encoded = (f"encode-{name}-train", f"encode-{name}-val")
        out_jobs.append(Job(f"probe-{name}", [*vae_scale, *cmd], out / "probe.json", encoded))
        return out_jobs

    # 2. the fine-tunes of each --ft-seeds, each followed by 3-5 for it (the start's after the first seed's
    # fine-tunes). Jobs start in list order as slots free, so the first seed's probes go before the next
    # seed's fine-tunes.
    runs = {"start": start}
    for k, seed in enumerate(args.ft_seeds):
        tunes = {}
        for name, keys in VARIANTS.items():
            label = f"{name} (ft seed {seed})"
            run = tunes[label] = work / f"ft-{name}-seed{seed}"
            overrides = [
                f"run.dir={run}",
                f"model.init_from={start}",
                f"data.train={data}",
                f"data.val={data}",
                f"data.resolution={CROP}",
                f"data.batch_size={args.ft_batch}",
                "data.workers=0",
                f"train.steps={args.ft_steps}",
                f"train.seed={seed}",
                f"optim.lr={args.ft_lr}",
                "optim.schedule=constant",
                "optim.warmup_steps=0",
                "checkpoint.every=0",
                "log.every=50",
                "log.images_every=0",
                *keys,
            ]
            cmd = [*vae_scale, "train", "--config", "demo", *overrides]
            jobs.append(Job(run.name, cmd, run / "checkpoints" / "latest"))
        if k == 0:
            jobs += measure("start", start, ())
        for label, run in tunes.items():
            jobs += measure(label, run, (run.name,))
        runs.update(tunes)

    t0, cpu0 = time.monotonic(), os.times()
    with LoadSampler(interval=5.0) as load:
        run_jobs(jobs, work / "logs", args.jobs, run=not args.report_only)
    wall, cpu1 = time.monotonic() - t0, os.times()

    counts = {
        split: json.loads((work / f"crops-{split}" / "index.json").read_text())["splits"]["train"]["samples"]
        for split in ("train", "val")
    }
    labels = [x for x in runs if (work / "eval" / f"{slug(x)}.json").is_file()]  # all, unless --report-only
    metrics = {x: json.loads((work / "eval" / f"{slug(x)}.json").read_text())["metrics"] for x in labels}
    probed = [x for x in labels if (work / f"probe-{slug(x)}" / "probe.json").is_file()]
    if not probed:
        raise SystemExit(f"no probe results in {work}")
    parts = [json.loads((work / f"probe-{slug(x)}" / "probe.json").read_text()) for x in probed]
    if any(part["budget"] != parts[0]["budget"] for part in parts):
        raise SystemExit(f"the probes in {work}/probe-* ran under different budgets: delete them")
    report = {**parts[0], "autoencoders": [part["autoencoders"][0] for part in parts]}
    write_report(report, work / "probe")

    env = environment("cpu")
    stamp = env["date"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"-{re.sub(r'[^a-zA-Z0-9]+', '-', args.tag)}" if args.tag else ""
    stem = out_dir / f"probe_recipes-{device_slug(device_name('cpu'))}-{stamp}{tag}"
    command = ["python", "-m", "benchmarks.probe_recipes", *(sys.argv[1:] if argv is None else argv)]
    timed = [j.timing for j in jobs if "wall_s" in j.timing]
    loads = [t[k] for t in timed for k in ("load_1m_start", "load_1m_end") if t.get(k) is not None]
    totals = {  # over every command that ran, in this call or an earlier one (logs/<name>.json)
        "commands": len(timed),
        "wall_s": round(sum(t["wall_s"] for t in timed), 1),  # summed: --jobs ran at once
        "cpu_s": round(sum(t["cpu_s"] for t in timed), 1),
        "load_1m_max": max(loads, default=None),
        "load_1m_mean": round(sum(loads) / len(loads), 2) if loads else None,
        "this_call": None  # --report-only ran nothing
        if args.report_only
        else {
            "wall_s": round(wall, 1),
            "cpu_s": round(
                cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system, 1
            ),
            "load": load.summary(),
        },
    }
    result = {
        "command": command,
        "variants": VARIANTS,
        "crops": counts,
        "runs": {label: str(run) for label, run in runs.items()},
        "eval": metrics,
        "probe": report,
        "commands": [{"name": j.name, "argv": j.argv, **j.timing} for j in jobs],
        "totals": totals,
        "environment": env,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(report, metrics, labels) + "\n\nPer recipe:\n\n" + recipe_table(report, metrics, labels)
    stem.with_suffix(".md").write_text(
        f"`{shlex.join(command)}`\n\n{env['device']}, torch {env['torch']}, vae-scale {env['commit']}, "
        f"{stamp}; "
        f"{totals['commands']} commands, {totals['wall_s']:.0f} s of wall time summed over them ({args.jobs} "
        f"at once), {totals['cpu_s']:.0f} s of CPU time; 1-minute load average {totals['load_1m_mean']} on "
        f"average at their starts and ends, up to {totals['load_1m_max']}. Crops: {counts['train']} train, "
        f"{counts['val']} held out, {CROP} px.\n\n"
        f"{table}\n\nThe probe's table:\n\n{(work / 'probe' / 'probe.md').read_text()}"
    )
    print(table)
    print(f"wrote {stem}.json and .md")
    return 0


def slug(label: str) -> str:
    """A label as a file and probe name: 'EQ-VAE (ft seed 1)' -> 'EQ-VAE-ft-seed-1'."""
    return re.sub(r"[^a-zA-Z0-9]+", "-", label).strip("-")


def markdown(report: dict[str, Any], metrics: dict[str, dict], labels: list[str]) -> str:
    """Probe loss next to reconstruction: one row per autoencoder. "lowest on the curve": the lowest held-out
    loss of the seeds' mean curve, and at which step (the probe overfits few latents late in its budget)."""
    head = ["autoencoder", "probe val loss", "min – max", "lowest on the curve", "PSNR (dB)", "SSIM"]
    head += ["latent HF share"]
    head += [f"equiv. {f} (dB)" for f in FAMILIES]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    rows = {r["name"]: r for r in report["autoencoders"]}
    for label in labels:
        m, probe = metrics[label], ["–"] * 3
        if (row := rows.get(slug(label))) is not None:
            s = row["summary"]["val_loss"]
            curves = [run["curve"] for run in row["runs"]]
            mean = [(points[0][0], sum(p[1] for p in points) / len(points)) for points in zip(*curves)]
            step, lowest = min(mean, key=lambda point: point[1])
            probe = [
                f"{s['mean']:.4f} ± {s['std']:.4f}",
                f"{s['min']:.4f} – {s['max']:.4f}",
                f"{lowest:.4f} (step {step})",
            ]
        cells = [
            label,
            *probe,
            f"{m['psnr']:.2f}",
            f"{m['ssim']:.3f}",
            f"{m['latent_hf_share']:.3f}",
            *(f"{m[f'equivariance/{f}']:.2f}" for f in FAMILIES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipe_table(report: dict[str, Any], metrics: dict[str, dict], labels: list[str]) -> str:
    """One row per recipe over its fine-tunes (their seeds): the probe's held-out loss of every (fine-tune,
    probe seed) run, mean and range, each fine-tune's mean, and each fine-tune's PSNR and latent HF share.
    The spread between fine-tunes of one recipe is the yardstick for a difference between recipes."""
    rows = {r["name"]: r for r in report["autoencoders"]}
    recipes: dict[str, list[str]] = {}
    for label in labels:
        if label != "start" and slug(label) in rows:
            recipes.setdefault(label.split(" (ft seed")[0], []).append(label)
    head = ["recipe", "fine-tunes x probe seeds", "probe val loss", "min – max", "each fine-tune's mean"]
    head += ["PSNR (dB), each", "latent HF share, each"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for recipe, members in recipes.items():
        runs = [run["val_loss"] for x in members for run in rows[slug(x)]["runs"]]
        means = [rows[slug(x)]["summary"]["val_loss"]["mean"] for x in members]
        cells = [
            recipe,
            f"{len(members)} x {len(runs) // len(members)}",
            f"{sum(runs) / len(runs):.4f}",
            f"{min(runs):.4f} – {max(runs):.4f}",
            ", ".join(f"{v:.4f}" for v in means),
            ", ".join(f"{metrics[x]['psnr']:.2f}" for x in members),
            ", ".join(f"{metrics[x]['latent_hf_share']:.3f}" for x in members),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
