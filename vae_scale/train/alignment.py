"""Vision-foundation alignment (VA-VAE, Yao et al. 2025, arXiv 2501.01423): the VF loss.

A frozen DINOv2 ViT's patch features of the image, f (B, D, h, w) on the latent's grid, and the latent
projected to D channels by a learned 1x1 convolution, p = proj(z), are aligned by two marginal terms:

    cos     = mean_{b,n} relu(1 - m_cos - cos(p[b, :, n], f[b, :, n]))
    distmat = mean_{b,n,m} relu(|cos(p[b,:,n], p[b,:,m]) - cos(f[b,:,n], f[b,:,m])| - m_dist)
    vf      = cos_weight * cos + distmat_weight * distmat

which is the reference's (hustvl/LightningDiT vavae, LPIPSWithDiscriminator with use_vf=dinov2 and
reverse_proj) term for term. With loss.align_adaptive the term's weight is the reference's adaptive one,

    w = align_weight * clamp(||d rec / dW|| / (||d vf / dW|| + 1e-4), 0, 1e8 / P),   W = encoder.conv_out

in this objective's units (a loss divided by P = C*H*W, see objective.py; the reference's NLL sums over the
image, so its ratio and its clamp are P times these). Without it, w = align_weight / P: align_weight means
the reference's vf_weight either way, relative to the NLL summed per image like kl_weight.

The gradient at W is taken without a second backward through the (possibly sharded) decoder: an autograd
junction at the sampled latent z (AdaptiveJunction) receives, in the one backward, what the decoder sends
to z and what the VF loss sends to p; it carries both through the posterior's reparameterisation, the quant
conv and the encoder's last convolution by hand (encoder_weight_grad), forms w, and passes w times the VF
gradient on. "rec" is therefore everything the decoder sends back to z (reconstruction, perceptual, and the
adversarial and equivariance terms when they are on), where the reference takes its NLL term alone.

    encoder = FoundationEncoder.from_file(cfg.align_encoder)
    proj = LatentProjection(latent_channels, encoder.dim)        # trained with the VAE (in Autoencoder)
    z, aligned = proj(z, posterior, pixels)                       # inside the model's forward
    term, logs = VFAlignment(cfg, encoder).loss(x, aligned, pixels)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_scale import kernels
from vae_scale.config import LossConfig
from vae_scale.eval.lpips import LossConfigError
from vae_scale.models.posterior import DiagonalGaussian

VF_RATIO_MAX = 1e8
"""The reference's cap on its adaptive VF ratio, in its units (the NLL summed per image)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 where it is already (the gradients and the loss are never rounded below
    float32, nor float64 checks rounded to it)."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------------------
# The frozen encoder: a DINOv2 ViT with timm's parameter names


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, D / heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def encoder_file_problem(path: str, key: str = "loss.align_encoder") -> str | None:
    """The line that says the encoder's weights are not on disk, or None when the file is there."""
    if not path:
        return f"loss.align_weight > 0 needs {key}: a local file of the DINOv2 ViT's weights"
    if not Path(path).expanduser().is_file():
        return f"{key}={path!r}: no such file (the DINOv2 ViT's weights, never downloaded)"
    return None


