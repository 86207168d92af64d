"""The convolutional VAE: blocks, Encoder, Decoder, the diagonal-Gaussian posterior, VAE.

The architecture is the KL autoencoder of latent diffusion (Stable Diffusion, SDXL, FLUX), with module
names equal to diffusers' AutoencoderKL so weights move between the two by name. The model is written for
one device: activation checkpointing, channels_last and compile are applied from outside, in one ordered
place (vae_scale/transforms.py), and FSDP sharding after them (vae_scale/fsdp.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale import kernels, weights
from vae_scale.config import ModelConfig, load_config
from vae_scale.tiled import TiledRun, decode_image, encode_moments

# --------------------------------------------------------------------------------------------------------
# Blocks


class GroupNorm(nn.Module):
    """GroupNorm with an optional fused SiLU; state-dict names and init of nn.GroupNorm (weight, bias)."""

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-6, silu: bool = True):
        super().__init__()
        self.num_groups, self.eps, self.silu = num_groups, eps, silu
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.kernels = "auto"  # set for the whole model by VAE.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.group_norm_silu(
            x, self.num_groups, self.weight, self.bias, self.eps, self.silu, impl=self.kernels
        )

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}, silu={self.silu}"


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv -> norm -> SiLU -> conv, plus a (1x1-projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(out_ch, groups, eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all positions, with a GroupNorm in front and a residual."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = GroupNorm(ch, groups, eps, silu=False)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers' name: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # channels-last strides
        # The sum takes x's memory format: left channels-last, every later layer of an NCHW model would
        # run NHWC (on a CPU the decoder's convolution backward was ~25% slower; benchmarks/train_step.py).
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        return x + h.contiguous(memory_format=layout)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (right/bottom) padding, as in latent diffusion."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then (except at the last level) a downsample."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, eps: float, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then (except at the last level) an upsample."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, eps: float, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """ResNet -> (self-attention) -> ResNet at the lowest resolution."""

    def __init__(self, ch: int, groups: int, eps: float, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups, eps), ResnetBlock(ch, ch, groups, eps)])
        self.attentions = nn.ModuleList([Attention(ch, groups, eps)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


# --------------------------------------------------------------------------------------------------------
# Encoder and Decoder


class Encoder(nn.Module):
    """(B, in_channels, H, W) image -> (B, 2 * latent_channels, H/f, W/f) posterior moments."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chs, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block, g, eps, downsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.mid_block = MidBlock(chs[-1], g, eps, cfg.mid_block_attention)
        self.conv_norm_out = GroupNorm(chs[-1], g, eps)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) latent -> (B, out_channels, h*f, w*f) image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chs, g, eps = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g, eps, cfg.mid_block_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block + 1, g, eps, upsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.conv_norm_out = GroupNorm(chs[-1], g, eps)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


