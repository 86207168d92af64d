"""The pieces a training run is made of, each built from the config by one function:

    acc = build_accelerator(cfg, run_dir)        # process group, device, autocast, loss scaler, W&B
    cfg = resolved_config(cfg, acc)              # a copy with what the launch decided ("auto" precision)
    vae = build_vae(cfg, sharded)                # the model, model.init_from, what trains, its transforms
    align = build_projection(cfg, criterion)     # the VF loss's latent projection, or None
    ae, line = parallelize(model, cfg.train, plan, acc)  # FSDP2 shards or DDP, and the line saying which
    opt = build_optimizer(model, cfg.optim, device)
    disc_ddp, disc_opt = build_discriminator(criterion.discriminator, cfg, acc)
    ema = build_ema(vae, cfg.optim)
    loader = build_loader(cfg.data, cfg.train.seed, rank, world)

vae_scale/train/trainer.py's Trainer puts them together in this order (the order fixes what the seeded random
numbers initialise, so a run is repeatable) and runs the steps.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator

from vae_scale.config import Config, DataConfig, OptimConfig, TrainConfig
from vae_scale.data.clip_loader import build_clip_loader
from vae_scale.data.loader import build_train_loader
from vae_scale.data.source import BatchSource
from vae_scale.data.synthetic import SYNTHETIC, SyntheticLoader
from vae_scale.eval.drift import DriftReference
from vae_scale.eval.equivariance import Transform, TransformedDecode
from vae_scale.formats.weights import load_init_weights, load_weights, plain_name
from vae_scale.models.interface import Autoencoder as VAE
from vae_scale.models.interface import build_model, model_class
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.train.alignment import Aligned, LatentProjection
from vae_scale.train.ema import EMA
from vae_scale.train.fsdp import FSDPPlan, describe, fsdp_units, shard
from vae_scale.train.run_state import phase_start, read_phase_weights
from vae_scale.train.trainable import freeze
from vae_scale.train.wrapping import channels_last_choice, compile_per_unit, prepare_model


class Autoencoder(nn.Module):
    """What DDP/FSDP wraps: the VAE plus the loss's learned likelihood scale (a module shared with VAELoss)
    and the VF loss's latent projection (loss.align_weight > 0), both trained with the VAE.

    forward is one training forward; encode/decode run the VAE outside it (image logging, evaluation),
    which FSDP is told about so that it gathers the root's parameters for them too.
    """

    def __init__(
        self,
        vae: VAE,
        likelihood: nn.Module | None,
        sample_posterior: bool = True,
        align: LatentProjection | None = None,
    ):
        super().__init__()
        self.vae = vae
        self.likelihood = likelihood
        self.sample_posterior = sample_posterior
        self.align = align
        if align is not None:
            align.attach(vae)

    @property
    def config(self):
        """The VAE's ModelConfig."""
        return self.vae.config

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of that size."""
        return self.vae.latent_shape(height, width)

    def forward(
        self,
        x: torch.Tensor,
        transforms: dict[str, Transform] | None = None,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor, list[TransformedDecode], Aligned | None]:
        """(x_hat, posterior, KL per image, decodes of the transformed latents, the projected latent for
        the VF loss or None).

        transforms: this micro-batch's {term: Transform} (equivariance.draw_transforms), decoded from the
        same latent as x_hat. They run here, inside the one forward, because under FSDP every unit's forward
        is a collective that all ranks must enter together. eps: the posterior's noise, (B, C, h, w), to
        decode a given sample (a check against another implementation); None draws it.
        """
        posterior = self.vae.encode(x)
        if self.sample_posterior:
            z, kl = posterior.sample_kl(eps)
        else:
            z, kl = posterior.mode(), posterior.kl()
        aligned = None
        if self.align is not None:  # z passes through the adaptive weight's junction (alignment.py)
            z, aligned = self.align(z, posterior, x[0].numel())
        f = self.vae.downsample_factor
        # Before the main decode: LastLayer keeps the decoder's latest input, and the adversarial weight
        # must read the main reconstruction's.
        extra = [
            TransformedDecode(term, t, self.vae.decode(t.apply(z)), f)
            for term, t in (transforms or {}).items()
        ]
        return self.vae.decode(z), posterior, kl, extra, aligned

    def encode(self, x: torch.Tensor, tiled=False) -> DiagonalGaussian:
        """The posterior of x, (B, 3, H, W) in [-1, 1] (tiled: as the model's encode takes it)."""
        return self.vae.encode(x, tiled=tiled)

    def decode(self, z: torch.Tensor, tiled=False) -> torch.Tensor:
        """Images from latents (tiled: as the model's decode takes it)."""
        return self.vae.decode(z, tiled=tiled)


def build_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    """Accelerate's process group, device, autocast, loss scaler and W&B tracker for this launch."""
    from accelerate.utils import DistributedDataParallelKwargs

    # DDP must look for parameters a step leaves unused only in a family that has some (Wan's temporal
    # layers sit out a one-frame clip); the search costs a pass over the graph every step.
    every = model_class(cfg.model.family).uses_every_parameter
    return Accelerator(
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not every)],
        # cpu=True where there is no GPU makes a torchrun/accelerate-launched CPU job use gloo (MULTI_CPU).
        cpu=not torch.cuda.is_available(),
        mixed_precision=None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision,
        log_with=None if cfg.log.wandb == "disabled" else "wandb",
        project_dir=str(run_dir),
    )


