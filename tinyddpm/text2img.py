"""Stable Diffusion in miniature: text → context → cross-attention UNet on VAE latents (chapter 9).

The three parts of Rombach et al. 2022 (LDM), at digit scale:

- text encoder (:class:`tinyddpm.text.TextEncoder`): prompt → context [B, K, E] (K = 8, E = 64);
- autoencoder (:class:`tinyddpm.vae.VAE`): image [B, 1, 8, 8] ↔ latent [B, 2, 4, 4];
- :class:`CrossAttnUNet`: ResBlocks read the timestep embedding, SpatialTransformers read the context.

Training (:func:`train_text2img`): the VAE first, then it is frozen and the UNet and text encoder
are trained *jointly* on L_simple (eq-loss-simple) over scaled latents, with 10 % of captions
replaced by the empty prompt. Sampling (:meth:`TextToImage.generate`) guides with the empty
prompt as the unconditional input, eq. (eq-cfg), then decodes the latent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model
from torch import Tensor, nn

from .cache import cache_dir
from .checks import check_int, check_nonneg_float
from .diffusion.schedule import NoiseSchedule
from .nets.cross_attn_unet import CrossAttnUNet, CrossAttnUNetConfig
from .nets.text import TextEncoder, TextEncoderConfig, Tokenizer, attribute_labels, random_captions
from .nets.vae import VAE, VAEConfig, train_vae
from .sampling.guidance import cfg_combine
from .sampling.registry import SAMPLERS, sample
from .training.checkpoint import _save_weights, write_dir_atomic
from .training.config import DiffusionConfig
from .training.ema import EMA
from .training.losses import diffusion_loss

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Text2ImgConfig:
    """Everything :func:`train_text2img` needs; saved with the pipeline."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_steps: int = 600
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(vocab_size=0))  # size set from vocab
    unet: CrossAttnUNetConfig = field(default_factory=CrossAttnUNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    attribute_prob: float = 0.5
    seed: int = 0

    def __post_init__(self):
        for name in ("vae_steps", "steps", "batch_size"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        for name in ("lr", "ema_decay", "caption_dropout", "attribute_prob"):
            check_nonneg_float(name, getattr(self, name))
        if not self.caption_dropout < 1 or not self.attribute_prob <= 1 or not self.ema_decay < 1:
            raise ValueError("caption_dropout and ema_decay must lie in [0, 1), attribute_prob in [0, 1]")
        if self.unet.latent_channels != self.vae.latent_channels:
            raise ValueError(f"unet.latent_channels ({self.unet.latent_channels}) must equal "
                             f"vae.latent_channels ({self.vae.latent_channels})")
        if self.unet.context_dim != self.text.dim:
            raise ValueError(f"unet.context_dim ({self.unet.context_dim}) must equal text.dim ({self.text.dim})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Text2ImgConfig:
        d = dict(d)
        for key, sub in (("vae", VAEConfig), ("text", TextEncoderConfig), ("unet", CrossAttnUNetConfig),
                         ("diffusion", DiffusionConfig)):
            if key in d:
                d[key] = sub(**d[key])
        return cls(**d)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


class TextToImage(nn.Module):
    """tokenizer + text encoder + cross-attention UNet + VAE + schedule: ``generate(prompts)`` → images."""

    def __init__(self, tokenizer: Tokenizer, text_encoder: TextEncoder, unet: CrossAttnUNet, vae: VAE,
                 schedule: NoiseSchedule, image_shape: tuple[int, int, int], config: Text2ImgConfig | None = None):
        super().__init__()
        latent = vae.latent_shape(tuple(image_shape))
        if unet.config.latent_channels != latent[0]:
            raise ValueError(f"the UNet denoises {unet.config.latent_channels}-channel latents but the VAE makes "
                             f"{latent[0]}-channel ones: this VAE does not belong to this UNet")
        if unet.config.context_dim != text_encoder.config.dim:
            raise ValueError(f"the UNet expects a context of width {unet.config.context_dim}; the text encoder "
                             f"gives {text_encoder.config.dim}")
        if len(tokenizer) != text_encoder.config.vocab_size or tokenizer.max_length != text_encoder.config.max_length:
            raise ValueError("the tokenizer's vocabulary size / max_length do not match the text encoder's")
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.schedule, self.image_shape, self.latent_shape = schedule, tuple(image_shape), latent
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """Prompts → (context (B, K, E), mask (B, K)); "" is the empty (unconditional) prompt."""
        ids, mask = self.tokenizer.encode(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.text_encoder(ids, mask), mask

    def guided_denoiser(self, prompts: list[str], guidance: float):
        """model(z_t, t) = ε_u + w (ε_c - ε_u), eq. (eq-cfg), with ε_u from the empty prompt.

        Both halves run in one forward pass on the doubled batch [z_t; z_t] (skipped for w = 1).
        """
        w = check_nonneg_float("guidance", guidance)
        ctx, mask = self.encode_prompts(list(prompts) + [""] * len(prompts))

        def model(z: Tensor, t: Tensor) -> Tensor:
            B = z.shape[0]
            if w == 1.0:
                return self.unet(z, t, ctx[:B], mask[:B])
            eps_c, eps_u = self.unet(torch.cat([z, z]), torch.cat([t, t]), ctx, mask).chunk(2)
            return cfg_combine(eps_u, eps_c, w)

        return model

    @torch.no_grad()
    def generate(self, prompts: str | list[str], *, guidance: float = 3.0, steps: int = 50, sampler: str = "ddim",
                 generator: torch.Generator | None = None, return_latents: bool = False) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] for the prompts: sample a latent with ``sampler``, decode it."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("pass at least one prompt")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {sampler!r}")
        was_training = self.training
        self.eval()
        model = self.guided_denoiser(prompts, guidance)
        kw = {} if sampler == "ddpm" else {"steps": check_int("steps", steps, low=1, high=self.schedule.T)}
        z = sample(sampler, model, self.schedule, (len(prompts), *self.latent_shape), generator=generator,
                   device=self.device, prediction=self.config.diffusion.prediction if self.config else "eps", **kw)
        self.train(was_training)
        return z if return_latents else self.vae.from_latent(z).clamp(-1, 1)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path) -> Path:
        """Write ``directory`` atomically: three safetensors files and ``pipeline.json``."""
        meta = {
            "format_version": FORMAT_VERSION, "kind": "text2img", "image_shape": list(self.image_shape),
            "latent_shape": list(self.latent_shape), "vae_fingerprint": self.vae.fingerprint(),
            "tokenizer": self.tokenizer.to_config(), "text_encoder": asdict(self.text_encoder.config),
            "unet": asdict(self.unet.config), "vae": asdict(self.vae.config), "schedule": self.schedule.to_config(),
            "config": self.config.to_dict() if self.config else None,
        }

        def write(tmp: Path) -> None:
            for name in ("vae", "text_encoder", "unet"):
                _save_weights(getattr(self, name), tmp / f"{name}.safetensors")
            (tmp / "pipeline.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

        return write_dir_atomic(Path(directory), write)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TextToImage:
        """Rebuild a saved pipeline; a VAE whose weights or latent shape differ from training is an error."""
        d = Path(directory)
        if not (d / "pipeline.json").is_file():
            raise FileNotFoundError(f"{d} is not a saved text-to-image pipeline (no pipeline.json)")
        meta = json.loads((d / "pipeline.json").read_text(encoding="utf-8"))
        if meta.get("kind") != "text2img" or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d}/pipeline.json is not a text2img pipeline of format {FORMAT_VERSION}")
        vae = VAE(VAEConfig(**meta["vae"]))
        text_encoder, unet = TextEncoder(TextEncoderConfig(**meta["text_encoder"])), CrossAttnUNet(
            CrossAttnUNetConfig(**meta["unet"]))
        for name, module in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
            load_model(module, str(d / f"{name}.safetensors"), device=str(device))
        image_shape = tuple(meta["image_shape"])
        if list(vae.latent_shape(image_shape)) != meta["latent_shape"]:
            raise ValueError(f"the VAE makes latents {vae.latent_shape(image_shape)} but the UNet was trained on "
                             f"{tuple(meta['latent_shape'])}")
        if vae.fingerprint() != meta["vae_fingerprint"]:
            raise ValueError(f"the VAE in {d} is not the one the UNet was trained with (weights hash "
                             f"{vae.fingerprint()} != recorded {meta['vae_fingerprint']}); its latents mean "
                             f"something else to the UNet — retrain the UNet or restore that VAE")
        config = Text2ImgConfig.from_dict(meta["config"]) if meta.get("config") else None
        pipe = cls(Tokenizer.from_config(meta["tokenizer"]), text_encoder, unet, vae,
                   NoiseSchedule.from_config(meta["schedule"]), image_shape, config)
        return pipe.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------- training and the recipe
def train_text2img(data, config: Text2ImgConfig = Text2ImgConfig(), *, device: str | torch.device = "cpu",
                   log: list | None = None) -> TextToImage:
    """Train the VAE, freeze it, then the UNet + text encoder jointly on captioned latents.

    ``data``: an image Dataset with digit labels in 0..9 (captions are written from them and from
    the measured attributes). Deterministic per ``config.seed`` on a given device. ``log``
    receives (step, loss) every 100 steps. Returns the pipeline with the EMA weights, in eval mode.
    """
    if getattr(data, "labels", None) is None or not getattr(data, "is_image", False):
        raise ValueError("train_text2img needs an image Dataset with digit labels (e.g. load_dataset('digits'))")
    x, labels = data.x.to(device), data.labels
    tokenizer = Tokenizer.for_digits(config.text.max_length)
    text_cfg = TextEncoderConfig(**{**asdict(config.text), "vocab_size": len(tokenizer)})
    config = Text2ImgConfig.from_dict({**config.to_dict(), "text": asdict(text_cfg)})
    vae = train_vae(x, config=config.vae, steps=config.vae_steps, seed=config.seed, device=device)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        std, scale = (0.5 * logvar).exp(), vae.scale_factor
    thick, lean = attribute_labels(x.cpu(), labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        nets = nn.ModuleDict({"text_encoder": TextEncoder(text_cfg), "unet": CrossAttnUNet(config.unet)}).to(device)
    ema = EMA(nets, decay=config.ema_decay)
    schedule = config.diffusion.build()
    opt = torch.optim.AdamW(nets.parameters(), lr=config.lr, weight_decay=0.0)
    lr_at = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + torch.cos(torch.tensor(s / config.steps * torch.pi)).item())  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator(device=device).manual_seed(config.seed)
    g_cpu = torch.Generator().manual_seed(config.seed + 2)
    nets.train()
    for step in range(config.steps):
        idx = torch.randint(0, len(x), (config.batch_size,), generator=g, device=device)
        eps = torch.randn(mean[idx].shape, generator=g, device=device)
        z0 = (mean[idx] + std[idx] * eps) * scale                      # a draw from q(z | x), scaled
        captions = random_captions(labels[idx.cpu()], [thick[i] for i in idx.tolist()], [lean[i] for i in idx.tolist()],
                                   generator=g_cpu, attribute_prob=config.attribute_prob,
                                   drop_prob=config.caption_dropout)
        ids, mask = tokenizer.encode(captions)
        ids, mask = ids.to(device), mask.to(device)
        context = nets["text_encoder"](ids, mask)
        loss = diffusion_loss(nets["unet"], schedule, z0, prediction=config.diffusion.prediction, generator=g,
                              model_kwargs={"context": context, "mask": mask})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(nets)
        if log is not None and step % 100 == 0:
            log.append((step, float(loss.detach())))
    best = ema.model
    return TextToImage(tokenizer, best["text_encoder"], best["unet"], vae, schedule, tuple(x.shape[1:]),
                       config).eval().requires_grad_(False)


def load_or_train_text2img(config: Text2ImgConfig = Text2ImgConfig(), *, cache: str | Path | None = None,
                           device: str | torch.device = "cpu") -> TextToImage:
    """The digits text-to-image pipeline for ``config``: loaded from the cache, or trained (CPU:
    a few minutes) on ``load_dataset("digits", split="train")`` and saved there first."""
    from .data.datasets import load_dataset

    root = Path(cache) if cache is not None else cache_dir("models")
    directory = root / f"text2img-digits-{config.digest()}"
    if (directory / "pipeline.json").is_file():
        return TextToImage.load(directory, device)
    pipe = train_text2img(load_dataset("digits", split="train"), config, device=device)
    pipe.save(directory)
    return pipe


def sample_prompt(ckpt_dir: str | Path, prompt: str, n: int = 8, guidance: float = 3.0, steps: int = 50,
                  seed: int = 0, sampler: str = "ddim", device: str | torch.device = "cpu") -> Tensor:
    """``n`` images (n, C, H, W) in [-1, 1] for one prompt from the pipeline saved in ``ckpt_dir``.

    What ``tinyddpm sample --prompt "a seven" --guidance 3 --ckpt DIR --out x.png`` runs.
    """
    n = check_int("n", n, low=1)
    pipe = TextToImage.load(ckpt_dir, device)
    g = torch.Generator(device=device).manual_seed(check_int("seed", seed, low=0))
    return pipe.generate([prompt] * n, guidance=guidance, steps=steps, sampler=sampler, generator=g)
