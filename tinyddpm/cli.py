"""The ``tinyddpm`` command: train, sample and evaluate from a shell (a thin layer over the package).

    tinyddpm train  --data digits --out runs/digits [--steps 4000 --batch-size 128 --resume ...]
    tinyddpm sample --ckpt runs/digits --sampler ddim --steps 50 --n 64 --out grid.png   (or .npy)
    tinyddpm train  --data moons --objective flow --out runs/flow      (flow matching; or edm)
    tinyddpm train  --data folder --data-path imgs/ --stream --hflip --num-workers 4 --out runs/mine
    tinyddpm eval   --ckpt runs/digits --n 1000
    tinyddpm train  --data digits --text --out runs/t2i        (chapter 9's text-to-image pipeline)
    tinyddpm sample --ckpt runs/t2i --prompt "a thick seven" --guidance 3 --out seven.png

Multi-GPU: ``torchrun --nproc_per_node 4 -m tinyddpm.cli train ...``. A bad argument prints one
line to stderr and exits with status 2; a diverged run exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from .sampling.flow import FLOW_SOLVERS
from .sampling.from_checkpoint import CLI_DDIM_ETA, DEFAULT_SAMPLERS, sampler_kwargs
from .sampling.guidance import DEFAULT_LABEL_GUIDANCE, DEFAULT_PROMPT_GUIDANCE
from .training.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, resolve_checkpoint
from .training.config import DEVICES, PREDICTIONS, SCHEDULES, DiffusionConfig, TrainConfig
from .training.trainer import TrainingDiverged, TrainingInterrupted, resolve_device


class UsageError(Exception):
    """A bad command-line argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# `--data digits` without --preset trains the book's measured recipe (tinyddpm.pretrained.RECIPES["digits"],
# or "digits-cond" with --conditional): the CLI default is what chapter 5 trains and measures.
RECIPE_DEFAULTS = {("digits", False): "digits", ("digits", True): "digits-cond"}
DEFAULT_PRESETS = {"digits": "digits-tiny", "moons": "toy-mlp", "swiss_roll": "toy-mlp", "mixture": "toy-mlp",
                   "mnist": "mnist", "fashion_mnist": "mnist", "cifar10": "cifar10-small", "folder": "cifar10-small"}


