"""The benchmark suite: every subject's `run(quick)` in one process; results as one JSON and one markdown.

    python -m benchmarks.run --quick              # CPU sizes, under 10 minutes on 2 cores (`make bench`)
    python -m benchmarks.run --full --out DIR     # GPU sizes (benchmarks/gpu_check.sh)
    python -m benchmarks.run --quick --only train_step,data
    python -m benchmarks.run --quick --allow-busy # on a machine that other programs load: figures flagged

Writes `<out>/<device>-<date>.json` (suite metadata and every row) and `.md` (a table per subject), out
being benchmarks/results by default. A subject that raises becomes an error row and the suite goes on; the
exit code is 1 when any subject failed or any row holds an error (e.g. a variant refused by its
correctness check, or rows refused because the machine was busy while they were measured), else 0.

The machine's load is sampled before the suite and during every subject (harness.LoadSampler: the CPU
other processes take, in cores). When others take more than harness.BUSY_FRACTION of the cores, the suite
refuses to start (exit code 3), and rows measured while it was so are refused, unless --allow-busy: then
they keep their figures and say busy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    BUSY_FRACTION,
    RESULTS_DIR,
    BusyMachine,
    LoadSampler,
    check_idle,
    device_slug,
    environment,
    error_row,
    load_average,
    markdown_table,
    stamp_load,
)

SUBJECTS = ("train_step", "kernels", "data", "scaling", "memory")
ENV_KEYS = ("device", "torch", "triton", "vae_scale", "commit", "date")
SubjectRun = Callable[[bool], list[dict[str, Any]]]


def load_subject(name: str, **options: Any) -> tuple[SubjectRun, Sequence[str] | None]:
    """`benchmarks.<name>.run` (with the options it accepts) and the module's COLUMNS, if it has them."""
    module = importlib.import_module(f"benchmarks.{name}")
    run = module.run
    if options:
        import inspect

        accepted = {k: v for k, v in options.items() if k in inspect.signature(run).parameters}
        return (lambda quick: run(quick, **accepted)), getattr(module, "COLUMNS", None)
    return run, getattr(module, "COLUMNS", None)


