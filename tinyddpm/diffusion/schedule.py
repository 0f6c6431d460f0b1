"""Noise schedules and the Gaussian math of the forward process (book chapters 2-4).

Paper indexing throughout: every per-step array has length T+1, ``betas[0] == 0`` (unused) and
``alpha_bars[0] == 1``, so ᾱ_t is ``s.alpha_bars[t]`` for t = 1..T. Arrays are float64 and
computed once; :func:`tinyddpm.broadcast.extract` casts them where they are used.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_batch, check_choice, check_int, check_same_shape, check_timesteps
from .broadcast import extract

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")
F64 = torch.float64


def _as_f64(values: Tensor | list[float], name: str) -> Tensor:
    if isinstance(values, Tensor):
        v = values.detach().to(device="cpu", dtype=F64)
    else:
        v = torch.as_tensor(values, dtype=F64)
    if v.ndim != 1 or v.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D sequence; got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} must be finite")
    return v


# what the network predicts, in diffusers' words (its schedulers' ``prediction_type``)
DIFFUSERS_PREDICTION_TYPES: dict[str, str] = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


class NoiseSchedule:
    """A variance schedule β_1..β_T and everything derived from it.

    Build one with a named constructor (``linear``, ``cosine``, ``scaled_linear``, ``sigmoid``,
    ``from_betas``, ``from_alpha_bars``); ``zero_terminal_snr()`` rescales any of them so that
    ᾱ_T = 0 (Lin et al. 2023). All derived arrays are float64 tensors of length T+1.
    """

    def __init__(self, betas: Tensor, *, name: str = "custom", _allow_terminal_one: bool = False):
        betas = _as_f64(betas, "betas")
        if betas.numel() < 2 or betas[0] != 0:
            raise ValueError(
                "NoiseSchedule(betas) expects the paper-indexed array [0, β_1, ..., β_T] of length "
                "T+1 >= 2; use NoiseSchedule.from_betas([β_1, ..., β_T]) for the T values alone"
            )
        b = betas[1:]
        upper_ok = (b < 1) | (_allow_terminal_one & (torch.arange(b.numel()) == b.numel() - 1) & (b == 1))
        if not ((b > 0) & upper_ok).all():
            bad = int(torch.nonzero(~((b > 0) & upper_ok))[0]) + 1
            raise ValueError(f"every β_t must lie in (0, 1); β_{bad} = {float(betas[bad])!r}")
        self.name = name
        self.T: int = b.numel()
        self.betas: Tensor = betas                                     # β_t, eq. (eq-forward-step)
        self.alphas: Tensor = 1.0 - betas                              # α_t = 1 - β_t
        self.alpha_bars: Tensor = torch.cumprod(self.alphas, 0)        # ᾱ_t = Π_{s<=t} α_s
        if _allow_terminal_one:
            self.alpha_bars[-1] = 0.0                                  # exact zero, no round-off
        ab, ab_prev = self.alpha_bars, torch.cat([self.alpha_bars[:1], self.alpha_bars[:-1]])
        self.alpha_bars_prev: Tensor = ab_prev                         # ᾱ_{t-1} (ᾱ_{-1} := 1 unused)
        self.sqrt_alpha_bars: Tensor = ab.sqrt()
        self.sqrt_one_minus_alpha_bars: Tensor = (1.0 - ab).sqrt()
        with torch.no_grad():
            one_minus = 1.0 - ab
            safe = torch.where(one_minus > 0, one_minus, torch.ones_like(one_minus))
            # β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t,   eq. (eq-posterior-var); β̃_0 := 0
            self.posterior_variance: Tensor = torch.where(
                one_minus > 0, (1.0 - ab_prev) / safe * betas, torch.zeros_like(ab)
            )
            # μ̃_t = c_0 x_0 + c_t x_t,   eq. (eq-posterior-mean)
            self.posterior_coef_x0: Tensor = torch.where(
                one_minus > 0, ab_prev.sqrt() * betas / safe, torch.ones_like(ab)
            )
            self.posterior_coef_xt: Tensor = torch.where(
                one_minus > 0, self.alphas.sqrt() * (1.0 - ab_prev) / safe, torch.zeros_like(ab)
            )

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_betas(cls, betas: Tensor | list[float], name: str = "custom") -> NoiseSchedule:
        """From the T values β_1..β_T (no leading zero); each must lie in (0, 1)."""
        b = _as_f64(betas, "betas")
        return cls(torch.cat([torch.zeros(1, dtype=F64), b]), name=name)

    @classmethod
    def from_alpha_bars(cls, alpha_bars: Tensor | list[float], name: str = "custom") -> NoiseSchedule:
        """From ᾱ_1..ᾱ_T, which must be strictly decreasing in (0, 1); β_t = 1 - ᾱ_t / ᾱ_{t-1}."""
        ab = _as_f64(alpha_bars, "alpha_bars")
        if not ((ab > 0) & (ab < 1)).all():
            raise ValueError("every ᾱ_t must lie in (0, 1) for t >= 1")
        full = torch.cat([torch.ones(1, dtype=F64), ab])
        if not (full[1:] < full[:-1]).all():
            i = int(torch.nonzero(~(full[1:] < full[:-1]))[0]) + 1
            raise ValueError(
                f"ᾱ_t must be strictly decreasing; ᾱ_{i} = {float(full[i])} >= ᾱ_{i-1} = {float(full[i-1])}"
            )
        return cls.from_betas(1.0 - full[1:] / full[:-1], name=name)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """β_t linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020), eq. :eq:`eq-schedule-linear`."""
        T = check_int("T", T, low=1)
        return cls.from_betas(torch.linspace(beta_start, beta_end, T, dtype=F64), name="linear")

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
        """√β_t linear, then squared (Stable Diffusion's default), eq. :eq:`eq-schedule-scaled-linear`."""
        T = check_int("T", T, low=1)
        root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=F64)
        return cls.from_betas(root**2, name="scaled_linear")

    @classmethod
    def sigmoid(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """β_t = β_start + (β_end - β_start)·σ(u_t), u_t linear on [-6, 6] (GeoDiff, Xu et al. 2022),
        eq. :eq:`eq-schedule-sigmoid`."""
        T = check_int("T", T, low=1)
        u = torch.linspace(-6.0, 6.0, T, dtype=F64)
        return cls.from_betas(beta_start + (beta_end - beta_start) * torch.sigmoid(u), name="sigmoid")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """ᾱ_t = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)); β_t clipped at ``max_beta``.

        Nichol & Dhariwal 2021, eq. 17; eq. :eq:`eq-schedule-cosine` in the book. The clip changes ᾱ_t
        only at the last few steps of a large T (β_T would otherwise be 1).
        """
        T = check_int("T", T, low=1)
        t = torch.arange(T + 1, dtype=F64)
        f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        ab = f / f[0]
        betas = (1.0 - ab[1:] / ab[:-1]).clamp(max=max_beta)
        return cls.from_betas(betas, name="cosine")

    def zero_terminal_snr(self) -> NoiseSchedule:
        """Rescale √ᾱ_t so that ᾱ_T = 0 and ᾱ_1 is unchanged (Lin et al. 2023, Algorithm 1), eq. :eq:`eq-zero-snr`.

        Then β_T = 1: the last step destroys the signal completely, as sampling from pure noise
        assumes. With ᾱ_T = 0 an ε-prediction cannot recover x_0 at t = T; train with v-prediction.
        """
        r = self.sqrt_alpha_bars[1:].clone()
        first, last = r[0].clone(), r[-1].clone()
        r = (r - last) * first / (first - last)
        ab = torch.cat([torch.ones(1, dtype=F64), r**2])
        betas = 1.0 - ab[1:] / ab[:-1]
        full = torch.cat([torch.zeros(1, dtype=F64), betas])
        return NoiseSchedule(full, name=f"{self.name}+zero_snr", _allow_terminal_one=True)

    # ---------------------------------------------------------------- derived
    @property
    def snr(self) -> Tensor:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t), eq. :eq:`eq-snr`; SNR(0) = inf."""
        return self.alpha_bars / (1.0 - self.alpha_bars)

    @property
    def log_snr(self) -> Tensor:
        """log SNR(t) = log ᾱ_t - log(1 - ᾱ_t)."""
        return torch.log(self.alpha_bars) - torch.log1p(-self.alpha_bars)

    # ---------------------------------------------------------------- continuous noise levels
    @property
    def sigmas(self) -> Tensor:
        """σ_t = √((1-ᾱ_t)/ᾱ_t) for t = 0..T (length T+1, float64): σ_0 = 0, σ_T = ∞ if ᾱ_T = 0.

        Karras et al. (2022)'s noise level: x_t / √ᾱ_t = x_0 + σ_t ε, eq. :eq:`eq-edm-sigma`; the ODE in this
        variable is eq. :eq:`eq-prob-flow-ode`.
        """
        ab = self.alpha_bars
        return ((1.0 - ab) / ab).sqrt()

    def sigma_at(self, t: float | Tensor) -> Tensor:
        """σ(t) for a real t in [0, T]: log σ interpolated linearly between the integer steps.

        The continuous extension k-diffusion uses for discrete-time networks (its
        ``DiscreteSchedule.t_to_sigma``), in paper indexing: on [1, T] log σ is piecewise linear in t,
        and on [0, 1] σ itself is linear (σ_0 = 0 has no logarithm). Integer t gives
        ``sigmas[t]`` exactly. With ᾱ_T = 0, σ(t) = ∞ on (T-1, T]. Returns a float64 tensor
        shaped like t (on CPU).
        """
        return self.sigma_at_unchecked(self._real_t(t))

    def sigma_at_unchecked(self, t: Tensor) -> Tensor:
        """:meth:`sigma_at` computed on t's device (float64 there) with no validation and no host read.

        For sampling loops on a GPU: the caller guarantees t lies in [0, T] (the samplers' grids do).
        The σ table is copied to the device once (see :meth:`_coef`).
        """
        t = t.detach().to(F64)
        sig = self.sigmas if t.device.type == "cpu" else self._table_on("sigmas", t.device)
        lo = t.floor().long().clamp(0, self.T - 1)
        w = t - lo
        s_lo, s_hi = sig[lo], sig[lo + 1]
        with torch.no_grad():
            log_mix = torch.exp((1 - w) * s_lo.clamp(min=1e-300).log() + w * s_hi.log())
        out = torch.where(lo == 0, w * s_hi, log_mix)                 # [0, 1]: linear in σ
        out = torch.where(w == 0, s_lo, torch.where(w == 1, s_hi, out))
        return out

    def t_from_sigma(self, sigma: float | Tensor) -> Tensor:
        """The real t in [0, T] with σ(t) = σ (eq. :eq:`eq-edm-sigma`): the inverse of :meth:`sigma_at`
        (float64, on CPU).

        σ must lie in [0, σ_T]; with ᾱ_T = 0 the continuous range ends at σ_{T-1} (σ = ∞ maps to T).
        """
        sig = self.sigmas
        sigma = torch.as_tensor(sigma, dtype=F64)
        sigma = sigma.detach().to(device="cpu", dtype=F64) if sigma.device.type != "cpu" else sigma.to(F64)
        if torch.isnan(sigma).any() or (sigma < 0).any():
            raise ValueError("sigma must be >= 0 (a noise level σ = √((1-ᾱ)/ᾱ))")
        top = sig[-1] if torch.isfinite(sig[-1]) else sig[-2]
        bad = (sigma > top) & ~(torch.isinf(sigma) & torch.isinf(sig[-1]))
        if bad.any():
            raise ValueError(
                f"sigma must lie in [0, {float(top):.6g}] (the schedule's largest finite σ, "
                f"t = {self.T if torch.isfinite(sig[-1]) else self.T - 1}); got {float(sigma.max()):.6g}"
            )
        finite = sig[1:self.T] if not torch.isfinite(sig[-1]) else sig[1:]     # σ_1 .. σ_top, increasing
        log_tab = finite.log()
        i = torch.searchsorted(finite, sigma.clamp(min=finite[0], max=finite[-1]).contiguous(), right=False)
        i = i.clamp(1, finite.numel() - 1)                                   # segment [finite[i-1], finite[i]]
        a, b = log_tab[i - 1], log_tab[i]
        w = ((sigma.clamp(min=finite[0], max=finite[-1]).log() - a) / (b - a)).clamp(0, 1)
        t = i.to(F64) + w                                                    # finite[i-1] is σ at step i
        t = torch.where(sigma < finite[0], sigma / finite[0], t)            # [0, 1]: linear in σ
        return torch.where(torch.isinf(sigma), torch.full_like(t, float(self.T)), t)

    def alpha_bar_at(self, t: float | Tensor) -> Tensor:
        """ᾱ(t) = 1 / (1 + σ(t)²) for a real t in [0, T] (float64); equals ``alpha_bars[t]`` at integers."""
        return 1.0 / (1.0 + self.sigma_at(t) ** 2)

    def _real_t(self, t: float | Tensor) -> Tensor:
        if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
            raise TypeError(f"t must be a number or a tensor of (fractional) steps; got {type(t).__name__}")
        t = torch.as_tensor(t, dtype=F64) if not isinstance(t, Tensor) else t.detach()   # no float32 detour
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must be a real number or tensor; got dtype {t.dtype}")
        t = t.to(device="cpu", dtype=F64)
        if not torch.isfinite(t).all() or (t < 0).any() or (t > self.T).any():
            raise ValueError(f"t must lie in [0, {self.T}] (paper indexing, fractional steps allowed); "
                             f"got values in [{float(t.min()):.6g}, {float(t.max()):.6g}]")
        return t

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name}, T={self.T}, ᾱ_T={float(self.alpha_bars[-1]):.3g})"

    def __len__(self) -> int:
        return self.T + 1

    def to_config(self) -> dict:
        """A JSON-able description; ``from_config`` rebuilds the identical schedule."""
        return {"name": self.name, "betas": self.betas[1:].tolist()}

    @classmethod
    def from_config(cls, cfg: dict) -> NoiseSchedule:
        """Rebuild a schedule from ``to_config()``'s dict ``{"name": ..., "betas": [β_1, ..., β_T]}``."""
        if not isinstance(cfg, dict) or "betas" not in cfg:
            raise ValueError("from_config expects a dict with key 'betas' (as written by to_config)")
        betas = _as_f64(cfg["betas"], "betas")
        full = torch.cat([torch.zeros(1, dtype=F64), betas])
        return cls(full, name=cfg.get("name", "custom"), _allow_terminal_one=bool(betas[-1] == 1))

    # ---------------------------------------------------------------- Gaussian math
    def _t(self, t: int | Tensor, x: Tensor, low: int = 0) -> Tensor:
        t = check_timesteps(t, self.T, low=low)
        check_batch(t, x)
        return t

    def _coef(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """``extract(self.<name>, t, x)`` with the table on t's device, copied there once per device.

        The trainer keeps t on the CPU (no copy at all); a caller with t on a GPU gets a table that
        was moved there on first use instead of a host-to-device copy of all T+1 entries per call.
        """
        return extract(self._table_on(name, t.device), t, x)

    def _table_on(self, name: str, device: torch.device) -> Tensor:
        """The per-step table ``name`` (an attribute or property) on ``device``, copied there once."""
        cache = self.__dict__.setdefault("_device_tables", {})
        if (name, device) in cache:
            return cache[(name, device)]
        table = getattr(self, name)
        if table.device == device:
            return table
        cache[(name, device)] = table.to(device)
        return cache[(name, device)]

    def q_sample(self, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, a draw from q(x_t | x_0), eq. :eq:`eq-forward-closed`
        (the reparameterisation :eq:`eq-reparam` of that Gaussian)."""
        check_same_shape(x0=x0, noise=noise)
        t = self._t(t, x0)
        return self._coef("sqrt_alpha_bars", t, x0) * x0 + self._coef("sqrt_one_minus_alpha_bars", t, x0) * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), eqs. :eq:`eq-posterior-mean`, :eq:`eq-posterior-var`.

        Returns ``(mean, var)``: mean has x's shape, var broadcasts against it. Needs t in [1, T].
        """
        check_same_shape(x0=x0, xt=xt)
        t = self._t(t, xt, low=1)
        mean = self._coef("posterior_coef_x0", t, xt) * x0 + self._coef("posterior_coef_xt", t, xt) * xt
        return mean, self._coef("posterior_variance", t, xt)

    def x0_from_eps(self, xt: Tensor, t: int | Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t, eq. :eq:`eq-x0-from-eps`. Undefined where ᾱ_t = 0."""
        check_same_shape(xt=xt, eps=eps)
        t = self._t(t, xt)
        return (xt - self._coef("sqrt_one_minus_alpha_bars", t, xt) * eps) / self._coef("sqrt_alpha_bars", t, xt)

    def eps_from_x0(self, xt: Tensor, t: int | Tensor, x0: Tensor) -> Tensor:
        """ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t), eq. :eq:`eq-x0-from-eps` solved for ε; needs t >= 1."""
        check_same_shape(xt=xt, x0=x0)
        t = self._t(t, xt, low=1)
        return (xt - self._coef("sqrt_alpha_bars", t, xt) * x0) / self._coef("sqrt_one_minus_alpha_bars", t, xt)

    def v_from_x0_eps(self, x0: Tensor, t: int | Tensor, eps: Tensor) -> Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022), eq. :eq:`eq-v`."""
        check_same_shape(x0=x0, eps=eps)
        t = self._t(t, x0)
        return self._coef("sqrt_alpha_bars", t, x0) * eps - self._coef("sqrt_one_minus_alpha_bars", t, x0) * x0

    def x0_from_v(self, xt: Tensor, t: int | Tensor, v: Tensor) -> Tensor:
        """x_0 = √ᾱ_t x_t - √(1-ᾱ_t) v, eq. :eq:`eq-v`."""
        check_same_shape(xt=xt, v=v)
        t = self._t(t, xt)
        return self._coef("sqrt_alpha_bars", t, xt) * xt - self._coef("sqrt_one_minus_alpha_bars", t, xt) * v

    def eps_from_v(self, xt: Tensor, t: int | Tensor, v: Tensor) -> Tensor:
        """ε = √(1-ᾱ_t) x_t + √ᾱ_t v, eq. :eq:`eq-v`."""
        check_same_shape(xt=xt, v=v)
        t = self._t(t, xt)
        return self._coef("sqrt_one_minus_alpha_bars", t, xt) * xt + self._coef("sqrt_alpha_bars", t, xt) * v

    def predict_x0_eps(
        self, xt: Tensor, t: int | Tensor, out: Tensor, prediction: Prediction = "eps"
    ) -> tuple[Tensor, Tensor]:
        """Turn a model output of kind ``prediction`` ('eps', 'x0' or 'v') into the pair (x̂_0, ε̂).

        Eqs. :eq:`eq-x0-from-eps` and :eq:`eq-v`."""
        check_choice("prediction", prediction, PREDICTIONS)
        if prediction == "eps":
            return self.x0_from_eps(xt, t, out), out
        if prediction == "x0":
            return out, self.eps_from_x0(xt, t, out)
        return self.x0_from_v(xt, t, out), self.eps_from_v(xt, t, out)

    def target(self, x0: Tensor, t: int | Tensor, eps: Tensor, prediction: Prediction = "eps") -> Tensor:
        """The regression target for a network of kind ``prediction`` (ε, x_0 or v)."""
        check_choice("prediction", prediction, PREDICTIONS)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        return self.v_from_x0_eps(x0, t, eps)

    # ---------------------------------------------------------------- diffusers schedulers (interop)
    @classmethod
    def from_diffusers(cls, scheduler: object) -> NoiseSchedule:
        """The schedule of a diffusers scheduler (DDPMScheduler, DDIMScheduler, ...): β_{i+1} = its ``betas[i]``.

        diffusers indexes steps i = 0..T-1, so our ``alpha_bars[i + 1]`` is its ``alphas_cumprod[i]``
        (recomputed here in float64 from its β's). A zero-terminal-SNR schedule (β_T = 1) is kept.
        """
        betas = getattr(scheduler, "betas", None)
        if not isinstance(betas, Tensor) or betas.ndim != 1 or betas.numel() < 1:
            raise TypeError(f"expected a diffusers scheduler with a 1-D tensor `betas` (DDPMScheduler, DDIMScheduler"
                            f", ...); got {type(scheduler).__name__}")
        b = torch.cat([torch.zeros(1, dtype=F64), betas.detach().to("cpu", F64)])
        return cls(b, name=f"diffusers:{type(scheduler).__name__}", _allow_terminal_one=bool(b[-1] == 1))

    def to_diffusers(self, prediction: Prediction = "eps", **scheduler_kwargs: object) -> object:
        """A diffusers ``DDPMScheduler`` with exactly these β's (``trained_betas``) and the model's prediction.

        ``prediction`` 'eps' | 'x0' | 'v' becomes diffusers' ``prediction_type`` ('epsilon', 'sample',
        'v_prediction'). Defaults match ``td.ddpm_sample``: σ_t² = β̃_t (``variance_type="fixed_small"``)
        and no clipping of x̂_0 (``clip_sample=False``); ``scheduler_kwargs`` override any setting.
        Needs diffusers installed.
        """
        check_choice("prediction", prediction, PREDICTIONS)
        from diffusers import DDPMScheduler

        kind = DIFFUSERS_PREDICTION_TYPES[prediction]
        kwargs = dict(num_train_timesteps=self.T, trained_betas=self.betas[1:].tolist(), prediction_type=kind,
                      variance_type="fixed_small", clip_sample=False)
        kwargs.update(scheduler_kwargs)
        return DDPMScheduler(**kwargs)
