"""Training the tiny CLIP (:class:`tinyddpm.nets.clip.TinyCLIP`) through the one Trainer, and caching it.

The contrastive objective (symmetric InfoNCE with soft targets, :func:`tinyddpm.nets.clip.clip_loss`)
lives here, beside :mod:`tinyddpm.text2img`, because it is a training concern: ``tinyddpm.nets`` holds
only networks and their losses. Checkpoints have kind ``"clip"``, so :func:`tinyddpm.load_checkpoint`
and :meth:`tinyddpm.Trainer.resume` rebuild them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .checks import check_choice, check_nonneg_float
from .nets.clip import POSITIVES, CLIPConfig, TinyCLIP, clip_loss
from .nets.text import ATTRIBUTE_WORDS, attribute_labels, random_captions, split_words
from .training.objectives import Batch, Objective

if TYPE_CHECKING:
    from .training.trainer import Trainer

DEFAULT_CLIP = CLIPConfig()   # the configuration chapter 9 and the tests use (frozen, so safe as a default)


class ContrastiveObjective(Objective):
    """Symmetric InfoNCE, eq. :eq:`eq-infonce` (:func:`clip_loss`), of a :class:`TinyCLIP` on digits and fresh
    random captions.

    Per step, from the CPU generator: indices, then one caption per image (:func:`random_captions` with
    the digit's label and measured attributes, no empty captions). The positives of a batch (see the
    module docstring) are computed in :meth:`loss` from the rows it is given, so a slice of the
    batch (another process's, a micro-batch) is its own smaller contrastive batch.
    """

    name = "contrastive"
    generative = False
    streams = False  # captions are drawn per dataset row in draw()

    def __init__(self, *, attribute_prob: float = 0.5, positives: str = "meaning"):
        self.attribute_prob = check_nonneg_float("attribute_prob", attribute_prob)
        self.positives = check_choice("positives", positives, POSITIVES)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attribute_prob": self.attribute_prob, "positives": self.positives}

    def model_entry(self, model: nn.Module) -> dict[str, Any]:
        return {"kind": "clip", "config": model.to_config()}

    def bind(self, trainer: Trainer) -> None:
        if not isinstance(trainer.model, TinyCLIP):
            raise TypeError(f"the contrastive objective trains a TinyCLIP; got {type(trainer.model).__name__}")
        if getattr(trainer.data, "labels", None) is None or not getattr(trainer.data, "is_image", False):
            raise ValueError("CLIP training needs an image Dataset with digit labels (e.g. load_dataset('digits'))")
        super().bind(trainer)
        self.tokenizer, self.labels = trainer.model.tokenizer, trainer.data.labels.cpu()
        self.thick, self.lean = attribute_labels(trainer.data.x.cpu(), self.labels)
        # attrs[i, a] = image i has attribute ATTRIBUTE_WORDS[a - 1]; column 0 ("no adjective") is always True
        self.attrs = torch.tensor([[True] + [w in (self.thick[i], self.lean[i]) for w in ATTRIBUTE_WORDS]
                                   for i in range(len(self.labels))])

    def draw(self, B: int, batch_gen: torch.Generator, noise_gen: torch.Generator) -> Batch:
        idx = torch.randint(self.n, (B,), generator=batch_gen)
        rows = idx.tolist()
        captions = random_captions(self.labels[idx], [self.thick[i] for i in rows], [self.lean[i] for i in rows],
                                   generator=batch_gen, attribute_prob=self.attribute_prob, drop_prob=0.0)
        ids, mask = self.tokenizer.encode(captions)
        adj = torch.tensor([next((1 + a for a, w in enumerate(ATTRIBUTE_WORDS) if w in split_words(c)), 0)
                            for c in captions])
        return {"idx": idx, "ids": ids, "mask": mask, "adj": adj}

    def positive_matrix(self, batch: Batch) -> Tensor:
        """(b, b) bool: P_ij = caption j is a positive for image i (see the module docstring)."""
        if self.positives == "caption":
            return (batch["ids"][:, None, :] == batch["ids"][None, :, :]).all(-1)
        idx = batch["idx"].cpu()
        y = self.labels[idx]
        return (y[:, None] == y[None, :]) & self.attrs[idx][:, batch["adj"]]      # (image i, caption j)

    def loss(self, net: nn.Module, batch: Batch) -> Tensor:
        logits = net(self.rows(batch), batch["ids"].to(self.device), batch["mask"].to(self.device))
        return clip_loss(logits.float(), self.positive_matrix(batch).to(self.device))


# ---------------------------------------------------------------------- training, caching, loading
def clip_trainer(data, config: CLIPConfig = DEFAULT_CLIP, *, device: str | torch.device = "cpu",
                 out_dir: str | Path | None = None, resume: bool = False, progress: bool = False):
    """The Trainer of a :class:`TinyCLIP` on ``data`` (AdamW, 50 warm-up steps, cosine, clip 1, EMA);
    ``resume=True`` continues ``out_dir``'s latest checkpoint bit for bit."""
    from .training.config import TrainConfig
    from .training.trainer import Trainer

    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TinyCLIP(config)
    train = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                        warmup_steps=min(50, config.steps), lr_schedule="cosine", grad_clip=1.0,
                        ema_decay=config.ema_decay, seed=config.seed, device=device.type, precision="fp32",
                        label_dropout=0.0, log_every=100, progress=progress, keep_last=1)
    objective = ContrastiveObjective(attribute_prob=config.attribute_prob, positives=config.positives)
    return Trainer(model, None, data, train, out_dir, objective=objective, resume=resume)


