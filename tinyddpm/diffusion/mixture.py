"""The Gaussian-mixture oracle: data whose optimal denoiser is known exactly (book chapter 4).

If x_0 ~ Σ_k w_k N(μ_k, diag σ_k²) then, under q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I),
x_t ~ Σ_k w_k N(√ᾱ_t μ_k, diag(ᾱ_t σ_k² + 1 - ᾱ_t)), eq. :eq:`eq-marginal-mixture`, and the optimal
ε-predictor is E[ε | x_t] = -√(1-ᾱ_t) ∇ log q_t(x_t) (Tweedie), eq. :eq:`eq-optimal-eps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_timesteps
from .schedule import NoiseSchedule

F64 = torch.float64


class GaussianMixture:
    """Σ_k w_k N(μ_k, diag σ_k²) in D dimensions; ``stds`` per component (K,) or per axis (K, D)."""

    def __init__(self, means, stds, weights=None):
        means = torch.as_tensor(means, dtype=F64)
        if means.ndim == 1:
            means = means[:, None]                     # K one-dimensional components
        if means.ndim != 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape (K, D) (or (K,) for 1-D); got {tuple(means.shape)}")
        if not torch.isfinite(means).all():
            raise ValueError("every mean must be finite")
        K, D = means.shape
        stds = torch.as_tensor(stds, dtype=F64)
        if stds.ndim == 0:
            stds = stds.expand(K)
        if stds.shape == (K,):
            stds = stds[:, None].expand(K, D)
        if stds.shape != (K, D):
            raise ValueError(f"stds must have shape (K,) = ({K},) or (K, D) = ({K}, {D}); got {tuple(stds.shape)}")
        if not (stds > 0).all() or not torch.isfinite(stds).all():
            raise ValueError("every std must be a finite number > 0")
        weights = torch.full((K,), 1.0 / K, dtype=F64) if weights is None else torch.as_tensor(weights, dtype=F64)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape (K,) = ({K},); got {tuple(weights.shape)}")
        if (weights < 0).any():
            raise ValueError(f"weights must be >= 0; got {weights.tolist()}")
        if abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1; they sum to {float(weights.sum()):.6g}")
        self.means, self.stds, self.weights = means, stds.contiguous(), weights
        self.K, self.D = K, D

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, D={self.D})"

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.D:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (N, D) = (N, {self.D}); got {shape}")

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n draws as float32 (n, D); with ``return_labels`` also the component of each."""
        n = check_int("n", n, low=1)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, generator=generator, dtype=F64)
        x = (self.means[k] + self.stds[k] * z).float()
        return (x, k) if return_labels else x

    def component_log_probs(self, x: Tensor) -> Tensor:
        """log w_k + log N(x; μ_k, diag σ_k²) for every k: shape (N, K), float64."""
        self._check_x(x)
        x = x.to(F64)[:, None, :]                       # (N, 1, D)
        var = self.stds**2                              # (K, D)
        quad = ((x - self.means) ** 2 / var).sum(-1)   # (N, K)
        log_det = torch.log(var).sum(-1)                # (K,)
        return torch.log(self.weights) - 0.5 * (quad + log_det + self.D * math.log(2 * math.pi))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) under the mixture, shape (N,), float64."""
        return torch.logsumexp(self.component_log_probs(x), dim=-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """p(k | x), shape (N, K); ``argmax`` assigns each point to a component."""
        return torch.softmax(self.component_log_probs(x), dim=-1)

    def score(self, x: Tensor) -> Tensor:
        """∇_x log p(x) in closed form, shape (N, D), float64."""
        r = self.responsibilities(x)                                          # (N, K)
        per_k = -(x.to(F64)[:, None, :] - self.means) / self.stds**2          # (N, K, D)
        return (r[..., None] * per_k).sum(1)

    def marginal(self, t: int | float | Tensor, schedule: NoiseSchedule) -> GaussianMixture:
        """q_t = the law of x_t when x_0 follows this mixture, eq. :eq:`eq-marginal-mixture`.

        ``t`` is an integer step in [0, T] or a fractional one (a Python float or a 0-d float tensor),
        where ᾱ(t) = 1/(1 + σ(t)²) with σ(t) interpolated as :meth:`NoiseSchedule.sigma_at` does.
        ``gm.marginal(t, s).score(x)`` is the exact ∇ log q_t(x).
        """
        ab = self._alpha_bar(t, schedule, low=0)
        if ab.ndim:
            raise ValueError(f"marginal needs one t (a scalar); got shape {tuple(ab.shape)}")
        ab = float(ab)
        return GaussianMixture(math.sqrt(ab) * self.means, (ab * self.stds**2 + 1 - ab).sqrt(), self.weights)

    def condition(self, mask: Tensor, x_known: Tensor) -> GaussianMixture:
        """The exact law of the unknown coordinates given the known ones: p(x_u | x_k), a mixture in D_u dims.

        ``mask`` is a bool tensor (D,), True where known; ``x_known`` is (D,) (its entries where the
        mask is False are ignored, NaN allowed). With diagonal components, x_u and x_k are independent
        within a component, so by Bayes' rule

            p(x_u | x_k) = Σ_k w'_k N(x_u; μ_k,u, diag σ_k,u²),   w'_k ∝ w_k N(x_k; μ_k,k, diag σ_k,k²):

        the same components restricted to the unknown axes, reweighted by how well each explains
        x_k, eq. :eq:`eq-mixture-condition`. One x_known only: a batch of them would give one mixture per
        row (different w'), so condition row by row. The ground truth for inpainting (:func:`tinyddpm.inpaint`).
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of shape (D,) = ({self.D},), True where known; "
                            f"got {mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        if mask.shape != (self.D,):
            raise ValueError(f"mask must have shape (D,) = ({self.D},); got {tuple(mask.shape)}")
        x_known = torch.as_tensor(x_known).detach()
        if x_known.shape != (self.D,):
            extra = " (one point: condition each row separately)" if x_known.ndim == 2 else ""
            raise ValueError(f"x_known must have shape (D,) = ({self.D},){extra}; got {tuple(x_known.shape)}")
        mask = mask.cpu()
        if bool(mask.all()):
            raise ValueError("mask marks every coordinate as known: nothing is left to condition on")
        x = x_known.to(device="cpu", dtype=F64)[mask]                               # (D_k,)
        if not torch.isfinite(x).all():
            raise ValueError("x_known must be finite where mask is True")
        m, sd = self.means[:, mask], self.stds[:, mask]                              # (K, D_k)
        log_lik = -0.5 * (((x - m) / sd) ** 2 + 2 * torch.log(sd)).sum(-1)         # log N(x_k; μ_k,k, σ_k,k²) + c
        weights = torch.softmax(torch.log(self.weights) + log_lik, dim=-1)
        return GaussianMixture(self.means[:, ~mask], self.stds[:, ~mask], weights)

    @staticmethod
    def _alpha_bar(t: int | float | Tensor, schedule: NoiseSchedule, low: int) -> Tensor:
        """ᾱ_t as float64, shape () or (N,): the table at integer t, 1/(1 + σ(t)²) at fractional t."""
        if isinstance(t, float) or (isinstance(t, Tensor) and t.is_floating_point()):
            return schedule.alpha_bar_at(t)
        return schedule.alpha_bars[check_timesteps(t, schedule.T, low=low).cpu()]

    def _rows_t(self, xt: Tensor, t: int | float | Tensor, schedule: NoiseSchedule, low: int) -> Tensor:
        self._check_x(xt)
        ab = self._alpha_bar(t, schedule, low)
        if ab.ndim > 1 or (ab.ndim == 1 and ab.shape[0] != xt.shape[0]):
            raise ValueError(f"t has shape {tuple(ab.shape)} but x_t has {xt.shape[0]} rows")
        if ab.ndim == 1 and ab.numel() and bool((ab == ab[0]).all()):
            ab = ab[0]                                              # samplers pass one t for all rows
        return ab

    def _joint(self, x: Tensor, scale: Tensor, noise_var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For x = scale · x_0 + √noise_var · ε: log w_k + log N(x; ...) up to a constant (N, K),
        x - scale μ_k and the variances (N, K, D).

        Each component's x is N(scale μ_k, scale² σ_k² + noise_var); ``scale``, ``noise_var`` are
        0-d or (N,) float64.
        """
        scale = scale.reshape(-1, 1, 1) if scale.ndim else scale
        noise_var = noise_var.reshape(-1, 1, 1) if noise_var.ndim else noise_var
        var = scale**2 * self.stds**2 + noise_var                          # (N or 1, K, D)
        diff = x[:, None, :] - scale * self.means                           # (N, K, D)
        logp = torch.log(self.weights) - 0.5 * ((diff**2 / var).sum(-1) + torch.log(var).sum(-1))
        return logp, diff, var.expand_as(diff)

    def _posterior(self, x: Tensor, scale: Tensor, noise_var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`_joint`, with p(k | x) (N, K) in place of the log joint."""
        logp, diff, var = self._joint(x, scale, noise_var)
        return torch.softmax(logp, dim=-1), diff, var

    def optimal_eps(self, xt: Tensor, t: int | float | Tensor, schedule: NoiseSchedule) -> Tensor:
        """E[ε | x_t] = √(1-ᾱ_t) Σ_k p(k | x_t) (x_t - √ᾱ_t μ_k) / (ᾱ_t σ_k² + 1 - ᾱ_t), eq. :eq:`eq-optimal-eps`.

        ``t`` is an int or a (N,) LongTensor in [1, T], or fractional steps (a float or a float
        tensor in [0, T], ᾱ(t) = 1/(1 + σ(t)²), :meth:`NoiseSchedule.sigma_at`); the result has
        x_t's dtype. This is the MSE-optimal ε-network for this data, so a sampler driven by it is
        tested with no training error in the way.
        """
        ab = self._rows_t(xt, t, schedule, low=1)
        x = xt.detach().to(device="cpu", dtype=F64)
        if ab.ndim == 0:
            # One ᾱ for every row: var is (K, D) and the sums over D become matrix products (≈3x faster).
            mu, prec = ab.sqrt() * self.means, 1.0 / (ab * self.stds**2 + 1 - ab)          # (K, D)
            quad = (x * x) @ prec.T - 2 * x @ (mu * prec).T + (mu * mu * prec).sum(-1)   # Σ_d (x_d-μ_d)²/var_d
            r = torch.softmax(torch.log(self.weights) - 0.5 * (quad - torch.log(prec).sum(-1)), dim=-1)
            eps = (1 - ab).sqrt() * (x * (r @ prec) - r @ (mu * prec))                   # (N, D)
            return eps.to(device=xt.device, dtype=xt.dtype)
        r, diff, var = self._posterior(x, ab.sqrt(), 1 - ab)
        eps = (1 - ab).sqrt()[:, None] * (r[..., None] * diff / var).sum(1)
        return eps.to(device=xt.device, dtype=xt.dtype)

    def optimal_x0(self, xt: Tensor, t: int | float | Tensor, schedule: NoiseSchedule) -> Tensor:
        """E[x_0 | x_t] = Σ_k p(k | x_t) (μ_k + √ᾱ_t σ_k² (x_t - √ᾱ_t μ_k) / (ᾱ_t σ_k² + 1 - ᾱ_t)).

        The Gaussian conditional mean per component, weighted by the responsibilities; defined at
        every t in [0, T] including ᾱ_T = 0 (where it is the mixture's mean), unlike
        (x_t - √(1-ᾱ) E[ε | x_t]) / √ᾱ, which it equals elsewhere (Tweedie's formula, eq. :eq:`eq-tweedie`).
        """
        ab = self._rows_t(xt, t, schedule, low=0)
        x = xt.detach().to(device="cpu", dtype=F64)
        r, diff, var = self._posterior(x, ab.sqrt(), 1 - ab)
        a = ab.sqrt().reshape(-1, 1, 1) if ab.ndim else ab.sqrt()
        x0 = (r[..., None] * (self.means + a * self.stds**2 * diff / var)).sum(1)
        return x0.to(device=xt.device, dtype=xt.dtype)

    def as_model(self, schedule: NoiseSchedule, prediction: str = "eps") -> Callable[[Tensor, Tensor], Tensor]:
        """A callable ``model(x_t, t)``: the exact E[ε | x_t] (or E[x_0 | x_t], or v) to plug into any sampler.

        ``prediction="v"`` returns √ᾱ E[ε | x_t] - √(1-ᾱ) E[x_0 | x_t] (Salimans & Ho 2022), the model
        to pass with ``prediction="v"`` — the one that works at zero terminal SNR.
        """
        check_choice("prediction", prediction, ("eps", "x0", "v"))
        if prediction == "eps":
            return lambda xt, t: self.optimal_eps(xt, t, schedule)
        if prediction == "x0":
            return lambda xt, t: self.optimal_x0(xt, t, schedule)

        def v_model(xt: Tensor, t: Tensor) -> Tensor:
            ab = self._rows_t(xt, t, schedule, low=1)
            ab = ab[:, None] if ab.ndim else ab
            x = xt.detach().to(device="cpu", dtype=F64)
            v = ab.sqrt() * self.optimal_eps(x, t, schedule) - (1 - ab).sqrt() * self.optimal_x0(x, t, schedule)
            return v.to(device=xt.device, dtype=xt.dtype)
        return v_model

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        """The exact flow-matching velocity u_t(x) = E[ε - x_0 | x_t = x] for x_t = (1 - t) x_0 + t ε,
        eqs. :eq:`eq-marginal-velocity` and :eq:`eq-mixture-velocity`.

        Rectified-flow / Stable Diffusion 3 convention (Liu et al. 2023; Esser et al. 2024): t ∈ [0, 1],
        t = 0 is data, t = 1 is pure noise, and sampling integrates dx/dt = u_t(x) from 1 to 0.
        Per component, x_t | k ~ N((1-t) μ_k, v_k) with v_k = (1-t)² σ_k² + t², and (x_0, ε, x_t) are
        jointly Gaussian, so E[x_0 | x_t, k] = μ_k + (1-t) σ_k² (x - (1-t) μ_k)/v_k and
        E[ε | x_t, k] = t (x - (1-t) μ_k)/v_k. Hence

            u_t(x) = Σ_k p(k | x_t = x) [ (t - (1-t) σ_k²) (x - (1-t) μ_k) / v_k - μ_k ].

        ``t`` is a float or a float tensor of shape () or (N,); the result has x's dtype and device.
        """
        self._check_x(x)
        if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
            raise TypeError(f"t must be a float in [0, 1] or a tensor of them; got {type(t).__name__}")
        tt = t.detach().to(device="cpu", dtype=F64) if isinstance(t, Tensor) else torch.tensor(float(t), dtype=F64)
        if tt.ndim > 1 or (tt.ndim == 1 and tt.shape[0] != x.shape[0]):
            raise ValueError(f"t must be a scalar or have shape (N,) = ({x.shape[0]},); got {tuple(tt.shape)}")
        if not torch.isfinite(tt).all() or (tt < 0).any() or (tt > 1).any():
            raise ValueError("t must lie in [0, 1] (0 = data, 1 = noise)")
        xx = x.detach().to(device="cpu", dtype=F64)
        r, diff, var = self._posterior(xx, 1 - tt, tt**2)
        tk = tt.reshape(-1, 1, 1) if tt.ndim else tt
        u = (r[..., None] * ((tk - (1 - tk) * self.stds**2) * diff / var - self.means)).sum(1)
        return u.to(device=x.device, dtype=x.dtype)


class ClassMixture:
    """A K-component Gaussian mixture whose components are split among C classes: a conditional oracle.

    ``classes[k]`` is the class of component k. The class prior is p(c) = Σ_{k in c} w_k and the
    class-conditional law is the sub-mixture of c's components with weights renormalised, so the
    exact conditional ε is that sub-mixture's :meth:`GaussianMixture.optimal_eps`, and the exact
    unconditional ε is the full mixture's. Label ``C`` (= ``null_label``) means "no label".
    """

    def __init__(self, mixture: GaussianMixture, classes: Sequence[int]):
        if not isinstance(mixture, GaussianMixture):
            raise TypeError("mixture must be a GaussianMixture")
        classes = torch.as_tensor(classes, dtype=torch.long)
        if classes.shape != (mixture.K,):
            raise ValueError(f"classes needs one class per component, shape ({mixture.K},); got {tuple(classes.shape)}")
        C = int(classes.max()) + 1
        if int(classes.min()) < 0 or set(classes.tolist()) != set(range(C)):
            raise ValueError(f"classes must use every label 0..C-1 at least once; got {classes.tolist()}")
        self.mixture, self.classes, self.num_classes, self.null_label = mixture, classes, C, C
        self.class_weights = torch.stack([mixture.weights[classes == c].sum() for c in range(C)])
        self.components = [self.component(c) for c in range(C)]

    def __repr__(self) -> str:
        return f"ClassMixture(K={self.mixture.K}, C={self.num_classes})"

    def component(self, c: int) -> GaussianMixture:
        """p(x | c): the sub-mixture of class c's components, weights renormalised."""
        c = check_int("class", c, low=0, high=self.num_classes - 1)
        ks = self.classes == c
        w = self.mixture.weights[ks]
        return GaussianMixture(self.mixture.means[ks], self.mixture.stds[ks], w / w.sum())

    def class_log_probs(self, x: Tensor) -> Tensor:
        """log p(c | x) for every class, shape (N, C), float64 (from the full mixture's components)."""
        lp = self.mixture.component_log_probs(x)                                     # (N, K)
        per_class = torch.stack([torch.logsumexp(lp[:, self.classes == c], -1) for c in range(self.num_classes)], -1)
        return per_class - torch.logsumexp(lp, -1, keepdim=True)

    def class_log_prob_grad(self, y: int | Tensor, schedule: NoiseSchedule) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact classifier gradient ``grad_fn(x_t, t)`` = ∇_{x_t} log q_t(y | x_t), for classifier guidance.

        Bayes: log q_t(y | x) = log q_t(x | y) + log p(y) - log q_t(x), each q_t a mixture marginal
        :eq:`eq-marginal-mixture`, so the gradient is the class-y sub-mixture's score minus the full one's:
        with per-component scores s_k(x) = -(x - √ᾱ μ_k) / (ᾱ σ_k² + 1 - ᾱ),

            ∇ log q_t(y | x) = Σ_k (p(k | x, y) - p(k | x)) s_k(x),

        p(k | x, y) being the responsibilities among y's components only (computed in log space, so
        far from class y the gradient stays finite). ``y`` is a class (int) or a (B,) tensor, one per
        row; ``t`` an int, a (B,) LongTensor in [0, T] or fractional steps (float tensor,
        :meth:`NoiseSchedule.alpha_bar_at`). Returns x_t's dtype and device. For
        :func:`tinyddpm.classifier_guidance` (Dhariwal & Nichol 2021).
        """
        if isinstance(y, bool) or not isinstance(y, (int, Tensor)) or (
            isinstance(y, Tensor) and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim > 1)
        ):
            raise TypeError(f"y must be a class (int) or an integer tensor of shape (B,); got {y!r}")
        labels = torch.as_tensor(y, dtype=torch.long).detach().cpu().reshape(-1)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"y must lie in [0, {self.num_classes - 1}] (no null label for a classifier); got {y!r}")
        gm = self.mixture

        def grad_fn(xt: Tensor, t: int | float | Tensor) -> Tensor:
            ab = gm._rows_t(xt, t, schedule, low=0)
            if labels.numel() not in (1, xt.shape[0]):
                raise ValueError(f"got {labels.numel()} labels for a batch of {xt.shape[0]}")
            x = xt.detach().to(device="cpu", dtype=F64)
            logp, diff, var = gm._joint(x, ab.sqrt(), 1 - ab)                     # (N, K), (N, K, D) x2
            in_y = self.classes[None, :] == labels[:, None]                         # (N or 1, K)
            r_y = torch.softmax(logp.masked_fill(~in_y, -math.inf), dim=-1)       # p(k | x, y)
            r = torch.softmax(logp, dim=-1)                                         # p(k | x)
            grad = -((r_y - r)[..., None] * diff / var).sum(1)
            return grad.to(device=xt.device, dtype=xt.dtype)

        return grad_fn

    def model(self, schedule: NoiseSchedule) -> Callable[..., Tensor]:
        """A conditional oracle ``model(x_t, t, y)``: exact E[ε | x_t, y], or E[ε | x_t] where y = null."""
        def eps(xt: Tensor, t: Tensor, y: Any) -> Tensor:
            y = torch.as_tensor(y, dtype=torch.long)
            y = y.expand(xt.shape[0]) if y.ndim == 0 else y
            if y.shape != (xt.shape[0],) or int(y.min()) < 0 or int(y.max()) > self.num_classes:
                raise ValueError(f"y must hold one label per row in [0, {self.num_classes}] ({self.null_label} = null)")
            t = t.expand(xt.shape[0]) if t.ndim == 0 else t
            out = torch.empty_like(xt)
            for c in y.unique().tolist():
                rows = y == c
                gm = self.mixture if c == self.null_label else self.components[c]
                out[rows] = gm.optimal_eps(xt[rows], t[rows], schedule)
            return out
        return eps
