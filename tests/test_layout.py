"""model.channels_last: true, false or auto, auto chosen per device and family (the attention block keeps its
input's layout: tests/test_benchmarks.py)."""

import pytest

from vae_scale.config import ConfigError, config_from_dict, load_config
from vae_scale.train.wrapping import CPU_CHANNELS_LAST, channels_last_choice


def test_auto_is_the_default_and_is_chosen_per_device_and_family():
    model = load_config("sd-f8").model
    assert model.channels_last == "auto"
    assert channels_last_choice(model, "cuda")[0] is True
    on_cpu, why = channels_last_choice(model, "cpu")
    assert on_cpu is CPU_CHANNELS_LAST and "auto" in why
    # Wan's 3D convolutions have no channels_last (a 4D format): NCHW wherever it runs.
    wan = load_config("wan-tiny").model
    assert channels_last_choice(wan, "cuda") == (False, channels_last_choice(wan, "cpu")[1])
    # An explicit value is kept on every device.
    for value in (True, False):
        cfg = load_config("sd-f8", [f"model.channels_last={str(value).lower()}"]).model
        assert channels_last_choice(cfg, "cuda")[0] is value and channels_last_choice(cfg, "cpu")[0] is value


def test_config_files_written_with_a_bool_still_load():
    saved = load_config("sd-f8").to_dict()
    for value in (True, False):
        saved["model"]["channels_last"] = value
        assert config_from_dict(saved).model.channels_last is value


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.channels_last=sometimes"], "model.channels_last expects true, false or auto"),
        (["model.family=wan", "model.channels_last=true"], "model.channels_last=true: model.family=wan"),
    ],
)
def test_a_layout_that_cannot_run_is_refused_naming_the_key(overrides, message):
    preset = "wan-tiny" if "model.family=wan" in overrides else "sd-f8"
    with pytest.raises(ConfigError, match=message):
        load_config(preset, [o for o in overrides if o != "model.family=wan"])
