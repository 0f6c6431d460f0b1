"""Small trained models on demand: train once (deterministically, on CPU), cache, load afterwards.

The book's sampling chapters need trained networks but the machines that build it have no
internet, so nothing is downloaded: ``load_or_train("digits")`` trains the recipe the first time
(a few CPU-minutes at most) and caches the checkpoint in
``cache_dir("models")/<recipe>-<hash>``; the hash covers every setting of the recipe, so changing
a recipe retrains instead of loading a stale model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from .atomic import write_dir_atomic
from .checks import check_choice
from .training.checkpoint import Checkpoint, list_checkpoints, load_checkpoint
from .training.config import DiffusionConfig, TrainConfig

# bump to invalidate every cached model (e.g. after a change in the training loop);
# 3: the Trainer with objectives, periodic checkpoints and a precision setting
RECIPE_FORMAT = 3


@dataclass(frozen=True)
class Recipe:
    """Dataset + model preset (+ overrides) + diffusion and training configs: a reproducible model."""

    data: str
    preset: str
    diffusion: DiffusionConfig
    train: TrainConfig
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    conditional: bool = False
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECIPE_FORMAT, "data": self.data, "preset": self.preset, "conditional": self.conditional,
                "model_overrides": dict(self.model_overrides), "diffusion": self.diffusion.to_dict(),
                "train": self.train.to_dict()}

    def digest(self) -> str:
        """A short hash of everything that determines the trained weights."""
        d = self.to_dict()
        # not weight-shaping (progress, log_every, num_workers), or added later at a default that leaves the
        # weights as they were (hflip=False): left out so that earlier caches stay valid
        d["train"] = {k: v for k, v in d["train"].items()
                      if k not in ("progress", "log_every", "num_workers") and not (k == "hflip" and v is False)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# Sized for ~3 CPU-minutes of training (one thread): a 0.18 M-parameter UNet (16 base channels, no attention
# at 8×8), 2,000 steps of 64 digits at lr 4e-3, min-SNR-5 weighting (one step costs 60-130 CPU-ms on the
# 2-core CI machine, which varies that much). The digits model predicts v (eq. eq-v): at the same budget,
# network and sampler it beat ε-prediction in FD at every seed measured (benchmarks/digits_recipe.py,
# 1,000 DDIM-50 samples; benchmarks/README.md has the equal-budget table and the seed spread).
_DIGITS_TRAIN = TrainConfig(
    steps=2000, batch_size=64, lr=4e-3, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0, ema_decay=0.995,
    weighting="min_snr", seed=0, device="cpu", log_every=100, progress=False, keep_last=1,
)
_DIGITS_MODEL: Mapping[str, Any] = MappingProxyType({"base_channels": 16, "attention_levels": ()})

RECIPES: Mapping[str, Recipe] = MappingProxyType({
    "digits": Recipe(
        "digits", "digits-tiny", DiffusionConfig("cosine", 1000, prediction="v"), _DIGITS_TRAIN,
        model_overrides=_DIGITS_MODEL,
        description="unconditional UNet (v-prediction) on the 1,500 8×8 training digits"),
    "digits-cond": Recipe(
        "digits", "digits-tiny", DiffusionConfig("cosine", 1000), _DIGITS_TRAIN.replace(label_dropout=0.1),
        model_overrides=_DIGITS_MODEL, conditional=True,
        description="class-conditional UNet (10 % label dropout, for guidance)"),
    "toy": Recipe(
        "mixture", "toy-mlp", DiffusionConfig("linear", 1000),
        TrainConfig(steps=2000, batch_size=256, lr=2e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.995,
                    seed=0, device="cpu", log_every=100, progress=False, keep_last=1),
        description="MLP on the 2-D eight-Gaussian mixture"),
})


def recipe_dir(recipe: str, cache: str | Path | None = None) -> Path:
    """Where ``recipe`` is cached: ``<cache>/<recipe>-<hash>`` (cache defaults to cache_dir('models'))."""
    check_choice("recipe", recipe, RECIPES)
    if cache is None:
        from .cache import cache_dir

        cache = cache_dir("models")
    return Path(cache) / f"{recipe}-{RECIPES[recipe].digest()}"


def train_recipe(recipe: Recipe, out_dir: str | Path, *, progress: bool = False, steps: int | None = None) -> Path:
    """Train ``recipe`` into ``out_dir`` (no caching); returns the run directory."""
    from .data.datasets import load_dataset
    from .nets.presets import build_model, preset
    from .training.trainer import Trainer

    data = load_dataset(recipe.data, seed=recipe.train.seed)
    overrides = dict(recipe.model_overrides)
    if recipe.conditional:
        overrides["num_classes"] = data.num_classes
    kind, cfg = preset(recipe.preset, **overrides)
    config = recipe.train.replace(progress=progress) if steps is None else recipe.train.replace(progress=progress,
                                                                                                   steps=steps)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(recipe.train.seed)
        model = build_model(kind, cfg)
        trainer = Trainer(model, recipe.diffusion.build(), data, config, out_dir, recipe.diffusion)
        trainer.train()
    return Path(out_dir)


def load_or_train(recipe: str, *, cache: str | Path | None = None, progress: bool = False) -> Checkpoint:
    """The trained model of ``recipe`` (one of :data:`RECIPES`): loaded from the cache, else trained first.

    Training is deterministic (CPU, fixed seeds) and happens in a temporary directory that is renamed
    into place only when complete (:func:`tinyddpm.atomic.write_dir_atomic`), so an interrupted first
    call never leaves a half-trained model.
    """
    final = recipe_dir(recipe, cache)
    if not list_checkpoints(final):
        write_dir_atomic(final, lambda tmp: train_recipe(RECIPES[recipe], tmp, progress=progress))
    return load_checkpoint(final)
