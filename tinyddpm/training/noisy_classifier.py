"""A noise-aware classifier p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

Classifier guidance needs ∇_{x_t} log p(y | x_t) at every noise level the sampler visits, so the
classifier must read *noisy* images and know how noisy they are. :class:`NoisyClassifier` is a small
CNN that reads t through the UNet's sinusoidal time embedding (:class:`tinyddpm.nets.embeddings.TimeEmbedding`)
as a per-channel scale and shift of its features, the way the UNet's ResBlocks do.
:class:`NoisyClassificationObjective` trains it through the one :class:`tinyddpm.Trainer` on
x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε :eq:`eq-forward-closed` with t ~ U{1..T}: the cross-entropy of the clean
image's label. :func:`classifier_grad_fn` turns a trained classifier into the ``grad_fn`` that
:func:`tinyddpm.classifier_guidance` takes, by autograd.

The exact counterpart on the Gaussian-mixture oracle is
:meth:`tinyddpm.ClassMixture.class_log_prob_grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int, check_nonneg_float
from ..diffusion.schedule import NoiseSchedule
from ..nets.embeddings import TimeEmbedding
from .objectives import Batch, Objective, data_info, required_labels

GradFn = Callable[[Tensor, Tensor], Tensor]


class _TimeBlock(nn.Module):
    """conv 3×3 → GroupNorm → scale and shift from the time embedding → SiLU (a UNet ResBlock's reading of t)."""

    def __init__(self, c_in: int, c_out: int, time_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, c_out), c_out)
        self.film = nn.Linear(time_dim, 2 * c_out)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)     # (B, C, 1, 1) each
        return F.silu(self.norm(self.conv(x)) * (1 + scale) + shift)


class NoisyClassifier(nn.Module):
    """logits of p_φ(y | x_t, t) for images (B, C, H, W) at steps t (B,): integer or fractional.

    Two :class:`_TimeBlock` s (``width``, then 2·``width`` channels), 2×2 average pooling, then a
    hidden layer of ``hidden`` SiLU units and ``num_classes`` logits. SiLU rather than ReLU, so that
    the input gradient guidance follows is smooth. No batch statistics: each row's logits depend on
    that row only, so the gradient of a summed log-probability is every row's own gradient.
    """

    def __init__(self, *, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, width: int = 32,
                 hidden: int = 128, time_dim: int = 64):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.image_size = check_int("image_size", image_size, low=2)
        if self.image_size % 2:
            raise ValueError(f"image_size must be even (one 2×2 pooling); got {image_size}")
        self.num_classes = check_int("num_classes", num_classes, low=2)
        self.width, self.hidden = check_int("width", width, low=1), check_int("hidden", hidden, low=1)
        self.time_dim = check_int("time_dim", time_dim, low=2)
        self.time = TimeEmbedding(time_dim, time_dim)
        self.block1 = _TimeBlock(in_channels, width, time_dim)
        self.block2 = _TimeBlock(width, 2 * width, time_dim)
        side = image_size // 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.SiLU(), nn.Linear(hidden, num_classes))

    def to_config(self) -> dict[str, int]:
        """The constructor's arguments."""
        return {"in_channels": self.in_channels, "image_size": self.image_size, "num_classes": self.num_classes,
                "width": self.width, "hidden": self.hidden, "time_dim": self.time_dim}

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shape = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, shape))}); got {got}")
        t = _batch_t(t, x)
        emb = self.time(t)                                                  # (B, time_dim)
        h = self.block1(x, emb)                                             # (B, w, H, W)
        h = F.avg_pool2d(self.block2(h, emb), 2)                            # (B, 2w, H/2, W/2)
        return self.head(h)                                                 # (B, num_classes)


