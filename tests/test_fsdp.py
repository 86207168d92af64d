"""FSDP2 on CPU processes (gloo): the same `accelerate launch --config_file launch/accelerate/fsdp.yaml`
command users run on GPUs, sharding for real, with every loss, the discriminator, image logging, gradient
accumulation, in-loop evaluation, sharded checkpoints and resume."""

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from support import (
    TINY,
    accelerate_launch,
    assert_same_training,
    checkpoint_file,
    initial_weights,
    run,
    uneven_val_shards,
)

from vae_scale.config import ConfigError, load_config
from vae_scale.formats.checkpoint import latest_checkpoint
from vae_scale.models.sd import VAE, count_parameters
from vae_scale.train.build import Autoencoder
from vae_scale.train.fsdp import fsdp_plan, fsdp_units, shard
from vae_scale.train.objective import VAELoss
from vae_scale.train.report import read_metrics
from vae_scale.train.wrapping import prepare_model

FSDP = "fsdp.yaml"
DDP = "cpu-2proc.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Real shards with 5 validation images: with batch 2 on two ranks, one rank has a batch more."""
    return uneven_val_shards(tmp_path_factory.mktemp("fsdp-shards"))


# --------------------------------------------------------------------------------------------------------
# The plan and the units, in-process


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["sd-f8", "f8c16", "f16c32", "xl"])
def test_every_preset_shards_at_its_levels_and_mid_blocks(preset, one_rank_group):
    cfg = load_config(preset)
    with torch.device("meta"):
        vae = prepare_model(VAE(cfg.model), sharded=True)
        model = Autoencoder(vae, VAELoss(load_config(preset, ["loss.recon=gaussian"]).loss).likelihood)
    units = fsdp_units(model)
    levels = len(cfg.model.block_out_channels)
    expected = [f"vae.encoder.down_blocks.{i}" for i in range(levels)] + ["vae.encoder.mid_block"]
    expected += ["vae.decoder.mid_block"] + [f"vae.decoder.up_blocks.{i}" for i in range(levels)]
    assert sorted(n for n, _ in units) == sorted(expected)
    n_params = sum(p.numel() for p in model.parameters())
    in_units = sum(p.numel() for _, u in units for p in u.parameters())
    assert in_units > 0.9 * n_params  # the root keeps only the thin layers around the levels
    shard(model, fsdp_plan(cfg, cuda=False), units, torch.device("cpu"), "bf16", "fp32")
    from torch.distributed.fsdp import fully_shard

    for module, output in [*((u, None) for _, u in units), (model, torch.float32)]:
        policy = fully_shard.state(module)._mp_policy  # gathered in bf16, reduced in fp32 as DDP does
        assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (
            torch.bfloat16,
            torch.float32,
            output,
        )
    params = dict(model.named_parameters())
    assert all(type(p).__name__ == "DTensor" for p in params.values())
    assert params["likelihood.logvar"].shape == (1,)  # 0-dim parameters cannot be sharded
    if preset == "xl":  # checkpointing wraps the same places that become units
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

        assert all(isinstance(u, CheckpointWrapper) for _, u in units)


