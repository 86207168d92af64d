"""Training-step throughput: vae-scale's step against diffusers' AutoencoderKL with the same architecture.

vae-scale's step is the trainer's own: a `Trainer` built from the run config of the setting (preset, size,
batch, precision, the variant's toggles) times `Trainer.train_step`, the method a run calls (grad_accum 1):
autocast forward (encode, reparameterised sample + KL, decode), VAELoss (L1 + KL, and with the discriminator
its generator term and LDM's adaptive weight), backward, the discriminator's own step when it is on,
gradient clipping, the ranks' agreement on finite values (one host sync), AdamW (fused wherever
torch has it), zero_grad.
diffusers' AutoencoderKL runs in a loop of its own with the same loss, optimizer, clipping and sync, from
the same weights, batch and precision; only the model differs. Every variant of a setting lives in one
process and is timed in alternation (A B C, C B A, ...), on inputs rotated between steps, after it has
passed a correctness check: the step's forward and backward (Trainer.forward_loss) on a fixed batch and
noise against diffusers' fp32 eager step (the losses and every weight gradient; in bf16/fp16 within 3x the
distance of diffusers' own step in that precision). A variant that fails the check is refused (an error
row) and never timed.

Per variant: step time (median, p20, p80), images/s, peak device memory (CUDA: this variant's weights,
gradients and optimizer state plus the step's transient peak), MFU (model FLOPs per step, counted with
torch.utils.flop_counter on the eager reference step, over a stated peak: the GPU's datasheet figure, or a
CPU's matmul rate measured once on an idle machine; never above 100%, see harness.mfu), and speedups over
diffusers like for like: diffusers with the same loss, checkpointing and channels_last, eager
(x_diffusers_eager) and compiled (x_diffusers_compiled). A speedup is the median of the ratios of steps
paired round by round, with its distribution-free 95% interval (harness.paired_ratio). The toggles: fused
kernels (model.kernels auto vs torch, compiled too), channels_last, torch.compile (encoder and decoder, as
train.compile does), activation checkpointing, the discriminator. The machine's load is sampled while the
variants are timed; on a busy machine the rows are refused unless allow_busy (harness.stamp_load).

    python -m benchmarks.train_step [--quick] [--compile] [--device cuda|cpu] [--out DIR]
    python -m benchmarks.train_step --preset sd-f8 --resolution 128 --batch 2 --precision fp32

Without --preset, the sweep of the mode runs (see `sweep`); the data loader is not in the step (the data
benchmark measures it).

Clips (`--frames` > 1, a video family's preset such as wan-tiny-video): the trainer's step on clip batches
(B, 3, T, R, R) is timed on its own (`clip_benchmark`): diffusers has no training step of AutoencoderKLWan to
compare with (the family's forward is checked bit-identical to diffusers' in tests/test_models_wan.py), so
the row has no speedup and no check. On a CPU, where torch keeps no allocator statistics, its memory is the
process's peak resident set (`peak_rss_mb`, the torch runtime included) and the bytes the step holds
between steps (`state_mb`: weights, gradients' optimizer state, EMA).

    python -m benchmarks.train_step --preset wan-tiny-video --resolution 32 --batch 2 --frames 5

The steps themselves and their correctness check are in benchmarks/steps.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from benchmarks.harness import (
    BusyMachine,
    CorrectnessError,
    LoadSampler,
    Timing,
    check_idle,
    device_slug,
    environment,
    error_row,
    measure_interleaved,
    mfu,
    paired_ratio,
    peak_rate,
    repeats_for,
    result_row,
    stamp_load,
    write_results,
)
from benchmarks.steps import (
    DTYPES,
    TOLERANCES,
    Reference,
    Setting,
    Step,
    TrainStep,
    Variant,
    build_step,
    calibrated,
    check_against,
    config_for,
    distance,
    reference_pass,
)
from vae_scale.config import load_config
from vae_scale.models.sd import VAE
from vae_scale.train.objective import VAELoss

SUBJECT = "train_step"
INPUT_SETS = {"cuda": 3, "cpu": 2}  # batches rotated between steps
# Timed steps per variant: one more than the fewest whose 95% interval on a paired ratio leaves out the
# most extreme ratio at each end (harness.repeats_for: 9), so the bounds are the 2nd-lowest and
# 2nd-highest of 10 ratios (coverage 0.979). On a GPU steps are short: 20 (bounds 6th of 20, 0.959).
REPEATS = {"cpu": repeats_for() + 1, "cuda": 20}


# --------------------------------------------------------------------------------------------------------
# One setting: check every variant, then time them in alternation


def fresh_accelerate_state() -> None:
    """Forget the mixed precision an earlier Accelerator fixed for this process.

    Accelerate keeps one AcceleratorState per process and refuses an Accelerator of another precision (a
    launch has one); the settings of one benchmark process differ in it. Each setting's trainers share one
    precision: clearing the state before and after a setting is how accelerate's own tests switch.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(e: BaseException) -> str:
    kind = "refused" if isinstance(e, CorrectnessError) else "failed"
    return f"{kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def make_init(setting: Setting, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random initial weights shared by every variant: the VAE's and the discriminator's state dicts."""
    torch.manual_seed(seed)
    cfg = config_for(setting, Variant(disc=True))
    vae = VAE(cfg.model)
    crit = VAELoss(cfg.loss, image_channels=cfg.model.in_channels)
    return {"vae": vae.state_dict(), "disc": crit.discriminator.state_dict()}


