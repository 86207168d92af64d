"""The data options every data-reading command shares: one group, one help, defaults from the config."""

import re
import subprocess
import sys

import pytest

from vae_scale.cli import main
from vae_scale.cli.evaluate import eval_parser
from vae_scale.cli.export import export_parser
from vae_scale.cli.generate import encode_parser
from vae_scale.cli.options import data_options, data_overrides
from vae_scale.cli.train import train_parser
from vae_scale.config import DataConfig, load_config

SHARED = ("--data", "--resolution", "--batch-size", "--workers")
# the commands that load a run, the split they read by default and the flags they need besides
LOADING = {
    "eval": (eval_parser, "val", ["--run", "r"]),
    "export": (export_parser, "train", ["--run", "r", "--out", "o"]),
    "encode": (encode_parser, "train", ["--run", "r", "--out", "o"]),
}
RUN_DATA = DataConfig(train="train-shards", val="val-shards", resolution=48, batch_size=3, workers=1)


def _data_help(command: str, capsys) -> dict[str, str]:
    """Flag -> its help text (whitespace joined) in the data options group of `vae-scale COMMAND --help`."""
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    section = out.split("data options (the same in every command that reads data):", 1)[1]
    flags = {}
    for m in re.finditer(r"^  (--[\w-]+)(?: [A-Z{][^ ]*)?\s+(.*?)(?=^  --|\Z)", section, re.M | re.S):
        flags[m[1]] = " ".join(m[2].split())
    return flags


@pytest.mark.parametrize("command", ["eval", "export", "encode", "train"])
def test_every_data_command_shows_the_shared_options(command, capsys):
    flags = _data_help(command, capsys)
    assert set(SHARED) <= set(flags), flags
    assert flags["--resolution"].endswith("(default: data.resolution)")
    assert flags["--batch-size"].endswith("(default: data.batch_size)")
    assert flags["--workers"].endswith("(default: data.workers)")
    if command != "train":
        assert "(default: data.<split>" in flags["--data"]


def test_the_shared_options_read_the_same_in_every_command(capsys):
    helps = {c: _data_help(c, capsys) for c in ("eval", "export", "encode", "train")}
    for flag in ("--resolution", "--batch-size", "--workers"):
        assert len({h[flag] for h in helps.values()}) == 1, {c: h[flag] for c, h in helps.items()}
    assert helps["eval"]["--split"].endswith("(default: val)")
    assert helps["export"]["--split"] == helps["encode"]["--split"]


@pytest.mark.parametrize("command", list(LOADING))
def test_a_command_that_loads_a_run_takes_its_data_defaults_from_the_run(command):
    parser, split, required = LOADING[command]
    opts = data_options(parser().parse_args(required), RUN_DATA)
    assert (opts.data, opts.split) == (getattr(RUN_DATA, split), split)
    assert (opts.resolution, opts.batch_size, opts.workers) == (48, 3, 1)
    other = "train" if split == "val" else "val"
    assert (
        data_options(parser().parse_args([*required, "--split", other]), RUN_DATA).data == f"{other}-shards"
    )


@pytest.mark.parametrize("command", list(LOADING))
def test_workers_and_the_rest_mean_the_same_in_every_command(command):
    parser, _, required = LOADING[command]
    flags = ["--data", "synthetic", "--resolution", "64", "--batch-size", "5", "--workers", "0"]
    opts = data_options(parser().parse_args([*required, *flags]), RUN_DATA)
    assert (opts.data, opts.resolution, opts.batch_size, opts.workers) == ("synthetic", 64, 5, 0)


def test_train_flags_set_the_config_keys_the_other_commands_read():
    p = train_parser()
    args = p.parse_args(["--config", "demo", "--workers", "0", "--batch-size", "5", "--data", "x/{a,b}.tar"])
    cfg = load_config(args.config, [*args.overrides, *data_overrides(args, p)])
    assert (cfg.data.workers, cfg.data.batch_size, cfg.data.train) == (0, 5, "x/{a,b}.tar")
    default = p.parse_args(["--config", "demo"])
    assert load_config("demo", data_overrides(default, p)).data == load_config("demo").data


def test_a_flag_and_its_own_key_together_are_a_usage_error(capsys):
    assert main(["train", "--config", "demo", "--workers", "2", "data.workers=0"]) == 2
    assert "--workers and data.workers=... both given" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--workers", "-1"), ("--batch-size", "0"), ("--resolution", "-8")])
def test_bad_data_flag_values_are_usage_errors(flag, value, capsys):
    for command in ("eval", "train"):
        required = ["--run", "r"] if command == "eval" else ["--config", "demo"]
        assert main([command, *required, flag, value]) == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be" in err, err


def test_python_m_evaluate_is_the_eval_command():
    proc = subprocess.run(
        [sys.executable, "-m", "vae_scale.commands.evaluate", "--run", "no-such-run"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vae-scale eval: error: --run no-such-run: no such file or folder"
