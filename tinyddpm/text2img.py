"""Stable Diffusion in miniature: text → context → cross-attention UNet on VAE latents (chapter 9).

The three parts of Rombach et al. 2022 (LDM), at digit scale:

- text encoder (a :class:`tinyddpm.TextEncoder`): prompt → context [B, K, E] (K = 8, E = 64);
- autoencoder (:class:`tinyddpm.vae.VAE`): image [B, 1, 8, 8] ↔ latent [B, 2, 4, 4];
- :class:`CrossAttnUNet`: ResBlocks read the timestep embedding, SpatialTransformers read the context.

Training (:func:`train_text2img`), by default (``Text2ImgConfig(text_encoder="clip")``) as Stable
Diffusion does it: a :class:`tinyddpm.nets.clip.TinyCLIP` is trained contrastively (symmetric
InfoNCE, eq. :eq:`eq-infonce`) and its text tower frozen; the VAE is trained and frozen; then the UNet
alone learns L_simple :eq:`eq-loss-simple` over scaled latents, cross-attending to the tower's token
features (B, K, E), with 10 % of captions replaced by the empty prompt — each stage through the one
:class:`tinyddpm.training.trainer.Trainer` (objectives ``ContrastiveObjective``,
:class:`~tinyddpm.training.objectives.ELBOObjective` and :class:`Text2ImgObjective`). The tower's
weights are stored in the pipeline and checked on load against their recorded hash, like the VAE's.
With ``text_encoder="joint"`` a fresh text encoder is instead trained *jointly* with the UNet.
The pipeline is saved as an ordinary Trainer checkpoint of model kind "text2img" (weights of all
three networks in one safetensors file, the tokenizer and configs in config.json), so
:func:`tinyddpm.load_checkpoint` loads it. Sampling (:meth:`TextToImage.generate`) guides with
the empty prompt as the unconditional input, eq. :eq:`eq-cfg`, then decodes the latent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .cache import cache_dir
from .checks import check_choice, check_int, check_nonneg_float
from .config_base import Config
from .diffusion.schedule import NoiseSchedule
from .nets.clip import CLIPConfig, TinyCLIP, fingerprint, frozen_text_encoder
from .nets.cross_attn_unet import CrossAttnUNet, CrossAttnUNetConfig
from .nets.text import TextEncoder, TextEncoderConfig, Tokenizer, attribute_labels, random_captions
from .nets.vae import VAE, VAEConfig
from .sampling.guidance import DEFAULT_PROMPT_GUIDANCE, cfg_model
from .sampling.registry import SAMPLERS, sample
from .training.config import DiffusionConfig, TrainConfig
from .training.losses import diffusion_loss_at
from .training.objectives import Batch, Objective

FORMAT_VERSION = 2  # 2: trained by the one Trainer, saved as a Trainer checkpoint of kind "text2img"
TEXT_ENCODERS: tuple[str, ...] = ("joint", "clip")


@dataclass(frozen=True)
class Text2ImgConfig(Config):
    """Everything :func:`train_text2img` needs; saved with the pipeline.

    ``text_encoder``: "clip" (the default, as in Stable Diffusion) uses the frozen text tower of a
    :class:`TinyCLIP` trained contrastively with ``clip`` (then ``text`` is replaced by the tower's
    config, and ``unet.context_dim`` must equal ``clip.text.dim``); "joint" trains a
    :class:`TextEncoder` of shape ``text`` with the UNet. A saved config without a ``text_encoder`` key
    predates the choice and reads as "joint" (:meth:`from_dict`).
    """

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
    text_encoder: str = "clip"
    clip: CLIPConfig = field(default_factory=CLIPConfig)

    def __post_init__(self):
        check_choice("text_encoder", self.text_encoder, TEXT_ENCODERS)
        if self.text_encoder == "joint" and self.clip != CLIPConfig():
            raise ValueError("clip settings are used only with text_encoder='clip'")
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
        if self.text_encoder == "clip" and self.unet.context_dim != self.clip.text.dim:
            raise ValueError(f"unet.context_dim ({self.unet.context_dim}) must equal clip.text.dim "
                             f"({self.clip.text.dim})")
        if self.text_encoder == "joint" and self.unet.context_dim != self.text.dim:
            raise ValueError(f"unet.context_dim ({self.unet.context_dim}) must equal text.dim ({self.text.dim})")

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Config.to_dict`, without ``text_encoder`` and ``clip`` for joint training: a joint
        config (its digest, its cached pipeline, its checkpoints) reads exactly as before they existed."""
        d = super().to_dict()
        if self.text_encoder == "joint":
            del d["text_encoder"], d["clip"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Text2ImgConfig:
        """As :meth:`Config.from_dict`; a dict without ``text_encoder`` (written by :meth:`to_dict` for joint
        training, or before the key existed) is a jointly trained pipeline's."""
        if isinstance(d, dict) and "text_encoder" not in d:
            d = {**d, "text_encoder": "joint"}
        return super().from_dict(d)

    def digest(self) -> str:
        """A short hash of the config and the training code's version: names the cached pipeline."""
        d = {**self.to_dict(), "format_version": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def train_config(self, device: str = "cpu", progress: bool = False) -> TrainConfig:
        """The Trainer settings of the UNet + text-encoder stage: AdamW, 100 warm-up steps, cosine, clip 1."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=min(100, self.steps),
                           lr_schedule="cosine", grad_clip=1.0, ema_decay=self.ema_decay, seed=self.seed,
                           device=device, precision="fp32", label_dropout=0.0, log_every=100, progress=progress,
                           keep_last=1)


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
        self._fingerprint: str | None = None  # the VAE hash recorded in a checkpoint (set by from_config)
        self._text_fingerprint: str | None = None  # the frozen text tower's hash (text_encoder="clip")

    @property
    def frozen_text(self) -> bool:
        """Whether the text encoder is a frozen CLIP text tower (``config.text_encoder == "clip"``)."""
        return self.config is not None and self.config.text_encoder == "clip"

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """Prompts → (context (B, K, E), mask (B, K)); "" is the empty (unconditional) prompt."""
        ids, mask = self.tokenizer.encode(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.text_encoder(ids, mask), mask

    def guided_denoiser(self, prompts: list[str], guidance: float, negative_prompts: str | list[str] = ""):
        """model(z_t, t) = ε_u + w (ε_c - ε_u), eq. :eq:`eq-cfg`, with ε_u from the empty prompt — or from a
        *negative prompt* n, eq. :eq:`eq-negative-prompt`, so that guidance pushes away from what n
        describes (e.g. "thick").

        The package's one guidance batcher, :func:`tinyddpm.sampling.guidance.cfg_model`: both halves
        run in one forward pass on the doubled batch [z_t; z_t] (one half only for w = 1 or w = 0).
        """
        check_nonneg_float("guidance", guidance)
        B = len(prompts)
        negative = [negative_prompts] * B if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negative) != B:
            raise ValueError(f"got {len(negative)} negative prompts for {B} prompts (pass one string for all)")
        ctx, mask = self.encode_prompts(list(prompts) + negative)
        return cfg_model(self.unet, {"context": ctx[:B], "mask": mask[:B]}, {"context": ctx[B:], "mask": mask[B:]},
                         guidance)

    @torch.no_grad()
    def generate(self, prompts: str | list[str], *, guidance: float = DEFAULT_PROMPT_GUIDANCE, steps: int = 50,
                 sampler: str = "ddim", generator: torch.Generator | None = None,
                 return_latents: bool = False, negative_prompts: str | list[str] = "") -> Tensor:
        """Images (B, C, H, W) in [-1, 1] for the prompts: sample a latent with ``sampler``, decode it.
        ``negative_prompts`` replace the empty prompt in the unconditional branch of guidance,
        eq. :eq:`eq-negative-prompt`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("pass at least one prompt")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {sampler!r}")
        was_training = self.training
        self.eval()
        model = self.guided_denoiser(prompts, guidance, negative_prompts)
        kw = {} if sampler == "ddpm" else {"steps": check_int("steps", steps, low=1, high=self.schedule.T)}
        z = sample(sampler, model, self.schedule, (len(prompts), *self.latent_shape), generator=generator,
                   device=self.device, prediction=self.config.diffusion.prediction if self.config else "eps", **kw)
        self.train(was_training)
        return z if return_latents else self.vae.from_latent(z).clamp(-1, 1)

    # ------------------------------------------------------------------ training forward
    def forward(self, z_t: Tensor, t: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """ε̂(z_t, t, prompt): the text encoder reads the token ids, the UNet the context (what training calls)."""
        return self.unet(z_t, t, self.text_encoder(ids, mask), mask)

    # ------------------------------------------------------------------ checkpoint kind "text2img"
    def to_config(self) -> dict[str, Any]:
        """Everything but the weights: rebuilds this pipeline with :meth:`from_config` (JSON values only)."""
        c = {
            "format_version": FORMAT_VERSION, "image_shape": list(self.image_shape),
            "latent_shape": list(self.latent_shape), "vae_fingerprint": self._fingerprint or self.vae.fingerprint(),
            "tokenizer": self.tokenizer.to_config(), "text_encoder": self.text_encoder.config.to_dict(),
            "unet": self.unet.config.to_dict(), "vae": self.vae.config.to_dict(),
            "schedule": self.schedule.to_config(), "config": self.config.to_dict() if self.config else None,
        }
        if self.frozen_text:
            c["text_fingerprint"] = self._text_fingerprint or fingerprint(self.text_encoder)
        return c

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> TextToImage:
        """A pipeline of the recorded shape with fresh weights; loading the weights then runs :meth:`verify_weights`."""
        if c.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"text2img pipeline format {c.get('format_version')!r}, expected {FORMAT_VERSION}: "
                             "retrain it with this version of tinyddpm")
        vae = VAE(VAEConfig.from_dict(c["vae"])).requires_grad_(False)
        pipe = cls(Tokenizer.from_config(c["tokenizer"]), TextEncoder(TextEncoderConfig.from_dict(c["text_encoder"])),
                   CrossAttnUNet(CrossAttnUNetConfig.from_dict(c["unet"])), vae,
                   NoiseSchedule.from_config(c["schedule"]), tuple(c["image_shape"]),
                   Text2ImgConfig.from_dict(c["config"]) if c.get("config") else None)
        if list(vae.latent_shape(pipe.image_shape)) != list(c["latent_shape"]):
            raise ValueError(f"the VAE makes latents {vae.latent_shape(pipe.image_shape)} but the UNet was trained on "
                             f"{tuple(c['latent_shape'])}")
        pipe._fingerprint = c["vae_fingerprint"]
        if c.get("text_fingerprint"):                         # a frozen CLIP text tower: no gradient, ever
            pipe.text_encoder.requires_grad_(False)
            pipe._text_fingerprint = c["text_fingerprint"]
        return pipe

    def verify_weights(self) -> None:
        """After loading weights: the VAE must be the one the UNet was trained with (its recorded hash)."""
        if self._fingerprint is not None and self.vae.fingerprint() != self._fingerprint:
            raise ValueError(f"the VAE is not the one the UNet was trained with (weights hash "
                             f"{self.vae.fingerprint()} != recorded {self._fingerprint}); its latents mean "
                             f"something else to the UNet — retrain the UNet or restore that VAE")
        if self._text_fingerprint is not None and fingerprint(self.text_encoder) != self._text_fingerprint:
            raise ValueError(f"the text encoder is not the frozen CLIP text tower the UNet was trained with (weights "
                             f"hash {fingerprint(self.text_encoder)} != recorded {self._text_fingerprint})")

    def save(self, directory: str | Path, *, step: int = 0) -> Path:
        """Write ``directory`` as a checkpoint run directory (kind "text2img"), atomically; returns the step dir."""
        from .training.checkpoint import model_entry, save_checkpoint

        config = {"format": 1, "step": step, "model": model_entry(self), "schedule": self.schedule.to_config(),
                  "diffusion": self.config.diffusion.to_dict() if self.config else None, "train": None,
                  "data": {"name": "custom", "shape": list(self.image_shape), "is_image": True}}
        return save_checkpoint(directory, step=step, model=self, ema_model=self, config=config,
                               state={"step": step}, keep_last=1)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TextToImage:
        """The pipeline in a checkpoint (run dir or step dir; EMA weights), via :func:`tinyddpm.load_checkpoint`."""
        from .training.checkpoint import load_checkpoint

        ck = load_checkpoint(directory, device=device)
        if ck.model_kind != "text2img":
            raise ValueError(f"{ck.path} holds a {ck.model_kind!r} model, not a text-to-image pipeline")
        return ck.model


class Text2ImgObjective(Objective):
    """L_simple :eq:`eq-loss-simple` on scaled VAE latents z_0 ~ q(z | x), with the UNet reading the text
    encoder's context of a fresh random caption per image (``caption_dropout`` of them empty).

    Per step: indices, captions and t from the CPU generator; the posterior draw and ε from the
    device generator. The model is a :class:`TextToImage` whose VAE is frozen.
    """

    name = "text2img"
    streams = False  # captions are drawn per dataset row in draw(), before any BatchSource

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps", *, caption_dropout: float = 0.1,
                 attribute_prob: float = 0.5):
        self.schedule, self.prediction = schedule, prediction
        self.caption_dropout = check_nonneg_float("caption_dropout", caption_dropout)
        self.attribute_prob = check_nonneg_float("attribute_prob", attribute_prob)

    @classmethod
    def from_dict(cls, d: dict[str, Any], schedule: NoiseSchedule) -> Text2ImgObjective:
        return cls(schedule, d["prediction"], caption_dropout=d["caption_dropout"], attribute_prob=d["attribute_prob"])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prediction": self.prediction, "caption_dropout": self.caption_dropout,
                "attribute_prob": self.attribute_prob}

    def bind(self, trainer) -> None:
        pipe, data = trainer.model, trainer.data
        if not isinstance(pipe, TextToImage):
            raise TypeError(f"the text2img objective trains a TextToImage; got {type(pipe).__name__}")
        if getattr(data, "labels", None) is None or not getattr(data, "is_image", False):
            raise ValueError("text-to-image training needs an image Dataset with digit labels "
                             "(e.g. load_dataset('digits'))")
        self.device, self.tokenizer = trainer.device, pipe.tokenizer
        x = data.x.to(self.device, torch.float32)
        with torch.no_grad():                                   # the frozen VAE: q(z | x) once for the whole set
            self.mean, logvar = pipe.vae.encode(x)
            self.std, self.scale = (0.5 * logvar).exp(), pipe.vae.scale_factor.detach().clone()
        self.labels = data.labels.cpu()
        self.thick, self.lean = attribute_labels(x.cpu(), self.labels)

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        idx = torch.randint(len(self.labels), (B,), generator=batch_gen)
        rows = idx.tolist()
        captions = random_captions(self.labels[idx], [self.thick[i] for i in rows], [self.lean[i] for i in rows],
                                   generator=batch_gen, attribute_prob=self.attribute_prob,
                                   drop_prob=self.caption_dropout)
        ids, mask = self.tokenizer.encode(captions)
        t = torch.randint(1, self.schedule.T + 1, (B,), generator=batch_gen)
        shape = (B, *self.mean.shape[1:])
        return {"idx": idx, "ids": ids, "mask": mask, "t": t,
                "eps_z": torch.randn(shape, generator=noise_gen, device=noise_gen.device),
                "noise": torch.randn(shape, generator=noise_gen, device=noise_gen.device)}

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        idx = batch["idx"].to(self.device)
        z0 = (self.mean[idx] + self.std[idx] * batch["eps_z"]) * self.scale       # a draw from q(z | x), scaled
        return diffusion_loss_at(net, self.schedule, z0, batch["t"], batch["noise"],   # t on the CPU: no sync
                                 prediction=self.prediction,
                                 model_kwargs={"ids": batch["ids"].to(self.device),
                                               "mask": batch["mask"].to(self.device)})


