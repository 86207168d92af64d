"""`vae-scale <command>`: the command line. This package parses and checks each command's flags and calls the
library functions that do the work (vae_scale.commands.evaluate, export, generate, compare, demo, probe,
vae_scale.data.shards, vae_scale.train.trainer); a Python user calls those directly. Each command is a
`*_main(argv)` callable in-process.

Usage errors (unknown command, bad flag, bad config key or value, bad input path) print one line and exit
with code 2; they never show a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from vae_scale.config import ConfigError

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C
CLOSED_PIPE = 141  # 128 + SIGPIPE, as a shell reports `yes | head`'s yes

# command -> (module:function, one-line help). Modules are imported only when their command runs, so
# `vae-scale info` or `config` start fast and need nothing beyond the core.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("info:config_main", "print the resolved config of a preset or YAML plus overrides"),
    "info": ("info:info_main", "versions, devices, kernel backend, presets"),
    "shards": ("shards:shards_main", "write WebDataset tar shards from a folder of images"),
    "train": ("train:train_main", "train a VAE (same command on CPU, one GPU, or accelerate launch)"),
    "demo": ("train:demo_main", "sample photos (--video: clips), a short training run, held-out scores"),
    "eval": ("evaluate:eval_main", "PSNR, SSIM, bits/dim, KL, active units (LPIPS, rFID with weights)"),
    "sample": ("generate:sample_main", "decode prior samples into a grid"),
    "reconstruct": ("generate:reconstruct_main", "side-by-side reconstructions of images"),
    "encode": ("generate:encode_main", "latent shards for training a diffusion model"),
    "export": (
        "export:export_main",
        "a diffusers AutoencoderKL folder (an imported VAE's latent contract kept)",
    ),
    "import": ("export:import_main", "start a run folder from a diffusers VAE to fine-tune it"),
    "compare": ("compare:compare_main", "runs' latest and best metrics, and their curves overlaid"),
    "probe": ("probe:probe_main", "train one small latent diffusion model per latent set: diffusability"),
}


class UsageError(ValueError):
    """A command-line mistake: reported in one line, exit code 2."""


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user's input is wrong" rather than "vae-scale is broken"."""
    # FileNotFoundError: every command names the flag and the path in its message.
    errors: list[type[BaseException]] = [UsageError, ConfigError, FileNotFoundError]
    for mod, name in (
        ("vae_scale.formats.weights", "WeightsError"),
        ("vae_scale.data.shard_reader", "DataError"),
        ("vae_scale.commands.common", "InputError"),
        ("vae_scale.eval.metrics", "MetricError"),
        ("vae_scale.files", "OutputError"),
        ("vae_scale.formats.checkpoint", "DamagedCheckpoint"),
    ):
        module = sys.modules.get(mod)
        if module is not None and hasattr(module, name):
            errors.append(getattr(module, name))
    return tuple(errors)


def command(name: str) -> Callable[[list[str]], int]:
    """The `main(argv)` of command `name` (its module imported now)."""
    module, func = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vae-scale` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: vae-scale <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else USAGE_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else f"; commands: {', '.join(COMMANDS)}"
        print(f"vae-scale: error: unknown command {name!r}{hint}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return int(command(name)(rest) or 0)
    except SystemExit as e:  # argparse exits 2 on bad flags after printing its one-line usage error
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    except KeyboardInterrupt:  # Ctrl-C where nothing handles it (training saves and returns instead)
        print(f"vae-scale {name}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # the reader went away (`vae-scale info | head -1`): stop quietly, as `yes` does
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE
    except Exception as e:
        if isinstance(e, _usage_errors()):
            print(f"vae-scale {name}: error: {e}", file=sys.stderr)
            return USAGE_ERROR
        raise
