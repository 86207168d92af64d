"""The kernels as a GPU would run them, read without one: compiled for sm_80, sm_90 and sm_100, counted.

Every Triton launch of an op (forward and backward, at the benchmark shapes) is compiled for the target
instead of run, with the grid the target GPU would get (benchmarks/kernels_compile.py). This module reads
what came out into the report:

- registers, spilled bytes and spill instructions, shared memory, from the cubin;
- blocks per SM (kernels/common.py's occupancy rule), slots (SMs x blocks), waves and the last wave's fill,
  and the grid's efficiency: tiles of work over (waves x slots x the longest program's tiles);
- instructions per element, counted in the SASS: the main loop is the back-edge whose body loads the most
  bytes from global memory; its instructions on the shortest path from its head to its back-edge (so slow
  paths behind branches, such as libdevice's sin/cos range reduction, are not counted) over the elements one
  iteration handles per thread (the loop's global-load bytes over the bytes the kernel loads per element);
  plus the shortest path from the kernel's entry to its exit (prologue, epilogue, one pass of the body),
  divided by the elements one thread handles in one program. A kernel without a loop counts that path over
  its elements per thread. MUFU (special-function) instructions are counted the same way;
- the predicted time: the larger of bytes / bandwidth, instructions / issue rate (4 warp-instructions per
  clock per SM) and MUFU ops / MUFU rate (16 per clock per SM), divided by the grid's efficiency. Launch
  latency is not in it; bandwidth and clock are the public peak figures, so real times are longer.

    python -m benchmarks.kernels --static [--baseline REV] [--gpus A100,H100,H200,B200] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.kernels_compile import TARGETS, Launch, Target, compile_check, compile_only, tool_release

ROOT = Path(__file__).resolve().parents[1]
ISSUE_PER_CLOCK_PER_SM = 4 * 32  # four schedulers, one warp-instruction each per clock
MUFU_PER_CLOCK_PER_SM = 16


# --------------------------------------------------------------------------------------------------------
# Reading the SASS

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}


@dataclasses.dataclass
class Instr:
    op: str  # the mnemonic with its suffixes, e.g. LDG.E.128
    predicated: bool
    target: str | None  # a branch's label

    @property
    def is_branch(self) -> bool:
        return self.op.startswith("BRA")

    @property
    def ends_block(self) -> bool:
        return self.is_branch or self.op in ("EXIT", "RET", "BRX", "JMX")

    @property
    def load_bytes(self) -> int:
        """Bytes a global load moves per thread. Constant-table lookups (libdevice's) and L2-coherent reads
        of partial sums (.STRONG) are not the streams a main loop reads."""
        if not self.op.startswith("LDG") or ".CONSTANT" in self.op or ".STRONG" in self.op:
            return 0
        return next((_WIDTH[p] for p in self.op.split(".")[1:] if p in _WIDTH), 4)

    @property
    def mufu(self) -> int:
        return int(self.op.startswith("MUFU"))


def parse_sass(sass: str) -> tuple[list[Instr], dict[str, int]]:
    """The instructions (NOPs dropped) and the index each label points at."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(instrs)
        elif m := _INSTR.match(line):
            text = m.group(2)
            predicated = text.startswith("@") and not text.startswith("@PT ")
            words = text.split()[1:] if text.startswith("@") else text.split()
            if not words or words[0] == "NOP":
                continue
            target = _TARGET.search(text) if words[0].startswith("BRA") else None
            # sm_100's uniform branches take their predicate as an operand: BRA.U !UP0, `(.L_x_1)
            if target and len(words) > 2 and re.fullmatch(r"!?U?P\d,", words[1]):
                predicated = True
            instrs.append(Instr(words[0], predicated, target.group(1) if target else None))
    return instrs, labels


def _blocks(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    starts = {0, *labels.values()} | {i + 1 for i, ins in enumerate(instrs) if ins.ends_block}
    starts = sorted(s for s in starts if s < len(instrs))
    return [(s, e) for s, e in zip(starts, [*starts[1:], len(instrs)], strict=True)]


def _shortest(
    instrs, labels, blocks, start: int, stop, need_store: bool = False
) -> tuple[int, int, int] | None:
    """(instructions, MUFU, load bytes) on the path from instruction `start` with the fewest instructions to
    the end of a block for which stop(block) is true, following forward edges only (no loop runs twice).
    With need_store, only paths through a global store or atomic count (a program that exits without
    writing anything did no work)."""
    index = {s: k for k, (s, _) in enumerate(blocks)}
    first = next(k for k, (s, e) in enumerate(blocks) if s <= start < e)
    best = {(first, not need_store): (0, 0, 0)}  # (block, stored so far) -> costs on entering the block
    heap = [(0, first, not need_store)]
    while heap:
        n, k, stored = heapq.heappop(heap)
        if best[(k, stored)][0] != n:
            continue
        s, e = blocks[k]
        body = instrs[max(s, start) : e]
        _, mufu, loads = best[(k, stored)]
        cost = (n + len(body), mufu + sum(i.mufu for i in body), loads + sum(i.load_bytes for i in body))
        stored = stored or any(i.op.startswith(("STG", "ATOM", "RED")) for i in body)
        if stop(blocks[k]) and stored:
            return cost
        last = instrs[e - 1]
        nexts = []
        if last.is_branch and last.target in labels:
            nexts.append(labels[last.target])
        if not last.ends_block or last.predicated:
            nexts.append(e)
        for t in nexts:
            if t <= s or t not in index:
                continue
            key = (index[t], stored)
            if key not in best or best[key][0] > cost[0]:
                best[key] = cost
                heapq.heappush(heap, (cost[0], index[t], stored))
    return None


@dataclasses.dataclass
class SassProfile:
    """Instruction counts of a kernel on its hot paths (see the module docstring for the method)."""

    total: int  # every instruction in the kernel
    loop_instructions: int | None  # the main loop body, shortest path head -> back-edge
    loop_mufu: int | None
    loop_load_bytes: int | None
    path_instructions: int  # shortest path entry -> exit that stores something (one pass of any loop)
    path_mufu: int
    outer_instructions: int = 0  # the loop around the main one (a program's runs), shortest path once round
    outer_mufu: int = 0


def profile(sass: str) -> SassProfile:
    """Count a kernel's SASS: its main loop (if any) and its shortest entry-to-exit path."""
    instrs, labels = parse_sass(sass)
    blocks = _blocks(instrs, labels)
    loops = []
    for i, ins in enumerate(instrs):
        head = labels.get(ins.target) if ins.is_branch else None
        if head is not None and head <= i:
            loops.append((sum(x.load_bytes for x in instrs[head : i + 1]), head, i))
    # (most load bytes first, then the longest body, for max())
    loops = [(b, i - h, h, i) for b, h, i in loops]
    streaming = [lp for lp in loops if lp[0] > 0]
    # the main loop: of the loops that load and hold no other such loop, the one loading the most
    innermost = [
        lp for lp in streaming if not any(o is not lp and lp[2] <= o[2] and o[3] <= lp[3] for o in streaming)
    ]
    main = max(innermost, default=None)
    path = _shortest(instrs, labels, blocks, 0, lambda b: instrs[b[1] - 1].op == "EXIT", need_store=True)
    loop = outer = None
    if main is not None:
        _, _, head, back = main
        loop = _shortest(instrs, labels, blocks, head, lambda b: b[0] <= back < b[1])
        around = [lp for lp in loops if lp[2] <= head and back <= lp[3] and lp is not main]
        if around:
            _, _, o_head, o_back = min(around, key=lambda lp: lp[1])
            outer = _shortest(instrs, labels, blocks, o_head, lambda b: b[0] <= o_back < b[1])
    return SassProfile(
        total=len(instrs),
        loop_instructions=loop[0] if loop else None,
        loop_mufu=loop[1] if loop else None,
        loop_load_bytes=loop[2] if loop else None,
        path_instructions=path[0] if path else len(instrs),
        path_mufu=path[1] if path else 0,
        outer_instructions=outer[0] if outer else 0,
        outer_mufu=outer[1] if outer else 0,
    )


# --------------------------------------------------------------------------------------------------------
# The report


@functools.cache
def current_common():
    """This tree's kernels/common.py (occupancy rule, waves), also when `kernels` is an older version of the
    package (the baseline run): loaded from its file, it imports nothing from the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kernels_common_current", ROOT / "kernels" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _bytes_per_element(kernel: str, meta: dict, s: int) -> tuple[int, int] | None:
    """(bytes the kernel moves, bytes it loads) per element of mean / x; None for the per-group kernels."""
    eps, prior = int(bool(meta.get("HAS_EPS"))), int(bool(meta.get("HAS_PRIOR")))
    table = {
        "_gaussian_fwd_kernel": ((3 + eps + 2 * prior) * s, (2 + eps + 2 * prior) * s),
        "_gaussian_bwd_kernel": ((5 + eps + 4 * prior) * s, (3 + eps + 2 * prior) * s),
        "_gn_stats_kernel": (s, s),
        "_gn_fwd_apply_kernel": (2 * s, s),
        "_gn_bwd_reduce_kernel": (2 * s, 2 * s),
        "_gn_bwd_apply_kernel": (3 * s, 2 * s),
        "_rms_stats_kernel": (s, s),
        "_rms_fwd_apply_kernel": (2 * s, s),
        "_rms_bwd_reduce_kernel": (2 * s, 2 * s),
        "_rms_bwd_apply_kernel": (3 * s, 2 * s),
    }
    return table.get(kernel)


def _work(launch: Launch, shape: tuple[int, ...]) -> tuple[int, int]:
    """(tiles in the launch, tiles of its longest program), from its arguments."""
    a, B = launch.args, shape[0]
    if launch.kernel.startswith("_gaussian"):
        total = B * a["TILES"]
        # the backward once ran one tile per program
        longest = a.get("TILES_PER_SPLIT", 1) * a.get("RUNS_PER_PROGRAM", 1)
        return total, longest
    C, S = shape[1], math.prod(shape[2:])
    block_s, block_c = launch.meta["BLOCK_S"], launch.meta["BLOCK_C"]
    # RMSNorm's row kernels: a tile is block_s pixels across all C channels
    cblocks = (
        1 if launch.kernel in ("_rms_stats_kernel", "_rms_bwd_reduce_kernel") else math.ceil(C / block_c)
    )
    total = B * cblocks * math.ceil(S / block_s)
    if "TILES_PER_SPLIT" in a:
        return total, a["TILES_PER_SPLIT"] * a.get("RUNS_PER_PROGRAM", 1)
    if "S_PER_SPLIT" in a:
        return total, math.ceil(a["S_PER_SPLIT"] / block_s)
    return total, 1


def analyse(launch: Launch, target: Target, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    """One report row: resources, occupancy, waves, instructions per element and the predicted time."""
    common = current_common()
    c = launch.compiled
    gpu = common.GPU(name=target.name, arch=target.arch, sms=target.sms, smem_per_sm=target.smem_per_sm)
    per_sm = common.blocks_per_sm(c.n_regs, c.shared, c.num_warps, gpu)
    slots = per_sm * target.sms
    waves, fill = common.wave_fill(launch.programs, slots)
    row = {
        "gpu": target.name, "arch": f"sm_{target.arch}", "kernel": launch.kernel, "regs": c.n_regs,
        "spill_bytes": c.local_bytes, "spill_instructions": c.spill_instructions, "smem": c.shared,
        "warps": c.num_warps, "blocks_per_sm": per_sm, "slots": slots, "programs": launch.programs,
        "waves": waves, "last_wave_fill": round(fill, 3),
    }  # fmt: skip
    s = torch.finfo(dtype).bits // 8
    per_element = _bytes_per_element(launch.kernel, launch.meta, s)
    if per_element is None:
        return row
    moved, loaded = per_element
    n = math.prod(shape)
    total_tiles, longest = _work(launch, shape)
    row["tiles"] = total_tiles
    efficiency = total_tiles / (waves * slots * longest) if launch.programs >= slots else None
    p = profile(c.sass)
    threads = 32 * c.num_warps
    per_thread = n / launch.programs / threads  # elements one thread handles in one program
    runs = launch.args.get("RUNS_PER_PROGRAM", 1)
    if p.loop_instructions is not None and p.loop_load_bytes:
        per_iter = p.loop_load_bytes / loaded
        iters = per_thread / per_iter
        extra_runs = max(runs - 1, 0)  # the entry-to-exit path already holds one pass of the outer loop
        instr = (
            p.loop_instructions * iters + p.outer_instructions * extra_runs + p.path_instructions
        ) / per_thread
        mufu = (p.loop_mufu * iters + p.outer_mufu * extra_runs + p.path_mufu) / per_thread
    else:
        per_iter = None
        instr, mufu = p.path_instructions / per_thread, p.path_mufu / per_thread
    clock = target.clock_ghz * 1e9
    t_bytes = moved * n / (target.bandwidth_gb_s * 1e9)
    t_issue = instr * n / (ISSUE_PER_CLOCK_PER_SM * target.sms * clock)
    t_mufu = mufu * n / (MUFU_PER_CLOCK_PER_SM * target.sms * clock)
    bound = max(("bytes", t_bytes), ("issue", t_issue), ("mufu", t_mufu), key=lambda kv: kv[1])
    # under one wave the grid cannot fill the GPU: the time is that of the longest program's share
    eff = efficiency if efficiency is not None else total_tiles / (slots * longest)
    return row | {
        "grid_efficiency": round(eff, 3),
        "loop_instructions": p.loop_instructions,
        "elements_per_iteration": per_iter,
        "instr_per_element": round(instr, 2),
        "mufu_per_element": round(mufu, 3),
        "bytes_per_element": moved,
        "t_bytes_us": round(t_bytes * 1e6, 2),
        "t_issue_us": round(t_issue * 1e6, 2),
        "t_mufu_us": round(t_mufu * 1e6, 2),
        "predicted_us": round(bound[1] / eff * 1e6, 2),
        "bound": bound[0],
    }


def cases() -> list[dict[str, Any]]:
    """The benchmark shapes (benchmarks/kernels.py), bf16, the ops as the benchmark calls them."""
    from benchmarks.kernel_sizes import GROUP_NORM_SIZES, POSTERIOR_SIZES, RMS_NORM_SIZES

    out = [
        dict(op="gaussian_sample_kl", size=label, layout="-", shape=shape) for label, shape in POSTERIOR_SIZES
    ]
    for label, shape, groups in GROUP_NORM_SIZES:
        for layout in ("NCHW", "channels_last"):
            out.append(dict(op="group_norm_silu", size=label, layout=layout, shape=shape, groups=groups))
    for label, shape, act in RMS_NORM_SIZES:
        for layout in ("NCHW", "channels_last"):
            out.append(dict(op="rms_norm_act", size=label, layout=layout, shape=shape, act=act))
    return out


def _run_case(case: dict, dtype: torch.dtype) -> None:
    """Forward and backward of the op, on tensors whose memory is never touched (only shapes matter)."""
    from vae_scale import kernels

    shape = case["shape"]
    if case["op"] == "gaussian_sample_kl":
        mean, logvar = (torch.empty(shape, dtype=dtype).requires_grad_() for _ in range(2))
        z, kl = kernels.gaussian_sample_kl(mean, logvar, impl="triton")
        torch.autograd.backward((z, kl), (torch.empty_like(z), torch.empty_like(kl)))
    else:
        memory_format = torch.channels_last if case["layout"] == "channels_last" else torch.contiguous_format
        x = torch.empty(shape, dtype=dtype, memory_format=memory_format).requires_grad_()
        w, b = (torch.empty(shape[1], dtype=dtype).requires_grad_() for _ in range(2))
        if case["op"] == "rms_norm_act":
            y = kernels.rms_norm_act(x, w, b, act=case["act"], impl="triton")
        else:
            y = kernels.group_norm_silu(x, case["groups"], w, b, impl="triton")
        y.backward(torch.empty_like(y))


def static_rows(gpus: list[str], dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """Every kernel of every case compiled for each GPU's architecture, one row per launch."""
    from vae_scale import kernels

    rows = []
    for name in gpus:
        target = TARGETS[name]
        for case in cases():
            if not hasattr(kernels, case["op"]):  # a baseline from before the op existed
                continue
            with compile_only(target) as launches:
                _run_case(case, dtype)
            for launch in launches:
                passes = "fwd" if "fwd" in launch.kernel or "stats" in launch.kernel else "bwd"
                rows.append(
                    {"op": case["op"], "size": case["size"], "layout": case["layout"], "pass": passes,
                     "dtype": str(dtype).removeprefix("torch."), "shape": "x".join(map(str, case["shape"]))}
                    | analyse(launch, target, case["shape"], dtype)
                )  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------
# Before and after, JSON and markdown

KEY = ("gpu", "op", "size", "layout", "kernel")
BEFORE = ("regs", "blocks_per_sm", "programs", "waves", "last_wave_fill", "instr_per_element", "predicted_us",
          "tiles", "slots")  # fmt: skip
COLUMNS = [
    "gpu", "op", "size", "layout", "pass", "kernel", "regs", "spill_bytes", "smem", "blocks_per_sm",
    "programs", "waves", "last_wave_fill", "before_last_wave_fill", "grid_efficiency", "instr_per_element",
    "before_instr_per_element", "mufu_per_element", "t_bytes_us", "t_issue_us", "predicted_us",
    "before_predicted_us", "bound",
]  # fmt: skip


def use_kernels_from(folder: Path) -> None:
    """Make `vae_scale.kernels` the `kernels/` package in `folder` (as a git revision had it; older trees
    import it as the top-level `kernels`, so it is imported under that name and aliased)."""
    import importlib

    import vae_scale

    sys.path.insert(0, str(folder))
    module = importlib.import_module("kernels")
    sys.modules["vae_scale.kernels"] = module
    vae_scale.kernels = module


def baseline_rows(rev: str, gpus: list[str]) -> list[dict[str, Any]]:
    """static_rows for the kernels as they are at git revision `rev` (in a process that imports them)."""
    import tarfile

    archive = subprocess.run(["git", "archive", rev, "kernels"], cwd=ROOT, capture_output=True, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.kernels_static", "--rows", "--gpus", ",".join(gpus),
             "--kernels-from", tmp],
            cwd=tmp, env=env, capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"baseline at {rev} failed:\n{out.stderr[-3000:]}")
        payload = json.loads(out.stdout)
    if not payload["kernels"].startswith(tmp):
        raise RuntimeError(f"baseline imported {payload['kernels']}, not the kernels at {rev}")
    return payload["rows"]


def merge(rows: list[dict], before: list[dict]) -> list[dict]:
    """rows with before_<field> from the baseline row of the same GPU, op, size, layout and kernel."""
    old = {tuple(r[k] for k in KEY): r for r in before}
    for r in rows:
        b = old.get(tuple(r[k] for k in KEY), {})
        r.update({f"before_{f}": b.get(f) for f in BEFORE})
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _where(r: dict) -> str:
    return f"{r['kernel'].strip('_')}, {r['size']}" + (f" {r['layout']}" if r["layout"] != "-" else "")


def headline(rows: list[dict]) -> list[str]:
    """Per GPU: the lowest last-wave fill among launches with at least one wave of tiles, and instructions
    per element and predicted fwd + bwd time at the largest shapes, before and after."""
    lines = []
    for gpu in dict.fromkeys(r["gpu"] for r in rows):
        mine = [r for r in rows if r["gpu"] == gpu and r.get("instr_per_element") is not None]
        text = f"- **{gpu}**: "
        for prefix, label in (("", "last wave at least"), ("before_", "before")):
            full = [r for r in mine if r.get(prefix + "tiles") and r[prefix + "tiles"] >= r[prefix + "slots"]]
            if full:
                worst = min(full, key=lambda r: r[prefix + "last_wave_fill"])
                text += f"{label} {worst[prefix + 'last_wave_fill']:.0%} full ({_where(worst)}); "
        largest = {}
        for r in mine:
            key = (r["op"], r["layout"])
            if (
                key not in largest
                or r["shape"] == largest[key][0]["shape"]
                or _numel(r) > _numel(largest[key][0])
            ):
                largest[key] = [x for x in largest.get(key, []) if x["shape"] == r["shape"]] + [r]
        parts = []
        for (op, layout), rs in largest.items():
            ipe = ", ".join(
                f"{r['kernel'].strip('_')} {_fmt(r.get('before_instr_per_element'))} -> "
                f"{_fmt(r['instr_per_element'])}"
                for r in rs
            )
            now = sum(r["predicted_us"] for r in rs)
            old = sum(r.get("before_predicted_us") or 0 for r in rs)
            where = f"{op} {rs[0]['shape']}" + (f" {layout}" if layout != "-" else "")
            parts.append(
                f"{where}: predicted fwd+bwd {old:,.0f} -> {now:,.0f} us; instructions/element {ipe}"
            )
        lines.append(text.rstrip("; ") + ".")
        lines += [f"  - {p}" for p in parts]
    return lines


def _numel(r: dict) -> int:
    return math.prod(int(d) for d in r["shape"].split("x"))


def write_report(rows: list[dict], out_dir: Path | None, baseline: str | None) -> Path:
    """benchmarks/results/kernels-static-<date>.json (every row) and .md (method, headline, tables)."""
    import datetime

    import triton

    from benchmarks.harness import RESULTS_DIR, git_commit

    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"kernels-static-{datetime.date.today().isoformat()}"
    meta = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "commit": git_commit(),
        "baseline": baseline,
    }
    meta["ptxas"] = {
        arch: tool_release(tool) for arch, tool in (("sm_80", "ptxas"), ("sm_90+", "ptxas-blackwell"))
    }
    for r in rows:
        r.update(meta)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"# {name}",
        "",
        f"Compiled without a GPU: triton {meta['triton']}, ptxas {meta['ptxas']['sm_80']} (sm_80) and "
        f"{meta['ptxas']['sm_90+']} (sm_90, sm_100), commit {meta['commit']}; `before` is the kernels at "
        f"{baseline}. bf16, the shapes of `python -m benchmarks.kernels`; the method is in the docstring of",
        "benchmarks/kernels_static.py.",
        "",
        "| GPU | arch | SMs | bandwidth GB/s | clock GHz |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t.name} | sm_{t.arch} | {t.sms} | {t.bandwidth_gb_s:,.0f} | {t.clock_ghz} |"
        for t in TARGETS.values()
    ]
    lines += ["", "## Headline", "", *headline(rows), ""]
    for gpu in dict.fromkeys(r["gpu"] for r in rows):
        lines += [f"## {gpu}", "", "| " + " | ".join(COLUMNS[1:]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
        lines += [
            "| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS[1:]) + " |" for r in rows if r["gpu"] == gpu
        ]
        lines.append("")
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    return out_dir / f"{name}.json"


def main(argv: list[str] | None = None) -> int:
    """The static report (`python -m benchmarks.kernels --static` calls this); --check and --rows print JSON
    for the test suite and for the baseline run."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default=",".join(TARGETS), help=f"of {', '.join(TARGETS)}")
    p.add_argument("--baseline", default=None, help="git revision whose kernels are `before` (e.g. main)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--check", action="store_true", help="compile every kernel for sm_80/90/100, print JSON")
    p.add_argument("--rows", action="store_true", help="print the rows as JSON instead of writing the report")
    p.add_argument("--kernels-from", default=None, help="a folder holding another `kernels/` to measure")
    args = p.parse_args(argv)
    if args.kernels_from:  # the baseline: an older tree's kernels stand in for the installed ones
        use_kernels_from(Path(args.kernels_from))
    if os.environ.get("TRITON_INTERPRET"):
        p.error("unset TRITON_INTERPRET: the static report compiles the kernels")
    if args.check:
        print(json.dumps(compile_check()))
        return 0
    gpus = args.gpus.split(",")
    unknown = [g for g in gpus if g not in TARGETS]
    if unknown:
        p.error(f"unknown GPU {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    rows = static_rows(gpus)
    if args.rows:
        from vae_scale import kernels

        print(json.dumps({"kernels": kernels.__file__, "rows": rows}))
        return 0
    if args.baseline:
        rows = merge(rows, baseline_rows(args.baseline, gpus))
    path = write_report(rows, args.out, args.baseline)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
