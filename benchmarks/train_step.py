"""Training-step throughput: vae-scale's step against diffusers' AutoencoderKL with the same architecture.

vae-scale's step is the trainer's own: a `Trainer` built from the run config of the setting (preset, size,
batch, precision, the variant's toggles) times `Trainer.train_step`, the method a run calls (grad_accum 1):
autocast forward (encode, reparameterised sample + KL, decode), VAELoss (L1 + KL, and with the discriminator
its generator term and LDM's adaptive weight), backward, the discriminator's own step when it is on,
gradient clipping, the ranks' agreement on finite values (one host sync), AdamW (fused wherever torch has it),
zero_grad.
diffusers' AutoencoderKL runs in a loop of its own with the same loss, optimizer, clipping and sync, from
the same weights, batch and precision; only the model differs. Every variant of a setting lives in one
process and is timed in alternation (A B C, C B A, ...), on inputs rotated between steps, after it has
passed a correctness check: the step's forward and backward (Trainer.forward_loss) on a fixed batch and
noise against diffusers' fp32 eager step (the losses and every weight gradient; in bf16/fp16 within 3x the
distance of diffusers' own step in that precision). A variant that fails the check is refused (an error
row) and never timed.

Per variant: step time (median, p20, p80), images/s, peak device memory (CUDA: this variant's weights,
gradients and optimizer state plus the step's transient peak), MFU (model FLOPs per step, counted with
torch.utils.flop_counter on the eager reference step, over a stated peak: the GPU's datasheet figure, or a
CPU's matmul rate measured once on an idle machine; never above 100%, see harness.mfu), and speedups over
diffusers like for like: diffusers with the same loss, checkpointing and channels_last, eager
(x_diffusers_eager) and compiled (x_diffusers_compiled). A speedup is the median of the ratios of steps
paired round by round, with its distribution-free 95% interval (harness.paired_ratio). The toggles: fused
kernels (model.kernels auto vs torch, compiled too), channels_last, torch.compile (encoder and decoder, as
train.compile does), activation checkpointing, the discriminator. The machine's load is sampled while the
variants are timed; on a busy machine the rows are refused unless allow_busy (harness.stamp_load).

    python -m benchmarks.train_step [--quick] [--compile] [--device cuda|cpu] [--out DIR]
    python -m benchmarks.train_step --preset sd-f8 --resolution 128 --batch 2 --precision fp32

Without --preset, the sweep of the mode runs (see `sweep`); the data loader is not in the step (the data
benchmark measures it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from benchmarks.harness import (
    BusyMachine,
    CorrectnessError,
    LoadSampler,
    Timing,
    check_idle,
    device_slug,
    environment,
    error_row,
    measure_interleaved,
    mfu,
    paired_ratio,
    peak_rate,
    repeats_for,
    result_row,
    stamp_load,
    write_results,
)
from vae_scale.config import Config, load_config
from vae_scale.formats.weights import plain_name
from vae_scale.models.sd import VAE
from vae_scale.train.build import adamw_fused
from vae_scale.train.objective import LastLayer, VAELoss
from vae_scale.train.trainer import Trainer
from vae_scale.train.wrapping import to_channels_last

SUBJECT = "train_step"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # as train.mixed_precision says them
DISC_WEIGHT = 0.5  # LDM's disc_weight; the discriminator is on from step 0 (loss.disc_start=0)
INPUT_SETS = {"cuda": 3, "cpu": 2}  # batches rotated between steps
# Timed steps per variant: one more than the fewest whose 95% interval on a paired ratio leaves out the
# most extreme ratio at each end (harness.repeats_for: 9), so the bounds are the 2nd-lowest and
# 2nd-highest of 10 ratios (coverage 0.979). On a GPU steps are short: 20 (bounds 6th of 20, 0.959).
REPEATS = {"cpu": repeats_for() + 1, "cuda": 20}


@dataclass(frozen=True)
class Tolerance:
    """How far a variant may be from the reference: relative error of the losses, cosine similarity and
    relative norm error of the concatenated weight gradients."""

    loss: float
    grad_cos: float
    grad_norm: float


# bf16/fp16 differ from the reference by more than rounding: aten's GroupNorm returns fp32 under autocast,
# ours keeps the input's dtype (see kernels.group_norm_silu). A wrong model, loss or weight is far outside.
TOLERANCES = {
    "fp32": Tolerance(loss=1e-3, grad_cos=0.999, grad_norm=1e-2),
    "bf16": Tolerance(loss=3e-2, grad_cos=0.97, grad_norm=0.1),
    "fp16": Tolerance(loss=2e-2, grad_cos=0.98, grad_norm=0.1),
}


@dataclass(frozen=True)
class Setting:
    """What every variant of one comparison shares: model, image size, batch per device, precision."""

    preset: str
    resolution: int
    batch: int
    precision: str = "fp32"  # fp32 | bf16 | fp16: train.mixed_precision no | bf16 | fp16
    overrides: tuple[str, ...] = ()  # model.* overrides on the preset (tests use a tiny model)

    def fields(self) -> dict[str, Any]:
        return {
            "preset": self.preset + (f" ({', '.join(self.overrides)})" if self.overrides else ""),
            "resolution": self.resolution,
            "batch": self.batch,
            "dtype": self.precision,
        }


@dataclass(frozen=True)
class Variant:
    """One way of running the step: which model, and each toggle."""

    model: str = "vae-scale"  # vae-scale | diffusers
    kernels: str = "auto"  # model.kernels: auto (Triton on CUDA) | torch (the eager reference ops)
    channels_last: bool = False
    compile: bool = False
    checkpointing: bool = False
    disc: bool = False

    @property
    def name(self) -> str:
        flags = [
            "kernels=torch" if self.kernels == "torch" and self.model == "vae-scale" else "",
            "channels_last" if self.channels_last else "",
            "checkpointing" if self.checkpointing else "",
            "compile" if self.compile else "",
            "+disc" if self.disc else "",
        ]
        return " ".join([self.model, *[f for f in flags if f]])

    def fields(self, device: torch.device) -> dict[str, Any]:
        from vae_scale import kernels

        backend = self.kernels if self.kernels != "auto" else kernels.auto_backend(device)
        return {
            "model": self.model,
            "loss": "L1+KL+disc" if self.disc else "L1+KL",
            "kernels": backend if self.model == "vae-scale" else "aten",
            "channels_last": self.channels_last,
            "compile": self.compile,
            "checkpointing": self.checkpointing,
        }


# --------------------------------------------------------------------------------------------------------
# diffusers' side: its AutoencoderKL behind the same forward, (x, eps) -> (x_hat, KL per image)


class DiffusersAutoencoder(nn.Module):
    """The training forward through diffusers' AutoencoderKL and its DiagonalGaussianDistribution."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if eps is None else posterior.mean + posterior.std * eps
        return self.vae.decode(z).sample, posterior.kl()


