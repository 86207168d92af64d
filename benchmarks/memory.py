"""Memory: the dry-run's estimate (train/preflight.py estimate_memory) against the peak a real training step
reaches, per case (preset, resolution, batch, precision, activation checkpointing).

Each case runs in a process of its own, on the trainer's own step (a `Trainer` from the case's run config,
`Trainer.train_step`, synthetic batches already in memory), so one case's freed memory cannot lower the
next's peak:

1. a throwaway Trainer of the same preset at a small resolution takes one step and is dropped, so that the
   libraries and kernels that load lazily at the first step are not counted as training memory;
2. the process's resident memory is read (the baseline), its high-water mark reset to it (`clear_refs`);
3. the case's Trainer is built and takes `STEPS` steps (the first creates AdamW's moments; later steps hold
   the moments and the gradients while the next step's activations are saved);
4. measured = the high-water mark (VmHWM) less the baseline: what the run added at its worst moment.

The measure is the process's resident memory, not an allocator's count: torch keeps no statistics for its
CPU allocator (`torch.cuda.max_memory_allocated` has no CPU counterpart in torch 2.13), and the profiler's
memory events count tensors only, with a cost that would distort a step of thousands of ops. Resident
memory is what the refusal guards on a CPU (the host's free memory) and includes what the allocator holds
beyond live tensors. glibc would keep freed blocks of up to 32 MiB in its heap after a free (its mmap
threshold grows), so the child runs with `MALLOC_MMAP_THRESHOLD_=65536`: every tensor of 64 KiB or more is
its own mapping, returned to the system when freed, and resident memory follows live memory.

On a GPU the same comparison reads torch.cuda.max_memory_allocated (the caching allocator's own count) in
place of resident memory (`--device cuda`, run by benchmarks/gpu_check.sh).

    python -m benchmarks.memory                    # the sweep (see cases): the table in docs/performance.md
    python -m benchmarks.memory --quick            # sd-f8 only (the suite's, `make bench`)
    python -m benchmarks.memory --case sd-f8,128,1,no,false     # preset,resolution,batch,precision,ckpt
    python -m benchmarks.memory --plan             # the largest batch that fits an 80 GB H100, per preset
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.harness import device_slug, environment, write_results

STEPS = 2
MMAP_THRESHOLD = 65536  # bytes: every tensor this size or larger is its own mapping (see the docstring)


@dataclass(frozen=True)
class Case:
    """One measurement: a preset at a resolution and per-process batch, a precision, checkpointing."""

    preset: str
    resolution: int
    batch: int = 1
    precision: str = "no"  # train.mixed_precision: no | bf16 | fp16
    checkpointing: bool = False
    overrides: tuple[str, ...] = ()  # model.* overrides on the preset (tests use a tiny model)

    def spec(self) -> str:
        """The case as one command-line argument (see parse_case)."""
        ckpt = str(self.checkpointing).lower()
        base = f"{self.preset},{self.resolution},{self.batch},{self.precision},{ckpt}"
        return ";".join([base, *self.overrides])

    def config_overrides(self, resolution: int | None = None) -> list[str]:
        return [
            *self.overrides,
            f"data.resolution={resolution or self.resolution}",
            f"data.batch_size={self.batch}",
            f"train.mixed_precision={self.precision}",
            f"model.gradient_checkpointing={str(self.checkpointing).lower()}",
            "log.wandb=disabled",
            "eval.every=0",
        ]


def parse_case(spec: str) -> Case:
    """`preset,resolution,batch,precision,checkpointing[;override;...]` -> Case."""
    base, *overrides = spec.split(";")
    preset, resolution, batch, precision, checkpointing = base.split(",")
    return Case(preset, int(resolution), int(batch), precision, checkpointing == "true", tuple(overrides))


def cases(quick: bool, device: str) -> list[Case]:
    """The sweep. On a CPU: two families (SD's 2D AutoencoderKL and Wan 2.1's causal 3D VAE on one-frame
    images) at 128 and 256 px, batch 1, fp32, checkpointing off and on, each under 6 GiB (the largest about
    5.7), and sd-f8 in bf16; quick: sd-f8 at 128 px, checkpointing off and on. On a GPU: sd-f8 in bf16 at
    256 px, batch 8, and 512 px, batch 4 (quick: 256 px only), checkpointing off and on."""
    if device == "cuda":
        sizes = [(256, 8)] if quick else [(256, 8), (512, 4)]
        return [Case("sd-f8", r, b, "bf16", ckpt) for r, b in sizes for ckpt in (False, True)]
    if quick:
        return [Case("sd-f8", 128, 1, "no", ckpt) for ckpt in (False, True)]
    fp32 = [
        Case(preset, resolution, 1, "no", ckpt)
        for preset in ("sd-f8", "wan2.1")
        for resolution in (128, 256)
        for ckpt in (False, True)
    ]
    return fp32 + [Case("sd-f8", resolution, 1, "bf16", False) for resolution in (128, 256)]


# --------------------------------------------------------------------------------------------------------
# The child: one case, measured


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def _trainer(cfg: Any, device: torch.device) -> Any:
    """The trainer of `cfg` on synthetic batches already in memory (the loader is the data benchmark's)."""
    from benchmarks.steps import Batches
    from vae_scale.train.trainer import Trainer

    r, b = cfg.data.resolution, cfg.data.batch_size
    inputs = [torch.rand(b, cfg.model.in_channels, r, r, device=device) * 2 - 1 for _ in range(2)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return Trainer(cfg, loader=Batches(inputs))


def measure_here(case: Case, run_dir: str) -> dict[str, Any]:
    """Run `case` in this process (see the module docstring) and return estimate and measured peak."""
    from vae_scale.config import load_config
    from vae_scale.train.preflight import estimate_memory

    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU") != "true"
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(case.preset, [*case.config_overrides(), f"run.dir={run_dir}/run"])
    est = estimate_memory(cfg)

    factor = cfg.model.downsample_factor
    small = load_config(case.preset, [*case.config_overrides(4 * factor), f"run.dir={run_dir}/warm"])
    warm = _trainer(small, device)
    warm.train_step()
    warm.close()
    del warm
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark (VmHWM) back to the current resident memory
    trainer = _trainer(cfg, device)
    for _ in range(STEPS):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
    else:
        measured = _status("VmHWM") - base
    trainer.close()
    return {
        "estimate_gib": est.total / 2**30,
        "estimate_parameters_gib": est.parameters / 2**30,
        "estimate_activations_gib": est.activations / 2**30,
        "measured_gib": measured / 2**30,
        "measure": "cuda max_memory_allocated" if cuda else "VmHWM - VmRSS at start",
    }


# --------------------------------------------------------------------------------------------------------
# The parent: one process per case


def measure(case: Case, threads: int = 1, timeout_s: float = 900) -> dict[str, Any]:
    """`case` measured in a fresh process (`threads` torch threads); returns its row's figures."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "OMP_NUM_THREADS": str(threads),
    }
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", case.spec()],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    if out.returncode != 0:
        raise RuntimeError(f"case {case.spec()} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(case: Case, figures: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """One result row: the case, the estimate beside the measured peak, and the relative error."""
    est, got = figures["estimate_gib"], figures["measured_gib"]
    return {
        "subject": "memory",
        "variant": "checkpointing" if case.checkpointing else "plain",
        "preset": case.preset + (f" ({', '.join(case.overrides)})" if case.overrides else ""),
        "resolution": case.resolution,
        "batch": case.batch,
        "dtype": {"no": "fp32"}.get(case.precision, case.precision),
        "checkpointing": case.checkpointing,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()},
        "relative_error": round(est / got - 1, 3),
        **env,
    }


def run(quick: bool = True, threads: int = 1) -> list[dict[str, Any]]:
    """Every case of the sweep, one process each, one at a time; a failed case becomes an error row."""
    from benchmarks.harness import error_row

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    rows = []
    for case in cases(quick, device):
        print(f"memory: {case.spec()}", flush=True)
        try:
            rows.append(row(case, measure(case, threads), env))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rows.append(error_row("memory", case.spec(), str(e)[:500], env))
    return rows


# --------------------------------------------------------------------------------------------------------
# The plan: the largest batch the estimate fits on a device

PLAN_PRESETS = ("sd-f8", "f8c16", "flux2", "xl", "dc-ae-f32c32", "dc-ae-f64c128", "wan2.1")
PLAN_RESOLUTIONS = (256, 512, 1024)
H100_GIB = (
    81559 / 1024
)  # an H100 80GB's total_memory as torch reports it (81,559 MiB), what preflight compares


def largest_batch(preset: str, resolution: int, precision: str, checkpointing: bool, gib: float) -> int:
    """The largest per-process batch whose estimate (estimate_memory, one process) fits `gib` GiB; 0 when
    not even one image does."""
    from vae_scale.config import load_config
    from vae_scale.train.preflight import OVERHEAD, estimate_memory

    case = Case(preset, resolution, 1, precision, checkpointing)
    est = estimate_memory(load_config(preset, case.config_overrides()))
    cap = int(gib * 2**30)
    if est.total_at(1) > cap:
        return 0
    # near the answer, then to it: the largest batch that fits, whose next does not
    batch = max(1, int(cap / OVERHEAD - est.parameters) // max(est.activations_per_image, 1))
    while batch > 1 and est.total_at(batch) > cap:
        batch -= 1
    while est.total_at(batch + 1) <= cap:
        batch += 1
    return batch


def plan_table(gib: float = H100_GIB, precision: str = "bf16") -> str:
    """Markdown: per preset and resolution, the largest batch per GPU without and with checkpointing."""
    lines = [
        f"| preset | {' | '.join(f'{r} px | {r} px, ckpt' for r in PLAN_RESOLUTIONS)} |",
        "|---|" + "---:|" * (2 * len(PLAN_RESOLUTIONS)),
    ]
    for preset in PLAN_PRESETS:
        cells = [
            str(largest_batch(preset, r, precision, ckpt, gib))
            for r in PLAN_RESOLUTIONS
            for ckpt in (False, True)
        ]
        lines.append(f"| {preset} | {' | '.join(cells)} |")
    return "\n".join(lines)


COLUMNS = [
    "preset", "resolution", "batch", "dtype", "checkpointing", "estimate_gib", "estimate_parameters_gib",
    "estimate_activations_gib", "measured_gib", "relative_error", "measure", "error",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small sweep (sd-f8 only; see cases)")
    p.add_argument("--case", action="append", default=[], help="preset,resolution,batch,precision,ckpt")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each case's process")
    p.add_argument(
        "--plan",
        type=float,
        nargs="?",
        const=H100_GIB,
        default=None,
        metavar="GIB",
        help=f"print the largest bf16 batch per GPU the estimate fits in GIB (default {H100_GIB:.1f}: H100 "
        "80GB) for the large presets and measure nothing",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.child:
        import tempfile

        os.environ.setdefault("ACCELERATE_USE_CPU", "false" if torch.cuda.is_available() else "true")
        with tempfile.TemporaryDirectory(prefix="memory-") as d:
            print(json.dumps(measure_here(parse_case(args.child), d)))
        return 0
    if args.plan is not None:
        print(plan_table(args.plan))
        return 0
    if args.case:
        env = environment("cuda" if torch.cuda.is_available() else "cpu")
        rows = [row(c, measure(c, args.threads), env) for c in map(parse_case, args.case)]
    else:
        rows = run(quick=args.quick, threads=args.threads)
    name = f"memory-{device_slug(rows[0]['device'])}" if rows else "memory"
    path = write_results(rows, name, COLUMNS, args.out)
    print(path.with_suffix(".md").read_text())
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
