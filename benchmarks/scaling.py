"""Data-parallel scaling: training images/s with 1, 2, ... processes at the same per-process batch, and
what sharding saves: DDP against FSDP at the same process count, step time and peak memory per process.

Each process count trains for real: `python -m vae_scale train` for one process, torchrun for several
(gloo on a CPU, NCCL on GPUs), on synthetic images (data.train=synthetic, generated inside the loop, so
file reading and decoding are out of the measurement) with log.every=1. Images/s comes back from the
run's metrics.jsonl, one value per step: median over the steps after warm-up, with p20/p80. Scaling
efficiency is img/s(N) / (N x img/s(1)); speedup is img/s(N) / img/s(1).

Cores. On a CPU every process gets the same cores whatever the count: a fixed number of threads per process
(`--threads`, default 1) and as many cores, its own, set by CPU affinity before torch starts
(benchmarks/pinned.py; `core_sets`): 1 process on core 0, N processes on cores 0..N-1, one each. So the
hardware grows with N as it does with GPUs, and efficiency near 1 is the goal. A count that needs more
cores than this process may use is refused. On GPUs each process has its own device and nothing is pinned.

Process counts are run in alternation, `--rounds` times (1 2 1 2 ...), and their steps pooled, so drift in
machine load hits every count alike. The load other processes put on the machine is sampled during every
run (harness.LoadSampler) and recorded in each row; the benchmark refuses to start on a busy machine, and
refuses rows measured while it was busy, unless `--allow-busy`. An efficiency above 1.05 cannot come from
data parallelism on the same cores per process: such a row is flagged `suspect`, with the load it ran at.

Sharding rows ("2 proc ddp" / "2 proc fsdp", sd-f8 by default: 84M parameters, whose weights, gradients
and AdamW state are 1.3 GB in fp32) run the trainer with train.parallel=ddp and =fsdp on the same processes
and batch. Peak memory per process is what the trainer logs: on a GPU the memory its tensors held
(peak_memory_gb), on a CPU the process's peak RSS (peak_rss_gb, which includes the ~0.5 GB of the Python
and torch runtime), the largest over ranks.

    python -m benchmarks.scaling [--quick] [--nproc 1,2] [--preset demo] [--batch 8] [--resolution 64]
                                 [--steps 20] [--warmup 3] [--rounds 2] [--threads T] [--out DIR]
                                 [--sharding-preset sd-f8] [--no-sharding] [--allow-busy]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.harness import (
    BusyMachine,
    LoadSampler,
    Timing,
    _quantile,
    check_idle,
    environment,
    result_row,
    stamp_load,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "variant",
    "parallel",
    "device",
    "backend",
    "preset",
    "batch_per_process",
    "global_batch",
    "resolution",
    "dtype",
    "omp_threads",
    "median_ms",
    "images_per_s",
    "images_per_s_p20",
    "images_per_s_p80",
    "images_per_s_per_process",
    "speedup",
    "efficiency",
    "suspect",
    "pinned_cores",
    "data_wait_fraction",
    "peak_memory_gb",
    "peak_rss_gb",
    "steps_measured",
    "load_1m",
    "others_cores",
    "busy",
    "error",
]
SUPERLINEAR = 1.05  # efficiency above this is flagged: timing noise on an idle machine stays below 5%


def job_args(preset: str, batch: int, resolution: int, steps: int, mixed_precision: str) -> list[str]:
    """`vae-scale train` arguments of the measured job: synthetic images, no checkpoint, eval or images."""
    args = [
        "--config",
        preset,
        "data.train=synthetic",
        f"data.batch_size={batch}",
        f"data.resolution={resolution}",
        "data.workers=0",
        f"train.steps={steps}",
        "checkpoint.every=0",
        "log.every=1",
        "log.images_every=0",
        "log.wandb=disabled",
        "eval.every=0",
    ]
    if mixed_precision != "no":  # "no" is the default (and YAML would read a bare no as false)
        args.append(f"train.mixed_precision={mixed_precision}")
    return args


def core_sets(nproc: int, threads: int, available: list[int]) -> list[list[int]]:
    """The cores of each local rank: `threads` consecutive cores of `available` per process, none shared.

    ValueError naming the shortfall when nproc x threads exceeds the cores available.
    """
    need = nproc * threads
    if need > len(available):
        raise ValueError(
            f"{nproc} processes x {threads} threads need {need} cores; this process may use "
            f"{len(available)} ({','.join(map(str, available))})"
        )
    return [available[i * threads : (i + 1) * threads] for i in range(nproc)]


def available_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def launch_command(nproc: int, train_args: list[str], pinned: bool = False) -> list[str]:
    """One process: the trainer itself. Several: torchrun on this node with its own free port. Pinned:
    each through benchmarks.pinned, which sets its affinity from PINNED_CORES first."""
    module = ["benchmarks.pinned", "vae_scale"] if pinned else ["vae_scale"]
    if nproc == 1:
        return [sys.executable, "-m", *module, "train", *train_args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "-m",
        *module,
        "train",
        *train_args,
    ]


def train_once(
    nproc: int,
    train_args: list[str],
    threads: int,
    run_dir: Path,
    timeout_s: float,
    cores: list[list[int]] | None = None,
) -> list[dict]:
    """Run one training job (each local rank on its `cores` when given); returns its metrics.jsonl rows."""
    env = {
        **os.environ,
        **({"PINNED_CORES": ";".join(",".join(map(str, c)) for c in cores)} if cores else {}),
        "OMP_NUM_THREADS": str(threads),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen(
        launch_command(nproc, [*train_args, f"run.dir={run_dir}"], pinned=cores is not None),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:  # torchrun's workers have sessions of their own: find them as children
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed ({proc.returncode}):\n{err[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def superlinear_note(efficiency: float, load: dict[str, Any], n: int, base_n: int) -> str | None:
    """Why an efficiency above SUPERLINEAR is suspect, with the load it ran at; None at or below it."""
    if efficiency <= SUPERLINEAR:
        return None
    return (
        f"efficiency {efficiency:.2f} > {SUPERLINEAR}: with the same cores per process data parallelism "
        f"cannot exceed 1; measured at load {load['load_1m']}, other processes using "
        f"{load['others_cores']:.2f} of {load['machine_cores']} cores (a slowed {base_n}-process run, or the "
        f"caches of {n} cores against {base_n})"
    )


def worst_load(loads: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the loads sampled during a count's runs, the one with the most use by other processes."""
    return max(loads, key=lambda d: d["others_cores"])


