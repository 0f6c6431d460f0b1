"""``tinyddpm sample --init``: img2img (SDEdit) and inpainting (RePaint) of an image file from the command line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinyddpm.cli import main
from tinyddpm.data.images import load_image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits-tiny UNet trained for 3 steps (T = 20), an 8×8 test digit and a lower-half mask."""
    d = tmp_path_factory.mktemp("edit")
    assert main(["train", "--data", "digits", "--preset", "digits-tiny", "--out", str(d / "run"), "--steps", "3",
                 "--batch-size", "8", "--T", "20", "--device", "cpu", "--no-progress"]) == 0
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255                                                  # white: repaint the lower half
    Image.fromarray(mask).save(d / "mask.png")
    return d


def test_img2img_at_strength_zero_returns_the_image(run):
    out = run / "same.npy"
    assert main(["sample", "--ckpt", str(run / "run"), "--init", str(run / "in.png"), "--strength", "0",
                 "--n", "3", "--out", str(out)]) == 0
    x = np.load(out)
    want = load_image(run / "in.png", image_size=8, channels=1).numpy()
    assert x.shape == (3, 1, 8, 8) and np.array_equal(x, np.broadcast_to(want, x.shape))


def test_img2img_moves_further_with_strength(run):
    want = load_image(run / "in.png", image_size=8, channels=1).numpy()
    dist = []
    for strength in ("0.2", "1.0"):
        out = run / f"s{strength}.npy"
        assert main(["sample", "--ckpt", str(run / "run"), "--init", str(run / "in.png"), "--strength", strength,
                     "--steps", "10", "--n", "8", "--out", str(out)]) == 0
        dist.append(float(np.abs(np.load(out) - want).mean()))
    assert dist[0] < dist[1]


def test_inpainting_keeps_the_black_part_exactly(run, capsys):
    out = run / "filled.npy"
    assert main(["sample", "--ckpt", str(run / "run"), "--init", str(run / "in.png"), "--mask", str(run / "mask.png"),
                 "--resample", "2", "--steps", "5", "--n", "4", "--out", str(out)]) == 0
    assert "inpainted (U = 2)" in capsys.readouterr().out
    x, want = np.load(out), load_image(run / "in.png", image_size=8, channels=1).numpy()
    assert np.array_equal(x[:, :, :4], np.broadcast_to(want[:, :4], x[:, :, :4].shape))   # kept bit for bit
    assert x[:, :, 4:].std(0).mean() > 0.05                                              # repainted: varies


def test_editing_errors(run, tmp_path, capsys):
    ckpt, init = str(run / "run"), str(run / "in.png")
    assert main(["sample", "--ckpt", ckpt, "--mask", str(run / "mask.png"), "--out", str(tmp_path / "a.png")]) == 2
    assert "give it with --init" in capsys.readouterr().err
    assert main(["sample", "--ckpt", ckpt, "--init", str(tmp_path / "none.png"), "--out", str(tmp_path / "a.png")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["sample", "--ckpt", ckpt, "--init", init, "--strength", "1.5", "--out", str(tmp_path / "a.png")]) == 2
    assert "strength must be a number in [0, 1]" in capsys.readouterr().err
    assert main(["sample", "--ckpt", ckpt, "--init", init, "--mask", str(run / "mask.png"), "--strength", "0.5",
                 "--out", str(tmp_path / "a.png")]) == 2
    assert "strength applies to img2img" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    assert main(["sample", "--ckpt", ckpt, "--init", init, "--mask", str(tmp_path / "black.png"),
                 "--out", str(tmp_path / "a.png")]) == 2
    assert "nothing to repaint" in capsys.readouterr().err
