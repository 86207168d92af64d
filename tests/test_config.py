import pytest
import yaml

from vae_scale.cli import main
from vae_scale.config import ConfigError, config_from_dict, load_config, preset_names


def test_presets_load_and_round_trip():
    assert {"demo", "sd-f8", "f8c16", "f16c32", "xl"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.model.preset == name
        assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_precedence_cli_over_yaml_over_defaults():
    default = load_config()
    assert default.optim.lr == 1e-4 and default.model.latent_channels == 4
    yaml_only = load_config("f8c16")
    assert yaml_only.model.latent_channels == 16 and yaml_only.optim.lr == 1e-5
    cli = load_config("f8c16", ["model.latent_channels=32", "optim.lr=3e-4", "optim.betas=[0.9,0.95]"])
    assert cli.model.latent_channels == 32 and cli.optim.lr == 3e-4 and cli.optim.betas == [0.9, 0.95]
    assert cli.model.quant_convs is False  # untouched YAML value survives


def test_run_dir_follows_run_name():
    assert load_config(None, ["run.name=exp1"]).run.dir == "runs/exp1"
    assert load_config(None, ["run.name=exp1", "run.dir=/tmp/x"]).run.dir == "/tmp/x"


def test_model_preset_override_swaps_the_architecture():
    cfg = load_config("demo", ["model.preset=sd-f8", "model.latent_channels=8"])
    assert cfg.model.block_out_channels == [128, 256, 512, 512]
    assert cfg.model.latent_channels == 8
    assert cfg.data.resolution == 32  # the demo's training settings stay


def test_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  latent_channels: 8\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["train.seed=3"])
    assert (cfg.model.latent_channels, cfg.train.steps, cfg.train.seed) == (8, 7, 3)
    path.write_text("model:\n  latent_chanels: 8\n")
    with pytest.raises(ConfigError, match="model.latent_chanels.*model.latent_channels"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.latent_chanels=16",
            "unknown config key model.latent_chanels (did you mean model.latent_channels?)",
        ),
        ("optim.lr=fast", "optim.lr expects a number, got 'fast'"),
        ("train.steps=1.5", "train.steps expects an integer"),
        ("model.kernels=cuda", "model.kernels='cuda' is not one of auto | triton | torch"),
        ("model.norm_num_groups=7", "model.norm_num_groups=7 does not divide"),
        ("log.wandb=maybe", "log.wandb='maybe'"),
        ("data.batch_size=0", "data.batch_size must be > 0"),
        ("noequals", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("sd-f8", [override])
    assert message in str(e.value)


def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", "--config", "sd-f8", "model.latent_channels=16"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["latent_channels"] == 16 and out["model"]["block_out_channels"] == [
        128,
        256,
        512,
        512,
    ]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["config", "--config", "sd-f8", "model.latent_chanels=16"], "model.latent_chanels"),
        (["config", "--config", "sd-f8", "train.steps=many"], "train.steps"),
        (["config", "--config", "no-such-preset"], "no-such-preset"),
        (["config", "--no-such-flag"], "--no-such-flag"),
        (["trian"], "trian"),
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "Traceback" not in err
    assert len(err.splitlines()) <= 2  # argparse prints its usage line before the error


def _numeric_keys() -> list[tuple[str, type]]:
    """Every int or float key of the tree (list items included, e.g. optim.betas), with its item type."""
    import dataclasses
    import typing

    from vae_scale.config import Config

    keys = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            item = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is list else args[0]
            if item in (int, float):
                keys.append((f"{section.name}.{f.name}", item))
    return keys


# Keys whose range has no lower end: a shift or mean, a log-scale.
UNBOUNDED_BELOW = {"model.shift_factor", "model.latents_mean", "loss.logvar_init", "loss.log_scale_init"}


def _override(key: str, value: str) -> str:
    """`key=value`, written as a list where the key holds one (4 items for per-latent-channel keys)."""
    list_keys = {
        "model.block_out_channels": 1,
        "optim.betas": 2,
        "model.latents_mean": 4,
        "model.latents_std": 4,
    }
    if key in list_keys:
        value = "[" + ",".join([value] * list_keys[key]) + "]"
    return f"{key}={value}"


@pytest.mark.parametrize("key, item", _numeric_keys(), ids=lambda k: k if isinstance(k, str) else "")
def test_every_numeric_key_has_a_range_and_errors_name_it(key, item, capsys):
    assert len(_numeric_keys()) > 40  # the walk found the tree
    values = ["-1000000000" if item is int else "-1.0e+9"]
    if item is float:
        values += [".inf", "-.inf", ".nan"]
    for value in values:
        override = _override(key, value)
        if value.startswith("-1") and key in UNBOUNDED_BELOW:
            load_config(None, [override])
            continue
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert key in str(e.value), (override, str(e.value))
        # Through the command line: exit 2 and one line naming the key, no traceback.
        assert main(["config", override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
        ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
        ("optim.weight_decay=-5", "optim.weight_decay must be >= 0"),
        ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be > 0"),
        ("log.images_every=-1", "log.images_every must be >= 0"),
        ("train.time_budget_s=-10", "train.time_budget_s must be >= 0"),
        ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
        ("train.rollback_lr_scale=2", "train.rollback_lr_scale must be <= 1"),
        ("train.max_rollbacks=-1", "train.max_rollbacks must be >= 0"),
    ],
)
def test_values_that_cannot_train_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("demo", [override])


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """`vae-scale demo` leaves a run folder called demo/ in the working directory; the demo preset (and a
    later `vae-scale demo`, which loads it by name) must still resolve to the preset, not to that folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "checkpoints").mkdir(parents=True)
    cfg = load_config("demo")
    assert cfg.model.preset == "demo" and cfg.model.block_out_channels == [16, 32, 64, 64]
    (tmp_path / "mine.yaml").write_text("model:\n  latent_channels: 8\n")
    assert load_config(str(tmp_path / "mine.yaml")).model.latent_channels == 8
