"""The Trainer as parts: built from a config it runs steps without fit(), the same steps a run takes; the
config it was given stays as it was; train.compile runs real compiled steps; an fp16 step whose scaled
gradients overflow is skipped by the trainer's GradScaler path."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from support import TINY, initial_weights, poison_loss, tiny_config

from vae_scale.formats.checkpoint import latest_checkpoint
from vae_scale.train.trainer import Trainer, train


def tiny_cfg(run_dir, *extra: str):
    """Three steps of the tiny model on synthetic images."""
    return tiny_config(run_dir, "synthetic", "train.steps=3", *extra)


def vae_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.vae.state_dict().items()}


def test_a_trainer_built_from_a_config_takes_the_steps_a_run_takes_without_fit(tmp_path):
    cfg = tiny_cfg(tmp_path / "steps", "optim.ema_decay=0.9")
    given = copy.deepcopy(cfg.to_dict())
    trainer = Trainer(cfg)
    try:
        start = vae_weights(trainer)
        ema_start = [s.clone() for s in trainer.ema.shadow]
        for i in range(3):
            logs, stop = trainer.train_step()
            assert not stop and torch.isfinite(logs["loss"]) and logs["grad_norm"] > 0, i
        assert (trainer.step, trainer.samples_seen, trainer.skipped) == (3, 12, 0)
        stepped = vae_weights(trainer)
        assert any(not torch.equal(start[k], stepped[k]) for k in start)
        assert any(not torch.equal(a, b) for a, b in zip(ema_start, trainer.ema.shadow))
    finally:
        trainer.close()
    # The run's own loop, from the same config, ends on the very same weights.
    train(tiny_cfg(tmp_path / "run", "optim.ema_decay=0.9"))
    ran = load_file(latest_checkpoint(tmp_path / "run") / "vae.safetensors")
    assert set(ran) == set(stepped)
    for k in ran:
        assert torch.equal(ran[k], stepped[k]), k
    # "auto" precision is resolved in the trainer's copy (and its config.yaml), not in the caller's config.
    assert cfg.to_dict() == given and cfg.train.mixed_precision == "auto"
    assert trainer.cfg.train.mixed_precision == "no"
    assert "mixed_precision: 'no'" in (tmp_path / "steps" / "config.yaml").read_text()


def test_an_overflowing_fp16_step_is_skipped_and_halves_the_loss_scale(tmp_path):
    # Accelerate keeps a GradScaler for fp16 on GPUs only; here the trainer's accelerator gets a real
    # torch.amp.GradScaler on the CPU, where accelerate would put one. A large KL weight makes gradients of
    # a few units, which a loss scale of 2^127 takes past float32's largest value while the loss itself
    # stays finite: the step must change no weight and halve the scale, as torch's GradScaler does.
    kl = "loss.kl_weight=1e4"
    trainer = Trainer(tiny_cfg(tmp_path / "fp16", kl))
    reference = Trainer(tiny_cfg(tmp_path / "ref", kl))
    poison_loss(reference, step=0)  # skips step 0 too
    try:
        scaler = trainer.acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
        start = vae_weights(trainer)
        logs, _ = trainer.train_step()
        assert torch.isfinite(logs["loss"]) and not torch.isfinite(logs["grad_norm"])
        assert (trainer.skipped, trainer.consecutive_skips) == (1, 1)
        assert all(torch.equal(start[k], v) for k, v in vae_weights(trainer).items())
        assert scaler.get_scale() == 2.0**126
        # At a sane scale the next step trains, and unscaling by a power of two is exact: the same weights
        # as the same step without a scaler.
        scaler.update(2.0**10)
        reference.train_step()
        torch.manual_seed(1)  # the two trainers share the global RNG: the same posterior noise for both
        logs, _ = trainer.train_step()
        torch.manual_seed(1)
        ref_logs, _ = reference.train_step()
        assert trainer.consecutive_skips == 0 and torch.isfinite(logs["grad_norm"])
        assert scaler.get_scale() == 2.0**10  # no overflow: kept (growth comes after growth_interval steps)
        assert torch.equal(logs["grad_norm"], ref_logs["grad_norm"])
        got, want = vae_weights(trainer), vae_weights(reference)
        assert any(not torch.equal(start[k], got[k]) for k in start)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    finally:
        trainer.close()
        reference.close()


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.compiles
def test_compiled_steps_give_the_eager_losses(tmp_path):
    """train.compile compiles the encoder, the decoder and the objective, the discriminator's adaptive weight
    included, with no graph break: step 0 before disc_start, steps 1-2 adversarial."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    disc = ["loss.disc_weight=0.5", "loss.disc_start=1", "loss.disc_layers=2", "loss.disc_channels=16"]
    losses = {}
    for compiled in (False, True):
        cfg = tiny_cfg(tmp_path / str(compiled), f"train.compile={str(compiled).lower()}", *disc)
        trainer = Trainer(cfg)
        try:
            losses[compiled] = [trainer.train_step()[0]["loss"].item() for _ in range(3)]
        finally:
            trainer.close()
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 3  # the encoder, the decoder and the objective
    # Inductor fuses and reorders float sums: the first loss, a mean over ~10^4 values after ~20 layers,
    # moves by ~1e-6 relative (fp32's 1.2e-7 times the depth), ten times below 1e-5, while a graph that
    # drops or reorders an op moves it by over 1e-2. The later losses follow weights stepped with
    # gradients that differ by that rounding (Adam turns it into ~1e-6 of a step): still ~1e-6; one
    # step's loss decrease, which a wrong compiled backward would change, is over 1e-2 of the loss.
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_the_tests_know_the_weights_a_run_starts_from(tmp_path):
    """support.initial_weights, the start the cross-process tests measure a run's move from, draws what
    the Trainer draws: the VAE, the learned likelihood scale and the discriminator."""
    extra = ["loss.recon=gaussian", "loss.disc_weight=0.5", "loss.disc_layers=2", "loss.disc_channels=16"]
    trainer = Trainer(tiny_cfg(tmp_path / "start", *extra))
    try:
        built = {
            "vae": trainer.vae.state_dict(),
            "loss": trainer.criterion.likelihood_state(),
            "discriminator": trainer.criterion.discriminator.state_dict(),
        }
    finally:
        trainer.close()
    start = initial_weights([*TINY, "data.train=synthetic", *extra])
    assert start.keys() == built.keys()
    for file, weights in built.items():
        assert start[file].keys() == weights.keys(), file
        for name, t in weights.items():
            assert torch.equal(start[file][name], t), (file, name)


