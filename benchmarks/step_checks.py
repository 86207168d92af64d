"""What changed in the training step, checked where it matters, on a GPU (benchmarks/gpu_check.sh):

- `adamw`: one AdamW step over sd-f8's 83.7M parameters, fused against for-each (the trainer uses the fused
  kernel wherever torch has it), median of CUDA-event timings (a monotonic clock on a CPU);
- `syncs`: the host syncs of one `Trainer.train_step` under `torch.cuda.set_sync_debug_mode("warn")`, which
  warns at every operation that makes the host wait for the device: the step's one intended sync (the ranks'
  agreement on finite values) and nothing else (tests/test_step_syncs.py counts the same on a CPU by a
  dispatch mode; this is CUDA's own count).

    python -m benchmarks.step_checks adamw syncs --out DIR

Each prints one JSON object and writes it to DIR/step-checks.json; the exit code is 1 when the step syncs
more than once. Runs on a CPU too (`syncs` then says it needs CUDA), so it is checked without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def _median_ms(fn: Any, iters: int, device: torch.device) -> float:
    """Median wall time of fn() in ms after 3 warm-up calls (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def adamw(device: torch.device, preset: str = "sd-f8", iters: int = 20) -> dict[str, Any]:
    """One AdamW step over the preset's parameters (random gradients), fused against for-each."""
    from vae_scale.config import load_config
    from vae_scale.models.interface import build_model

    model = build_model(load_config(preset).model)
    params = [p.detach().to(device).requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    out: dict[str, Any] = {"preset": preset, "parameters": sum(p.numel() for p in params)}
    for name, kwargs in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
        opt = torch.optim.AdamW(params, lr=1e-5, **kwargs)
        out[f"{name}_ms"] = round(_median_ms(opt.step, iters if device.type == "cuda" else 3, device), 3)
        del opt
    out["fused_speedup"] = round(out["foreach_ms"] / out["fused_ms"], 2)
    return out


def syncs(
    device: torch.device, preset: str = "sd-f8", resolution: int = 64, batch: int = 2
) -> dict[str, Any]:
    """Host syncs of one Trainer.train_step, counted by CUDA's sync debug mode (after 2 warm-up steps)."""
    if device.type != "cuda":
        return {"syncs": None, "note": "torch.cuda.set_sync_debug_mode needs CUDA"}
    import tempfile

    from benchmarks.steps import Batches
    from vae_scale.config import load_config
    from vae_scale.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="step-checks-") as d:
        cfg = load_config(
            preset,
            [
                f"data.resolution={resolution}",
                f"data.batch_size={batch}",
                "train.mixed_precision=bf16",
                "log.wandb=disabled",
                f"run.dir={d}/run",
            ],
        )
        inputs = [torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1 for _ in range(2)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer = Trainer(cfg, loader=Batches(inputs))
        for _ in range(2):
            trainer.train_step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    messages = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncs": len(messages), "expected": 1, "messages": messages[:10]}


CHECKS = {"adamw": adamw, "syncs": syncs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checks", nargs="*", default=list(CHECKS), choices=sorted(CHECKS), help="default: all")
    p.add_argument("--out", default=None, help="folder for step-checks.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    for name in args.checks:
        results[name] = CHECKS[name](device)
        print(json.dumps({name: results[name]}), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "step-checks.json").write_text(json.dumps(results, indent=2) + "\n")
    counted = results.get("syncs", {}).get("syncs")
    return 1 if counted is not None and counted > 1 else 0


if __name__ == "__main__":
    raise SystemExit(main())
