"""Sampling a trained checkpoint: the denoiser with its conditioning and guidance wired, in chunks.

What ``tinyddpm sample`` and :meth:`tinyddpm.Checkpoint.sample` run. The checkpoint supplies the
network, its schedule, what it predicts and the objective it was trained with; this module supplies
the sampler's arguments (checked once, before any work), the classifier-free-guidance wiring (eq.
:eq:`eq-cfg`) and the chunking that keeps memory bounded whatever the number of samples.

The objective decides which samplers fit (:data:`DEFAULT_SAMPLERS`):

- ``"diffusion"`` (ε, x_0 or v network): every VP sampler of :data:`tinyddpm.SAMPLERS`; DDIM by default;
- ``"edm"`` (EDM-preconditioned network, eq. :eq:`eq-edm-precond`): wrapped as an ε-model, so every VP
  sampler works (EDM's own Heun included); DDIM by default;
- ``"flow"`` (a velocity network, eq. :eq:`eq-flow-target`): the ODE solvers of :func:`tinyddpm.flow_sample`,
  ``"euler"`` (default) or ``"heun"``.

Default steps give about 50 network calls: 50 steps, or 25 for the two-call Heun steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_nonneg_float
from .flow import FLOW_SOLVERS, flow_sample
from .guidance import DEFAULT_LABEL_GUIDANCE, guided_model
from .registry import SAMPLERS, sample

#: the sampler ``tinyddpm sample`` uses when none is given, per training objective
# Measured on digits at 50 network calls with every objective (benchmarks/README.md, "digits_recipe.py"): the
# second-order ODE solvers (EDM's Heun, flow Heun) do not beat DDIM / flow Euler there, and DDIM with η = 1
# (what the command line uses by default, :data:`CLI_DDIM_ETA`) is 4-8 points more confident than any ODE solver.
DEFAULT_SAMPLERS: dict[str, str] = {"diffusion": "ddim", "edm": "ddim", "flow": "euler"}
CLI_DDIM_ETA = 1.0
OBJECTIVES: tuple[str, ...] = tuple(DEFAULT_SAMPLERS)


def default_steps(sampler: str, T: int | None) -> int:
    """About 50 network calls: 25 steps for Heun (two calls per step), 50 otherwise (at most T)."""
    n = 25 if sampler == "heun" else 50
    return n if T is None else min(n, T)


def samplers_for(objective: str) -> tuple[str, ...]:
    """The sampler names that fit a checkpoint trained with ``objective``."""
    check_choice("objective", objective, OBJECTIVES)
    return FLOW_SOLVERS if objective == "flow" else tuple(SAMPLERS)

if TYPE_CHECKING:  # pragma: no cover
    from ..training.checkpoint import Checkpoint


def sampler_kwargs(sampler: str, T: int | None, steps: int | None, eta: float | None,
                   objective: str = "diffusion") -> dict[str, Any]:
    """Check (sampler, steps, eta) for a checkpoint trained with ``objective`` and return the keyword
    arguments that sampler takes (a flow model's ``T`` is None: its time is continuous)."""
    if objective == "flow":
        if sampler not in FLOW_SOLVERS:
            raise ValueError(f"a flow-matching checkpoint is sampled by integrating its velocity: sampler must be "
                             f"one of {', '.join(map(repr, FLOW_SOLVERS))}; got {sampler!r}")
        if eta is not None and check_nonneg_float("eta", eta) != 0:
            raise ValueError("a flow-matching checkpoint is sampled by an ODE solver, which takes no eta")
        return {"solver": sampler, "steps": check_int("steps", default_steps(sampler, None) if steps is None
                                                      else steps, low=1)}
    check_choice("sampler", sampler, SAMPLERS)
    params = inspect.signature(SAMPLERS[sampler]).parameters
    kwargs: dict[str, Any] = {}
    if "steps" in params:
        kwargs["steps"] = check_int("steps", default_steps(sampler, T) if steps is None else steps, low=1, high=T)
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
    ``guidance`` (eq. :eq:`eq-cfg`; default :data:`~tinyddpm.sampling.guidance.DEFAULT_LABEL_GUIDANCE`,
    the CLI's default too; 1 = plain conditional), or the null label when y is None. An EDM network
    comes back as an ε-model; a flow network as a velocity model v(x, t), t ∈ [0, 1] (guidance then
    combines velocities, which are affine in ε̂ at fixed (x, t)).
    """
    model, num_classes = network(ckpt), ckpt.num_classes
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


def network(ckpt: Checkpoint) -> Callable[..., Tensor]:
    """``net(x, t, **cond)`` in the samplers' units: the model itself, or its EDM / flow wrapper."""
    name = ckpt.objective_name
    if name == "edm":
        from ..training.continuous import edm_eps_model

        sigma_data = float(ckpt.objective["sigma_data"])
        return lambda x, t, **cond: edm_eps_model(ckpt.model, ckpt.schedule, sigma_data, **cond)(x, t)
    if name == "flow":
        from ..training.continuous import flow_velocity_model

        scale = float(ckpt.objective["time_scale"])
        return lambda x, t, **cond: flow_velocity_model(ckpt.model, scale, **cond)(x, t)
    check_choice("the checkpoint's objective", name, OBJECTIVES)
    return ckpt.model


def sample_chunks(
    ckpt: Checkpoint, n: int, *, sampler: str | None = None, steps: int | None = None, eta: float | None = None,
    generator: torch.Generator | None = None, batch_size: int = 256, y: int | Tensor | None = None,
    guidance: float | None = None, clip_x0: bool | None = None, device: str | torch.device | None = None,
) -> Iterator[Tensor]:
    """Draw ``n`` samples in chunks of at most ``batch_size``, yielding each chunk (on CPU).

    Memory stays bounded by the chunk size whatever ``n`` is. ``sampler`` is a name from
    :data:`tinyddpm.SAMPLERS` (``"euler"``/``"heun"`` for a flow checkpoint), by default the one of
    :data:`DEFAULT_SAMPLERS` for the checkpoint's objective; ``steps`` defaults to about 50 network calls
    (:func:`default_steps`; all T for "ddpm"); ``eta`` goes to samplers that take it. ``y`` may be an
    int or (n,) labels. One ``generator`` runs through the chunks, so (its seed, batch_size) fixes the
    result. Images are clipped to [-1, 1] through x̂_0
    unless ``clip_x0=False``.
    """
    n, batch_size = check_int("n", n, low=1), check_int("batch_size", batch_size, low=1)
    objective = ckpt.objective_name
    sampler = DEFAULT_SAMPLERS.get(objective, "ddim") if sampler is None else sampler
    kwargs = sampler_kwargs(sampler, ckpt.schedule.T if ckpt.schedule is not None else None, steps, eta, objective)
    if isinstance(y, Tensor) and y.ndim == 1 and y.shape[0] != n:
        raise ValueError(f"got {y.shape[0]} labels for n = {n} samples")
    device = torch.device(device) if device is not None else next(ckpt.model.parameters()).device
    clip = bool(ckpt.data.get("is_image", False)) if clip_x0 is None else clip_x0
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        yy = y[start:start + b] if isinstance(y, Tensor) and y.ndim == 1 else y
        model, shape = checkpoint_denoiser(ckpt, yy, guidance), (b, *ckpt.sample_shape)
        if objective == "flow":
            x = flow_sample(model, shape, generator=generator, device=device, **kwargs)
        else:
            prediction = "eps" if objective == "edm" else ckpt.prediction
            x = sample(sampler, model, ckpt.schedule, shape, generator=generator, prediction=prediction,
                       clip_x0=clip, device=device, **kwargs)
        if clip:   # VP samplers end on a clipped x̂_0 up to round-off; a flow ODE's end point is clipped here
            x = x.clamp(-1.0, 1.0)
        yield x.float().cpu()


def edit(
    ckpt: Checkpoint, x: Tensor, *, strength: float | None = None, mask: Tensor | None = None,
    sampler: str | None = None, steps: int | None = None, eta: float | None = None, resample: int = 1,
    jump_length: int = 1, generator: torch.Generator | None = None, y: int | Tensor | None = None,
    guidance: float | None = None, device: str | torch.device | None = None,
) -> Tensor:
    """Edit images ``x`` (B, C, H, W) in [-1, 1] with a checkpoint: what ``tinyddpm sample --init`` runs.

    Without ``mask``: img2img (SDEdit, :func:`tinyddpm.img2img`) at ``strength`` (default 0.6),
    sampler "ddim" by default. With ``mask`` (bool, broadcastable to x, True = keep): inpainting
    (RePaint, :func:`tinyddpm.inpaint`) with ``resample`` = U, sampler "ddpm" by default. Class
    label and guidance as in :func:`checkpoint_denoiser`. Needs a VP model (diffusion or EDM
    objective); the result is clipped to [-1, 1] through x̂_0.
    """
    from .editing import img2img, inpaint

    if ckpt.objective_name == "flow":
        raise ValueError("img2img and inpainting here run the VP reverse process; this checkpoint is a "
                         "flow-matching model (train with --objective ddpm or edm to edit)")
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != tuple(ckpt.sample_shape):
        raise ValueError(f"x must be images of shape (B, {', '.join(map(str, ckpt.sample_shape))}) for this "
                         f"checkpoint; got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    device = torch.device(device) if device is not None else next(ckpt.model.parameters()).device
    model = checkpoint_denoiser(ckpt, y, guidance)
    prediction = "eps" if ckpt.objective_name == "edm" else ckpt.prediction
    common = dict(eta=eta, generator=generator, device=device)
    if mask is None:
        if resample != 1 or jump_length != 1:
            raise ValueError("resample and jump_length apply to inpainting (give a mask)")
        out = img2img(model, ckpt.schedule, x.to(device), 0.6 if strength is None else strength, steps=steps,
                      sampler=sampler or "ddim", prediction=prediction, clip_x0=True, **common)
    else:
        if strength is not None:
            raise ValueError("strength applies to img2img; inpainting always starts from pure noise")
        out = inpaint(model, ckpt.schedule, x.to(device), mask.to(device), steps=steps, resample=resample,
                      jump_length=jump_length, sampler=sampler or "ddpm", prediction=prediction, clip_x0=True,
                      **common)
    return out.clamp(-1.0, 1.0).float().cpu()