def _spread(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    return statistics.median(v), _quantile(v, 0.2), _quantile(v, 0.8)


def run(
    quick: bool = True,
    nprocs: list[int] | None = None,
    preset: str | None = None,
    batch: int | None = None,
    resolution: int | None = None,
    steps: int | None = None,
    warmup: int = 3,
    rounds: int | None = None,
    threads: int | None = None,
    mixed_precision: str | None = None,
    sharding: bool = True,
    sharding_preset: str = "sd-f8",
    allow_busy: bool = False,
) -> list[dict[str, Any]]:
    """Images/s and scaling efficiency per process count on this machine, then (sharding) DDP against FSDP
    at the largest count; returns result rows (refused when busy unless `allow_busy`)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if nprocs is None:
        gpus = torch.cuda.device_count() if cuda else 0
        nprocs = [n for n in (1, 2, 4, 8) if n <= gpus] if cuda else [1, 2]
    # Defaults: on a CPU the demo preset at batch 8 (quick: at 32 px instead of 64); on GPUs the SD kl-f8
    # autoencoder at 256 px, the workload the scaling anchors in PERFORMANCE.md are for.
    preset = preset or ("sd-f8" if cuda else "demo")
    batch = batch or 8
    resolution = resolution or (256 if cuda else (32 if quick else 64))
    steps = steps or (10 if quick else 20)
    rounds = rounds or (1 if quick else 2)
    mixed_precision = mixed_precision or ("bf16" if cuda else "no")
    threads = threads or 1
    # On a CPU, refuse a count the cores cannot hold before anything runs.
    assigned = {n: None if cuda else core_sets(n, threads, available_cores()) for n in nprocs}
    train_args = job_args(preset, batch, resolution, warmup + steps, mixed_precision)

    samples: dict[int, list[dict]] = {n: [] for n in nprocs}
    loads: dict[int, list[dict[str, Any]]] = {n: [] for n in nprocs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for n in nprocs:
                with LoadSampler() as sampler:
                    rows = train_once(
                        n, train_args, threads, Path(tmp) / f"r{r}-n{n}", timeout_s=600, cores=assigned[n]
                    )
                loads[n].append(sampler.summary())
                samples[n] += [row for row in rows if row["step"] > warmup]

    env = environment(device)
    out = []
    base_n, base = nprocs[0], None  # efficiency and speedup are relative to the first (smallest) count
    for n in nprocs:
        ips = [row["images_per_s"] for row in samples[n]]
        images_per_step = batch * n
        # Per-step wall time in ms from each step's images/s; p20 of time is p80 of throughput.
        ms = sorted(images_per_step / v * 1e3 for v in ips)
        timing = Timing(statistics.median(ms), _quantile(ms, 0.2), _quantile(ms, 0.8), len(ms))
        median, p20, p80 = _spread(ips)
        base = base if base is not None else median
        efficiency = median / (base * n / base_n)
        load = worst_load(loads[n] + loads[base_n])  # efficiency depends on both runs
        suspect = superlinear_note(efficiency, load, n, base_n)
        out.append(
            result_row(
                "scaling",
                f"{n} proc",
                timing,
                env,
                nproc=n,
                backend="nccl" if cuda else "gloo",
                preset=preset,
                batch_per_process=batch,
                global_batch=images_per_step,
                resolution=resolution,
                dtype=mixed_precision if mixed_precision != "no" else "fp32",
                omp_threads=threads,
                pinned_cores=";".join(",".join(map(str, c)) for c in assigned[n]) if assigned[n] else None,
                images_per_s=median,
                images_per_s_p20=p20,
                images_per_s_p80=p80,
                images_per_s_per_process=median / n,
                speedup=median / base,
                efficiency=efficiency,
                suspect=suspect,
                data_wait_fraction=statistics.median(
                    row.get("data_wait_fraction", 0.0) for row in samples[n]
                ),
                steps_measured=len(ips),
                parallel="ddp",
                **_peaks(samples[n]),
            )
        )
        stamp_load(out[-1:], load, allow_busy)
    if sharding and max(nprocs) > 1:
        out += compare_sharding(
            quick, max(nprocs), sharding_preset, warmup, threads, mixed_precision, allow_busy
        )
    return out


def _peaks(rows: list[dict]) -> dict[str, float]:
    return {
        k: max(r[k] for r in rows) for k in ("peak_memory_gb", "peak_rss_gb") if any(k in r for r in rows)
    }


def compare_sharding(
    quick: bool,
    nproc: int,
    preset: str,
    warmup: int,
    threads: int | None,
    mixed_precision: str,
    allow_busy: bool = False,
) -> list[dict[str, Any]]:
    """The same training job with train.parallel=ddp and =fsdp on nproc processes: time and memory."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch, resolution = (8, 256) if cuda else (2, 32)
    steps = 6 if quick else 12
    t = threads or 1
    cores = None if cuda else core_sets(nproc, t, available_cores())
    common = job_args(preset, batch, resolution, warmup + steps, mixed_precision)
    env, out = environment(device), []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp"):
            with LoadSampler() as sampler:
                rows = train_once(
                    nproc, [*common, f"train.parallel={strategy}"], t, Path(tmp) / strategy, 900, cores=cores
                )
            measured = [r for r in rows if r["step"] > warmup]
            ms = sorted(batch * nproc / r["images_per_s"] * 1e3 for r in measured)
            timing = Timing(statistics.median(ms), _quantile(ms, 0.2), _quantile(ms, 0.8), len(ms))
            median, p20, p80 = _spread([r["images_per_s"] for r in measured])
            out.append(
                result_row(
                    "scaling",
                    f"{nproc} proc {strategy}",
                    timing,
                    env,
                    parallel=strategy,
                    nproc=nproc,
                    backend="nccl" if cuda else "gloo",
                    preset=preset,
                    batch_per_process=batch,
                    global_batch=batch * nproc,
                    resolution=resolution,
                    dtype=mixed_precision if mixed_precision != "no" else "fp32",
                    omp_threads=t,
                    pinned_cores=";".join(",".join(map(str, c)) for c in cores) if cores else None,
                    images_per_s=median,
                    images_per_s_p20=p20,
                    images_per_s_p80=p80,
                    images_per_s_per_process=median / nproc,
                    steps_measured=len(measured),
                    **_peaks(rows),
                )
            )
            stamp_load(out[-1:], sampler.summary(), allow_busy)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller images, fewer steps, one round (~1-2 min)")
    p.add_argument(
        "--nproc",
        default=None,
        help="comma-separated process counts (default 1,2 on a CPU; 1,2,4,8 up to the GPU count)",
    )
    p.add_argument("--preset", default=None, help="model preset (default demo on a CPU, sd-f8 on GPUs)")
    p.add_argument("--batch", type=int, default=None, help="images per process per step")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="steps per run left out of the statistics")
    p.add_argument("--rounds", type=int, default=None, help="runs per process count, interleaved")
    p.add_argument(
        "--threads", type=int, default=None, help="threads (and pinned cores) per process (default 1)"
    )
    p.add_argument("--mixed-precision", default=None, help="no | bf16 | fp16 (default bf16 on GPUs)")
    p.add_argument("--sharding-preset", default="sd-f8", help="preset of the DDP-vs-FSDP rows")
    p.add_argument("--no-sharding", action="store_true", help="leave out the DDP-vs-FSDP rows")
    p.add_argument(
        "--allow-busy",
        action="store_true",
        help="run and keep the figures when other processes load the machine (rows flagged busy)",
    )
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    nprocs = [int(n) for n in args.nproc.split(",")] if args.nproc else None
    if not torch.cuda.is_available():
        try:
            core_sets(max(nprocs or [2]), args.threads or 1, available_cores())
        except ValueError as e:
            p.error(str(e))
    try:
        check_idle(args.allow_busy)
    except BusyMachine as e:
        print(f"scaling: {e}", file=sys.stderr)
        return 3
    t0 = time.time()
    rows = run(
        quick=args.quick,
        nprocs=nprocs,
        preset=args.preset,
        batch=args.batch,
        resolution=args.resolution,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        mixed_precision=args.mixed_precision,
        sharding=not args.no_sharding,
        sharding_preset=args.sharding_preset,
        allow_busy=args.allow_busy,
    )
    name = "scaling-" + ("gpu" if rows[0]["backend"] == "nccl" else "cpu")
    path = write_results(rows, name, COLUMNS, args.out)
    print(path.with_suffix(".md").read_text())
    for r in rows:
        if "error" in r:
            print(f"{r['variant']} ({r['preset']}): {r['error']}")
            continue
        peak = r.get("peak_memory_gb", r.get("peak_rss_gb"))
        print(
            f"{r['variant']} ({r['preset']}), {r['omp_threads']} threads each: "
            f"{r['images_per_s']:.1f} images/s "
            f"(p20 {r['images_per_s_p20']:.1f}, p80 {r['images_per_s_p80']:.1f})"
            + (f", efficiency {r['efficiency']:.2f}" if "efficiency" in r else "")
            + (f", peak {peak:.2f} GB per process" if peak is not None else "")
        )
        if r.get("suspect"):
            print(f"  suspect: {r['suspect']}")
    print(f"({time.time() - t0:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