def train_clip(data, config: CLIPConfig = DEFAULT_CLIP, *, device: str | torch.device = "cpu",
               log: list | None = None, out_dir: str | Path | None = None, progress: bool = False) -> TinyCLIP:
    """Train a :class:`TinyCLIP` contrastively on an image Dataset with digit labels; deterministic per
    ``config.seed`` on a device. ``log`` receives (step, loss) every 100 steps; with ``out_dir`` the run
    writes checkpoints of kind "clip". Returns the EMA weights, in eval mode, frozen."""
    trainer = clip_trainer(data, config, device=device, out_dir=out_dir, progress=progress)
    history = trainer.train()
    if log is not None:
        log.extend((r["step"] - 1, r["loss"]) for r in history if (r["step"] - 1) % 100 == 0)
    return trainer.ema_model.eval().requires_grad_(False)


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> TinyCLIP:
    """The TinyCLIP in a checkpoint (run dir or step dir; EMA weights), eval mode, frozen; no code runs."""
    from .training.checkpoint import load_weights, read_config, resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    entry = read_config(step_dir)["model"]
    if entry["kind"] != "clip":
        raise ValueError(f"{step_dir} holds a {entry['kind']!r} model, not a CLIP")
    model = load_weights(TinyCLIP.from_config(entry["config"]), step_dir / "ema.safetensors")
    return model.to(device).eval().requires_grad_(False)


def load_or_train_clip(config: CLIPConfig = DEFAULT_CLIP, *, cache: str | Path | None = None,
                       device: str | torch.device = "cpu") -> TinyCLIP:
    """The digits CLIP for ``config``: from ``cache_dir("models")/clip-digits-<digest>``, or trained on
    ``load_dataset("digits", split="train")`` (under a CPU-minute) and written there atomically."""
    from .atomic import write_dir_atomic
    from .cache import cache_dir
    from .data.datasets import load_dataset
    from .training.checkpoint import list_checkpoints

    root = Path(cache) if cache is not None else cache_dir("models")
    directory = root / f"clip-digits-{config.digest()}"
    if not list_checkpoints(directory):
        data = load_dataset("digits", split="train")
        write_dir_atomic(directory, lambda tmp: train_clip(data, config, device=device, out_dir=tmp))
    return load_clip(directory, device)


__all__ = ["ContrastiveObjective", "clip_trainer", "load_clip", "load_or_train_clip", "train_clip"]
