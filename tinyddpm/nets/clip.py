"""A tiny CLIP: an image tower and a text tower trained contrastively on digits and their captions (ch. 9).

Radford et al. 2021 (CLIP) embed an image x and a caption c in one d-dimensional space, both
L2-normalised, and score every pair of a batch by a cosine similarity times a learned scale s = 1/τ:

    L_ij = s · ⟨f(x_i), g(c_j)⟩,   ‖f(x)‖ = ‖g(c)‖ = 1,   s = exp(min(log_scale, log 100)).

The loss is the *symmetric InfoNCE* :eq:`eq-infonce`: a cross-entropy over each row of the B×B matrix (image i must
pick its caption among the B captions) and over each column (caption j must pick its image), averaged.

Ours, at digit scale (:class:`TinyCLIP`):

- image tower: two 3×3 convs (GELU) at 8×8, 2×2 average pooling, a 3×3 conv at 4×4, then a linear
  projection of the flattened features to d (no bias);
- text tower: :class:`~tinyddpm.nets.text.TextEncoder` (token + position embeddings, *bidirectional*
  self-attention over the real tokens, LayerNorm) gives the token features (B, K, E); the caption's
  summary is their **mean over the real tokens** ``<bos> w_1 … w_n <eos>`` (``pooling="mean"``) or
  the feature at ``<eos>`` (``pooling="eos"``, where CLIP reads it), projected to d (no bias);
- s starts at 1/0.07 and is learned through log s, clamped at 100 as in CLIP.

Caption collisions. With ten digits and a few templates, a batch of 64 holds several images that a
caption describes equally well ("a 7" is true of every 7 in the batch); one-hot InfoNCE would call
all but one of them negatives and push identical captions' images apart. We use **soft targets**
(as in UniCL, Yang et al. 2022): with P the B×B matrix of positives (P_ij = 1 when caption j is
true of image i), row i's target is ``P_i· / Σ_j P_ij`` and column j's is ``P_·j / Σ_i P_ij``. By default
(``positives="meaning"``) caption j is true of image i when it names i's digit and its adjective,
if any, is one of i's measured attributes; ``positives="caption"`` counts only identical captions.
With P = I (no collisions) this is exactly CLIP's loss, :func:`clip_loss`.

Frozen and reused: the text tower's token features are the cross-attention context of the latent
pipeline (``Text2ImgConfig(text_encoder="clip")``, the default), as Stable Diffusion uses CLIP's; the cosine
of the two towers is a prompt-adherence metric, :func:`clip_score`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_choice, check_int, check_nonneg_float
from ..config_base import Config
from ..fingerprint import fingerprint  # noqa: F401  (re-exported: the text tower's hash)
from .text import (
    DIGIT_WORDS,
    EOS,
    TextEncoder,
    TextEncoderConfig,
    Tokenizer,
)

POOLINGS: tuple[str, ...] = ("mean", "eos")
POSITIVES: tuple[str, ...] = ("meaning", "caption")
#: zero-shot templates: one caption per class, "a 0" ... "a 9" (a prompt ensemble when more than one)
ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("a {d}",)


@dataclass(frozen=True)
class CLIPConfig(Config):
    """The towers (text: a :class:`TextEncoderConfig` whose vocab_size 0 is set from the tokenizer; image:
    conv ``width``), the shared ``embed_dim`` d, the pooling, the temperature, and the training run."""

    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(vocab_size=0))
    width: int = 16
    embed_dim: int = 64
    pooling: str = "mean"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    positives: str = "meaning"
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.99
    attribute_prob: float = 0.5
    seed: int = 0

    def __post_init__(self):
        for name in ("width", "embed_dim", "steps", "batch_size"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("positives", self.positives, POSITIVES)
        for name in ("init_temperature", "max_logit_scale", "lr", "ema_decay", "attribute_prob"):
            check_nonneg_float(name, getattr(self, name))
        if not 1 / self.max_logit_scale <= self.init_temperature <= 1:
            raise ValueError(f"init_temperature must lie in [1/max_logit_scale, 1] = "
                             f"[{1 / self.max_logit_scale:g}, 1]; got {self.init_temperature}")
        if self.lr == 0 or not self.ema_decay < 1 or not self.attribute_prob <= 1:
            raise ValueError("lr must be > 0, ema_decay in [0, 1) and attribute_prob in [0, 1]")

    def digest(self) -> str:
        """A short hash of the config: names the cached model."""
        return hashlib.sha256(repr(sorted(self.to_dict().items())).encode()).hexdigest()[:12]


class TinyCLIP(nn.Module):
    """Image tower f and text tower g into one unit sphere of dimension d, and a learned scale s = 1/τ.

    ``encode_image(x (B, 1, 8, 8)) -> (B, d)``, ``encode_text(ids, mask) -> (B, d)`` (unit norm),
    ``token_features(ids, mask) -> (B, K, E)`` (what a diffusion model cross-attends to) and
    ``logits(images, ids, mask) -> (B, B)`` = s · f(x_i)·g(c_j) (also ``forward``).
    """

    def __init__(self, config: CLIPConfig = CLIPConfig(), tokenizer: Tokenizer | None = None):
        super().__init__()
        tokenizer = Tokenizer.for_digits(config.text.max_length) if tokenizer is None else tokenizer
        if config.text.vocab_size == 0:
            config = config.replace(text=config.text.replace(vocab_size=len(tokenizer)))
        if len(tokenizer) != config.text.vocab_size or tokenizer.max_length != config.text.max_length:
            raise ValueError("the tokenizer's vocabulary size / max_length do not match config.text")
        self.config, self.tokenizer = config, tokenizer
        w, d = config.width, config.embed_dim
        self.image_tower = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GELU(),                   # (B, w, 8, 8)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),               # (B, 2w, 8, 8)
            nn.AvgPool2d(2),                                            # (B, 2w, 4, 4)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),           # (B, 2w, 4, 4)
            nn.Flatten(),                                               # (B, 2w·16)
        )
        self.image_proj = nn.Linear(2 * w * 16, d, bias=False)
        self.text_tower = TextEncoder(config.text)
        self.text_proj = nn.Linear(config.text.dim, d, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))

    @property
    def logit_scale(self) -> Tensor:
        """s = exp(min(log_scale, log max_logit_scale)): CLIP's 1/τ, never above 100 (zero gradient there)."""
        return self.log_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def encode_image(self, x: Tensor) -> Tensor:
        """Unit-norm image embeddings (B, d) of digits (B, 1, 8, 8) in [-1, 1]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"images must have shape (B, 1, 8, 8) in [-1, 1]; got {tuple(x.shape)}")
        return F.normalize(self.image_proj(self.image_tower(x.to(self.image_proj.weight))), dim=-1)

    def token_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The text tower's token features (B, K, E), bidirectional over the real tokens."""
        return self.text_tower(ids, mask)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Unit-norm caption embeddings (B, d): the pooled token features (mean over the real tokens, or at
        ``<eos>``), projected."""
        h = self.token_features(ids, mask)                                         # (B, K, E)
        if self.config.pooling == "mean":
            m = mask.to(h.dtype)[..., None]                                        # (B, K, 1)
            pooled = (h * m).sum(1) / m.sum(1)
        else:
            pooled = h[ids == EOS]                                                 # (B, E): one <eos> per row
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_prompts(self, prompts: str | Sequence[str]) -> Tensor:
        """Unit-norm embeddings (B, d) of prompts, tokenized with this model's tokenizer."""
        ids, mask = self.tokenizer.encode(prompts)
        dev = self.image_proj.weight.device
        return self.encode_text(ids.to(dev), mask.to(dev))

    def logits(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, B): s · cos(image i, caption j); rows are images, columns captions."""
        return self.logit_scale * self.encode_image(images) @ self.encode_text(ids, mask).T

    forward = logits

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(f(x_i), g(p_i)) for each image and its own prompt: (N,), in [-1, 1]."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        return (self.encode_image(images) * self.encode_prompts(list(prompts))).sum(-1)

    # ------------------------------------------------------------------ checkpoint kind "clip"
    def to_config(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "tokenizer": self.tokenizer.to_config()}

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> TinyCLIP:
        return cls(CLIPConfig.from_dict(c["config"]), Tokenizer.from_config(c["tokenizer"]))


def clip_loss(logits: Tensor, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE, eq. :eq:`eq-infonce`, of a (B, B) logit matrix (rows images, columns captions;
    Radford et al. 2021)::

        L = ½ [ −(1/B) Σ_i Σ_j p_ij log softmax_j(L_i·)
                −(1/B) Σ_j Σ_i q_ij log softmax_i(L_·j) ],

    with p_ij = P_ij / Σ_j P_ij, q_ij = P_ij / Σ_i P_ij for a bool matrix of positives P (default the
    identity: CLIP's one-hot targets). Every row and column of P needs a True.
    """
    B = logits.shape[0]
    if logits.ndim != 2 or logits.shape[1] != B:
        raise ValueError(f"logits must be a square (B, B) matrix; got {tuple(logits.shape)}")
    if positives is None:
        target = torch.arange(B, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    if positives.shape != logits.shape or positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool matrix of shape {tuple(logits.shape)}")
    if not (positives.any(0).all() and positives.any(1).all()):
        raise ValueError("every row and every column of positives needs at least one True")
    p = positives.to(logits.dtype)
    return 0.5 * (F.cross_entropy(logits, p / p.sum(1, keepdim=True))
                  + F.cross_entropy(logits.T, (p / p.sum(0, keepdim=True)).T))


# ---------------------------------------------------------------------- metrics
@torch.no_grad()
def class_embeddings(clip: TinyCLIP, templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> Tensor:
    """(10, d) unit vectors, one per digit: the normalised mean of the template captions' embeddings
    (``{d}`` is the numeral, ``{word}`` the word; CLIP's prompt ensembling for several templates)."""
    if isinstance(templates, str) or not templates:
        raise ValueError("templates must be a non-empty sequence of strings like 'a {d}'")
    e = torch.stack([clip.encode_prompts([t.format(d=d, word=w) for d, w in enumerate(DIGIT_WORDS)])
                     for t in templates])                                          # (T, 10, d)
    return F.normalize(e.mean(0), dim=-1)


@torch.no_grad()
def clip_zero_shot_accuracy(clip: TinyCLIP, data, templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> float:
    """Fraction of ``data``'s digits whose most similar class caption (:func:`class_embeddings`) is their label."""
    if getattr(data, "labels", None) is None:
        raise ValueError("zero-shot accuracy needs a Dataset with digit labels")
    pred = (clip.encode_image(data.x) @ class_embeddings(clip, templates).T).argmax(1)
    return float((pred.cpu() == data.labels.cpu()).double().mean())


@torch.no_grad()
def clip_score(clip: TinyCLIP, images: Tensor, prompts: str | Sequence[str]) -> float:
    """CLIP score, eq. :eq:`eq-clip-score`: mean over pairs of 100 · max(cos(f(x_i), g(p_i)), 0), the
    convention of Hessel et al. 2021 (with w = 100) and torchmetrics. One prompt (a str) is used for every image."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    return float(100 * clip.cosine(images, prompts).clamp(min=0).mean())


# ---------------------------------------------------------------------- the frozen text tower
def frozen_text_encoder(clip: TinyCLIP) -> TextEncoder:
    """A copy of ``clip``'s text tower with gradients off: token features (B, K, E) for cross-attention."""
    text = TextEncoder(clip.config.text)
    text.load_state_dict(clip.text_tower.state_dict())
    return text.to(clip.image_proj.weight.device).eval().requires_grad_(False)
