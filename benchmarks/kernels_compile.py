"""The kernels compiled for a GPU without one: every Triton launch of an op, intercepted and compiled instead.

Inside `compile_only(target)` a Triton launch does not run: the kernel is compiled for the target exactly as
triton's JIT would compile it for that launch (the same specialisation of its arguments), by the ptxas that
the triton wheel ships, and recorded with its grid. The launchers size their grids for the target GPU (its
SM count, the compiled kernel's occupancy), so the grid is the one that GPU would get. From the cubin come
the registers, spilled bytes and shared memory (`cuobjdump -res-usage`) and the SASS (`nvdisasm`), both
tools from the triton wheel (triton/backends/nvidia/bin). benchmarks/kernels_static.py reads these into the
report; `compile_check` is the CI check that every kernel compiles for sm_80/90/100 without spills or
NaN-dropping min/max.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU to compile for and predict on: occupancy limits, plus the public peak figures."""

    name: str
    arch: int
    sms: int
    bandwidth_gb_s: float
    clock_ghz: float
    smem_per_sm: int = 228 * 1024


# Public figures: SXM parts, boost clocks, HBM peak bandwidth.
TARGETS = {
    "A100": Target("A100 SXM 80GB", 80, 108, 2039, 1.41, smem_per_sm=164 * 1024),
    "H100": Target("H100 SXM", 90, 132, 3350, 1.98),
    "H200": Target("H200 SXM", 90, 132, 4800, 1.98),
    "B200": Target("B200", 100, 148, 8000, 1.965),
}


def tools_dir() -> Path:
    """Where the triton wheel keeps its CUDA tools (ptxas, cuobjdump, nvdisasm)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def tool_release(tool: str) -> str:
    """The CUDA release of a tool the triton wheel ships (ptxas, ptxas-blackwell), as `--version` says."""
    out = subprocess.run([str(tools_dir() / tool), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


# --------------------------------------------------------------------------------------------------------
# Compiling without a GPU


@dataclasses.dataclass
class Compiled:
    """A kernel compiled for a target: what the occupancy rule and the report read from it."""

    name: str
    arch: int
    num_warps: int
    shared: int  # bytes of shared memory triton asked for
    n_regs: int
    local_bytes: int  # per-thread local memory: spills (these kernels have no local arrays)
    spill_instructions: int  # STL/LDL in the SASS
    sass: str
    ptx: str

    @property
    def metadata(self):  # what kernels.common.slots reads from a triton CompiledKernel
        return dataclasses.make_dataclass("M", ["shared", "num_warps"])(self.shared, self.num_warps)

    @property
    def n_spills(self) -> int:
        return self.local_bytes

    def _init_handles(self):  # a real CompiledKernel loads its binary onto the GPU here
        pass


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tools_dir() / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [str(tools_dir() / "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    return usage | {"sass": sass}


_CACHE: dict[tuple, Compiled] = {}


def _compile(fn, args, kwargs, arch: int) -> Compiled:
    """Compile a JITFunction for `arch` with the specialisation triton's launcher would give these args."""
    import triton
    import triton.runtime.jit as jit
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.fn.__qualname__, fn.fn.__module__, arch, repr(signature), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))  # fmt: skip

    if key in _CACHE:
        return _CACHE[key]
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    usage = _resource_usage(k.asm["cubin"])
    _CACHE[key] = Compiled(
        name=fn.fn.__name__,
        arch=arch,
        num_warps=k.metadata.num_warps,
        shared=k.metadata.shared,
        n_regs=usage.get("REG", 0),
        local_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
        spill_instructions=len(re.findall(r"\b(?:STL|LDL)\b", usage["sass"])),
        sass=usage["sass"],
        ptx=k.asm["ptx"],
    )
    return _CACHE[key]


@dataclasses.dataclass
class Launch:
    """One intercepted launch: the kernel compiled for the target, its grid and compile-time arguments."""

    kernel: str
    programs: int
    meta: dict
    args: dict  # the integer arguments, by name
    compiled: Compiled


