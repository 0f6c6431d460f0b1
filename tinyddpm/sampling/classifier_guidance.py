"""Classifier guidance (Dhariwal & Nichol 2021): steer an unconditional ε-model with a classifier's gradient.

To sample the tilted density q_t(x) q_t(y | x)^w, follow its score ∇ log q_t(x) + w ∇ log q_t(y | x).
The ε-model is a scaled score, ε = -√(1-ᾱ_t) ∇ log q_t(x) :eq:`eq-score-eps`, so the guided ε is

    ε̂(x_t, t) = ε_θ(x_t, t) - w √(1-ᾱ_t) ∇_{x_t} log p_φ(y | x_t, t)

(Dhariwal & Nichol 2021, Algorithm 2 and Sec. 4.2, their ε̂; the sign because score = -ε/√(1-ᾱ)).
w = 1 with the exact class posterior gives the exact conditional ε; on the oracle,
:meth:`tinyddpm.ClassMixture.class_log_prob_grad` is that exact gradient. Compare classifier-free
guidance, :eq:`eq-cfg`, where ε_c - ε_u plays the role of -√(1-ᾱ) ∇ log q_t(y | x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..checks import check_nonneg_float
from ..diffusion.schedule import NoiseSchedule
from .common import check_model

GradFn = Callable[[Tensor, Tensor], Tensor]


def _sqrt_one_minus_alpha_bar(s: NoiseSchedule, t: Tensor, x: Tensor, tables: dict) -> Tensor:
    """√(1-ᾱ_t) shaped to broadcast against x, in x's dtype and on x's device.

    Integer t: the table, moved to t's device once (no read-back). Fractional t (a float tensor from
    a continuous-grid sampler): 1 - ᾱ(t) = σ(t)²/(1 + σ(t)²), :meth:`NoiseSchedule.alpha_bar_at`,
    computed on the CPU.
    """
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    if t.is_floating_point():
        v = (1.0 - s.alpha_bar_at(t)).sqrt()
    else:
        if t.device not in tables:
            tables[t.device] = s.sqrt_one_minus_alpha_bars.to(t.device)
        v = tables[t.device][t]
    v = v.to(device=x.device, dtype=x.dtype)
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1))) if v.ndim == 1 else v


def classifier_guidance(
    model: Callable[..., Tensor], s: NoiseSchedule, grad_fn: GradFn, scale: float,
) -> Callable[..., Tensor]:
    """An ε-model ``fn(x_t, t, **cond) = ε_θ(x_t, t, **cond) - scale · √(1-ᾱ_t) · grad_fn(x_t, t)``,
    eq. :eq:`eq-classifier-guidance` with the class term weighted by ``scale``.

    ``grad_fn(x_t, t)`` returns ∇_{x_t} log p(y | x_t) shaped like x_t (the label is bound inside it):
    the exact one from :meth:`tinyddpm.ClassMixture.class_log_prob_grad`, or a noisy-image
    classifier's, by autograd — it runs with gradients enabled even inside the samplers'
    ``no_grad``. ``t`` is whatever the sampler passes: a (B,) LongTensor, or fractional steps as a
    float tensor (ᾱ(t) from :meth:`NoiseSchedule.alpha_bar_at`), so the result works with every
    sampler of :func:`tinyddpm.sample`. ``scale`` = 0 is the model itself; 1 with the exact
    gradient is the exact conditional ε. ``model`` must predict ε. With a trained classifier, sample
    with ``clip_x0=True``: near t = T its gradient is far larger than the exact one (chapter 14).
    """
    check_model(model)
    if not callable(grad_fn):
        raise TypeError("grad_fn must be a callable grad_fn(x_t, t) -> ∇ log p(y | x_t) shaped like x_t")
    w = check_nonneg_float("scale", scale)
    tables: dict[torch.device, Tensor] = {}

    def guided(x: Tensor, t: Tensor, **cond) -> Tensor:
        eps = model(x, t, **cond)
        if w == 0.0:
            return eps
        with torch.enable_grad():
            g = grad_fn(x, t)
        if not isinstance(g, Tensor) or g.shape != x.shape:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"grad_fn must return a tensor shaped like x_t {tuple(x.shape)}; got {got}")
        return eps - w * _sqrt_one_minus_alpha_bar(s, t, eps, tables) * g.detach().to(eps.dtype)

    return guided


__all__ = ["classifier_guidance"]
