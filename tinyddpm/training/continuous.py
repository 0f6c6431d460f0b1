"""The continuous-time objectives: flow matching and EDM, trained by the one Trainer.

- :class:`FlowMatchingObjective`: rectified flow (Liu et al. 2023; Esser et al. 2024). Draw t from a
  uniform or logit-normal law, x_t = (1 - t) x_0 + t ε :eq:`eq-flow-path`, regress v_θ(x_t, t) on
  ε - x_0 :eq:`eq-flow-target`. The network sees ``time_scale · t`` (t ∈ [0, 1] becomes a step in
  [0, 1000], the range its sinusoidal embedding is built for); :func:`flow_velocity_model` does the
  same at sampling time.
- :class:`EDMObjective`: Karras et al. (2022). Draw ln σ ~ N(P_mean, P_std²), x = x_0 + σ n, and
  minimise λ(σ) ‖D_θ(x; σ) - x_0‖² with the preconditioned denoiser of eq. :eq:`eq-edm-precond`. For
  c_noise we feed the network the schedule's fractional step t(σ) (:meth:`NoiseSchedule.t_from_sigma`):
  like EDM's ¼ ln σ it is monotone in ln σ, and it is the input our UNet's embedding is built for, so
  the trained network is an ordinary VP model under :func:`edm_eps_model` and runs with every sampler.

Both share the draw order of :class:`~tinyddpm.training.objectives.DiffusionObjective`: indices,
the noise level, the label-dropout mask from the CPU generator, then the noise from the device one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_choice, check_nonneg_float
from ..diffusion.edm import P_MEAN, P_STD, SIGMA_DATA, edm_coefficients, edm_denoise, edm_loss_weight
from ..diffusion.flow_matching import TIME_DISTRIBUTIONS, flow_interpolate, flow_target, sample_flow_times
from ..diffusion.schedule import NoiseSchedule
from .objectives import Batch, Objective

FLOW_TIME_SCALE = 1000.0


class _Conditional(Objective):
    """Labels with dropout to the null label, shared by the two objectives (classifier-free guidance)."""

    def bind(self, trainer: Any) -> None:
        super().bind(trainer)
        self.label_dropout = trainer.config.label_dropout
        self.num_classes = trainer.num_classes
        self.labels = None if self.num_classes is None else trainer.data.labels.long().to(self.device)

    def _draw_common(self, B: int, batch_gen: torch.Generator, level: Tensor) -> Batch:
        out = {"idx": torch.randint(self.n, (B,), generator=batch_gen), "level": level}
        if self.labels is not None:
            out["drop"] = torch.rand(B, generator=batch_gen) < self.label_dropout
        return out

    def _cond(self, batch: Batch) -> dict[str, Tensor]:
        if self.labels is None:
            return {}
        y = self.labels[batch["idx"].to(self.labels.device)]
        return {"y": torch.where(batch["drop"].to(self.device), torch.full_like(y, self.num_classes), y)}


class FlowMatchingObjective(_Conditional):
    """E ‖v_θ(x_t, t) - (ε - x_0)‖² with t ~ ``time_distribution``, eq. :eq:`eq-flow-target`."""

    name = "flow"

    def __init__(self, time_distribution: str = "logit_normal", *, mean: float = 0.0, std: float = 1.0,
                 time_scale: float = FLOW_TIME_SCALE):
        self.time_distribution = check_choice("time_distribution", time_distribution, TIME_DISTRIBUTIONS)
        self.mean, self.std = float(mean), float(std)
        self.time_scale = check_nonneg_float("time_scale", time_scale)

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        t = sample_flow_times(B, self.time_distribution, mean=self.mean, std=self.std, generator=batch_gen)
        out = self._draw_common(B, batch_gen, t)
        out["noise"] = torch.randn((B, *self.shape), generator=noise_gen, device=noise_gen.device)
        return out

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        x0, eps = self.rows(batch), batch["noise"]
        t = batch["level"].to(self.device, x0.dtype)
        v = net(flow_interpolate(x0, eps, t), t * self.time_scale, **self._cond(batch))
        return (v.float() - flow_target(x0, eps)).pow(2).mean()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "time_distribution": self.time_distribution, "mean": self.mean,
                "std": self.std, "time_scale": self.time_scale}


class EDMObjective(_Conditional):
    """E λ(σ) ‖D_θ(x_0 + σ n; σ) - x_0‖², ln σ ~ N(p_mean, p_std²), eq. :eq:`eq-edm-precond`.

    σ is clipped to the schedule's range [σ_1, σ_T] (about 0.01 to 157 for the linear schedule), which
    holds all but ~1e-4 of EDM's log-normal draws.
    """

    name = "edm"

    def __init__(self, schedule: NoiseSchedule, *, sigma_data: float = SIGMA_DATA, p_mean: float = P_MEAN,
                 p_std: float = P_STD):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule (it maps σ to the network's step); "
                            f"got {type(schedule).__name__}")
        self.schedule = schedule
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        edm_coefficients(1.0, self.sigma_data)                     # validates sigma_data
        finite = schedule.sigmas[1:][torch.isfinite(schedule.sigmas[1:])]
        self.log_sigma_range = (float(finite[0].log()), float(finite[-1].log()))   # where t(σ) is defined

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        log_sigma = (self.p_mean + self.p_std * torch.randn(B, generator=batch_gen)).clamp(*self.log_sigma_range)
        out = self._draw_common(B, batch_gen, log_sigma)
        out["noise"] = torch.randn((B, *self.shape), generator=noise_gen, device=noise_gen.device)
        return out

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        x0, n = self.rows(batch), batch["noise"]
        sigma64 = batch["level"].double().exp()                                   # on the CPU: no device sync
        t_net = self.schedule.t_from_sigma(sigma64).to(self.device, torch.float32)
        c_skip, c_out, c_in, _ = edm_coefficients(sigma64, self.sigma_data)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        sigma = sigma64.to(self.device, x0.dtype).reshape(shape)
        x = x0 + sigma * n
        F = net(c_in.to(self.device, x0.dtype).reshape(shape) * x, t_net, **self._cond(batch))
        D = edm_denoise(F.float(), x, sigma64.to(self.device), self.sigma_data)
        weight = edm_loss_weight(sigma64, self.sigma_data).to(self.device, x0.dtype).reshape(shape)
        return (weight * (D - x0).pow(2)).mean()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_data": self.sigma_data, "p_mean": self.p_mean, "p_std": self.p_std}


def flow_velocity_model(net: nn.Module, time_scale: float = FLOW_TIME_SCALE, **cond: Any):
    """``model(x, t)`` with t ∈ [0, 1] for :func:`tinyddpm.flow_sample`: calls ``net(x, time_scale · t, **cond)``."""
    return lambda x, t: net(x, t * time_scale, **cond)


def edm_eps_model(net: nn.Module, schedule: NoiseSchedule, sigma_data: float = SIGMA_DATA, **cond: Any):
    """An EDM-trained network as a VP ε-model ``model(x_t, t)`` (integer or fractional t ≥ 1 step of noise).

    σ = σ_t (:meth:`NoiseSchedule.sigma_at`), x̄ = x_t √(1 + σ²), D = c_skip x̄ + c_out F(c_in x̄, t),
    ε̂ = (x̄ - D)/σ: the same (x̂_0, ε̂) pair every VP sampler expects, so DDIM, DPM-Solver++ and Heun
    all sample an EDM model.
    """
    def model(xt: Tensor, t: Tensor) -> Tensor:
        if t.device.type == "cpu":   # validated here; on a GPU σ is computed there, with no host read
            sigma64 = schedule.sigma_at(t.double())
            if bool((sigma64 <= 0).any()):
                raise ValueError("an EDM model needs σ_t > 0: call it at t > 0")
        else:
            sigma64 = schedule.sigma_at_unchecked(t)
        c_skip, c_out, c_in, _ = edm_coefficients(sigma64, sigma_data)
        shape = (-1,) + (1,) * (xt.ndim - 1)
        sig = sigma64.to(xt.device, xt.dtype).reshape(shape)
        xbar = xt * (1 + sig * sig).sqrt()
        F = net(c_in.to(xt.device, xt.dtype).reshape(shape) * xbar, t, **cond)
        D = edm_denoise(F.to(xt.dtype), xbar, sigma64.to(xt.device), sigma_data)
        return (xbar - D) / sig

    return model


__all__ = ["EDMObjective", "FlowMatchingObjective", "edm_eps_model", "flow_velocity_model"]
