"""Every model family behind the one interface: the registry, diffusers folders read by their class, and the
real trainer (FSDP on gloo processes against DDP, exact resume) on each family's CPU-sized preset."""

import json

import pytest
import torch
from support import (
    accelerate_launch,
    assert_same_training,
    checkpoint_file,
    run,
    train_command,
    uneven_val_shards,
)

from vae_scale import config
from vae_scale.config import ConfigError, load_config
from vae_scale.formats.weights import DiffusersFormatError
from vae_scale.models import interface
from vae_scale.models.interface import build_model, load_checkpoint, load_diffusers

TINY_PRESETS = {"dcae": "dc-ae-tiny", "wan": "wan-tiny", "flux2": "flux2-tiny"}
"""Each family's CPU-sized preset (the SD family's is tests/support.py's TINY)."""

IMAGE_FAMILIES = ["dcae", "flux2"]
"""The families whose sharded and resumed runs are tested here, on images. Wan's are tested on clip shards
with 40% of the batches images, gradient accumulation and the 3D discriminator
(tests/test_train_video.py): what a Wan run on images does, and more."""

FAMILY_PRESETS = {
    "dcae": ["dc-ae-f32c32", "dc-ae-f64c128", "dc-ae-tiny"],
    "wan": ["wan2.1", "qwen-image", "wan-tiny", "wan-tiny-video"],
    "sd": ["sd-f8", "f8c16", "f16c32", "xl", "demo"],
    "flux2": ["flux2", "flux2-tiny"],
}


def test_the_config_names_every_family_the_registry_builds():
    assert tuple(interface.FAMILIES) == config.FAMILIES
    for family in config.FAMILIES:
        cls = interface.model_class(family)
        assert cls.family == family and cls.diffusers_classes


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_every_preset_builds_its_family_and_names_real_blocks(family):
    for name in FAMILY_PRESETS[family]:
        cfg = load_config(name).model
        assert cfg.family == family
        with torch.device("meta"):
            model = build_model(cfg)
        assert type(model).family == family
        assert model.downsample_factor == cfg.downsample_factor, name
        blocks = model.blocks()
        assert blocks, name
        for block in blocks:  # each a module with weights of its own: a unit checkpointing and FSDP can cut
            assert next(model.get_submodule(block).parameters(), None) is not None, (name, block)


def test_an_architecture_key_that_does_not_fit_is_named():
    with pytest.raises(ConfigError, match=r"model.arch.attention_head_dimm is not a dcae key"):
        build_model(load_config("dc-ae-tiny", ["model.arch.attention_head_dimm=8"]).model)
    with pytest.raises(ConfigError, match=r"model.arch.z_dim: set model.latent_channels instead"):
        build_model(load_config("wan-tiny", ["model.arch.z_dim=8"]).model)
    with pytest.raises(ConfigError, match=r"model.family=sd takes none"):
        load_config("sd-f8", ["model.arch.base_dim=8"])
    with pytest.raises(ConfigError, match=r"model.family"):
        load_config("sd-f8", ["model.family=vqgan"])
    with pytest.raises(ConfigError, match=r"unknown config key model.arch.a.b"):
        load_config("dc-ae-tiny", ["model.arch.a.b=1"])


def test_a_diffusers_folder_is_read_by_the_family_its_class_names(tmp_path):
    torch.manual_seed(0)
    model = build_model(load_config("dc-ae-tiny").model).eval()
    model.save_diffusers(tmp_path / "dcae")
    back = load_diffusers(tmp_path / "dcae").eval()
    assert type(back) is type(model)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back(x, sample=False)[0], model(x, sample=False)[0])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(DiffusersFormatError, match="AutoencoderTiny.*not a VAE this trainer reads"):
        load_diffusers(tmp_path / "other")


# --------------------------------------------------------------------------------------------------------
# The trainer on each family


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return uneven_val_shards(tmp_path_factory.mktemp("family-shards"))


