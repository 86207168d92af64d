"""Training-step throughput: vae-scale's VAE against diffusers' AutoencoderKL with the same architecture.

Both models get the same weights, batch, input and loss (L1 + kl_weight * KL), forward and backward, timed
in alternation in one process. On a CPU this is a correctness-scale comparison (small batch, 128 px).

    python -m benchmarks.train_step [--preset sd-f8] [--batch 2] [--resolution 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.harness import environment, measure_interleaved, result_row, write_results
from vae_scale.config import load_config
from vae_scale.diffusers_io import config_to_diffusers
from vae_scale.model import VAE

KL_WEIGHT = 1e-6


def diffusers_model(vae: VAE):
    """diffusers' AutoencoderKL with the same config and weights as `vae`."""
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in config_to_diffusers(vae.config).items() if not k.startswith("_")}
    ref = AutoencoderKL(**cfg)
    ref.load_state_dict(vae.state_dict())
    return ref


def step_fn(model, x: torch.Tensor, eps: torch.Tensor, ours: bool):
    """One forward + backward of L1 + KL, the same math for both models."""

    def step():
        model.zero_grad(set_to_none=True)
        if ours:
            post = model.encode(x)
            z, kl = post.sample_kl(eps)
            x_hat = model.decode(z)
        else:
            post = model.encode(x).latent_dist
            z = post.mean + post.std * eps
            kl = post.kl()
            x_hat = model.decode(z).sample
        loss = (x_hat - x).abs().mean() + KL_WEIGHT * kl.mean()
        loss.backward()

    return step


def run(
    quick: bool = True, preset: str = "sd-f8", batch: int = 2, resolution: int = 128, repeats: int = 3
) -> list[dict[str, Any]]:
    """Time ours vs diffusers on this machine's CPU (or the first GPU); returns result rows."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = VAE(load_config(preset).model).to(device)
    ref = diffusers_model(vae).to(device)
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    eps = torch.randn(batch, *vae.latent_shape(resolution), device=device)
    timings = measure_interleaved(
        {"vae-scale": step_fn(vae, x, eps, ours=True), "diffusers": step_fn(ref, x, eps, ours=False)},
        device=device,
        warmup=1,
        repeats=repeats,
    )
    env = environment(device)
    rows = [
        result_row(
            "train_step",
            name,
            t,
            env,
            preset=preset,
            batch=batch,
            resolution=resolution,
            dtype="fp32",
            images_per_s=t.throughput(batch),
        )
        for name, t in timings.items()
    ]
    ratio = timings["diffusers"].median_ms / timings["vae-scale"].median_ms
    rows[0]["speedup_vs_diffusers"] = ratio
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd-f8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    rows = run(preset=args.preset, batch=args.batch, resolution=args.resolution, repeats=args.repeats)
    cols = [
        "variant",
        "device",
        "preset",
        "batch",
        "resolution",
        "dtype",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "images_per_s",
    ]
    path = write_results(rows, f"train_step-{rows[0]['device'].split()[0].lower()}", cols, args.out)
    print((path.with_suffix(".md")).read_text())
    print(
        f"vae-scale is {rows[0]['speedup_vs_diffusers']:.3f}x diffusers' AutoencoderKL "
        "(forward + backward, same weights, batch and input)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