def run_suite(
    subjects: dict[str, SubjectRun],
    quick: bool,
    log: Callable[[str], None] = print,
    after_each: Callable[[list[dict[str, Any]], dict[str, dict[str, Any]]], None] | None = None,
    allow_busy: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run each subject in turn; an exception becomes an error row. Returns (rows, per-subject summary).

    The load is sampled while each subject runs and recorded in its rows (harness.stamp_load: refused
    when busy unless `allow_busy`). `after_each(rows, summary)` runs after every subject (main writes the
    results so far, so a suite stopped by a time limit still leaves what it measured).
    """
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    for name, run in subjects.items():
        log(f"== {name} ({'quick' if quick else 'full'}), load {load_average()}")
        t0 = time.perf_counter()
        try:
            with LoadSampler() as sampler:
                got = list(run(quick))
            load = sampler.summary()
            stamp_load(got, load, allow_busy)
            for r in got:  # a row's subject may be finer (kernels: the op); the suite groups by benchmark
                r.setdefault("subject", name)
                r["benchmark"] = name
            status = "errors" if any("error" in r for r in got) else "ok"
        except Exception as e:  # noqa: BLE001 -- one subject's failure must not end the suite
            log(traceback.format_exc())
            got = [error_row(name, "-", f"{type(e).__name__}: {e}"[:500], environment(), benchmark=name)]
            status = "failed"
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - t0
        summary[name] = {"status": status, "wall_s": round(seconds, 1), "rows": len(got)}
        busy = sum(1 for r in got if r.get("busy"))
        summary[name] |= {"busy_rows": busy} if busy else {}
        log(f"== {name}: {status}, {len(got)} rows in {seconds:.0f} s" + (f", {busy} busy" if busy else ""))
        rows += got
        if after_each is not None:
            after_each(rows, summary)
    return rows, summary


def exit_code(summary: dict[str, dict[str, Any]]) -> int:
    """1 when any subject failed or returned an error row, else 0."""
    return 1 if any(s["status"] != "ok" for s in summary.values()) else 0


def _columns(rows: list[dict[str, Any]], preferred: Sequence[str] | None) -> list[str]:
    """The module's COLUMNS that some row has, else every key in first-seen order without the environment."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    if preferred:
        cols = [c for c in preferred if c in keys]
        return cols + (["error"] if "error" in keys and "error" not in cols else [])
    skip = {*ENV_KEYS, "benchmark", "repeats", "samples_ms", "others_cores_max", "machine_cores"}
    if all(r.get("subject") == r.get("benchmark", r.get("subject")) for r in rows):
        skip.add("subject")  # says nothing the section's title does not
    return [k for k in keys if k not in skip]


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """One line per train_step setting: our plain eager step against diffusers' eager step."""
    lines = []
    for r in rows:
        if r.get("subject") != "train_step" or r.get("model") != "vae-scale" or "error" in r:
            continue
        if r.get("compile") or r.get("checkpointing") or r.get("x_diffusers_eager") is None:
            continue
        lines.append(
            f"- train_step {r['preset']} {r['resolution']} px, batch {r['batch']}, {r['dtype']}, "
            f"{r['loss']}: `{r['variant']}` {r['images_per_s']:.3g} images/s, "
            f"{r['x_diffusers_eager']:.2f}x diffusers eager"
            + (f" (95% interval {r['x_diffusers_eager_95ci']})" if r.get("x_diffusers_eager_95ci") else "")
            + (" (machine busy)" if r.get("busy") else "")
            + (
                f", {r['x_diffusers_compiled']:.2f}x diffusers compiled"
                if r.get("x_diffusers_compiled")
                else ""
            )
        )
    return lines


def write_suite(
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    columns: dict[str, Sequence[str] | None],
    out_dir: Path | str | None = None,
) -> Path:
    """`<out>/<device>-<date>.json` ({"suite": meta, "rows": rows}) and the markdown beside it."""
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{device_slug(meta['device'])}-{meta['date']}.json"
    path.write_text(json.dumps({"suite": meta, "rows": rows}, indent=2, default=str) + "\n")
    md = [
        f"# Benchmarks: {meta['device']} ({meta['mode']})",
        "",
        f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, vae-scale {meta['vae_scale']}, "
        f"commit {meta['commit']}. Load average (1 min) {meta['load_before']} before, {meta['load_after']} "
        f"after; other processes used {meta.get('others_cores_before')} cores before the run (busy above "
        f"{BUSY_FRACTION:.0%} of the cores; each row says what it ran at); suite wall time "
        f"{meta['wall_s']:.0f} s. `{meta['command']}`",
        "",
    ]
    md += headline(rows) + [""]
    for name, info in meta["subjects"].items():
        sub = [r for r in rows if r.get("benchmark", r.get("subject")) == name]
        md += [f"## {name}: {info['status']}, {info['wall_s']:.0f} s", ""]
        if sub:
            md += [markdown_table(sub, _columns(sub, columns.get(name))), ""]
    path.with_suffix(".md").write_text("\n".join(md))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="small sizes (CPU: under 10 minutes on 2 cores)")
    mode.add_argument("--full", action="store_true", help="real-run sizes (for a GPU)")
    p.add_argument(
        "--only", default=None, help=f"comma-separated subjects (default all: {','.join(SUBJECTS)})"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train_step's torch.compile variants (default: on with CUDA, off on a CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in this process (default torch's: one per core); on a CPU that other programs "
        "load, 1 keeps OpenMP threads from waiting on a descheduled partner (device names say the count)",
    )
    p.add_argument(
        "--allow-busy",
        action="store_true",
        help="run and keep the figures when other processes load the machine (rows flagged busy)",
    )
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(SUBJECTS)
    unknown = [n for n in names if n not in SUBJECTS]
    if unknown:
        p.error(f"unknown subject(s) {unknown}; choose from {', '.join(SUBJECTS)}")
    try:
        idle = check_idle(args.allow_busy)
    except BusyMachine as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 3

    subjects: dict[str, SubjectRun] = {}
    columns: dict[str, Sequence[str] | None] = {}
    load_failures: list[dict[str, Any]] = []
    for name in names:
        try:
            subjects[name], columns[name] = load_subject(
                name, compile=args.compile, allow_busy=args.allow_busy
            )
        except Exception as e:  # noqa: BLE001 -- e.g. a subject not written yet, or a missing package
            error = f"import failed: {type(e).__name__}: {e}"[:500]
            load_failures.append(error_row(name, "-", error, {}, benchmark=name))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    load_before, t0 = load_average(), time.perf_counter()
    for r in load_failures:
        r.update(env)

    def write(rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]]) -> Path:
        summary = {**{r["benchmark"]: {"status": "failed", "wall_s": 0.0, "rows": 1} for r in load_failures},
                   **summary}  # fmt: skip
        meta = {
            **env,
            "mode": "quick" if args.quick else "full",
            "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "load_before": load_before,
            "others_cores_before": idle["others_cores"],
            "allow_busy": args.allow_busy,
            "load_after": load_average(),
            "wall_s": time.perf_counter() - t0,
            "subjects": {n: summary[n] for n in names if n in summary},
        }
        return write_suite(load_failures + rows, meta, columns, args.out)

    rows, summary = run_suite(subjects, quick=args.quick, after_each=write, allow_busy=args.allow_busy)
    path = write(rows, summary)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    summary.update({r["benchmark"]: {"status": "failed"} for r in load_failures})
    failed = [n for n, s in summary.items() if s["status"] != "ok"]
    if failed:
        print(f"subjects with failures: {', '.join(failed)}", file=sys.stderr)
    return exit_code(summary)


if __name__ == "__main__":
    raise SystemExit(main())
