"""Input validation shared by every public function: one place, clear messages.

Every check raises ``ValueError`` (bad value) or ``TypeError`` (bad type) with a message that says
what was expected, so a user never meets an opaque indexing error deep inside a sampler.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def check_choice(name: str, value: Any, valid: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``valid``; otherwise a ValueError listing the valid ones."""
    valid = tuple(valid)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)) and not (
        isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point()
    ):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}; got {value}")
    return value


def check_timesteps(t: int | Tensor, T: int, *, low: int = 0, name: str = "t") -> Tensor:
    """Validate timesteps against a paper-indexed schedule and return them as a LongTensor.

    ``t`` may be a Python int or an integer tensor of shape () or (B,); every value must lie in
    [low, T]. Floats are refused: a float t usually means a 0..1 "continuous time" that this
    paper-indexed schedule would silently misread.
    """
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor; got bool")
    if isinstance(t, int):
        t = torch.tensor(t, dtype=torch.long)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor; got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long); got dtype {t.dtype}")
    if t.ndim > 1:
        raise ValueError(f"{name} must have shape () or (B,); got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < low or int(t.max()) > T):
        raise ValueError(
            f"{name} must lie in [{low}, {T}] (paper indexing, T = {T}); "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )
    return t.long()


def check_batch(t: Tensor, x: Tensor, name: str = "t") -> None:
    """A (B,) timestep tensor must have one entry per batch element of ``x``."""
    if t.ndim == 1 and (x.ndim == 0 or t.shape[0] != x.shape[0]):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but x has batch size "
            f"{x.shape[0] if x.ndim else 'none (0-d)'}; expected one timestep per sample or a scalar"
        )


def check_same_shape(**tensors: Tensor) -> None:
    """All named tensors must be tensors of one shape (e.g. x0, x_t and ε)."""
    for name, v in tensors.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(v).__name__}")
    shapes = {name: tuple(v.shape) for name, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
        raise ValueError(f"shapes must match: {desc}")


def check_nonneg_float(name: str, value: Any) -> float:
    """A finite float >= 0 (e.g. η, a guidance scale)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return value
