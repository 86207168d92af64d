"""The benchmark suite at a tiny size: the harness, train_step's check-then-time, run.py's fail-soft, the
intervals on ratios, the load sampler's refusal, MFU's ceiling, like-for-like references, scaling's cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness, run, scaling, train_step
from benchmarks.run import exit_code, run_suite, write_suite
from benchmarks.steps import DiffusersStep, Setting, TrainStep, Variant

ROOT = Path(__file__).resolve().parents[1]

TINY = Setting(
    "sd-f8",
    resolution=32,
    batch=1,
    precision="fp32",
    overrides=(
        "model.block_out_channels=[8,16]",
        "model.layers_per_block=1",
        "model.latent_channels=4",
        "model.norm_num_groups=4",
    ),
)
# what every result row must say about itself
REQUIRED = (
    "subject", "variant", "device", "dtype", "preset", "resolution", "batch",
    "torch", "triton", "vae_scale", "commit", "median_ms", "p20_ms", "p80_ms", "images_per_s",
)  # fmt: skip
# a stated peak in place of the CPU's idle measurement, which a busy test machine would refuse: 1 PFLOP/s,
# far above any CPU, so the tiny model's MFU is a small positive figure
PEAK = {"peak_tflop_per_s": 1000.0, "peak_source": "test"}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: at this size two OpenMP threads only wait on each other, and on a loaded machine
    (other test workers) a descheduled partner thread makes each step 10-70x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measure_repeats_and_orders_percentiles(tmp_path):
    calls = []
    t = harness.measure(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and t.repeats == 5
    assert 0 <= t.p20_ms <= t.median_ms <= t.p80_ms
    row = harness.result_row("smoke", "v", t, harness.environment("cpu"), dtype="fp32")
    for key in ("subject", "variant", "device", "torch", "triton", "vae_scale", "commit", "median_ms"):
        assert row[key] is not None, key
    path = harness.write_results([row], "smoke", ["variant", "median_ms"], tmp_path)
    assert json.loads(path.read_text())[0]["variant"] == "v"
    assert "| v |" in path.with_suffix(".md").read_text()


def test_interleaved_timing_drops_a_failing_variant_and_keeps_the_rest():
    order: list[str] = []
    errors: dict[str, BaseException] = {}

    def bad():
        raise RuntimeError("boom")

    timings = harness.measure_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b"), "bad": bad},
        warmup=1,
        repeats=4,
        errors=errors,
    )
    assert set(timings) == {"a", "b"} and "boom" in str(errors["bad"])
    assert order[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B, B A, ...
    with pytest.raises(RuntimeError):
        harness.measure_interleaved({"bad": bad}, warmup=0, repeats=1)


@pytest.mark.numerics
def test_train_step_checks_every_variant_before_timing_and_refuses_a_wrong_one():
    device = torch.device("cpu")
    init = train_step.make_init(TINY)
    inputs = [torch.rand(1, 3, 32, 32) * 2 - 1]
    wrong = TrainStep(TINY, Variant(channels_last=True), init, inputs, device)
    with torch.no_grad():  # a model that no longer computes what the reference does
        wrong.ae.vae.decoder.conv_out.bias.add_(0.05)
    log: list[str] = []
    rows = train_step.benchmark(
        TINY,
        [Variant(), Variant(checkpointing=True), Variant(model="diffusers")],
        device,
        repeats=2,
        warmup=1,
        peak=PEAK,
        allow_busy=True,
        extra={"wrong": wrong},
        log=log.append,
    )
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"vae-scale", "vae-scale checkpointing", "diffusers", "wrong"}
    assert by["wrong"]["error"].startswith("refused") and "median_ms" not in by["wrong"]
    assert wrong.calls == 0  # refused before timing: never stepped
    for name in ("vae-scale", "vae-scale checkpointing", "diffusers"):
        row = by[name]
        assert "error" not in row, row.get("error")
        for key in REQUIRED:
            assert row[key] is not None, (name, key)
        assert row["subject"] == "train_step" and row["repeats"] == 2
        assert 0 < row["mfu_pct"] <= 100 and row["gflop_per_image"] > 0
    assert by["vae-scale"]["x_diffusers_eager"] > 0
    # no diffusers step with checkpointing here: the checkpointing row has no ratio rather than one against
    # diffusers without it
    assert "x_diffusers_eager" not in by["vae-scale checkpointing"]
    ours = by["vae-scale"]
    assert ours["checked_against"] == "diffusers"
    # The same weights and batch through two implementations of one fp32 step: they differ only in the
    # order of sums, ~1e-6 relative on the loss and the gradients, whatever the CPU. A term left out or
    # weighted wrongly moves the loss by over 1e-2 and turns the gradient by more than a cosine of 0.999.
    assert ours["err_loss"] < 1e-4 and ours["grad_cos"] > 0.9999
    assert by["diffusers"]["x_diffusers_eager"] == 1.0


def test_suite_records_a_failing_subject_and_goes_on(tmp_path):
    env = harness.environment("cpu")

    def good(quick):  # rows may name a finer subject (kernels: the op); the suite files them under "good"
        return [harness.result_row("op", "v", harness.Timing(1.0, 0.9, 1.1, 3), env, quick=quick)]

    def bad(quick):
        raise ValueError("broken subject")

    # allow_busy: the shared test machine may be busy; the refusal has a test of its own
    rows, summary = run_suite({"bad": bad, "good": good}, quick=True, log=lambda s: None, allow_busy=True)
    assert summary["bad"]["status"] == "failed" and summary["good"]["status"] == "ok"
    assert rows[0]["benchmark"] == "bad" and "broken subject" in rows[0]["error"]
    assert rows[1]["benchmark"] == "good" and rows[1]["subject"] == "op" and rows[1]["quick"] is True
    assert exit_code(summary) == 1 and exit_code({"good": summary["good"]}) == 0
    meta = {**env, "mode": "quick", "command": "test", "load_before": None, "load_after": None,
            "wall_s": 1.0, "subjects": summary}  # fmt: skip
    path = write_suite(rows, meta, {}, tmp_path)
    assert path.name == f"{harness.device_slug(env['device'])}-{env['date']}.json"
    assert len(json.loads(path.read_text())["rows"]) == 2
    md = path.with_suffix(".md").read_text()
    assert "## bad: failed" in md and "broken subject" in md and "## good: ok" in md and "| op | v |" in md


@pytest.mark.parametrize("batch", [1, 2])
def test_an_nchw_model_stays_nchw_through_attention(batch):
    """The comparison with diffusers is like for like only if no layer silently switches memory format: the
    attention block's output projection comes back channels-last strided, and a residual sum that kept that
    layout made every later convolution of an NCHW model run NHWC (25% slower backward on a CPU)."""
    from vae_scale.config import load_config
    from vae_scale.models.sd import VAE

    vae = VAE(load_config("sd-f8", list(TINY.overrides)).model)
    layouts: list[str] = []
    for name, m in vae.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(
                lambda mod, inp, out, name=name: layouts.append(
                    "" if inp[0].is_contiguous() and out.is_contiguous() else name
                )
            )
    x_hat, _ = vae(torch.rand(batch, 3, 32, 32) * 2 - 1)
    assert not [n for n in layouts if n] and x_hat.is_contiguous()
    vae_cl = VAE(load_config("sd-f8", list(TINY.overrides)).model).to(memory_format=torch.channels_last)
    x = (torch.rand(batch, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)
    assert vae_cl(x)[0].is_contiguous(memory_format=torch.channels_last)


def checked_once(setting: Setting, variants: list[Variant]) -> dict[str, dict]:
    """One timed step per variant on the CPU, after its check; the rows by variant name, none an error."""
    rows = train_step.benchmark(
        setting,
        variants,
        torch.device("cpu"),
        repeats=1,
        warmup=0,
        peak=PEAK,
        allow_busy=True,
        log=lambda s: None,
    )
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    return {r["variant"]: r for r in rows}


def test_train_step_in_bf16_is_checked_against_fp32_with_a_calibrated_tolerance():
    by = checked_once(
        Setting(**{**TINY.__dict__, "precision": "bf16"}), [Variant(), Variant(model="diffusers")]
    )
    assert by["diffusers"]["checked_against"] == "diffusers fp32 (sets tol_*)"
    assert by["vae-scale"]["checked_against"] == "diffusers fp32" and by["vae-scale"]["dtype"] == "bf16"
    assert by["vae-scale"]["tol_loss"] >= train_step.TOLERANCES["bf16"].loss
    assert by["vae-scale"]["err_loss"] <= by["vae-scale"]["tol_loss"]


@pytest.mark.numerics
def test_train_step_with_the_discriminator_is_checked_against_diffusers_and_timed():
    """The discriminator's adaptive weight takes an autograd.grad that torch's flop counter cannot follow:
    the +disc rows are checked and timed all the same, without a FLOP count."""
    by = checked_once(TINY, [Variant(disc=True), Variant(model="diffusers", disc=True)])
    ours = by["vae-scale +disc"]
    assert ours["checked_against"] == "diffusers +disc" and ours["loss"] == "L1+KL+disc"
    # As above (the discriminator's hinge loss is a mean of logits of the same reconstructions).
    assert ours["err_loss"] < 1e-4 and ours["err_d_loss"] < 1e-4 and ours["grad_cos"] > 0.9999
    assert ours["median_ms"] > 0 and ours["mfu_pct"] is None and ours["x_diffusers_eager"] > 0


# --------------------------------------------------------------------------------------------------------
# Intervals on "vs" ratios


def test_median_interval_matches_the_order_statistics_worked_by_hand():
    ratios = [1.10, 0.95, 1.02, 1.30, 0.99, 1.05, 1.01, 0.90, 1.08, 1.03]
    # n = 10, sorted: 0.90 0.95 0.99 1.01 1.02 1.03 1.05 1.08 1.10 1.30. P(Bin(10, 1/2) <= 1) = 11/1024, so
    # [x_(2), x_(9)] covers the median with 1 - 22/1024 = 0.978515625 >= 0.95; P(<= 2) = 56/1024 would give
    # 0.89 for [x_(3), x_(8)], under 0.95.
    assert harness.median_interval(ratios) == (0.95, 1.10, 1 - 22 / 1024)
    # n = 6: only [min, max] reaches 95% (1 - 2/64); n = 5 reaches it with no k (1 - 2/32 = 0.9375).
    assert harness.median_interval([3, 1, 2, 6, 5, 4]) == (1, 6, 1 - 2 / 64)
    assert harness.median_interval([1, 2, 3, 4, 5]) is None
    assert harness.repeats_for() == 9  # n = 9: P(<= 1) = 10/512, [x_(2), x_(8)] at 0.961


def test_paired_ratio_pairs_samples_round_by_round():
    # Round 3 is slow for both variants (a drift): the paired ratio stays 2 in every round.
    ref = harness.timing_of([20.0, 22.0, 60.0, 20.0, 21.0, 20.0, 24.0, 20.0, 22.0, 20.0])
    ours = harness.timing_of([v / 2 for v in ref.samples_ms])
    got = harness.paired_ratio(ref, ours)
    assert got["ratio"] == 2.0 and got["ratio_lo"] == 2.0 and got["ratio_hi"] == 2.0
    assert got["ratio_pairs"] == 10 and got["ratio_coverage"] == 1 - 22 / 1024
    # Ratios 1.0, 1.1, ..., 1.9 in a shuffled order of rounds: median 1.45, interval [1.1, 1.8].
    factors = [1.3, 1.0, 1.9, 1.5, 1.1, 1.7, 1.2, 1.8, 1.4, 1.6]
    got = harness.paired_ratio(harness.timing_of([10 * f for f in factors]), harness.timing_of([10.0] * 10))
    # ten divisions by 10.0 and one mean of two: a few ulps from the decimal figures
    assert got["ratio"] == pytest.approx(1.45, rel=1e-12)
    assert (got["ratio_lo"], got["ratio_hi"]) == pytest.approx((1.1, 1.8), rel=1e-12)


# --------------------------------------------------------------------------------------------------------
# The machine's load


@pytest.fixture
def other_process():
    """A busy process that is not this one's descendant: started through a shell that exits at once, so
    it is re-parented and the sampler counts it as another program's load."""
    out = subprocess.run(
        ["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(out.stdout.strip())
    yield pid
    os.kill(pid, 9)


def test_the_sampler_counts_this_process_tree_as_its_own():
    import psutil

    me = psutil.Process()
    before = harness._tree_cpu_s(me)
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile time.process_time() < 0.5: pass"])
    child.wait()
    # The child burned at least 0.5 s of CPU (its interpreter's start-up adds more); once reaped its time
    # is in this process's children_* counters. The kernel accounts CPU time to the tick (10 ms or finer).
    assert harness._tree_cpu_s(me) - before >= 0.49


def test_a_busy_machine_is_refused_unless_allowed(other_process, monkeypatch, tmp_path, capsys):
    # A threshold of 1% of the cores: the spinning process gets more than that of a CPU even on a machine
    # loaded by others (a fair scheduler gives it ~1/(load+1) of a core, over 10% at load 8).
    monkeypatch.setattr(harness, "BUSY_FRACTION", 0.01)
    with pytest.raises(harness.BusyMachine, match="other processes used"):
        harness.check_idle(seconds=1.0)
    load = harness.check_idle(allow_busy=True, seconds=1.0)
    assert load["busy"] and load["others_cores"] > 0.01 * load["machine_cores"]
    # The suite refuses to start and writes nothing; exit code 3.
    assert run.main(["--quick", "--only", "data", "--out", str(tmp_path)]) == 3
    assert not list(tmp_path.iterdir()) and "machine busy before the run" in capsys.readouterr().err
    # Rows measured while busy: refused, their figures dropped, unless allowed, then flagged.
    row = {"variant": "v", "median_ms": 5.0, "p20_ms": 4.0, "images_per_s": 2.0, "x_diffusers_eager": 1.1}
    refused = harness.stamp_load([dict(row)], load, allow_busy=False)[0]
    assert refused["error"].startswith("refused: machine busy") and refused["busy"]
    assert not {"median_ms", "p20_ms", "images_per_s", "x_diffusers_eager"} & set(refused)
    kept = harness.stamp_load([dict(row)], load, allow_busy=True)[0]
    assert kept["busy"] and kept["median_ms"] == 5.0 and "error" not in kept
    # No CPU peak is measured on a busy machine, and nothing is cached.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    peak = harness.peak_rate("cpu", "fp32", target_s=0.02)
    assert peak["peak_tflop_per_s"] is None and peak["peak_note"].startswith("no idle CPU peak")
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------------------
# MFU against a stated peak


def test_mfu_is_never_above_100_percent():
    peak = {"peak_tflop_per_s": 1.0}
    # 1e12 FLOPs in 2 s against 1 TFLOP/s: 50%; in 0.5 s it would be 200%: the peak is wrong, no figure.
    assert harness.mfu(1e12, 2000.0, peak) == {"mfu_pct": 50.0, "mfu_note": None}
    over = harness.mfu(1e12, 500.0, peak)
    assert over["mfu_pct"] is None and over["mfu_note"].startswith("peak wrong: the step ran 2 TFLOP/s")
    assert harness.mfu(1e12, 500.0, {"peak_tflop_per_s": None, "peak_note": "n"})["mfu_note"] == "n"
    assert harness.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == (
        989.0,
        "NVIDIA H100 datasheet, bf16 dense",
    )
    assert harness.datasheet_peak("NVIDIA H100 PCIe", "bf16")[0] == 756.0
    assert harness.datasheet_peak("NVIDIA A100-SXM4-80GB", "fp16")[0] == 312.0
    assert harness.datasheet_peak("NVIDIA GeForce RTX 4090", "bf16") is None


# --------------------------------------------------------------------------------------------------------
# Like for like


def _block_calls(step, module) -> int:
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    step()
    handle.remove()
    return len(calls)


def test_diffusers_step_with_checkpointing_recomputes_its_blocks():
    """diffusers' AutoencoderKL checkpoints only when told to: with checkpointing the layers inside each down
    block run twice a step (again in backward), once without. (The block's own hook fires once either way:
    the checkpoint calls its forward, not the module.)"""
    init = train_step.make_init(TINY)
    inputs = [torch.rand(1, 3, 32, 32) * 2 - 1]
    calls = {}
    for ckpt in (False, True):
        step = DiffusersStep(
            TINY, Variant(model="diffusers", checkpointing=ckpt), init, inputs, torch.device("cpu")
        )
        assert step.ae.vae.encoder.gradient_checkpointing is ckpt
        calls[ckpt] = _block_calls(step, step.ae.vae.encoder.down_blocks[0].resnets[0])
    assert calls == {False: 1, True: 2}


@pytest.mark.numerics
def test_every_vs_ratio_is_like_for_like_and_mfu_says_when_the_peak_is_wrong():
    rows = train_step.benchmark(
        TINY,
        [
            Variant(),
            Variant(checkpointing=True),
            Variant(model="diffusers"),
            Variant(model="diffusers", checkpointing=True),
        ],  # fmt: skip
        torch.device("cpu"),
        repeats=6,
        warmup=0,
        peak={"peak_tflop_per_s": 1e-9, "peak_source": "a peak far below any CPU's"},
        allow_busy=True,
        log=lambda s: None,
    )
    by = {r["variant"]: r for r in rows}
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    assert by["vae-scale checkpointing"]["x_diffusers_eager_ref"] == "diffusers checkpointing"
    assert by["vae-scale"]["x_diffusers_eager_ref"] == "diffusers"
    for r in rows:
        lo, mid, hi = r["x_diffusers_eager_lo"], r["x_diffusers_eager"], r["x_diffusers_eager_hi"]
        assert lo <= mid <= hi and r["ratio_pairs"] == 6 and r["ratio_coverage"] == 1 - 2 / 64
        assert r["mfu_pct"] is None and r["mfu_note"].startswith("peak wrong")
        assert r["others_cores"] >= 0 and isinstance(r["busy"], bool)


# --------------------------------------------------------------------------------------------------------
# Scaling: the same cores per process


def test_scaling_gives_each_process_its_own_cores():
    assert scaling.core_sets(1, 1, [0, 1]) == [[0]]
    assert scaling.core_sets(2, 1, [0, 1]) == [[0], [1]]
    assert scaling.core_sets(2, 2, [0, 1, 4, 5]) == [[0, 1], [4, 5]]
    with pytest.raises(ValueError, match="3 processes x 1 threads need 3 cores; this process may use 2"):
        scaling.core_sets(3, 1, [0, 1])
    assert "benchmarks.pinned" in scaling.launch_command(2, ["--config", "demo"], pinned=True)
    # A real process through the wrapper, as torchrun starts each rank: local rank 1 runs on its core only.
    last = scaling.available_cores()[-1]
    env = {**os.environ, "PINNED_CORES": f"0;{last}", "LOCAL_RANK": "1", "PYTHONPATH": str(ROOT)}
    check = f"import os; assert os.sched_getaffinity(0) == {{{last}}}, os.sched_getaffinity(0)"
    got = subprocess.run(
        [sys.executable, "-m", "benchmarks.pinned", "timeit", "-n", "1", check], env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr


def test_superlinear_scaling_is_flagged_with_its_load():
    load = {"load_1m": 6.07, "others_cores": 1.5, "machine_cores": 2}
    assert scaling.superlinear_note(1.05, load, 2, 1) is None
    note = scaling.superlinear_note(6.01, load, 2, 1)
    assert note.startswith("efficiency 6.01 > 1.05") and "load 6.07" in note and "1.50 of 2 cores" in note


def test_train_step_times_the_trainers_step_on_clips():
    """wan-tiny on clips: the trainer's own step on (B, 3, T, R, R) batches, timed; the row says the frames,
    the rates per clip and per frame, and the memory."""
    setting = train_step.Setting("wan-tiny", 16, 1, "fp32", frames=5)
    rows = train_step.clip_benchmark(setting, torch.device("cpu"), repeats=2, warmup=1, allow_busy=True)
    (row,) = rows
    assert "error" not in row, row.get("error")
    assert row["frames"] == 5 and row["repeats"] == 2 and row["median_ms"] > 0
    assert row["frames_per_s"] == pytest.approx(5 * row["clips_per_s"])
    assert row["peak_rss_mb"] > 0 and 0 < row["state_mb"] < row["peak_rss_mb"]
