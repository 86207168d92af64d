"""Fused kernels against eager PyTorch and torch.compile: the posterior (sample + KL), GroupNorm+SiLU and
RMSNorm+activation.

For each op, size and pass (forward, backward, both): median time with p20/p80, achieved GB/s against the
bytes the op must move, peak extra device memory, and speedups. Sizes are those of real runs (the posterior
of sd-f8 and f8c16 at 256 and 512 px, batch 32; GroupNorm+SiLU at (32, 128, 256, 256) and (32, 512, 64, 64)),
one that fills the GPU, and a small one (where "auto" must not lose to eager). RMSNorm+act at DC-AE's
shapes: its decoder's head (128 channels at full resolution, then ReLU) and a 512-channel ResBlock norm (no
activation).

Bytes each op must move (s = bytes per element, N = elements of mean or x):
  posterior, eps drawn in-kernel:  forward 3 N s (mean, logvar in; z out); backward 5 N s (mean, logvar,
                                   grad_z in; grad_mean, grad_logvar out); both 8 N s. A prior adds 2 N s
                                   forward and 4 N s backward.
  GroupNorm+SiLU:                  forward 2 N s (x in, y out); backward 3 N s (x, grad_y in; grad_x out);
                                   both 5 N s. The two-pass Triton design moves 3 N s and 5 N s (x is read
                                   once for the statistics and again to normalise), so its GB/s tops out at
                                   about 2/3 (forward) and 3/5 (backward) of copy bandwidth by construction.
  RMSNorm+act:                     as GroupNorm+SiLU (two passes each way, the statistics per pixel).

On a GPU the script checks the Triton outputs against eager on the benchmark inputs before timing, rotates
input sets so that small sizes do not run out of L2, and times with CUDA events. On a CPU only eager and
compile run, at small sizes: Triton timings need a GPU (the interpreter measures Python, not the kernel).

    python -m benchmarks.kernels [--quick] [--device cuda|cpu] [--out DIR]
    python -m benchmarks.kernels_static [--baseline main] [--gpus A100,H100,H200,B200] [--out DIR]

The static report needs no GPU: every kernel at these shapes compiled for sm_80, sm_90 and sm_100 and read
(registers, occupancy, waves, instructions per element, predicted time); see benchmarks/kernels_static.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import RESULTS_DIR, device_slug, environment, measure, result_row, write_results
from benchmarks.kernel_sizes import (
    CPU_GROUP_NORM_SIZES,
    CPU_POSTERIOR_SIZES,
    CPU_RMS_NORM_SIZES,
    GROUP_NORM_SIZES,
    POSTERIOR_SIZES,
    RMS_NORM_SIZES,
)
from vae_scale import kernels
from vae_scale.kernels.gaussian import gaussian_sample_kl_reference
from vae_scale.kernels.group_norm import group_norm_silu_reference
from vae_scale.kernels.rms_norm import rms_norm_act_reference

PASSES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = [
    "subject",
    "size",
    "layout",
    "variant",
    "pass",
    "dtype",
    "shape",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gb_per_s",
    "pct_of_copy",
    "peak_mb",
    "x_eager",
    "x_compile",
    "predicted_ms",
    "x_predicted",
]


# --------------------------------------------------------------------------------------------------------
# One benchmark case: inputs (rotated), an op, and the three passes


def _input_sets(make: Callable[[], dict], bytes_per_set: int, device: torch.device) -> list[dict]:
    """Enough independent input sets that cycling through them does not fit in L2 (GPU), else one."""
    if device.type != "cuda":
        return [make()]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return [make() for _ in range(min(8, max(1, math.ceil(3 * l2 / max(bytes_per_set, 1)))))]


class Case:
    """Callables timing forward, backward and both for one op on rotating input sets."""

    def __init__(self, op: Callable, sets: list[dict], grads: Callable[[Any], tuple]):
        self.op, self.sets, self.grads, self.i = op, sets, grads, 0

    def _next(self) -> dict:
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]

    def forward(self):
        return self.op(**self._next())

    def _leaves(self, inputs: dict) -> list[torch.Tensor]:
        return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def setup_backward(self):
        inputs = self._next()
        out = self.op(**inputs)
        return out, self._leaves(inputs)

    def backward(self, state):
        out, leaves = state
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, leaves, self.grads(out))

    def both(self):
        return self.backward(self.setup_backward())


def _peak_extra_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak device memory a call allocates beyond what was allocated before it, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def copy_bandwidth_gb_per_s(device: torch.device) -> float:
    """The ceiling the GB/s columns compare with: a 1 GiB device-to-device copy, bytes read + written."""
    n = 2**30
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, warmup=3, repeats=20)
    return 2 * n / (t.median_ms * 1e-3) / 1e9


def _time_case(case: Case, device: torch.device, repeats: int) -> dict[str, tuple]:
    """{pass: (Timing, peak MiB)}."""
    out = {}
    out["fwd"] = (measure(case.forward, device=device, repeats=repeats), _peak_extra_mb(case.forward, device))
    out["bwd"] = (measure(case.backward, device=device, repeats=repeats, setup=case.setup_backward), None)
    out["fwd+bwd"] = (measure(case.both, device=device, repeats=repeats), _peak_extra_mb(case.both, device))
    return out


# --------------------------------------------------------------------------------------------------------
# The two ops


def _posterior_ops(device: torch.device) -> dict[str, Callable]:
    ops = {"eager": gaussian_sample_kl_reference, "compile": torch.compile(gaussian_sample_kl_reference)}
    if device.type == "cuda" and kernels.HAS_TRITON:
        ops["triton"] = lambda **kw: kernels.gaussian_sample_kl(**kw, impl="triton")
    return ops


def _group_norm_ops(device: torch.device) -> dict[str, Callable]:
    ops = {"eager": group_norm_silu_reference, "compile": torch.compile(group_norm_silu_reference)}
    if device.type == "cuda" and kernels.HAS_TRITON:
        ops["triton"] = lambda **kw: kernels.group_norm_silu(**kw, impl="triton")
    return ops


def _rms_norm_ops(device: torch.device) -> dict[str, Callable]:
    ops = {"eager": rms_norm_act_reference, "compile": torch.compile(rms_norm_act_reference)}
    if device.type == "cuda" and kernels.HAS_TRITON:
        ops["triton"] = lambda **kw: kernels.rms_norm_act(**kw, impl="triton")
    return ops


def _check_posterior(shape, dtype, device):
    """Triton against eager on a given eps (the in-kernel noise differs by design), before any timing."""
    mean, logvar, eps = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    z, kl = kernels.gaussian_sample_kl(mean, logvar, eps, impl="triton")
    z_ref, kl_ref = gaussian_sample_kl_reference(mean.float(), logvar.float(), eps.float())
    torch.testing.assert_close(z.float(), z_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kl.float(), kl_ref, rtol=2e-2, atol=1e-1)


def _check_group_norm(shape, groups, dtype, layout, device):
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    w, b = (
        torch.randn(shape[1], device=device, dtype=dtype),
        torch.randn(shape[1], device=device, dtype=dtype),
    )
    y = kernels.group_norm_silu(x, groups, w, b, impl="triton")
    y_ref = group_norm_silu_reference(x.float(), groups, w.float(), b.float())
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=3e-2)


def _check_rms_norm(shape, act, dtype, layout, device):
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    w, b = (torch.randn(shape[1], device=device, dtype=dtype) for _ in range(2))
    y = kernels.rms_norm_act(x, w, b, act=act, impl="triton")
    y_ref = rms_norm_act_reference(x.float(), w.float(), b.float(), act=act)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=3e-2)


def bench_posterior(sizes, dtype, device, repeats, env) -> list[dict]:
    rows = []
    ops = _posterior_ops(device)
    s = torch.finfo(dtype).bits // 8
    for label, shape in sizes:
        n = math.prod(shape)
        if "triton" in ops:
            _check_posterior(shape, dtype, device)

        def make(shape=shape):
            return {
                "mean": torch.randn(shape, device=device, dtype=dtype, requires_grad=True),
                "logvar": torch.randn(shape, device=device, dtype=dtype, requires_grad=True),
            }

        sets = _input_sets(make, 2 * n * s, device)
        grad_z, grad_kl = (
            torch.randn(shape, device=device, dtype=dtype),
            torch.randn(shape[0], device=device, dtype=dtype),
        )
        results = {
            v: _time_case(Case(op, sets, lambda out, g=(grad_z, grad_kl): g), device, repeats)
            for v, op in ops.items()
        }
        moved = {"fwd": 3 * n * s, "bwd": 5 * n * s, "fwd+bwd": 8 * n * s}
        rows += _rows("gaussian_sample_kl (eps in-kernel)", label, "-", shape, dtype, results, moved, env)
        del sets
    return rows


def bench_group_norm(sizes, dtype, device, repeats, env) -> list[dict]:
    rows = []
    ops = _group_norm_ops(device)
    s = torch.finfo(dtype).bits // 8
    for label, shape, groups in sizes:
        n = math.prod(shape)
        for layout_name, layout in (
            ("NCHW", torch.contiguous_format),
            ("channels_last", torch.channels_last),
        ):
            if "triton" in ops:
                _check_group_norm(shape, groups, dtype, layout, device)

            def make(shape=shape, groups=groups, layout=layout):
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
                return {
                    "x": x.requires_grad_(),
                    "num_groups": groups,
                    # the weights in x's dtype: the fastest eager baseline (fp32 weights would make eager
                    # upcast x); the kernel reads either
                    "weight": torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True),
                    "bias": torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True),
                }

            sets = _input_sets(make, n * s, device)
            grad_y = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
            results = {
                v: _time_case(Case(op, sets, lambda out, g=(grad_y,): g), device, repeats)
                for v, op in ops.items()
            }
            moved = {"fwd": 2 * n * s, "bwd": 3 * n * s, "fwd+bwd": 5 * n * s}
            rows += _rows("group_norm_silu", label, layout_name, shape, dtype, results, moved, env)
            del sets
    return rows


def bench_rms_norm(sizes, dtype, device, repeats, env) -> list[dict]:
    rows = []
    ops = _rms_norm_ops(device)
    s = torch.finfo(dtype).bits // 8
    for label, shape, act in sizes:
        n = math.prod(shape)
        for layout_name, layout in (
            ("NCHW", torch.contiguous_format),
            ("channels_last", torch.channels_last),
        ):
            if "triton" in ops:
                _check_rms_norm(shape, act, dtype, layout, device)

            def make(shape=shape, act=act, layout=layout):
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
                return {
                    "x": x.requires_grad_(),
                    "act": act,
                    # as for GroupNorm: weights in x's dtype, the eager baseline's fastest
                    "weight": torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True),
                    "bias": torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True),
                }

            sets = _input_sets(make, n * s, device)
            grad_y = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
            results = {
                v: _time_case(Case(op, sets, lambda out, g=(grad_y,): g), device, repeats)
                for v, op in ops.items()
            }
            moved = {"fwd": 2 * n * s, "bwd": 3 * n * s, "fwd+bwd": 5 * n * s}
            rows += _rows(f"rms_norm_act ({act})", label, layout_name, shape, dtype, results, moved, env)
            del sets
    return rows


def _rows(subject, label, layout, shape, dtype, results, moved, env) -> list[dict]:
    rows = []
    for p in PASSES:
        eager = results["eager"][p][0].median_ms
        compiled = results["compile"][p][0].median_ms
        for variant, by_pass in results.items():
            timing, peak = by_pass[p]
            rows.append(result_row(
                subject, variant, timing, env, size=label, layout=layout, **{"pass": p},
                dtype=str(dtype).removeprefix("torch."), shape="x".join(map(str, shape)),
                gb_per_s=moved[p] / (timing.median_ms * 1e-3) / 1e9, peak_mb=peak,
                x_eager=eager / timing.median_ms, x_compile=compiled / timing.median_ms,
            ))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------
# Entry points


def run(quick: bool = False, device: str | None = None, only: str | None = None) -> list[dict[str, Any]]:
    """Benchmark every op (or `only` one) on the first GPU (bf16) or on this CPU (fp32, small sizes)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        posterior = POSTERIOR_SIZES if not quick else [POSTERIOR_SIZES[i] for i in (0, 3, 4, 5)]
        group_norm = GROUP_NORM_SIZES
        rms_norm = RMS_NORM_SIZES
        repeats = 10 if quick else 30
    else:
        posterior = CPU_POSTERIOR_SIZES[:1] if quick else CPU_POSTERIOR_SIZES
        group_norm = CPU_GROUP_NORM_SIZES[:1] if quick else CPU_GROUP_NORM_SIZES
        rms_norm = CPU_RMS_NORM_SIZES[:1] if quick else CPU_RMS_NORM_SIZES
        repeats = 3 if quick else 7
    torch.manual_seed(0)
    env = environment(dev)
    rows = []
    if only in (None, "gaussian_sample_kl"):
        rows += bench_posterior(posterior, dtype, dev, repeats, env)
    if only in (None, "group_norm_silu"):
        rows += bench_group_norm(group_norm, dtype, dev, repeats, env)
    if only in (None, "rms_norm_act"):
        rows += bench_rms_norm(rms_norm, dtype, dev, repeats, env)
    if gpu:
        copy = copy_bandwidth_gb_per_s(dev)
        for r in rows:
            r["copy_gb_per_s"], r["pct_of_copy"] = copy, 100 * r["gb_per_s"] / copy
        attach_predictions(rows, env["device"])
    return rows


