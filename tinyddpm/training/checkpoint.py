"""Checkpoints: a directory per step, written atomically, loaded without executing code.

A run directory looks like::

    runs/digits/
        latest                 # text file: "step_000400"
        step_000300/ step_000400/
            model.safetensors  # raw weights θ (safetensors: plain tensors, no code)
            ema.safetensors    # EMA weights θ̄, eq. :eq:`eq-ema`
            config.json        # model kind + config, schedule, diffusion/train configs,
                               # data info, step
            state.pt           # optimiser, EMA counters, RNG states
                               # (read with torch.load(weights_only=True))

A step directory is first written under a hidden temporary name in the same parent, every file
fsync'ed, then renamed into place; ``latest`` is replaced the same way (both through
:mod:`tinyddpm.atomic`). A crash at any moment leaves the previous checkpoint complete and
``latest`` pointing at a complete directory.

Every trained model of the package is saved in this one format: diffusion denoisers ("unet",
"mlp"), the VAE ("vae"), the digits classifier ("digits-classifier"), the noise-aware classifier of
classifier guidance ("noisy-classifier"), the tiny CLIP ("clip") and the whole text-to-image
pipeline ("text2img"); ``config.json["model"]`` = ``{"kind", "config"}`` rebuilds it
(:func:`build_from_entry`) and :func:`load_checkpoint` loads any of them.
"""

from __future__ import annotations

import json
import os  # noqa: F401  (tests patch os.replace through this module to simulate a crash)
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ..atomic import write_dir_atomic, write_text_atomic
from ..diffusion.schedule import NoiseSchedule
from .config import DiffusionConfig, TrainConfig

FORMAT_VERSION = 1
LATEST = "latest"
FILES = ("model.safetensors", "ema.safetensors", "config.json", "state.pt")


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------- writing
def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write a module's weights as safetensors (handles shared, tied tensors)."""
    save_model(model, str(path))


