"""One entry point for every sampler: the registry, ``sample(name, ...)`` and an NFE counter (ch. 10)."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from torch import Tensor

from ..checks import check_choice
from ..diffusion.schedule import NoiseSchedule
from .ddpm_ddim import Model, ddim_sample, ddpm_sample
from .heun import heun_sample
from .solvers import dpmpp_2m_sample, euler_ancestral_sample, plms_sample

SAMPLERS: MappingProxyType[str, Callable[..., Tensor]] = MappingProxyType({
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "euler_a": euler_ancestral_sample,
    "dpmpp_2m": dpmpp_2m_sample,
    "plms": plms_sample,
    "heun": heun_sample,
})


def sample(name: str, model: Model, s: NoiseSchedule, shape: tuple[int, ...], **kw) -> Tensor:
    """Run the sampler called ``name`` (a key of :data:`SAMPLERS`) with keyword arguments ``kw``.

    Every sampler takes ``x_T``, ``generator``, ``device`` and ``trajectory`` (see
    :mod:`tinyddpm.sampling.common`) and returns one tensor.

    ``"ddpm"`` always takes all T steps; passing ``steps`` other than T to it is an error.
    """
    check_choice("sampler name", name, SAMPLERS)
    if name == "ddpm" and "steps" in kw:
        if kw.pop("steps") != s.T:
            raise ValueError(f"'ddpm' always takes all T = {s.T} steps; use 'ddim' (eta=1) for fewer")
    return SAMPLERS[name](model, s, shape, **kw)


def count_nfe(model: Model) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``model`` so that ``wrapped.nfe`` counts its calls (number of function evaluations)."""
    def wrapped(x: Tensor, t: Tensor, **kw) -> Tensor:
        wrapped.nfe += 1
        return model(x, t, **kw)
    wrapped.nfe = 0
    return wrapped