class FoundationEncoder(nn.Module):
    """timm's `vit_{small,base,large}_patch14_dinov2` (a class token, layer scale, GELU MLP, final norm),
    frozen, with timm's parameter names so that its state dict loads as it is; heads of 64 channels.

    features(x, grid) is the reference's `forward_features(resize(x))[:, 1:]`: patch tokens after the final
    norm, as (B, dim, h, w) on `grid`, the image resized so that its patches fall on that grid.
    """

    def __init__(self, dim: int, depth: int, hidden: int, patch: int = 14, pos_grid: int = 37):
        super().__init__()
        self.dim, self.patch, self.pos_grid = dim, patch, pos_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + pos_grid * pos_grid, dim) * 0.02)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(_Block(dim, dim // 64, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str, key: str = "loss.align_encoder") -> FoundationEncoder:
        """The encoder whose weights `path` holds (safetensors, or a torch file read without pickle).

        LossConfigError naming `key` when the file is missing, unreadable, or not such a ViT.
        """
        where = f"{key}={path!r}"
        problem = encoder_file_problem(path, key)
        if problem:
            raise LossConfigError(problem)
        file = Path(path).expanduser()
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd = load_file(str(file))
            else:
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file: one line naming the key
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LossConfigError(f"{where}: cannot be read ({why})") from None
        need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight")
        missing = [k for k in need if not isinstance(sd, dict) or k not in sd]
        if missing:
            raise LossConfigError(
                f"{where}: not a DINOv2 ViT state dict (timm vit_*_patch14_dinov2): no {missing[0]}"
            )
        if any(k.startswith("reg_token") for k in sd) or "blocks.0.mlp.w12.weight" in sd:
            raise LossConfigError(f"{where}: register tokens and SwiGLU (giant) are not supported")
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # a half-precision file
        dim, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        if dim % 64:
            raise LossConfigError(f"{where}: width {dim} is not a multiple of DINOv2's 64-channel heads")
        with torch.device("meta"):  # no initialisation to overwrite, and no random numbers drawn
            net = cls(dim, depth, hidden, patch, grid)
        try:
            net.load_state_dict(sd, assign=True)
        except RuntimeError as e:
            first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            raise LossConfigError(f"{where}: not a DINOv2 ViT of width {dim}: {first}") from None
        net.requires_grad_(False)
        return net

    def train(self, mode: bool = True) -> FoundationEncoder:
        """Stays in eval mode whatever is asked: the encoder is frozen."""
        return super().train(False)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The position embedding for an h x w patch grid: timm's resample_abs_pos_embed (bicubic,
        antialiased, in float32) of the grid part; the class token's position as it is."""
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (h, w) == (self.pos_grid, self.pos_grid):
            return self.pos_embed
        g = _f32(grid).reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        g = g.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(grid.dtype)
        return torch.cat([cls_pos, g], dim=1)

    @torch.no_grad()
    def features(self, x: torch.Tensor, grid: tuple[int, int], imagenet_norm: bool = False) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> patch features (B, dim, h, w), grid = (h, w).

        The image is resized (bilinear) to h*14 x w*14 and fed in [-1, 1] as the reference feeds it, or,
        with imagenet_norm, in DINOv2's own ImageNet normalisation.
        """
        h, w = grid
        if imagenet_norm:
            mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            x = ((x + 1) / 2 - mean) / std
        x = F.interpolate(x, size=(h * self.patch, w * self.patch), mode="bilinear", align_corners=False)
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, dim)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1)
        t = t + self._pos_embed(h, w).to(t.dtype)
        for block in self.blocks:
            t = block(t)
        t = self.norm(t)[:, 1:]
        return t.transpose(1, 2).reshape(t.shape[0], self.dim, h, w)


# --------------------------------------------------------------------------------------------------------
# The loss


def vf_loss(
    p: torch.Tensor,
    f: torch.Tensor,
    cos_margin: float,
    distmat_margin: float,
    cos_weight: float = 1.0,
    distmat_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vf, cos, distmat) of the module docstring, 0-dim, in p's dtype; p, f: (B, D, h, w), f frozen.

    A pair inside its margin contributes zero and no gradient (the relu).
    """
    p_flat, f_flat = p.flatten(2), f.flatten(2)  # (B, D, N)
    p_unit, f_unit = F.normalize(p_flat, dim=1), F.normalize(f_flat, dim=1)
    p_sim = torch.einsum("bdi,bdj->bij", p_unit, p_unit)  # (B, N, N)
    f_sim = torch.einsum("bdi,bdj->bij", f_unit, f_unit)
    distmat = F.relu((p_sim - f_sim).abs() - distmat_margin).mean()
    cos = F.relu(1 - cos_margin - F.cosine_similarity(f_flat, p_flat, dim=1)).mean()
    return cos_weight * cos + distmat_weight * distmat, cos, distmat


def encoder_weight_grad(
    g_z: torch.Tensor,
    z: torch.Tensor,
    posterior: DiagonalGaussian,
    conv_out_input: torch.Tensor,
    conv_out: nn.Conv2d,
    quant_conv: nn.Conv2d | None,
) -> torch.Tensor:
    """d(loss)/d(encoder.conv_out.weight) in float32 from d(loss)/dz, through z = mean + std * eps
    (dz/dlogvar = (z - mean) / 2 where logvar is inside its clamp, 0 outside), the 1x1 quant conv and the
    convolution's recorded input. conv_out's weight only gives its shape (it may be an FSDP shard)."""
    mean, raw_logvar = _f32(posterior.mean.detach()), _f32(posterior._logvar.detach())
    inside = (raw_logvar >= kernels.gaussian.LOGVAR_MIN) & (raw_logvar <= kernels.gaussian.LOGVAR_MAX)
    g_z = _f32(g_z)
    g_moments = torch.cat([g_z, g_z * 0.5 * (_f32(z.detach()) - mean) * inside], dim=1)  # (B, 2C, h, w)
    if quant_conv is not None:
        w = quant_conv.weight
        w = _f32((w.full_tensor() if hasattr(w, "full_tensor") else w).detach()).to(g_moments.dtype)
        g_moments = torch.nn.grad.conv2d_input(g_moments.shape, w, g_moments)
    return torch.nn.grad.conv2d_weight(
        _f32(conv_out_input).to(g_moments.dtype),
        conv_out.weight.shape,
        g_moments,
        conv_out.stride,
        conv_out.padding,
        conv_out.dilation,
        conv_out.groups,
    )


@dataclass
class Aligned:
    """What the model's forward hands the loss: the projected latent p (B, D, h, w) and, with the adaptive
    weight, the 0-dim tensor the backward writes that weight into (for the logs; 0 until a backward)."""

    projected: torch.Tensor
    weight: torch.Tensor | None = None


class AdaptiveJunction(torch.autograd.Function):
    """(z, p) -> (z, p) unchanged; backward: z's gradient as it came, p's times the adaptive weight w
    (module docstring) formed from both gradients at the encoder's last layer."""

    @staticmethod
    def forward(ctx, z, p, chain, proj_weight, align_weight, ratio_max, record):
        ctx.chain, ctx.proj_weight, ctx.z_shape = chain, proj_weight, z.shape
        ctx.align_weight, ctx.ratio_max, ctx.record = align_weight, ratio_max, record
        return z.view_as(z), p.view_as(p)

    @staticmethod
    def backward(ctx, g_dec, g_p):
        if g_p is None:
            return g_dec, None, None, None, None, None, None
        # The VF loss's gradient at z, through the projection (a 1x1 convolution without bias).
        g_p32 = _f32(g_p)
        g_vf = torch.nn.grad.conv2d_input(ctx.z_shape, _f32(ctx.proj_weight).to(g_p32.dtype), g_p32)
        rec_w = ctx.chain(g_dec if g_dec is not None else torch.zeros_like(g_vf))
        vf_w = ctx.chain(g_vf)
        ratio = (rec_w.norm() / (vf_w.norm() + 1e-4)).clamp(0.0, ctx.ratio_max)
        weight = ratio * ctx.align_weight
        ctx.record.copy_(weight.detach())
        return g_dec, (g_p * weight).to(g_p.dtype), None, None, None, None, None


class LatentProjection(nn.Module):
    """The learned linear map from the latent to the encoder's feature width: the reference's reverse_proj,
    a 1x1 convolution without bias. Lives in the trainer's Autoencoder (optimised, checkpointed and sharded
    with the VAE); `attach` gives it the encoder's last convolution and quant conv for the adaptive weight.
    """

    def __init__(self, latent_channels: int, feature_dim: int, cfg: LossConfig):
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, feature_dim, 1, bias=False)
        self.adaptive, self.align_weight = cfg.align_adaptive, cfg.align_weight
        self._vae: list[nn.Module] = []  # a list: the VAE is not a submodule of this one
        self._conv_out_input: list[torch.Tensor | None] = [None]

    def attach(self, vae: nn.Module) -> None:
        """Record the encoder's last convolution's input at every forward (detached), for the adaptive
        weight; vae: the model with .encoder.conv_out and .quant_conv (None or a 1x1 convolution)."""
        self._vae[:] = [vae]

        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._conv_out_input[0] = args[0].detach()

        if self.adaptive:
            vae.encoder.conv_out.register_forward_pre_hook(record)

    def forward(
        self, z: torch.Tensor, posterior: DiagonalGaussian, pixels: int
    ) -> tuple[torch.Tensor, Aligned]:
        """(z for the decoder, Aligned) from the sampled latent z (B, C, h, w) and its posterior; pixels:
        P = C*H*W of an image, for the cap on the adaptive ratio."""
        p = self.proj(z)
        if not (self.adaptive and torch.is_grad_enabled() and z.requires_grad):
            return z, Aligned(p)
        vae, conv_in = self._vae[0], self._conv_out_input[0]
        conv_out, quant_conv = vae.encoder.conv_out, vae.quant_conv

        def chain(g: torch.Tensor) -> torch.Tensor:
            return encoder_weight_grad(g, z, posterior, conv_in, conv_out, quant_conv)

        record = torch.zeros((), device=z.device)
        z, p = AdaptiveJunction.apply(
            z, p, chain, self.proj.weight.detach(), self.align_weight, VF_RATIO_MAX / pixels, record
        )
        return z, Aligned(p, record)