def attach_predictions(rows: list[dict], device: str, results: Path = RESULTS_DIR) -> None:
    """Beside each Triton row, the static report's predicted time for this GPU (the newest
    kernels-static-*.json): `predicted_ms` and `x_predicted` (measured / predicted). Nothing where none
    matches."""
    reports = sorted(results.glob("kernels-static-*.json"))
    if not reports:
        return
    static = json.loads(reports[-1].read_text())
    family = next((f for f in ("A100", "H100", "H200", "B200") if f in device), None)
    predicted: dict[tuple, float] = {}
    for r in static:
        if family is None or family not in r["gpu"] or r.get("predicted_us") is None:
            continue
        for p in (r["pass"], "fwd+bwd"):
            key = (r["op"], r["size"], r["layout"], p)
            predicted[key] = predicted.get(key, 0.0) + r["predicted_us"] / 1e3
    for r in rows:
        key = (r["subject"].split()[0], r["size"], r["layout"], r["pass"])
        if r["variant"] == "triton" and key in predicted:
            r["predicted_ms"] = predicted[key]
            r["x_predicted"] = r["median_ms"] / predicted[key]


# --------------------------------------------------------------------------------------------------------
# Where impl="auto" should switch: fused against eager over sizes


CROSSOVER_SHAPES = {
    # (B, C, H, W), 16k to 16.8M elements, C and (NCHW) H * W >= 1024 fixed so the tiles stay the same
    "group_norm_silu": [(1, 64, 16, 16), (1, 64, 16, 32)] + [(b, 64, 32, 32) for b in (1, 4, 16, 64, 256)],
    "rms_norm_act": [(1, 64, 16, 16), (1, 64, 16, 32)] + [(b, 64, 32, 32) for b in (1, 4, 16, 64, 256)],
    "gaussian_sample_kl": [(b, 16, 32, 32) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)],
}


