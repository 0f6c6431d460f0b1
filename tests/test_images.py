"""Image I/O: [-1, 1] <-> uint8, grids, PNG round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tinyddpm import load_image, make_grid, save_grid, to_uint8


def test_to_uint8_levels_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0, 1 / 127.5 - 1]).reshape(1, 1, 6)   # (C, H, W)
    assert to_uint8(x).shape == (1, 6, 1)
    assert to_uint8(x)[0, :, 0].tolist() == [0, 128, 255, 255, 0, 1]                # overshoot is clipped
    # every uint8 level survives the trip to [-1, 1] and back
    u = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    assert np.array_equal(to_uint8(torch.from_numpy(u.astype(np.float32) / 127.5 - 1)), u.transpose(0, 2, 3, 1))
    rgb = torch.zeros(2, 3, 4, 5)
    rgb[1, 2] = 1.0                                                                  # image 1, blue channel
    out = to_uint8(rgb)
    assert out.shape == (2, 4, 5, 3) and (out[1, ..., 2] == 255).all() and (out[1, ..., :2] == 128).all()
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(N, C, H, W\)"):
        to_uint8(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 2, 2), float("nan")))


def test_make_grid_places_tiles():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 3, 4, generator=g) * 2 - 1
    tiles = to_uint8(x)
    grid = make_grid(x, nrow=3, pad=2)
    assert grid.shape == (2 * 3 + 3 * 2, 3 * 4 + 4 * 2, 1) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = 2 + r * 5, 2 + c * 6
        assert np.array_equal(grid[top:top + 3, left:left + 4], tiles[i])
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()          # padding is white
    assert (grid[7:10, 14:18] == 255).all()                                # the empty 6th slot too
    assert make_grid(x).shape == (2 * 3 + 3, 3 * 4 + 4, 1)                 # default: ceil(√5) = 3 per row


def test_make_grid_upscale_is_nearest_neighbour():
    x = torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]])
    grid = make_grid(x, pad=0, upscale=3)
    assert grid.shape == (6, 6, 1)
    assert (grid[:3, :3] == 0).all() and (grid[:3, 3:] == 255).all() and (grid[3:, 3:] == 0).all()
    with pytest.raises(ValueError, match="upscale must be >= 1"):
        make_grid(x, upscale=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        make_grid(x[0])


def test_save_grid_round_trip(tmp_path):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    path = save_grid(x, tmp_path / "sub" / "digits.png")
    with Image.open(path) as im:
        assert im.mode == "L"
        assert np.array_equal(np.asarray(im), make_grid(x, upscale=8)[..., 0])   # 8×8 digits -> 64-pixel tiles
    assert np.asarray(Image.open(path)).shape == (2 * 64 + 3, 2 * 64 + 3)
    rgb = torch.rand(3, 3, 32, 32) * 2 - 1
    with Image.open(save_grid(rgb, tmp_path / "rgb.png", nrow=3, upscale=1)) as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), make_grid(rgb, nrow=3))


def test_load_image(tmp_path):
    u = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(u).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (3, 6, 10) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(u.astype(np.float32) / 127.5 - 1).permute(2, 0, 1))
    assert np.array_equal(to_uint8(x), u)                                 # lossless round trip
    grey = load_image(tmp_path / "a.png", channels=1)
    assert grey.shape == (1, 6, 10)
    assert load_image(tmp_path / "a.png", image_size=4).shape == (3, 4, 4)
    with pytest.raises(FileNotFoundError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="bad.png: not a readable image file"):
        load_image(tmp_path / "bad.png")


def test_read_pixels_and_pixels_to_float(tmp_path):
    from tinyddpm.data.images import pixels_to_float, read_pixels

    u = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(u).save(tmp_path / "b.png")
    p = read_pixels(tmp_path / "b.png")
    assert p.dtype == torch.uint8 and torch.equal(p, torch.from_numpy(u).permute(2, 0, 1))
    assert torch.equal(pixels_to_float(p), load_image(tmp_path / "b.png"))
    assert torch.equal(read_pixels(tmp_path / "b.png", image_size=5), p[:, :, 1:6])  # square already: crop only
    levels = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    assert torch.equal(pixels_to_float(levels), torch.from_numpy(np.arange(256, dtype=np.float32) / 127.5 - 1))
    with pytest.raises(TypeError, match="uint8 tensor; got torch.float32"):
        pixels_to_float(torch.zeros(2))
