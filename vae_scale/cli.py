"""`vae-scale <command>`: one entry point, each command a `main(argv)` callable in-process.

Usage errors (unknown command, bad flag, bad config key or value, bad input path) print one line and exit
with code 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Callable

from vae_scale.config import ConfigError, config_parser, load_config, preset_names

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C

# command -> (module:function, one-line help). Modules are imported only when their command runs, so
# `vae-scale info` or `config` start fast and need nothing beyond the core.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("vae_scale.cli:config_main", "print the resolved config of a preset or YAML plus overrides"),
    "info": ("vae_scale.cli:info_main", "versions, devices, kernel backend, presets"),
    "shards": ("vae_scale.shards:shards_main", "write WebDataset tar shards from a folder of images"),
    "train": ("vae_scale.train:main", "train a VAE (same command on CPU, one GPU, or accelerate launch)"),
    "demo": ("vae_scale.demo:main", "shards from sample photos, a short training run, held-out PSNR"),
    "eval": (
        "vae_scale.evaluate:eval_main",
        "PSNR, SSIM, bits/dim, KL, active units (LPIPS, rFID with weights)",
    ),
    "sample": ("vae_scale.generate:sample_main", "decode prior samples into a grid"),
    "reconstruct": ("vae_scale.generate:reconstruct_main", "side-by-side reconstructions of images"),
    "encode": ("vae_scale.generate:encode_main", "latent shards for training a diffusion model"),
    "export": (
        "vae_scale.export:export_main",
        "a diffusers AutoencoderKL folder (an imported VAE's latent contract kept)",
    ),
    "import": ("vae_scale.export:import_main", "start a run folder from a diffusers VAE to fine-tune it"),
    "compare": ("vae_scale.compare:compare_main", "runs' latest and best metrics, and their curves overlaid"),
}


class UsageError(ValueError):
    """A command-line mistake: reported in one line, exit code 2."""


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user's input is wrong" rather than "vae-scale is broken"."""
    # FileNotFoundError: every command names the flag and the path in its message.
    errors: list[type[BaseException]] = [UsageError, ConfigError, FileNotFoundError]
    for mod, name in (
        ("vae_scale.weights", "WeightsError"),
        ("vae_scale.shard_reader", "DataError"),
        ("vae_scale.commands", "InputError"),
        ("vae_scale.metrics", "MetricError"),
        ("vae_scale.outputs", "OutputError"),
        ("vae_scale.checkpoint", "DamagedCheckpoint"),
    ):
        module = sys.modules.get(mod)
        if module is not None and hasattr(module, name):
            errors.append(getattr(module, name))
    return tuple(errors)


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vae-scale` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: vae-scale <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else USAGE_ERROR
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else f"; commands: {', '.join(COMMANDS)}"
        print(f"vae-scale: error: unknown command {command!r}{hint}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return int(_resolve(COMMANDS[command][0])(rest) or 0)
    except SystemExit as e:  # argparse exits 2 on bad flags after printing its one-line usage error
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    except KeyboardInterrupt:  # Ctrl-C where nothing handles it (training saves and returns instead)
        print(f"vae-scale {command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if isinstance(e, _usage_errors()):
            print(f"vae-scale {command}: error: {e}", file=sys.stderr)
            return USAGE_ERROR
        raise


# --------------------------------------------------------------------------------------------------------
# config


def config_main(argv: list[str]) -> int:
    """`vae-scale config`: print the resolved YAML."""
    args = config_parser("vae-scale config", "Print the resolved configuration.").parse_args(argv)
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


# --------------------------------------------------------------------------------------------------------
# info


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # a broken optional install is information, not a crash
        return f"not available ({type(e).__name__})"


def info_main(argv: list[str]) -> int:
    """`vae-scale info`: versions, devices, what kernels="auto" picks, presets."""
    argparse.ArgumentParser(prog="vae-scale info", description=info_main.__doc__).parse_args(argv)
    import torch

    from vae_scale import kernels
    from vae_scale.model import count_parameters

    print(f"python       {platform.python_version()} ({platform.machine()}, {platform.system()})")
    for name in ("torch", "triton", "accelerate", "webdataset", "wandb", "safetensors", "vae_scale"):
        print(f"{name:<12} {_version(name)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}       {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        print(f"devices      cpu ({torch.get_num_threads()} threads), no CUDA device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"kernels      auto -> {kernels.auto_backend(device)} on {device}")
    print("\npreset       parameters   latent at 256 px   downsampling")
    for name in preset_names():
        m = load_config(name).model
        c, f = m.latent_channels, m.downsample_factor
        shape = f"{c} x {256 // f} x {256 // f}"
        print(f"{name:<12} {count_parameters(m):>12,}   {shape:<18} f{f}")
    return 0
