"""Words → context: a word-level tokenizer, a small transformer text encoder, digit captions (ch. 9).

Stable Diffusion's text encoder (CLIP) maps a prompt to a context [B, K, E] (K = 77 tokens,
E = 768); ours does the same with K = 8 and E = 64: the text tower of the tiny CLIP
(:mod:`tinyddpm.nets.clip`), frozen, or (``Text2ImgConfig(text_encoder="joint")``) trained jointly
with the denoiser. Captions come from the digit's label and from two attributes we measure on the
image itself: ink mass (stroke thickness) and slant (from the second moments of the ink).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..checks import check_int
from ..config_base import Config
from .attention import TransformerBlock

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = 0, 1, 2, 3
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS: tuple[str, ...] = (
    "a handwritten {word}", "the digit {d}", "{d}", "number {word}", "a {word}", "{word}", "the number {d}",
)
ATTRIBUTE_PHRASINGS: tuple[str, ...] = (
    "a {adj} {word}", "a {adj} {d}", "a {adj} handwritten {word}", "the {adj} digit {d}",
)
ATTRIBUTE_WORDS: tuple[str, ...] = ("thick", "thin", "slanted")
_WORD = re.compile(r"[a-z0-9]+")


def split_words(prompt: str) -> list[str]:
    """Lower-case the prompt and keep runs of letters and digits: "A Seven!" → ["a", "seven"]."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str; got {type(prompt).__name__}")
    return _WORD.findall(prompt.lower())


