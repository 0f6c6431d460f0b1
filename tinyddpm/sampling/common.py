"""The one sampler contract: where a run starts, where its noise comes from, what it records.

Every sampler in :mod:`tinyddpm.sampling` (DDPM, DDIM, the ODE/SDE solvers, EDM's Heun, flow
matching) takes the same keywords and returns one tensor:

- ``x_T``: the starting noise (VP scale, shape = ``shape``), so two samplers can be compared on
  the same path; without it x_T is drawn from ``generator``.
- ``generator``: a :class:`torch.Generator` that draws every random number (no seeds here).
- ``device``: where the model runs; by default x_T's device, else the generator's, else CPU.
  Noise is drawn on the *generator's* device and moved to ``device``, so a CPU generator drives a
  CUDA sampler reproducibly (the same numbers as on CPU).
- ``trajectory``: a list the sampler appends x_t to (on CPU) at every visited noise level,
  starting with x_T and ending with the returned sample; ``None`` (default) records nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..checks import check_same_shape

Noise = Callable[[], Tensor]


def check_model(model: object) -> None:
    if not callable(model):
        raise TypeError("model must be a callable model(x_t, t) -> prediction")


def check_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 1 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(f"shape must be a tuple of positive ints like (B, C, H, W) or (B, D); got {shape!r}")
    return tuple(shape)


def check_trajectory(trajectory: object) -> list[Tensor] | None:
    if trajectory is not None and not isinstance(trajectory, list):
        raise TypeError(f"trajectory must be a list to append x_t to (e.g. trajectory=[]) or None; "
                        f"got {type(trajectory).__name__}")
    return trajectory


def record(trajectory: list[Tensor] | None, x: Tensor) -> None:
    """Append a CPU copy of x to the trajectory list, if one was given."""
    if trajectory is not None:
        trajectory.append(x.detach().cpu())


def start(
    model: object, shape: object, *, generator: torch.Generator | None, device: torch.device | str | None,
    x_T: Tensor | None, trajectory: list[Tensor] | None,
) -> tuple[Tensor, Noise]:
    """Validate the common arguments; return x_T on the sampling device and a fresh-noise drawer.

    ``noise()`` returns N(0, I) of ``shape`` drawn with ``generator`` on the generator's device
    (or on ``device`` without a generator), moved to the sampling device. Records x_T.
    """
    check_model(model)
    shape = check_shape(shape)
    check_trajectory(trajectory)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if x_T is not None:
        if not isinstance(x_T, Tensor):
            raise TypeError(f"x_T must be a torch.Tensor of shape {shape}; got {type(x_T).__name__}")
        check_same_shape(x_T=x_T, noise=torch.empty(shape, device="meta"))
    if device is None:
        device = x_T.device if x_T is not None else generator.device if generator is not None else "cpu"
    device = torch.device(device)
    draw_on = generator.device if generator is not None else device

    def noise() -> Tensor:
        return torch.randn(shape, generator=generator, device=draw_on).to(device)

    x = noise() if x_T is None else x_T.to(device)
    record(trajectory, x)
    return x, noise




def check_eps_at_zero_snr(alpha_bars_visited: list[float], prediction: str, sampler: str) -> None:
    """Refuse an ε-model on a grid that visits ᾱ_t = 0 (zero terminal SNR, Lin et al. 2023).

    There x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t divides by zero: an ε-prediction carries no
    information about x_0 at pure noise, so the sampler would return inf. x0/v predictions work.
    """
    if prediction == "eps" and any(ab <= 0.0 for ab in alpha_bars_visited):
        raise ValueError(
            f"{sampler}: an ε-prediction model cannot denoise at ᾱ_t = 0 (zero terminal SNR: "
            "x̂_0 = (x_t - ε̂)/0); use a model trained with prediction='v' (or 'x0') and pass it, "
            "or a schedule with ᾱ_T > 0"
        )


__all__ = ["check_eps_at_zero_snr", "check_model", "check_shape", "check_trajectory", "record", "start"]
