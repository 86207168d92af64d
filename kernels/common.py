"""What the kernel files share: the optional triton import, output buffers, NaN-faithful math, and launch
geometry (how many programs a grid gets).

The grid rule. A streaming kernel here is a set of rows (a sample, or a sample's block of channels), each cut
into `tiles` equal tiles. Each row is split into contiguous runs of tiles and each program takes one run or
several consecutive whole rows, so a reduction stays one fixed-order loop per run plus a fixed-order combine
of the runs (deterministic). How many
programs run at once (`slots`) is the SM count times the blocks per SM that the compiled kernel allows: its
registers (allocated per warp in units of 256), its shared memory (plus 1 KiB per block the driver reserves
on sm_80 and later), its threads, and the per-SM block limit. The programs then run in waves of `slots`, and
the time of the launch is about (number of waves) x (tiles of the longest program), which `grid` minimises
(fewest programs among equals). A grid just over one wave would cost a whole second wave for a few
programs; the search instead cuts rows into finer runs, or, when there are many more rows than slots, gives
each program several whole rows, until the last wave is nearly full or the work fits in fewer waves. Under
the interpreter (CPU tensors) a handful of programs stands in for the GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON, TRITON_IMPORT_ERROR = True, None
except ImportError as e:  # triton is optional (macOS, Windows): the eager references still work

    class _MissingTriton:
        """Stands in for triton and triton.language so the kernel definitions still parse."""

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def constexpr(value):
            return value

    triton = tl = _MissingTriton
    HAS_TRITON, TRITON_IMPORT_ERROR = False, e

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Programs per launch under the CPU interpreter: enough to exercise splits, few enough to stay quick.
INTERPRETER_SLOTS = 4

# A per-program fixed cost (loading a row's parameters, writing its partial sums), in tiles: it keeps the
# search from cutting rows into one-tile runs when that buys nothing.
PROGRAM_OVERHEAD_TILES = 0.25


def require_triton(dtype: torch.dtype) -> None:
    """Raise the error a caller of impl="triton" needs when triton is missing or the dtype is unsupported."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"impl='triton' needs the triton package, which did not import: {TRITON_IMPORT_ERROR}"
        )
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32, bfloat16 or float16 tensors, got {dtype}")


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fill goes through here, so a test can hand out NaN-filled ones instead."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------------
# NaN-faithful math shared by the kernels


