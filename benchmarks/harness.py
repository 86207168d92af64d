"""The timing harness every benchmark script shares.

- `measure(fn)`: warm-up, then repeats timed with CUDA events on a GPU or a monotonic clock on a CPU;
  median with p20/p80 in milliseconds. Rotate inputs inside `fn` (pass a list and index by call) when
  caches would otherwise flatter.
- `measure_interleaved(fns)`: several variants timed in alternation, so drift in machine load hits them alike;
  each Timing keeps its samples in round order, so `paired_ratio` can pair them round by round.
- `paired_ratio(ref, ours)` / `median_interval(values)`: a speed ratio between two variants with its
  distribution-free 95% confidence interval (order statistics of the paired ratios).
- `LoadSampler` / `check_idle()`: what other processes take of the machine, sampled during a run; a run is
  refused (`BusyMachine`) or its rows flagged when that exceeds `BUSY_FRACTION` of the cores.
- `CorrectnessError`: what a benchmark's correctness gate raises for a variant that is not timed.
- `peak_rate(device, precision)`: the stated peak that MFU divides by (a datasheet on GPU, an idle
  measurement on a CPU); `mfu()` never reports above 100%.
- `matmul_rate(device)`: the machine's measured matmul rate (the CPU peak, measured once on an idle machine).
- `environment()`: device name, versions, git commit and load average recorded with each result row.
- `result_row(...)` / `error_row(...)`: one row of results, or the record of a variant or subject that failed.
- `write_results(rows, name)`: JSON (the data) plus a markdown table under benchmarks/results/.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """Wall time of one call in milliseconds: median and the 20th/80th percentiles over `repeats`, and the
    samples themselves in the order they were taken (round by round when timed in alternation)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    samples_ms: list[float] = field(default_factory=list)

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
    return timing_of(times)


def timing_of(samples: Sequence[float]) -> Timing:
    """The Timing of samples in milliseconds, kept in the order given."""
    s = sorted(samples)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s), list(samples))


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
    return {name: timing_of(times) for name, times in samples.items() if name in fns and times}


# --------------------------------------------------------------------------------------------------------
# Ratios with a confidence interval

CONFIDENCE = 0.95  # of every interval on a "vs" ratio


