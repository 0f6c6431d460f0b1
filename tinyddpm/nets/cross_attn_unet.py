"""The cross-attention UNet of latent diffusion (Rombach et al. 2022, Sec. 3.3), at digit scale (ch. 9).

ResBlocks read the timestep embedding; SpatialTransformers read the text context (B, K, E) through
cross-attention, eq. :eq:`eq-cross-attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int
from ..config_base import Config
from .attention import SpatialTransformer
from .embeddings import TimeEmbedding, check_t
from .unet import Downsample, ResBlock, Upsample


class _TimeRes(nn.Module):
    """unet.ResBlock plus its own map e → (1 + s, b): the block scales and shifts its features by t."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.block = ResBlock(in_ch, out_ch, groups, 0.0, "scale_shift")
        self.emb_proj = nn.Linear(emb_dim, self.block.emb_channels)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        s, b = self.emb_proj(e)[:, :, None, None].chunk(2, dim=1)       # each (B, out, 1, 1)
        return self.block(x, (1 + s, b))


@dataclass(frozen=True)
class CrossAttnUNetConfig(Config):
    latent_channels: int = 2
    channels: int = 24          # width at the latent resolution; 2× at the half resolution
    context_dim: int = 64
    heads: int = 4
    groups: int = 8

    def __post_init__(self):
        for f in fields(self):
            check_int(f.name, getattr(self, f.name), low=1)


class CrossAttnUNet(nn.Module):
    """ε_θ(z_t, t, context, mask) on latents (B, Z, h, w), h and w even; two resolutions.

    conv_in → [Res + ST] (h) → Down → [Res + ST] (h/2) → middle [Res, ST, Res] → [Res(skip) + ST]
    (h/2) → Up → [Res(skip) + ST] (h) → GN, SiLU, conv_out (zero-initialised). Res = unet.ResBlock
    with the timestep embedding (scale-shift); ST = SpatialTransformer cross-attending to the text.
    """

    def __init__(self, config: CrossAttnUNetConfig = CrossAttnUNetConfig()):
        super().__init__()
        self.config = c = config
        C, E, g = c.channels, c.context_dim, c.groups
        emb = 4 * C
        res = lambda i, o: _TimeRes(i, o, emb, g)                      # noqa: E731
        st = lambda ch: SpatialTransformer(ch, E, c.heads, g)          # noqa: E731
        self.time_emb = TimeEmbedding(C, emb)
        self.conv_in = nn.Conv2d(c.latent_channels, C, 3, padding=1)
        self.down = nn.ModuleList([res(C, C), st(C), Downsample(C), res(C, 2 * C), st(2 * C)])
        self.mid = nn.ModuleList([res(2 * C, 2 * C), st(2 * C), res(2 * C, 2 * C)])
        self.up = nn.ModuleList([res(4 * C, 2 * C), st(2 * C), Upsample(2 * C), res(3 * C, C), st(C)])
        self.out = nn.Sequential(nn.GroupNorm(g, C), nn.SiLU(), nn.Conv2d(C, c.latent_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def spatial_transformers(self) -> list[SpatialTransformer]:
        return [m for m in self.modules() if isinstance(m, SpatialTransformer)]

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if context is None:
            raise ValueError("CrossAttnUNet needs context (B, K, E) from the text encoder (use the empty prompt "
                             "for an unconditional prediction)")
        if x.ndim != 4 or x.shape[1] != self.config.latent_channels or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"x must be a latent (B, {self.config.latent_channels}, h, w) with even h, w; "
                             f"got {tuple(x.shape)}")
        e = F.silu(self.time_emb(check_t(t, x)))                        # (B, 4C)
        d_res0, d_st0, down, d_res1, d_st1 = self.down
        h0 = d_st0(d_res0(self.conv_in(x), e), context, mask)          # (B, C, h, w)
        h1 = d_st1(d_res1(down(h0), e), context, mask)                  # (B, 2C, h/2, w/2)
        m_res0, m_st, m_res1 = self.mid
        h = m_res1(m_st(m_res0(h1, e), context, mask), e)
        u_res1, u_st1, up, u_res0, u_st0 = self.up
        h = u_st1(u_res1(torch.cat([h, h1], 1), e), context, mask)
        h = u_st0(u_res0(torch.cat([up(h), h0], 1), e), context, mask)  # (B, C, h, w)
        return self.out(h)
