"""Error against NFE on the mixture oracle: how fast each sampler converges, with ground truth.

For a Gaussian mixture the exact ε (and the exact flow velocity) is known, so the only error left
is the sampler's. Two measures per (sampler, NFE): the *path error* mean ‖x - x_ref‖ against a
1000-step solution of the same ODE from the same x_T (the solver's discretisation error), and the
energy distance of the samples to fresh data beside its floor (two fresh data sets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..diffusion.distances import energy_distance
from ..diffusion.mixture import GaussianMixture
from ..diffusion.schedule import NoiseSchedule
from .flow import flow_sample
from .grids import log_snr_sigmas, sigma_range
from .registry import count_nfe, sample

# sampler -> steps for an NFE budget; NFE: ddim/dpmpp_2m = n, heun = 2n - 1, flow heun = 2n.
# "heun" runs on its default Karras grid (ρ = 7), "heun_logsnr" on a grid uniform in log σ.
_STEPS: dict[str, Callable[[int], int]] = {
    "ddim": lambda nfe: nfe,
    "dpmpp_2m": lambda nfe: nfe,
    "heun": lambda nfe: (nfe + 1) // 2,
    "heun_logsnr": lambda nfe: (nfe + 1) // 2,
    "flow_euler": lambda nfe: nfe,
    "flow_heun": lambda nfe: max(nfe // 2, 1),
}
NFE_SAMPLERS: tuple[str, ...] = tuple(_STEPS)


def _run(name: str, gm: GaussianMixture, s: NoiseSchedule, x_T: Tensor, steps: int) -> tuple[Tensor, int]:
    if name.startswith("flow_"):
        model = count_nfe(gm.velocity)
        x = flow_sample(model, tuple(x_T.shape), steps=steps, solver=name[5:], x_T=x_T)
    elif name == "heun_logsnr":
        model = count_nfe(gm.as_model(s))
        x = sample("heun", model, s, tuple(x_T.shape), sigmas=log_snr_sigmas(steps, *sigma_range(s)), x_T=x_T)
    else:
        model = count_nfe(gm.as_model(s))
        x = sample(name, model, s, tuple(x_T.shape), steps=steps, x_T=x_T)
    return x, model.nfe


def nfe_table(
    gm: GaussianMixture, s: NoiseSchedule, *, nfes: Sequence[int] = (5, 10, 20, 50), n: int = 2000,
    samplers: Sequence[str] = NFE_SAMPLERS, generator: torch.Generator | None = None,
) -> list[dict[str, float | int | str]]:
    """One row per (sampler, NFE budget): actual NFE, path error, energy distance and its floor.

    All samplers start from the same x_T (float64, drawn from ``generator``); the VP samplers
    (ddim, dpmpp_2m, heun, heun_logsnr) share one reference, EDM Heun with 1000 steps on the probability-flow
    ODE; the flow samplers' reference is flow Heun with 1000 steps on dx/dt = ``gm.velocity``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x_T = torch.randn(n, gm.D, generator=g, dtype=torch.float64)
    real, fresh = gm.sample(n, generator=g), gm.sample(n, generator=g)
    floor = abs(energy_distance(fresh, real))
    refs = {"vp": _run("heun", gm, s, x_T, 1000)[0], "flow": _run("flow_heun", gm, s, x_T, 1000)[0]}
    rows = []
    for name in samplers:
        if name not in _STEPS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, _STEPS))}; got {name!r}")
        ref = refs["flow" if name.startswith("flow_") else "vp"]
        for budget in nfes:
            x, nfe = _run(name, gm, s, x_T, _STEPS[name](budget))
            rows.append({"sampler": name, "nfe": nfe, "path_error": float((x - ref).norm(dim=1).mean()),
                         "energy": energy_distance(x.float(), real), "floor": floor})
    return rows


def format_nfe_table(rows: list[dict[str, float | int | str]]) -> str:
    """A Markdown table of :func:`nfe_table`'s rows."""
    lines = ["| sampler | NFE | path error | energy distance | floor |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['nfe']} | {r['path_error']:.2e} | {r['energy']:.2e} | {r['floor']:.1e} |"
              for r in rows]
    return "\n".join(lines)


__all__ = ["NFE_SAMPLERS", "format_nfe_table", "nfe_table"]