def test_channels_last_under_sharding_keeps_weights_contiguous_and_runs_every_convolution_nhwc():
    cfg = load_config(None, [*TINY, "model.channels_last=true"])
    vae = prepare_model(VAE(cfg.model), sharded=True)
    assert all(p.is_contiguous() for p in vae.parameters())  # what fully_shard accepts
    nhwc = []
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, out: nhwc.append(not out.is_contiguous()))
    vae(torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    assert len(nhwc) > 10 and all(nhwc)


def test_a_launch_that_asks_for_something_fsdp_cannot_do_is_refused(monkeypatch):
    cfg = load_config(None, TINY)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_plan(cfg, cuda=False).unit_classes is None  # the model's own blocks
    for var, value, message in [
        ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "wraps nn.ModuleList containers"),
        ("FSDP_VERSION", "1", "fsdp_version: 1 is not supported"),
        ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params: true needs a GPU"),
        ("FSDP_ACTIVATION_CHECKPOINTING", "true", "model.gradient_checkpointing=true"),
        ("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT", "set SHARDED_STATE_DICT"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(ConfigError, match=message):
                fsdp_plan(cfg, cuda=False)
    with pytest.raises(ConfigError, match="train.parallel=ddp, but the launch asked for FSDP"):
        fsdp_plan(load_config(None, [*TINY, "train.parallel=ddp"]), cuda=False)
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "DownBlock,TransformerLayer")
    with pytest.raises(ConfigError, match="names TransformerLayer"):
        fsdp_units(Autoencoder(VAE(cfg.model), None), fsdp_plan(cfg, cuda=False).unit_classes)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not fsdp_plan(cfg, cuda=False).enabled
    assert fsdp_plan(load_config(None, [*TINY, "train.parallel=fsdp"]), cuda=False).enabled


def test_the_refusal_stops_a_real_launch_before_any_process_group(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(
        accelerate_launch(
            FSDP, 2, [*TINY, "data.train=synthetic", f"run.dir={run_dir}"], "--fsdp_version", "1"
        ),
        ok=False,
    )
    assert proc.returncode != 0
    assert "fsdp_version: 1 is not supported: set fsdp_version: 2" in proc.stderr
    assert "vae-scale train: error: fsdp_version: 1" in proc.stderr  # one line from each process
    assert "vae_scale/" not in proc.stderr  # and no trace of the trainer's (the launcher reports its child)
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------------------------
# Two processes on gloo

EVERYTHING = [  # every path that touches the sharded model, at once
    "train.steps=3",
    "train.grad_accum=2",
    "data.batch_size=2",
    "loss.disc_weight=0.5",
    "loss.disc_start=1",
    "loss.disc_layers=2",
    "loss.disc_channels=16",
    "log.images_every=1",
    "optim.ema_decay=0.9",
    "eval.every=1",
    "eval.max_batches=0",
    "eval.metrics=[psnr,kl,active_units]",
    "checkpoint.every=0",
]


def check_sharded_run(run_dir, recon: str, steps: int) -> None:
    """What every FSDP run with EVERYTHING on must show (eval at its last step)."""
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == f"step-{steps:09d}"
    assert len(list((ckpt / "optimizer").glob("*.distcp"))) == 2  # one shard file per rank
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows][-steps:] == list(range(1, steps + 1))
    assert all(r["d_loss"] > 0 and r["d_weight"] != 0.5 for r in train_rows[1:])  # adaptive weight
    val = [r for r in rows if "val/psnr" in r][-1]
    assert val["val/samples"] == 5  # every validation image once, though one rank ran out first
    assert 5 < val["val/psnr"] < 60
    assert (run_dir / "images" / f"reconstruction-{steps:09d}.png").is_file()
    if recon in ("gaussian", "logistic"):
        name = "logvar" if recon == "gaussian" else "log_scale"
        saved = load_file(ckpt / "loss.safetensors")[name]
        init = 0.0 if recon == "gaussian" else -2.0
        assert (saved != init).all(), "the learned likelihood scale did not train"
        # logged before the last step, which moves it by one Adam step (<= ~lr = 1e-3): not rounding
        assert abs(train_rows[-1][name] - saved.mean().item()) < 5e-3
    vae = VAE.from_checkpoint(run_dir)
    assert all(torch.isfinite(t).all() for t in vae.state_dict().values())


# gaussian and logistic run with all of it in the two tests below (DDP parity, resume).
@pytest.mark.parametrize("recon", ["l1", "l2"])
def test_each_loss_trains_sharded_with_discriminator_images_accumulation_and_eval(tmp_path, shards, recon):
    run_dir = tmp_path / "run"
    args = [*TINY, *EVERYTHING, f"data.train={shards}", f"data.val={shards}", f"loss.recon={recon}"]
    if recon == "l2":  # FSDP shards contiguous weights; the activations still run channels_last
        args.append("model.channels_last=true")
    proc = run(accelerate_launch(FSDP, 2, [*args, f"run.dir={run_dir}", "train.mixed_precision=bf16"]))
    assert "FSDP2 (launch (ACCELERATE_USE_FSDP))" in proc.stdout
    assert "params gathered in bf16, gradients reduce-scattered in fp32, outputs fp32" in proc.stdout
    assert ("channels_last: activations only" in proc.stdout) == (recon == "l2")
    check_sharded_run(run_dir, recon, 3)


@pytest.mark.slow
@pytest.mark.numerics
def test_fsdp_and_ddp_end_with_the_same_weights(tmp_path, shards):
    common = [
        *TINY,
        *EVERYTHING,
        f"data.train={shards}",
        f"data.val={shards}",
        "train.mixed_precision=no",
        "loss.recon=gaussian",
        "optim.ema_decay=0",
    ]
    run(accelerate_launch(FSDP, 2, [*common, f"run.dir={tmp_path / 'fsdp'}"]))
    check_sharded_run(tmp_path / "fsdp", "gaussian", 3)
    run(accelerate_launch(DDP, 2, [*common, f"run.dir={tmp_path / 'ddp'}"]))
    # The two reduce gradients in a different order (a reduce-scatter per micro-batch against one
    # all-reduce of the accumulated sum): fp32 rounding only, which support.SAME_TRAINING tells from a
    # wrong gradient on any CPU.
    start = initial_weights(common)
    for file in ("vae", "loss", "discriminator"):
        fsdp = checkpoint_file(tmp_path / "fsdp", f"{file}.safetensors")
        ddp = checkpoint_file(tmp_path / "ddp", f"{file}.safetensors")
        assert_same_training(fsdp, ddp, start[file], file)


@pytest.mark.slow
def test_stopped_and_resumed_is_bit_identical_to_one_run_and_can_change_world_size(tmp_path, shards):
    common = [
        *TINY,
        *EVERYTHING,
        f"data.train={shards}",
        f"data.val={shards}",
        "train.mixed_precision=no",
        "loss.recon=logistic",
        "optim.ema_decay=0.8",
    ]
    run(accelerate_launch(FSDP, 2, [*common, "train.steps=5", f"run.dir={tmp_path / 'straight'}"]))
    resumed = tmp_path / "resumed"
    run(accelerate_launch(FSDP, 2, [*common, "train.steps=2", f"run.dir={resumed}"]))
    proc = run(accelerate_launch(FSDP, 2, [*common, "train.steps=5", f"run.dir={resumed}"]))
    assert "resumed from" in proc.stderr + proc.stdout
    check_sharded_run(resumed, "logistic", 5)
    for file in ("vae", "ema", "loss", "discriminator"):
        a = checkpoint_file(tmp_path / "straight", f"{file}.safetensors")
        b = checkpoint_file(resumed, f"{file}.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (file, name)
    # The sharded optimizer state reshards: the same run goes on in one process.
    proc = run(accelerate_launch(FSDP, 1, [*common, "train.steps=6", f"run.dir={resumed}"]))
    assert "written by 2 processes, this run has 1" in proc.stderr
    state = json.loads((latest_checkpoint(resumed) / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint_file(resumed).values())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd-f8", "xl"])
def test_a_real_preset_takes_a_sharded_step(tmp_path, preset):
    # xl: 509M parameters, ~2 GB of fp32 weights per process while building, then half of it kept.
    run_dir = tmp_path / "run"
    args = [
        f"model.preset={preset}",
        "data.train=synthetic",
        "data.resolution=16",
        "data.batch_size=1",
        "train.steps=1",
        "log.every=1",
        "log.wandb=disabled",
        "checkpoint.every=0",
        f"run.dir={run_dir}",
    ]
    proc = run(accelerate_launch(FSDP, 2, args), timeout=900)
    assert "FSDP2" in proc.stdout
    (row,) = read_metrics(run_dir)
    assert row["step"] == 1 and torch.isfinite(torch.tensor(row["loss"]))
    saved = load_file(latest_checkpoint(run_dir) / "vae.safetensors")
    assert sum(t.numel() for t in saved.values()) == count_parameters(load_config(preset).model)


@pytest.mark.gpu
def test_on_gpus_fsdp_resumes_its_sharded_checkpoint_onto_the_uninterrupted_trajectory(tmp_path):
    nproc = torch.cuda.device_count()
    common = [
        *TINY,
        "data.train=synthetic",
        "train.mixed_precision=bf16",
        "optim.ema_decay=0.9",
        "model.gradient_checkpointing=true",
        "checkpoint.every=0",
    ]
    run(accelerate_launch(FSDP, nproc, [*common, "train.steps=4", f"run.dir={tmp_path / 'straight'}"]))
    resumed = tmp_path / "resumed"
    run(accelerate_launch(FSDP, nproc, [*common, "train.steps=2", f"run.dir={resumed}"]))
    run(accelerate_launch(FSDP, nproc, [*common, "train.steps=4", f"run.dir={resumed}"]))
    assert len(list((latest_checkpoint(resumed) / "optimizer").glob("*.distcp"))) == nproc
    for file in ("vae", "ema"):
        a = checkpoint_file(tmp_path / "straight", f"{file}.safetensors")
        b = checkpoint_file(resumed, f"{file}.safetensors")
        for name in a:  # cuDNN may pick other algorithms in another process: not always bit-identical
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{file} {name}")
    weights, ema = checkpoint_file(resumed), checkpoint_file(resumed, "ema.safetensors")
    assert any(not torch.equal(weights[n], ema[n]) for n in weights)
    torch.manual_seed(0)
    initial = VAE(load_config(None, TINY).model).state_dict()
    assert any(not torch.equal(weights[n], initial[n]) for n in weights)


def test_reduce_dtype_compute_compresses_ddp_gradients(one_rank_group):
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel

    from vae_scale.train.build import data_parallel

    grads = {}
    for precision, reduce_dtype in (("fp16", "fp32"), ("fp16", "compute"), ("bf16", "compute")):
        acc = SimpleNamespace(mixed_precision=precision, num_processes=1, device=torch.device("cpu"))
        torch.manual_seed(0)
        ddp = DistributedDataParallel(torch.nn.Linear(64, 64))
        line = data_parallel(ddp, acc, reduce_dtype)
        ddp(torch.randn(8, 64)).square().sum().backward()
        grads[precision, reduce_dtype] = ddp.module.weight.grad
        if (precision, reduce_dtype) == ("fp16", "compute"):
            assert line.endswith("gradients all-reduced in fp16")
        else:  # bf16 compression is NCCL's only: said, not silently dropped
            assert "gradients all-reduced in fp32" in line
    assert "bf16 compression needs NCCL" in line
    fp16 = grads["fp16", "compute"]
    assert torch.equal(fp16, fp16.half().float())  # went through fp16
    assert not torch.equal(grads["fp16", "fp32"], grads["fp16", "fp32"].half().float())
    torch.testing.assert_close(fp16, grads["fp16", "fp32"], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.compiles
def test_compiled_per_unit_fsdp_gives_the_uncompiled_losses(tmp_path):
    """train.compile under FSDP2: each unit compiled before it is sharded, the objective compiled whole (it
    reads the root's learned likelihood scale); two gloo processes take the uncompiled run's steps.

    With aot_eager: dynamo traces each unit between FSDP's hooks and AOTAutograd builds its forward and
    backward graphs, which is where sharding and compiling meet (the hooks run outside the graphs); what
    inductor generates from such graphs is checked against eager in test_trainer_parts'
    test_compiled_steps_give_the_eager_losses, in one process, at a fraction of two ranks' C++ builds."""
    common = [
        *TINY,
        "data.train=synthetic",
        "train.steps=2",
        "train.mixed_precision=no",
        "loss.recon=gaussian",
        "checkpoint.every=0",
    ]
    run(accelerate_launch(FSDP, 2, [*common, f"run.dir={tmp_path / 'eager'}"]))
    compiled_run = [
        *common,
        "train.compile=true",
        "train.compile_backend=aot_eager",
        f"run.dir={tmp_path / 'compiled'}",
    ]
    proc = run(accelerate_launch(FSDP, 2, compiled_run), timeout=900)
    assert "compiled per unit (6 units; the root's layers eager) by aot_eager" in proc.stdout
    eager = [r["loss"] for r in read_metrics(tmp_path / "eager") if "loss" in r]
    compiled = [r["loss"] for r in read_metrics(tmp_path / "compiled") if "loss" in r]
    assert len(eager) == len(compiled) == 2
    # As test_trainer_parts' compiled steps: the graphs run AOTAutograd's decompositions (group norm, the
    # losses' reductions as primitive ops), which sum in another order: ~1e-6 relative on the first loss
    # (a mean over ~10^4 values after ~20 layers), and the second step follows weights that Adam moved by
    # gradients differing by that rounding (~1e-6 of a step). A unit traced wrongly, a gradient lost at a
    # unit's boundary or a reduce-scatter skipped moves a loss by over 1e-2 of itself.
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled == pytest.approx(eager, rel=1e-3)
