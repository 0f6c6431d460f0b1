"""Sampling a flow-matching (rectified-flow) model: integrate dx/dt = v(x, t) from t = 1 to t = 0.

Convention of rectified flow and Stable Diffusion 3 (Liu et al. 2023; Esser et al. 2024): the path
is x_t = (1 - t) x_0 + t ε, t = 0 is data and t = 1 is noise N(0, I), and the model predicts the
velocity v(x, t) ≈ E[ε - x_0 | x_t = x] (exact for the oracle: :meth:`GaussianMixture.velocity`).
The ODE dx/dt = v(x, t) carries N(0, I) at t = 1 to the data at t = 0, so sampling steps t
*downwards* with dt < 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_choice, check_int
from .common import record, start
from .denoiser import call_model

FlowSolver = Literal["euler", "heun"]
FLOW_SOLVERS: tuple[str, ...] = ("euler", "heun")


@torch.no_grad()
def flow_sample(
    model: Callable[[Tensor, Tensor], Tensor], shape: tuple[int, ...], *, steps: int = 50,
    solver: FlowSolver = "euler", generator: torch.Generator | None = None, x_T: Tensor | None = None,
    device: torch.device | str | None = None, trajectory: list[Tensor] | None = None,
) -> Tensor:
    """Solve dx/dt = v(x, t) from t = 1 (x = x_T ~ N(0, I)) to t = 0 on the uniform grid t_i = 1 - i/n,
    eq. :eq:`eq-flow-solvers`.

    ``model(x, t)`` gets t as a float tensor of shape (B,) in [0, 1]. Per step t → t' (h = t' - t < 0):

    - ``"euler"``: x' = x + h v(x, t)                                  (1 call per step, NFE = n)
    - ``"heun"``:  x̃ = x + h v(x, t);  x' = x + h (v(x, t) + v(x̃, t'))/2   (NFE = 2n; the velocity is
      defined at t = 0, so unlike EDM's Heun the last step keeps its correction)

    Common keywords (``x_T``, ``generator``, ``device``, ``trajectory``): :mod:`tinyddpm.sampling.common`.
    """
    steps = check_int("steps", steps, low=1)
    check_choice("solver", solver, FLOW_SOLVERS)
    x, _ = start(model, shape, generator=generator, device=device, x_T=x_T, trajectory=trajectory)
    grid = [1.0 - i / steps for i in range(steps)] + [0.0]
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        h = t_next - t
        v = call_model(model, x, t)                                  # 1. velocity at (x, t)
        x_euler = x + h * v                                          # 2. Euler predictor
        if solver == "heun":                                         # 3. trapezoidal corrector
            x = x + h * 0.5 * (v + call_model(model, x_euler, t_next))
        else:
            x = x_euler
        record(trajectory, x)
    return x


__all__ = ["FLOW_SOLVERS", "flow_sample"]