@contextlib.contextmanager
def compile_only(target: Target):
    """Inside, every Triton launch compiles for `target` and is recorded instead of run (yields the list).

    The launchers see `target` as the device (its SM count and limits) when they size their grids. Needs a
    process where TRITON_INTERPRET is unset (the interpreter never compiles).
    """
    import triton.runtime.jit as jit

    from vae_scale import kernels

    if not isinstance(kernels.gaussian._gaussian_fwd_kernel, jit.JITFunction):
        raise RuntimeError("compile_only needs the real triton JIT: run with TRITON_INTERPRET unset")
    launches: list[Launch] = []
    patches = contextlib.ExitStack()

    def run(self, *args, grid, warmup, **kwargs):
        compiled = _compile(self, args, kwargs, target.arch)
        if not warmup:
            bound = dict(zip(self.arg_names, args, strict=False))
            meta = {p.name: bound.get(p.name, kwargs.get(p.name)) for p in self.params if p.is_constexpr}
            meta["num_warps"] = compiled.num_warps
            programs = math.prod(grid(bound) if callable(grid) else grid)
            ints = {k: v for k, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)}
            launches.append(Launch(self.fn.__name__, programs, meta, ints, compiled))
        return compiled

    with patches:
        _patch(patches, jit.JITFunction, "run", run)
        try:
            from vae_scale.kernels import common
        except ImportError:  # kernels from before the occupancy rule: grids of 4 programs per SM
            for module in (kernels.gaussian, kernels.group_norm):  # (rms_norm came later)
                _patch(patches, module, "_target_programs", lambda device: 4 * target.sms)
        else:
            gpu = common.GPU(
                name=target.name, arch=target.arch, sms=target.sms, smem_per_sm=target.smem_per_sm
            )
            _patch(patches, common, "gpu_of", lambda device: gpu)
        yield launches


def _patch(stack: contextlib.ExitStack, owner, name: str, value) -> None:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    stack.callback(setattr, owner, name, saved)


# --------------------------------------------------------------------------------------------------------
# The CI check: every kernel compiles for every architecture without spills or NaN-dropping min/max

_MINMAX = re.compile(r"\b(?:min|max)((?:\.[A-Za-z0-9]+)+)")
_FLOAT_TYPES = {"f16", "bf16", "f32", "f64", "f16x2", "bf16x2"}


def nan_dropping_minmax(ptx: str) -> int:
    """Float min/max instructions without .NaN in PTX: they return the other operand when one is NaN."""
    count = 0
    for m in _MINMAX.finditer(ptx):
        parts = m.group(1).split(".")[1:]
        if parts and parts[-1] in _FLOAT_TYPES and "NaN" not in parts:
            count += 1
    return count


def _check_case() -> None:
    """Every op forward and backward, every kernel once: channels_last bf16 GroupNorm+SiLU with fp32
    weights, the posterior with in-kernel noise and a learned prior, and RMSNorm+act in both layouts (its
    row kernels tile NCHW and channels_last differently), ReLU on 512 channels (channel blocks of 256) and
    SiLU on 128."""
    from vae_scale import kernels

    x = torch.empty(2, 64, 40, 40, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = torch.empty(64).requires_grad_(), torch.empty(64).requires_grad_()
    kernels.group_norm_silu(x, 32, w, b, impl="triton").backward(
        torch.empty(2, 64, 40, 40, dtype=torch.bfloat16)
    )
    m, lv = (torch.empty(2, 4, 40, 40, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    z, kl = kernels.gaussian_sample_kl(m, lv, None, m.detach(), lv.detach(), impl="triton")
    torch.autograd.backward((z, kl), (torch.empty_like(z), torch.empty_like(kl)))
    for fmt in (torch.channels_last, torch.contiguous_format):
        for C, act in ((512, "relu"), (128, "silu")):
            x = torch.empty(2, C, 24, 24, dtype=torch.bfloat16).contiguous(memory_format=fmt).requires_grad_()
            w, b = torch.empty(C).requires_grad_(), torch.empty(C).requires_grad_()
            kernels.rms_norm_act(x, w, b, act=act, impl="triton").backward(torch.empty_like(x))


def compile_check(archs: tuple[int, ...] = (80, 90, 100)) -> list[dict[str, Any]]:
    """One row per (architecture, kernel): registers, spills, shared memory, NaN-dropping min/max."""
    by_arch = {80: "A100", 90: "H100", 100: "B200"}
    rows = []
    for arch in archs:
        with compile_only(TARGETS[by_arch[arch]]) as launches:
            _check_case()
        seen = {}
        for launch in launches:
            c = launch.compiled
            row = {
                "arch": f"sm_{arch}", "kernel": launch.kernel, "regs": c.n_regs, "spill_bytes": c.local_bytes,
                "spill_instructions": c.spill_instructions, "smem": c.shared,
                "nan_dropping_minmax": nan_dropping_minmax(c.ptx),
            }  # fmt: skip
            # a kernel compiled several ways (RMSNorm's two layouts) reports its worst compilation
            worst = ("spill_bytes", "spill_instructions", "nan_dropping_minmax", "regs")
            old = seen.get(launch.kernel)
            if old is None or tuple(row[k] for k in worst) > tuple(old[k] for k in worst):
                seen[launch.kernel] = row
        rows += seen.values()
    return rows
