"""Configuration: one dataclass tree, YAML presets over its defaults, dotted overrides over those.

    cfg = load_config("sd-f8", ["model.latent_channels=16", "optim.lr=1e-4"])

Precedence is CLI > YAML > defaults. Unknown keys, wrong types and impossible values raise ConfigError with
a message that names the key (and the nearest valid key), before any process group starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vae_scale.config_values import (
    ConfigError,
    check_choice,
    check_positive,
    check_range,
    coerce,
    parse_override,
    preset_names,
    read_yaml,
)

# --------------------------------------------------------------------------------------------------------
# The tree


@dataclass
class RunConfig:
    name: str = "vae"
    """Run name: names the run folder and the W&B run."""
    dir: str = ""
    """Run folder; empty means runs/<run.name>."""

    def __post_init__(self):
        # The name becomes a folder under runs/: an empty one would make runs/ itself the run folder.
        if not self.name.strip() or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ConfigError(
                f"run.name={self.name!r} is not a plain folder name (not empty, '.' or '..', no '/'); a "
                "run folder elsewhere is run.dir's to give"
            )
        if not self.dir:
            self.dir = f"runs/{self.name}"


FAMILIES = ("sd", "flux2", "dcae", "wan")
"""model.family's choices; vae_scale/models/interface.py maps each to its model class (a test checks both)."""