@dataclass(frozen=True)
class Tokenizer:
    """Word-level tokenizer: ``<bos> w_1 ... w_n <eos> <pad> ...``, always exactly K = ``max_length`` ids.

    A prompt with more than K - 2 words is truncated (with a warning); unknown words map to
    ``<unk>`` and a prompt whose words are all unknown warns, since it carries no information.
    The empty prompt "" encodes to ``<bos> <eos>``: the unconditional input of guidance.
    """

    vocab: tuple[str, ...]
    max_length: int = 8

    def __post_init__(self):
        if tuple(self.vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with the special tokens {SPECIAL_TOKENS}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab has duplicate entries")
        check_int("max_length", self.max_length, low=3)
        object.__setattr__(self, "vocab", tuple(self.vocab))
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.vocab)})

    @classmethod
    def from_texts(cls, texts: Sequence[str], max_length: int = 8) -> Tokenizer:
        """Vocabulary = the special tokens, then every word of ``texts`` in sorted order."""
        words = sorted({w for t in texts for w in split_words(t)})
        return cls(SPECIAL_TOKENS + tuple(words), max_length)

    @classmethod
    def for_digits(cls, max_length: int = 8) -> Tokenizer:
        """The vocabulary of every caption :func:`digit_caption` can write."""
        texts = [p.format(word=w, d=d, adj=a) for d, w in enumerate(DIGIT_WORDS)
                 for p in PHRASINGS + ATTRIBUTE_PHRASINGS for a in ATTRIBUTE_WORDS]
        return cls.from_texts(texts, max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids (B, K) long and the padding mask (B, K) bool (True = a real token)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        K = self.max_length
        ids = torch.full((len(prompts), K), PAD, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = split_words(prompt)
            if len(words) > K - 2:
                warnings.warn(f"prompt {prompt!r} has {len(words)} words; keeping the first {K - 2} "
                              f"(max_length={K} includes <bos> and <eos>)", stacklevel=2)
                words = words[: K - 2]
            tok = [self._index.get(w, UNK) for w in words]
            if tok and all(i == UNK for i in tok):
                warnings.warn(f"no word of prompt {prompt!r} is in the vocabulary; it is all <unk> and "
                              f"will act like an unconditional prompt. Known words include: "
                              f"{', '.join(self.vocab[4:14])}, ...", stacklevel=2)
            seq = [BOS, *tok, EOS]
            ids[b, : len(seq)] = torch.tensor(seq)
        return ids, ids != PAD

    def decode(self, ids: Tensor) -> list[str]:
        """Ids (B, K) → prompts, dropping the special tokens (``<unk>`` is kept visible)."""
        return [" ".join(self.vocab[i] for i in row.tolist() if i not in (PAD, BOS, EOS)) for row in ids]

    def to_config(self) -> dict:
        return {"vocab": list(self.vocab), "max_length": self.max_length}

    @classmethod
    def from_config(cls, cfg: dict) -> Tokenizer:
        return cls(tuple(cfg["vocab"]), int(cfg["max_length"]))


@dataclass(frozen=True)
class TextEncoderConfig(Config):
    """Vocabulary size (0 = "set it from the tokenizer", as Text2ImgConfig's default does), context length
    K, width E, number of self-attention blocks and heads."""

    vocab_size: int
    max_length: int = 8
    dim: int = 64
    depth: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size, low=0)
        for name in ("max_length", "dim", "depth", "heads"):
            check_int(name, getattr(self, name), low=1)
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")


class TextEncoder(nn.Module):
    """Token + position embeddings → ``depth`` self-attention blocks (padding masked) → LayerNorm.

    ``forward(ids (B, K), mask (B, K)) -> context (B, K, E)``, E = ``config.dim``.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Parameter(torch.randn(config.max_length, config.dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(config.dim, None, config.heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.config.max_length:
            raise ValueError(f"ids must have shape (B, {self.config.max_length}); got {tuple(ids.shape)}")
        x = self.token_emb(ids) + self.pos_emb                      # (B, K, E)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x)

    def to_config(self) -> dict:
        return asdict(self.config)


# ---------------------------------------------------------------- attributes measured on the image
def _ink(x: Tensor) -> Tensor:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected greyscale images (B, 1, H, W) in [-1, 1]; got shape {tuple(x.shape)}")
    return ((x.float() + 1) / 2).clamp(min=0)[:, 0]                # (B, H, W), ink in [0, 1]


def measure_ink(x: Tensor) -> Tensor:
    """Stroke thickness as ink mass: the mean ink (x + 1)/2 over the pixels, in [0, 1]. Shape (B,)."""
    return _ink(x).mean(dim=(1, 2))


def measure_slant(x: Tensor) -> Tensor:
    """Slant in degrees from vertical, positive when the top leans right. Shape (B,).

    With ink weights w, column u (right) and height v (up), the central second moments
    μ_uv = E_w[(u - ū)(v - v̄)] and μ_vv = E_w[(v - v̄)²] give the least-squares line u = a v + b with
    a = μ_uv / μ_vv (the shear used to deskew digits); slant = atan(a). A vertical stroke gives 0.
    """
    w = _ink(x)
    B, H, W = w.shape
    v = -torch.arange(H, dtype=w.dtype)[:, None].expand(H, W)       # height: row 0 is the top
    u = torch.arange(W, dtype=w.dtype)[None, :].expand(H, W)
    mass = w.sum(dim=(1, 2)).clamp(min=1e-8)
    mean = lambda f: (w * f).sum(dim=(1, 2)) / mass
    ub, vb = mean(u), mean(v)
    du, dv = u - ub[:, None, None], v - vb[:, None, None]
    mu_uv, mu_vv = mean(du * dv), mean(dv * dv)
    return torch.rad2deg(torch.atan(mu_uv / mu_vv.clamp(min=1e-8)))


def attribute_labels(x: Tensor, labels: Tensor) -> tuple[list[str], list[str]]:
    """Per image, "thick"/"thin"/"" by ink-mass tercile and "slanted"/"" by slant tercile, within its class.

    Terciles are taken per digit class, so "a thick one" means thick *for a one*.
    """
    ink, slant = measure_ink(x), measure_slant(x)
    thick, lean = [""] * len(labels), [""] * len(labels)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        lo, hi = torch.quantile(ink[idx], torch.tensor([1 / 3, 2 / 3]))
        s_hi = torch.quantile(slant[idx], 2 / 3)
        for i in idx.tolist():
            thick[i] = "thick" if ink[i] > hi else "thin" if ink[i] < lo else ""
            lean[i] = "slanted" if slant[i] > s_hi else ""
    return thick, lean


def digit_caption(label: int, adjective: str = "", phrasing: int = 0) -> str:
    """One caption for a digit, e.g. (7, "", 0) → "a handwritten seven", (3, "slanted", 1) → "a slanted 3"."""
    label = check_int("label", label, low=0, high=9)
    d, word = str(label), DIGIT_WORDS[label]
    if adjective:
        if adjective not in ATTRIBUTE_WORDS:
            raise ValueError(f"adjective must be one of {ATTRIBUTE_WORDS} or ''; got {adjective!r}")
        return ATTRIBUTE_PHRASINGS[phrasing % len(ATTRIBUTE_PHRASINGS)].format(adj=adjective, word=word, d=d)
    return PHRASINGS[phrasing % len(PHRASINGS)].format(word=word, d=d)


def random_captions(
    labels: Tensor, thick: Sequence[str], lean: Sequence[str], *, generator: torch.Generator,
    attribute_prob: float = 0.5, drop_prob: float = 0.1,
) -> list[str]:
    """A fresh random caption per image: a random phrasing; with ``attribute_prob`` one of its
    attributes (if it has one); with ``drop_prob`` the empty prompt (caption dropout, for guidance)."""
    n = len(labels)
    u = torch.rand(n, 3, generator=generator)
    k = torch.randint(0, math.lcm(len(PHRASINGS), len(ATTRIBUTE_PHRASINGS)), (n,), generator=generator)
    out = []
    for i in range(n):
        adjs = [a for a in (thick[i], lean[i]) if a]
        adj = adjs[int(u[i, 1] * len(adjs))] if adjs and u[i, 0] < attribute_prob else ""
        out.append("" if u[i, 2] < drop_prob else digit_caption(int(labels[i]), adj, int(k[i])))
    return out
