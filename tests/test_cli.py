"""The ``tinyddpm`` command: train -> sample (.png, .npy) -> eval end to end, chunked sampling, and
one-line errors with exit status 2 for bad arguments."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tinyddpm.cli as cli
from tinyddpm.cli import main
from tinyddpm.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits-tiny UNet trained for 4 steps (T = 20) through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "digits"
    rc = main(["train", "--data", "digits", "--out", str(out), "--steps", "4", "--batch-size", "8", "--T", "20",
               "--schedule", "cosine", "--device", "cpu", "--no-progress", "--seed", "3"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "toy"
    assert main(["train", "--data", "mixture", "--out", str(out), "--steps", "2", "--batch-size", "8", "--T", "20",
                 "--device", "cpu", "--no-progress"]) == 0
    return out


def one_line_error(capsys, argv, *fragments) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def test_digits_defaults_are_the_books_recipe(digits_run):
    """`train --data digits` without --preset trains RECIPES["digits"]: its network, its v-prediction, its
    optimiser settings (here with --steps/--T/--schedule/--batch-size/--seed overridden by the fixture)."""
    from tinyddpm.pretrained import RECIPES

    rec, ck = RECIPES["digits"], load_checkpoint(digits_run)
    assert ck.prediction == rec.diffusion.prediction == "v"
    assert ck.model_config["base_channels"] == rec.model_overrides["base_channels"]
    assert tuple(ck.model_config["attention_levels"]) == ()
    assert (ck.train.lr, ck.train.weighting, ck.train.ema_decay) == (rec.train.lr, "min_snr", rec.train.ema_decay)


def test_train_sample_eval_digits(digits_run, tmp_path, capsys):
    ck = load_checkpoint(digits_run)
    assert ck.step == 4 and ck.model_kind == "unet" and ck.schedule.T == 20 and ck.train.seed == 3
    assert ck.diffusion.schedule == "cosine" and ck.sample_shape == (1, 8, 8)
    png, npy = tmp_path / "grid.png", tmp_path / "x.npy"
    assert main(["sample", "--ckpt", str(digits_run), "--steps", "3", "--n", "10", "--batch-size", "4",
                 "--out", str(png), "--device", "cpu"]) == 0
    with Image.open(png) as im:
        assert im.size[0] > 8 and im.size[1] > 8
    assert main(["sample", "--ckpt", str(digits_run / "step_000004"), "--sampler", "ddim", "--steps", "3",
                 "--eta", "0.5", "--n", "10", "--batch-size", "4", "--seed", "1", "--out", str(npy)]) == 0
    x = np.load(npy)
    assert x.shape == (10, 1, 8, 8) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
    # same seed and chunking as the library call: the CLI is a thin layer
    ref = ck.sample(10, steps=3, eta=0.5, batch_size=4, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(x, ref.numpy())
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(digits_run), "--n", "20", "--steps", "3", "--batch-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "fd " in out and "real-vs-real floor" in out and "confident" in out


def test_train_resume_extends_a_run(tmp_path, capsys):
    out = tmp_path / "toy"
    base = ["train", "--data", "mixture", "--out", str(out), "--T", "30", "--batch-size", "16", "--device", "cpu",
            "--no-progress"]
    assert main(base + ["--steps", "3"]) == 0
    one_line_error(capsys, base + ["--steps", "5"], "already holds a run", "--resume")
    assert main(base + ["--steps", "5", "--resume"]) == 0
    assert load_checkpoint(out).step == 5
    one_line_error(capsys, base + ["--steps", "6", "--resume", "--lr", "0.5"], "train.lr: checkpoint has 0.001")
    one_line_error(capsys, base[:3] + ["--out", str(out), "--T", "40", "--resume"], "--T 40 (the run has 30)")
    assert main(["eval", "--ckpt", str(out), "--n", "50", "--steps", "5"]) == 0
    assert "energy" in capsys.readouterr().out


def test_sampling_memory_is_bounded_by_the_chunk_size(toy_run, tmp_path, monkeypatch):
    """10,000 samples in chunks of 1,000: the model never sees a batch larger than the chunk."""
    seen: list[int] = []
    real_load = cli.load_checkpoint

    def load(*args, **kwargs):
        ck = real_load(*args, **kwargs)
        ck.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
        return ck

    monkeypatch.setattr(cli, "load_checkpoint", load)
    out = tmp_path / "many.npy"
    assert main(["sample", "--ckpt", str(toy_run), "--steps", "2", "--n", "10000", "--batch-size", "1000",
                 "--out", str(out)]) == 0
    assert max(seen) == 1000 and sum(seen) == 2 * 10000  # two model calls per chunk with --steps 2
    x = np.load(out, mmap_mode="r")
    assert x.shape == (10000, 2) and np.isfinite(x[-5:]).all()


def test_bad_arguments_give_one_line_and_status_2(digits_run, tmp_path, capsys):
    ck, png = str(digits_run), str(tmp_path / "g.png")
    one_line_error(capsys, ["sample", "--ckpt", str(tmp_path / "missing"), "--out", png], "does not exist")
    one_line_error(capsys, ["sample", "--ckpt", ck, "--sampler", "no_such", "--out", png], "invalid choice: 'no_such'")
    one_line_error(capsys, ["sample", "--ckpt", ck, "--steps", "5000", "--out", png], "steps must be <= 20")
    one_line_error(capsys, ["sample", "--ckpt", ck, "--eta", "-1", "--out", png], "eta must be a finite number >= 0")
    one_line_error(capsys, ["sample", "--ckpt", ck, "--sampler", "ddpm", "--steps", "5", "--out", png],
                   "always takes all T = 20 steps")
    (tmp_path / "file.txt").write_text("x")
    one_line_error(capsys, ["sample", "--ckpt", ck, "--out", str(tmp_path / "file.txt" / "g.png")],
                   "not a writable directory")
    one_line_error(capsys, ["sample", "--ckpt", ck, "--out", str(tmp_path / "g.jpg")], "must end in .png or .npy")
    one_line_error(capsys, ["sample", "--ckpt", ck, "--n", "0", "--out", png], "--n and --batch-size must be >= 1")
    one_line_error(capsys, ["train", "--data", "imagenet", "--out", str(tmp_path / "r")], "invalid choice: 'imagenet'")
    one_line_error(capsys, ["train", "--data", "mnist", "--out", str(tmp_path / "r")], "needs path=")
    one_line_error(capsys, ["train", "--data", "moons", "--out", str(tmp_path / "r2"), "--steps", "-3"],
                   "steps must be >= 0")
    one_line_error(capsys, ["sample", "--ckpt", ck], "the following arguments are required: --out")
    one_line_error(capsys, ["sample", "--ckpt", ck, "--out", png, "--label", "3"], "unconditional")
    assert not (tmp_path / "g.png").exists()


def test_help_and_a_real_subprocess(tmp_path, capsys):
    for argv in ([], ["train"], ["sample"], ["eval"]):
        assert main([*argv, "--help"]) == 0
        assert "usage: tinyddpm" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "tinyddpm.cli", "sample", "--ckpt", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "does not exist" in r.stderr


def test_every_registered_sampler_runs_from_the_cli(digits_run, tmp_path):
    """Each name in td.SAMPLERS (heun included: EDM's grid inside the schedule's σ range) samples a checkpoint."""
    import tinyddpm as td

    for name in td.SAMPLERS:
        steps = [] if name == "ddpm" else ["--steps", "3"]
        out = tmp_path / f"{name}.npy"
        assert main(["sample", "--ckpt", str(digits_run), "--sampler", name, *steps, "--n", "3",
                     "--out", str(out)]) == 0, name
        x = np.load(out)
        assert x.shape == (3, 1, 8, 8) and np.isfinite(x).all() and np.abs(x).max() <= 1, name