def build_parser() -> argparse.ArgumentParser:
    from .data.datasets import DATASETS
    from .nets.presets import PRESETS
    from .sampling.registry import SAMPLERS

    p = _Parser(prog="tinyddpm", description="Train, sample and evaluate small diffusion models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (resumable; torchrun for several GPUs)")
    t.add_argument("--data", required=True, choices=DATASETS, metavar="NAME", help=f"one of {', '.join(DATASETS)}")
    t.add_argument("--data-path", help="folder with the dataset's files (mnist, cifar10, folder)")
    t.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, samples/")
    t.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                   help=f"model preset (default by dataset): {', '.join(PRESETS)}")
    t.add_argument("--conditional", action="store_true", help="class-conditional model (needs labels)")
    t.add_argument("--text", action="store_true",
                   help="text-to-image latent pipeline (frozen tiny-CLIP text encoder + VAE + cross-attention "
                        "UNet; digits only)")
    t.add_argument("--schedule", choices=SCHEDULES, help="noise schedule (default: cosine for digits, the book's "
                                                         "recipe; linear otherwise)")
    t.add_argument("--T", type=int, help="diffusion steps (default 1000)")
    t.add_argument("--prediction", choices=PREDICTIONS,
                   help="what the network predicts (default: the recipe's, v for --data digits; else eps)")
    t.add_argument("--steps", type=int, help="total optimiser steps (default 2000)")
    t.add_argument("--batch-size", type=int, help="global batch size (default 64)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: 4e-3 for digits, the book's recipe; 1e-3 "
                                            "otherwise)")
    t.add_argument("--seed", type=int, help="seed of the whole run (default 0)")
    t.add_argument("--device", choices=DEVICES, help="auto (default: CUDA if present), cpu or cuda")
    t.add_argument("--ckpt-every", type=int,
                   help="checkpoint every N steps (default: every 10 %% of the run, and every --ckpt-minutes)")
    t.add_argument("--ckpt-minutes", type=float,
                   help="also checkpoint when this many minutes passed (default 5; 0: off)")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto (default): bf16 on a GPU (fp16 + GradScaler where bf16 is missing), fp32 on CPU")
    t.add_argument("--accum-steps", type=int, help="gradient accumulation: micro-batches per optimiser step")
    t.add_argument("--sample-every", type=int, help="sample grid every N steps (0: never)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--objective", choices=("ddpm", "flow", "edm"),
                   help="what the network learns: ddpm (ε/x0/v by --prediction, default), flow (rectified-flow "
                        "velocity, logit-normal t; chapter 12) or edm (EDM preconditioning, log-normal σ; chapter 13)")
    t.add_argument("--hflip", action="store_true", help="random horizontal flips of the training images")
    t.add_argument("--stream", action="store_true",
                   help="read images from disk batch by batch (folder, uncompressed mnist): sets larger than memory")
    t.add_argument("--num-workers", type=int, help="decoding processes for --stream (default min(4, CPUs))")
    t.add_argument("--image-size", type=int, default=32, help="folder data: resize and centre-crop to this size")
    t.add_argument("--channels", type=int, choices=(1, 3), default=3, help="folder data: 1 (grey) or 3 (RGB)")

    s = sub.add_parser("sample", help="draw samples from a checkpoint into a .png grid or a .npy array")
    _sampling_args(s, SAMPLERS, default_n=64)
    s.add_argument("--out", required=True, help=".png (a grid) or .npy (raw samples in [-1, 1], shape (N, ...))")
    s.add_argument("--label", type=int, help="class to draw (conditional models; default: unconditional)")
    s.add_argument("--prompt", help='text prompt, e.g. "a thick seven" (text-to-image pipelines from train --text)')
    s.add_argument("--init", help="an image to edit: img2img (SDEdit) at --strength, or inpainting with --mask")
    s.add_argument("--strength", type=float,
                   help="img2img: how much of --init is forgotten, 0 (returned as is) to 1 (plain sampling); "
                        "default 0.6")
    s.add_argument("--mask", help="inpainting: an image whose white pixels are repainted and black pixels kept "
                                  "(diffusers' convention)")
    s.add_argument("--resample", type=int, default=1,
                   help="inpainting: RePaint's resampling passes U per step (default 1: plain replacement)")
    s.add_argument("--negative-prompt", default="",
                   help='what guidance should steer away from, e.g. "thick" (replaces the empty prompt of eq-cfg)')

    e = sub.add_parser("eval", help="sample and print quality metrics beside their real-vs-real floors")
    _sampling_args(e, SAMPLERS, default_n=1000)

    x = sub.add_parser("export", help="write a checkpoint as a diffusers DDPMPipeline folder (needs diffusers)")
    x.add_argument("--ckpt", required=True, help="run directory (latest checkpoint) or a step_XXXXXX dir")
    x.add_argument("--to", choices=["diffusers"], required=True, help="target format")
    x.add_argument("out", help="output folder (new or empty)")
    x.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    return p


def _sampling_args(p: argparse.ArgumentParser, samplers, default_n: int) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint) or a step_XXXXXX dir")
    names = [*samplers, *(s for s in FLOW_SOLVERS if s not in samplers)]
    p.add_argument("--sampler", choices=names, metavar="NAME",
                   help=f"one of {', '.join(samplers)}; for a flow-matching checkpoint {' or '.join(FLOW_SOLVERS)}. "
                        "Default per training objective: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_SAMPLERS.items())
                        + f", ddim with --eta {CLI_DDIM_ETA:g} (measured best at 50 steps on digits)")
    p.add_argument("--steps", type=int, help="sampling steps (default: about 50 network calls, i.e. 50, or 25 for "
                                             "heun; ddpm always uses all T)")
    p.add_argument("--eta", type=float, help="DDIM/ancestral noise η >= 0")
    p.add_argument("--n", type=int, default=default_n, help=f"number of samples (default {default_n})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500, help="samples per chunk: bounds memory (default 500)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance weight w (eq-cfg; 1 = plain conditional). Default: "
                        f"{DEFAULT_LABEL_GUIDANCE:g} for class labels, {DEFAULT_PROMPT_GUIDANCE:g} for prompts "
                        "(chapter 8 measures the accuracy/diversity trade-off)")


# ----------------------------------------------------------------------------- commands
def _train_text(a: argparse.Namespace, out: Path) -> int:
    """``train --text``: the chapter-9 pipeline, written to ``out`` (a Trainer checkpoint of kind text2img)."""
    from dataclasses import replace

    from .data.datasets import load_dataset
    from .text2img import Text2ImgConfig, train_text2img

    if a.data != "digits" or a.conditional or a.resume or a.preset:
        raise UsageError("--text trains the digits text-to-image pipeline: use --data digits, "
                         "without --conditional, --preset or --resume")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty; choose a new directory for the pipeline")
    cfg = Text2ImgConfig()
    cfg = replace(cfg, **{k: v for k, v in dict(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed).items()
                          if v is not None})
    train_text2img(load_dataset("digits", split="train"), cfg, device=resolve_device(a.device or "auto"), out_dir=out,
                   progress=not a.no_progress)
    print(f"wrote the text-to-image pipeline to {out}; try: "
          f"tinyddpm sample --ckpt {out} --prompt \"a seven\" --guidance 3 --out seven.png")
    return 0


