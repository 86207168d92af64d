"""`vae-scale config` and `vae-scale info`: what a config resolves to, and what this machine has."""

from __future__ import annotations

import argparse
import importlib
import platform

from vae_scale.config import config_parser, load_config, preset_names


def config_main(argv: list[str]) -> int:
    """`vae-scale config`: print the resolved YAML."""
    args = config_parser("vae-scale config", "Print the resolved configuration.").parse_intermixed_args(argv)
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


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
    from vae_scale.models.interface import count_parameters

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
    print("\npreset                parameters   latent at 256 px   downsampling   family")
    for name in preset_names():
        m = load_config(name).model
        c, f = m.latent_channels, m.downsample_factor
        shape = f"{c} x {256 // f} x {256 // f}"
        print(f"{name:<21} {count_parameters(m):>12,}   {shape:<18} f{f:<13} {m.family}")
    return 0
