"""What the one Trainer minimises: an *objective* turns random draws into a batch and a batch into a loss.

The Trainer owns the loop (optimiser, warm-up and cosine, clipping, EMA, NaN stop, checkpoints and
exact resume, DDP, gradient accumulation, progress bar, log); an objective owns the data and the
loss. It works in two phases so that the Trainer can split one global batch over processes and
micro-batches without changing which random numbers are drawn:

1. ``draw(B, batch_gen, noise_gen)``: every random draw of the *global* batch of B examples, as a
   dict of tensors whose first dimension is B (indices and augmentations from the CPU generator
   ``batch_gen``, noise from ``noise_gen`` on the training device);
2. ``loss(net, batch)``: the mean loss over a slice of that dict (this process's rows, or one
   micro-batch of them), computed through ``net`` (the possibly DDP-wrapped model).

Objectives here: :class:`DiffusionObjective` (eq. :eq:`eq-loss-simple`, min-SNR, label dropout — the
default), :class:`ELBOObjective` (a VAE's negative β-ELBO, eq. :eq:`eq-vae-elbo`) and
:class:`ClassificationObjective` (cross-entropy, with optional outlier exposure). The text-to-image
objective lives in :mod:`tinyddpm.text2img`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int, check_nonneg_float
from ..diffusion.schedule import NoiseSchedule
from .losses import diffusion_loss_at

if TYPE_CHECKING:
    from .trainer import Trainer

Batch = dict[str, Tensor]


def data_info(data: Any) -> tuple[int, tuple[int, ...], int]:
    """(N, shape of one sample, bytes as float32) of a Dataset, without converting a uint8 pixel set."""
    shape = getattr(data, "shape", None)
    if isinstance(shape, tuple) and hasattr(data, "x_at"):
        n = len(data)
        return n, shape, n * math.prod(shape) * 4
    x = getattr(data, "x", None)
    if not isinstance(x, Tensor) or x.ndim < 2 or len(x) == 0:
        raise TypeError("data must be a Dataset with a non-empty tensor x of shape (N, ...)")
    return x.shape[0], tuple(x.shape[1:]), x.numel() * 4


class Objective:
    """Base class: see the module docstring. Subclasses set ``name`` and implement draw/loss."""

    name: ClassVar[str] = ""
    #: True when the trained network is a denoiser the Trainer can sample (``sample_every``)
    samples: ClassVar[bool] = False
    #: True when the network learns to generate data (a denoiser, a velocity): such a model trained on
    #: a small set reproduces it, so the Trainer warns (classifiers, CLIP and the VAE set False)
    generative: ClassVar[bool] = True
    #: True when the loss reads its images only through :meth:`rows`, so that a
    #: :class:`~tinyddpm.data.loader.BatchSource` (streaming, flips) can feed it
    streams: ClassVar[bool] = True

    def bind(self, trainer: Trainer) -> None:
        """Called once the model is on its device (and, on resume, has its weights): keep the data.

        Data under 2 GiB (as float32) moves to the device once; larger data stays where it is and
        each batch converts and copies only its own rows.
        """
        data = trainer.data
        self.n, self.shape, nbytes = data_info(data)
        self.device = trainer.device
        self.data = data
        self.x = None
        if getattr(trainer, "batch_source", None) is None and nbytes < (2 << 30):
            x = data.x_at(torch.arange(self.n)) if hasattr(data, "x_at") else data.x
            self.x = x.to(self.device, torch.float32)

    def rows(self, batch: Batch) -> Tensor:
        """The batch's images x_0 on the training device: the ones a BatchSource delivered (key
        ``"x0"``, already flipped) or rows ``batch["idx"]`` of the data."""
        return batch["x0"] if "x0" in batch else self.gather(batch["idx"])

    def gather(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` of the data, on the training device."""
        if self.x is not None:
            return self.x[idx.to(self.x.device)]
        rows = self.data.x_at(idx.cpu()) if hasattr(self.data, "x_at") else self.data.x[idx.cpu()]
        return rows.to(self.device, torch.float32, non_blocking=True)

    def network(self, model: nn.Module) -> nn.Module:
        """The module whose forward :meth:`loss` calls (and DDP wraps); the model itself by default."""
        return model

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Settings of the objective that shape the weights (recorded in config.json, checked on resume)."""
        return {"name": self.name}

    def model_entry(self, model: nn.Module) -> dict[str, Any]:
        """``{"kind", "config"}`` recorded in config.json so that :func:`build_model` can rebuild the model."""
        from .checkpoint import model_entry

        return model_entry(model)


class DiffusionObjective(Objective):
    """L_simple, eq. :eq:`eq-loss-simple`, optionally min-SNR weighted :eq:`eq-min-snr`, with label dropout.

    Draw order per step (replayable): indices, t ~ U{1..T}, the label-dropout mask (conditional
    models) from the CPU generator, then ε from the device generator. The weighting, γ and the
    dropout rate come from the Trainer's :class:`TrainConfig`.
    """

    name = "diffusion"
    samples = True

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps"):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule; got {type(schedule).__name__}")
        self.schedule, self.prediction = schedule, prediction

    def bind(self, trainer: Trainer) -> None:
        super().bind(trainer)
        cfg = trainer.config
        self.weighting, self.gamma, self.label_dropout = cfg.weighting, cfg.min_snr_gamma, cfg.label_dropout
        self.num_classes = trainer.num_classes
        model_cfg = getattr(trainer.model, "config", None)
        # a network built with a context but trained without one gets the all-zeros (unconditional) context,
        # so that every parameter takes part in the loss (DDP refuses parameters without a gradient)
        self.context_dim = model_cfg.get("context_dim") if isinstance(model_cfg, Mapping) else None
        self.labels = None
        if self.num_classes is not None:
            self.labels = trainer.data.labels.long().to(self.device)

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        out = {"idx": torch.randint(self.n, (B,), generator=batch_gen),
               "t": torch.randint(1, self.schedule.T + 1, (B,), generator=batch_gen)}
        if self.labels is not None:
            out["drop"] = torch.rand(B, generator=batch_gen) < self.label_dropout
        out["noise"] = torch.randn((B, *self.shape), generator=noise_gen, device=noise_gen.device)
        return out

    def inputs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(x_0, t, ε, y) for a slice of drawn rows; y (conditional models) has the dropped labels
        replaced by the null label ``num_classes``. t stays on the CPU (see :func:`diffusion_loss_at`:
        no device sync for the schedule lookups); the rest is on the training device."""
        x0, t = self.rows(batch), batch["t"]
        if self.labels is None:
            return x0, t, batch["noise"], None
        y = self.labels[batch["idx"].to(self.labels.device)]
        y = torch.where(batch["drop"].to(self.device), torch.full_like(y, self.num_classes), y)   # null label
        return x0, t, batch["noise"], y

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        x0, t, noise, y = self.inputs(batch)
        kwargs: dict[str, Tensor] = {"y": y} if y is not None else {}
        if self.context_dim:
            kwargs["context"] = x0.new_zeros(x0.shape[0], 1, self.context_dim)
        return diffusion_loss_at(
            net, self.schedule, x0, t, noise, prediction=self.prediction, weighting=self.weighting,
            min_snr_gamma=self.gamma, model_kwargs=kwargs,
        )


