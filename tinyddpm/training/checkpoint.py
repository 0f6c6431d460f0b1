"""Checkpoints: a directory per step, written atomically, loaded without executing code.

A run directory looks like::

    runs/digits/
        latest                 # text file: "step_000400"
        step_000300/ step_000400/
            model.safetensors  # raw weights θ (safetensors: plain tensors, no code)
            ema.safetensors    # EMA weights θ̄, eq. (eq-ema)
            config.json        # model kind + config, schedule, diffusion/train configs, data info, step
            state.pt           # optimiser, EMA counters, RNG states (torch.load(weights_only=True))

A step directory is first written under a hidden temporary name in the same parent, every file
fsync'ed, then renamed into place; ``latest`` is replaced the same way. A crash at any moment
leaves the previous checkpoint complete and ``latest`` pointing at a complete directory.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ..diffusion.schedule import NoiseSchedule
from .config import DiffusionConfig, TrainConfig

FORMAT_VERSION = 1
LATEST = "latest"
FILES = ("model.safetensors", "ema.safetensors", "config.json", "state.pt")


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------- atomic writes
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)  # a directory's entries are durable only once the directory is synced
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def _save_weights(model: nn.Module, path: Path) -> None:
    save_model(model, str(path))  # handles shared (tied) tensors


def _save_state(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: temp file in the same dir, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_dir_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh hidden dir next to ``final``, fsync it, rename it to ``final``.

    If ``write`` raises, the temporary directory is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, then drop it
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(final.parent)
    return final


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
        _save_weights(model, tmp / "model.safetensors")
        if ema_model is not None:
            _save_weights(ema_model, tmp / "ema.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        _save_state(state, tmp / "state.pt")

    final = write_dir_atomic(run_dir / step_dirname(step), write)
    write_text_atomic(run_dir / LATEST, final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
    missing, unexpected = load_model(model, str(path), strict=True, device=str(device))
    return model


@dataclass
class Checkpoint:
    """A trained model ready to sample: the network (EMA weights by default), its schedule, configs."""

    model: nn.Module
    schedule: NoiseSchedule
    model_kind: str
    model_config: dict[str, Any]
    diffusion: DiffusionConfig | None
    train: TrainConfig
    data: dict[str, Any]
    step: int
    path: Path
    ema: bool

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

    def denoiser(
        self, y: int | torch.Tensor | None = None, guidance: float = 1.0,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``model(x_t, t)`` for the samplers.

        A conditional model gets class ``y`` (int or (B,) labels) with classifier-free guidance
        weight ``guidance`` (eq. eq-cfg; 1 = plain conditional), or the null label when y is None.
        """
        model = self.model
        if self.num_classes is None:
            if y is not None:
                raise ValueError("this model is unconditional; it takes no class label")
            return lambda x, t: model(x, t)
        if y is None:
            return lambda x, t: model(x, t, y=torch.full((x.shape[0],), self.num_classes, dtype=torch.long,
                                                         device=x.device))
        from ..sampling.guidance import guided_model

        return guided_model(model, y, guidance, num_classes=self.num_classes)

    def sample_chunks(
        self, n: int, *, sampler: str = "ddim", steps: int | None = None, eta: float | None = None,
        seed: int = 0, batch_size: int = 256, y: int | torch.Tensor | None = None, guidance: float = 1.0,
        clip_x0: bool | None = None, device: str | torch.device | None = None,
    ) -> Iterator[torch.Tensor]:
        """Draw ``n`` samples in chunks of at most ``batch_size``, yielding each chunk (on CPU).

        Memory stays bounded by the chunk size whatever ``n`` is. ``sampler`` is a name from
        :data:`tinyddpm.solvers.SAMPLERS`; ``steps`` defaults to min(50, T) (all T for "ddpm"); ``eta``
        goes to samplers that take it. ``y`` may be an int or (n,) labels. One generator seeded
        with ``seed`` runs through the chunks, so (seed, batch_size) fixes the result. Images are
        clipped to [-1, 1] through x̂_0 unless ``clip_x0=False``.
        """
        from ..checks import check_int
        from ..sampling.registry import sample

        n, batch_size = check_int("n", n, low=1), check_int("batch_size", batch_size, low=1)
        kwargs = sampler_kwargs(sampler, self.schedule.T, steps, eta)
        if isinstance(y, torch.Tensor) and y.ndim == 1 and y.shape[0] != n:
            raise ValueError(f"got {y.shape[0]} labels for n = {n} samples")
        device = torch.device(device) if device is not None else next(self.model.parameters()).device
        clip = bool(self.data.get("is_image", False)) if clip_x0 is None else clip_x0
        g = torch.Generator(device).manual_seed(seed)
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            yy = y[start:start + b] if isinstance(y, torch.Tensor) and y.ndim == 1 else y
            x = sample(sampler, self.denoiser(yy, guidance), self.schedule, (b, *self.sample_shape), generator=g,
                       prediction=self.prediction, clip_x0=clip, device=device, **kwargs)
            yield x.float().cpu()

    def sample(self, n: int, **kwargs: Any) -> torch.Tensor:
        """``n`` samples as one (n, ...) tensor; see :meth:`sample_chunks` for the options."""
        return torch.cat(list(self.sample_chunks(n, **kwargs)))


def sampler_kwargs(sampler: str, T: int, steps: int | None, eta: float | None) -> dict[str, Any]:
    """Check (sampler, steps, eta) and return the keyword arguments that sampler takes."""
    import inspect

    from ..checks import check_choice, check_int, check_nonneg_float
    from ..sampling.registry import SAMPLERS

    check_choice("sampler", sampler, SAMPLERS)
    params = inspect.signature(SAMPLERS[sampler]).parameters
    kwargs: dict[str, Any] = {}
    if "steps" in params:
        kwargs["steps"] = check_int("steps", min(50, T) if steps is None else steps, low=1, high=T)
    elif steps is not None and check_int("steps", steps, low=1) != T:
        raise ValueError(f"sampler {sampler!r} always takes all T = {T} steps; use 'ddim' for fewer")
    if eta is not None:
        eta = check_nonneg_float("eta", eta)
        if "eta" in params:
            kwargs["eta"] = eta
        elif eta != 0:
            raise ValueError(f"sampler {sampler!r} takes no eta; samplers with eta: "
                             + ", ".join(k for k, f in SAMPLERS.items() if "eta" in inspect.signature(f).parameters))
    return kwargs


def load_checkpoint(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint (run dir or step dir) for sampling: EMA weights unless ``ema=False``.

    Reads only config.json and safetensors files, so no code runs; the model is in eval mode.
    """
    from ..nets.presets import build_model

    step_dir = resolve_checkpoint(path)
    cfg = read_config(step_dir)
    model = build_model(cfg["model"]["kind"], cfg["model"]["config"])
    weights = step_dir / ("ema.safetensors" if ema else "model.safetensors")
    if ema and not weights.is_file():
        raise FileNotFoundError(f"{step_dir} has no ema.safetensors; pass ema=False for the raw weights")
    load_weights(model, weights, device="cpu")
    model.to(device).eval().requires_grad_(False)
    return Checkpoint(
        model=model, schedule=NoiseSchedule.from_config(cfg["schedule"]), model_kind=cfg["model"]["kind"],
        model_config=cfg["model"]["config"],
        diffusion=DiffusionConfig.from_dict(cfg["diffusion"]) if cfg.get("diffusion") else None,
        train=TrainConfig.from_dict(cfg["train"]), data=cfg["data"], step=int(cfg["step"]),
        path=step_dir, ema=ema,
    )