# --------------------------------------------------------------------------------------------------------
# The posterior


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)), diffusers' DiagonalGaussianDistribution math.

    logvar is clamped to [-30, 20] (zero gradient outside); KL is summed over every non-batch dim.
    """

    def __init__(self, moments: torch.Tensor, kernels_impl: str = "auto"):
        self.moments = moments  # (B, 2C, h, w), or (B, 2C, t, h, w) for a video latent
        self.mean, self._logvar = torch.chunk(moments, 2, dim=1)
        self.kernels = kernels_impl

    @property
    def logvar(self) -> torch.Tensor:
        return self._logvar.clamp(kernels.gaussian.LOGVAR_MIN, kernels.gaussian.LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """The posterior mean, the deterministic latent."""
        return self.mean

    def sample_kl(
        self,
        eps: torch.Tensor | None = None,
        prior_mean: torch.Tensor | None = None,
        prior_logvar: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised z (like mean) and KL per sample (B,) to N(0, I) or the given prior, in one op."""
        return kernels.gaussian_sample_kl(
            self.mean, self._logvar, eps, prior_mean, prior_logvar, impl=self.kernels
        )

    def sample(self, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample z = mean + std * eps."""
        return self.sample_kl(eps)[0]

    def kl_per_channel(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample and latent channel, summed over positions and frames: (B, C), float32.

        The eager math of the fused op's KL (logvar clamped as above), without drawing or computing z.
        """
        mean, logvar = self.mean.float(), self.logvar.float()
        kl = 0.5 * (mean.square() + torch.exp(logvar) - 1.0 - logvar)  # (B, C, h, w) or (B, C, t, h, w)
        return kl.sum(tuple(range(2, kl.ndim)))

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, shape (B,), float32."""
        return self.kl_per_channel().sum(1)


# --------------------------------------------------------------------------------------------------------
# Tiled encode and decode


@dataclass(frozen=True)
class Tiling:
    """Encode and decode tile by tile: whole-image GroupNorm statistics by default, or diffusers' tiles.

    tile: tile size in image pixels (0: the model's sample_size, diffusers' threshold). Inputs no larger
    than one tile are not tiled, so their result equals the untiled one exactly.

    norm="image" (default): the network runs layer by layer, each layer tile by tile; every GroupNorm
    normalises with the whole image's statistics, gathered over the tiles, convolutions read their halo
    from the neighbouring tiles and the mid-block attention sees the whole latent (vae_scale/tiled.py), so
    the result equals the untiled one to rounding. Tiles do not overlap (overlap is not used); the tile
    must be a whole number of latent positions. Between layers the whole image's activations wait in host
    memory when `offload` and the model is on an accelerator (the device holds one tile's window of a
    layer and the lowest-resolution activation for attention; host memory holds what an untiled pass
    would), else on the model's device.

    norm="tile": diffusers' AutoencoderKL after enable_tiling(): each tile runs the whole encoder or
    decoder alone. overlap: the fraction of a tile shared with the next one (diffusers: 0.25). Tiles start
    every tile * (1 - overlap) pixels (the same in latent positions for decode); each result tile is
    blended linearly into the one above and the one to its left over tile * overlap rows / columns, then
    cropped to the stride. Every memory is that of one tile; tiles differ from the whole image in their
    GroupNorm statistics and the mid-block attention's reach, so the result is close to, not equal to,
    the untiled one (a grid of per-tile colour offsets, softened by the blending).
    """

    tile: int = 0
    overlap: float = 0.25
    norm: str = "image"
    offload: bool = True

    def geometry(self, factor: int, sample_size: int) -> tuple[int, int, int]:
        """(tile, stride, blend extent) in image pixels for a model with this downsampling factor; the
        same divided by `factor` in latent positions (norm="image": no overlap, no blending). ValueError
        when they are not whole latent positions."""
        tile = self.tile or sample_size
        if self.norm not in ("image", "tile"):
            raise ValueError(f"tiling norm must be 'image' or 'tile', got {self.norm!r}")
        if self.norm == "image":
            if tile % factor or tile <= 0:
                raise ValueError(
                    f"tile {tile} px: tiles must cover a whole number of latent positions ({factor} px each)"
                )
            return tile, tile, 0
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tiling overlap must be in [0, 1), got {self.overlap}")
        latent = tile // factor
        stride, extent = int(latent * (1 - self.overlap)), int(latent * self.overlap)
        # diffusers computes the pixel and latent strides separately; they agree only on whole positions
        if (
            tile % factor
            or stride == 0
            or stride + extent != latent
            or int(tile * (1 - self.overlap)) != stride * factor
        ):
            raise ValueError(
                f"tile {tile} px with overlap {self.overlap}: tiles must cover a whole number of latent "
                f"positions ({factor} px each) and so must their overlap, e.g. a tile of "
                f"{factor * max(4, round(latent / 4) * 4)} px"
            )
        return tile, stride * factor, extent * factor


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Blend b's first `extent` rows (dim 2) or columns (dim 3) with a's last ones in place: b's weight goes
    0, 1/e, ..., (e-1)/e (diffusers' blend_v / blend_h, in one step)."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e == 0:
        return
    w = torch.arange(e, dtype=torch.float64, device=b.device) / e
    shape = (1, 1, e, 1) if dim == 2 else (1, 1, 1, e)
    keep, take = (1 - w).to(b.dtype).view(shape), w.to(b.dtype).view(shape)
    head = b.narrow(dim, 0, e)
    head.copy_(a.narrow(dim, a.shape[dim] - e, e) * keep + head * take)


def tiled_apply(fn, x: torch.Tensor, tile: int, stride: int, out_tile: int, out_extent: int) -> torch.Tensor:
    """fn over overlapping tiles of x (B, C, H, W), blended and stitched (diffusers' tiled_encode/decode).

    tile, stride: in x's positions; out_tile, out_extent: a full tile's output size and blend extent in
    the output's positions. Holds two rows of output tiles at a time besides the result.
    """
    H, W = x.shape[2:]
    limit = out_tile - out_extent
    rows, above = [], []
    for i in range(0, H, stride):
        row = []
        for j in range(0, W, stride):
            t = fn(x[:, :, i : i + tile, j : j + tile])
            if above:
                _blend(above[len(row)], t, out_extent, dim=2)
            if row:
                _blend(row[-1], t, out_extent, dim=3)
            row.append(t)
        rows.append(torch.cat([t[:, :, :limit, :limit] for t in row], dim=3))
        above = row
    return torch.cat(rows, dim=2)


# --------------------------------------------------------------------------------------------------------
# The autoencoder


class VAE(nn.Module):
    """The KL autoencoder: encode to a DiagonalGaussian, decode a latent back to an image in [-1, 1]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(c, c, 1) if config.quant_convs else None
        self.post_quant_conv = nn.Conv2d(c // 2, c // 2, 1) if config.quant_convs else None
        if config.zero_init_residual:
            self._zero_residual_branches()
        self.set_kernels(config.kernels)

    def _zero_residual_branches(self) -> None:
        """Zero the last layer of every residual branch: each block starts as its skip path, and the gradient
        still reaches that layer (it sees the branch's nonzero input), so the branch grows as it learns."""
        for m in self.modules():
            if isinstance(m, (ResnetBlock, Attention)):
                last = m.conv2 if isinstance(m, ResnetBlock) else m.to_out[0]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, overrides: list[str] | None = None) -> VAE:
        """Random-init VAE of a preset (or a YAML path) with `model.key=value` overrides."""
        return cls(load_config(name, overrides).model)

    @classmethod
    def from_diffusers(cls, path: str | Path, **config_overrides) -> VAE:
        """Load a folder written by diffusers' AutoencoderKL.save_pretrained (config.json + safetensors), or
        a pipeline folder's vae/; config_overrides set ModelConfig fields that do not change the weights."""
        cfg, sd = weights.read_diffusers(path)
        vae = cls(dataclasses.replace(cfg, **config_overrides))
        weights.load_weights(
            vae, sd, f"{path}:", weights.DiffusersFormatError, "weights do not match config.json"
        )
        return vae

    @classmethod
    def from_checkpoint(cls, path: str | Path, ema: bool = False, **config_overrides) -> VAE:
        """Load the weights of a checkpoint, or of a run folder's newest complete checkpoint.

        ema=True takes the EMA weights (an error if the run kept none). config_overrides set ModelConfig
        fields that do not change the weights (kernels, channels_last, ...).
        """
        import yaml

        from vae_scale.checkpoint import read_checkpoint_file, resolve_checkpoint
        from vae_scale.config import config_from_dict

        ckpt = resolve_checkpoint(path)
        weights = ckpt / ("ema.safetensors" if ema else "vae.safetensors")
        if not weights.is_file():
            raise FileNotFoundError(
                f"{ckpt}: no {weights.name}" + (" (optim.ema_decay was 0)" if ema else "")
            )
        # Both files checked against the checkpoint's manifest: DamagedCheckpoint names a damaged one.
        cfg = config_from_dict(yaml.safe_load(read_checkpoint_file(ckpt, "config.yaml"))).model
        state = read_checkpoint_file(ckpt, weights.name)
        vae = cls(dataclasses.replace(cfg, **config_overrides))
        vae.load_state_dict(state)
        return vae

    def save_diffusers(self, path: str | Path, config: dict | None = None) -> None:
        """Write a folder that diffusers' AutoencoderKL.from_pretrained loads unchanged.

        config: the config.json to write (default: this model's, in diffusers' keys), e.g. the one a
        fine-tune was imported from, kept key for key.
        """
        config = weights.config_to_diffusers(self.config) if config is None else config
        weights.write_diffusers(self.state_dict(), config, path)

    def set_kernels(self, impl: str) -> None:
        """Choose the fused-op backend for every GroupNorm and the posterior: auto | triton | torch."""
        if impl not in kernels.IMPLS:
            raise ValueError(f"kernels must be one of {kernels.IMPLS}, got {impl!r}")
        self.kernels = impl
        for m in self.modules():
            if isinstance(m, GroupNorm):
                m.kernels = impl

    # -- shapes --------------------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of the given size."""
        width = height if width is None else width
        f = self.downsample_factor
        return (self.config.latent_channels, height // f, width // f)

    def _check_image(self, x: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.downsample_factor
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"expected an image batch of shape (B, {c}, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"expected a latent batch of shape (B, {c}, h, w), got {tuple(z.shape)}")

    # -- forward -------------------------------------------------------------------------------------------

    def tiling(self, tiled: bool | Tiling) -> Tiling | None:
        """The Tiling that `tiled` asks for: None for False, the default (sample_size, 0.25) for True."""
        if tiled is False or tiled is None:
            return None
        return Tiling() if tiled is True else tiled

    def encode(self, x: torch.Tensor, tiled: bool | Tiling = False) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] -> posterior over (B, latent_channels, H/f, W/f).

        tiled: True or a Tiling encodes an image larger than the tile tile by tile (see Tiling).
        """
        self._check_image(x)
        tiling = self.tiling(tiled)
        if tiling is not None:
            f = self.downsample_factor
            tile, stride, extent = tiling.geometry(f, self.config.sample_size)
            if max(x.shape[2:]) > tile and tiling.norm == "image":
                moments = encode_moments(self, x, self._tiled_run(tiling, tile))
                return DiagonalGaussian(moments.to(x.device), self.kernels)
            if max(x.shape[2:]) > tile:
                moments = tiled_apply(self._moments, x, tile, stride, tile // f, extent // f)
                return DiagonalGaussian(moments, self.kernels)
        return DiagonalGaussian(self._moments(x), self.kernels)

    def decode(self, z: torch.Tensor, tiled: bool | Tiling = False) -> torch.Tensor:
        """z: (B, latent_channels, h, w) -> image (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped).

        tiled: True or a Tiling decodes a latent larger than the tile tile by tile (see Tiling).
        """
        self._check_latent(z)
        tiling = self.tiling(tiled)
        if tiling is not None:
            f = self.downsample_factor
            tile, stride, extent = tiling.geometry(f, self.config.sample_size)
            if max(z.shape[2:]) > tile // f and tiling.norm == "image":
                return decode_image(self, z, self._tiled_run(tiling, tile), f).to(z.device)
            if max(z.shape[2:]) > tile // f:
                return tiled_apply(self._image, z, tile // f, stride // f, tile, extent)
        return self._image(z)

    def _tiled_run(self, tiling: Tiling, tile: int) -> TiledRun:
        device = self.decoder.conv_out.weight.device
        return TiledRun(tile, device, torch.device("cpu") if tiling.offload else device)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)  # (B, 2C, h, w)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled latent (or the posterior mean); returns (x_hat, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior


def count_parameters(config: ModelConfig) -> int:
    """Parameters of a VAE with this config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in VAE(config).parameters())