def _binomial_cdf_half(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float] | None:
    """A distribution-free confidence interval on the median of `values`: (low, high, coverage).

    The interval is [x_(k), x_(n+1-k)] of the sorted values, with the largest k whose exact coverage,
    1 - 2 P(Binomial(n, 1/2) <= k - 1), is at least `confidence` (the sign test's interval: it assumes only
    independent samples, no distribution). None when there are too few values for any k (under 6 at 95%).
    """
    v, n = sorted(values), len(values)
    best = None
    for k in range(1, n // 2 + 1):
        coverage = 1 - 2 * _binomial_cdf_half(k - 1, n)
        if coverage < confidence:
            break
        best = (v[k - 1], v[n - k], coverage)
    return best


def repeats_for(confidence: float = CONFIDENCE) -> int:
    """The fewest paired samples whose interval at `confidence` leaves out the most extreme ratio at each
    end, so that no single disturbed step sets a bound: 9 at 95% (k = 2, coverage 0.961)."""
    n = 2
    while True:
        got = median_interval(range(n), confidence)
        if got is not None and got[0] > 0:
            return n
        n += 1


def paired_ratio(reference: Timing, timing: Timing, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """How many times faster `timing` is than `reference`, from samples paired round by round (both timed
    in alternation by `measure_interleaved`): the median of reference_i / timing_i and its interval.

    Returns ratio (the median), ratio_lo and ratio_hi (None when too few pairs), ratio_coverage and
    ratio_pairs. Pairing cancels drift that hits both variants of a round alike.
    """
    ratios = [r / t for r, t in zip(reference.samples_ms, timing.samples_ms, strict=False) if t > 0]
    if not ratios:  # timings built without their samples: the ratio of medians, no interval
        return {"ratio": reference.median_ms / timing.median_ms, "ratio_lo": None, "ratio_hi": None,
                "ratio_coverage": None, "ratio_pairs": 0}  # fmt: skip
    interval = median_interval(ratios, confidence)
    lo, hi, coverage = interval if interval is not None else (None, None, None)
    return {"ratio": statistics.median(ratios), "ratio_lo": lo, "ratio_hi": hi,
            "ratio_coverage": coverage, "ratio_pairs": len(ratios)}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# The machine's load during a run

# A run is busy when other processes took more than this fraction of the machine's cores on average
# while it ran: 10%, a fifth of a core on 2 cores. CPU timings under more than that move by more than
# the differences the benchmarks look for (a descheduled OpenMP thread stalls every op of its process).
BUSY_FRACTION = 0.10
SAMPLE_S = 0.5


class BusyMachine(RuntimeError):
    """Other processes load the machine beyond BUSY_FRACTION of its cores: its timings would not hold."""


def _tree_cpu_s(root: Any) -> float:
    """CPU seconds of `root` and all its descendants, the reaped ones included (through children_*)."""
    import psutil

    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # exited between the listing and the read: its time moves to its parent
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class LoadSampler:
    """What other processes take of the machine while a block runs, sampled every `interval` seconds by a
    thread: the system's busy CPU time less that of this process and its descendants (benchmark
    subprocesses are its own), in cores, and the 1-minute load average.

        with LoadSampler() as load:
            ...
        load.summary()  # {"load_1m": ..., "others_cores": ..., "machine_cores": ..., "busy": ...}
    """

    def __init__(self, interval: float = SAMPLE_S, threshold: float = BUSY_FRACTION):
        import psutil

        self.interval, self.threshold = interval, threshold
        self._me = psutil.Process()
        self.cores = psutil.cpu_count() or 1
        self.others: list[float] = []  # cores used by other processes in each interval
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy_s = self._own_s = self._t = 0.0

    def _read(self) -> tuple[float, float, float]:
        import psutil

        t = psutil.cpu_times()
        # user and nice already include guest and guest_nice; steal (other guests of the host) counts as busy
        idle = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
        return sum(t) - idle, _tree_cpu_s(self._me), time.monotonic()

    def sample(self) -> None:
        """Take one sample: others' cores since the previous one."""
        busy, own, now = self._read()
        if now > self._t:
            self.others.append(max(0.0, (busy - self._busy_s) - (own - self._own_s)) / (now - self._t))
        self._busy_s, self._own_s, self._t = busy, own, now
        if (load := load_average()) is not None:
            self.loads.append(load)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> LoadSampler:
        self._busy_s, self._own_s, self._t = self._read()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def summary(self) -> dict[str, Any]:
        """load_1m (the highest seen), others_cores (mean) and others_cores_max, machine_cores, busy
        (others' mean above the threshold), load_samples."""
        mean = statistics.fmean(self.others) if self.others else 0.0
        return {
            "load_1m": max(self.loads) if self.loads else load_average(),
            "others_cores": round(mean, 3),
            "others_cores_max": round(max(self.others, default=0.0), 3),
            "machine_cores": self.cores,
            "busy": mean > self.threshold * self.cores,
            "load_samples": len(self.others),
        }


def busy_message(load: dict[str, Any], when: str) -> str:
    """One line saying how busy the machine was and what the threshold is."""
    return (
        f"machine busy {when}: other processes used {load['others_cores']:.2f} of {load['machine_cores']} "
        f"cores on average (threshold {BUSY_FRACTION:.0%} of the cores; load average {load['load_1m']})"
    )


def check_idle(allow_busy: bool = False, seconds: float = 2.0) -> dict[str, Any]:
    """Sample the machine for `seconds` before a run; BusyMachine when others load it beyond the
    threshold, unless `allow_busy` (then the returned summary says busy and the run goes on, flagged)."""
    with LoadSampler() as load:
        time.sleep(seconds)
    got = load.summary()
    if got["busy"] and not allow_busy:
        raise BusyMachine(
            busy_message(got, "before the run") + "; rerun when it is idle, or pass --allow-busy"
        )
    return got


# figures that depend on the machine's speed: dropped from a row refused for a busy machine
SPEED_KEYS = ("median_ms", "p20_ms", "p80_ms", "samples_ms", "mfu_pct", "speedup", "efficiency")
SPEED_PREFIXES = ("images_per_s", "x_", "gb_per_s", "ratio")


def stamp_load(rows: list[dict[str, Any]], load: dict[str, Any], allow_busy: bool) -> list[dict[str, Any]]:
    """Record the load sampled while `rows` were measured in each (rows that sampled a finer window keep
    theirs). A busy row is flagged; unless `allow_busy` its speed figures are dropped and it becomes an
    error row ("refused: machine busy ...")."""
    for r in rows:
        if "others_cores" not in r:
            r.update(
                {k: load[k] for k in ("load_1m", "others_cores", "others_cores_max", "machine_cores", "busy")}
            )
        if not r.get("busy") or allow_busy or "error" in r:
            continue
        for k in [k for k in r if k in SPEED_KEYS or k.startswith(SPEED_PREFIXES)]:
            del r[k]
        r["error"] = "refused: " + busy_message(r, "while it was measured")
    return rows


# --------------------------------------------------------------------------------------------------------
# The peak MFU divides by

# Dense peaks in TFLOP/s of NVIDIA's datasheets (the A100, H100 and H200 Tensor Core GPU datasheets and the
# HGX/DGX B200 datasheet, per GPU); the datasheets print the tensor-core figures with 2:4 sparsity, halved
# here. fp32 is the CUDA-core rate; tf32 the tensor-core rate fp32 convolutions get when
# torch.backends.cudnn.allow_tf32 is on (torch's default). First match of the device name wins.
DATASHEET_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0}),  # SXM5
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM4 and PCIe alike
]


