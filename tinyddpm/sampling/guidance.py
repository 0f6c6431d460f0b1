"""Classifier-free guidance (book chapter 8); its oracle is :class:`tinyddpm.ClassMixture`.

Ho & Salimans (2022) train one network on (x_t, t, y) with y replaced by a "null" label 10-20 % of
the time, so the same network predicts both ε(x_t, t, y) and ε(x_t, t, ∅). At sampling time

    ε̃ = ε_u + w (ε_c - ε_u),     ε_u = ε(x_t, t, ∅),  ε_c = ε(x_t, t, y),        :eq:`eq-cfg`

which is the ε of the tilted density p(x_t) p(y | x_t)^w: w = 0 samples p(x) (unconditional),
w = 1 samples p(x | y) (plain conditional), w > 1 sharpens towards points that are
unmistakably of class y.

Conventions differ. Our w (the keyword ``guidance`` everywhere in the package and ``--guidance`` in the
CLI) is the *weight on the conditional prediction*, as in dome272's
``torch.lerp(ε_u, ε_c, w)`` (lerp(a, b, w) = a + w (b - a), the same formula) and in diffusers'
``guidance_scale``. Ho & Salimans write ε̃ = (1 + w') ε_c - w' ε_u, so their w' is our w - 1: their
w' = 0 is our w = 1 (no guidance).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_nonneg_float

Keyword = Literal["y", "context"]
KEYWORDS: tuple[str, ...] = ("y", "context")

# The one place the default guidance weights live (the CLI, Checkpoint.sample and TextToImage.generate read them).
DEFAULT_LABEL_GUIDANCE = 2.0    # class labels: 99 % confident digits at w = 2 (benchmarks/guidance_digits.py)
DEFAULT_PROMPT_GUIDANCE = 3.0   # text prompts (chapter 9)


def cfg_combine(eps_u: Tensor, eps_c: Tensor, guidance: float) -> Tensor:
    """ε̃ = ε_u + w (ε_c - ε_u) with w = ``guidance``, eq. :eq:`eq-cfg`; w = 0 is unconditional, w = 1 conditional."""
    w = check_nonneg_float("guidance", guidance)
    return eps_u + w * (eps_c - eps_u)


def _rows(name: str, v: Tensor, batch: int) -> Tensor:
    """A condition tensor with ``batch`` rows: (batch, ...) as is, (1, ...) expanded."""
    if v.shape[0] == batch:
        return v
    if v.shape[0] == 1:
        return v.expand(batch, *v.shape[1:])
    raise ValueError(f"condition {name!r} has {v.shape[0]} rows for a batch of {batch}")


def cfg_model(
    model: Callable[..., Tensor], cond: Mapping[str, Tensor], null: Mapping[str, Tensor], guidance: float,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The one classifier-free-guidance batcher, eq. :eq:`eq-cfg`: ``model(x, t, **cond)`` vs ``model(x, t, **null)``.

    ``cond`` and ``null`` map keyword names (``y``, ``context``, ``mask``, ...) to tensors with B rows
    (or 1 row, broadcast). Both passes run as ONE forward on the doubled batch [x; x] with
    conditions [cond; null]; w = 1 and w = 0 need only one half and skip the other. The result is
    a plain ``model(x, t)`` that every sampler accepts.
    """
    if not callable(model):
        raise TypeError("model must be a callable model(x_t, t, **condition) -> ε")
    w = check_nonneg_float("guidance", guidance)
    if set(cond) != set(null):
        raise ValueError(f"cond and null must name the same keywords; got {sorted(cond)} and {sorted(null)}")

    def guided(x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        if w == 1.0:
            return model(x, t, **{k: _rows(k, v, B) for k, v in cond.items()})
        if w == 0.0:
            return model(x, t, **{k: _rows(k, v, B) for k, v in null.items()})
        both = {k: torch.cat([_rows(k, cond[k], B), _rows(k, null[k], B)]) for k in cond}
        t2 = torch.cat([t, t]) if t.ndim else t
        eps_c, eps_u = model(torch.cat([x, x]), t2, **both).chunk(2)       # one forward, 2B rows
        return cfg_combine(eps_u, eps_c, w)

    return guided


def _labels(y: int | Tensor, num_classes: int | None, null_label: int) -> Tensor:
    """Validate class labels once, on the host, before sampling: () or (B,) long, never the null label."""
    if isinstance(y, bool):
        raise TypeError("labels must be an int or an integer tensor; got bool")
    if isinstance(y, int):
        y = torch.tensor([y])
    if not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool or y.ndim > 1:
        raise TypeError(f"labels must be an int or an integer tensor of shape () or (B,); got {y!r}")
    y = y.long().reshape(-1)
    host = y.cpu()
    if bool((host == null_label).any()):
        valid = f" (class labels lie in [0, {num_classes - 1}])" if num_classes is not None else ""
        raise ValueError(f"labels must not contain the null label {null_label}{valid}; "
                         "for unconditional samples pass guidance=0")
    if num_classes is not None and host.numel() and (int(host.min()) < 0 or int(host.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (num_classes = {num_classes}); "
                         f"got values in [{int(host.min())}, {int(host.max())}]")
    return y


def guided_model(
    model: Callable[..., Tensor], y: int | Tensor, guidance: float, *, num_classes: int | None = None,
    null_label: int | Tensor | None = None, keyword: Keyword = "y",
) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn a conditional ``model(x, t, y=...)`` into a guided ``model(x, t)`` for any sampler, eq. :eq:`eq-cfg`.

    - ``keyword="y"``: ``y`` is a class label (int or (B,) LongTensor) in [0, num_classes);
      ``null_label`` (default ``num_classes``, the extra embedding row) marks "no label".
    - ``keyword="context"``: ``y`` is a context tensor (B, ...) such as a one-hot vector or a text
      embedding, passed as ``context=``; ``null_label`` is the null context (default zeros).

    Labels are checked here, once, so the sampling loop never reads a tensor back from the device.
    Built on :func:`cfg_model` (one forward on the doubled batch).
    """
    check_nonneg_float("guidance", guidance)
    check_choice("keyword", keyword, KEYWORDS)
    if keyword == "y":
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, low=1)
        if null_label is None:
            if num_classes is None:
                raise ValueError("pass num_classes (the null label defaults to it) or an explicit null_label")
            null_label = num_classes
        null_label = check_int("null_label", null_label)
        cond = _labels(y, num_classes, null_label)
        null = torch.full_like(cond, null_label)
        per_device: dict[torch.device, Callable[[Tensor, Tensor], Tensor]] = {}

        def guided(x: Tensor, t: Tensor) -> Tensor:
            if cond.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"got {cond.shape[0]} labels for a batch of {x.shape[0]}")
            if x.device not in per_device:                    # the labels go to x's device once
                per_device[x.device] = cfg_model(model, {"y": cond.to(x.device)}, {"y": null.to(x.device)}, guidance)
            return per_device[x.device](x, t)

        return guided
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise TypeError("with keyword='context', y must be a float tensor (B, ...) such as a one-hot vector")
    if null_label is not None and (not isinstance(null_label, Tensor) or null_label.shape != y.shape[1:]):
        raise ValueError(f"the null context must be a tensor of shape {tuple(y.shape[1:])} (one context row)")
    null = torch.zeros_like(y[:1]) if null_label is None else null_label[None].to(y)
    return cfg_model(model, {"context": y}, {"context": null}, guidance)
