"""How good is a digits model trained for a few CPU-minutes? Train a recipe (or a variant), then measure it.

Trains ``RECIPES[--recipe]`` with any settings changed by ``--set`` (``train.*``, ``diffusion.*``, ``model.*``
or ``preset``), timing the training (wall clock and this process's CPU time, all threads), then draws
``--n`` samples with DDIM (η = 0, ``--steps`` steps, x̂_0 clipped, a fixed seed) and prints the digits
metrics beside their real-vs-real floors (chapter 5): the fraction of samples the classifier labels
with confidence ≥ 0.9 (real test digits: 0.923) and the Fréchet distance of its features. A conditional
recipe ("digits-cond") asks for 100 of each digit at every classifier-free guidance weight ``--guidance``.

    python benchmarks/digits_recipe.py --threads 1                           # the shipped "digits" recipe
    python benchmarks/digits_recipe.py --threads 1 --set diffusion.prediction=v train.steps=2000
    python benchmarks/digits_recipe.py --threads 1 --set preset=digits-tiny model.base_channels=32
    python benchmarks/digits_recipe.py --threads 1 --recipe digits-cond --eta 0 --guidance 1 2

One JSON line per run is appended to ``--log`` (default: none) so that a sweep can be tabulated later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from typing import Any

import torch

import tinyddpm as td
from tinyddpm.pretrained import RECIPES, Recipe, train_recipe


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="digits", choices=[k for k, r in RECIPES.items() if r.data == "digits"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change a setting of the recipe")
    p.add_argument("--n", type=int, default=1000, help="samples to measure (default 1000)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, nargs="+", default=[0.0, 1.0], help="DDIM η values to measure (default 0 1)")
    p.add_argument("--seed", type=int, default=123, help="sampling seed (default 123)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0],
                   help="classifier-free guidance weights for a conditional recipe (default 1 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log", default=None, help="append one JSON line with the settings and results")
    p.add_argument("--keep", default=None, help="train into this directory (kept) instead of a temporary one")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    recipe = apply_settings(RECIPES[a.recipe], a.set)

    with tempfile.TemporaryDirectory() as tmp:
        out = a.keep or tmp
        wall, cpu = time.perf_counter(), time.process_time()
        train_recipe(recipe, out)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        ckpt = td.load_checkpoint(out)
    params = td.count_parameters(ckpt.model)
    labels = torch.arange(a.n) % 10 if recipe.conditional else None
    result = {"recipe": a.recipe, "set": a.set, "params": params, "threads": torch.get_num_threads(),
              "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1), "ddim_steps": a.steps, "n": a.n}
    print(f"{a.recipe} {' '.join(a.set) or '(as shipped)'}: {params:,} params, trained in {wall:.0f} s wall / "
          f"{cpu:.0f} s CPU on {result['threads']} thread(s)")
    clf = td.digits_classifier()
    for w in a.guidance if recipe.conditional else [None]:
        for eta in a.eta:  # one chunk with a fresh generator: every (w, η) starts from the same noise
            x = ckpt.sample(a.n, sampler="ddim", steps=a.steps, eta=eta, batch_size=a.n, y=labels,
                            generator=torch.Generator().manual_seed(a.seed),
                            guidance=1.0 if w is None else w)
            m = td.digits_metrics(x, labels, classifier=clf)
            key = f"eta={eta:g}" + ("" if w is None else f",w={w:g}")
            result[key] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                           if k != "per_class_accuracy"}
            print(f"DDIM-{a.steps}, η = {eta:g}" + ("" if w is None else f", guidance w = {w:g}") + ": "
                  + td.format_metrics(m, sep="; "))
    if a.log:
        with open(a.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