def datasheet_peak(name: str, precision: str) -> tuple[float, str] | None:
    """(dense peak TFLOP/s, the row it came from) for a GPU name and fp32 | bf16 | fp16; None if unknown."""
    if precision == "fp32" and torch.backends.cudnn.allow_tf32:
        precision = "tf32"
    for key, peaks in DATASHEET_PEAKS:
        if key.lower() in name.lower():
            return peaks[precision], f"NVIDIA {key} datasheet, {precision} dense"
    return None


def _cpu_peak_path(name: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vae-scale"
    capability = torch.backends.cpu.get_cpu_capability()
    return cache / f"cpu-peak-{device_slug(name)}-torch{torch.__version__}-{capability.lower()}.json"


def peak_rate(
    device: torch.device | str = "cpu", precision: str = "fp32", target_s: float = 1.0
) -> dict[str, Any]:
    """The peak MFU divides by: peak_tflop_per_s and peak_source, or peak_tflop_per_s None with peak_note.

    GPU: the datasheet's dense figure for the device and precision (DATASHEET_PEAKS). CPU: fp32 only, the
    matmul rate measured once on an idle machine and cached (~/.cache/vae-scale/cpu-peak-*.json, with the
    load it was measured at); on a busy machine it is not measured, and MFU goes without. `target_s`:
    matmul_rate's.
    """
    device = torch.device(device)
    name = device_name(device)
    if device.type == "cuda":
        got = datasheet_peak(name, precision)
        if got is None:
            return {"peak_tflop_per_s": None, "peak_note": f"no datasheet peak for {name}"}
        return {"peak_tflop_per_s": got[0], "peak_source": got[1]}
    if precision != "fp32":
        return {"peak_tflop_per_s": None, "peak_note": f"the CPU peak is measured in fp32, not {precision}"}
    path = _cpu_peak_path(name)
    if path.exists():
        cached = json.loads(path.read_text())
        return {"peak_tflop_per_s": cached["matmul_tflop_per_s"], "peak_source": f"idle measurement, {path}"}
    with LoadSampler() as sampler:
        rate = matmul_rate(device, target_s)
    load = sampler.summary()
    if load["busy"]:
        return {
            "peak_tflop_per_s": None,
            "peak_note": "no idle CPU peak: " + busy_message(load, "while it was measured"),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**rate, "device": name, "date": _dt.date.today().isoformat(), "load": load}))
    tmp.replace(path)
    return {"peak_tflop_per_s": rate["matmul_tflop_per_s"], "peak_source": f"idle measurement, {path}"}


def mfu(flops: float | None, median_ms: float, peak: dict[str, Any]) -> dict[str, Any]:
    """mfu_pct: model FLOPs per second over the stated peak, in percent; never above 100: a step faster
    than the peak means the peak is wrong, and the row says so in mfu_note instead of a figure."""
    tflops = peak.get("peak_tflop_per_s")
    if not flops or not tflops:
        return {"mfu_pct": None, "mfu_note": peak.get("peak_note")}
    rate = flops / (median_ms * 1e-3) / 1e12
    if rate > tflops:
        note = f"peak wrong: the step ran {rate:.3g} TFLOP/s, above the stated {tflops:.3g}"
        return {"mfu_pct": None, "mfu_note": note}
    return {"mfu_pct": 100 * rate / tflops, "mfu_note": None}