def diffusers_model(vae: VAE) -> nn.Module:
    """diffusers' AutoencoderKL with the same config and weights as `vae`."""
    from diffusers import AutoencoderKL

    from vae_scale.formats.weights import config_to_diffusers

    cfg = {k: v for k, v in config_to_diffusers(vae.config).items() if not k.startswith("_")}
    ref = AutoencoderKL(**cfg)
    ref.load_state_dict(vae.state_dict())
    return ref


def config_for(setting: Setting, variant: Variant) -> Config:
    """The run config the trainer gets for this setting and variant (no LPIPS: weights not shipped)."""
    cfg = load_config(setting.preset, list(setting.overrides))
    cfg.loss = replace(
        cfg.loss,
        perceptual_weight=0.0,
        disc_weight=DISC_WEIGHT if variant.disc else 0.0,
        disc_start=0,
    )
    cfg.model = replace(
        cfg.model,
        kernels=variant.kernels,
        channels_last=variant.channels_last,
        gradient_checkpointing=variant.checkpointing,
    )
    cfg.data = replace(cfg.data, resolution=setting.resolution, batch_size=setting.batch)
    cfg.train = replace(cfg.train, mixed_precision=PRECISIONS[setting.precision], compile=variant.compile)
    cfg.log = replace(cfg.log, wandb="disabled")
    return cfg


# --------------------------------------------------------------------------------------------------------
# One variant's training step


