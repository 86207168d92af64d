"""The steps benchmarks/train_step.py times, and their correctness check.

A Setting (preset, size, batch, precision) and a Variant (kernels, channels_last, compile, checkpointing,
the discriminator) make a Step: TrainStep is the trainer's own step (a Trainer from the run config, timed
through Trainer.train_step); DiffusersStep is diffusers' AutoencoderKL in a loop of its own with the same
loss, optimizer, clipping and sync. Before a variant is timed, its forward and backward on a fixed batch and
noise are checked against a reference step (distance, enforce, calibrated tolerances).
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from benchmarks.harness import CorrectnessError
from vae_scale.config import Config, load_config
from vae_scale.formats.weights import plain_name
from vae_scale.models.sd import VAE
from vae_scale.train.build import adamw_fused
from vae_scale.train.objective import LastLayer, VAELoss
from vae_scale.train.trainer import Trainer
from vae_scale.train.wrapping import to_channels_last

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # as train.mixed_precision says them
DISC_WEIGHT = 0.5  # LDM's disc_weight; the discriminator is on from step 0 (loss.disc_start=0)


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
    """What every variant of one comparison shares: model, image size, batch per device, precision, and
    frames per clip (1: images; > 1: clips (B, 3, T, R, R) of a video family, data.frames)."""

    preset: str
    resolution: int
    batch: int
    precision: str = "fp32"  # fp32 | bf16 | fp16: train.mixed_precision no | bf16 | fp16
    overrides: tuple[str, ...] = ()  # model.* overrides on the preset (tests use a tiny model)
    frames: int = 1

    def fields(self) -> dict[str, Any]:
        out = {
            "preset": self.preset + (f" ({', '.join(self.overrides)})" if self.overrides else ""),
            "resolution": self.resolution,
            "batch": self.batch,
            "dtype": self.precision,
        }
        return out | ({"frames": self.frames} if self.frames > 1 else {})

    def inputs(self, n: int, device: torch.device) -> list[torch.Tensor]:
        """n random batches in [-1, 1]: images (B, 3, R, R), or clips (B, 3, T, R, R)."""
        r, b = self.resolution, self.batch
        clip = (self.frames,) if self.frames > 1 else ()
        return [torch.rand(b, 3, *clip, r, r, device=device) * 2 - 1 for _ in range(n)]


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
    cfg.data = replace(
        cfg.data, resolution=setting.resolution, batch_size=setting.batch, frames=setting.frames
    )
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
            yield {"clips" if x.ndim == 5 else "images": x, "keys": []}

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
    shared initial weights (`init`, through model.init_from and the discriminator's state dict; None: the
    trainer's own seeded initialisation), timing Trainer.train_step -- the method a run calls -- on `inputs`
    rotated between steps."""

    def __init__(
        self,
        setting: Setting,
        variant: Variant,
        init: dict[str, dict[str, torch.Tensor]] | None,
        inputs: list[torch.Tensor],
        device: torch.device,
    ):
        from safetensors.torch import save_file

        super().__init__(setting, variant, device)
        self._dir = tempfile.TemporaryDirectory(prefix="train_step-")
        run_dir = Path(self._dir.name)
        cfg = config_for(setting, variant)
        if init is not None:
            save_file({k: v.contiguous() for k, v in init["vae"].items()}, run_dir / "init.safetensors")
            cfg.model = replace(cfg.model, init_from=str(run_dir / "init.safetensors"))
        cfg.run = replace(cfg.run, dir=str(run_dir / "run"))
        # The trainer's start-up lines and progress bar, once per variant, are not the benchmark's output.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.trainer = Trainer(cfg, loader=Batches(inputs))
        if self.trainer.device.type != device.type:
            self.trainer.close()
            raise RuntimeError(f"the trainer runs on {self.trainer.device.type}, not {device.type}")
        if self.trainer.disc is not None and init is not None:
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