def _batch_t(t: Any, x: Tensor) -> Tensor:
    """t as a (B,) tensor on x's device: a Python number or 0-d tensor is repeated for every row."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")
    return t


class NoisyClassificationObjective(Objective):
    """Cross-entropy of the label of x_0 from x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε :eq:`eq-forward-closed`, t ~ U{1..T}.

    Draw order per step (replayable): indices and t from the CPU generator, then ε from the device
    generator, as :class:`~tinyddpm.training.objectives.DiffusionObjective` draws them. The model is
    called as ``model(x_t, t)`` and returns logits (e.g. :class:`NoisyClassifier`).
    """

    name = "noisy_classification"
    generative = False
    streams = False                      # the labels are read by index

    def __init__(self, schedule: NoiseSchedule):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule; got {type(schedule).__name__}")
        self.schedule = schedule

    def bind(self, trainer: Any) -> None:
        super().bind(trainer)
        self.labels = required_labels(trainer)

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        return {"idx": torch.randint(self.n, (B,), generator=batch_gen),
                "t": torch.randint(1, self.schedule.T + 1, (B,), generator=batch_gen),
                "noise": torch.randn((B, *self.shape), generator=noise_gen, device=noise_gen.device)}

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        x0, t = self.rows(batch), batch["t"]
        xt = self.schedule.q_sample(x0, t, batch["noise"].to(x0.dtype))     # eq. (eq-forward-closed)
        logits = net(xt, t.to(x0.device, non_blocking=True))
        return F.cross_entropy(logits.float(), self.labels[batch["idx"].to(self.labels.device)])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "T": self.schedule.T}


def train_noisy_classifier(
    data: Any, schedule: NoiseSchedule, steps: int = 400, seed: int = 0, *, batch_size: int = 128,
    lr: float = 3e-3, width: int = 16, hidden: int = 64, device: str | torch.device = "cpu",
    log: list | None = None, out_dir: str | Path | None = None,
) -> NoisyClassifier:
    """Train a :class:`NoisyClassifier` on a labelled image Dataset in [-1, 1] under ``schedule``.

    The one :class:`tinyddpm.Trainer` with :class:`NoisyClassificationObjective`: AdamW (weight decay
    0.01), ``steps`` // 20 warm-up steps, cosine decay, clipping at 1, EMA 0.99 (warmed up). The same
    seed gives the same weights on the same device. ``log`` (a list) receives (step, loss) pairs
    every 50 steps. With ``out_dir`` the run writes Trainer checkpoints of kind "noisy-classifier"
    there (:func:`tinyddpm.load_checkpoint` loads them; ``Trainer.resume(out_dir, data,
    objective=NoisyClassificationObjective(schedule))`` continues one). Returns the EMA weights, in
    eval mode, with gradients off (guidance differentiates with respect to the input only).
    """
    from ..data.datasets import Dataset
    from .config import TrainConfig
    from .trainer import Trainer

    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule; got {type(schedule).__name__}")
    steps = check_int("steps", steps, low=1)
    seed = check_int("seed", seed, low=0)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_nonneg_float("lr", lr)
    if not isinstance(data, Dataset) or getattr(data, "labels", None) is None:
        raise TypeError("data must be a labelled image Dataset (x of shape (N, C, H, W) and labels), "
                        "e.g. load_dataset('digits', split='train')")
    n, shape, _ = data_info(data)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"data must hold square images (N, C, H, W); one sample has shape {shape}")
    num_classes = int(getattr(data, "num_classes", None) or int(data.labels.max()) + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)                                             # layer initialisation only
        model = NoisyClassifier(in_channels=shape[0], image_size=shape[1], num_classes=num_classes, width=width,
                                hidden=hidden)
    device = torch.device(device)
    config = TrainConfig(
        steps=steps, batch_size=min(batch_size, n), lr=lr, warmup_steps=steps // 20, lr_schedule="cosine",
        weight_decay=0.01, grad_clip=1.0, ema_decay=0.99, seed=seed, device=device.type, precision="fp32",
        label_dropout=0.0, log_every=50 if log is not None else 0, progress=False)
    trainer = Trainer(model, schedule, data, config, out_dir, objective=NoisyClassificationObjective(schedule))
    history = trainer.train()
    if log is not None:
        log.extend((r["step"], r["loss"]) for r in history)
    return trainer.ema_model.eval().requires_grad_(False)


def _check_classifier(classifier: Any) -> int:
    if not isinstance(classifier, nn.Module) or not callable(classifier):
        raise TypeError(f"classifier must be an nn.Module called as classifier(x_t, t) -> logits; "
                        f"got {type(classifier).__name__}")
    return getattr(classifier, "num_classes", None) or 0


def _labels(y: Any, num_classes: int) -> Tensor:
    if isinstance(y, bool) or not isinstance(y, (int, Tensor)) or (
        isinstance(y, Tensor) and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim > 1)
    ):
        raise TypeError(f"y must be a class (int) or an integer tensor of shape (B,); got {y!r}")
    labels = torch.as_tensor(y, dtype=torch.long).detach().reshape(-1)
    if labels.numel() == 0 or int(labels.min()) < 0 or (num_classes and int(labels.max()) >= num_classes):
        raise ValueError(f"y must lie in [0, {num_classes - 1}]; got {y!r}")
    return labels


def classifier_grad_fn(classifier: nn.Module, y: int | Tensor) -> GradFn:
    """``grad_fn(x_t, t)`` = ∇_{x_t} log p_φ(y | x_t, t), by autograd through ``classifier(x_t, t)``.

    For :func:`tinyddpm.classifier_guidance`. ``y`` is one class or a (B,) tensor, one per row.
    Gradients are enabled inside (the samplers run under ``no_grad``); the classifier's own
    parameters are not touched. Returns x_t's shape, dtype and device; ``t`` may be integer or
    fractional steps (a (B,) tensor or a scalar).
    """
    num_classes = _check_classifier(classifier)
    labels = _labels(y, num_classes)

    def grad_fn(xt: Tensor, t: Tensor) -> Tensor:
        if labels.numel() not in (1, xt.shape[0]):
            raise ValueError(f"got {labels.numel()} labels for a batch of {xt.shape[0]}")
        param = next(classifier.parameters(), None)
        dev, dtype = (param.device, param.dtype) if param is not None else (xt.device, torch.float32)
        with torch.enable_grad():
            x = xt.detach().to(device=dev, dtype=dtype).requires_grad_(True)
            log_p = classifier(x, _batch_t(t, x)).float().log_softmax(-1)               # (B, C)
            picked = log_p.gather(1, labels.to(dev).expand(x.shape[0])[:, None])     # log p_φ(y | x_t, t)
            (grad,) = torch.autograd.grad(picked.sum(), x)                              # rows are independent
        return grad.to(device=xt.device, dtype=xt.dtype)

    return grad_fn


@torch.no_grad()
def noisy_accuracy(classifier: nn.Module, x0: Tensor, labels: Tensor, schedule: NoiseSchedule, t: int,
                   generator: torch.Generator | None = None) -> float:
    """Accuracy of argmax p_φ(y | x_t, t) on x_t = q_sample(x0, t, ε), ε drawn from ``generator``."""
    _check_classifier(classifier)
    t = check_int("t", t, low=0, high=schedule.T)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device if generator is None else generator.device)
    xt = schedule.q_sample(x0, t, noise.to(device=x0.device, dtype=x0.dtype))
    pred = classifier(xt, torch.full((x0.shape[0],), t, device=x0.device)).argmax(-1)
    return float((pred.cpu() == labels.cpu()).double().mean())


__all__ = ["NoisyClassificationObjective", "NoisyClassifier", "classifier_grad_fn", "noisy_accuracy",
           "train_noisy_classifier"]