@dataclass
class ModelConfig:
    WEIGHT_KEYS: typing.ClassVar[tuple[str, ...]] = (
        "family",
        "arch",
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "latent_channels",
        "norm_num_groups",
        "norm_eps",
        "mid_block_attention",
        "quant_convs",
    )
    """The fields that shape the weights or what they compute; the others (kernels, memory format, latent
    statistics, ...) may differ between a checkpoint and the model that loads it."""

    preset: str = ""
    """Preset this architecture comes from; overriding it swaps in that preset's whole model section."""
    family: str = "sd"
    """Model family: sd (latent diffusion's AutoencoderKL: SD, SDXL, FLUX.1) | flux2 (FLUX.2's
    AutoencoderKLFlux2) | dcae (DC-AE's AutoencoderDC) | wan (Wan 2.1's and Qwen-Image's causal 3D VAE).
    docs/families.md describes each."""
    arch: dict[str, Any] = field(default_factory=dict)
    """The family's own architecture keys, named as in its diffusers config.json (dcae: encoder_block_types,
    decoder_block_out_channels, ...; flux2: decoder_block_out_channels, batch_norm_eps, ...; wan: base_dim,
    dim_mult, ...), set one at a time as `model.arch.KEY=value`; the family checks them when it builds the
    model. Empty for sd."""
    in_channels: int = 3
    """Image channels in."""
    out_channels: int = 3
    """Image channels out."""
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    """Channels per resolution level; each level after the first halves the resolution."""
    layers_per_block: int = 2
    """ResNet blocks per encoder level (the decoder has one more per level, as in diffusers)."""
    latent_channels: int = 4
    """Channels of the latent z."""
    norm_num_groups: int = 32
    """GroupNorm groups everywhere."""
    norm_eps: float = 1e-6
    """GroupNorm epsilon."""
    mid_block_attention: bool = True
    """Self-attention in the encoder's and decoder's mid blocks."""
    quant_convs: bool = True
    """1x1 quant_conv / post_quant_conv around the latent (SD: true, FLUX: false)."""
    kernels: str = "auto"
    """Fused-op backend: auto | triton | torch."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    channels_last: bool | str = "auto"
    """Memory format of the convolutions: true (channels_last, NHWC) | false (NCHW) | auto: channels_last on
    CUDA, NCHW on a CPU (measured: docs/performance.md), NCHW for 3D convolutions (model.family=wan)."""
    scaling_factor: float = 0.18215
    """Latent scale a diffusion model applies (written to diffusers' config.json)."""
    shift_factor: float | None = None
    """Latent shift a diffusion model applies (FLUX style), or null."""
    latents_mean: list[float] | None = None
    """Per-channel latent mean for diffusers' config.json, or null."""
    latents_std: list[float] | None = None
    """Per-channel latent std for diffusers' config.json, or null."""
    sample_size: int = 256
    """Training resolution recorded in diffusers' config.json."""
    init_from: str = ""
    """Initial weights when there is no checkpoint to resume: a diffusers folder, a .safetensors file, or a
    run or checkpoint folder, whose weights (and EMA, loss scale, discriminator) start a new phase."""
    zero_init_residual: bool = False
    """Start every residual branch (each ResNet block's second convolution, each attention's output
    projection) at zero, so each block starts as its skip connection: a small model trains faster. Only the
    random init changes, not the weights' shapes or names."""

    def __post_init__(self):
        check_choice("model.kernels", self.kernels, ("auto", "triton", "torch"))
        if isinstance(self.channels_last, str) and self.channels_last != "auto":
            raise ConfigError(f"model.channels_last expects true, false or auto, got {self.channels_last!r}")
        elif self.channels_last is True and self.family == "wan":
            raise ConfigError(
                "model.channels_last=true: model.family=wan convolves in 3D (5D weights), which "
                "channels_last (a 4D format) cannot hold; set model.channels_last=false or auto"
            )
        check_choice("model.family", self.family, FAMILIES)
        if self.arch and self.family == "sd":
            raise ConfigError(
                f"model.arch is for the other families; model.family=sd takes none: {self.arch}"
            )
        if not self.block_out_channels:
            raise ConfigError("model.block_out_channels must list at least one level")
        for c in self.block_out_channels:
            check_positive("model.block_out_channels", c)
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"model.norm_num_groups={self.norm_num_groups} does not divide "
                    f"model.block_out_channels entry {c}"
                )
        for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            check_positive(f"model.{key}", getattr(self, key))
        for key in ("latents_mean", "latents_std"):
            v = getattr(self, key)
            if v is not None and len(v) != self.latent_channels:
                raise ConfigError(
                    f"model.{key} has {len(v)} entries, model.latent_channels is {self.latent_channels}"
                )
        check_range("model.norm_eps", self.norm_eps, low=0, low_open=True)
        check_range("model.scaling_factor", self.scaling_factor, low=0, low_open=True)
        check_positive("model.sample_size", self.sample_size)
        if self.shift_factor is not None:
            check_range("model.shift_factor", self.shift_factor)
        for v in self.latents_mean or []:
            check_range("model.latents_mean", v)
        for v in self.latents_std or []:
            check_range("model.latents_std", v, low=0, low_open=True)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent: one halving per level after the first (the encoder's
        levels: dcae's encoder_block_out_channels, wan's dim_mult; the others' block_out_channels)."""
        levels = {
            "dcae": self.arch.get("encoder_block_out_channels"),
            "wan": self.arch.get("dim_mult"),
        }.get(self.family) or self.block_out_channels
        return 2 ** (len(levels) - 1)


@dataclass
class DataConfig:
    train: str = ""
    """Training shards: a brace pattern, a folder, a comma-separated list (`\\,` is a comma in a path) or any
    URL webdataset opens."""
    val: str = ""
    """Validation shards (same forms as data.train); empty means no validation."""
    resolution: int = 256
    """Crop size in pixels (square)."""
    batch_size: int = 8
    """Images per process per step (the global batch is this x processes x accumulation)."""
    workers: int = 2
    """DataLoader worker processes per rank."""
    flip: bool = True
    """Random horizontal flip of training crops."""
    resize: bool = True
    """Resize the short side to data.resolution before cropping; false crops at the images' own scale."""
    upscale_small: bool = False
    """Upscale (bicubic) images whose short side is below data.resolution to it; false skips them (counted
    as data/too_small, apart from bad data)."""
    shuffle_buffer: int = 1000
    """Samples in each worker's shuffle buffer."""
    batches_per_epoch: int = 0
    """Batches every rank yields per epoch; 0 derives it from the shard index."""
    max_error_fraction: float = 0.1
    """Stop the run when more than this fraction of samples is bad."""
    log_bad_every: int = 1000
    """Log a summary of skipped bad samples every this many (the first one is logged in full)."""
    frames: int = 1
    """Frames per training clip, 1 + 4k (the causal video VAE's shape); > 1 trains on clips (video families
    only: wan), with the clip loader and the 3D discriminator; 1 means images."""
    frame_stride: int = 1
    """Clips take every this-many-th frame of the stored video (2 halves the frame rate)."""
    image_fraction: float = 0.0
    """With data.frames > 1: the fraction of batches that are images (one-frame clips, T = 1), drawn per
    batch from a seeded schedule the same on every rank (joint image and video training)."""

    def __post_init__(self):
        for key in ("resolution", "batch_size", "frame_stride"):
            check_positive(f"data.{key}", getattr(self, key))
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ConfigError(f"data.frames must be 1 + 4k (1, 5, 9, 13, ...), got {self.frames}")
        check_range("data.image_fraction", self.image_fraction, low=0, high=1)
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        check_range("data.max_error_fraction", self.max_error_fraction, low=0, high=1)
        for key in ("shuffle_buffer", "batches_per_epoch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        check_positive("data.log_bad_every", self.log_bad_every)


@dataclass
class LossConfig:
    SE_FACTORS: typing.ClassVar[tuple[int, ...]] = (2, 4)
    EQ_TRANSFORMS: typing.ClassVar[tuple[str, ...]] = ("scale", "rotate", "flip")

    recon: str = "l1"
    """Reconstruction term: l1 | l2 | gaussian (learned log-variance) | logistic (discretised, bits/dim)."""
    kl_weight: float = 1e-6
    """Weight of the KL term, relative to the reconstruction NLL summed per image (LDM's convention)."""
    kl_warmup_steps: int = 0
    """Steps over which the KL weight ramps linearly from 0."""
    free_bits: float = 0.0
    """Free nats per latent channel (its KL summed over h*w, batch-averaged) not penalised below; 0 is off."""
    logvar_init: float = 0.0
    """recon=gaussian: initial value of the learned scalar log-variance of a Gaussian on the squared error."""
    log_scale_init: float = -2.0
    """recon=logistic: initial value of the learned log-scale (data units, images in [-1, 1])."""
    logistic_per_channel: bool = True
    """recon=logistic: one learned log-scale per image channel (true) or a single scalar (false)."""
    perceptual_weight: float = 0.0
    """Weight of LPIPS-VGG; > 0 needs its weights on disk (loss.lpips_path, loss.vgg_path or the caches)."""
    lpips_path: str = ""
    """LPIPS weights (never downloaded): a folder with vgg.pth + vgg16-397923af.pth, or the vgg.pth file."""
    vgg_path: str = ""
    """torchvision's vgg16-397923af.pth; empty looks beside loss.lpips_path, then in the torch hub cache."""
    disc_weight: float = 0.0
    """Weight of the adversarial term; 0 turns the discriminator off."""
    disc_start: int = 0
    """Step at which the discriminator starts."""
    disc_loss: str = "hinge"
    """Discriminator loss: hinge | non_saturating (generator softplus(-D); LDM's `vanilla` has -mean D)."""
    disc_layers: int = 3
    """PatchGAN discriminator depth (the 2D one for images; the 3D one when data.frames > 1)."""
    disc_channels: int = 64
    """PatchGAN discriminator width of its first layer (taming's ndf)."""
    disc_lr: float = 0.0
    """Discriminator learning rate; 0 means optim.lr."""
    se_weight: float = 0.0
    """Scale equivariance: weight of decode(down(z)) against down(x), down = 2x/4x box average; 0 is off."""
    se_prob: float = 1.0
    """Scale equivariance: probability that a micro-batch gets the term."""
    se_factors: list[int] = field(default_factory=lambda: [2, 4])
    """Scale equivariance: downsampling factors (from 2, 4), one drawn per micro-batch."""
    eq_weight: float = 0.0
    """EQ-VAE: weight of decode(T(z)) against T(x), T a random scale, rotation or flip; 0 is off."""
    eq_prob: float = 0.5
    """EQ-VAE: probability that a micro-batch gets the term."""
    eq_transforms: list[str] = field(default_factory=lambda: ["scale", "rotate", "flip"])
    """EQ-VAE: transform families drawn from (scale | rotate | flip), one drawn per micro-batch."""
    eq_scale_min: float = 0.25
    """EQ-VAE: scale factors are drawn uniformly from [eq_scale_min, 1)."""
    align_weight: float = 0.0
    """VA-VAE alignment: weight of the VF loss (VA-VAE's vf_weight, relative to the NLL per image); 0: off."""
    align_encoder: str = ""
    """VA-VAE alignment: local file of the frozen DINOv2 ViT (timm's vit_*_patch14_dinov2 weights)."""
    align_adaptive: bool = True
    """VA-VAE alignment: scale the VF loss by ||grad rec|| / ||grad vf|| at the encoder's last layer."""
    align_cos_margin: float = 0.5
    """VA-VAE alignment: cosine similarity to the features within 1 - margin costs nothing."""
    align_distmat_margin: float = 0.25
    """VA-VAE alignment: distance-matrix (patch-pair cosine) differences within the margin cost nothing."""
    align_cos_weight: float = 1.0
    """VA-VAE alignment: weight of the marginal cosine term within the VF loss."""
    align_distmat_weight: float = 1.0
    """VA-VAE alignment: weight of the marginal distance-matrix term within the VF loss."""
    align_imagenet_norm: bool = False
    """VA-VAE alignment: feed the ViT ImageNet-normalised images (VA-VAE feeds them in [-1, 1])."""

    def __post_init__(self):
        check_choice("loss.recon", self.recon, ("l1", "l2", "gaussian", "logistic"))
        check_choice("loss.disc_loss", self.disc_loss, ("hinge", "non_saturating"))
        nonnegative = ("kl_weight", "kl_warmup_steps", "free_bits", "perceptual_weight", "disc_weight")
        for key in (*nonnegative, "disc_start", "disc_lr", "se_weight", "eq_weight"):
            check_range(f"loss.{key}", getattr(self, key), low=0)
        for key in ("logvar_init", "log_scale_init"):
            check_range(f"loss.{key}", getattr(self, key))
        for key in ("disc_layers", "disc_channels"):
            check_positive(f"loss.{key}", getattr(self, key))
        for key in ("se_prob", "eq_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"loss.{key} must be in [0, 1], got {getattr(self, key)}")
        if not self.se_factors or any(f not in self.SE_FACTORS for f in self.se_factors):
            raise ConfigError(f"loss.se_factors must list factors from {{2, 4}}, got {self.se_factors}")
        if not self.eq_transforms:
            raise ConfigError("loss.eq_transforms must list at least one of scale | rotate | flip")
        for t in self.eq_transforms:
            check_choice("loss.eq_transforms", t, self.EQ_TRANSFORMS)
        if not 0.0 < self.eq_scale_min < 1.0:
            raise ConfigError(f"loss.eq_scale_min must be in (0, 1), got {self.eq_scale_min}")
        for key in ("align_weight", "align_cos_weight", "align_distmat_weight"):
            check_range(f"loss.{key}", getattr(self, key), low=0)
        for key in ("align_cos_margin", "align_distmat_margin"):  # cosines and their differences: in [0, 2]
            check_range(f"loss.{key}", getattr(self, key), low=0, high=2)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (not rescaled with batch size or world size)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    schedule: str = "constant"
    """After warm-up: constant | cosine."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of optim.lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 is off."""
    ema_decay: float = 0.0
    """EMA decay of the weights; 0 is off."""

    def __post_init__(self):
        check_positive("optim.lr", self.lr)
        check_choice("optim.schedule", self.schedule, ("constant", "cosine"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        check_range("optim.ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        check_range("optim.weight_decay", self.weight_decay, low=0)
        check_range("optim.warmup_steps", self.warmup_steps, low=0)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_range("optim.grad_clip", self.grad_clip, low=0)


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in total."""
    seed: int = 0
    """Seeds weights, data order and sampling."""
    mixed_precision: str = "auto"
    """auto (the launcher's accelerate config or --mixed_precision, else no) | no | fp16 | bf16."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    compile: bool = False
    """torch.compile the model."""
    compile_backend: str = "inductor"
    """train.compile's torch.compile backend: inductor (fused generated kernels) | aot_eager (forward and
    backward traced as inductor sees them, run by eager kernels: tells a tracing problem from a code
    generation one) | any backend torch._dynamo.list_backends() names."""
    parallel: str = "auto"
    """auto (FSDP when the launch asks for it, e.g. launch/accelerate/fsdp.yaml, else DDP) | ddp | fsdp."""
    reduce_dtype: str = "fp32"
    """Under bf16/fp16, gradients are all-reduced (DDP) or reduce-scattered (FSDP) in fp32 | compute."""
    time_budget_s: float = 0.0
    """Stop (and checkpoint) after this many seconds of training; 0 is no limit."""
    max_consecutive_skips: int = 5
    """Non-finite steps in a row before rolling back to the newest healthy checkpoint."""
    rollback_lr_scale: float = 0.5
    """LR scale after a rollback (multiplies the current one); 0 stops the run instead."""
    max_rollbacks: int = 3
    """Rollbacks in a row (no new healthy checkpoint in between) before the run stops; 0 never rolls back."""
    sample_posterior: bool = True
    """Decode a reparameterised sample (a VAE); false decodes the posterior mean (KL still applies)."""
    trainable: list[str] = field(default_factory=list)
    """Glob patterns over the VAE's parameter names (decoder.*, encoder.down_blocks.3.*; a bare module name
    such as decoder means all of it) of the parameters that train; empty trains every parameter."""
    frozen: list[str] = field(default_factory=list)
    """Glob patterns of parameters kept frozen even where train.trainable matches them."""

    def __post_init__(self):
        check_positive("train.steps", self.steps)
        check_positive("train.grad_accum", self.grad_accum)
        check_choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "fp16", "bf16"))
        check_choice("train.parallel", self.parallel, ("auto", "ddp", "fsdp"))
        check_choice("train.reduce_dtype", self.reduce_dtype, ("fp32", "compute"))
        check_range("train.seed", self.seed, low=0)
        check_range("train.time_budget_s", self.time_budget_s, low=0)
        check_positive("train.max_consecutive_skips", self.max_consecutive_skips)
        check_range("train.rollback_lr_scale", self.rollback_lr_scale, low=0, high=1)
        check_range("train.max_rollbacks", self.max_rollbacks, low=0)
        for key in ("trainable", "frozen"):
            for pattern in getattr(self, key):
                if not str(pattern).strip():
                    raise ConfigError(f"train.{key}: an empty pattern; give parameter names or globs")


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save every N steps (and at the end, and on SIGTERM/SIGUSR1); 0 saves only then."""
    keep: int = 3
    """Newest complete checkpoints to keep."""
    resume: str = "auto"
    """auto (newest in the run folder) | never | a checkpoint path."""

    def __post_init__(self):
        check_positive("checkpoint.keep", self.keep)
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0, got {self.every}")


@dataclass
class LogConfig:
    wandb: str = "disabled"
    """online | offline | disabled."""
    project: str = "vae-scale"
    """W&B project."""
    entity: str = ""
    """W&B entity (team or user); empty is your default."""
    every: int = 50
    """Log scalars every N steps."""
    images_every: int = 500
    """Log image grids every N steps; 0 is off."""

    def __post_init__(self):
        check_choice("log.wandb", self.wandb, ("online", "offline", "disabled"))
        check_positive("log.every", self.every)
        check_range("log.images_every", self.images_every, low=0)


@dataclass
class EvalConfig:
    METRICS: typing.ClassVar[tuple[str, ...]] = (
        "psnr",
        "ssim",
        "bpd",
        "kl",
        "active_units",
        "lpips",
        "rfid",
        "spectrum",
        "equivariance",
        "tile_consistency",
        "latent_drift",
        "flicker",
        "fvd",
    )
    """The metric names eval.metrics takes: the registered ones (vae_scale/eval/registry.py); config.py sits
    below eval/, so tests/test_metric_registry.py checks that the two lists agree."""

    every: int = 0
    """Evaluate on data.val every N steps; 0 is off."""
    max_batches: int = 0
    """Validation batches per rank per evaluation; 0 is all."""
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim", "bpd", "kl", "active_units"])
    """Metrics: psnr ssim bpd kl active_units lpips rfid (weights on disk) spectrum equivariance
    tile_consistency latent_drift; for clips also flicker, and fvd (an I3D file on disk)."""
    inception_path: str = ""
    """rfid: TorchScript Inception feature extractor (NVIDIA's inception-2015-12-05.pt); never downloaded."""
    i3d_path: str = ""
    """fvd: TorchScript I3D feature extractor (StyleGAN-V's i3d_torchscript.pt); never downloaded."""
    rfid_cache: str = ""
    """rfid: folder of cached reference statistics, a file per protocol; "" is $XDG_CACHE_HOME/vae-scale/rfid,
    "off" never caches."""
    consistency_tile: int = 0
    """tile_consistency: tile size in px (0: half the image's shorter side, in whole groups of 4 latent
    positions)."""
    consistency_norm: str = "tile"
    """tile_consistency: the tiling measured: tile (each tile alone, diffusers' enable_tiling()) | image."""
    consistency_overlap: float = 0.25
    """tile_consistency with consistency_norm tile: the fraction of a tile its neighbour shares."""
    iw: int = 0
    """Importance samples per image for the bpd_iw bound (tighter than the ELBO, K decodes); 0 is off."""

    def __post_init__(self):
        for m in self.metrics:
            check_choice("eval.metrics", m, self.METRICS)
        for key in ("every", "max_batches", "iw", "consistency_tile"):
            if getattr(self, key) < 0:
                raise ConfigError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
        check_choice("eval.consistency_norm", self.consistency_norm, ("tile", "image"))
        check_range("eval.consistency_overlap", self.consistency_overlap, 0.0, 1.0, high_open=True)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """The run's name and folder."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The VAE's architecture, its fused-op backend and memory options, its latent statistics, its initial
    weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """The shards, the crops and the loader."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective: reconstruction, KL, LPIPS, the PatchGAN discriminator, scale equivariance and EQ-VAE."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW, the learning-rate schedule, gradient clipping, the EMA of the weights."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, seed, precision, accumulation, parallelism, time budget, what non-finite steps do."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When checkpoints are saved, how many are kept, what a run resumes from."""
    log: LogConfig = field(default_factory=LogConfig)
    """Weights & Biases and how often scalars and image grids are logged."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The evaluation on data.val during training, and the metrics of `vae-scale eval`."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as written to config.yaml."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------------
# Loading (the values themselves: config_values.py)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys() -> list[str]:
    keys = []
    for section, cls in _field_types(Config).items():
        keys += [f"{section}.{k}" for k in _field_types(cls)]
    return keys


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return ConfigError(f"unknown config key {key}{hint}")


def _set(tree: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    parts = key.split(".")
    sections = _field_types(Config)
    if len(parts) < 2 or parts[0] not in sections or parts[1] not in _field_types(sections[parts[0]]):
        raise _unknown(key)
    if len(parts) == 2:
        tree.setdefault(parts[0], {})[parts[1]] = value
        return
    # section.field.name=value: one entry of a mapping field (model.arch.attention_head_dim=32)
    if typing.get_origin(_field_types(sections[parts[0]])[parts[1]]) is not dict or len(parts) != 3:
        raise _unknown(key)
    entries = tree.setdefault(parts[0], {}).setdefault(parts[1], {})
    if not isinstance(entries, dict):
        raise ConfigError(f"{parts[0]}.{parts[1]} expects a mapping, got {entries!r}")
    entries[parts[2]] = value


def _build(tree: dict[str, Any]) -> Config:
    sections = _field_types(Config)
    built = {}
    for section, cls in sections.items():
        raw = tree.get(section) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config section {section} must be a mapping, got {raw!r}")
        types_ = _field_types(cls)
        kwargs = {k: coerce(f"{section}.{k}", v, types_[k]) for k, v in raw.items()}
        built[section] = cls(**kwargs)
    return Config(**built)


RETIRED_KEYS = {"train.debug_nonfinite_step": -1, "train.debug_nonfinite_rank": 0}
"""Keys that earlier versions wrote into every run's config.yaml and this one no longer has: a file that
holds one at its old default (where it changed nothing) still reads; any other value is an unknown key."""


def _flatten(data: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    sections = _field_types(Config)
    tree: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section not in sections:
            near = difflib.get_close_matches(str(section), list(sections), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"unknown config section {section} in {source}{hint}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section} in {source} must be a mapping")
        for k, v in values.items():
            key = f"{section}.{k}"
            if key not in RETIRED_KEYS or v != RETIRED_KEYS[key]:
                _set(tree, key, v)
    return tree


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build the resolved config from a preset name or YAML path and `section.key=value` overrides.

    Overriding `model.preset` swaps in that preset's whole model section before the other model overrides.
    """
    tree = _flatten(read_yaml(name_or_path), name_or_path) if name_or_path else {}
    parsed = [parse_override(o) for o in overrides or []]
    for key, value in parsed:
        if key == "model.preset":
            arch = _flatten(read_yaml(str(value)), str(value)).get("model", {})
            tree["model"] = {**arch, "preset": str(value)}
    for key, value in parsed:
        if key != "model.preset":
            _set(tree, key, value)
    if (
        "model" in tree
        and not tree["model"].get("preset")
        and name_or_path
        and not Path(name_or_path).is_file()
    ):
        tree["model"]["preset"] = name_or_path
    try:
        return _build(tree)
    except TypeError as e:  # a dataclass rejecting a keyword: should not happen after _set's checks
        raise ConfigError(str(e)) from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as saved in a run folder or checkpoint)."""
    return _build(_flatten(data, "saved config"))


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the shared `--config NAME|PATH` option and trailing `key.sub=value` overrides."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "-c", default=None, help=f"preset ({', '.join(preset_names())}) or YAML path")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides (CLI > YAML > defaults)"
    )
    return p
