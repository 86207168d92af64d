#!/usr/bin/env bash
# Everything that needs a GPU, in one command (one device-tool call):
#   1. nvidia-smi and the versions of python, torch, CUDA and triton;
#   2. the machine's two ceilings: a 1 GiB device-to-device copy (GB/s, bytes read + written) and a bf16
#      8192^3 matmul (TFLOP/s), medians of CUDA-event timings after warm-up, on random data;
#   3. the gpu-marked tests: the kernels' first, stopping at the first failure (`pytest -m gpu -x -q`),
#      then those of the whole suite (modules whose imports are missing on the GPU machine are reported
#      and skipped, not fatal);
#   4. the benchmark suite in GPU mode (`python -m benchmarks.run --full`): the training step (ours against
#      diffusers' AutoencoderKL, eager and compiled, with each toggle), the kernels, the data loader and
#      scaling, as one JSON + markdown.
# Everything it prints is also written under $OUT (default benchmarks/results): env.txt, ceilings.json,
# pytest-gpu-kernels.txt, pytest-gpu-all.txt, bench.log, <gpu>-<date>.json/.md (7 files: the device tool
# brings back at most 8).
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
#   BENCH_ARGS="--quick" ...                      # the shorter benchmark (default --full)
#   BENCH_ARGS="--full --only train_step" ...     # one subject; SKIP_TESTS=1 skips step 3
#
# Packages missing on the GPU machine (diffusers, for the comparison; webdataset and braceexpand, for the
# data benchmark) are installed from wheels in .whl/ when that folder is there (carry it; see GPU.md).
#
# It exits non-zero if a test or the benchmark failed. It changes no clock, power or other card setting.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real kernels, not the interpreter
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== 1. machine and versions"
{
  nvidia-smi
  "$PY" - <<'EOF'
import sys

import torch
import triton

print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"triton {triton.__version__}")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
      f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== 2. ceilings"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/ceilings.json"
import json

import torch


def median_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


n = 2**30
src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
dst = torch.empty_like(src)
copy_ms = median_ms(lambda: dst.copy_(src), 20)
del src, dst
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
mm_ms = median_ms(lambda: a @ b, 10)
print(json.dumps({
    "device": torch.cuda.get_device_name(0),
    "copy_gb_per_s": 2 * n / (copy_ms * 1e-3) / 1e9,
    "copy_bytes": 2 * n,
    "bf16_matmul_8192_tflop_per_s": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12,
}, indent=2))
EOF

echo "== 3. gpu tests"
if [ -z "${SKIP_TESTS:-}" ]; then
"$PY" -m pytest -m gpu -x -q -p no:cacheprovider \
  tests/test_kernels_gaussian.py tests/test_kernels_group_norm.py tests/test_kernels_model.py 2>&1 \
  | tee "$OUT/pytest-gpu-kernels.txt" || status=1
"$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors 2>&1 \
  | tee "$OUT/pytest-gpu-all.txt" || status=1
fi

echo "== 4. benchmark suite"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
"$PY" -m benchmarks.run ${BENCH_ARGS:---full} --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1

echo "== done (status $status): files under $OUT"
ls -l "$OUT"
exit $status
