"""The values of a config, below its dataclass tree (config.py): the YAML dialect (YAML 1.2 booleans), preset
files, a `key=value` override parsed, a value coerced to a field's type, and the range checks each section
runs in __post_init__. Every failure is a ConfigError naming the key.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2): `mixed_precision: no` stays the string "no"."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str):
    """YAML read with _Loader's booleans."""
    return yaml.load(text, Loader=_Loader)


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise naming `key` unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {' | '.join(choices)}")


def check_positive(key: str, value: float) -> None:
    """Raise naming `key` unless `value` is finite and > 0."""
    check_range(key, value, low=0, low_open=True)


def check_range(
    key: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise naming `key` unless `value` is finite and within [low, high] (an open end excludes it)."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key} must be {'>' if low_open else '>='} {low:g}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key} must be {'<' if high_open else '<='} {high:g}, got {value}")


def preset_names() -> list[str]:
    """Names of the presets shipped in vae_scale/configs."""
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files("vae_scale.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def read_yaml(name_or_path: str) -> dict[str, Any]:
    """The sections of a preset (by name) or a YAML file (by path). A folder that happens to carry a preset's
    name (a run folder called `demo` in the working directory) does not hide the preset."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist")
        text = path.read_text()
    else:
        res = resources.files("vae_scale.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            near = difflib.get_close_matches(name_or_path, preset_names(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; presets: {', '.join(preset_names())}"
            raise ConfigError(f"no preset or config file named {name_or_path!r}{hint}")
        text = res.read_text()
    try:
        data = parse_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {name_or_path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path} must be a mapping of sections, got {type(data).__name__}")
    return data


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML (or override-string-parsed) value to a field's type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        # The first type that takes the value: model.channels_last (bool | str) reads true, false and auto.
        for arg in args[:-1]:
            try:
                return coerce(key, value, arg)
            except ConfigError:
                pass
        return coerce(key, value, args[-1])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping (set one entry as {key}.NAME=value), got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        return [coerce(key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf / .nan never mean anything a run can use
                raise ConfigError(f"{key} must be a finite number, got {value}")
            return float(value)
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} expects a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def parse_override(item: str) -> tuple[str, Any]:
    """(key, value) of `section.key=value`, the value read as YAML (and "1e-4" as a number)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # "1e-4" is a string to YAML 1.1; numbers written that way are what users type.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key, value
