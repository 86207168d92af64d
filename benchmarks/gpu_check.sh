#!/usr/bin/env bash
# Everything that needs a GPU, in one command (one device-tool call), most important first, and under
# 10 minutes on one H100/H200: BUDGET_S (default 570) seconds from the start, each step cut off at its cap
# (seconds, below) or the time left, whichever comes first, so a slow step shortens the later ones and
# never the call:
#   1. nvidia-smi and the versions of python, torch, CUDA and triton
#   2. the kernel tests on the GPU, stopping at the first failure (`pytest -m gpu -x`)              (200)
#   3. the kernel benchmarks, measured, beside the static report's prediction for this GPU:
#      `python -m benchmarks.kernels --quick --only <op>`, one op at a time                 (80, 100, 80)
#   4. where impl="auto" should switch to Triton: `python -m benchmarks.kernels --crossover`,
#      fused against eager over sizes (kernels.AUTO_MIN_NUMEL is set from it)                        (60)
#   5. the machine's two ceilings: a 1 GiB device-to-device copy (GB/s, bytes read + written) and
#      a bf16 8192^3 matmul (TFLOP/s), medians of CUDA-event timings after warm-up                   (20)
#   5b. the step's changes: one AdamW step over sd-f8, fused against for-each, and the host syncs of one
#      Trainer.train_step under torch.cuda.set_sync_debug_mode("warn") (one expected; more fails the
#      step): `python -m benchmarks.step_checks`                                                     (60)
#   5c. the memory layout: the trainer's step on sd-f8, 256 px, batch 8, bf16, channels_last against
#      NCHW, eager and compiled (train.compile: model and objective), beside diffusers in each layout,
#      paired rounds with 95% intervals: model.channels_last=auto takes channels_last on CUDA      (240)
#   5d. the dry-run's memory estimate against torch.cuda.max_memory_allocated of the trainer's step,
#      sd-f8 bf16 at 256 px batch 8 and 512 px batch 4, checkpointing off and on
#      (`python -m benchmarks.memory --case ...`)                                                  (90)
#   6. the other gpu-marked tests (modules whose imports are missing here are reported, not fatal)
#   7. the rest of the benchmark suite (`python -m benchmarks.run`, BENCH_ARGS, default --quick
#      without the kernels, already measured)
# What it prints is also written under $OUT (default benchmarks/results): env.txt, pytest-gpu-kernels.txt,
# kernels-*.json/.md, kernels-crossover-*.json/.md, ceilings.json, step-checks.json, train_step-*.json/.md
# (the layout), memory-*.json/.md, pytest-gpu-all.txt, bench.log and the suite's <gpu>-<date>.json/.md.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
#   BUDGET_S=1200 BENCH_ARGS="--full" ...        # a longer session: the full suite at the end
#   SKIP_TESTS=1 ...                              # benchmarks only
#
# Packages missing on the GPU machine (diffusers, for the comparison; webdataset and braceexpand, for the
# data benchmark) are installed from wheels in .whl/ when that folder is there (carry it; see GPU.md).
#
# It exits non-zero if a test or a benchmark failed or ran out of time. It changes no clock, power or other
# card setting.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-570}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real kernels, not the interpreter
START=$(date +%s)
status=0

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME MIN_SECONDS MAX_SECONDS FUNCTION: runs the function for at most MAX_SECONDS and the time left
# (skipped when under MIN_SECONDS are left)
step() {
  local name=$1 min=$2 max=$3 fn=$4 t rc
  t=$(left)
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt "$min" ]; then
    echo "== $name: skipped, ${t}s left of ${BUDGET_S}s"
    status=1
    return
  fi
  echo "== $name (at $(($(date +%s) - START))s, ${t}s left)"
  timeout --signal=INT --kill-after=10 "$t" bash -c "$fn"
  rc=$?
  [ $rc -eq 124 ] && echo "== $name: out of time"
  [ $rc -ne 0 ] && status=1
}

kernel_tests() {
  "$PY" -m pytest -m gpu -x -q -p no:cacheprovider \
    tests/test_kernels_gaussian.py tests/test_kernels_group_norm.py tests/test_kernels_rms_norm.py \
    tests/test_kernels_model.py 2>&1 |
    tee "$OUT/pytest-gpu-kernels.txt"
  return "${PIPESTATUS[0]}"
}

kernel_bench() { # $1: the op; results in kernels-<gpu>-<op>.json/.md, with the static prediction beside
  "$PY" -m benchmarks.kernels --quick --only "$1" --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}
posterior_bench() { kernel_bench gaussian_sample_kl; }
group_norm_bench() { kernel_bench group_norm_silu; }
rms_norm_bench() { kernel_bench rms_norm_act; }

crossover() {
  "$PY" -m benchmarks.kernels --crossover --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}

ceilings() {
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
  return "${PIPESTATUS[0]}"
}

step_checks() {
  "$PY" -m benchmarks.step_checks --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}

layout() {
  "$PY" -m benchmarks.train_step --preset sd-f8 --resolution 256 --batch 8 --precision bf16 --compile \
    --variants "vae-scale channels_last,vae-scale,vae-scale channels_last compile,diffusers channels_last,diffusers" \
    --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}

memory() {
  "$PY" -m benchmarks.memory --case sd-f8,256,8,bf16,false --case sd-f8,256,8,bf16,true \
    --case sd-f8,512,4,bf16,false --case sd-f8,512,4,bf16,true --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}

other_tests() {
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --ignore=tests/test_kernels_gaussian.py --ignore=tests/test_kernels_group_norm.py \
    --ignore=tests/test_kernels_rms_norm.py --ignore=tests/test_kernels_model.py 2>&1 |
    tee "$OUT/pytest-gpu-all.txt"
  return "${PIPESTATUS[0]}"
}

suite() {
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  "$PY" -m benchmarks.run ${BENCH_ARGS:---quick} --only train_step,data,scaling --out "$OUT" 2>&1 |
    tee -a "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}

export PY OUT BENCH_ARGS
export -f kernel_tests kernel_bench posterior_bench group_norm_bench rms_norm_bench crossover ceilings \
  step_checks layout memory other_tests suite

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

# the caps keep each step from starving the ones after it; together they fit the default budget
[ -z "${SKIP_TESTS:-}" ] && step "2. kernel tests on the GPU" 60 200 kernel_tests
step "3a. kernel benchmark: posterior" 30 80 posterior_bench
step "3b. kernel benchmark: GroupNorm+SiLU" 30 100 group_norm_bench
step "3c. kernel benchmark: RMSNorm+act" 30 80 rms_norm_bench
step "4. AUTO_MIN_NUMEL crossover" 30 60 crossover
step "5. ceilings" 10 20 ceilings
step "5b. step: fused AdamW, host syncs" 30 60 step_checks
step "5c. layout: channels_last against NCHW" 60 240 layout
step "5d. memory: estimate against measured peak" 30 90 memory
[ -z "${SKIP_TESTS:-}" ] && step "6. other gpu tests" 30 "$BUDGET_S" other_tests
step "7. benchmark suite" 60 "$BUDGET_S" suite

echo "== done (status $status) in $(($(date +%s) - START))s: files under $OUT"
ls -l "$OUT"
exit $status