@pytest.mark.parametrize("decay", [None, 0.05])
def test_the_discriminators_adamw_decays_its_weights_as_the_vaes_does(tmp_path, decay):
    # torch's AdamW decays by 0.01 unless told otherwise; latent diffusion's Adam does not decay at all.
    extra = ["loss.disc_weight=0.5"] + ([] if decay is None else [f"optim.weight_decay={decay}"])
    trainer = Trainer(tiny_cfg(tmp_path / "disc", *extra))
    try:
        assert [g["weight_decay"] for g in trainer.disc_opt.param_groups] == [decay or 0.0]
        assert [g["weight_decay"] for g in trainer.opt.param_groups] == [decay or 0.0]
    finally:
        trainer.close()


def test_the_fused_adamw_resumes_a_checkpoint_written_by_the_for_loop_adamw(tmp_path):
    """Runs before fused AdamW on every device stepped a for-loop AdamW on CPUs; their checkpoints resume.

    The run is saved after a step of a for-loop AdamW (what the trainer built on a CPU before), resumed by a
    Trainer that builds the fused one, and both take the next step from the same state: the loaded moments
    and step counts must be the saved ones exactly, and the two steps the same update up to rounding.
    """
    cfg = tiny_cfg(tmp_path / "run", "loss.recon=gaussian")
    old = Trainer(cfg)
    try:
        assert old.opt.defaults["fused"]  # what the trainer builds now, on this CPU too
        params = [p for group in old.opt.param_groups for p in group["params"]]
        d = old.opt.defaults
        old.opt = torch.optim.AdamW(params, lr=d["lr"], betas=d["betas"], weight_decay=d["weight_decay"])
        old.train_step()
        old.save()
        saved = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(old.opt.state.values())}
        before = vae_weights(old)
        torch.manual_seed(7)
        old.train_step()  # the for-loop AdamW's next step
        for_loop = vae_weights(old)
    finally:
        old.close()
    new = Trainer(cfg)  # resumes the run's checkpoint, with the fused AdamW
    try:
        assert new.step == 1 and new.opt.defaults["fused"]
        loaded = list(new.opt.state.values())
        assert len(loaded) == len(saved)
        for i, state in enumerate(loaded):
            assert state.keys() == saved[i].keys(), i
            for k, v in state.items():
                assert torch.equal(v.cpu().float(), saved[i][k].float()), (i, k)
        torch.manual_seed(7)
        new.train_step()
        fused = vae_weights(new)
    finally:
        new.close()
    # The loaded state is checked exactly above. From it the two AdamWs compute the same update in a
    # different order of fp32 operations (~1e-7 of the step; the gradients are the same computation on the
    # same weights and batch): a thousandth of the step's RMS is far above that rounding, and far below
    # what a wrong learning rate, step count or decoupled decay would change.
    for k in before:
        step = (for_loop[k] - before[k]).double()
        gap = (fused[k] - for_loop[k]).double()
        assert gap.square().mean().sqrt() <= 1e-3 * step.square().mean().sqrt() + 1e-12, k
