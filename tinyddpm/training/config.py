"""Frozen, typed configs for the diffusion process and for training (book chapter 5).

Each config validates itself on construction, so a bad value fails at the boundary with a message
that says what was expected; the dict round-trip comes from :class:`tinyddpm.config_base.Config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from ..checks import check_choice, check_int, check_nonneg_float
from ..config_base import Config
from ..diffusion.schedule import PREDICTIONS, NoiseSchedule, Prediction
from .losses import WEIGHTINGS, Weighting

ScheduleName = Literal["linear", "cosine", "scaled_linear", "sigmoid"]
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "scaled_linear", "sigmoid")
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")


def _check_unit(name: str, value: Any, *, closed_right: bool) -> float:
    """A float in [0, 1] (or [0, 1))."""
    value = check_nonneg_float(name, value)
    if value > 1 or (not closed_right and value == 1):
        raise ValueError(f"{name} must lie in [0, 1{']' if closed_right else ')'}; got {value}")
    return value


@dataclass(frozen=True)
class DiffusionConfig(Config):
    """The forward process: a named β schedule (eqs. ``eq-schedule-*``), T steps, what the network predicts.

    ``zero_terminal_snr`` rescales the schedule so that ᾱ_T = 0 (eq. :eq:`eq-zero-snr`); pair it with
    ``prediction="v"`` (an ε-network cannot recover x_0 from pure noise).
    """

    schedule: ScheduleName = "linear"
    T: int = 1000
    prediction: Prediction = "eps"
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, SCHEDULES)
        check_int("T", self.T, low=1)
        check_choice("prediction", self.prediction, PREDICTIONS)
        _check_bool("zero_terminal_snr", self.zero_terminal_snr)
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ValueError(
                "zero_terminal_snr=True makes ᾱ_T = 0, where an ε-prediction cannot recover x_0; "
                "use prediction='v' (or 'x0')"
            )

    def build(self) -> NoiseSchedule:
        """The NoiseSchedule this config describes."""
        s = getattr(NoiseSchedule, self.schedule)(T=self.T)
        return s.zero_terminal_snr() if self.zero_terminal_snr else s


@dataclass(frozen=True)
class TrainConfig(Config):
    """Everything the Trainer needs besides the model, schedule and data.

    ``steps`` is the total number of optimiser steps of the run; ``batch_size`` the *global* batch
    (split over processes under torchrun). The learning rate rises linearly over ``warmup_steps``,
    then stays constant or follows a cosine to 0. EMA (eq. :eq:`eq-ema`) starts at ``ema_start``; with
    ``ema_warmup`` its decay is min(d, (1+n)/(10+n)) after n updates. ``precision``: "auto"
    (bf16 autocast on CUDA — fp16 with a GradScaler where the GPU lacks bf16 — and fp32 on CPU),
    "fp32", "bf16" (CPU too) or "fp16" (CUDA). ``accum_steps`` splits each batch into that many
    micro-batches whose gradients add up to the full batch's. ``label_dropout`` replaces class
    labels by the null label (conditional models only, for classifier-free guidance).
    ``hflip`` mirrors each image left-right with probability 1/2 (the DDPM CIFAR-10 recipe); with it, or
    with a streamed data set, batches come from :func:`tinyddpm.data.make_batch_source` (epochs without
    replacement; ``num_workers`` decoding processes for a streamed set, default min(4, CPUs)).
    ``*_every = 0`` disables that periodic action. Checkpoints (with an out_dir) are written every
    ``ckpt_every`` steps — by default (None) every 10 % of ``steps`` — and also whenever
    ``ckpt_minutes`` have passed since the last one (0 disables the clock), and at the end.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_schedule: LRSchedule = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 0
    ema_warmup: bool = True
    seed: int = 0
    device: Device = "auto"
    precision: PrecisionName = "auto"
    compile: bool = False
    accum_steps: int = 1
    weighting: Weighting = "none"
    min_snr_gamma: float = 5.0
    label_dropout: float = 0.1
    log_every: int = 50
    sample_every: int = 0
    sample_steps: int = 20
    sample_n: int = 64
    ckpt_every: int | None = None
    ckpt_minutes: float = 5.0
    keep_last: int = 3
    progress: bool = True
    hflip: bool = False
    num_workers: int | None = None

    def __post_init__(self) -> None:
        check_int("steps", self.steps, low=0)
        check_int("batch_size", self.batch_size, low=1)
        lr = check_nonneg_float("lr", self.lr)
        if lr == 0:
            raise ValueError("lr must be > 0; got 0")
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_nonneg_float("weight_decay", self.weight_decay)
        check_nonneg_float("grad_clip", self.grad_clip)  # 0 disables clipping
        _check_unit("ema_decay", self.ema_decay, closed_right=False)
        check_int("ema_start", self.ema_start, low=0)
        _check_bool("ema_warmup", self.ema_warmup)
        check_int("seed", self.seed, low=0)
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        check_int("accum_steps", self.accum_steps, low=1)
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by accum_steps {self.accum_steps}")
        if self.num_workers is not None:
            check_int("num_workers", self.num_workers, low=0)
        for name in ("compile", "progress", "hflip"):
            _check_bool(name, getattr(self, name))
        check_choice("weighting", self.weighting, WEIGHTINGS)
        gamma = check_nonneg_float("min_snr_gamma", self.min_snr_gamma)
        if gamma == 0:
            raise ValueError("min_snr_gamma must be > 0 (min-SNR weighting uses min(SNR, γ)); got 0")
        _check_unit("label_dropout", self.label_dropout, closed_right=False)
        for name in ("log_every", "sample_every"):
            check_int(name, getattr(self, name), low=0)
        if self.ckpt_every is not None:
            check_int("ckpt_every", self.ckpt_every, low=0)
        check_nonneg_float("ckpt_minutes", self.ckpt_minutes)
        check_int("sample_steps", self.sample_steps, low=1)
        check_int("sample_n", self.sample_n, low=1)
        check_int("keep_last", self.keep_last, low=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """As :meth:`Config.from_dict`; a config saved before ``precision`` existed has ``bf16`` instead
        (True meant bf16 autocast on CUDA only, i.e. "auto"; False meant "fp32")."""
        if isinstance(d, dict) and "bf16" in d and "precision" not in d:
            d = {k: v for k, v in d.items() if k != "bf16"} | {"precision": "auto" if d["bf16"] else "fp32"}
        return super().from_dict(d)

    @property
    def checkpoint_interval(self) -> int:
        """Steps between periodic checkpoints: ``ckpt_every``, or 10 % of the run when it is None (0: never)."""
        if self.ckpt_every is not None:
            return self.ckpt_every
        return max(1, math.ceil(self.steps / 10))

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then constant or cosine."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# Fields that may change when a run is resumed: they do not affect the trajectory of the weights
# (precision and accum_steps only through round-off; steps only through a cosine lr schedule).
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"steps", "device", "compile", "progress", "log_every", "sample_every", "sample_steps", "sample_n",
     "ckpt_every", "ckpt_minutes", "keep_last", "precision", "accum_steps", "num_workers"}
)
