"""Exponential moving average of a network's weights (book chapter 5).

θ̄ ← d·θ̄ + (1 − d)·θ after every optimiser step, eq. :eq:`eq-ema`. Sampling from θ̄ instead of θ
averages out the last steps' gradient noise; it is what DDPM (d = 0.9999) and most diffusion code
sample from.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..checks import check_int


class EMA:
    """Keeps ``self.model``, a frozen copy of ``model`` whose weights are the running average.

    ``decay`` is d in eq. :eq:`eq-ema` (unrolled: :eq:`eq-ema-unrolled`). With ``warmup=True`` the
    decay used at the n-th update is min(d, (1 + n) / (10 + n)), so early averages are not dominated by
    the random initialisation. Updates before ``start`` (counted in calls to :meth:`update`) copy the weights instead.
    Buffers (e.g. normalisation statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, start: int = 0, warmup: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must lie in [0, 1); got {decay}")
        self.decay = float(decay)
        self.start = check_int("start", start, low=0)
        self.warmup = bool(warmup)
        self.num_updates = 0  # calls to update() so far
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The d used by the next update (0 means: copy)."""
        n = self.num_updates - self.start
        if n < 0:
            return 0.0
        if self.warmup:
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ̄ ← d·θ̄ + (1 − d)·θ, eq. :eq:`eq-ema`."""
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = list(model.parameters())
        if len(ema_params) != len(params):
            raise ValueError("EMA.update: the model does not have the parameters of the averaged one")
        src = [p.detach().to(q.dtype) for q, p in zip(ema_params, params, strict=True)]
        if d == 0.0:
            torch._foreach_copy_(ema_params, src)
        else:
            torch._foreach_lerp_(ema_params, src, 1.0 - d)  # θ̄ + (1-d)(θ - θ̄) = dθ̄ + (1-d)θ, all tensors at once
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor | int | float | bool | dict[str, Tensor]]:
        """Everything needed to resume: counters and the averaged weights."""
        return {
            "decay": self.decay, "start": self.start, "warmup": self.warmup, "num_updates": self.num_updates,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.start = int(state["start"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        if "model" in state:
            self.model.load_state_dict(state["model"])