def _train(a: argparse.Namespace) -> int:
    from .data.datasets import load_dataset
    from .nets.presets import build_model, preset
    from .training.trainer import Trainer

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    _check_writable(out)
    if a.text:
        return _train_text(a, out)
    has_run = bool(list_checkpoints(out))
    if has_run and not a.resume:
        raise UsageError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    given = {k: v for k, v in dict(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=a.device,
                                   ckpt_every=a.ckpt_every, ckpt_minutes=a.ckpt_minutes, precision=a.precision,
                                   accum_steps=a.accum_steps, sample_every=a.sample_every,
                                   num_workers=a.num_workers).items() if v is not None}
    if a.compile:
        given["compile"] = True
    if a.hflip:
        given["hflip"] = True
    if a.stream and a.data not in ("folder", "mnist", "fashion_mnist"):
        raise UsageError(f"--stream reads folder, mnist and fashion_mnist files; {a.data} fits in memory")
    if a.no_progress:
        given["progress"] = False
    diffusion_args = {k: v for k, v in dict(schedule=a.schedule, T=a.T, prediction=a.prediction).items()
                      if v is not None}
    data = load_dataset(a.data, a.data_path, stream=a.stream, image_size=a.image_size, channels=a.channels)
    if has_run:
        if a.objective is not None:
            raise UsageError("--resume continues the run with the objective it was trained with; drop --objective")
        trainer = Trainer.resume(out, data, **given)  # differing settings are reported by name
        saved = trainer.diffusion.to_dict() if trainer.diffusion is not None else {}
        clash = [f"--{k} {v} (the run has {saved.get(k)})" for k, v in diffusion_args.items() if saved.get(k) != v]
        if a.preset or a.conditional or clash:
            raise UsageError("--resume continues the run as it was built; drop "
                             + ", ".join(clash + ["--preset"] * bool(a.preset) + ["--conditional"] * a.conditional))
    else:
        objective_name = a.objective or "ddpm"
        if objective_name != "ddpm" and a.prediction is not None:
            raise UsageError(f"--prediction is for --objective ddpm; {objective_name} fixes what the network predicts")
        if a.conditional and data.labels is None:
            raise UsageError(f"--conditional needs labels, and dataset {a.data!r} has none")
        recipe = None if a.preset else RECIPE_DEFAULTS.get((a.data, a.conditional))
        if recipe is not None:
            from .pretrained import RECIPES

            rec = RECIPES[recipe]
            kind, cfg = preset(rec.preset, **rec.model_overrides)
            diffusion_args = {**rec.diffusion.to_dict(), **diffusion_args}
            # the recipe's optimisation, with this command's device, progress bar and checkpoint retention
            cli_defaults = TrainConfig()
            given = {**rec.train.to_dict(), "device": cli_defaults.device, "progress": cli_defaults.progress,
                     "keep_last": cli_defaults.keep_last, "log_every": cli_defaults.log_every, **given}
            print(f"recipe {recipe!r} (the book's measured default for --data {a.data}); "
                  "--preset or any flag overrides it", file=sys.stderr)
        else:
            kind, cfg = preset(a.preset or DEFAULT_PRESETS[a.data])
        if kind == "unet":
            cfg.update(in_channels=data.shape[0], image_size=data.shape[-1])
        else:
            cfg.update(dim=data.shape[0])
        if a.conditional:
            cfg["num_classes"] = data.num_classes
        diffusion = DiffusionConfig(**diffusion_args)
        config = TrainConfig(**given)
        torch.manual_seed(config.seed)  # the model's initial weights
        schedule = diffusion.build()
        objective = _objective(objective_name, schedule)
        trainer = Trainer(build_model(kind, cfg), None if objective_name == "flow" else schedule, data, config, out,
                          None if objective_name == "flow" else diffusion, objective=objective)
    main_rank = trainer.dist.is_main
    if main_rank:
        print(f"training {trainer.config.steps - trainer.step} steps on {trainer.device} "
              f"(from step {trainer.step}) -> {out}", file=sys.stderr)
    history = trainer.train()
    if main_rank and history:
        print(f"done: step {trainer.step}, last loss {history[-1]['loss']:.4f}; checkpoint {resolve_checkpoint(out)}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _objective(name: str, schedule):
    """The training objective for ``--objective`` (None: the Trainer's default denoising loss)."""
    from .training.continuous import EDMObjective, FlowMatchingObjective

    if name == "flow":
        return FlowMatchingObjective("logit_normal")
    if name == "edm":
        return EDMObjective(schedule)
    return None


def _check_writable(path: Path) -> None:
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: {parent} is not a writable directory")


def _load(a: argparse.Namespace, check_sampler: bool = True) -> Checkpoint:
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is available")
    if not Path(a.ckpt).exists():
        raise UsageError(f"--ckpt {a.ckpt} does not exist")
    ckpt = load_checkpoint(a.ckpt, ema=not a.raw, device=device)
    if a.sampler is None:   # the measured default: DDIM with η = 1 (or flow Euler), 50 steps
        a.sampler = DEFAULT_SAMPLERS.get(ckpt.objective_name, "ddim")
        if a.sampler == "ddim" and a.eta is None and check_sampler:
            a.eta = CLI_DDIM_ETA
    T = ckpt.schedule.T if ckpt.schedule is not None else None
    try:  # validate before any work (editing validates its own sampler choices)
        if check_sampler:
            sampler_kwargs(a.sampler, T, a.steps, a.eta, ckpt.objective_name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.n < 1 or a.batch_size < 1:
        raise UsageError(f"--n and --batch-size must be >= 1; got {a.n} and {a.batch_size}")
    return ckpt


def _sample(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if out.suffix not in (".png", ".npy"):
        raise UsageError(f"--out must end in .png or .npy; got {out.name!r}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name ending in .png or .npy")
    _check_writable(out)
    from .text2img import is_text2img_checkpoint

    is_pipeline = Path(a.ckpt).exists() and is_text2img_checkpoint(a.ckpt)
    if a.prompt is not None or is_pipeline:
        if a.init is not None:
            raise UsageError("--init (img2img, inpainting) works with diffusion checkpoints, not text pipelines")
        return _sample_prompt(a, out, is_pipeline)
    if a.init is not None:
        return _sample_edit(a, out)
    if a.mask is not None or a.strength is not None:
        raise UsageError("--mask and --strength edit an image: give it with --init")
    ckpt = _load(a)
    chunks = ckpt.sample_chunks(a.n, sampler=a.sampler, steps=a.steps, eta=a.eta, generator=_generator(a.seed),
                                batch_size=a.batch_size, y=a.label, guidance=a.guidance)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":  # written chunk by chunk into a memory-mapped file: memory ~ one chunk
        arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(a.n, *ckpt.sample_shape))
        i = 0
        for x in chunks:
            arr[i:i + len(x)] = x.numpy()
            i += len(x)
        arr.flush()
        del arr
    else:
        x = torch.cat(list(chunks))
        if x.ndim == 4:
            from .data.images import save_grid

            save_grid(x, out)
        else:
            _scatter(x, out)
    eta = f", eta {a.eta:g}" if a.eta is not None else ""
    print(f"wrote {a.n} samples ({a.sampler}{eta}) to {out}")
    return 0


def _sample_edit(a: argparse.Namespace, out: Path) -> int:
    """``sample --init in.png [--strength s | --mask m.png]``: img2img or inpainting of one image, --n times."""
    from .data.images import load_image, save_grid
    from .sampling.from_checkpoint import edit

    for flag, path in (("--init", a.init), ("--mask", a.mask)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such image file")
    a.sampler = a.sampler or ("ddpm" if a.mask else "ddim")
    ckpt = _load(a, check_sampler=False)
    shape = ckpt.sample_shape
    if len(shape) != 3:
        raise UsageError(f"--init edits images; this checkpoint makes points of shape {shape}")
    C, H, _ = shape
    try:
        x = load_image(a.init, image_size=H, channels=C).expand(a.n, C, H, H)
        mask = None if a.mask is None else load_image(a.mask, image_size=H, channels=1) < 0   # black: keep
        if mask is not None and bool(mask.all()):
            raise UsageError(f"--mask {a.mask} has no white pixels: nothing to repaint")
        x = edit(ckpt, x, strength=a.strength, mask=mask, sampler=a.sampler, steps=a.steps, eta=a.eta,
                 resample=a.resample, generator=_generator(a.seed), y=a.label, guidance=a.guidance)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, x.numpy().astype(np.float32))
    else:
        save_grid(x, out)
    strength = 0.6 if a.strength is None else a.strength
    what = f"inpainted (U = {a.resample})" if a.mask else f"img2img at strength {strength}"
    print(f"wrote {a.n} samples, {what}, {a.sampler}, to {out}")
    return 0


def _sample_prompt(a: argparse.Namespace, out: Path, is_pipeline: bool) -> int:
    """``sample --prompt``: text-to-image pipelines only (see ``train --text``)."""
    from .text2img import sample_prompt

    if not is_pipeline:
        raise UsageError(f"--prompt needs a text-to-image pipeline (made by train --text); {a.ckpt} is not one"
                         if Path(a.ckpt).exists() else f"--ckpt {a.ckpt} does not exist")
    if a.prompt is None:
        raise UsageError(f"{a.ckpt} is a text-to-image pipeline: give --prompt \"...\"")
    if a.label is not None:
        raise UsageError("--label is for class-conditional checkpoints; a text pipeline takes --prompt")
    if a.n < 1:
        raise UsageError(f"--n must be >= 1; got {a.n}")
    a.guidance = DEFAULT_PROMPT_GUIDANCE if a.guidance is None else a.guidance
    x = sample_prompt(a.ckpt, a.prompt, n=a.n, guidance=a.guidance, steps=a.steps or 50,
                      generator=_generator(a.seed),
                      sampler=a.sampler or "ddim", device="cpu" if a.device == "auto" else a.device,
                      negative_prompt=a.negative_prompt)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, x.numpy().astype(np.float32))
    else:
        from .data.images import save_grid

        save_grid(x, out)
    away = f", away from {a.negative_prompt!r}" if a.negative_prompt else ""
    print(f"wrote {a.n} samples for {a.prompt!r} (guidance {a.guidance}{away}) to {out}")
    return 0


def _generator(seed: int) -> torch.Generator:
    """The one generator of a sampling command: on the CPU, so a seed gives the same noise on any device."""
    if seed < 0:
        raise UsageError(f"--seed must be >= 0; got {seed}")
    return torch.Generator().manual_seed(seed)


def _scatter(x: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0], x[:, 1], s=2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _eval(a: argparse.Namespace) -> int:
    from . import metrics
    from .data.datasets import load_dataset, toy_mixture

    ckpt = _load(a)
    name = ckpt.data.get("name")
    labels = None
    if ckpt.num_classes is not None:  # ask for every class equally, then score the requested class
        labels = torch.arange(a.n) % ckpt.num_classes
    x = torch.cat(list(ckpt.sample_chunks(a.n, sampler=a.sampler, steps=a.steps, eta=a.eta,
                                          generator=_generator(a.seed), batch_size=a.batch_size, y=labels,
                                          guidance=a.guidance)))
    if name == "digits":
        result = metrics.digits_metrics(x, labels)
    elif x.ndim == 2 and name == "mixture":  # the exact mixture: adds log-likelihood and weights
        result = metrics.toy_metrics(x, toy_mixture())
    elif x.ndim == 2 and name in ("moons", "swiss_roll"):  # toy_metrics halves the reference pool
        result = metrics.toy_metrics(x, load_dataset(name, split="test", n=2 * max(a.n, 1000)).x)
    else:
        raise UsageError(f"eval knows digits and the 2-D toy sets; this checkpoint was trained on {name!r}")
    print(f"{ckpt.path} ({ckpt.objective_name} model, {a.sampler}, steps={a.steps or 'default'}, n={a.n}, "
          f"seed={a.seed})")
    print(metrics.format_metrics(result))
    return 0


def _export(a: argparse.Namespace) -> int:
    """``export --to diffusers``: a DDPMPipeline folder whose unet(x, t - 1) equals our model(x, t)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise UsageError("export --to diffusers needs diffusers: pip install 'tinyddpm[diffusers]'") from e
    from .interop import export_checkpoint

    if not Path(a.ckpt).exists():
        raise UsageError(f"--ckpt {a.ckpt} does not exist")
    out = export_checkpoint(a.ckpt, a.out, ema=not a.raw)
    print(f"wrote {out}: DDPMPipeline.from_pretrained({str(out)!r}) runs it; its unet(x, t - 1) == our model(x, t)")
    return 0


COMMANDS = {"train": _train, "sample": _sample, "eval": _eval, "export": _export}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tinyddpm`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError) as e:
        if os.environ.get("TINYDDPM_DEBUG"):
            raise
        print(f"tinyddpm {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"tinyddpm {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # the step finished and a checkpoint was written
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"tinyddpm {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code            # 130 SIGINT, 143 SIGTERM


if __name__ == "__main__":
    sys.exit(main())