def _args(family: str, shards, *extra: str) -> list[str]:
    """A short run of the family's tiny preset with the discriminator, accumulation and evaluation on."""
    return [
        "--config",
        TINY_PRESETS[family],
        f"data.train={shards}",
        f"data.val={shards}",
        "data.resolution=32",
        "data.batch_size=2",
        "data.workers=0",
        "train.grad_accum=2",
        "train.mixed_precision=no",
        "loss.disc_weight=0.5",
        "loss.disc_start=1",
        "loss.disc_layers=2",
        "loss.disc_channels=16",
        "optim.ema_decay=0.8",
        "eval.every=2",
        "eval.max_batches=0",
        "eval.metrics=[psnr]",
        "log.wandb=disabled",
        "log.every=1",
        "log.images_every=0",
        "checkpoint.every=0",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_each_family_trains_sharded_as_it_does_under_ddp(tmp_path, shards, family):
    args = _args(family, shards, "train.steps=3")
    run(accelerate_launch("fsdp.yaml", 2, [*args, f"run.dir={tmp_path / 'fsdp'}"]))
    run(accelerate_launch("cpu-2proc.yaml", 2, [*args, f"run.dir={tmp_path / 'ddp'}"]))
    cfg = load_config(TINY_PRESETS[family], args[2:])
    torch.manual_seed(cfg.train.seed)
    start = build_model(cfg.model).state_dict()
    # The two reduce gradients in a different order: fp32 rounding only (support.SAME_TRAINING says why).
    fsdp, ddp = checkpoint_file(tmp_path / "fsdp"), checkpoint_file(tmp_path / "ddp")
    assert_same_training(fsdp, ddp, start, family)
    assert load_checkpoint(tmp_path / "fsdp").config.family == family


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_each_family_resumes_onto_the_uninterrupted_run_bit_for_bit(tmp_path, shards, family):
    run(train_command([*_args(family, shards, "train.steps=4"), f"run.dir={tmp_path / 'straight'}"]))
    resumed = tmp_path / "resumed"
    run(train_command([*_args(family, shards, "train.steps=2"), f"run.dir={resumed}"]))
    run(train_command([*_args(family, shards, "train.steps=4"), f"run.dir={resumed}"]))
    for file in ("vae", "ema", "discriminator"):
        a = checkpoint_file(tmp_path / "straight", f"{file}.safetensors")
        b = checkpoint_file(resumed, f"{file}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (family, file)


@pytest.mark.parametrize("family", sorted(TINY_PRESETS))
def test_a_fine_tune_of_a_released_folder_goes_back_in_its_own_class_with_its_latent_contract(
    tmp_path, shards, family
):
    """import -> train -> export, as docs/finetune.md's journey, for each family's own diffusers class."""
    import diffusers

    from vae_scale.cli import main

    torch.manual_seed(0)
    released = build_model(load_config(TINY_PRESETS[family]).model)
    if family == "flux2":  # FLUX.2's latent contract is bn's running statistics, in the weights
        with torch.no_grad():
            released.bn.running_var.fill_(0.25)
    released.save_diffusers(tmp_path / "released")
    contract = json.loads((tmp_path / "released" / "config.json").read_text())
    key = {"dcae": "scaling_factor", "wan": "latents_std"}.get(family)
    if key is not None:
        contract[key] = 0.5 if family == "dcae" else [0.5] * len(contract["latents_std"])
    (tmp_path / "released" / "config.json").write_text(json.dumps(contract))
    run_dir = tmp_path / "run"
    assert main(["import", "--diffusers", str(tmp_path / "released"), "--out", str(run_dir)]) == 0
    train = _args(family, shards, "train.steps=2")
    run(train_command(["--config", str(run_dir / "config.yaml"), *train[2:], f"run.dir={run_dir}"]))
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["_class_name"] == contract["_class_name"]
    if key is not None:
        assert written[key] == contract[key]  # the latent contract a diffusion model relies on is kept
    back = getattr(diffusers, contract["_class_name"]).from_pretrained(tmp_path / "out")
    if family == "flux2":  # config.json key for key, and the statistics training never moves
        assert written == contract
        assert torch.equal(back.bn.running_var, released.bn.running_var)
    trained = checkpoint_file(run_dir)
    theirs = back.state_dict()
    assert trained.keys() == theirs.keys() and all(torch.equal(trained[k], theirs[k]) for k in trained)
    moved = any(not torch.equal(trained[k], v) for k, v in released.state_dict().items())
    assert moved, "the fine-tune did not change the weights"