@triton.jit
def clamp_nan(x, lo, hi):
    """clamp(x, lo, hi) that keeps NaN, as torch.clamp does.

    tl.minimum/tl.maximum default to PTX min/max without .NaN, which return the other operand: a NaN would
    come out as lo or hi, finite, and a diverging model would look healthy.
    """
    return tl.clamp(x, lo, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def silu_parts(u):
    """(sigmoid(u), u * sigmoid(u)) in three instructions and two special-function ops.

    exp2 of a pre-scaled argument is one MUFU.EX2 (tl.exp adds denormal handling we do not need: 1 + a
    denormal is 1), and 1 / d for d >= 1 is rsqrt(d)^2 (MUFU.RSQ and a multiply, about 2^-22 relative error)
    instead of a full-range division. Limits match the eager op: u = +inf gives (1, inf), u = -inf gives
    (0, NaN) as -inf * 0, NaN gives NaN.
    """
    r = tl.rsqrt(1.0 + tl.exp2(u * -1.4426950408889634))
    sig = r * r
    return sig, u * sig


# --------------------------------------------------------------------------------------------------------
# Launch geometry


@dataclass(frozen=True)
class GPU:
    """What decides how many blocks of a kernel an SM holds, and how many SMs there are."""

    name: str
    arch: int  # compute capability as 80, 90, 100
    sms: int
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024  # bytes that blocks can use
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    reserved_smem_per_block: int = 1024


# Blocks per SM by compute capability where torch does not report it (CUDA occupancy tables).
_MAX_BLOCKS_PER_SM = {75: 16, 80: 32, 86: 16, 87: 16, 89: 24, 90: 32, 100: 32, 103: 32, 120: 32}


@functools.cache
def _cuda_gpu(index: int) -> GPU:
    p = torch.cuda.get_device_properties(index)
    arch = 10 * p.major + p.minor
    return GPU(
        name=p.name,
        arch=arch,
        sms=p.multi_processor_count,
        regs_per_sm=getattr(p, "regs_per_multiprocessor", 65536),
        smem_per_sm=getattr(p, "shared_memory_per_multiprocessor", 228 * 1024),
        max_threads_per_sm=getattr(p, "max_threads_per_multi_processor", 2048),
        max_blocks_per_sm=_MAX_BLOCKS_PER_SM.get(arch, 16),
    )


def gpu_of(device: torch.device) -> GPU | None:
    """The GPU a launch on `device` runs on; None for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return None
    return _cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())


def blocks_per_sm(n_regs: int, shared_bytes: int, num_warps: int, gpu: GPU) -> int:
    """Resident blocks per SM of a kernel, as the CUDA occupancy calculator counts them.

    Registers: each warp takes n_regs * 32 rounded up to 256, from one of the SM's four sub-partitions
    (a quarter of its register file each). Shared memory: the kernel's plus the block's reserved KiB.
    """
    regs_per_warp = math.ceil(max(n_regs, 1) * 32 / 256) * 256
    warps_by_regs = 4 * (gpu.regs_per_sm // 4 // regs_per_warp)
    by_regs = warps_by_regs // num_warps
    by_threads = gpu.max_threads_per_sm // (32 * num_warps)
    by_smem = gpu.smem_per_sm // (shared_bytes + gpu.reserved_smem_per_block)
    return max(1, min(by_regs, by_threads, by_smem, gpu.max_blocks_per_sm))


_BLOCKS_PER_SM: dict[tuple, int] = {}


def occupancy(kernel, args: tuple, meta: dict, device: torch.device) -> tuple[int, GPU | None]:
    """(blocks per SM, GPU) of `kernel` compiled for these arguments on `device`; (1, None) on CPU tensors.

    The first call per (kernel, GPU, compile-time arguments, dtypes) compiles the kernel (triton's warmup,
    which fills the cache the launch then hits) and reads its registers and shared memory.
    """
    gpu = gpu_of(device)
    if gpu is None:
        return 1, None
    dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    key = (kernel.fn.__name__, gpu, tuple(sorted(meta.items())), dtypes)
    if key not in _BLOCKS_PER_SM:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        compiled._init_handles()
        n_regs, shared, warps = compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps
        _BLOCKS_PER_SM[key] = blocks_per_sm(n_regs, shared, warps, gpu)
    return _BLOCKS_PER_SM[key], gpu


def slots(kernel, args: tuple, meta: dict, device: torch.device) -> int:
    """How many programs of `kernel`, compiled for these arguments, run at once on `device` (SMs x blocks
    per SM); INTERPRETER_SLOTS under the interpreter."""
    per_sm, gpu = occupancy(kernel, args, meta, device)
    return INTERPRETER_SLOTS if gpu is None else per_sm * gpu.sms


@dataclass(frozen=True)
class Grid:
    """How a launch cuts `rows` rows of `tiles` tiles each: every row into `splits` runs of `tiles_per_split`
    tiles (a row's last run may be shorter), and the rows * splits runs, in order, into programs of
    `runs_per_program` consecutive runs."""

    splits: int
    tiles_per_split: int
    runs_per_program: int
    programs: int


@functools.lru_cache(maxsize=4096)
def grid(rows: int, tiles: int, slots: int) -> Grid:
    """The grid rule (module docstring): minimise waves x (tiles of the longest program + overhead per run).

    Cutting rows into runs helps when there are fewer rows than slots; giving a program several runs helps
    when the last wave would otherwise run mostly empty. Among equal costs the fewest programs win. Grids
    of more than 32 waves are not considered (their last wave costs at most 3%).
    """
    if rows <= 0 or tiles <= 0:
        return Grid(1, max(tiles, 1), 1, max(rows, 0))
    best, best_cost = None, math.inf
    for s in range(1, min(tiles, max(1, 32 * slots // rows)) + 1):
        per = math.ceil(tiles / s)
        splits = math.ceil(tiles / per)
        if splits != s:
            continue  # the same runs as a smaller s
        runs = rows * splits
        for k in range(1, runs + 1):
            programs = math.ceil(runs / k)
            cost = math.ceil(programs / slots) * k * (per + PROGRAM_OVERHEAD_TILES)
            if cost < best_cost - 1e-9 or (abs(cost - best_cost) <= 1e-9 and programs < best.programs):
                best, best_cost = Grid(splits, per, k, programs), cost
            if programs <= slots:  # one wave: more runs per program only lengthen it
                break
    return best


def wave_fill(programs: int, slots: int) -> tuple[int, float]:
    """(waves, fraction of the last wave's slots in use) of a grid of `programs` on `slots` slots."""
    waves = max(1, math.ceil(programs / slots))
    return waves, (programs - (waves - 1) * slots) / slots
