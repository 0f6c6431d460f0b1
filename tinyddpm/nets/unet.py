"""The UNet denoiser ε_θ(x_t, t, y) of DDPM (Ho et al. 2020, App. B), small and configurable.

Layout (one "level" per entry of ``channel_mults``; level i works at ``image_size / 2**i`` with
``base_channels * channel_mults[i]`` channels)::

    x ─ conv_in ─ [ResBlock (+Attn)] × num_res_blocks ─ Downsample ─ ... ─┐  (outputs kept)
                                                           Res, Attn, Res (middle)
    out ─ conv_out ─ [ResBlock(skip) (+Attn)] × (num_res_blocks+1) ─ Upsample ─ ─┘

(``ResBlock(skip)`` reads its input concatenated with the kept output of the same level.)

Every ResBlock reads the embedding e = SiLU(temb(t) + cond(y, context)) — as a scale and shift of
its normalised features (``time_injection="scale_shift"``, Dhariwal & Nichol 2021) or added to them
(``"add"``, the original DDPM). Without t the network cannot know how much noise to remove.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_choice, check_int
from .attention import MultiHeadAttention
from .embeddings import ConditionEmbedding, TimeEmbedding, check_t

TimeInjection = Literal["scale_shift", "add"]
TIME_INJECTIONS: tuple[str, ...] = ("scale_shift", "add")
MidAttention = Literal["norm", "no_norm", "none"]
MID_ATTENTIONS: tuple[str, ...] = ("norm", "no_norm", "none")


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))); h = GN(h)·(1 + s) + b; out = skip(x) + conv(drop(SiLU(h))).

    (s, b) come from the embedding e through a linear map. For speed the UNet computes the maps of
    *all* its ResBlocks as one matmul (``UNet.emb_proj``) and hands each block its slice: (1 + s, b)
    for ``"scale_shift"``, or a single shift added before the second norm for ``"add"`` (DDPM).
    """

    def __init__(
        self, in_ch: int, out_ch: int, groups: int, dropout: float, time_injection: str, eps: float = 1e-5
    ):
        super().__init__()
        self.scale_shift = time_injection == "scale_shift"
        self.emb_channels = 2 * out_ch if self.scale_shift else out_ch   # width of this block's slice
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, e: tuple[Tensor, ...]) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                            # (B, out, H, W)
        if self.scale_shift:
            scale1, shift = e                                            # each (B, out, 1, 1); scale1 = 1 + s
            h = torch.addcmul(shift, self.norm2(h), scale1)              # GN(h)·(1 + s) + b
        else:
            h = self.norm2(h + e[0])
        h = F.silu(h)
        if self.dropout is not None:
            h = self.dropout(h)
        return (x if self.skip is None else self.skip(x)) + self.conv2(h)


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions with a residual: x + MHA(GN(x)) (DDPM's AttnBlock).

    ``norm=False`` drops the GroupNorm (the middle of diffusers' scale-shift UNet2DModel has none).
    """

    def __init__(self, ch: int, heads: int, groups: int, eps: float = 1e-5, norm: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps) if norm else None
        self.attn = MultiHeadAttention(ch, heads=heads, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = x if self.norm is None else self.norm(x)
        h = self.attn(h.flatten(2).transpose(1, 2))                                # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 convolution.

    ``padding=1`` pads one pixel on every side (DDPM's TF code pads asymmetrically; the result has
    the same size); ``padding=0`` pads only right and bottom, then convolves unpadded — diffusers'
    layout for its DDPM ports (``downsample_padding=0``).
    """

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = check_int("downsample_padding", padding, low=0, high=1)
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks, each optionally followed by attention."""

    def __init__(self, res: list[ResBlock], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


def _check_sizes(image_size: int, levels: int) -> None:
    factor = 2 ** (levels - 1)
    if image_size % factor:
        fit = next(k for k in range(levels, 0, -1) if image_size % 2 ** (k - 1) == 0)
        examples = ", ".join(str(factor * m) for m in (1, 2, 3, 4))
        raise ValueError(
            f"image_size={image_size} does not fit {levels} levels: channel_mults has {levels} entries, so the "
            f"UNet downsamples {levels - 1} times and needs a multiple of {factor} (e.g. {examples}); "
            f"{image_size} works with at most {fit} level(s)"
        )


class UNet(nn.Module):
    """DDPM's UNet: ``model(x_t, t, y=None, context=None, context_mask=None) -> (B, out_channels, H, W)``.

    ``attention_levels`` are level indices (level i is at ``image_size / 2**i``); the middle has
    attention unless ``mid_attention="none"`` (``"no_norm"``: without its GroupNorm). Attention layers
    have ``num_heads`` heads each, or ``channels // head_dim`` heads when ``head_dim`` is set.
    ``num_classes`` adds class labels with the null label ``num_classes`` (also what ``y=None``
    means); ``context_dim`` adds a context (B, K, context_dim), mean-pooled over K (all zeros =
    unconditional). ``t`` is paper-indexed (integer, or float for fractional steps).

    Options for diffusers layouts (``tinyddpm.interop``): ``norm_eps`` (every GroupNorm's ε),
    ``downsample_padding`` (see :class:`Downsample`), ``flip_sin_to_cos``/``freq_shift`` (see
    :func:`timestep_embedding`) and ``time_shift`` (the embedding reads t + time_shift; -1 for a
    diffusers model, whose step index is t - 1). The constructor's arguments are kept in
    ``self.config`` (JSON-able): ``UNet(**m.config)`` rebuilds it.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int | None = None, image_size: int = 8, base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2), num_res_blocks: int = 1, attention_levels: tuple[int, ...] = (1,),
        num_heads: int = 1, dropout: float = 0.0, num_classes: int | None = None, context_dim: int | None = None,
        groups: int = 8, time_injection: TimeInjection = "scale_shift", norm_eps: float = 1e-5,
        downsample_padding: int = 1, head_dim: int | None = None, mid_attention: MidAttention = "norm",
        flip_sin_to_cos: bool = False, freq_shift: int = 1, time_shift: int = 0,
    ):
        super().__init__()
        in_channels = check_int("in_channels", in_channels, low=1)
        out_channels = in_channels if out_channels is None else check_int("out_channels", out_channels, low=1)
        image_size = check_int("image_size", image_size, low=1)
        base_channels = check_int("base_channels", base_channels, low=1)
        num_res_blocks = check_int("num_res_blocks", num_res_blocks, low=1)
        num_heads = check_int("num_heads", num_heads, low=1)
        groups = check_int("groups", groups, low=1)
        downsample_padding = check_int("downsample_padding", downsample_padding, low=0, high=1)
        freq_shift = check_int("freq_shift", freq_shift, low=0, high=1)
        time_shift = check_int("time_shift", time_shift)
        check_choice("time_injection", time_injection, TIME_INJECTIONS)
        check_choice("mid_attention", mid_attention, MID_ATTENTIONS)
        if not isinstance(flip_sin_to_cos, bool):
            raise TypeError(f"flip_sin_to_cos must be a bool; got {type(flip_sin_to_cos).__name__}")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not 0 < norm_eps < 1:
            raise ValueError(f"norm_eps must be a number in (0, 1); got {norm_eps!r}")
        if head_dim is not None:
            head_dim = check_int("head_dim", head_dim, low=1)
            if num_heads != 1:
                raise ValueError(f"pass num_heads or head_dim, not both; got num_heads={num_heads}, "
                                 f"head_dim={head_dim}")
        if not isinstance(channel_mults, (tuple, list)) or not channel_mults:
            raise ValueError(f"channel_mults must be a non-empty sequence of ints like (1, 2); got {channel_mults!r}")
        mults = [check_int("channel_mults[i]", m, low=1) for m in channel_mults]
        L = len(mults)
        attn_levels = sorted({check_int("attention_levels[i]", a) for a in attention_levels})
        if any(a < 0 or a >= L for a in attn_levels):
            raise ValueError(f"attention_levels must be level indices in 0..{L - 1}; got {list(attention_levels)}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
        chans = [base_channels * m for m in mults]
        for c in {base_channels, *chans}:
            if c % groups:
                raise ValueError(f"every channel count must be divisible by groups={groups}; {c} is not")
        attn_chans = {chans[a] for a in attn_levels} | ({chans[-1]} if mid_attention != "none" else set())
        for c in sorted(attn_chans):
            if head_dim is not None and c % head_dim:
                raise ValueError(f"head_dim={head_dim} must divide the channels of every attention layer; {c} is not")
            if c % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide the channels of every attention layer; {c} is not")
        _check_sizes(image_size, L)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, image_size=image_size, base_channels=base_channels,
            channel_mults=mults, num_res_blocks=num_res_blocks, attention_levels=attn_levels, num_heads=num_heads,
            dropout=float(dropout), num_classes=num_classes, context_dim=context_dim, groups=groups,
            time_injection=time_injection, norm_eps=float(norm_eps), downsample_padding=downsample_padding,
            head_dim=head_dim, mid_attention=mid_attention, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
            time_shift=time_shift,
        )
        self.levels = L
        emb_dim = 4 * base_channels
        self.time_emb = TimeEmbedding(base_channels, emb_dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
                                      time_shift=time_shift)
        self.cond_emb = ConditionEmbedding(emb_dim, num_classes, context_dim)
        eps = float(norm_eps)
        heads = lambda c: c // head_dim if head_dim is not None else num_heads  # noqa: E731
        block = lambda i, o: ResBlock(i, o, groups, dropout, time_injection, eps)  # noqa: E731
        attn = lambda c, on: AttentionBlock(c, heads(c), groups, eps) if on else nn.Identity()  # noqa: E731

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skips, ch = [base_channels], base_channels
        self.down = nn.ModuleList()
        for i, c in enumerate(chans):
            res, att = [], []
            for _ in range(num_res_blocks):
                res.append(block(ch, c))
                att.append(attn(c, i in attn_levels))
                ch = c
                skips.append(ch)
            down = Downsample(ch, downsample_padding) if i < L - 1 else None
            if down is not None:
                skips.append(ch)
            self.down.append(Level(res, att, down))
        mid_attn = (nn.Identity() if mid_attention == "none"
                    else AttentionBlock(ch, heads(ch), groups, eps, norm=mid_attention == "norm"))
        self.mid = Level([block(ch, ch), block(ch, ch)], [mid_attn, nn.Identity()], None)
        self.up = nn.ModuleList()
        for i, c in reversed(list(enumerate(chans))):
            res, att = [], []
            for _ in range(num_res_blocks + 1):
                res.append(block(ch + skips.pop(), c))
                att.append(attn(c, i in attn_levels))
                ch = c
            self.up.append(Level(res, att, Upsample(ch) if i > 0 else None))
        self.norm_out = nn.GroupNorm(groups, ch, eps=eps)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

        # Every ResBlock's linear map of e, stacked into one Linear: one matmul per forward instead of
        # one per block (small models are launch-bound). Same parameters as separate maps; the "+1"
        # of the scale (1 + s) is a constant offset on the scale rows, added to the bias.
        blocks = self.res_blocks()
        self.emb_proj = nn.Linear(emb_dim, sum(b.emb_channels for b in blocks))
        offset = [torch.cat([torch.ones(b.emb_channels // 2), torch.zeros(b.emb_channels // 2)])
                  if b.scale_shift else torch.zeros(b.emb_channels) for b in blocks]
        self.register_buffer("emb_offset", torch.cat(offset), persistent=False)
        self._emb_split = [c for b in blocks
                           for c in ((b.emb_channels // 2,) * 2 if b.scale_shift else (b.emb_channels,))]
        self._emb_per_block = 2 if time_injection == "scale_shift" else 1

    def res_blocks(self) -> list[ResBlock]:
        """Every ResBlock in the order the forward pass runs them (= the row order of ``emb_proj``)."""
        return [r for part in (*self.down, self.mid, *self.up) for r in part.res]

    @property
    def null_label(self) -> int | None:
        """The label index meaning "no label" (= num_classes), or None for an unconditional model."""
        return self.cond_emb.null_label

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        cfg = self.config
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != cfg["in_channels"]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {cfg['in_channels']}, H, W); got {got}")
        factor = 2 ** (self.levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be multiples of {factor} ({self.levels} levels); got {tuple(x.shape[2:])}")
        t = check_t(t, x)
        emb = self.time_emb(t)                                              # (B, 4·base)
        cond = self.cond_emb(x.shape[0], x.device, y, context, context_mask)
        if cond is not None:
            emb = emb + cond
        emb = F.silu(emb)
        B, k = x.shape[0], self._emb_per_block
        e = F.linear(emb, self.emb_proj.weight, self.emb_proj.bias + self.emb_offset)
        e = e.view(B, -1, 1, 1).split(self._emb_split, dim=1)              # (1+s, b) or (b,) per ResBlock
        es = iter([e[i:i + k] for i in range(0, len(e), k)])               # in the order they run

        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(h, next(es)))
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)
        for res, attn in zip(self.mid.res, self.mid.attn, strict=True):
            h = attn(res(h, next(es)))
        for level in self.up:
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), next(es)))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