class VFAlignment(nn.Module):
    """The VF loss term of the objective: holds the frozen encoder (not trained, not checkpointed)."""

    def __init__(self, cfg: LossConfig, encoder: FoundationEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else FoundationEncoder.from_file(cfg.align_encoder)

    @property
    def feature_dim(self) -> int:
        """The encoder's feature width D, the projection's output channels."""
        return self.encoder.dim

    def loss(
        self, x: torch.Tensor, aligned: Aligned, pixels: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the term to add to the loss, logs) for images x (B, 3, H, W) in [-1, 1].

        Adaptive: the term's value is 0 and its gradient the VF loss's, which the junction weights in the
        backward; otherwise align_weight / pixels times the VF loss. Logs (0-dim, detached): align_loss
        (vf), align_cos, align_distmat (each before its weight), align_adaptive (the weight w applied to
        align_loss, in this objective's units; with the adaptive weight, filled in by the backward).
        """
        c = self.cfg
        p = _f32(aligned.projected)
        f = self.encoder.features(x, tuple(p.shape[-2:]), c.align_imagenet_norm).to(p.dtype)
        vf, cos, distmat = vf_loss(
            p, f, c.align_cos_margin, c.align_distmat_margin, c.align_cos_weight, c.align_distmat_weight
        )
        if aligned.weight is not None:
            term, weight = vf - vf.detach(), aligned.weight
        else:
            term = c.align_weight / pixels * vf
            weight = torch.tensor(c.align_weight / pixels, device=x.device)
        logs = {
            "align_loss": vf.detach(),
            "align_cos": cos.detach(),
            "align_distmat": distmat.detach(),
            "align_adaptive": weight,
        }
        return term, logs