def resolved_config(cfg: Config, acc: Accelerator) -> Config:
    """A copy of cfg with what the launch decided (what config.yaml and the checkpoints record):
    train.mixed_precision=auto becomes the precision the accelerator really uses, model.channels_last=auto
    the memory format chosen for its device (wrapping.channels_last_choice). cfg itself is left as given."""
    train = dataclasses.replace(cfg.train, mixed_precision=str(acc.mixed_precision))
    model = dataclasses.replace(cfg.model, channels_last=channels_last_choice(cfg.model, acc.device.type)[0])
    return dataclasses.replace(cfg, train=train, model=model)


def initial_vae(cfg: Config) -> VAE:
    """The VAE's weights at step 0, every parameter trainable: the seeded initialisation (train.seed), then
    model.init_from's weights when fine-tuning or starting a new phase from a run's checkpoint."""
    torch.manual_seed(cfg.train.seed)
    vae = build_model(cfg.model)
    if cfg.model.init_from:
        phase = phase_start(cfg.model.init_from)
        if phase is None:  # a diffusers folder or a .safetensors file
            load_init_weights(vae, cfg.model.init_from)
        else:  # a run or a checkpoint: a new phase of training from its weights
            sd = read_phase_weights(phase[0], "vae")
            load_weights(vae, sd or {}, f"model.init_from={cfg.model.init_from!r} ({phase[0]})")
    return vae


def build_vae(cfg: Config, sharded: bool) -> VAE:
    """The VAE with identical initial weights on every rank (initial_vae; a checkpoint to resume from
    overrides them later), train.trainable's requires_grad (train/trainable.py), then checkpointing,
    channels_last and train.compile (transforms.prepare_model)."""
    vae = initial_vae(cfg)
    freeze(vae, cfg.train)
    return prepare_model(vae, sharded=sharded, compile=cfg.train.compile, backend=cfg.train.compile_backend)


def build_projection(cfg: Config, criterion: nn.Module) -> LatentProjection | None:
    """The VF loss's learned latent projection (loss.align_weight > 0; the criterion holds the ViT whose
    width it maps to), or None. Drawn from the global seed, so call it where every rank draws alike."""
    if criterion.alignment is None:
        return None
    return LatentProjection(cfg.model.latent_channels, criterion.alignment.feature_dim, cfg.loss)


def build_drift_reference(cfg: Config) -> DriftReference | None:
    """latent_drift's reference in periodic evaluation: the run's step-0 weights (initial_vae), rebuilt from
    the config rather than copied from the model, so that a resumed run has the same one; on the CPU (eval
    moves it to the device for the pass). None when evaluation does not measure latent_drift.

    Rebuilding the weights, not caching the step-0 latents: latents would need an evaluation pass before
    step 1 and a place in every checkpoint; the weights cost host memory only. The global RNG is left as
    it was, so the run's seeded draws are those of a run without it.
    """
    if not cfg.eval.every or "latent_drift" not in cfg.eval.metrics:
        return None
    with torch.random.fork_rng(devices=[]):
        vae = initial_vae(cfg)
    source = f"model.init_from={cfg.model.init_from}" if cfg.model.init_from else f"seed {cfg.train.seed}"
    return DriftReference(vae, f"the run's step-0 weights ({source})")