def reference_variant(disc: bool) -> Variant:
    """The variant every other is checked against: diffusers eager if it imports, else our eager ops."""
    try:
        import diffusers  # noqa: F401

        return Variant(model="diffusers", disc=disc)
    except ImportError:
        return Variant(model="vae-scale", kernels="torch", disc=disc)


def benchmark(
    setting: Setting,
    variants: list[Variant],
    device: torch.device,
    *,
    repeats: int = REPEATS["cpu"],
    warmup: int = 1,
    peak: dict[str, Any] | None = None,
    extra: dict[str, Step] | None = None,
    allow_busy: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Check every variant against the reference step, then time those that passed in alternation.

    `extra` adds ready-built steps under their own names (checked and timed like the others); `peak` is
    harness.peak_rate's (measured when None). Returns one row per variant: a timed row, or an error row for
    one that was refused or failed; rows timed while the machine was busy are refused unless `allow_busy`.
    """
    env = environment(device)
    fresh_accelerate_state()
    init = make_init(setting)
    model_cfg = load_config(setting.preset, list(setting.overrides)).model
    r, b, f = setting.resolution, setting.batch, model_cfg.downsample_factor
    torch.manual_seed(1)
    inputs = [torch.rand(b, 3, r, r, device=device) * 2 - 1 for _ in range(INPUT_SETS.get(device.type, 2))]
    x_check = torch.rand(b, 3, r, r, device=device) * 2 - 1
    eps_check = torch.randn(b, model_cfg.latent_channels, r // f, r // f, device=device)
    rows: list[dict[str, Any]] = []
    steps: dict[str, Step] = {}
    checks: dict[str, dict[str, Any]] = {}
    flops: dict[bool, int | None] = {}
    refs: dict[bool, Reference] = {}
    wanted = set(variants)

    def reference(disc: bool) -> Reference:
        """The fp32 eager reference of this loss (FLOPs counted), and in reduced precision the same step in
        that precision, whose distance from fp32 sets the tolerance."""
        if disc not in refs:
            v = reference_variant(disc)
            ref = build_step(replace(setting, precision="fp32"), v, init, inputs, device)
            values, grads, flops[disc] = reference_pass(ref, x_check, eps_check)
            if setting.precision == "fp32":
                step = ref if v in wanted else None
                refs[disc] = Reference(v.name, values, grads, TOLERANCES["fp32"], step)
            else:
                ref.close()
                del ref
                _free(device)
                ref = build_step(setting, v, init, inputs, device)
                errs = distance(*ref.check_pass(x_check, eps_check), values, grads)
                tol = calibrated(TOLERANCES[setting.precision], errs)
                step = ref if v in wanted else None
                refs[disc] = Reference(f"{v.name} fp32", values, grads, tol, step, errs)
            if step is None:
                ref.close()
            del ref
            _free(device)
        return refs[disc]

    candidates: list[tuple[str, Variant, Callable[[], Step]]] = [
        (v.name, v, lambda v=v: build_step(setting, v, init, inputs, device)) for v in variants
    ]
    candidates += [(name, s.variant, lambda s=s: s) for name, s in (extra or {}).items()]
    for name, variant, build in candidates:
        t0 = time.perf_counter()
        step = None
        try:
            ref = reference(variant.disc)
            tolerance = {"tol_loss": ref.tol.loss, "tol_grad_cos": ref.tol.grad_cos}
            if ref.step is not None and ref.step.variant == variant and name == variant.name:
                steps[name] = ref.step
                checks[name] = {
                    **(ref.step_errors or {}),
                    **tolerance,
                    "checked_against": "itself" if ref.step_errors is None else f"{ref.name} (sets tol_*)",
                }
                continue
            step = build()
            errs = check_against(step, ref, x_check, eps_check)
            checks[name] = {**errs, **tolerance, "checked_against": ref.name}
            steps[name] = step
            log(f"  {name}: matches {ref.name} ({time.perf_counter() - t0:.0f} s)")
        except Exception as e:  # noqa: BLE001 -- one variant's failure is a row, not the end of the run
            fields = {**setting.fields(), **variant.fields(device)}
            rows.append(error_row(SUBJECT, name, _error_text(e), env, **fields))
            log(f"  {name}: {rows[-1]['error']}")
            if step is not None:
                step.close()
            step = None  # a refused step's memory goes before the next is built
        if step is None:
            _free(device)
    refs.clear()

    errors: dict[str, BaseException] = {}
    with LoadSampler() as sampler:
        timings = measure_interleaved(
            {n: s for n, s in steps.items()}, device=device, warmup=warmup, repeats=repeats, errors=errors
        )
    load = sampler.summary()
    peaks = {n: _peak_mb(s, device) for n, s in steps.items() if n in timings}
    peak = peak if peak is not None else peak_rate(device, setting.precision)
    baselines = {
        like(s.variant): n for n, s in steps.items() if n in timings and s.variant.model == "diffusers"
    }
    for name, step in steps.items():
        v = step.variant
        fields = {**setting.fields(), **v.fields(device)}
        if name not in timings:
            rows.append(
                error_row(SUBJECT, name, _error_text(errors.get(name, RuntimeError("?"))), env, **fields)
            )
            continue
        t: Timing = timings[name]
        model_flops = flops.get(v.disc)
        vs = {}
        for kind, compiled in (("eager", False), ("compiled", True)):
            ref_name = baselines.get(like(replace(v, compile=compiled)))
            if ref_name is None:
                continue
            got = paired_ratio(timings[ref_name], t)
            vs |= {f"x_diffusers_{kind}": got["ratio"], f"x_diffusers_{kind}_lo": got["ratio_lo"],
                   f"x_diffusers_{kind}_hi": got["ratio_hi"], f"x_diffusers_{kind}_ref": ref_name,
                   f"x_diffusers_{kind}_95ci": _interval_text(got)}  # fmt: skip
            vs["ratio_pairs"], vs["ratio_coverage"] = got["ratio_pairs"], got["ratio_coverage"]
        rows.append(
            result_row(
                SUBJECT,
                name,
                t,
                env,
                **fields,
                images_per_s=t.throughput(setting.batch),
                peak_mb=peaks.get(name),
                gflop_per_image=model_flops / setting.batch / 1e9 if model_flops else None,
                **mfu(model_flops, t.median_ms, peak),
                **vs,
                **checks[name],
                **peak,
            )
        )
    stamp_load(rows, load, allow_busy)
    for step in steps.values():
        step.close()
    del steps
    fresh_accelerate_state()  # the next setting, or whatever runs next in this process, sets its own
    _free(device)
    return rows


def clip_benchmark(
    setting: Setting,
    device: torch.device,
    *,
    repeats: int = REPEATS["cpu"],
    warmup: int = 1,
    allow_busy: bool = False,
) -> list[dict[str, Any]]:
    """The trainer's step on clips of setting.frames frames, timed alone (see the module docstring): one
    row with the step time, clips/s, frames/s, the peak (CUDA: allocated; CPU: the process's resident set)
    and the bytes held between steps."""
    env = environment(device)
    fresh_accelerate_state()
    torch.manual_seed(1)
    variant = Variant()
    fields = {**setting.fields(), **variant.fields(device)}
    step = TrainStep(setting, variant, None, setting.inputs(INPUT_SETS.get(device.type, 2), device), device)
    errors: dict[str, BaseException] = {}
    try:
        with LoadSampler() as sampler:
            timings = measure_interleaved(
                {variant.name: step}, device=device, warmup=warmup, repeats=repeats, errors=errors
            )
        peak = _peak_mb(step, device)
        if peak is None:  # ru_maxrss: KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        state_mb = step.state_bytes() / 2**20
    finally:
        step.close()
    if variant.name not in timings:
        error = _error_text(errors.get(variant.name, RuntimeError("?")))
        return [error_row(SUBJECT, variant.name, error, env, **fields)]
    t = timings[variant.name]
    memory = {"peak_mb": peak} if device.type == "cuda" else {"peak_rss_mb": peak}
    row = result_row(
        SUBJECT,
        variant.name,
        t,
        env,
        **fields,
        clips_per_s=t.throughput(setting.batch),
        frames_per_s=t.throughput(setting.batch * setting.frames),
        **memory,
        state_mb=state_mb,
        checked_against="none: no diffusers training step for this family",
    )
    rows = stamp_load([row], sampler.summary(), allow_busy)
    fresh_accelerate_state()
    return rows


def like(v: Variant) -> tuple[bool, bool, bool, bool]:
    """What a diffusers reference must share with a variant to be like for like (the kernels are ours)."""
    return (v.disc, v.compile, v.checkpointing, v.channels_last)


def _interval_text(got: dict[str, Any]) -> str | None:
    return f"{got['ratio_lo']:.2f}-{got['ratio_hi']:.2f}" if got["ratio_lo"] is not None else None


def _peak_mb(step: Step, device: torch.device) -> float | None:
    """This variant's peak: its state between steps plus one step's transient peak (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base + step.state_bytes()) / 2**20


# --------------------------------------------------------------------------------------------------------
# The sweeps


def toggles(base: Variant, on_gpu: bool) -> list[Variant]:
    """`base` and each toggle flipped from it one at a time (kernels only where there is a fused backend)."""
    out = [base, replace(base, channels_last=not base.channels_last)]
    if on_gpu:
        out.append(replace(base, kernels="torch" if base.kernels == "auto" else "auto"))
    out += [replace(base, checkpointing=True), replace(base, disc=True)]
    return out


def sweep(
    quick: bool, device: torch.device, compile: bool | None = None
) -> list[tuple[Setting, list[Variant], dict]]:
    """(setting, variants, timing options) of the mode: GPU sizes on CUDA, small ones on a CPU.

    On a GPU the toggles flip one at a time from the eager fast configuration (fused kernels and
    channels_last); compile is added to it with each kernel backend (Triton and torch), and diffusers runs
    eager and compiled with the same loss. Every toggle that diffusers has too (checkpointing,
    channels_last, the discriminator, compile) has its diffusers row, so each speedup is like for like. The
    other settings compare the fast eager step with diffusers eager. Compile defaults off on a CPU (an
    inductor compile of sd-f8 takes minutes on 2 cores), where the torch backend is the only one.
    """

    def references(base: Variant) -> list[Variant]:
        d = replace(base, model="diffusers", kernels="auto")
        out = [d, replace(d, disc=True), replace(d, checkpointing=True)]
        return out + [replace(d, channels_last=not d.channels_last)]

    def compiled(base: Variant, on_gpu: bool) -> list[Variant]:
        out = [replace(base, compile=True)] + (
            [replace(base, compile=True, kernels="torch")] if on_gpu else []
        )
        return out + [replace(base, model="diffusers", kernels="auto", compile=True)]

    if device.type == "cuda":
        compile = True if compile is None else compile
        fast = Variant(channels_last=True)
        main = toggles(fast, on_gpu=True) + references(fast)
        if compile:
            main += compiled(fast, on_gpu=True)
        pair = [fast, Variant(model="diffusers", channels_last=True)]
        runs = {"repeats": REPEATS["cuda"], "warmup": 2}
        # batch 16 at 256 px (43 TFLOP a step) fills an H100 and leaves room for the fp32 reference pass
        if quick:
            return [(Setting("sd-f8", 256, 8, "bf16"), main, runs)]
        return [
            (Setting("sd-f8", 256, 16, "bf16"), main, runs),
            (Setting("sd-f8", 256, 16, "fp32"), pair, runs),
            (Setting("f8c16", 256, 16, "bf16"), pair, runs),
            (
                Setting("sd-f8", 512, 4, "bf16"),
                pair
                + [
                    replace(fast, checkpointing=True),
                    Variant("diffusers", channels_last=True, checkpointing=True),
                ],
                runs,
            ),
        ]
    base = Variant()
    main = toggles(base, on_gpu=False) + references(base)
    if compile:
        main += compiled(base, on_gpu=False)
    runs = {"repeats": REPEATS["cpu"], "warmup": 1}
    if quick:
        return [(Setting("sd-f8", 64, 2, "fp32"), main, runs)]
    return [
        (Setting("sd-f8", 128, 2, "fp32"), main, runs),
        (Setting("f8c16", 128, 2, "fp32"), [base, Variant(model="diffusers")], runs),
    ]


def run(
    quick: bool = True, device: str | None = None, compile: bool | None = None, allow_busy: bool = False
) -> list[dict[str, Any]]:
    """The sweep of the mode on the first GPU, or on this CPU; returns result rows (errors as rows)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for setting, variants, opts in sweep(quick, dev, compile):
        print(
            f"train_step: {setting.preset} {setting.resolution}px batch {setting.batch} {setting.precision}"
        )
        peak = peak_rate(dev, setting.precision)
        rows += benchmark(setting, variants, dev, peak=peak, allow_busy=allow_busy, **opts)
    return rows


COLUMNS = [
    "preset", "resolution", "batch", "dtype", "variant", "loss", "median_ms", "p20_ms", "p80_ms",
    "images_per_s", "peak_mb", "mfu_pct", "mfu_note", "x_diffusers_eager", "x_diffusers_eager_95ci",
    "x_diffusers_compiled", "x_diffusers_compiled_95ci", "load_1m", "others_cores", "busy", "error",
]  # fmt: skip
CLIP_COLUMNS = [
    "preset", "resolution", "frames", "batch", "dtype", "variant", "loss", "median_ms", "p20_ms", "p80_ms",
    "clips_per_s", "frames_per_s", "peak_mb", "peak_rss_mb", "state_mb", "load_1m", "others_cores", "busy",
    "error",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small sweep (a few minutes on a 2-core CPU)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add torch.compile variants (default: on with CUDA, off on a CPU)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--preset", default=None, help="one setting instead of the sweep: preset name")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    p.add_argument(
        "--frames", type=int, default=1, help="frames per clip: > 1 times the step on clips (a video preset)"
    )
    p.add_argument(
        "--variants",
        default=None,
        help="with --preset: only these variants, by the name in the table, comma-separated "
        "(e.g. 'vae-scale,vae-scale channels_last')",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed steps per variant (default 10 on a CPU, 20 on a GPU)"
    )
    p.add_argument(
        "--allow-busy",
        action="store_true",
        help="run and keep the figures when other processes load the machine (rows flagged busy)",
    )
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    try:
        check_idle(args.allow_busy)
    except BusyMachine as e:
        print(f"train_step: {e}", file=sys.stderr)
        return 3
    if args.device == "cpu":  # the trainer takes its device from accelerate: on a CPU when it is told so
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if args.preset and args.frames > 1:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        setting = Setting(args.preset, args.resolution, args.batch, args.precision, frames=args.frames)
        repeats = args.repeats or REPEATS.get(dev.type, REPEATS["cpu"])
        rows = clip_benchmark(setting, dev, repeats=repeats, allow_busy=args.allow_busy)
    elif args.preset:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        setting = Setting(args.preset, args.resolution, args.batch, args.precision)
        variants = [v for s, vs, _ in sweep(True, dev, args.compile) for v in vs]
        if args.variants:
            wanted = [n.strip() for n in args.variants.split(",")]
            unknown = sorted(set(wanted) - {v.name for v in variants})
            if unknown:
                p.error(f"--variants: unknown {unknown}; choose from {', '.join(v.name for v in variants)}")
            variants = [v for v in variants if v.name in wanted]
        repeats = args.repeats or REPEATS.get(dev.type, REPEATS["cpu"])
        rows = benchmark(setting, variants, dev, repeats=repeats, allow_busy=args.allow_busy)
    else:
        rows = run(quick=args.quick, device=args.device, compile=args.compile, allow_busy=args.allow_busy)
    name = f"train_step-{device_slug(rows[0]['device'])}" if rows else "train_step"
    path = write_results(rows, name, CLIP_COLUMNS if args.frames > 1 else COLUMNS, args.out)
    print(path.with_suffix(".md").read_text())
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
