"""The timing harness every benchmark script shares.

- `measure(fn)`: warm-up, then repeats timed with CUDA events on a GPU or a monotonic clock on a CPU;
  median with p20/p80 in milliseconds. Rotate inputs inside `fn` (pass a list and index by call) when
  caches would otherwise flatter.
- `environment()`: device name, versions and git commit recorded with each result row.
- `write_results(rows, name)`: JSON (the data) plus a markdown table under benchmarks/results/.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
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
    }


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
) -> dict[str, Timing]:
    """Time several variants in alternation (A B A B ...) so drift in machine load hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(measure(fn, device=device, warmup=0, repeats=1).median_ms)
    out = {}
    for name, times in samples.items():
        times.sort()
        out[name] = Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))
    return out
