"""Classifier-free guidance (book chapter 8); its oracle is :class:`tinyddpm.ClassMixture`.

Ho & Salimans (2022) train one network on (x_t, t, y) with y replaced by a "null" label 10-20 % of
the time, so the same network predicts both ε(x_t, t, y) and ε(x_t, t, ∅). At sampling time

    ε̃ = ε_u + w (ε_c - ε_u),     ε_u = ε(x_t, t, ∅),  ε_c = ε(x_t, t, y),        (eq-cfg)

which is the ε of the tilted density p(x_t) p(y | x_t)^w: w = 0 samples p(x) (unconditional),
w = 1 samples p(x | y) (plain conditional), w > 1 sharpens towards points that are
unmistakably of class y.

Conventions differ. Our w is the *weight on the conditional prediction*, as in dome272's
``torch.lerp(ε_u, ε_c, w)`` (lerp(a, b, w) = a + w (b - a), the same formula) and in diffusers'
``guidance_scale``. Ho & Salimans write ε̃ = (1 + w') ε_c - w' ε_u, so their w' is our w - 1: their
w' = 0 is our w = 1 (no guidance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_nonneg_float

Keyword = Literal["y", "context"]
KEYWORDS: tuple[str, ...] = ("y", "context")


def cfg_combine(eps_u: Tensor, eps_c: Tensor, w: float) -> Tensor:
    """ε̃ = ε_u + w (ε_c - ε_u), eq. (eq-cfg); w = 0 is unconditional, w = 1 conditional."""
    w = check_nonneg_float("guidance scale w", w)
    return eps_u + w * (eps_c - eps_u)


def _labels(y: int | Tensor, batch: int, num_classes: int | None, null_label: int, device) -> Tensor:
    if isinstance(y, bool):
        raise TypeError("labels must be an int or an integer tensor; got bool")
    if isinstance(y, int):
        y = torch.full((batch,), y, dtype=torch.long)
    if not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool or y.ndim > 1:
        raise TypeError(f"labels must be an int or an integer tensor of shape () or (B,); got {y!r}")
    y = y.long().expand(batch) if y.ndim == 0 else y.long()
    if y.shape[0] != batch:
        raise ValueError(f"got {y.shape[0]} labels for a batch of {batch}")
    if bool((y == null_label).any()):
        valid = f" (class labels lie in [0, {num_classes - 1}])" if num_classes is not None else ""
        raise ValueError(f"labels must not contain the null label {null_label}{valid}; "
                         "for unconditional samples pass w = 0")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (num_classes = {num_classes}); "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    return y.to(device)


def guided_model(
    model: Callable[..., Tensor], y: int | Tensor, w: float, *, num_classes: int | None = None,
    null_label: int | Tensor | None = None, keyword: Keyword = "y",
) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn a conditional ``model(x, t, y=...)`` into a guided ``model(x, t)`` for any sampler, eq. (eq-cfg).

    - ``keyword="y"``: ``y`` is a class label (int or (B,) LongTensor) in [0, num_classes);
      ``null_label`` (default ``num_classes``, the extra embedding row) marks "no label".
    - ``keyword="context"``: ``y`` is a context tensor (B, ...) such as a one-hot vector or a text
      embedding, passed as ``context=``; ``null_label`` is the null context (default zeros).

    The conditional and unconditional passes run as ONE forward on a doubled batch
    [x; x] with labels [y; ∅]; w = 1 and w = 0 need only one half and skip the other.
    """
    if not callable(model):
        raise TypeError("model must be a callable model(x_t, t, y=...) -> ε")
    w = check_nonneg_float("guidance scale w", w)
    check_choice("keyword", keyword, KEYWORDS)
    if keyword == "y":
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, low=1)
        if null_label is None:
            if num_classes is None:
                raise ValueError("pass num_classes (the null label defaults to it) or an explicit null_label")
            null_label = num_classes
        null_label = check_int("null_label", null_label)
    else:
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError("with keyword='context', y must be a float tensor (B, ...) such as a one-hot vector")
        if null_label is not None and (not isinstance(null_label, Tensor) or null_label.shape != y.shape[1:]):
            raise ValueError(f"the null context must be a tensor of shape {tuple(y.shape[1:])} (one context row)")

    def guided(x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        if keyword == "y":
            cond = _labels(y, B, num_classes, null_label, x.device)
            null = torch.full_like(cond, null_label)
        else:
            if y.shape[0] != B:
                raise ValueError(f"got a context for {y.shape[0]} samples and a batch of {B}")
            cond = y.to(x)
            null = torch.zeros_like(cond) if null_label is None else null_label.to(cond).expand_as(cond)
        call = lambda xx, tt, c: model(xx, tt, **{keyword: c})  # noqa: E731
        if w == 1.0:
            return call(x, t, cond)
        if w == 0.0:
            return call(x, t, null)
        out = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))   # one forward, 2B rows
        eps_c, eps_u = out.chunk(2)
        return eps_u + w * (eps_c - eps_u)

    return guided
