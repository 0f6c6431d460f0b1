"""The training loop (book chapter 5): one Trainer for CPU, one GPU, or many GPUs under torchrun.

Each step draws a minibatch x_0, timesteps t ~ U{1..T} and noise ε, and descends the loss of
eq. (eq-loss-simple) (optionally min-SNR weighted, eq. eq-min-snr) with AdamW, linear warm-up,
gradient clipping, and an EMA of the weights (eq. eq-ema) that sampling uses.

Randomness. All draws come from two generators seeded from ``config.seed``: a CPU one for the
batch indices, t and the label-dropout mask, and one on the training device for ε. Both are saved
in every checkpoint, so a resumed run continues bit for bit (on CPU; CUDA kernels may be
non-deterministic). Under torchrun every process draws the same *global* batch and trains on its
own slice of it, so N processes see exactly what one process with the same ``batch_size`` sees.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..diffusion.schedule import NoiseSchedule
from .checkpoint import list_checkpoints, load_weights, read_config, read_state, resolve_checkpoint, save_checkpoint
from .config import RESUMABLE_CHANGES, DiffusionConfig, TrainConfig
from .ema import EMA
from .losses import diffusion_loss_at


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the weights were not updated with it."""


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is an error (not a silent CPU run)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is available; use device='auto' or 'cpu'")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); nccl on CUDA, gloo on CPU.

    With no WORLD_SIZE (or 1) this is a single process and nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _model_kind(model: nn.Module) -> str:
    from ..nets.presets import model_kind

    return model_kind(model)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tinyddpm")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable 'key: saved -> current' lines for every leaf where two config dicts differ."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            if isinstance(a, list) and isinstance(b, list) and len(a) > 8:
                out.append(f"{prefix}{key}: differs (length {len(a)} vs {len(b)})")
            else:
                out.append(f"{prefix}{key}: checkpoint has {a!r}, this run has {b!r}")
    return out


