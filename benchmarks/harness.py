"""The timing harness every benchmark script shares.

- `measure(fn)`: warm-up, then repeats timed with CUDA events on a GPU or a monotonic clock on a CPU;
  median with p20/p80 in milliseconds. Rotate inputs inside `fn` (pass a list and index by call) when
  caches would otherwise flatter.
- `measure_interleaved(fns)`: several variants timed in alternation, so drift in machine load hits them alike.
- `CorrectnessError`: what a benchmark's correctness gate raises for a variant that is not timed.
- `matmul_rate(device)`: the machine's measured matmul rate, the denominator of MFU.
- `environment()`: device name, versions, git commit and load average recorded with each result row.
- `result_row(...)` / `error_row(...)`: one row of results, or the record of a variant or subject that failed.
- `write_results(rows, name)`: JSON (the data) plus a markdown table under benchmarks/results/.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """Wall time of one call in milliseconds: median and the 20th/80th percentiles over `repeats`."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    def throughput(self, items: float) -> float:
        """Items per second at the median time."""
        return items / (self.median_ms / 1e3)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(
    fn: Callable[..., Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    min_time_s: float = 0.0,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time `fn()`; on CUDA each call is bracketed by events (no host sync inside the timed region).

    With `setup`, each call is `fn(setup())` and only fn is timed (setup runs a forward, fn its backward).
    """
    device = torch.device(device)

    def call() -> tuple[Any, ...]:
        return () if setup is None else (setup(),)

    for _ in range(warmup):
        fn(*call())
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        args = call()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        del args
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def device_name(device: torch.device | str = "cpu") -> str:
    """Human name of the device: the GPU model, or the CPU model with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short commit of the working tree (with -dirty when it has changes), or 'unknown'."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """What every result row records about where and with what it ran."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import vae_scale

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "vae_scale": vae_scale.__version__,
        "commit": git_commit(),
        "date": _dt.date.today().isoformat(),
        "load_1m": load_average(),
    }


def load_average() -> float | None:
    """The 1-minute load average of this machine (None where the OS has none): CPU timings taken while
    other processes load the cores are slower and noisier, so every row records it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def device_slug(name: str) -> str:
    """A file-name-safe short form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    return slug[:48].rstrip("-") or "device"


def peak_memory_mb(device: torch.device | str = "cpu") -> float | None:
    """Peak allocated device memory since the last reset, in MiB (CUDA only; None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def result_row(
    subject: str, variant: str, timing: Timing, env: dict[str, str], **fields: Any
) -> dict[str, Any]:
    """One result: subject, variant, timing, the caller's fields (dtype, shape, ...), environment."""
    return {"subject": subject, "variant": variant, **fields, **asdict(timing), **env}


def error_row(subject: str, variant: str, error: str, env: dict[str, str], **fields: Any) -> dict[str, Any]:
    """The record of a variant or subject that was refused or failed: no timing, the reason in `error`."""
    return {"subject": subject, "variant": variant, **fields, "error": error, **env}


class CorrectnessError(AssertionError):
    """A variant's result disagrees with the reference beyond tolerance, so it is not timed."""


def matmul_rate(device: torch.device | str = "cpu", target_s: float = 1.0) -> dict[str, Any]:
    """The device's measured dense matmul rate, the denominator of MFU.

    CUDA: a bf16 8192^3 product, median of CUDA-event timings after warm-up. CPU: an fp32 square product
    grown until one takes about `target_s` seconds, run both by BLAS (`a @ b`) and by oneDNN (as a 1x1
    convolution, the library that runs the model's convolutions); the faster of the two, and the fastest of
    3 runs of each: a ceiling, which on a machine shared with other programs the median would understate.
    Returns matmul_tflop_per_s, matmul_dtype, matmul_n, matmul_impl.
    """
    device = torch.device(device)
    if device.type == "cuda":
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        t = measure(lambda: a @ b, device=device, warmup=3, repeats=10)
        return {
            "matmul_tflop_per_s": 2 * n**3 / (t.median_ms * 1e-3) / 1e12,
            "matmul_dtype": "bfloat16",
            "matmul_n": n,
            "matmul_impl": "cublas",
        }
    n = 512
    while True:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = measure(lambda a=a, b=b: a @ b, warmup=1, repeats=1)
        if t.median_ms >= 1e3 * target_s / 2 or n >= 8192:
            break
        n = int(n * max(1.25, min(2.0, (1e3 * target_s / max(t.median_ms, 1e-3)) ** (1 / 3))))
    x, w = a.t().reshape(1, n, n, 1), b.t().reshape(n, n, 1, 1)  # (1, K, M, 1) conv (N, K, 1, 1): a 1x1 conv
    best = {
        impl: min(measure(fn, warmup=0, repeats=1).median_ms for _ in range(3))
        for impl, fn in (("blas", lambda: a @ b), ("onednn", lambda: torch.nn.functional.conv2d(x, w)))
    }
    impl = min(best, key=best.get)
    return {
        "matmul_tflop_per_s": 2 * n**3 / (best[impl] * 1e-3) / 1e12,
        "matmul_dtype": "float32",
        "matmul_n": n,
        "matmul_impl": impl,
    }


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `columns` (missing values blank; floats to 3 significant digits)."""

    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    rows: list[dict[str, Any]], name: str, columns: Sequence[str], out_dir: Path | None = None
) -> Path:
    """Write rows as `<out_dir>/<name>.json` and `<name>.md`; returns the JSON path."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    env = rows[0] if rows else {}
    where = f"{env.get('device', '')}, torch {env.get('torch', '')}, commit {env.get('commit', '')}"
    header = f"# {name}\n\n{where}\n\n"
    (out_dir / f"{name}.md").write_text(header + markdown_table(rows, columns) + "\n")
    return path


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    errors: dict[str, BaseException] | None = None,
) -> dict[str, Timing]:
    """Time several variants in alternation (A B C, C B A, ...) so drift in machine load hits them alike.

    Odd rounds run in reverse order, so no variant always follows the same one. With `errors` (a dict), a
    variant that raises is recorded there and dropped, and the others go on; without it the error propagates.
    """
    fns = dict(fns)

    def attempt(name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 -- recorded for the caller, who asked for it
            if errors is None:
                raise
            errors[name] = e
            fns.pop(name, None)
            return None

    for name, fn in list(fns.items()):
        for _ in range(warmup):
            if attempt(name, fn) is None and name not in fns:
                break
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns.items())
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t = attempt(name, lambda fn=fn: measure(fn, device=device, warmup=0, repeats=1))
            if t is not None:
                samples[name].append(t.median_ms)
    out = {}
    for name, times in samples.items():
        if name not in fns or not times:
            continue
        times.sort()
        out[name] = Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))
    return out
