"""The training loop (book chapter 5): one Trainer for every model, on CPU, one GPU or many under torchrun.

Each step draws a batch, computes the loss of an *objective* (:mod:`tinyddpm.training.objectives`;
by default eq. :eq:`eq-loss-simple`, optionally min-SNR weighted, eq. :eq:`eq-min-snr`) and descends it with
AdamW, linear warm-up (then constant or cosine), gradient clipping and an EMA of the weights
(eq. :eq:`eq-ema`). The VAE, the text-to-image pipeline and the metrics classifier train through the same
loop with their own objectives, so all of them get checkpoints, exact resume, the NaN stop, the
progress bar, DDP and gradient accumulation.

Randomness. All draws come from two generators seeded from ``config.seed``: a CPU one for the
batch indices and everything else cheap (t, masks, augmentations), and one on the training device
for noise. Both are saved in every checkpoint (keyed by device type), so a resumed run continues
bit for bit (on CPU; CUDA kernels may be non-deterministic). Under torchrun every process draws the
same *global* batch and trains on its own slice of it, so N processes see exactly what one process
with the same ``batch_size`` sees; ``accum_steps`` splits a process's slice into micro-batches.

Never losing work. With an ``out_dir``, checkpoints are written every 10 % of the run (or
``ckpt_every`` steps), every ``ckpt_minutes`` minutes and at the end, each atomically. SIGINT or
SIGTERM lets the current step finish, writes a checkpoint and raises :class:`TrainingInterrupted`
(exit code 130 / 143 for a command line).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data.loader import BatchSource, make_batch_source, warn_few_images
from ..data.stream import StreamingImages
from ..diffusion.schedule import NoiseSchedule
from .checkpoint import (
    build_from_entry,
    list_checkpoints,
    load_weights,
    read_config,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import RESUMABLE_CHANGES, DiffusionConfig, TrainConfig
from .ema import EMA
from .objectives import Batch, DiffusionObjective, Objective, data_info, slice_batch, split_batch
from .runtime import (  # noqa: F401  (resolve_device, DistInfo, init_distributed: re-exported)
    DistInfo,
    StopSignals,
    fused_adamw_supported,
    init_distributed,
    resolve_device,
    resolve_precision,
    restore_rng_state,
    rng_state,
)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the weights were not updated with it."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training after a complete step; ``checkpoint`` holds it (None without out_dir).

    ``exit_code`` is what a shell expects from a process stopped by that signal: 128 + signal number
    (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, *, signum: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)


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
    """Train ``model`` on ``data`` by minimising ``objective`` (default: denoising under ``schedule``).

    ``data`` is a :class:`tinyddpm.data.Dataset` (``x``, optional ``labels``) or a streamed set
    (:class:`~tinyddpm.data.stream.StreamingImages`, from ``load_dataset(..., stream=True)``). ``schedule`` (and
    ``diffusion``) describe the default :class:`DiffusionObjective`; pass ``objective=`` for another
    loss (then ``schedule`` may be None). With ``out_dir`` the trainer writes checkpoints (see the
    module docstring), a JSONL loss log and sample grids there; ``resume=True`` continues from
    ``out_dir``'s latest checkpoint after checking that every setting that shapes the run matches.
    """

    def __init__(
        self, model: nn.Module, schedule: NoiseSchedule | None, data: Any, config: TrainConfig | None = None,
        out_dir: str | Path | None = None, diffusion: DiffusionConfig | None = None, *, resume: bool = False,
        objective: Objective | None = None,
    ):
        config = TrainConfig() if config is None else config
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if objective is None and not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule; got {type(schedule).__name__}")
        if objective is not None and not isinstance(objective, Objective):
            raise TypeError(f"objective must be a tinyddpm Objective; got {type(objective).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}")
        if diffusion is not None and schedule is not None and diffusion.T != schedule.T:
            raise ValueError(f"diffusion.T = {diffusion.T} but the schedule has T = {schedule.T}")
        self._n, self._shape, _ = data_info(data)
        if resume and out_dir is None:
            raise ValueError("resume=True needs the out_dir of the run to resume")
        self.prediction = diffusion.prediction if diffusion is not None else "eps"
        if objective is None:
            objective = DiffusionObjective(schedule, self.prediction)
        self.objective = objective
        self.schedule = schedule if schedule is not None else getattr(objective, "schedule", None)
        self.config, self.diffusion, self.data = config, diffusion, data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.dist = init_distributed(config.device)
        self.device = resolve_device(config.device, self.dist.local_rank)
        if config.batch_size % (self.dist.world_size * config.accum_steps):
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes "
                             f"({self.dist.world_size}) × accum_steps ({config.accum_steps})")
        model_cfg = getattr(model, "config", None)
        self.num_classes: int | None = model_cfg.get("num_classes") if isinstance(model_cfg, Mapping) else None
        if isinstance(objective, DiffusionObjective) and self.num_classes is not None \
                and getattr(data, "labels", None) is None:
            raise ValueError("the model is class-conditional (num_classes set) but the data has no labels")

        self.batch_source = self._batch_source(data, objective)
        self.model = model.to(self.device)
        self._net: nn.Module = objective.network(self.model)
        if self.dist.world_size > 1:  # DDP broadcasts rank 0's weights now, so build EMA/optimiser after
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # no buffers to sync (GroupNorm, no BatchNorm): skip the per-forward broadcast
            self._net = DistributedDataParallel(self._net, device_ids=ids, broadcast_buffers=False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # a frozen part (the VAE) is skipped
        # fused: one kernel for all parameters; the per-parameter loop costs ~8 % of a small step
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=fused_adamw_supported(self.device))
        self.ema = EMA(self.model, config.ema_decay, start=config.ema_start, warmup=config.ema_warmup)
        self.precision = resolve_precision(config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.scaler else None
        self.step = 0
        self.batch_gen = torch.Generator().manual_seed(config.seed)
        self.noise_gen = torch.Generator(self.device).manual_seed(config.seed + 1)
        if resume:
            self._resume_from(resolve_checkpoint(self.out_dir))
        self.objective.bind(self)  # after resuming: the text-to-image objective encodes with the loaded VAE
        if config.compile:
            self._net = torch.compile(self._net)
        self._last_save = time.monotonic()
        self._signals: StopSignals | None = None
        self._stop_signum, self._save_due = 0, False

    def _batch_source(self, data: Any, objective: Objective) -> BatchSource | None:
        """A streamed set, or flips, are read through make_batch_source (epochs, workers, this rank's
        share); an in-memory set without flips is sampled by the objective (None)."""
        if objective.generative:  # a classifier, CLIP or a VAE memorising its data is not the worry
            warn_few_images(self._n, self._shape, stacklevel=4)
        if not (isinstance(data, StreamingImages) or self.config.hflip):
            return None
        if not objective.streams:
            raise ValueError(f"the {objective.name!r} objective reads its data by index and cannot train on a "
                             "streamed set or with hflip=True; load the data into memory and set hflip=False")
        return make_batch_source(data, self.config.batch_size, seed=self.config.seed, rank=self.dist.rank,
                                 world_size=self.dist.world_size, device=self.device, hflip=self.config.hflip,
                                 num_workers=self.config.num_workers, warn_few=False)

    # ------------------------------------------------------------------ construction from a run
    @classmethod
    def resume(cls, out_dir: str | Path, data: Any, *, objective: Objective | None = None,
               **changes: Any) -> Trainer:
        """Rebuild model, schedule, objective and configs from ``out_dir``'s latest checkpoint and continue it.

        ``changes`` may alter settings that do not shape the weights (e.g. ``steps`` to train longer,
        ``device``, ``log_every``); see :data:`tinyddpm.training.config.RESUMABLE_CHANGES`. An objective
        that config.json cannot rebuild (one holding a function) is passed as ``objective``.
        """
        cfg = read_config(resolve_checkpoint(out_dir))
        model = build_from_entry(cfg["model"]["kind"], cfg["model"]["config"])
        diffusion = DiffusionConfig.from_dict(cfg["diffusion"]) if cfg.get("diffusion") else None
        schedule = NoiseSchedule.from_config(cfg["schedule"]) if cfg.get("schedule") else None
        config = TrainConfig.from_dict(cfg["train"]).replace(**changes)
        saved = cfg.get("objective") or {"name": "diffusion"}
        if objective is None and saved["name"] != "diffusion":
            from .objectives import objective_from_dict

            objective = objective_from_dict(saved, model, schedule)
        return cls(model, schedule, data, config, out_dir, diffusion, resume=True, objective=objective)

    @property
    def ema_model(self) -> nn.Module:
        """The network with EMA weights θ̄ (eval mode): the one to sample from."""
        return self.ema.model

    # ------------------------------------------------------------------ one step
    def next_batch(self) -> Batch:
        """This process's slice of the global batch's draws (see :class:`Objective`)."""
        B = self.config.batch_size
        batch = self.objective.draw(B, self.batch_gen, self.noise_gen)
        b = B // self.dist.world_size
        batch = slice_batch(batch, slice(self.dist.rank * b, (self.dist.rank + 1) * b))
        if self.batch_source is not None:  # this process's images replace the drawn indices' rows
            batch["x0"], _ = next(self.batch_source)
            batch["idx"] = self.batch_source.last_indices
        return batch

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``accum_steps`` micro-batches; raises TrainingDiverged (weights
        untouched) on a NaN/inf loss or gradient."""
        cfg = self.config
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._net.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = split_batch(self.next_batch(), cfg.accum_steps)
        total = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro):
            last = i == len(micro) - 1
            sync = self._net.no_sync() if self.dist.world_size > 1 and not last else contextlib.nullcontext()
            with sync:
                with self.precision.autocast(self.device):
                    loss = self.objective.loss(self._net, mb) / len(micro)  # mean of equal micro-batch means
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # one tensor, one host read per step: loss, grad norm, and the stop / save-by-clock flags, which
        # ride along so that every process takes the same decision at the same step
        signum = self._signals.signum if self._signals is not None else None
        flags = [float(signum == signal.SIGINT), float(signum == signal.SIGTERM), float(self._clock_due())]
        report = torch.cat([torch.stack([total, grad_norm.float().to(total.device)]),
                            torch.tensor(flags, device=total.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(report)  # mean loss / norm over processes for the log (gradients are already synced)
            report[:2] /= self.dist.world_size
        loss_value, norm_value, sigint, sigterm, save_due = report.tolist()
        self._stop_signum = signal.SIGTERM if sigterm else signal.SIGINT if sigint else 0
        self._save_due = save_due > 0
        finite_grad = math.isfinite(norm_value) or self.scaler is not None  # fp16: the scaler skips such a step
        if not (math.isfinite(loss_value) and finite_grad):
            last = resolve_checkpoint(self.out_dir) if self.out_dir and list_checkpoints(self.out_dir) else None
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: loss = {loss_value}, gradient norm = {norm_value} "
                f"(lr = {lr:g}); the weights were not updated"
                + (f"; the last good checkpoint is {last}" if last else "; no checkpoint was written")
                + ". Try a lower lr, a longer warm-up or grad_clip."
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.ema.update(self.model)
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value}

    def _clock_due(self) -> bool:
        """Rank 0's clock says a checkpoint is due (``ckpt_minutes`` since the last one)."""
        m = self.config.ckpt_minutes
        return bool(self.out_dir is not None and self.dist.is_main and m > 0
                    and time.monotonic() - self._last_save >= 60 * m)

    # ------------------------------------------------------------------ the loop
    def train(self, steps: int | None = None) -> list[dict[str, float]]:
        """Run ``steps`` more steps (default: up to ``config.steps``); return one record per step.

        Writes (rank 0 only, when ``out_dir`` is set) ``log.jsonl`` every ``log_every`` steps,
        sample grids every ``sample_every`` and checkpoints as the module docstring says. SIGINT /
        SIGTERM: the step in progress finishes, a checkpoint is written and TrainingInterrupted raised.
        """
        cfg = self.config
        n = max(0, cfg.steps - self.step) if steps is None else int(steps)
        if n < 0:
            raise ValueError(f"steps must be >= 0; got {steps}")
        writes = self.out_dir is not None and self.dist.is_main
        show = cfg.progress and self.dist.is_main and sys.stderr.isatty()
        every = cfg.checkpoint_interval if self.out_dir is not None else 0
        from tqdm.auto import tqdm

        history: list[dict[str, float]] = []
        window: list[float] = []
        bar = tqdm(total=n, disable=not show, desc="train", unit="step")
        tick = time.perf_counter()
        saved_at = -1
        self._last_save = time.monotonic()
        try:
            with StopSignals() as self._signals:
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
                    if writes and cfg.sample_every and self.objective.samples and self.step % cfg.sample_every == 0:
                        self.save_samples()
                    if self._stop_signum:
                        self._interrupt(self._stop_signum)
                    if (every and self.step % every == 0) or self._save_due:
                        self.save()
                        saved_at = self.step
        finally:
            bar.close()
            self._signals = None
        if n and self.out_dir is not None and saved_at != self.step:
            self.save()
        return history

    def _interrupt(self, signum: int) -> None:
        path = self.save() if self.out_dir is not None else None
        name = signal.Signals(signum).name
        where = (f"checkpoint {path} written; continue with `tinyddpm train --out {self.out_dir} --resume` "
                 f"(and this run's other options) or Trainer.resume({str(self.out_dir)!r}, data)"
                 if self.out_dir is not None else "no out_dir, so no checkpoint was written")
        raise TrainingInterrupted(f"{name} received: stopped after step {self.step}; {where}",
                                  signum=signum, step=self.step, checkpoint=path)

    # ------------------------------------------------------------------ outputs
    def _log(self, record: dict[str, float]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def run_config(self) -> dict[str, Any]:
        """Everything config.json records: enough to rebuild the model, schedule, objective and run."""
        d = self.data
        return {
            "format": 1, "tinyddpm_version": _package_version(), "step": self.step,
            "model": self.objective.model_entry(self.model),
            "schedule": self.schedule.to_config() if self.schedule is not None else None,
            "diffusion": self.diffusion.to_dict() if self.diffusion is not None else None,
            "objective": self.objective.to_dict(),
            "train": self.config.to_dict(),
            "data": {"name": getattr(d, "name", "custom"), "shape": list(self._shape), "n": int(self._n),
                     "num_classes": getattr(d, "num_classes", None), "is_image": bool(getattr(d, "is_image", False))},
        }

    def state(self) -> dict[str, Any]:
        """Optimiser, EMA counters, step, grad scaler and every RNG state: what exact resumption needs."""
        ema = self.ema.state_dict()
        ema.pop("model")  # the EMA weights go to ema.safetensors
        out = {"step": self.step, "optimizer": self.optimizer.state_dict(), "ema": ema,
               "rng": rng_state(self.batch_gen, self.noise_gen), "device_type": self.device.type}
        if self.batch_source is not None:
            out["data"] = self.batch_source.state_dict()
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

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
        self._last_save = time.monotonic()
        return path

    @torch.no_grad()
    def sample(self, n: int, *, steps: int | None = None, seed: int | None = None) -> Tensor:
        """n DDIM samples (η = 0) from the EMA model, with their own generator (training RNG untouched)."""
        from ..sampling.ddpm_ddim import ddim_sample

        if not self.objective.samples:
            raise ValueError(f"a model trained with the {self.objective.name!r} objective is not a denoiser to sample")
        steps = min(steps or self.config.sample_steps, self.schedule.T)
        g = torch.Generator(self.device).manual_seed(self.config.seed if seed is None else seed)
        model = self.ema.model
        if self.num_classes is not None:  # unconditional draw through the null label
            y = torch.full((n,), self.num_classes, dtype=torch.long, device=self.device)
            fn = lambda x, t: model(x, t, y=y[: x.shape[0]])
        else:
            fn = lambda x, t: model(x, t)
        with self.precision.autocast(self.device):
            x = ddim_sample(fn, self.schedule, (n, *self._shape), steps=steps, generator=g,
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
        saved.setdefault("objective", {"name": "diffusion"})  # checkpoints from before objectives
        ignore = set(RESUMABLE_CHANGES) - ({"steps"} if self.config.lr_schedule == "cosine" else set())
        saved["train"] = TrainConfig.from_dict(saved["train"]).to_dict()  # migrate old keys (bf16 -> precision)
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
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if self.batch_source is not None:
            if "data" not in state:
                raise ValueError(f"cannot resume from {step_dir}: it was trained on data held in memory without "
                                 "flips, this run streams or flips its data (a different batch order)")
            self.batch_source.load_state_dict(state["data"])
        restore_rng_state(state["rng"], self.batch_gen, self.noise_gen, reseed=self.config.seed + 1 + self.step)