class _Reparameterised(nn.Module):
    """``forward(x, eps) = (μ, log σ², D(μ + σ ε))`` for a VAE, with ε given (drawn by the objective)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.vae.encode(x)
        return mean, logvar, self.vae.decode(mean + (0.5 * logvar).exp() * eps)   # eq. (eq-reparam)


class ELBOObjective(Objective):
    """A VAE's negative β-ELBO, eq. :eq:`eq-vae-elbo`: ‖x − D(μ + σ ε)‖² + β KL(q(z|x) ‖ N(0, I)) per image,
    averaged over the batch — the quantity :meth:`tinyddpm.nets.vae.VAE.loss` returns first.

    The model is a :class:`tinyddpm.nets.vae.VAE`; ε for the whole global batch is drawn from the
    device generator in :meth:`draw`, so any split over processes or micro-batches uses the same ε.
    """

    name = "vae_elbo"
    generative = False

    def network(self, model: nn.Module) -> nn.Module:
        return _Reparameterised(model)

    def bind(self, trainer: Trainer) -> None:
        super().bind(trainer)
        self.beta = float(trainer.model.config.beta)
        self.latent = tuple(trainer.model.latent_shape(self.shape))

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        return {"idx": torch.randint(self.n, (B,), generator=batch_gen),
                "eps": torch.randn((B, *self.latent), generator=noise_gen, device=noise_gen.device)}

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        from ..nets.vae import kl_standard_normal

        x = self.rows(batch)
        mean, logvar, x_hat = net(x, batch["eps"])
        rec = (x - x_hat.float()).pow(2).flatten(1).sum(1)
        return (rec + self.beta * kl_standard_normal(mean.float(), logvar.float())).mean()


def required_labels(trainer: Trainer) -> Tensor:
    """The data's labels as int64 on the training device; a clear error when the data has none."""
    labels = getattr(trainer.data, "labels", None)
    if labels is None:
        raise ValueError("a classification objective needs a Dataset with labels")
    return labels.long().to(trainer.device)