def _save_state(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step directories of a run, oldest first (hidden temporaries are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    dirs = [p for p in run_dir.glob("step_*")
            if p.name[5:].isdigit() and p.is_dir() and (p / "config.json").is_file()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    run_dir: str | Path, *, step: int, model: nn.Module, ema_model: nn.Module | None,
    config: dict[str, Any], state: dict[str, Any], keep_last: int = 3,
) -> Path:
    """Write ``run_dir/step_XXXXXX/`` atomically, point ``latest`` at it, keep the newest ``keep_last``."""
    run_dir = Path(run_dir)

    def write(tmp: Path) -> None:
        save_weights(model, tmp / "model.safetensors")
        if ema_model is not None:
            save_weights(ema_model, tmp / "ema.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        _save_state(state, tmp / "state.pt")

    final = write_dir_atomic(run_dir / step_dirname(step), write)
    write_text_atomic(run_dir / LATEST, final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- model kinds
def _extra_kinds() -> dict[str, tuple[type, Callable[[dict], nn.Module], Callable[[nn.Module], dict]]]:
    """Kinds beyond the denoiser presets: kind -> (class, build from config, config of a model)."""
    from ..metrics import DigitsClassifier
    from ..nets.clip import TinyCLIP
    from ..nets.vae import VAE, VAEConfig
    from ..text2img import TextToImage
    from .noisy_classifier import NoisyClassifier

    return {
        "vae": (VAE, lambda c: VAE(VAEConfig.from_dict(c)), lambda m: m.config.to_dict()),
        "text2img": (TextToImage, TextToImage.from_config, lambda m: m.to_config()),
        "digits-classifier": (DigitsClassifier, lambda c: DigitsClassifier(**c), lambda m: m.to_config()),
        "clip": (TinyCLIP, TinyCLIP.from_config, lambda m: m.to_config()),
        "noisy-classifier": (NoisyClassifier, lambda c: NoisyClassifier(**c), lambda m: m.to_config()),
    }


def _unwrap(model: nn.Module) -> nn.Module:
    for attr in ("_orig_mod", "module", "_orig_mod"):  # torch.compile, DDP
        model = getattr(model, attr, model)
    return model


def model_entry(model: nn.Module) -> dict[str, Any]:
    """``{"kind": ..., "config": ...}`` for config.json: what :func:`build_from_entry` rebuilds ``model`` from."""
    from ..nets.presets import MODEL_KINDS, model_kind

    inner = _unwrap(model)
    if type(inner) in MODEL_KINDS.values():
        return {"kind": model_kind(inner), "config": dict(inner.config)}
    for kind, (cls, _, config_of) in _extra_kinds().items():
        if type(inner) is cls:
            return {"kind": kind, "config": config_of(inner)}
    raise ValueError(f"{type(inner).__name__} is not a registered model kind; registered: "
                     f"{', '.join([*MODEL_KINDS, *_extra_kinds()])}")


def build_from_entry(kind: str, config: dict[str, Any]) -> nn.Module:
    """A fresh model of ``kind`` built from its recorded config (no weights; no code from the checkpoint runs)."""
    from ..nets.presets import MODEL_KINDS, build_model

    extra = _extra_kinds()
    if kind in extra:
        return extra[kind][1](config)
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r} in the checkpoint; known: {', '.join([*MODEL_KINDS, *extra])}")
    return build_model(kind, config)


# ----------------------------------------------------------------------------- reading
def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a step directory or a run directory (via its ``latest`` file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if (path / "config.json").is_file():
        return path
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text(encoding="utf-8").strip()
        step_dir = path / name
        if name.startswith("step_") and "/" not in name and (step_dir / "config.json").is_file():
            return step_dir
        raise FileNotFoundError(f"{path / LATEST} points at {name!r}, which is not a complete checkpoint")
    done = list_checkpoints(path)
    if done:
        return done[-1]
    raise FileNotFoundError(f"no checkpoint in {path}: expected a step_XXXXXX/ directory or a run directory")


def read_config(step_dir: str | Path) -> dict[str, Any]:
    cfg = json.loads((Path(step_dir) / "config.json").read_text(encoding="utf-8"))
    if cfg.get("format") != FORMAT_VERSION:
        raise ValueError(f"{step_dir}: checkpoint format {cfg.get('format')!r}, expected {FORMAT_VERSION}")
    return cfg


def read_state(step_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load state.pt with ``weights_only=True``: tensors and plain containers only, never code."""
    path = Path(step_dir) / "state.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, "
            f"and unpickling them could run code ({str(e).splitlines()[0]})"
        ) from None


def load_weights(model: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load safetensors weights into ``model`` (strict); a model with ``verify_weights()`` then checks them."""
    load_model(model, str(path), strict=True, device=str(device))
    verify = getattr(model, "verify_weights", None)
    if callable(verify):
        verify()
    return model


@dataclass
class Checkpoint:
    """A trained model ready to sample: the network (EMA weights by default), its schedule, configs."""

    model: nn.Module
    schedule: NoiseSchedule | None  # None for models that are not denoisers (vae, digits-classifier)
    model_kind: str
    model_config: dict[str, Any]
    diffusion: DiffusionConfig | None
    train: TrainConfig | None       # None for a model saved without a Trainer (e.g. TextToImage.save)
    data: dict[str, Any]
    step: int
    path: Path
    ema: bool
    #: what the network was trained on (config.json's "objective"): {"name": "diffusion" | "flow" | "edm", ...}
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "diffusion"})

    @property
    def objective_name(self) -> str:
        """"diffusion" (an ε/x_0/v network), "flow" (a velocity network) or "edm" (EDM-preconditioned)."""
        return str(self.objective.get("name", "diffusion"))

    @property
    def prediction(self) -> str:
        return self.diffusion.prediction if self.diffusion is not None else "eps"

    @property
    def num_classes(self) -> int | None:
        return self.model_config.get("num_classes")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. (1, 8, 8) for digits or (2,) for 2-D toy data."""
        return tuple(self.data["shape"])

    def denoiser(self, y: int | torch.Tensor | None = None, guidance: float | None = None):
        """``model(x_t, t)`` for the samplers; see :func:`tinyddpm.sampling.from_checkpoint.checkpoint_denoiser`."""
        from ..sampling.from_checkpoint import checkpoint_denoiser

        return checkpoint_denoiser(self, y, guidance)

    def sample_chunks(self, n: int, **kwargs: Any) -> Iterator[torch.Tensor]:
        """``n`` samples in chunks; see :func:`tinyddpm.sampling.from_checkpoint.sample_chunks` for the options."""
        from ..sampling.from_checkpoint import sample_chunks

        return sample_chunks(self, n, **kwargs)

    def sample(self, n: int, **kwargs: Any) -> torch.Tensor:
        """``n`` samples as one (n, ...) tensor; see :func:`tinyddpm.sampling.from_checkpoint.sample_chunks`."""
        return torch.cat(list(self.sample_chunks(n, **kwargs)))


def load_checkpoint(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint (run dir or step dir) for sampling: EMA weights unless ``ema=False``.

    Reads only config.json and safetensors files, so no code runs; the model is in eval mode. Any
    registered kind loads (see the module docstring); ``model_kind`` tells them apart, e.g. a
    "text2img" checkpoint's ``model`` is a :class:`tinyddpm.text2img.TextToImage`.
    """
    step_dir = resolve_checkpoint(path)
    cfg = read_config(step_dir)
    model = build_from_entry(cfg["model"]["kind"], cfg["model"]["config"])
    weights = step_dir / ("ema.safetensors" if ema else "model.safetensors")
    if ema and not weights.is_file():
        raise FileNotFoundError(f"{step_dir} has no ema.safetensors; pass ema=False for the raw weights")
    load_weights(model, weights, device="cpu")
    model.to(device).eval().requires_grad_(False)
    return Checkpoint(
        model=model, schedule=NoiseSchedule.from_config(cfg["schedule"]) if cfg.get("schedule") else None,
        model_kind=cfg["model"]["kind"], model_config=cfg["model"]["config"],
        diffusion=DiffusionConfig.from_dict(cfg["diffusion"]) if cfg.get("diffusion") else None,
        train=TrainConfig.from_dict(cfg["train"]) if cfg.get("train") else None, data=cfg.get("data") or {},
        step=int(cfg["step"]),
        path=step_dir, ema=ema, objective=cfg.get("objective") or {"name": "diffusion"},
    )
