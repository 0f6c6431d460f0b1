"""Sampling a trained checkpoint: the denoiser with its conditioning and guidance wired, in chunks.

What ``tinyddpm sample`` and :meth:`tinyddpm.Checkpoint.sample` run. The checkpoint supplies the
network, its schedule and what it predicts; this module supplies the sampler's arguments (checked
once, before any work), the classifier-free-guidance wiring (eq. eq-cfg) and the chunking that keeps
memory bounded whatever the number of samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_nonneg_float
from .guidance import DEFAULT_LABEL_GUIDANCE, guided_model
from .registry import SAMPLERS, sample

if TYPE_CHECKING:  # pragma: no cover
    from ..training.checkpoint import Checkpoint


def sampler_kwargs(sampler: str, T: int, steps: int | None, eta: float | None) -> dict[str, Any]:
    """Check (sampler, steps, eta) and return the keyword arguments that sampler takes."""
    check_choice("sampler", sampler, SAMPLERS)
    params = inspect.signature(SAMPLERS[sampler]).parameters
    kwargs: dict[str, Any] = {}
    if "steps" in params:
        kwargs["steps"] = check_int("steps", min(50, T) if steps is None else steps, low=1, high=T)
    elif steps is not None and check_int("steps", steps, low=1) != T:
        raise ValueError(f"sampler {sampler!r} always takes all T = {T} steps; use 'ddim' for fewer")
    if eta is not None:
        eta = check_nonneg_float("eta", eta)
        if "eta" in params:
            kwargs["eta"] = eta
        elif eta != 0:
            raise ValueError(f"sampler {sampler!r} takes no eta; samplers with eta: "
                             + ", ".join(k for k, f in SAMPLERS.items() if "eta" in inspect.signature(f).parameters))
    return kwargs


def checkpoint_denoiser(
    ckpt: Checkpoint, y: int | Tensor | None = None, guidance: float | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``model(x_t, t)`` for the samplers.

    A conditional model gets class ``y`` (int or (B,) labels) with classifier-free guidance weight
    ``guidance`` (eq. eq-cfg; default :data:`~tinyddpm.sampling.guidance.DEFAULT_LABEL_GUIDANCE`,
    the CLI's default too; 1 = plain conditional), or the null label when y is None.
    """
    model, num_classes = ckpt.model, ckpt.num_classes
    if num_classes is None:
        if y is not None:
            raise ValueError("this model is unconditional; it takes no class label")
        return lambda x, t: model(x, t)
    if y is None:   # the null label, made once per device (no copy inside the sampling loop)
        null: dict[torch.device, Tensor] = {}

        def unconditional(x: Tensor, t: Tensor) -> Tensor:
            if x.device not in null:
                null[x.device] = torch.full((1,), num_classes, dtype=torch.long, device=x.device)
            return model(x, t, y=null[x.device].expand(x.shape[0]))

        return unconditional
    w = DEFAULT_LABEL_GUIDANCE if guidance is None else guidance
    return guided_model(model, y, w, num_classes=num_classes)


def sample_chunks(
    ckpt: Checkpoint, n: int, *, sampler: str = "ddim", steps: int | None = None, eta: float | None = None,
    generator: torch.Generator | None = None, batch_size: int = 256, y: int | Tensor | None = None,
    guidance: float | None = None, clip_x0: bool | None = None, device: str | torch.device | None = None,
) -> Iterator[Tensor]:
    """Draw ``n`` samples in chunks of at most ``batch_size``, yielding each chunk (on CPU).

    Memory stays bounded by the chunk size whatever ``n`` is. ``sampler`` is a name from
    :data:`tinyddpm.SAMPLERS`; ``steps`` defaults to min(50, T) (all T for "ddpm"); ``eta`` goes to
    samplers that take it. ``y`` may be an int or (n,) labels. One ``generator`` runs through the
    chunks, so (its seed, batch_size) fixes the result. Images are clipped to [-1, 1] through x̂_0
    unless ``clip_x0=False``.
    """
    n, batch_size = check_int("n", n, low=1), check_int("batch_size", batch_size, low=1)
    kwargs = sampler_kwargs(sampler, ckpt.schedule.T, steps, eta)
    if isinstance(y, Tensor) and y.ndim == 1 and y.shape[0] != n:
        raise ValueError(f"got {y.shape[0]} labels for n = {n} samples")
    device = torch.device(device) if device is not None else next(ckpt.model.parameters()).device
    clip = bool(ckpt.data.get("is_image", False)) if clip_x0 is None else clip_x0
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        yy = y[start:start + b] if isinstance(y, Tensor) and y.ndim == 1 else y
        x = sample(sampler, checkpoint_denoiser(ckpt, yy, guidance), ckpt.schedule, (b, *ckpt.sample_shape),
                   generator=generator, prediction=ckpt.prediction, clip_x0=clip, device=device, **kwargs)
        if clip:   # the samplers end on a clipped x̂_0 up to float round-off (ODE solvers: |x| ≤ 1 + 1e-7)
            x = x.clamp(-1.0, 1.0)
        yield x.float().cpu()