class Step:
    """What the benchmark checks and times: one training step on the next of the rotated input batches
    (__call__), a check pass of losses and weight gradients on a fixed batch and noise, the bytes held
    between steps."""

    def __init__(self, setting: Setting, variant: Variant, device: torch.device):
        self.setting, self.variant, self.device = setting, variant, device
        self.calls = 0  # training steps taken (a refused variant takes none)

    def __call__(self) -> None:
        raise NotImplementedError

    def check_pass(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Losses and weight gradients of one forward + backward on a fixed batch and noise (no update)."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes held between steps: weights, optimizer state (created by the first step), discriminator."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the step holds besides memory (files, workers)."""


def _check_values(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if k in ("loss", "rec", "kl", "g_loss", "d_weight")}


def _tensor_bytes(tensors: list[torch.Tensor], optimizers: list[torch.optim.Optimizer | None]) -> int:
    for opt in optimizers:
        for state in opt.state.values() if opt is not None else ():
            tensors = tensors + [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


class Batches:
    """The step's input batches, already on the device, handed out in rotation with the interface of the
    trainer's loaders (vae_scale.data.synthetic.SyntheticLoader): the loader's own work is the data
    benchmark's subject, not this one's."""

    def __init__(self, inputs: list[torch.Tensor]):
        self.inputs, self.position = inputs, 0
        self.batches_per_epoch = len(inputs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            x = self.inputs[self.position % len(self.inputs)]
            self.position += 1
            yield {"images": x, "keys": []}

    def counters(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        pass


class TrainStep(Step):
    """vae-scale's step: a Trainer built from the run config of this setting and variant, started from the
    shared initial weights (`init`, through model.init_from and the discriminator's state dict), timing
    Trainer.train_step -- the method a run calls -- on `inputs` rotated between steps."""

    def __init__(
        self,
        setting: Setting,
        variant: Variant,
        init: dict[str, dict[str, torch.Tensor]],
        inputs: list[torch.Tensor],
        device: torch.device,
    ):
        from safetensors.torch import save_file

        super().__init__(setting, variant, device)
        self._dir = tempfile.TemporaryDirectory(prefix="train_step-")
        run_dir = Path(self._dir.name)
        save_file({k: v.contiguous() for k, v in init["vae"].items()}, run_dir / "init.safetensors")
        cfg = config_for(setting, variant)
        cfg.model = replace(cfg.model, init_from=str(run_dir / "init.safetensors"))
        cfg.run = replace(cfg.run, dir=str(run_dir / "run"))
        # The trainer's start-up lines and progress bar, once per variant, are not the benchmark's output.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.trainer = Trainer(cfg, loader=Batches(inputs))
        if self.trainer.device.type != device.type:
            self.trainer.close()
            raise RuntimeError(f"the trainer runs on {self.trainer.device.type}, not {device.type}")
        if self.trainer.disc is not None:
            self.trainer.disc.load_state_dict(init["disc"])
        self.ae = self.trainer.model  # the Autoencoder: .vae is the model the steps train

    def __call__(self) -> None:
        """One Trainer.train_step on the next input batch."""
        self.calls += 1
        self.trainer.train_step()

    def check_pass(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Trainer.forward_loss (the step's forward and loss) on the given noise, then its backward."""
        t = self.trainer
        if self.variant.channels_last:
            x = to_channels_last(x)
        t.opt.zero_grad(set_to_none=True)
        x_hat, _, loss, logs = t.forward_loss(x, eps=eps)
        t.acc.backward(loss)
        values = _check_values(logs)
        if t.disc is not None:
            with t.acc.autocast():
                d_loss, _ = t.criterion.discriminator_loss(
                    x, x_hat.detach(), t.step, discriminator=t.disc_ddp
                )
            values["d_loss"] = float(d_loss.detach())
        grads = {
            plain_name(n): p.grad.detach().float().flatten()
            for n, p in t.vae.named_parameters()
            if p.grad is not None
        }
        t.opt.zero_grad(set_to_none=True)
        return values, grads

    def state_bytes(self) -> int:
        t = self.trainer
        tensors = list(t.model.parameters()) + list(t.criterion.parameters())
        tensors += t.ema.shadow if t.ema is not None else []
        return _tensor_bytes(tensors, [t.opt, t.disc_opt])

    def close(self) -> None:
        self.trainer.close()
        self._dir.cleanup()


class DiffusersStep(Step):
    """diffusers' AutoencoderKL in a loop of its own with the trainer's step around it: autocast forward,
    the same VAELoss (and discriminator step), backward, clipping, the finite check's one host sync, AdamW
    (fused on CUDA), zero_grad. Built from the shared initial weights (`init`)."""

    def __init__(
        self,
        setting: Setting,
        variant: Variant,
        init: dict[str, dict[str, torch.Tensor]],
        inputs: list[torch.Tensor],
        device: torch.device,
    ):
        super().__init__(setting, variant, device)
        self.cfg = cfg = config_for(setting, variant)
        vae = VAE(cfg.model)
        vae.load_state_dict(init["vae"])
        self.ae = DiffusersAutoencoder(diffusers_model(vae)).to(device)
        del vae
        if variant.checkpointing:  # the like-for-like reference of model.gradient_checkpointing
            self.ae.vae.enable_gradient_checkpointing()
        if variant.channels_last:  # weights and inputs, as model.channels_last does for ours
            self.ae.to(memory_format=torch.channels_last)
            inputs = [to_channels_last(x) for x in inputs]
        self.inputs, self._i = inputs, 0
        if variant.compile:  # as train.compile does: encoder and decoder, not the posterior or the loss
            self.ae.vae.encoder.compile()
            self.ae.vae.decoder.compile()
        self.criterion = VAELoss(cfg.loss, image_channels=cfg.model.in_channels).to(device)
        if self.criterion.discriminator is not None:
            self.criterion.discriminator.load_state_dict(init["disc"])
        fused = adamw_fused(device)  # as the trainer's build_optimizer: fused wherever torch has it
        o = cfg.optim
        params = [p for p in self.ae.parameters() if p.requires_grad] + self.criterion.vae_parameters()
        self.opt = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused
        )
        self.disc_opt = None
        if self.criterion.discriminator is not None:
            self.disc_opt = torch.optim.AdamW(
                self.criterion.discriminator.parameters(),
                lr=cfg.loss.disc_lr or o.lr,
                betas=tuple(o.betas),
                **fused,
            )
        dtype = DTYPES[setting.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if setting.precision == "fp16" else None
        self.last_layer = LastLayer(self.ae.vae.decoder.conv_out)
        self.logs: dict[str, torch.Tensor] = {}

    def _forward_loss(self, x: torch.Tensor, eps: torch.Tensor | None):
        with self.autocast():
            x_hat, kl = self.ae(x, eps)
            loss, logs = self.criterion.autoencoder_loss(x, x_hat, None, kl, 0, last_layer=self.last_layer)
        return x_hat, loss, logs

    def _disc_loss(self, x: torch.Tensor, x_hat: torch.Tensor):
        with self.autocast():
            return self.criterion.discriminator_loss(x, x_hat.detach(), 0)

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def __call__(self) -> None:
        """One training step on the next input batch, as Trainer.train_step takes it (grad_accum=1)."""
        self.calls += 1
        x = self.inputs[self._i % len(self.inputs)]
        self._i += 1
        x_hat, loss, logs = self._forward_loss(x, None)
        finite = torch.ones((), device=self.device) * torch.isfinite(loss.detach())
        self._backward(loss)
        if self.disc_opt is not None:
            d_loss, d_logs = self._disc_loss(x, x_hat)
            finite = finite * torch.isfinite(d_loss.detach())
            self._backward(d_loss)
            logs = {**logs, **d_logs}
        for k, v in logs.items():  # the trainer's logs stay on the device: no host sync
            self.logs[k] = self.logs.get(k, 0) + v.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in self.opt.param_groups for p in g["params"]], clip
        )
        finite = finite * torch.isfinite(grad_norm)
        if self.disc_opt is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.disc_opt)
            d_norm = torch.nn.utils.clip_grad_norm_(self.criterion.discriminator.parameters(), clip)
            finite = finite * torch.isfinite(d_norm)
        nonfinite = bool((1 - finite).item())  # the trainer's one host sync per step
        for opt in (self.opt, self.disc_opt):
            if opt is None:
                continue
            if self.scaler is not None:
                self.scaler.step(opt)
            elif not nonfinite:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()

    def check_pass(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        if self.variant.channels_last:
            x = to_channels_last(x)
        self.opt.zero_grad(set_to_none=True)
        x_hat, loss, logs = self._forward_loss(x, eps)
        loss.backward()
        values = _check_values(logs)
        if self.disc_opt is not None:
            d_loss, _ = self._disc_loss(x, x_hat)
            values["d_loss"] = float(d_loss.detach())
            self.disc_opt.zero_grad(set_to_none=True)
        grads = {
            plain_name(n): p.grad.detach().float().flatten()
            for n, p in self.ae.vae.named_parameters()
            if p.grad is not None
        }
        self.opt.zero_grad(set_to_none=True)
        return values, grads

    def state_bytes(self) -> int:
        tensors = list(self.ae.parameters()) + list(self.criterion.parameters())
        return _tensor_bytes(tensors, [self.opt, self.disc_opt])


def build_step(
    setting: Setting,
    variant: Variant,
    init: dict[str, dict[str, torch.Tensor]],
    inputs: list[torch.Tensor],
    device: torch.device,
) -> Step:
    """The variant's step: a Trainer's for vae-scale, the loop above for diffusers."""
    kind = DiffusersStep if variant.model == "diffusers" else TrainStep
    return kind(setting, variant, init, inputs, device)


LOSS_KEYS = ("loss", "rec", "kl", "g_loss", "d_loss")
# means of discriminator logits, near 0: their error is absolute, on the logits' scale
LOGIT_KEYS = ("g_loss", "d_loss")


def distance(
    values: dict[str, float],
    grads: dict[str, torch.Tensor],
    ref_values: dict[str, float],
    ref_grads: dict[str, torch.Tensor],
) -> dict[str, float]:
    """How far a check pass is from the reference's: err_<loss> (relative; absolute for the logit means),
    grad_cos (cosine of all weight gradients, concatenated) and err_grad_norm (relative)."""
    if set(grads) != set(ref_grads):
        differ = sorted(set(ref_grads) ^ set(grads))[:3]
        raise CorrectnessError(f"gradients of different parameters: {differ} ...")
    out: dict[str, float] = {}
    for k, want in ref_values.items():
        got = values.get(k, math.nan)
        scale = 1.0 if k in LOGIT_KEYS else max(abs(want), 1e-12)
        out[f"err_{k}"] = abs(got - want) / scale
    names = sorted(ref_grads)
    # float64: fp32 sums over ~10^8 gradient entries drift by more than the tolerances
    g = torch.cat([grads[n].double() for n in names])
    r = torch.cat([ref_grads[n].to(g.device, torch.float64) for n in names])
    out["grad_cos"] = float(g @ r / (g.norm() * r.norm()).clamp_min(1e-300))
    out["err_grad_norm"] = abs(float(g.norm()) - float(r.norm())) / max(float(r.norm()), 1e-30)
    return out


def enforce(errs: dict[str, float], tol: Tolerance) -> None:
    """CorrectnessError naming the first measure outside `tol` (NaN is outside)."""
    for key, err in errs.items():
        if key == "grad_cos":
            if not err >= tol.grad_cos:
                raise CorrectnessError(
                    f"weight gradients: cosine {err:.6f} with the reference's < {tol.grad_cos:.6f}"
                )
            continue
        # d_weight is a ratio of gradient norms at the decoder's last layer: as loose as the gradients
        limit = tol.loss if key.removeprefix("err_") in LOSS_KEYS else tol.grad_norm
        if not err <= limit:
            raise CorrectnessError(f"{key.removeprefix('err_')}: error {err:.3g} > {limit:.3g}")


def calibrated(floor: Tolerance, errs: dict[str, float], factor: float = 3.0) -> Tolerance:
    """A reduced-precision tolerance: `factor` times the errors of diffusers' eager step in that precision
    against fp32 (how far a correct implementation lands), never tighter than `floor`."""
    loss = max([errs[f"err_{k}"] for k in LOSS_KEYS if f"err_{k}" in errs], default=0.0)
    norm = max(errs["err_grad_norm"], errs.get("err_d_weight", 0.0))
    return Tolerance(
        loss=max(floor.loss, factor * loss),
        grad_cos=min(floor.grad_cos, 1 - factor * (1 - errs["grad_cos"])),
        grad_norm=max(floor.grad_norm, factor * norm),
    )


@dataclass
class Reference:
    """What every variant of one loss is checked against: the fp32 eager reference step's losses and
    gradients on the check batch, the tolerance, and the reference step of the setting's precision when it
    is also timed (with its own errors against fp32)."""

    name: str
    values: dict[str, float]
    grads: dict[str, torch.Tensor]
    tol: Tolerance
    step: Step | None = None
    step_errors: dict[str, float] | None = None


def check_against(step: Step, ref: Reference, x: torch.Tensor, eps: torch.Tensor) -> dict[str, Any]:
    """Run step's check pass and compare it with the reference; CorrectnessError if it is outside the
    tolerance. Returns the measured errors."""
    values, grads = step.check_pass(x, eps)
    errs = distance(values, grads, ref.values, ref.grads)
    enforce(errs, ref.tol)
    return errs


def reference_pass(step: Step, x: torch.Tensor, eps: torch.Tensor) -> tuple[dict, dict, int | None]:
    """The reference's check pass (losses, gradients), with its FLOPs counted by torch's flop counter.

    None for the FLOPs where the counter cannot follow the pass: its module tracker refuses the
    autograd.grad of the discriminator's adaptive weight, so the +disc rows go without MFU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            values, grads = step.check_pass(x, eps)
        flops = counter.get_total_flops()
    except RuntimeError as e:
        if "_will_engine_execute_node" not in str(e):
            raise
        values, grads = step.check_pass(x, eps)
        flops = None
    return values, {k: g.cpu() for k, g in grads.items()}, flops


# --------------------------------------------------------------------------------------------------------
# One setting: check every variant, then time them in alternation


def fresh_accelerate_state() -> None:
    """Forget the mixed precision an earlier Accelerator fixed for this process.

    Accelerate keeps one AcceleratorState per process and refuses an Accelerator of another precision (a
    launch has one); the settings of one benchmark process differ in it. Each setting's trainers share one
    precision: clearing the state before and after a setting is how accelerate's own tests switch.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(e: BaseException) -> str:
    kind = "refused" if isinstance(e, CorrectnessError) else "failed"
    return f"{kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def make_init(setting: Setting, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random initial weights shared by every variant: the VAE's and the discriminator's state dicts."""
    torch.manual_seed(seed)
    cfg = config_for(setting, Variant(disc=True))
    vae = VAE(cfg.model)
    crit = VAELoss(cfg.loss, image_channels=cfg.model.in_channels)
    return {"vae": vae.state_dict(), "disc": crit.discriminator.state_dict()}


def reference_variant(disc: bool) -> Variant:
    """The variant every other is checked against: diffusers eager if it imports, else our eager ops."""
    try:
        import diffusers  # noqa: F401

        return Variant(model="diffusers", disc=disc)
    except ImportError:
        return Variant(model="vae-scale", kernels="torch", disc=disc)


def benchmark(
    setting: Setting,
    variants: list[Variant],
    device: torch.device,
    *,
    repeats: int = REPEATS["cpu"],
    warmup: int = 1,
    peak: dict[str, Any] | None = None,
    extra: dict[str, Step] | None = None,
    allow_busy: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Check every variant against the reference step, then time those that passed in alternation.

    `extra` adds ready-built steps under their own names (checked and timed like the others); `peak` is
    harness.peak_rate's (measured when None). Returns one row per variant: a timed row, or an error row for
    one that was refused or failed; rows timed while the machine was busy are refused unless `allow_busy`.
    """
    env = environment(device)
    fresh_accelerate_state()
    init = make_init(setting)
    model_cfg = load_config(setting.preset, list(setting.overrides)).model
    r, b, f = setting.resolution, setting.batch, model_cfg.downsample_factor
    torch.manual_seed(1)
    inputs = [torch.rand(b, 3, r, r, device=device) * 2 - 1 for _ in range(INPUT_SETS.get(device.type, 2))]
    x_check = torch.rand(b, 3, r, r, device=device) * 2 - 1
    eps_check = torch.randn(b, model_cfg.latent_channels, r // f, r // f, device=device)
    rows: list[dict[str, Any]] = []
    steps: dict[str, Step] = {}
    checks: dict[str, dict[str, Any]] = {}
    flops: dict[bool, int | None] = {}
    refs: dict[bool, Reference] = {}
    wanted = set(variants)

    def reference(disc: bool) -> Reference:
        """The fp32 eager reference of this loss (FLOPs counted), and in reduced precision the same step in
        that precision, whose distance from fp32 sets the tolerance."""
        if disc not in refs:
            v = reference_variant(disc)
            ref = build_step(replace(setting, precision="fp32"), v, init, inputs, device)
            values, grads, flops[disc] = reference_pass(ref, x_check, eps_check)
            if setting.precision == "fp32":
                step = ref if v in wanted else None
                refs[disc] = Reference(v.name, values, grads, TOLERANCES["fp32"], step)
            else:
                ref.close()
                del ref
                _free(device)
                ref = build_step(setting, v, init, inputs, device)
                errs = distance(*ref.check_pass(x_check, eps_check), values, grads)
                tol = calibrated(TOLERANCES[setting.precision], errs)
                step = ref if v in wanted else None
                refs[disc] = Reference(f"{v.name} fp32", values, grads, tol, step, errs)
            if step is None:
                ref.close()
            del ref
            _free(device)
        return refs[disc]

    candidates: list[tuple[str, Variant, Callable[[], Step]]] = [
        (v.name, v, lambda v=v: build_step(setting, v, init, inputs, device)) for v in variants
    ]
    candidates += [(name, s.variant, lambda s=s: s) for name, s in (extra or {}).items()]
    for name, variant, build in candidates:
        t0 = time.perf_counter()
        step = None
        try:
            ref = reference(variant.disc)
            tolerance = {"tol_loss": ref.tol.loss, "tol_grad_cos": ref.tol.grad_cos}
            if ref.step is not None and ref.step.variant == variant and name == variant.name:
                steps[name] = ref.step
                checks[name] = {
                    **(ref.step_errors or {}),
                    **tolerance,
                    "checked_against": "itself" if ref.step_errors is None else f"{ref.name} (sets tol_*)",
                }
                continue
            step = build()
            errs = check_against(step, ref, x_check, eps_check)
            checks[name] = {**errs, **tolerance, "checked_against": ref.name}
            steps[name] = step
            log(f"  {name}: matches {ref.name} ({time.perf_counter() - t0:.0f} s)")
        except Exception as e:  # noqa: BLE001 -- one variant's failure is a row, not the end of the run
            fields = {**setting.fields(), **variant.fields(device)}
            rows.append(error_row(SUBJECT, name, _error_text(e), env, **fields))
            log(f"  {name}: {rows[-1]['error']}")
            if step is not None:
                step.close()
            step = None  # a refused step's memory goes before the next is built
        if step is None:
            _free(device)
    refs.clear()

    errors: dict[str, BaseException] = {}
    with LoadSampler() as sampler:
        timings = measure_interleaved(
            {n: s for n, s in steps.items()}, device=device, warmup=warmup, repeats=repeats, errors=errors
        )
    load = sampler.summary()
    peaks = {n: _peak_mb(s, device) for n, s in steps.items() if n in timings}
    peak = peak if peak is not None else peak_rate(device, setting.precision)
    baselines = {
        like(s.variant): n for n, s in steps.items() if n in timings and s.variant.model == "diffusers"
    }
    for name, step in steps.items():
        v = step.variant
        fields = {**setting.fields(), **v.fields(device)}
        if name not in timings:
            rows.append(
                error_row(SUBJECT, name, _error_text(errors.get(name, RuntimeError("?"))), env, **fields)
            )
            continue
        t: Timing = timings[name]
        model_flops = flops.get(v.disc)
        vs = {}
        for kind, compiled in (("eager", False), ("compiled", True)):
            ref_name = baselines.get(like(replace(v, compile=compiled)))
            if ref_name is None:
                continue
            got = paired_ratio(timings[ref_name], t)
            vs |= {f"x_diffusers_{kind}": got["ratio"], f"x_diffusers_{kind}_lo": got["ratio_lo"],
                   f"x_diffusers_{kind}_hi": got["ratio_hi"], f"x_diffusers_{kind}_ref": ref_name,
                   f"x_diffusers_{kind}_95ci": _interval_text(got)}  # fmt: skip
            vs["ratio_pairs"], vs["ratio_coverage"] = got["ratio_pairs"], got["ratio_coverage"]
        rows.append(
            result_row(
                SUBJECT,
                name,
                t,
                env,
                **fields,
                images_per_s=t.throughput(setting.batch),
                peak_mb=peaks.get(name),
                gflop_per_image=model_flops / setting.batch / 1e9 if model_flops else None,
                **mfu(model_flops, t.median_ms, peak),
                **vs,
                **checks[name],
                **peak,
            )
        )
    stamp_load(rows, load, allow_busy)
    for step in steps.values():
        step.close()
    del steps
    fresh_accelerate_state()  # the next setting, or whatever runs next in this process, sets its own
    _free(device)
    return rows


def like(v: Variant) -> tuple[bool, bool, bool, bool]:
    """What a diffusers reference must share with a variant to be like for like (the kernels are ours)."""
    return (v.disc, v.compile, v.checkpointing, v.channels_last)


def _interval_text(got: dict[str, Any]) -> str | None:
    return f"{got['ratio_lo']:.2f}-{got['ratio_hi']:.2f}" if got["ratio_lo"] is not None else None


def _peak_mb(step: Step, device: torch.device) -> float | None:
    """This variant's peak: its state between steps plus one step's transient peak (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base + step.state_bytes()) / 2**20


# --------------------------------------------------------------------------------------------------------
# The sweeps


def toggles(base: Variant, on_gpu: bool) -> list[Variant]:
    """`base` and each toggle flipped from it one at a time (kernels only where there is a fused backend)."""
    out = [base, replace(base, channels_last=not base.channels_last)]
    if on_gpu:
        out.append(replace(base, kernels="torch" if base.kernels == "auto" else "auto"))
    out += [replace(base, checkpointing=True), replace(base, disc=True)]
    return out


def sweep(
    quick: bool, device: torch.device, compile: bool | None = None
) -> list[tuple[Setting, list[Variant], dict]]:
    """(setting, variants, timing options) of the mode: GPU sizes on CUDA, small ones on a CPU.

    On a GPU the toggles flip one at a time from the eager fast configuration (fused kernels and
    channels_last); compile is added to it with each kernel backend (Triton and torch), and diffusers runs
    eager and compiled with the same loss. Every toggle that diffusers has too (checkpointing,
    channels_last, the discriminator, compile) has its diffusers row, so each speedup is like for like. The
    other settings compare the fast eager step with diffusers eager. Compile defaults off on a CPU (an
    inductor compile of sd-f8 takes minutes on 2 cores), where the torch backend is the only one.
    """

    def references(base: Variant) -> list[Variant]:
        d = replace(base, model="diffusers", kernels="auto")
        out = [d, replace(d, disc=True), replace(d, checkpointing=True)]
        return out + [replace(d, channels_last=not d.channels_last)]

    def compiled(base: Variant, on_gpu: bool) -> list[Variant]:
        out = [replace(base, compile=True)] + (
            [replace(base, compile=True, kernels="torch")] if on_gpu else []
        )
        return out + [replace(base, model="diffusers", kernels="auto", compile=True)]

    if device.type == "cuda":
        compile = True if compile is None else compile
        fast = Variant(channels_last=True)
        main = toggles(fast, on_gpu=True) + references(fast)
        if compile:
            main += compiled(fast, on_gpu=True)
        pair = [fast, Variant(model="diffusers", channels_last=True)]
        runs = {"repeats": REPEATS["cuda"], "warmup": 2}
        # batch 16 at 256 px (43 TFLOP a step) fills an H100 and leaves room for the fp32 reference pass
        if quick:
            return [(Setting("sd-f8", 256, 8, "bf16"), main, runs)]
        return [
            (Setting("sd-f8", 256, 16, "bf16"), main, runs),
            (Setting("sd-f8", 256, 16, "fp32"), pair, runs),
            (Setting("f8c16", 256, 16, "bf16"), pair, runs),
            (
                Setting("sd-f8", 512, 4, "bf16"),
                pair
                + [
                    replace(fast, checkpointing=True),
                    Variant("diffusers", channels_last=True, checkpointing=True),
                ],
                runs,
            ),
        ]
    base = Variant()
    main = toggles(base, on_gpu=False) + references(base)
    if compile:
        main += compiled(base, on_gpu=False)
    runs = {"repeats": REPEATS["cpu"], "warmup": 1}
    if quick:
        return [(Setting("sd-f8", 64, 2, "fp32"), main, runs)]
    return [
        (Setting("sd-f8", 128, 2, "fp32"), main, runs),
        (Setting("f8c16", 128, 2, "fp32"), [base, Variant(model="diffusers")], runs),
    ]


def run(
    quick: bool = True, device: str | None = None, compile: bool | None = None, allow_busy: bool = False
) -> list[dict[str, Any]]:
    """The sweep of the mode on the first GPU, or on this CPU; returns result rows (errors as rows)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for setting, variants, opts in sweep(quick, dev, compile):
        print(
            f"train_step: {setting.preset} {setting.resolution}px batch {setting.batch} {setting.precision}"
        )
        peak = peak_rate(dev, setting.precision)
        rows += benchmark(setting, variants, dev, peak=peak, allow_busy=allow_busy, **opts)
    return rows


COLUMNS = [
    "preset", "resolution", "batch", "dtype", "variant", "loss", "median_ms", "p20_ms", "p80_ms",
    "images_per_s", "peak_mb", "mfu_pct", "mfu_note", "x_diffusers_eager", "x_diffusers_eager_95ci",
    "x_diffusers_compiled", "x_diffusers_compiled_95ci", "load_1m", "others_cores", "busy", "error",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small sweep (a few minutes on a 2-core CPU)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add torch.compile variants (default: on with CUDA, off on a CPU)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--preset", default=None, help="one setting instead of the sweep: preset name")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    p.add_argument(
        "--repeats", type=int, default=None, help="timed steps per variant (default 10 on a CPU, 20 on a GPU)"
    )
    p.add_argument(
        "--allow-busy",
        action="store_true",
        help="run and keep the figures when other processes load the machine (rows flagged busy)",
    )
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    try:
        check_idle(args.allow_busy)
    except BusyMachine as e:
        print(f"train_step: {e}", file=sys.stderr)
        return 3
    if args.device == "cpu":  # the trainer takes its device from accelerate: on a CPU when it is told so
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if args.preset:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        setting = Setting(args.preset, args.resolution, args.batch, args.precision)
        variants = [v for s, vs, _ in sweep(True, dev, args.compile) for v in vs]
        repeats = args.repeats or REPEATS.get(dev.type, REPEATS["cpu"])
        rows = benchmark(setting, variants, dev, repeats=repeats, allow_busy=args.allow_busy)
    else:
        rows = run(quick=args.quick, device=args.device, compile=args.compile, allow_busy=args.allow_busy)
    name = f"train_step-{device_slug(rows[0]['device'])}" if rows else "train_step"
    path = write_results(rows, name, COLUMNS, args.out)
    print(path.with_suffix(".md").read_text())
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