# ---------------------------------------------------------------------- training and the recipe
def text2img_trainer(data, config: Text2ImgConfig = Text2ImgConfig(), *, device: str | torch.device = "cpu",
                     out_dir: str | Path | None = None, progress: bool = False, clip: TinyCLIP | None = None):
    """Train the VAE (its own short Trainer run), freeze it, and return the Trainer of the second stage:
    UNet + text encoder inside a :class:`TextToImage`, objective :class:`Text2ImgObjective`.

    With ``config.text_encoder == "clip"`` the text encoder is ``clip``'s text tower, frozen (``clip``
    defaults to :func:`tinyddpm.clip.train_clip` on ``data`` with ``config.clip``; a given one's
    config is recorded as ``config.clip``)."""
    from .training.objectives import train_vae
    from .training.trainer import Trainer

    if getattr(data, "labels", None) is None or not getattr(data, "is_image", False):
        raise ValueError("train_text2img needs an image Dataset with digit labels (e.g. load_dataset('digits'))")
    device = torch.device(device)
    if clip is not None and config.text_encoder != "clip":
        raise ValueError("a clip was given but config.text_encoder is 'joint': set text_encoder='clip'")
    if config.text_encoder == "clip":
        if clip is None:
            from .clip import train_clip

            clip = train_clip(data, config.clip, device=device)
        config = config.replace(clip=clip.config, text=clip.config.text)
        tokenizer, text = clip.tokenizer, frozen_text_encoder(clip)
    else:
        tokenizer = Tokenizer.for_digits(config.text.max_length)
        config = config.replace(text=config.text.replace(vocab_size=len(tokenizer)))
    vae = train_vae(data, config=config.vae, steps=config.vae_steps, seed=config.seed, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        if config.text_encoder == "clip":
            unet = CrossAttnUNet(config.unet)
        else:
            text, unet = TextEncoder(config.text), CrossAttnUNet(config.unet)
    schedule = config.diffusion.build()
    pipe = TextToImage(tokenizer, text, unet, vae, schedule, tuple(data.x.shape[1:]), config)
    if config.text_encoder == "clip":
        pipe._text_fingerprint = fingerprint(text)
    objective = Text2ImgObjective(schedule, config.diffusion.prediction, caption_dropout=config.caption_dropout,
                                  attribute_prob=config.attribute_prob)
    return Trainer(pipe, schedule, data, config.train_config(device.type, progress), out_dir, config.diffusion,
                   objective=objective)


def train_text2img(data, config: Text2ImgConfig = Text2ImgConfig(), *, device: str | torch.device = "cpu",
                   log: list | None = None, out_dir: str | Path | None = None, progress: bool = False,
                   clip: TinyCLIP | None = None) -> TextToImage:
    """Train the VAE, freeze it, then the UNet alone on captioned latents, reading ``clip``'s frozen text
    tower (``config.text_encoder == "clip"``, the default; ``clip`` is trained first when not given), or
    the UNet and a text encoder jointly (``"joint"``); one Trainer per stage.

    ``data``: an image Dataset with digit labels in 0..9 (captions are written from them and from
    the measured attributes). Deterministic per ``config.seed`` on a given device. ``log`` receives
    (step, loss) every 100 steps. With ``out_dir`` the second stage writes Trainer checkpoints of
    kind "text2img" there; ``Trainer.resume(out_dir, data).train()`` continues an interrupted run.
    Returns the pipeline with the EMA weights, in eval mode.
    """
    trainer = text2img_trainer(data, config, device=device, out_dir=out_dir, progress=progress, clip=clip)
    history = trainer.train()
    if log is not None:
        log.extend((r["step"] - 1, r["loss"]) for r in history if (r["step"] - 1) % 100 == 0)
    return trainer.ema_model.eval().requires_grad_(False)


def load_or_train_text2img(config: Text2ImgConfig = Text2ImgConfig(), *, cache: str | Path | None = None,
                           device: str | torch.device = "cpu") -> TextToImage:
    """The digits text-to-image pipeline for ``config``: loaded from the cache, or trained (CPU:
    a few minutes) on ``load_dataset("digits", split="train")`` into a temporary directory that is
    renamed into place when complete (:func:`tinyddpm.atomic.write_dir_atomic`). With
    ``text_encoder="clip"`` the CLIP comes from :func:`tinyddpm.clip.load_or_train_clip` (same cache)."""
    from .atomic import write_dir_atomic
    from .data.datasets import load_dataset
    from .training.checkpoint import list_checkpoints

    root = Path(cache) if cache is not None else cache_dir("models")
    directory = root / f"text2img-digits-{config.digest()}"
    if not list_checkpoints(directory):
        data = load_dataset("digits", split="train")
        clip = None
        if config.text_encoder == "clip":
            from .clip import load_or_train_clip

            clip = load_or_train_clip(config.clip, cache=cache, device=device)
        write_dir_atomic(directory, lambda tmp: train_text2img(data, config, device=device, out_dir=tmp, clip=clip))
    return TextToImage.load(directory, device)


def is_text2img_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (run dir or step dir) holds a text-to-image pipeline (reads config.json only)."""
    from .training.checkpoint import read_config, resolve_checkpoint

    try:
        return read_config(resolve_checkpoint(path))["model"]["kind"] == "text2img"
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False


def sample_prompt(ckpt_dir: str | Path, prompt: str, n: int = 8, guidance: float = DEFAULT_PROMPT_GUIDANCE,
                  steps: int = 50, generator: torch.Generator | None = None, sampler: str = "ddim",
                  device: str | torch.device = "cpu", negative_prompt: str = "") -> Tensor:
    """``n`` images (n, C, H, W) in [-1, 1] for one prompt from the pipeline saved in ``ckpt_dir``.

    What ``tinyddpm sample --prompt "a seven" --negative-prompt thick --guidance 3 --ckpt DIR --out x.png`` runs.
    """
    n = check_int("n", n, low=1)
    pipe = TextToImage.load(ckpt_dir, device)
    return pipe.generate([prompt] * n, guidance=guidance, steps=steps, sampler=sampler, generator=generator,
                         negative_prompts=negative_prompt)
