"""The noise-prediction network eps_theta(x_t, t): a U-Net with sinusoidal time embeddings.

Layout (Ho et al. 2020, with the refinements of Nichol & Dhariwal 2021 that matter at this size):

    x [B, C, S, S] -> conv3x3 -> down levels -> middle (res, attention, res) -> up levels -> conv3x3 -> eps

Each level holds ``num_res_blocks`` residual blocks at ``dim * dim_mults[level]`` channels; every block
output on the way down is kept and concatenated, in reverse order, on the way up. Residual blocks use
GroupNorm and SiLU and take the time embedding as a per-channel scale and shift of their second
normalisation. Self-attention (``F.scaled_dot_product_attention``) runs in the middle block and at the
levels named in ``attention_levels`` (by default the lowest resolution only). The last convolution is
zero-initialised, so an untrained network predicts zero noise.

With ``num_classes`` K > 0 the network is class-conditional: a learned embedding of the class label (0 ... K-1,
or K for "no class", the label classifier-free guidance trains and samples with) is added to the time
embedding, so every residual block sees it.

With ``self_condition`` the network also takes an estimate of x_0 (the sampler's clamped estimate from the
previous step, or zeros), concatenated to x_t as extra input channels: the self-conditioning of Chen et al.
(2023, "Analog Bits"); ``Diffusion`` supplies the estimate in training and sampling.

With ``mask_conditional`` the network also sees the pixels an inpainting keeps: the image with its hole zeroed and
the keep mask (1 where kept), ``channels + 1`` more input channels after the others (all zeros: nothing kept, a
plain sample). Trained on random holes, it fills a hole from what is kept in one plain reverse chain, as the
inpainting models of Saharia et al. (2022, "Palette") and Rombach et al. (2022) do.

Timesteps are 0-indexed integers (0 ... T-1) or floats on the same scale; the network does not know T.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a timestep: [B] -> [B, dim]."""

    def __init__(self, dim: int, *, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the time embedding size must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None, :]  # [B, half]
        return torch.cat([args.sin(), args.cos()], dim=-1)  # [B, dim]


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then GroupNorm modulated by the time embedding -> SiLU -> dropout -> conv.

    The branch is added to the input (through a 1x1 convolution when the channel count changes).
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, *, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # [B, out_ch, 1, 1] each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, *, groups: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # [B, heads, HW, c/heads] each
        attn = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, c/heads]
        attn = attn.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(attn)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Unet(nn.Module):
    """eps_theta(x_t, t) for images of ``channels`` channels whose side is divisible by ``2 ** (len(dim_mults) - 1)``.

    Args:
        dim: channels of the first level (the assignment's ``--unet_dim``); level i has ``dim * dim_mults[i]``.
        dim_mults: channel multiplier of each resolution level, highest resolution first.
        channels: image channels in and out.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: indices into ``dim_mults`` of the levels that get self-attention after each
            residual block; ``None`` means the lowest resolution only. The middle block always has one.
        dropout: dropout inside the residual blocks.
        groups: GroupNorm groups; every level's channel count must be divisible by it.
        attn_head_dim: channels per attention head.
        self_condition: take an estimate of x_0 as a second input, ``forward(x, t, x_self_cond)``; only the
            input convolution changes (2 * ``channels`` input channels).
        image_size: if given, checked at construction (see ``check_image_size``).
        num_classes: K > 0 makes the network class-conditional, ``forward(x, t, x_self_cond, y)`` with labels
            ``y`` in 0 ... K (K = ``null_class``, "no class").
        mask_conditional: take the kept pixels as a further input, ``forward(..., kept=...)``; only the input
            convolution changes (``channels + 1`` more input channels, see ``diffusion.kept_input``).
    """

    def __init__(self, dim: int, dim_mults: tuple[int, ...] = (1, 2, 4, 8), channels: int = 3, *,
                 num_res_blocks: int = 2, attention_levels: tuple[int, ...] | None = None,
                 dropout: float = 0.0, groups: int = 8, attn_head_dim: int = 32, self_condition: bool = False,
                 image_size: int | None = None, num_classes: int = 0, mask_conditional: bool = False):
        super().__init__()
        dim_mults = tuple(dim_mults)
        _check_sizes(dim, dim_mults, channels, num_res_blocks, groups, dropout)
        if attention_levels is None:
            attention_levels = (len(dim_mults) - 1,)
        bad = [i for i in attention_levels if not 0 <= i < len(dim_mults)]
        if bad:
            raise ValueError(f"attention_levels {bad} do not name levels of dim_mults {dim_mults} "
                             f"(valid: 0 to {len(dim_mults) - 1})")
        self.dim, self.dim_mults, self.channels = dim, dim_mults, channels
        self.num_res_blocks = num_res_blocks
        self.self_condition = bool(self_condition)
        self.mask_conditional = bool(mask_conditional)
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"U-Net num_classes must be a non-negative integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.attention_levels = tuple(sorted(set(attention_levels)))
        self.downsample_factor = 2 ** (len(dim_mults) - 1)
        if image_size is not None:
            self.check_image_size(image_size)

        time_dim = 4 * dim
        self.time_embed = nn.Sequential(SinusoidalTimeEmbedding(dim), nn.Linear(dim, time_dim), nn.SiLU(),
                                        nn.Linear(time_dim, time_dim))
        if num_classes:
            # the last row is "no class"; N(0, 1) rows (nn.Embedding's own start), as improved-diffusion's label
            # embedding, set the classes apart from the first step (a zero start learns them far more slowly)
            self.class_embed = nn.Embedding(num_classes + 1, time_dim)
        block = dict(time_dim=time_dim, groups=groups, dropout=dropout)
        attention = dict(groups=groups, head_dim=attn_head_dim)
        self.input_conv = nn.Conv2d(self.input_channels, dim, 3, padding=1)

        # Down path: every module's output is pushed as a skip connection.
        self.down = nn.ModuleList()
        skip_channels, ch = [dim], dim
        for level, mult in enumerate(dim_mults):
            out_ch = dim * mult
            for _ in range(num_res_blocks):
                self.down.append(self._level_block(ch, out_ch, level, block, attention))
                ch = out_ch
                skip_channels.append(ch)
            if level < len(dim_mults) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([ResidualBlock(ch, ch, **block), SelfAttention(ch, **attention),
                                  ResidualBlock(ch, ch, **block)])

        # Up path: each residual block consumes one skip connection, in reverse order.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(dim_mults))):
            out_ch = dim * mult
            for _ in range(num_res_blocks + 1):
                self.up.append(self._level_block(ch + skip_channels.pop(), out_ch, level, block, attention))
                ch = out_ch
            if level > 0:
                self.up.append(Upsample(ch))

        self.output = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)  # an untrained network predicts zero noise
        nn.init.zeros_(self.output[-1].bias)

    def _level_block(self, in_ch, out_ch, level, block, attention) -> nn.Module:
        res = ResidualBlock(in_ch, out_ch, **block)
        if level not in self.attention_levels:
            return res
        return _ResAttn(res, SelfAttention(out_ch, **attention))

    def check_image_size(self, image_size: int) -> None:
        """Raise ValueError unless a square image of this side can go through the network."""
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image size must be a positive integer, got {image_size!r}")
        if image_size % self.downsample_factor:
            raise ValueError(
                f"image size {image_size} is not divisible by {self.downsample_factor}, which a U-Net with "
                f"{len(self.dim_mults)} levels (dim_mults {self.dim_mults}) needs; use a multiple of "
                f"{self.downsample_factor} such as {max(1, round(image_size / self.downsample_factor)) * self.downsample_factor}")

    @property
    def input_channels(self) -> int:
        """Channels of the input convolution: x_t, the x_0 estimate (self-conditioning), the kept pixels and their
        mask (mask conditioning)."""
        return self.channels * (2 if self.self_condition else 1) + (self.channels + 1 if self.mask_conditional else 0)

    @property
    def null_class(self) -> int:
        """The label that means "no class" (K); only a class-conditional network has one."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, x_self_cond: torch.Tensor | None = None,
                y: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in ``x`` ([B, C, H, W]) at timesteps ``t`` ([B], 0-indexed); returns [B, C, H, W].

        ``x_self_cond`` ([B, C, H, W], in [-1, 1]) is the x_0 estimate of a self-conditioned network (None: zeros,
        i.e. no estimate); a network built without ``self_condition`` does not accept one. ``y`` ([B] integer) are
        the class labels of a class-conditional network (None: "no class" for every image); a network built
        without ``num_classes`` does not accept them. ``kept`` ([B, C + 1, H, W], ``diffusion.kept_input``) is what a
        mask-conditional network is given of the image (None: nothing, zeros).
        """
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            self.check_image_size(x.shape[-1] if x.shape[-1] % self.downsample_factor else x.shape[-2])
        if self.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if x_self_cond is None else x_self_cond.to(x.dtype)], dim=1)
        elif x_self_cond is not None:
            raise ValueError("this U-Net was built without self_condition, so it takes no x_0 estimate")
        if self.mask_conditional:
            kept = x.new_zeros(x.shape[0], self.channels + 1, *x.shape[2:]) if kept is None else kept.to(x.dtype)
            x = torch.cat([x, kept], dim=1)
        elif kept is not None:
            raise ValueError("this U-Net was built without mask_conditional, so it takes no kept pixels")
        emb = self.time_embed(t)  # [B, 4 * dim]
        if self.num_classes:
            if y is None:
                y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError("this U-Net was built without num_classes, so it takes no class labels")
        h = self.input_conv(x)
        skips = [h]
        for module in self.down:
            h = module(h) if isinstance(module, Downsample) else module(h, emb)
            skips.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = module(torch.cat([h, skips.pop()], dim=1), emb)  # [B, ch + skip_ch, H, W]
        return self.output(h)


class _ResAttn(nn.Module):
    """A residual block followed by self-attention, called like a residual block."""

    def __init__(self, res: ResidualBlock, attn: SelfAttention):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


def _check_sizes(dim, dim_mults, channels, num_res_blocks, groups, dropout) -> None:
    for name, value in (("dim", dim), ("channels", channels), ("num_res_blocks", num_res_blocks), ("groups", groups)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"U-Net {name} must be a positive integer, got {value!r}")
    if not dim_mults or any(not isinstance(m, int) or m <= 0 for m in dim_mults):
        raise ValueError(f"U-Net dim_mults must be a non-empty list of positive integers, got {dim_mults!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"U-Net dropout must be in [0, 1), got {dropout}")
    if dim % 2:
        raise ValueError(f"U-Net dim must be even (the time embedding splits it into sin and cos), got {dim}")
    bad = sorted({dim * m for m in dim_mults if (dim * m) % groups})
    if bad:
        raise ValueError(f"U-Net dim {dim} gives {bad} channels, which GroupNorm cannot split into {groups} groups; "
                         f"use a dim that is a multiple of {groups}")