def ensure_process_group(acc: Accelerator) -> None:
    """FSDP needs a process group even for one process (sharding then keeps everything on it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if acc.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def data_parallel(module: nn.Module, acc: Accelerator, reduce_dtype: str) -> str:
    """The start-up line of a DDP (or single-process) run; under reduce_dtype=compute, installs DDP's
    bf16/fp16 gradient compression hook."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(module, DistributedDataParallel):
        return f"one process on {acc.device.type}: nothing to shard or all-reduce"
    backend = torch.distributed.get_backend()
    reduce = "fp32"
    if reduce_dtype == "compute" and acc.mixed_precision in ("bf16", "fp16"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if acc.mixed_precision == "bf16" and backend != "nccl":
            reduce = "fp32 (train.reduce_dtype=compute: bf16 compression needs NCCL)"
        else:
            bf16 = acc.mixed_precision == "bf16"
            module.register_comm_hook(
                None, default_hooks.bf16_compress_hook if bf16 else default_hooks.fp16_compress_hook
            )
            reduce = str(acc.mixed_precision)
    return (
        f"DDP over {acc.num_processes} processes ({backend}): full weights, gradients and optimizer state on "
        f"every process; gradients all-reduced in {reduce}"
    )


def parallelize(
    model: Autoencoder, t: TrainConfig, plan: FSDPPlan, acc: Accelerator
) -> tuple[nn.Module, str]:
    """The model as the steps run it -- FSDP2 shards (plan.enabled) or Accelerate's DDP / single-process
    model -- and the start-up line that says which. t: the resolved config's train section.

    Under FSDP, train.compile compiles each unit before it is sharded (wrapping.compile_per_unit); without
    FSDP build_vae has compiled the model's compile_units already.
    """
    if plan.enabled:
        ensure_process_group(acc)
        units = fsdp_units(model, plan.unit_classes)
        compiled = compile_per_unit(model.vae, [u for _, u in units], t.compile_backend) if t.compile else []
        ae = shard(
            model,
            plan,
            units,
            acc.device,
            t.mixed_precision,
            t.reduce_dtype,
            forward_methods=("encode", "decode"),
        )
        line = describe(plan, units, t.mixed_precision, t.reduce_dtype)
        if compiled:
            line += (
                f"; compiled per unit ({len(compiled)} units; the root's layers eager)"
                if units
                else "; compiled: the model's compile units (no FSDP unit inside them)"
            )
            if t.compile_backend != "inductor":
                line += f" by {t.compile_backend}"
        return ae, line
    ae = acc.prepare_model(model)
    return ae, data_parallel(ae, acc, t.reduce_dtype)


def replicate(module: nn.Module, acc: Accelerator) -> nn.Module:
    """A small module data-parallel across ranks (DDP, buffers from rank 0), or itself in one process."""
    if acc.num_processes == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [acc.device.index] if acc.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=True)


def adamw_fused(device: torch.device) -> dict[str, bool]:
    """fused=True where torch has a fused AdamW for the device (CUDA, CPU, XPU, MPS...; float32/16/64, bf16).

    One kernel per step instead of a loop over the parameters; its step counts stay on the device, where the
    for-loop AdamW reads each with `.item()`. The state dicts are the same, so a run resumes either way.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return {"fused": True} if device.type in _get_fused_kernels_supported_devices() else {}


def build_optimizer(model: nn.Module, o: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, fused where torch offers it (adamw_fused). Built after
    sharding, so that under FSDP it holds the shards (DTensors)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=o.lr,
        betas=tuple(o.betas),
        weight_decay=o.weight_decay,
        **adamw_fused(device),
    )


def build_discriminator(
    disc: nn.Module | None, cfg: Config, acc: Accelerator
) -> tuple[nn.Module | None, torch.optim.AdamW | None]:
    """(the discriminator as its steps run it, its AdamW), or (None, None) without one.

    Replicated (a few million parameters) and data-parallel on every strategy, sharded or not. Its AdamW has
    the VAE's betas and weight decay (optim.weight_decay, not torch's default 0.01: 0 is latent diffusion's
    Adam).
    """
    if disc is None:
        return None, None
    ddp = replicate(disc, acc)
    opt = torch.optim.AdamW(
        disc.parameters(),
        lr=cfg.loss.disc_lr or cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        **adamw_fused(acc.device),
    )
    return ddp, opt


def vae_names(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters with state-dict names (wrapper prefixes removed)."""
    return [(plain_name(n), p) for n, p in module.named_parameters() if p.requires_grad]


def build_ema(vae: VAE, optim: OptimConfig) -> EMA | None:
    """The EMA of the VAE's weights (optim.ema_decay > 0), or None."""
    return EMA(vae_names(vae), optim.ema_decay) if optim.ema_decay > 0 else None


def build_loader(data: DataConfig, seed: int, rank: int, world: int) -> BatchSource:
    """The training batches of this rank: the image loader, the clip loader when data.frames > 1 (batches
    of "clips"), or synthetic images (clips) for `data.train=synthetic`."""
    if data.train == SYNTHETIC:
        return SyntheticLoader(
            data.resolution,
            data.batch_size,
            rank,
            world,
            seed,
            data.batches_per_epoch or 1000,
            frames=data.frames,
            image_fraction=data.image_fraction,
        )
    if data.frames > 1:
        return build_clip_loader(data, rank=rank, world_size=world, seed=seed)
    return build_train_loader(data, rank=rank, world_size=world, seed=seed)


def learning_rate(o: OptimConfig, total_steps: int, step: int, scale: float = 1.0) -> float:
    """LR at `step` of `total_steps` (train.steps): linear warm-up to optim.lr, then constant or cosine down
    to min_lr_ratio * lr."""
    if o.warmup_steps and step < o.warmup_steps:
        return scale * o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return scale * o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    return scale * o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