def _fwd_bwd(op: str, shape: tuple, layout: str, impl: str, dev: torch.device) -> Callable[[], Any]:
    """One forward + backward of the op with `impl`, bf16, on inputs made once."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    dtype = torch.bfloat16
    if op == "group_norm_silu":
        x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        w, b = (torch.randn(shape[1], device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        grad_y = torch.randn_like(x)

        def call():
            return torch.autograd.grad(kernels.group_norm_silu(x, 32, w, b, impl=impl), (x, w, b), grad_y)

        return call
    if op == "rms_norm_act":
        x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        w, b = (torch.randn(shape[1], device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        grad_y = torch.randn_like(x)

        def call():
            y = kernels.rms_norm_act(x, w, b, act="relu", impl=impl)
            return torch.autograd.grad(y, (x, w, b), grad_y)

        return call
    m, lv = (torch.randn(shape, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    grad_z, grad_kl = torch.randn_like(m), torch.randn(shape[0], device=dev, dtype=dtype)

    def call():
        return torch.autograd.grad(kernels.gaussian_sample_kl(m, lv, impl=impl), (m, lv), (grad_z, grad_kl))

    return call


def crossover(device: str | None = None, repeats: int = 20) -> list[dict[str, Any]]:
    """Fused (impl="triton") against eager (impl="torch") forward + backward, bf16, over sizes: the time of
    one call with the host included (each call is timed alone, so a host slower than the GPU shows). The
    last row per op and layout holds `crossover_numel`: the smallest size from which fused is faster at
    every larger size measured, what kernels.AUTO_MIN_NUMEL should be."""
    dev = torch.device(device or "cuda")
    env = environment(dev)
    rows = []
    for op, shapes in CROSSOVER_SHAPES.items():
        for layout in ("NCHW", "channels_last") if op != "gaussian_sample_kl" else ("-",):
            faster = []
            for shape in shapes:
                times = {
                    impl: measure(
                        _fwd_bwd(op, shape, layout, impl, dev), device=dev, warmup=3, repeats=repeats
                    )
                    for impl in ("torch", "triton")
                }
                n = math.prod(shape)
                faster.append((n, times["triton"].median_ms <= times["torch"].median_ms))
                rows.append(result_row(
                    f"crossover {op}", "triton vs torch", times["triton"], env, layout=layout,
                    shape="x".join(map(str, shape)), numel=n, eager_ms=times["torch"].median_ms,
                    x_eager=times["torch"].median_ms / times["triton"].median_ms,
                ))  # fmt: skip
            rows[-1]["crossover_numel"] = next(
                (n for i, (n, _) in enumerate(faster) if all(f for _, f in faster[i:])), None
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure on this machine's GPU (or CPU)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--static" in argv:
        raise SystemExit("the compiled-kernel report is `python -m benchmarks.kernels_static`")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (about 2 minutes on a CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--only", choices=("gaussian_sample_kl", "group_norm_silu", "rms_norm_act"), help="one op")
    p.add_argument("--crossover", action="store_true", help="fused against eager over sizes (GPU)")
    args = p.parse_args(argv)
    if args.crossover:
        if not torch.cuda.is_available():
            p.error("--crossover needs a GPU: impl='auto' only picks Triton on CUDA")
        rows = crossover(args.device)
        name = f"kernels-crossover-{device_slug(rows[0]['device'])}"
        columns = [
            "subject",
            "layout",
            "shape",
            "numel",
            "eager_ms",
            "median_ms",
            "p20_ms",
            "p80_ms",
            "x_eager",
        ]
        path = write_results(rows, name, columns + ["crossover_numel", "device", "commit"], args.out)
        print(path.with_suffix(".md").read_text())
        return 0
    rows = run(quick=args.quick, device=args.device, only=args.only)
    name = f"kernels-{device_slug(rows[0]['device'])}" if rows else "kernels"
    name += f"-{args.only}" if args.only else ""
    path = write_results(rows, name, COLUMNS + ["device", "torch", "triton", "commit"], args.out)
    print(path.with_suffix(".md").read_text())
    if not any(r["variant"] == "triton" for r in rows):
        print(
            "Triton rows need a GPU: on a CPU the kernels only run through the interpreter, whose timings "
            "measure Python, not the kernels. Run `python -m benchmarks.kernels` on a CUDA machine "
            "(benchmarks/gpu_check.sh does)."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
