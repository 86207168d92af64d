"""The benchmark suite at a tiny size: the harness, train_step's check-then-time, run.py's fail-soft."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import harness, train_step
from benchmarks.run import exit_code, run_suite, write_suite
from benchmarks.train_step import Setting, TrainStep, Variant

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
# a stand-in for the measured matmul rate, whose ~1 s measurement the smoke test skips
MATMUL = {"matmul_tflop_per_s": 0.01, "matmul_dtype": "float32", "matmul_n": 0}


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
        matmul=MATMUL,
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
        assert row["mfu_pct"] > 0 and row["gflop_per_image"] > 0 and row["x_diffusers_eager"] > 0
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

    rows, summary = run_suite({"bad": bad, "good": good}, quick=True, log=lambda s: None)
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
    from vae_scale.model import VAE

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
        setting, variants, torch.device("cpu"), repeats=1, warmup=0, matmul=MATMUL, log=lambda s: None
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