class Trainer:
    """Train ``model`` to denoise ``data`` under ``schedule`` (see the module docstring).

    ``data`` is a :class:`tinyddpm.data.Dataset` (``x`` in [-1, 1], optional ``labels``). With
    ``out_dir`` the trainer writes checkpoints (``ckpt_every`` and at the end of :meth:`train`), a
    JSONL loss log and sample grids there; ``resume=True`` continues from ``out_dir``'s latest
    checkpoint after checking that every setting that shapes the run matches.
    """

    def __init__(
        self, model: nn.Module, schedule: NoiseSchedule, data: Any, config: TrainConfig | None = None,
        out_dir: str | Path | None = None, diffusion: DiffusionConfig | None = None, *, resume: bool = False,
    ):
        config = TrainConfig() if config is None else config
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule; got {type(schedule).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}")
        if diffusion is not None and diffusion.T != schedule.T:
            raise ValueError(f"diffusion.T = {diffusion.T} but the schedule has T = {schedule.T}")
        if not isinstance(getattr(data, "x", None), Tensor) or data.x.ndim < 2 or len(data.x) == 0:
            raise TypeError("data must be a Dataset with a non-empty tensor x of shape (N, ...)")
        if resume and out_dir is None:
            raise ValueError("resume=True needs the out_dir of the run to resume")
        self.config, self.schedule, self.diffusion, self.data = config, schedule, diffusion, data
        self.prediction = diffusion.prediction if diffusion is not None else "eps"
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.dist = init_distributed(config.device)
        self.device = resolve_device(config.device, self.dist.local_rank)
        if config.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by the number of processes {self.dist.world_size}"
            )
        self.num_classes: int | None = getattr(model, "config", {}).get("num_classes")
        if self.num_classes is not None and getattr(data, "labels", None) is None:
            raise ValueError("the model is class-conditional (num_classes set) but the data has no labels")

        self.model = model.to(self.device)
        self._net: nn.Module = self.model
        if self.dist.world_size > 1:  # DDP broadcasts rank 0's weights now, so build EMA/optimiser after
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._net = DistributedDataParallel(self.model, device_ids=ids)
        # fused: one kernel for all parameters (CPU and CUDA); the per-parameter loop costs ~8 % of a small step
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.ema = EMA(self.model, config.ema_decay, start=config.ema_start, warmup=config.ema_warmup)
        self.step = 0
        self.batch_gen = torch.Generator().manual_seed(config.seed)
        self.noise_gen = torch.Generator(self.device).manual_seed(config.seed + 1)
        # keep the data on the device when it is small (the digits, CIFAR-10 on a GPU); else gather per batch
        small = data.x.numel() * data.x.element_size() < (2 << 30)
        self._x = data.x.to(self.device if small else "cpu", torch.float32)
        self._labels = data.labels.long().to(self._x.device) if self.num_classes is not None else None
        if resume:
            self._resume_from(resolve_checkpoint(self.out_dir))
        if config.compile:
            self._net = torch.compile(self._net)
        self._bf16 = config.bf16 and self.device.type == "cuda"

    # ------------------------------------------------------------------ construction from a run
    @classmethod
    def resume(cls, out_dir: str | Path, data: Any, **changes: Any) -> Trainer:
        """Rebuild model, schedule and configs from ``out_dir``'s latest checkpoint and continue it.

        ``changes`` may alter settings that do not shape the weights (e.g. ``steps`` to train longer,
        ``device``, ``log_every``); see :data:`tinyddpm.config.RESUMABLE_CHANGES`.
        """
        from ..nets.presets import build_model

        cfg = read_config(resolve_checkpoint(out_dir))
        model = build_model(cfg["model"]["kind"], cfg["model"]["config"])
        diffusion = DiffusionConfig.from_dict(cfg["diffusion"]) if cfg.get("diffusion") else None
        config = TrainConfig.from_dict(cfg["train"]).replace(**changes)
        return cls(model, NoiseSchedule.from_config(cfg["schedule"]), data, config, out_dir, diffusion, resume=True)

    @property
    def ema_model(self) -> nn.Module:
        """The network with EMA weights θ̄ (eval mode): the one to sample from."""
        return self.ema.model

    # ------------------------------------------------------------------ one step
    def _next_batch(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """This process's slice of the global batch: x_0, t, ε and (conditional models) labels y."""
        B, N = self.config.batch_size, self._x.shape[0]
        idx = torch.randint(N, (B,), generator=self.batch_gen)
        t = torch.randint(1, self.schedule.T + 1, (B,), generator=self.batch_gen)
        drop = torch.rand(B, generator=self.batch_gen) < self.config.label_dropout if self._labels is not None else None
        noise = torch.randn((B, *self._x.shape[1:]), generator=self.noise_gen, device=self.device)
        b = B // self.dist.world_size
        part = slice(self.dist.rank * b, (self.dist.rank + 1) * b)
        idx, t, noise = idx[part], t[part].to(self.device), noise[part]
        x0 = self._x[idx.to(self._x.device)].to(self.device, non_blocking=True)
        y = None
        if self._labels is not None:
            y = self._labels[idx.to(self._labels.device)].to(self.device)
            y = torch.where(drop[part].to(self.device), torch.full_like(y, self.num_classes), y)  # null label
        return x0, t, noise, y

    def _loss(self, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None) -> Tensor:
        """The mean over this process's slice of eq. (eq-loss-simple), min-SNR weighted if configured."""
        return diffusion_loss_at(
            self._net, self.schedule, x0, t, noise, prediction=self.prediction,
            weighting=self.config.weighting, min_snr_gamma=self.config.min_snr_gamma,
            model_kwargs={"y": y} if y is not None else None, reduction="mean",
        )

    def train_step(self) -> dict[str, float]:
        """One optimiser step; raises TrainingDiverged (weights untouched) on a NaN/inf loss or gradient."""
        lr = self.config.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x0, t, noise, y = self._next_batch()
        self._net.train()
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self._bf16 else contextlib.nullcontext()
        with amp:
            loss = self._loss(x0, t, noise, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        report = torch.stack([loss.detach().float(), grad_norm.float()])
        if self.dist.world_size > 1:
            dist.all_reduce(report)  # the mean loss over processes, for the log (gradients are already synced)
            report[0] /= self.dist.world_size
            report[1] /= self.dist.world_size
        loss_value, norm_value = report.tolist()  # one host sync per step
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            last = resolve_checkpoint(self.out_dir) if self.out_dir and list_checkpoints(self.out_dir) else None
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: loss = {loss_value}, gradient norm = {norm_value} "
                f"(lr = {lr:g}); the weights were not updated"
                + (f"; the last good checkpoint is {last}" if last else "; no checkpoint was written")
                + ". Try a lower lr, a longer warm-up or grad_clip."
            )
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.model)
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value}

    # ------------------------------------------------------------------ the loop
    def train(self, steps: int | None = None) -> list[dict[str, float]]:
        """Run ``steps`` more steps (default: up to ``config.steps``); return one record per step.

        Writes (rank 0 only, when ``out_dir`` is set) ``log.jsonl`` every ``log_every`` steps,
        sample grids every ``sample_every`` and checkpoints every ``ckpt_every`` and at the end.
        """
        cfg = self.config
        n = max(0, cfg.steps - self.step) if steps is None else int(steps)
        if n < 0:
            raise ValueError(f"steps must be >= 0; got {steps}")
        writes = self.out_dir is not None and self.dist.is_main
        show = cfg.progress and self.dist.is_main and sys.stderr.isatty()
        from tqdm.auto import tqdm

        history: list[dict[str, float]] = []
        window: list[float] = []
        bar = tqdm(total=n, disable=not show, desc="train", unit="step")
        tick = time.perf_counter()
        try:
            for _ in range(n):
                rec = self.train_step()
                history.append(rec)
                window.append(rec["loss"])
                if cfg.log_every and self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    it_s = len(window) / max(now - tick, 1e-9)
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{rec['lr']:.2g}")
                    if writes:
                        self._log({"step": self.step, "loss": sum(window) / len(window), "lr": rec["lr"],
                                   "grad_norm": rec["grad_norm"], "it_s": it_s})
                    window, tick = [], now
                bar.update(1)
                if writes and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.save_samples()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save()
        finally:
            bar.close()
        if n and self.out_dir is not None and not (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
            self.save()
        return history

    # ------------------------------------------------------------------ outputs
    def _log(self, record: dict[str, float]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def run_config(self) -> dict[str, Any]:
        """Everything config.json records: enough to rebuild the model, schedule and run."""
        d = self.data
        return {
            "format": 1, "tinyddpm_version": _package_version(), "step": self.step,
            "model": {"kind": _model_kind(self.model), "config": dict(self.model.config)},
            "schedule": self.schedule.to_config(),
            "diffusion": self.diffusion.to_dict() if self.diffusion is not None else None,
            "train": self.config.to_dict(),
            "data": {"name": getattr(d, "name", "custom"), "shape": list(d.x.shape[1:]), "n": int(d.x.shape[0]),
                     "num_classes": getattr(d, "num_classes", None), "is_image": bool(getattr(d, "is_image", False))},
        }

    def state(self) -> dict[str, Any]:
        """Optimiser, EMA counters, step and every RNG state: what exact resumption needs."""
        ema = self.ema.state_dict()
        ema.pop("model")  # the EMA weights go to ema.safetensors
        rng = {"batch": self.batch_gen.get_state(), "noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "ema": ema, "rng": rng}

    def save(self) -> Path | None:
        """Write a checkpoint of the current step to ``out_dir`` (rank 0; others wait). Returns its path."""
        if self.out_dir is None:
            raise ValueError("this Trainer has no out_dir to save to")
        path = None
        if self.dist.is_main:
            if not all(torch.isfinite(p).all() for p in self.model.parameters()):
                raise TrainingDiverged("refusing to save a checkpoint: the weights contain NaN/inf")
            path = save_checkpoint(self.out_dir, step=self.step, model=self.model, ema_model=self.ema.model,
                                   config=self.run_config(), state=self.state(), keep_last=self.config.keep_last)
        if self.dist.world_size > 1:
            dist.barrier()
        return path

    @torch.no_grad()
    def sample(self, n: int, *, steps: int | None = None, seed: int | None = None) -> Tensor:
        """n DDIM samples (η = 0) from the EMA model, with their own generator (training RNG untouched)."""
        from ..sampling.ddpm_ddim import ddim_sample

        steps = min(steps or self.config.sample_steps, self.schedule.T)
        g = torch.Generator(self.device).manual_seed(self.config.seed if seed is None else seed)
        model = self.ema.model
        if self.num_classes is not None:  # unconditional draw through the null label
            y = torch.full((n,), self.num_classes, dtype=torch.long, device=self.device)
            fn = lambda x, t: model(x, t, y=y[: x.shape[0]])
        else:
            fn = lambda x, t: model(x, t)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self._bf16 else contextlib.nullcontext()
        with amp:
            x = ddim_sample(fn, self.schedule, (n, *self._x.shape[1:]), steps=steps, generator=g,
                            prediction=self.prediction, clip_x0=bool(getattr(self.data, "is_image", False)))
        return x.float().cpu()

    def save_samples(self) -> Path:
        """A grid (images) or scatter plot (2-D data) of EMA samples in ``out_dir/samples/``."""
        x = self.sample(self.config.sample_n)
        path = self.out_dir / "samples" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if x.ndim == 4:
            from ..data.images import save_grid

            save_grid(x, path)
        else:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(4, 4))
            ax.scatter(x[:, 0], x[:, 1], s=3)
            ax.set_title(f"EMA samples, step {self.step}")
            fig.savefig(path, dpi=100)
            plt.close(fig)
        return path

    # ------------------------------------------------------------------ resuming
    def _resume_from(self, step_dir: Path) -> None:
        saved = read_config(step_dir)
        now = self.run_config()
        ignore = set(RESUMABLE_CHANGES) - ({"steps"} if self.config.lr_schedule == "cosine" else set())
        for cfg in (saved, now):
            for key in ("step", "tinyddpm_version", "format"):
                cfg.pop(key, None)
            for key in ignore:
                cfg["train"].pop(key, None)
        diffs = config_differences(saved, now)
        if diffs:
            raise ValueError(f"cannot resume from {step_dir}: the configuration differs:\n  " + "\n  ".join(diffs))
        state = read_state(step_dir)
        load_weights(self.model, step_dir / "model.safetensors", device=self.device)
        load_weights(self.ema.model, step_dir / "ema.safetensors", device=self.device)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.batch_gen.set_state(state["rng"]["batch"])
        self.noise_gen.set_state(state["rng"]["noise"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
