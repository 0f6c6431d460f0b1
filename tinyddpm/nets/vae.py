"""A tiny AutoencoderKL: images ↔ latents where the diffusion runs (book chapter 9).

Stable Diffusion's autoencoder maps [B, 3, H, W] to [B, 4, H/8, W/8] (Rombach et al. 2022); ours
maps 8×8×1 digits to 4×4×2 latents (one 2× downsampling: an 8× one would leave a single latent
pixel, and the UNet's spatial inductive bias would be gone). The encoder outputs the mean and
log-variance of q(z | x) = N(μ(x), diag σ²(x)); training maximises the β-weighted ELBO,
eq. :eq:`eq-vae-elbo`,

    log p(x) ≥ E_q[log p(x | z)] - KL(q(z | x) ‖ N(0, I)),
    loss(x) = ‖x - D(z)‖² + β KL,   z = μ + σ ε  (reparameterised, eq. :eq:`eq-reparam`),

with a small β as in LDM's "KL-reg." autoencoders (their β is 1e-6 beside a perceptual loss). The
latents are then multiplied by ``scale_factor`` = 1 / std(z) measured on the training data, so
the diffusion sees unit-variance inputs (LDM Sec. 4 and App. G: 0.18215 for SD's autoencoder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..checks import check_int, check_nonneg_float
from ..config_base import Config


@dataclass(frozen=True)
class VAEConfig(Config):
    in_channels: int = 1
    latent_channels: int = 2
    channels: int = 16
    beta: float = 1e-3          # weight of KL(q(z|x) ‖ N(0, I)) against the summed squared error
    groups: int = 8

    def __post_init__(self):
        for name in ("in_channels", "latent_channels", "channels", "groups"):
            check_int(name, getattr(self, name), low=1)
        check_nonneg_float("beta", self.beta)
        if self.channels % self.groups:
            raise ValueError(f"channels ({self.channels}) must be divisible by groups ({self.groups})")


class _Res(nn.Module):
    """GroupNorm → SiLU → conv, twice, plus the input (no time input: the VAE knows no t)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def kl_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² - 1 - log σ²), summed per sample: shape (B,)."""
    return 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class VAE(nn.Module):
    """Encoder x (B, C, H, W) → (μ, log σ²) (B, Z, H/2, W/2); decoder z → x̂. See the module docstring."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = c = config
        ch, g = c.channels, c.groups
        self.encoder = nn.Sequential(
            nn.Conv2d(c.in_channels, ch, 3, padding=1), _Res(ch, g),
            nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), _Res(2 * ch, g),           # H/2 × W/2
            nn.GroupNorm(g, 2 * ch), nn.SiLU(), nn.Conv2d(2 * ch, 2 * c.latent_channels, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(c.latent_channels, 2 * ch, 3, padding=1), _Res(2 * ch, g),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * ch, ch, 3, padding=1), _Res(ch, g),
            nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, c.in_channels, 3, padding=1),
        )
        self.register_buffer("scale_factor", torch.ones(()))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z | x), each (B, Z, H/2, W/2); log σ² clamped to [-30, 20]."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"x must have shape (B, {self.config.in_channels}, H, W) with even H, W; "
                             f"got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """x̂ = D(z) for an *unscaled* latent z (B, Z, h, w) → (B, C, 2h, 2w)."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z must have shape (B, {self.config.latent_channels}, h, w); got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(x̂, μ, log σ²) with x̂ = D(μ + σ ε): the reparameterised sample, eq. :eq:`eq-reparam`."""
        mean, logvar = self.encode(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + (0.5 * logvar).exp() * eps), mean, logvar

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The negative β-ELBO, eq. :eq:`eq-vae-elbo`, averaged over the batch: (loss, sq. error, KL)."""
        x_hat, mean, logvar = self(x, generator)
        rec = (x - x_hat).pow(2).flatten(1).sum(1)
        kl = kl_standard_normal(mean, logvar)
        return (rec + self.config.beta * kl).mean(), rec.mean(), kl.mean()

    # ------------------------------------------------------------ scaled latents for the diffusion
    @torch.no_grad()
    def to_latent(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latent ``scale_factor · z``: z = μ(x) without a generator, a draw from q(z | x) with one."""
        mean, logvar = self.encode(x)
        if generator is None:
            return mean * self.scale_factor
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + (0.5 * logvar).exp() * eps) * self.scale_factor

    @torch.no_grad()
    def from_latent(self, z_scaled: Tensor) -> Tensor:
        """Decode a scaled latent: D(z_scaled / scale_factor)."""
        return self.decode(z_scaled / self.scale_factor)

    @torch.no_grad()
    def fit_scale_factor(self, x: Tensor, generator: torch.Generator | None = None, batch_size: int = 512) -> float:
        """Set ``scale_factor = 1 / std(z)`` over ``x``'s latents (posterior draws if a generator is given)."""
        self.scale_factor.fill_(1.0)
        z = torch.cat([self.to_latent(x[i : i + batch_size], generator) for i in range(0, len(x), batch_size)])
        self.scale_factor.fill_(1.0 / float(z.std()))
        return float(self.scale_factor)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) → (Z, H/2, W/2)."""
        C, H, W = image_shape
        return (self.config.latent_channels, H // 2, W // 2)

    def fingerprint(self) -> str:
        """SHA-256 of the weights (names, shapes, bytes): a pipeline records it to refuse a foreign VAE."""
        from ..fingerprint import fingerprint

        return fingerprint(self)

    def to_config(self) -> dict:
        return asdict(self.config)
