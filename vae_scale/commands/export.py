"""Weights out to diffusion pipelines and in from existing VAEs: `vae-scale export` and `vae-scale import`
(their flags: vae_scale/cli/export.py).

    vae-scale export --run runs/sd-ft --out sd-ft-vae/ [--ema] [--measure-latents [--n 1024] [--no-shift]]
    vae-scale export --run runs/sd-ft --out sd-ft-vae.safetensors --format safetensors
    vae-scale import --diffusers sdxl-vae/ --out runs/sdxl-ft [--config sd-finetune] [key=value ...]

The latent contract. A diffusion model trained on a VAE's latents expects that VAE's scaling_factor,
shift_factor, latents_mean / latents_std (and diffusers' tiling threshold, sample_size) in its config.json.

- A fine-tune of imported weights (model.init_from, which `vae-scale import` sets, or a diffusers folder
  given with --ckpt) is exported as a drop-in replacement: config.json is the imported one, key for key;
  only the weights change. The latent statistics are still measured (when there is data) and printed as
  advice, and written to latent_statistics.json beside config.json, never into it.
- A VAE trained from scratch, or any run with --measure-latents, gets measured statistics in config.json:

    shift_factor  = mean of every latent element          (null with --no-shift: SD style)
    scaling_factor = 1 / std of every latent element      (std about the mean)
    latents_mean / latents_std = the same per channel     (null with --no-channel-stats)

so that z_scaled = (z - shift_factor) * scaling_factor has mean 0 and std 1: FLUX and SD3 pipelines apply
exactly that, SD 1.x/2.x pipelines apply the scale alone. Pipelines that normalise per channel when
latents_mean and latents_std are set (SDXL's: (z - latents_mean) * scaling_factor / latents_std) expect a
scaling_factor near 1 beside them; export with --no-channel-stats for those (a global scale, as SDXL's own
VAE has). --no-stats measures nothing and writes the model config's values as they are.

Statistics are measured on N training samples (center crops through the validation reader, deterministic;
the posterior mean unless --sample).

A family whose statistics are part of its weights (FLUX.2: the running mean and variance of `bn`, per
channel of the 2x2-patchified latent, which its pipelines normalise with) has them measured the same way,
per channel of the layout the model names (statistics_layout), and written into those weights
(set_latent_statistics) instead of config.json; a drop-in fine-tune keeps the imported ones, since training
never moves them, and gets the measured ones as advice.

`--format safetensors` writes one file in the original latent-diffusion layout (encoder.down.0.block.0...,
attention as 1x1 convs), the single-file VAE format of ComfyUI, A1111 and diffusers' from_single_file,
with the diffusers config (statistics included) in its metadata under "config".

Import starts a run folder from a diffusers VAE (SD, SDXL, FLUX, any AutoencoderKL vae-scale represents):
RUN/config.yaml (the model section from the VAE's config.json, the rest from --config, default sd-f8) with
model.init_from pointing at RUN/init/vae.safetensors, which the trainer loads (weights.load_init_weights) when
there is no checkpoint to resume; RUN/init/config.json is the VAE's config.json, the contract export
keeps. The discriminator, which diffusers folders do not hold, starts afresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vae_scale.commands.common import DataOptions, InputError, LoadedModel
from vae_scale.config import ConfigError, ModelConfig, load_config
from vae_scale.data.shard_reader import DataError
from vae_scale.eval.metrics import key_noise
from vae_scale.files import check_output_dir, check_output_file, write_atomic

log = logging.getLogger(__name__)

DEFAULT_STATS_SAMPLES = 1024
INIT_WEIGHTS = "init/vae.safetensors"
# Model fields an import takes from the diffusers config.json; an override of one would not fit the weights.
ARCHITECTURE = (*ModelConfig.WEIGHT_KEYS, "preset")


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
    layout = getattr(vae, "statistics_layout", None)  # the family's statistics are per channel of it
    s1 = s2 = None
    n1 = n2 = 0.0  # sums of the latents normalised with the statistics the model holds (layout families)
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
        if layout is not None:
            normalised = vae.normalize_latents(z).double()
            n1, n2 = n1 + float(normalised.sum()), n2 + float(normalised.square().sum())
        z = (z if layout is None else layout(z)).double().cpu()
        if s1 is None:
            s1 = torch.zeros(z.shape[1], dtype=torch.float64)
            s2 = torch.zeros(z.shape[1], dtype=torch.float64)
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
    C = len(s1)
    channel_mean = s1 / count
    channel_var = (s2 / count - channel_mean.square()).clamp_min(0)
    mean = float(s1.sum() / (count * C))
    var = max(float(s2.sum() / (count * C)) - mean**2, 0.0)
    out = {
        "samples": samples,
        "mean": mean,
        "std": var**0.5,
        "channel_mean": channel_mean.tolist(),
        "channel_std": channel_var.sqrt().tolist(),
        "latent": "sample" if sample else "posterior mean",
    }
    if layout is not None:  # what the pipeline would see with the statistics the model held here
        out["normalised_mean"] = n1 / (count * C)
        out["normalised_std"] = max(n2 / (count * C) - out["normalised_mean"] ** 2, 0.0) ** 0.5
    return out


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


def imported_config(source: str | Path) -> dict[str, Any] | None:
    """The diffusers config.json a fine-tune started from, or None when there is none to read.

    source: model.init_from (a .safetensors file, with `vae-scale import`'s config.json beside it) or a
    diffusers folder (also a pipeline folder, whose vae/ it takes).
    """
    from vae_scale.formats.weights import CONFIG_NAME

    if not source:
        return None
    path = Path(source)
    candidates = (
        [path / CONFIG_NAME, path / "vae" / CONFIG_NAME] if path.is_dir() else [path.parent / CONFIG_NAME]
    )
    for candidate in candidates:
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as e:
                log.warning("ignoring %s: %s", candidate, e)
                return None
            return config if isinstance(config, dict) else None
    return None


def first_origin(init_from: str) -> str:
    """Where a chain of training phases started: model.init_from followed through the runs that each phase
    names (model.init_from=RUN) to the first diffusers folder or weights file; "" when the first phase
    started from random weights. A run that is gone or damaged ends the chain at its own path."""
    from vae_scale.train.run_state import phase_start

    for _ in range(64):  # a chain longer than this is a loop of runs naming each other
        try:
            phase = phase_start(init_from) if init_from else None
        except ConfigError:
            return init_from
        if phase is None:
            return init_from
        init_from = phase[1].model.init_from
    return init_from


LATENT_CONTRACT = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
"""The config.json keys a diffusion model relies on: measured by an export, kept by a drop-in fine-tune."""


def _describes(config: dict[str, Any], vae) -> bool:
    """Whether a diffusers config.json describes this model's architecture (so it can be written with it)."""
    from vae_scale.formats.weights import DiffusersFormatError, config_from_diffusers

    model = vae.config
    if model.family != "sd":  # the family's own config.json, key for key, but for the latent contract
        ours = vae.diffusers_config()
        skip = (*LATENT_CONTRACT, "sample_size")
        return all(config.get(k) == v for k, v in ours.items() if not k.startswith("_") and k not in skip)
    try:
        theirs = config_from_diffusers(config)
    except DiffusersFormatError:
        return False
    return all(
        getattr(theirs, k) == getattr(model, k) for k in ARCHITECTURE if k not in ("preset", "norm_eps")
    )


def _measure(loaded, vae, device, data: DataOptions, n: int, sample: bool, seed: int) -> dict[str, Any]:
    """Latent statistics on n samples of `data`; ExportError when there is no data."""
    if not data.data:
        raise ExportError(
            f"--data is needed for the latent statistics: {loaded.source} has no data.{data.split}"
        )
    f = vae.downsample_factor
    if data.resolution % f:
        raise ExportError(f"--resolution={data.resolution} is not a multiple of the downsampling factor {f}")
    batches = data.batches(limit=n, seed=loaded.config.train.seed)
    stats = latent_statistics(vae, batches, device=device, n=n, sample=sample, seed=seed)
    stats.update(
        {
            "data": data.data,
            "resolution": data.resolution,
            "source": loaded.source,
            "step": loaded.step,
            "ema": loaded.ema,
        }
    )
    return stats


STATISTICS = "latent_statistics.json"
# What from_pretrained may load besides the weights export writes: variants (.fp16), shards and their index,
# the legacy .bin
_WEIGHT_FILES = re.compile(r"diffusion_pytorch_model([.-].+)?\.(safetensors|bin)(\.index\.json)?")


def export_sources(loaded: LoadedModel) -> list[Path]:
    """The folders an export reads: the diffusers folder (and its vae/), or the checkpoint and the folder of
    the weights a fine-tune was imported from (its config.json, the contract)."""
    if loaded.checkpoint is None:
        source = Path(loaded.source)
        return [source, source / "vae"]
    reads = [loaded.checkpoint]
    if loaded.config.model.init_from:
        reads.append(Path(loaded.config.model.init_from).parent)
    return reads


def remove_stale_export(out: Path, keep_statistics: bool) -> list[str]:
    """Remove from a diffusers folder export just wrote what an earlier export left that this one did not
    write (weights variants, shards, the legacy .bin; latent_statistics.json unless kept); their names."""
    from vae_scale.formats.weights import WEIGHTS_NAME

    stale = [
        p
        for p in sorted(out.iterdir())
        if p.is_file()
        and (
            (_WEIGHT_FILES.fullmatch(p.name) and p.name != WEIGHTS_NAME)
            or (p.name == STATISTICS and not keep_statistics)
        )
    ]
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


def _factors(scaling_factor: float, shift_factor: float | None) -> str:
    shift = "null" if shift_factor is None else f"{shift_factor:.6g}"
    return f"scaling_factor {scaling_factor:.6g}, shift_factor {shift}"


def export_vae(
    loaded: LoadedModel,
    out: str | Path,
    data: DataOptions,
    *,
    fmt: str = "diffusers",
    n: int = DEFAULT_STATS_SAMPLES,
    sample: bool = False,
    seed: int = 0,
    measure_latents: bool = False,
    no_stats: bool = False,
    shift: bool = True,
    channel_stats: bool = True,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> list[str]:
    """`vae-scale export`: write a loaded VAE as a diffusers folder (fmt "diffusers") or one single-file
    .safetensors (fmt "safetensors"; a folder `out` gets vae.safetensors); the lines to report.

    A fine-tune of imported weights keeps the imported config.json (its latent contract) and gets the
    statistics measured on n samples of `data` as advice; a VAE trained from scratch, or measure_latents,
    gets them in its config (shift: shift_factor, channel_stats: latents_mean / latents_std). no_stats
    measures nothing.

    A non-empty `out` folder (an existing `out` file) is refused (OutputError) unless overwrite, and always
    when it is what the model is read from; overwriting removes what an earlier export left there that
    this one does not write (weights variants and shards such as diffusion_pytorch_model.fp16.safetensors,
    which from_pretrained(variant=...) would load; latent_statistics.json), and nothing else.
    """

    out = Path(out)
    reads = export_sources(loaded)
    if fmt == "diffusers":
        run_dir = [loaded.checkpoint.parent.parent] if loaded.checkpoint is not None else []
        check_output_dir(out, "--out", overwrite, [*reads, *run_dir])
    else:
        written = out if out.suffix == ".safetensors" else out / "vae.safetensors"
        check_output_file(written, "--out", overwrite, reads)
    cfg, vae = loaded.config, loaded.vae
    # FLUX.2 keeps its latent statistics in its weights (bn's running statistics), not in config.json.
    in_weights = hasattr(vae, "set_latent_statistics")
    if in_weights and not (shift and channel_stats):
        raise ExportError(
            f"--no-shift / --no-channel-stats shape config.json's factors; model.family={cfg.model.family} "
            "keeps its latent statistics per channel in its weights"
        )
    # Weights that came from a diffusers VAE carry its latent contract; a diffusion model relies on it.
    origin = first_origin(cfg.model.init_from) if loaded.checkpoint is not None else loaded.source
    imported = bool(origin)
    contract = imported_config(origin) if imported else None
    if contract is not None and not _describes(contract, vae):
        log.warning("%s's config.json does not describe this model; writing the model config instead", origin)
        contract = None
    into_config = not no_stats and (measure_latents or not imported)
    if not (shift and channel_stats) and not into_config:
        why = "--no-stats" if no_stats else "a fine-tune of imported weights keeps the imported values"
        raise ExportError(
            f"--no-shift / --no-channel-stats shape measured statistics, and {why}: add --measure-latents"
        )

    vae.to(device)
    stats, advice_error, removed = None, None, []
    if into_config:
        stats = _measure(loaded, vae, device, data, n, sample, seed)
        if in_weights:
            vae.set_latent_statistics(stats["channel_mean"], [s * s for s in stats["channel_std"]])
        else:
            vae.config = with_statistics(vae.config, stats, shift=shift, channel_stats=channel_stats)
    elif not no_stats:  # advice only: an export without data still keeps the contract
        try:
            stats = _measure(loaded, vae, device, data, n, sample, seed)
        except (ExportError, DataError, FileNotFoundError) as e:
            advice_error = str(e)
    if loaded.checkpoint is not None and not imported:  # diffusers' sample_size is the training resolution
        vae.config = dataclasses.replace(vae.config, sample_size=cfg.data.resolution)
    vae.cpu()
    config = vae.diffusers_config()
    if contract is not None:
        measured = [k for k in LATENT_CONTRACT if k in config] if into_config else []
        config = {**contract, **{k: config[k] for k in measured}}

    if fmt == "diffusers":
        vae.save_diffusers(out, config)
        if stats is not None:
            write_atomic(out / STATISTICS, json.dumps(stats, indent=2) + "\n")
        removed = remove_stale_export(out, keep_statistics=stats is not None)
        written = out
    else:
        if vae.config.family != "sd":
            raise ExportError(
                "--format safetensors writes latent diffusion's single-file layout, which only the SD "
                f"family has; export model.family={vae.config.family} as a diffusers folder"
            )
        written.parent.mkdir(parents=True, exist_ok=True)
        sd = state_dict_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
        meta = {"format": "pt", "config": json.dumps(config)}
        if stats is not None:
            meta["latent_statistics"] = json.dumps(stats)
        tmp = written.with_name(f".{written.name}.tmp")
        save_file(sd, tmp, metadata=meta)
        tmp.replace(written)

    report = _statistics_lines if in_weights else _factor_lines
    lines = report(written, fmt, loaded, config, stats, into_config, origin, contract, advice_error)
    if removed:
        lines.append(f"removed what an earlier export left in {out}: {', '.join(removed)}")
    return lines


def _factor_lines(
    written, fmt, loaded, config, stats, into_config, origin, contract, advice_error
) -> list[str]:
    """export's report for a family whose latent statistics are config.json's factors (SD's)."""
    scale, shift_factor = config.get("scaling_factor", 1.0), config.get("shift_factor")
    if into_config:
        how = f"measured on {stats['samples']} samples ({stats['latent']})"
    elif origin:
        how = f"the latent contract of {origin} kept (its config.json" + (
            ")" if contract else ", from the run)"
        )
    else:
        how = "from the model config"
    kind = f"{fmt}{', EMA' if loaded.ema else ''}"
    lines = [
        f"wrote {written} ({kind}): {_factors(scale, shift_factor)}, "
        + (f"sample_size {config['sample_size']}, " if "sample_size" in config else "")
        + how
    ]
    if stats is not None and not into_config:
        measured_scale, measured_shift = 1.0 / stats["std"], stats["mean"]
        kept_mean = (stats["mean"] - (shift_factor or 0.0)) * scale
        lines.append(
            f"measured on {stats['samples']} samples ({stats['latent']}): "
            f"{_factors(measured_scale, measured_shift)}; with the kept factors the latents have mean "
            f"{kept_mean:.3f} and std {stats['std'] * scale:.3f}. A diffusion model trained on the original "
            "VAE keeps working with the kept values; for a new one trained on these latents, export with "
            "--measure-latents"
        )
    elif advice_error is not None:
        lines.append(f"latent statistics not measured ({advice_error}); the contract is kept all the same")
    return lines


def _statistics_lines(
    written, fmt, loaded, config, stats, into_config, origin, contract, advice_error
) -> list[str]:
    """export's report for a family whose latent statistics are in its weights (FLUX.2's bn)."""
    if into_config:
        how = f"measured on {stats['samples']} samples ({stats['latent']})"
    elif origin:
        how = f"kept from {origin} (training does not move them)"
    else:
        how = "as the model holds them"
    kind = f"{fmt}{', EMA' if loaded.ema else ''}"
    lines = [
        f"wrote {written} ({kind}): latent statistics (in the weights) {how}, "
        f"sample_size {config['sample_size']}"
    ]
    if stats is not None and not into_config:
        lines.append(
            f"measured on {stats['samples']} samples ({stats['latent']}): with the kept statistics the "
            f"normalised latents have mean {stats['normalised_mean']:.3f} and std "
            f"{stats['normalised_std']:.3f}. "
            "A diffusion model trained on the original VAE keeps working with the kept statistics; for a "
            "new one trained on these latents, export with --measure-latents"
        )
    elif advice_error is not None:
        lines.append(
            f"latent statistics not measured ({advice_error}); the kept ones are written all the same"
        )
    return lines


# --------------------------------------------------------------------------------------------------------
# import


def import_vae(
    diffusers: str | Path, run: str | Path, config: str | None = "sd-f8", overrides=(), force: bool = False
) -> list[str]:
    """`vae-scale import`: start run folder `run` from a diffusers folder of any family, to fine-tune it.

    config (a preset or YAML) and `key.sub=value` overrides give the rest of the run's config; the model
    section comes from the folder's config.json. force replaces an existing config.yaml / init weights.
    Returns the lines to report.
    """
    from vae_scale.formats.checkpoint import latest_checkpoint
    from vae_scale.formats.weights import CONFIG_NAME
    from vae_scale.models.interface import load_diffusers

    src, run, overrides = Path(diffusers), Path(run), list(overrides)
    if not src.exists():
        raise FileNotFoundError(f"--diffusers {src}: no such folder")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") and key.split(".")[1] in ARCHITECTURE:
            raise ConfigError(f"{key} comes from {src}/{CONFIG_NAME} on import and cannot be overridden")
    if latest_checkpoint(run) is not None:
        raise ExportError(
            f"--out {run} already holds checkpoints: training would resume them, not the import"
        )
    if (run / "config.yaml").exists() and not force:
        raise ExportError(f"--out {run}/config.yaml exists (pass --force to replace it)")

    vae = load_diffusers(src)  # any family's folder; validates the config mapping and every weight
    cfg = load_config(config, [*overrides, f"run.dir={run}"])
    if not any(o.split("=", 1)[0].strip() == "run.name" for o in overrides):
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
    disc = (
        "loss.disc_weight=0, so there is none until you set it"
        if cfg.loss.disc_weight == 0
        else f"loss.disc_weight={cfg.loss.disc_weight:g}"
    )
    in_weights = hasattr(vae, "set_latent_statistics")  # FLUX.2: bn's running statistics
    contract = "latent statistics in the weights" if in_weights else f"scaling_factor {m.scaling_factor:g}"
    return [
        f"imported {src} into {run}: {n_params:,} parameters, {m.latent_channels} latent channels, "
        f"f{m.downsample_factor}, {contract}",
        "the discriminator is freshly initialised: a diffusers folder holds no discriminator weights "
        f"({disc})",
        f"train with: vae-scale train --config {run / 'config.yaml'} data.train=PATTERN",
    ]
