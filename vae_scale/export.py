"""Weights out to diffusion pipelines and in from existing VAEs: `vae-scale export` and `vae-scale import`.

    vae-scale export --run runs/sd-ft --out sd-ft-vae/ [--ema] [--n 1024] [--no-shift]
    vae-scale export --run runs/sd-ft --out sd-ft-vae.safetensors --format safetensors
    vae-scale import --diffusers stabilityai-sdxl-vae/ --out runs/sdxl-ft [--config sd-f8] [key=value ...]

Export measures the latent statistics a diffusion model needs on N training samples (center crops through
the validation reader, deterministic; the posterior mean unless --sample) and writes them into the
config.json of a diffusers AutoencoderKL folder:

    shift_factor  = mean of every latent element          (null with --no-shift: SD style)
    scaling_factor = 1 / std of every latent element      (std about the mean)
    latents_mean / latents_std = the same per channel     (null with --no-channel-stats)

so that z_scaled = (z - shift_factor) * scaling_factor has mean 0 and std 1: FLUX and SD3 pipelines apply
exactly that, SD 1.x/2.x pipelines apply the scale alone. Pipelines that normalise per channel when
latents_mean and latents_std are set (SDXL's: (z - latents_mean) * scaling_factor / latents_std) expect a
scaling_factor near 1 beside them; export with --no-channel-stats for those (a global scale, as SDXL's own
VAE has). The measurements go to latent_statistics.json beside config.json too.

`--format safetensors` writes one file in the original latent-diffusion layout (encoder.down.0.block.0...,
attention as 1x1 convs), the single-file VAE format of ComfyUI, A1111 and diffusers' from_single_file,
with the diffusers config (statistics included) in its metadata under "config".

Import starts a run folder from a diffusers VAE (SD, SDXL, FLUX, any AutoencoderKL vae-scale represents):
RUN/config.yaml (the model section from the VAE's config.json, the rest from --config, default sd-f8) with
model.init_from pointing at RUN/init/vae.safetensors, which the trainer loads (load_init_weights) when
there is no checkpoint to resume. The discriminator, which diffusers folders do not hold, starts afresh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vae_scale.commands import InputError, add_model_args, iter_batches, load_model, processes
from vae_scale.config import ConfigError, load_config
from vae_scale.evaluate import key_noise

log = logging.getLogger(__name__)

DEFAULT_STATS_SAMPLES = 1024
INIT_WEIGHTS = "init/vae.safetensors"
# Model fields an import takes from the diffusers config.json; an override of one would not fit the weights.
ARCHITECTURE = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "norm_eps",
    "mid_block_attention",
    "quant_convs",
    "preset",
)


class ExportError(InputError):
    """An export or import that cannot be done as asked; the message names the flag or path."""


# --------------------------------------------------------------------------------------------------------
# Latent statistics


@torch.no_grad()
def latent_statistics(
    vae,
    batches: Iterable[dict[str, Any]],
    *,
    device,
    n: int = DEFAULT_STATS_SAMPLES,
    sample: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean and std of the latents of the first n samples of `batches`, over all elements and per channel.

    Latents are posterior means (sample=False) or reparameterised samples seeded by each sample's key.
    Sums are float64. Returns {"samples", "mean", "std", "channel_mean", "channel_std", "latent"}.
    """
    vae.eval()
    C = vae.config.latent_channels
    s1 = torch.zeros(C, dtype=torch.float64)
    s2 = torch.zeros(C, dtype=torch.float64)
    count, samples = 0, 0
    for batch in batches:
        k = min(int(batch["count"]), n - samples) if n else int(batch["count"])
        if k <= 0:
            break
        x = batch["images"][:k].to(device).float()
        post = vae.encode(x)
        z = post.mode()
        if sample:
            keys = list(batch["keys"][:k]) if batch.get("keys") is not None else None
            z = post.sample(key_noise(keys, tuple(z.shape), seed, 0, samples).to(device))
        z = z.double().cpu()
        s1 += z.sum((0, 2, 3))
        s2 += z.square().sum((0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
        samples += k
        if n and samples >= n:
            break
    if samples == 0:
        raise ExportError("no samples to measure latent statistics on (empty data)")
    if n and samples < n:
        log.warning("latent statistics from %d samples, fewer than the %d asked for", samples, n)
    channel_mean = s1 / count
    channel_var = (s2 / count - channel_mean.square()).clamp_min(0)
    mean = float(s1.sum() / (count * C))
    var = max(float(s2.sum() / (count * C)) - mean**2, 0.0)
    return {
        "samples": samples,
        "mean": mean,
        "std": var**0.5,
        "channel_mean": channel_mean.tolist(),
        "channel_std": channel_var.sqrt().tolist(),
        "latent": "sample" if sample else "posterior mean",
    }


def with_statistics(config, stats: dict[str, Any], shift: bool = True, channel_stats: bool = True):
    """A copy of a ModelConfig with scaling_factor = 1/std, shift_factor = mean (or None) and, with
    channel_stats, latents_mean / latents_std per channel."""
    if stats["std"] <= 0:
        raise ExportError("the latents have zero variance: no scaling_factor can be measured")
    return dataclasses.replace(
        config,
        scaling_factor=1.0 / stats["std"],
        shift_factor=stats["mean"] if shift else None,
        latents_mean=stats["channel_mean"] if channel_stats else None,
        latents_std=stats["channel_std"] if channel_stats else None,
    )


# --------------------------------------------------------------------------------------------------------
# The single-file (original latent-diffusion) layout


def state_dict_to_ldm(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Our (= diffusers') tensor names to the original latent-diffusion VAE names; attention as 1x1 convs.

    levels: len(block_out_channels). The inverse of diffusers' convert_ldm_vae_checkpoint.
    """
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for name, t in sd.items():
        new = name
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", new)
        m = re.match(
            r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
            r"(weight|bias)$",
            new,
        )
        if m:
            new = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                t = t[:, :, None, None]
        new = new.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        out[new] = t.detach().contiguous()
    return out


# --------------------------------------------------------------------------------------------------------
# export


def export_main(argv: list[str]) -> int:
    """`vae-scale export --run RUN --out DIR [--format diffusers|safetensors] [--ema] [--n N] [--data P]`."""
    from vae_scale.diffusers_io import config_to_diffusers, save_diffusers

    p = argparse.ArgumentParser(
        prog="vae-scale export", description="Write a diffusers AutoencoderKL with its latent statistics."
    )
    add_model_args(p)
    p.add_argument(
        "--out",
        required=True,
        help="diffusers: a folder; safetensors: a .safetensors file "
        "(or a folder, which gets vae.safetensors)",
    )
    p.add_argument("--format", default="diffusers", choices=("diffusers", "safetensors"))
    p.add_argument("--data", help="samples for the statistics: shards or 'synthetic' (default: data.train)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="which shards of a folder")
    p.add_argument("--n", type=int, default=DEFAULT_STATS_SAMPLES, help="samples measured (default 1024)")
    p.add_argument("--sample", action="store_true", help="measure sampled latents, not posterior means")
    p.add_argument("--no-shift", action="store_true", help="shift_factor null (SD style: scale only)")
    p.add_argument(
        "--no-channel-stats",
        action="store_true",
        help="latents_mean / latents_std null (for pipelines that pair them with scaling_factor)",
    )
    p.add_argument("--no-stats", action="store_true", help="keep the model config's scale and shift")
    p.add_argument("--resolution", type=int, help="center-crop size (default: the run's data.resolution)")
    p.add_argument("--batch-size", type=int, help="images per batch (default data.batch_size)")
    p.add_argument("--workers", type=int, default=0, help="data loader workers (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seeds --sample's noise (per sample key)")
    args = p.parse_args(argv)
    if args.n <= 0:
        p.error("--n must be > 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_model(args.run, args.ckpt, args.ema)
    cfg, vae = loaded.config, loaded.vae
    device = processes().device
    vae.to(device)
    stats = None
    if not args.no_stats:
        data = args.data or cfg.data.train
        if not data:
            raise ExportError(
                f"--data is needed for the latent statistics: {loaded.source} has no data.train"
            )
        resolution = args.resolution or cfg.data.resolution
        f = vae.downsample_factor
        if resolution % f:
            raise ExportError(f"--resolution={resolution} is not a multiple of the downsampling factor {f}")
        batches = iter_batches(
            data,
            split=args.split,
            resolution=resolution,
            batch_size=args.batch_size or cfg.data.batch_size,
            workers=args.workers,
            limit=args.n,
            seed=cfg.train.seed,
        )
        stats = latent_statistics(vae, batches, device=device, n=args.n, sample=args.sample, seed=args.seed)
        stats.update(
            {
                "data": data,
                "resolution": resolution,
                "source": loaded.source,
                "step": loaded.step,
                "ema": args.ema,
            }
        )
        vae.config = with_statistics(
            vae.config, stats, shift=not args.no_shift, channel_stats=not args.no_channel_stats
        )
    if loaded.checkpoint is not None:  # diffusers' sample_size is the training resolution
        vae.config = dataclasses.replace(vae.config, sample_size=cfg.data.resolution)
    vae.cpu()
    out = Path(args.out)
    if args.format == "diffusers":
        if out.suffix == ".safetensors" or out.is_file():
            raise ExportError(f"--out {out}: --format diffusers writes a folder")
        save_diffusers(vae, out)
        if stats is not None:
            (out / "latent_statistics.json").write_text(json.dumps(stats, indent=2) + "\n")
        written = out
    else:
        written = out if out.suffix == ".safetensors" else out / "vae.safetensors"
        written.parent.mkdir(parents=True, exist_ok=True)
        sd = state_dict_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
        meta = {"format": "pt", "config": json.dumps(config_to_diffusers(vae.config))}
        if stats is not None:
            meta["latent_statistics"] = json.dumps(stats)
        tmp = written.with_name(f".{written.name}.tmp")
        save_file(sd, tmp, metadata=meta)
        tmp.replace(written)
    m = vae.config
    shift = "null" if m.shift_factor is None else f"{m.shift_factor:.6g}"
    how = f"measured on {stats['samples']} samples ({stats['latent']})" if stats else "from the model config"
    print(
        f"wrote {written} ({args.format}{', EMA' if args.ema else ''}): scaling_factor "
        f"{m.scaling_factor:.6g}, shift_factor {shift}, {how}"
    )
    return 0


# --------------------------------------------------------------------------------------------------------
# import


def load_init_weights(vae, path: str | Path) -> None:
    """Load model.init_from into `vae` in place: a diffusers folder or a .safetensors file (our names).

    FileNotFoundError or ExportError naming model.init_from when the file is missing or does not fit.
    """
    from vae_scale.diffusers_io import _read_weights, state_dict_from_diffusers

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.init_from={str(path)!r}: no such file or folder")
    if path.is_dir():
        if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
            path = path / "vae"
        sd = state_dict_from_diffusers(_read_weights(path))
    else:
        try:
            sd = state_dict_from_diffusers(load_file(path))
        except Exception as e:
            raise ExportError(f"model.init_from={str(path)!r}: not a safetensors file ({e})") from None
    try:
        result = vae.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ExportError(f"model.init_from={str(path)!r} does not fit the model config: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"model.init_from={str(path)!r} does not fit the model config: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def import_main(argv: list[str]) -> int:
    """`vae-scale import --diffusers DIR --out RUN [--config PRESET] [key=value ...]`: a run to fine-tune."""
    from vae_scale.checkpoint import latest_checkpoint
    from vae_scale.diffusers_io import CONFIG_NAME, load_diffusers

    p = argparse.ArgumentParser(
        prog="vae-scale import", description="Start a run folder from a diffusers AutoencoderKL."
    )
    p.add_argument("--diffusers", required=True, help="an AutoencoderKL folder (or a pipeline folder)")
    p.add_argument("--out", required=True, help="the new run folder")
    p.add_argument("--config", "-c", default="sd-f8", help="preset or YAML for the rest (default sd-f8)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config.yaml / init weights")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = p.parse_args(argv)
    src, run = Path(args.diffusers), Path(args.out)
    if not src.exists():
        raise FileNotFoundError(f"--diffusers {src}: no such folder")
    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") and key[len("model.") :] in ARCHITECTURE:
            raise ConfigError(f"{key} comes from {src}/{CONFIG_NAME} on import and cannot be overridden")
    if latest_checkpoint(run) is not None:
        raise ExportError(
            f"--out {run} already holds checkpoints: training would resume them, not the import"
        )
    if (run / "config.yaml").exists() and not args.force:
        raise ExportError(f"--out {run}/config.yaml exists (pass --force to replace it)")

    vae = load_diffusers(src)  # validates the folder: config mapping and every weight
    cfg = load_config(args.config, [*args.overrides, f"run.dir={run}"])
    if not any(o.split("=", 1)[0].strip() == "run.name" for o in args.overrides):
        cfg.run.name = run.name
    weights = run / INIT_WEIGHTS
    keep = {k: getattr(cfg.model, k) for k in ("kernels", "gradient_checkpointing", "channels_last")}
    cfg.model = dataclasses.replace(vae.config, **keep, init_from=str(weights.resolve()))
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()},
        weights,
        metadata={"format": "pt", "source": str(src.resolve())},
    )
    source_config = src / CONFIG_NAME if (src / CONFIG_NAME).is_file() else src / "vae" / CONFIG_NAME
    (weights.parent / CONFIG_NAME).write_text(source_config.read_text())
    (run / "config.yaml").write_text(cfg.to_yaml())
    m = cfg.model
    n_params = sum(t.numel() for t in vae.state_dict().values())
    print(
        f"imported {src} into {run}: {n_params:,} parameters, {m.latent_channels} latent channels, "
        f"f{m.downsample_factor}, scaling_factor {m.scaling_factor:g}"
    )
    disc = (
        "loss.disc_weight=0, so there is none until you set it"
        if cfg.loss.disc_weight == 0
        else f"loss.disc_weight={cfg.loss.disc_weight:g}"
    )
    print(
        f"the discriminator is freshly initialised: a diffusers folder holds no discriminator weights "
        f"({disc})"
    )
    print(f"train with: vae-scale train --config {run / 'config.yaml'} data.train=PATTERN")
    return 0
