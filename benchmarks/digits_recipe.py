"""How good is a digits model trained for a few CPU-minutes? Train a recipe (or a variant), then measure it.

Trains ``RECIPES[--recipe]`` with any settings changed by ``--set`` (``train.*``, ``diffusion.*``, ``model.*``
or ``preset``) under the objective ``--objective``, timing the training (wall clock and this process's
CPU time, all threads); then draws ``--n`` samples with each sampler of ``--samplers`` at about the same
number of network evaluations (``--nfe``, default 50; every sampler starts from the same seed) and prints
the digits metrics beside their real-vs-real floors (chapter 5): the fraction of samples the classifier
labels with confidence ≥ 0.9 (real test digits: 0.939 with the current classifier), the Fréchet distance
of its features (floor 2.83 at n = 1000) and the class balance (total variation between the classifier's
labels of the samples and the uniform distribution; 1,000 real digits: 0.019). A conditional recipe
("digits-cond") asks for 100 of each digit at every classifier-free guidance weight ``--guidance``.

Objectives (one Trainer, one network, one TrainConfig; only the loss differs):

- ``ddpm``: ε-, v- or x0-prediction (``--set diffusion.prediction=v``) on the recipe's discrete schedule,
  with the recipe's weighting (min-SNR-5 as shipped);
- ``flow``: rectified flow (:class:`tinyddpm.FlowMatchingObjective`, logit-normal t unless
  ``--flow-time uniform``);
- ``edm``: Karras et al.'s preconditioned denoiser (:class:`tinyddpm.EDMObjective`), fed the schedule's
  fractional step as c_noise.

Samplers (``--samplers``; default: every one that applies, NFE counted and reported):
``ddim`` (η = 0, n = NFE steps), ``ddim1`` (η = 1, the DDPM posterior on the same grid), ``heun``
(EDM Heun on a Karras grid, n = (NFE + 1)/2 steps, NFE 2n - 1), ``dpmpp_2m`` (n = NFE steps), ``euler_a``
(only when asked for) — for
ε/v/EDM models through ``td.sample`` (EDM via :func:`tinyddpm.edm_eps_model`), for flow models through a
flow-as-VP adapter defined here — and, for flow models, ``euler`` / ``flow_heun`` (``td.flow_sample``,
n = NFE and NFE/2 steps).

    python benchmarks/digits_recipe.py --threads 1                           # the shipped "digits" recipe
    python benchmarks/digits_recipe.py --threads 1 --set diffusion.prediction=v
    python benchmarks/digits_recipe.py --threads 1 --objective flow
    python benchmarks/digits_recipe.py --threads 1 --objective edm --samplers heun ddim1
    python benchmarks/digits_recipe.py --threads 1 --recipe digits-cond --samplers ddim ddim1 --guidance 1 2

One JSON line per run is appended to ``--log`` (default: none) so that a sweep can be tabulated later
(``--table LOG`` prints the Markdown table of such a log and exits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import tinyddpm as td
from tinyddpm.nets.presets import build_model, preset
from tinyddpm.pretrained import RECIPES, Recipe

OBJECTIVES = ("ddpm", "flow", "edm")
# name -> (registry sampler, extra keywords); steps = NFE except heun (n steps cost 2n - 1 calls)
VP_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("ddim", {"eta": 0.0}), "ddim1": ("ddim", {"eta": 1.0}), "heun": ("heun", {}),
    "dpmpp_2m": ("dpmpp_2m", {}), "euler_a": ("euler_a", {}),
}
DEFAULT_VP = ("ddim", "ddim1", "heun", "dpmpp_2m")
FLOW_SAMPLERS = {"euler": "euler", "flow_heun": "heun"}      # td.flow_sample solvers
LABELS = {"ddim": "DDIM η=0", "ddim1": "DDIM η=1", "heun": "Heun (Karras)", "dpmpp_2m": "DPM++(2M)",
          "euler_a": "Euler ancestral", "euler": "flow Euler", "flow_heun": "flow Heun"}


def _value(text: str) -> Any:
    """'2000' -> 2000, '2e-3' -> 0.002, 'true' -> True, '(1,2)' -> (1, 2), 'v' -> 'v'."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if text.startswith(("(", "[")):
        return tuple(_value(p.strip()) for p in text.strip("()[]").split(",") if p.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def apply_settings(recipe: Recipe, settings: list[str]) -> Recipe:
    """``recipe`` with ``section.key=value`` settings applied (section: train, diffusion, model; or ``preset=``)."""
    train, diffusion, model = {}, {}, dict(recipe.model_overrides)
    preset = recipe.preset
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value (e.g. train.steps=2000); got {item!r}")
        section, _, name = key.partition(".")
        if key == "preset":
            preset = text
        elif section in ("train", "diffusion", "model") and name:
            {"train": train, "diffusion": diffusion, "model": model}[section][name] = _value(text)
        else:
            raise SystemExit(f"--set keys are preset, train.<field>, diffusion.<field> or model.<arg>; got {key!r}")
    return dataclasses.replace(recipe, preset=preset, model_overrides=model,
                               train=recipe.train.replace(**train), diffusion=recipe.diffusion.replace(**diffusion))


def train(recipe: Recipe, objective: str, flow_time: str) -> tuple[torch.nn.Module, td.NoiseSchedule, list]:
    """What :func:`tinyddpm.pretrained.train_recipe` does (same seeds, same draws), in memory, with any objective.

    Returns the EMA network (eval mode), the recipe's schedule and the Trainer's per-step records. With
    ``objective="ddpm"`` the weights are those ``train_recipe(recipe, ...)`` writes.
    """
    data = td.load_dataset(recipe.data, seed=recipe.train.seed)
    overrides = dict(recipe.model_overrides)
    if recipe.conditional:
        overrides["num_classes"] = data.num_classes
    kind, cfg = preset(recipe.preset, **overrides)
    schedule = recipe.diffusion.build()
    obj = {"ddpm": lambda: None,
           "flow": lambda: td.FlowMatchingObjective(flow_time),
           "edm": lambda: td.EDMObjective(schedule)}[objective]()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(recipe.train.seed)
        model = build_model(kind, cfg)
        trainer = td.Trainer(model, schedule, data, recipe.train.replace(progress=False), None, recipe.diffusion,
                             objective=obj)
        history = trainer.train()
    return trainer.ema.model.eval().requires_grad_(False), schedule, history


def network(model: torch.nn.Module, y: Tensor | None, guidance: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The raw network as ``net(x, t)``: unconditional, or class ``y`` with classifier-free guidance.

    Guidance mixes the raw outputs (ε, v, a flow velocity or EDM's F): each is affine in ε̂ with the same
    coefficients for both branches at fixed (x, t), so this is eq. (eq-cfg) for every objective.
    """
    num_classes = model.config.get("num_classes")
    if num_classes is None:
        return lambda x, t: model(x, t)
    if y is None:
        return lambda x, t: model(x, t, y=torch.full((x.shape[0],), num_classes, dtype=torch.long))
    return td.guided_model(model, y, guidance, num_classes=num_classes)


def flow_as_vp_eps(velocity: Callable[[Tensor, Tensor], Tensor], s: td.NoiseSchedule):
    """A flow-matching velocity model ``v(x, τ)`` (τ ∈ [0, 1]) as a VP ε-model ``model(x_t, t)`` for every sampler.

    At VP step t with σ = σ_t: x^flow = (1 - τ) x_0 + τ ε = (x_0 + σ ε)/(1 + σ) for τ = σ/(1 + σ), and
    x_t = (x_0 + σ ε)/√(1 + σ²); so the flow model is called at x^flow = x_t √(1 + σ²)/(1 + σ) and τ, and
    ε̂ = x^flow + (1 - τ) v̂ (:func:`tinyddpm.diffusion.flow_matching.x0_eps_from_velocity`).
    """
    def model(xt: Tensor, t: Tensor) -> Tensor:
        sig = s.sigma_at(t.detach().cpu().double())
        tau, scale = sig / (1 + sig), (1 + sig * sig).sqrt() / (1 + sig)
        shape = (-1,) + (1,) * (xt.ndim - 1)
        tau_x = tau.to(xt.device, xt.dtype).expand(xt.shape[0])
        xf = xt * scale.to(xt.device, xt.dtype).expand(xt.shape[0]).reshape(shape)
        return xf + (1 - tau_x).reshape(shape) * velocity(xf, tau_x)

    return model


def samplers_for(objective: str) -> list[str]:
    return (["euler", "flow_heun"] if objective == "flow" else []) + list(DEFAULT_VP)


def draw(name: str, objective: str, net: Callable[[Tensor, Tensor], Tensor], s: td.NoiseSchedule,
         prediction: str, n: int, shape: tuple[int, ...], nfe: int, seed: int) -> tuple[Tensor, int, int]:
    """(samples in [-1, 1], steps, counted NFE) of sampler ``name`` at about ``nfe`` network calls."""
    g = torch.Generator().manual_seed(seed)
    if name in FLOW_SAMPLERS:
        if objective != "flow":
            raise ValueError(f"sampler {name!r} is for flow models (--objective flow)")
        steps = nfe if name == "euler" else max(1, nfe // 2)
        model = td.count_nfe(td.flow_velocity_model(net))
        x = td.flow_sample(model, (n, *shape), steps=steps, solver=FLOW_SAMPLERS[name], generator=g)
        return x.clamp(-1, 1), steps, model.nfe
    sampler, kw = VP_SAMPLERS[name]
    steps = (nfe + 1) // 2 if sampler == "heun" else nfe
    if objective == "flow":
        eps_model, prediction = flow_as_vp_eps(td.flow_velocity_model(net), s), "eps"
    elif objective == "edm":
        eps_model, prediction = td.edm_eps_model(net, s), "eps"
    else:
        eps_model = net
    model = td.count_nfe(eps_model)
    x = td.sample(sampler, model, s, (n, *shape), steps=steps, generator=g, prediction=prediction, clip_x0=True,
                  **kw)
    return x.clamp(-1, 1), steps, model.nfe


def class_balance(x: Tensor, clf: Any) -> float:
    """Total variation between the classifier's labels of ``x`` and the uniform law on the 10 digits."""
    with torch.no_grad():
        pred = clf.predict_proba(x).argmax(1).cpu()
    return 0.5 * float((torch.bincount(pred, minlength=10).double() / len(pred) - 0.1).abs().sum())


def print_table(path: str) -> None:
    """The Markdown table of a --log file: one row per (run, sampler)."""
    print("| objective | settings | sampler | steps | NFE | confident | FD | class TV | train CPU-s (ms/step) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            sets = " ".join(r.get("set", [])) or "(shipped)"
            obj = r.get("objective", "ddpm")
            obj += {"ddpm": f" ({r.get('prediction', 'eps')})",
                    "flow": f" ({r.get('flow_time', 'logit_normal')})"}.get(obj, "")
            for key, m in r.get("samples", {}).items():
                base, _, rest = key.partition(",")
                name = base.split("@")[0]
                label = LABELS.get(name, name) + (" (flow→VP)" if r.get("objective") == "flow" and name in VP_SAMPLERS
                                                  else "") + ("" if not rest else f", {rest}")
                print(f"| {obj} | {sets} | {label} | {m['steps']} | {m['nfe']} | {m['confident']:.3f} | {m['fd']:.2f} "
                      f"| {m.get('class_tv', math.nan):.3f} | {r['train_cpu_s']:.0f} ({r.get('cpu_ms_per_step')}) |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="digits", choices=[k for k, r in RECIPES.items() if r.data == "digits"])
    p.add_argument("--objective", default="ddpm", choices=OBJECTIVES,
                   help="ddpm (ε/v/x0 via diffusion.prediction), flow (rectified flow) or edm (default ddpm)")
    p.add_argument("--flow-time", default="logit_normal", choices=("logit_normal", "uniform"),
                   help="flow matching's law of t (default logit_normal)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change a setting of the recipe")
    p.add_argument("--n", type=int, default=1000, help="samples to measure (default 1000)")
    p.add_argument("--nfe", "--steps", dest="nfe", type=int, nargs="+", default=[50],
                   help="network evaluations per sample for every sampler; several values: each (default 50)")
    p.add_argument("--samplers", nargs="+", default=None, choices=list(LABELS),
                   help="samplers to measure (default: every one that applies to the objective)")
    p.add_argument("--seed", type=int, default=123, help="sampling seed (default 123)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0],
                   help="classifier-free guidance weights for a conditional recipe (default 1 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log", default=None, help="append one JSON line with the settings and results")
    p.add_argument("--table", default=None, metavar="LOG", help="print the Markdown table of a --log file and exit")
    a = p.parse_args(argv)
    if a.table:
        print_table(a.table)
        return {}
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    recipe = apply_settings(RECIPES[a.recipe], a.set)
    samplers = a.samplers or samplers_for(a.objective)
    if a.objective != "flow" and set(samplers) & set(FLOW_SAMPLERS):
        p.error(f"samplers {', '.join(FLOW_SAMPLERS)} integrate a flow velocity: use them with --objective flow")

    wall, cpu = time.perf_counter(), time.process_time()
    model, s, history = train(recipe, a.objective, a.flow_time)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    params = td.count_parameters(model)
    labels = torch.arange(a.n) % 10 if recipe.conditional else None
    test = td.load_dataset("digits", split="test")
    tail = [r["loss"] for r in history[-100:]]
    result = {"recipe": a.recipe, "objective": a.objective, "set": a.set, "params": params,
              "prediction": recipe.diffusion.prediction, "threads": torch.get_num_threads(),
              "train_steps": recipe.train.steps, "batch_size": recipe.train.batch_size,
              "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
              "cpu_ms_per_step": round(1000 * cpu / max(1, len(history)), 1),
              "final_loss": round(sum(tail) / max(1, len(tail)), 4), "nfe": a.nfe, "n": a.n, "seed": a.seed,
              "samples": {}}
    if a.objective == "flow":
        result["flow_time"] = a.flow_time
    what = a.objective + (f" ({recipe.diffusion.prediction})" if a.objective == "ddpm" else "")
    print(f"{a.recipe}, {what}, {' '.join(a.set) or '(as shipped)'}: {params:,} params, trained in {wall:.0f} s "
          f"wall / {cpu:.0f} s CPU ({result['cpu_ms_per_step']} CPU-ms/step) on {result['threads']} thread(s)",
          flush=True)
    clf = td.digits_classifier()
    train_x = td.load_dataset("digits", split="train").x
    ref = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: min(a.n, len(train_x))]]
    tv_floor = class_balance(ref, clf)
    for w in a.guidance if recipe.conditional else [None]:
        net = network(model, labels, 1.0 if w is None else w)
        for name, budget in ((nm, b) for b in a.nfe for nm in samplers):   # every sampler starts from the same seed
            t0 = time.perf_counter()
            x, steps, nfe = draw(name, a.objective, net, s, recipe.diffusion.prediction, a.n,
                                 tuple(test.x.shape[1:]), budget, a.seed)
            secs = time.perf_counter() - t0
            m = td.digits_metrics(x, labels, classifier=clf)
            m["class_tv"], m["class_tv_floor"] = class_balance(x, clf), tv_floor
            key = name + ("" if len(a.nfe) == 1 else f"@{budget}") + ("" if w is None else f",w={w:g}")
            result["samples"][key] = {"steps": steps, "nfe": nfe, "sample_s": round(secs, 1),
                                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                                         if k not in ("per_class_accuracy", "per_class_accuracy_floor")}}
            print(f"{LABELS[name]}, {steps} steps, NFE {nfe}" + ("" if w is None else f", guidance w = {w:g}")
                  + f": {td.format_metrics(m, sep='; ')}", flush=True)
    if a.log:
        with open(a.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
