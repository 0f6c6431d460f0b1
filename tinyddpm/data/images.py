"""Image I/O without torchvision: [-1, 1] tensors <-> uint8 pixels, sample grids, PNG files (PIL).

Pixels are stored as uint8 (a quarter of float32's memory) and become floats in [-1, 1] only when a
batch is used: :func:`pixels_to_float` is the one place that maps p -> p / 127.5 - 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..checks import check_int

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def to_uint8(x: Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] → uint8 pixels round((x + 1) · 127.5), channels last: (C, H, W) → (H, W, C), (N, C, H, W) → (N, H, W, C).

    Values outside [-1, 1] (a sampler's overshoot) are clipped.
    """
    x = torch.as_tensor(x).detach().cpu().float()
    if x.ndim not in (3, 4):
        raise ValueError(f"x must have shape (C, H, W) or (N, C, H, W); got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).numpy()


def make_grid(x: Tensor | np.ndarray, nrow: int | None = None, pad: int = 1, upscale: int = 1,
              pad_value: float = 1.0) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one uint8 picture (H', W', C), ``nrow`` images per row.

    Each image is enlarged ``upscale`` times (nearest neighbour: pixels stay crisp squares), then
    tiles are separated by ``pad`` pixels of ``pad_value`` (in [-1, 1]; 1 = white).
    """
    tiles = to_uint8(x)
    if tiles.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W); got {tuple(np.shape(x))}")
    n, h, w, c = tiles.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else check_int("nrow", nrow, low=1)
    check_int("pad", pad, low=0)
    check_int("upscale", upscale, low=1)
    tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = h * upscale, w * upscale
    rows = math.ceil(n / nrow)
    fill = to_uint8(torch.full((c, 1, 1), float(pad_value)))[0, 0]
    grid = np.empty((rows * h + (rows + 1) * pad, nrow * w + (nrow + 1) * pad, c), dtype=np.uint8)
    grid[:] = fill
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = tiles[i]
    return grid


def save_grid(x: Tensor | np.ndarray, path: str | Path, nrow: int | None = None, upscale: int | None = None,
              pad: int = 1) -> Path:
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid; returns the path.

    ``upscale=None`` enlarges small images so each tile is at least 64 pixels tall (8×8 digits → 8×).
    """
    h = int(np.shape(x)[-2]) if np.ndim(x) == 4 else 1
    upscale = max(1, math.ceil(64 / h)) if upscale is None else upscale
    grid = make_grid(x, nrow=nrow, pad=pad, upscale=upscale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def pixels_to_float(pixels: Tensor) -> Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]: p / 127.5 - 1 (0 -> -1, 255 -> 1), on their device."""
    if not isinstance(pixels, Tensor) or pixels.dtype != torch.uint8:
        got = pixels.dtype if isinstance(pixels, Tensor) else type(pixels).__name__
        raise TypeError(f"pixels must be a uint8 tensor; got {got}")
    return pixels.float() / 127.5 - 1.0


def read_pixels(path: str | Path, image_size: int | None = None, channels: Literal[1, 3] = 3) -> Tensor:
    """One image file as uint8 pixels (channels, H, W).

    With ``image_size`` the shorter side is resized to it (bicubic, antialiased) and the centre is
    cropped to image_size × image_size. ``channels`` 1 converts to grey, 3 to RGB.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    if image_size is not None:
        check_int("image_size", image_size, low=1)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path.name}: not a readable image file ({', '.join(sorted(IMAGE_SUFFIXES))}): {e}") from None
    if image_size is not None and im.size != (image_size, image_size):
        w, h = im.size
        scale = image_size / min(w, h)
        new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
    a = np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], channels)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, image_size: int | None = None, channels: Literal[1, 3] = 3) -> Tensor:
    """One image file as a float32 tensor (channels, H, W) in [-1, 1] (:func:`read_pixels`, then
    :func:`pixels_to_float`)."""
    return pixels_to_float(read_pixels(path, image_size=image_size, channels=channels))