class ClassificationObjective(Objective):
    """Cross-entropy on labelled data, each batch shifted by up to ``shift`` pixels (zero = ``pad_value``),
    plus ``outlier_weight`` × the cross-entropy from the uniform distribution on ``outliers(n, generator)``
    images (outlier exposure, Hendrycks et al. 2019) — half as many as the batch — when given.
    """

    name = "classification"
    generative = False

    def __init__(self, *, shift: int = 1, pad_value: float = -1.0, outlier_weight: float = 0.0,
                 outliers: Callable[[int, torch.Generator], Tensor] | None = None):
        self.shift = check_int("shift", shift, low=0)
        self.pad_value = float(pad_value)
        self.outlier_weight = check_nonneg_float("outlier_weight", outlier_weight)
        if self.outlier_weight and outliers is None:
            raise ValueError("outlier_weight > 0 needs an outliers(n, generator) function")
        self.outliers = outliers

    def bind(self, trainer: Trainer) -> None:
        super().bind(trainer)
        self.labels = required_labels(trainer)

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        out = {"idx": torch.randint(self.n, (B,), generator=batch_gen),
               "shift": torch.randint(0, 2 * self.shift + 1, (B, 2), generator=batch_gen)}
        if self.outlier_weight:  # one candidate per row: a slice of n rows uses its first n // 2
            out["outliers"] = self.outliers(B, batch_gen)
        return out

    def _shifted(self, x: Tensor, shift: Tensor) -> Tensor:
        """Each image moved by its own (dy, dx) − shift, the uncovered border filled with pad_value."""
        s = self.shift
        if s == 0:
            return x
        H, W = x.shape[-2:]
        padded = F.pad(x, (s, s, s, s), value=self.pad_value)
        rows = (shift[:, 0, None] + torch.arange(H, device=x.device))            # (B, H)
        cols = (shift[:, 1, None] + torch.arange(W, device=x.device))            # (B, W)
        b = torch.arange(x.shape[0], device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        idx = batch["idx"]
        x = self._shifted(self.rows(batch), batch["shift"].to(self.device))
        n = len(idx)
        if not self.outlier_weight:
            return F.cross_entropy(net(x), self.labels[idx.to(self.labels.device)].to(self.device))
        out = batch["outliers"][: n // 2].to(self.device)
        logits = net(torch.cat([x, out]))                                         # digits, then outliers
        loss = F.cross_entropy(logits[:n], self.labels[idx.to(self.labels.device)].to(self.device))
        if len(out):
            loss = loss - self.outlier_weight * logits[n:].log_softmax(-1).mean()
        return loss

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shift": self.shift, "pad_value": self.pad_value,
                "outlier_weight": self.outlier_weight}


def slice_batch(batch: Batch, part: slice) -> Batch:
    """Rows ``part`` of every tensor of a drawn batch."""
    return {k: v[part] for k, v in batch.items()}


def split_batch(batch: Batch, n: int) -> list[Batch]:
    """``n`` consecutive micro-batches of equal size (gradient accumulation)."""
    B = len(next(iter(batch.values())))
    if B % n:
        raise ValueError(f"a batch of {B} cannot be split into {n} equal micro-batches")
    b = B // n
    return [slice_batch(batch, slice(i * b, (i + 1) * b)) for i in range(n)]


def objective_from_dict(d: dict[str, Any], model: nn.Module, schedule: NoiseSchedule | None) -> Objective:
    """Rebuild a saved objective (config.json's "objective") for :meth:`Trainer.resume`."""
    name = d.get("name")
    if name == "diffusion":
        return DiffusionObjective(schedule, d.get("prediction", "eps"))
    if name == "vae_elbo":
        return ELBOObjective()
    if name == "flow":
        from .continuous import FlowMatchingObjective

        return FlowMatchingObjective(d["time_distribution"], mean=d["mean"], std=d["std"], time_scale=d["time_scale"])
    if name == "edm":
        from .continuous import EDMObjective

        return EDMObjective(schedule, sigma_data=d["sigma_data"], p_mean=d["p_mean"], p_std=d["p_std"])
    if name == "contrastive":
        from ..clip import ContrastiveObjective

        return ContrastiveObjective(attribute_prob=d["attribute_prob"], positives=d["positives"])
    if name == "text2img":
        from ..text2img import Text2ImgObjective

        return Text2ImgObjective.from_dict(d, schedule)
    raise ValueError(f"the {name!r} objective cannot be rebuilt from config.json alone (it holds a function): "
                     "pass objective=... to Trainer.resume")


def train_vae(
    data: Any, *, config: Any = None, steps: int = 600, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
    device: str | torch.device = "cpu", log: list | None = None, out_dir: str | None = None,
) -> nn.Module:
    """Train a :class:`tinyddpm.nets.vae.VAE` on an image Dataset (or tensor) in [-1, 1] with the one Trainer
    (:class:`ELBOObjective`; AdamW without weight decay, cosine-decayed lr, no clipping), then fit its
    ``scale_factor``. The same seed gives the same weights on the same device. ``log`` (a list)
    receives one (step, loss) tuple every 100 steps; ``out_dir`` keeps Trainer checkpoints (kind "vae").
    The returned VAE is in eval mode with gradients off: in latent diffusion it stays frozen.
    """
    from ..data.datasets import Dataset
    from ..nets.vae import VAE, VAEConfig
    from .config import TrainConfig
    from .trainer import Trainer

    config = VAEConfig() if config is None else config
    steps, batch_size = check_int("steps", steps, low=1), check_int("batch_size", batch_size, low=1)
    if isinstance(data, Tensor):
        data = Dataset(data.float()) if data.ndim == 4 else data
    if not isinstance(data, Dataset) or len(data_info(data)[1]) != 3:
        raise TypeError("data must be an image Dataset (with .x of shape (N, C, H, W)) or such a tensor")
    n, shape, _ = data_info(data)
    if shape[0] != config.in_channels:
        raise ValueError(f"data has {shape[0]} channels but config.in_channels = {config.in_channels}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VAE(config)
    device = torch.device(device)
    train = TrainConfig(steps=steps, batch_size=min(batch_size, n), lr=lr, warmup_steps=0, lr_schedule="cosine",
                        grad_clip=0.0, seed=seed, device=device.type, precision="fp32", label_dropout=0.0,
                        log_every=100, progress=False, keep_last=1)
    trainer = Trainer(vae, None, data, train, out_dir, objective=ELBOObjective())
    history = trainer.train()
    if log is not None:
        log.extend((r["step"] - 1, r["loss"]) for r in history if (r["step"] - 1) % 100 == 0)
    vae = trainer.model.eval().requires_grad_(False)
    vae.fit_scale_factor(data.x.to(vae.scale_factor.device), torch.Generator(vae.scale_factor.device).manual_seed(seed))
    return vae
