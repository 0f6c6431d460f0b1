"""Datasets: built-in toy sets and 8×8 digits, and loaders for data already on disk (book chapter 5).

Everything comes back as a :class:`Dataset`: images from files as uint8 pixels (N, C, H, W) read as
float32 in [-1, 1] at batch time, the digits and 2-D points as float32, labels as int64 (N,). Sets
larger than memory stream from disk instead (:mod:`tinyddpm.data.stream`). Nothing is downloaded.
Files on disk are parsed by hand (:mod:`tinyddpm.data.files`), so loading data never executes code,
and a truncated or foreign file is a clear error naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..checks import check_choice, check_int
from ..diffusion.mixture import GaussianMixture
from .files import load_cifar_batch, read_idx
from .images import IMAGE_SUFFIXES, pixels_to_float, read_pixels
from .stream import IdxStream, ImageFolderStream, StreamingImages

DATASETS: tuple[str, ...] = ("digits", "moons", "swiss_roll", "mixture", "mnist", "fashion_mnist", "cifar10", "folder")
Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
DIGITS_TEST_SIZE = 297          # of 1,797 digits: 1,500 train / 297 test, stratified by class, fixed forever
_DIGITS_SPLIT_SEED = 20_200_619  # the split never depends on the user's seed, so "test" stays held out


class Dataset:
    """Samples with optional int64 ``labels`` (N,) and their ``num_classes``.

    Give ``x`` as float32 (images (N, C, H, W) in [-1, 1], or points (N, D)), or images as uint8
    pixels (N, C, H, W): those are stored as uint8 (CIFAR-10 takes 150 MB, not 600 MB) and become
    floats p / 127.5 - 1 only when read. ``x`` is always float32: for pixel sets it is a fresh
    conversion of the whole set on each access, so training and batching read :meth:`x_at` (only
    the rows asked for) or ``pixels`` instead. Read-only: a Dataset never changes after construction.
    """

    __slots__ = ("_x", "_pixels", "_labels", "_num_classes", "_name")

    def __init__(self, x: Tensor, labels: Tensor | None = None, num_classes: int | None = None, name: str = "custom"):
        if isinstance(x, Tensor) and x.dtype == torch.uint8:
            if x.ndim != 4 or x.shape[0] < 1:
                raise ValueError(f"uint8 pixels must have shape (N, C, H, W) with N >= 1; got {tuple(x.shape)}")
            pixels, floats = x, None
        else:
            if not isinstance(x, Tensor) or x.dtype != torch.float32:
                got = x.dtype if isinstance(x, Tensor) else type(x).__name__
                raise TypeError(f"x must be a float32 tensor (or uint8 pixels (N, C, H, W)); got {got}")
            if x.ndim not in (2, 4) or x.shape[0] < 1:
                raise ValueError(f"x must have shape (N, C, H, W) for images or (N, D) for points; "
                                 f"got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise ValueError("x contains NaN or infinite values")
            if x.ndim == 4 and (float(x.min()) < -1 or float(x.max()) > 1):
                raise ValueError(f"images must lie in [-1, 1]; got values in "
                                 f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
            pixels, floats = None, x
        n = x.shape[0]
        y = labels
        if (y is None) != (num_classes is None):
            raise ValueError("labels and num_classes go together: give both or neither")
        if y is not None:
            check_int("num_classes", num_classes, low=1)
            if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (n,):
                got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"labels must be an int64 tensor of shape (N,) = ({n},); got {got}")
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise ValueError(f"labels must lie in [0, {num_classes - 1}]; got [{int(y.min())}, {int(y.max())}]")
        object.__setattr__(self, "_x", floats)
        object.__setattr__(self, "_pixels", pixels)
        object.__setattr__(self, "_labels", y)
        object.__setattr__(self, "_num_classes", num_classes)
        object.__setattr__(self, "_name", name)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"Dataset is read-only; cannot set {key!r} (build a new Dataset instead)")

    def __reduce__(self) -> tuple:  # pickle / copy rebuild through __init__ (and its checks)
        stored = self._x if self._pixels is None else self._pixels
        return (Dataset, (stored, self._labels, self._num_classes, self._name))

    def __repr__(self) -> str:
        kind = "uint8 pixels" if self._pixels is not None else "float32"
        return (f"Dataset(name={self._name!r}, n={len(self)}, shape={self.shape}, {kind}, "
                f"num_classes={self._num_classes})")

    @property
    def x(self) -> Tensor:
        """All samples as float32: images in [-1, 1] (converted now, for pixel sets), or points."""
        return self._x if self._pixels is None else pixels_to_float(self._pixels)

    @property
    def pixels(self) -> Tensor | None:
        """The uint8 pixels (N, C, H, W) of a pixel set; None for float data."""
        return self._pixels

    @property
    def labels(self) -> Tensor | None:
        return self._labels

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    @property
    def name(self) -> str:
        return self._name

    def x_at(self, idx: Tensor | slice | list[int]) -> Tensor:
        """The float32 samples at ``idx``, converting only those rows (the batch-time path)."""
        return self._x[idx] if self._pixels is None else pixels_to_float(self._pixels[idx])

    def __len__(self) -> int:
        return (self._x if self._pixels is None else self._pixels).shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) or (D,)."""
        return tuple((self._x if self._pixels is None else self._pixels).shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the samples take as stored (or as ``dtype``, e.g. torch.float32 for the decoded size)."""
        stored = self._x if self._pixels is None else self._pixels
        itemsize = stored.element_size() if dtype is None else torch.empty((), dtype=dtype).element_size()
        return stored.numel() * itemsize

    def subset(self, idx: Tensor | slice | list[int]) -> Dataset:
        """The samples at ``idx`` (indices, a boolean mask or a slice), with their labels (uint8 stays uint8)."""
        y = None if self._labels is None else self._labels[idx]
        stored = self._x if self._pixels is None else self._pixels
        return Dataset(stored[idx], y, self._num_classes, self._name)


def batches(
    data: Dataset, batch_size: int, generator: torch.Generator | None = None, *, drop_last: bool = False
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """One epoch of float ``(x, labels)`` minibatches in an order drawn from ``generator``."""
    check_int("batch_size", batch_size, low=1)
    order = torch.randperm(len(data), generator=generator)
    stop = len(data) - len(data) % batch_size if drop_last else len(data)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield data.x_at(idx), None if data.labels is None else data.labels[idx]


# --- built-in sets -------------------------------------------------------------------------------

def toy_mixture() -> GaussianMixture:
    """The fixed 2-D "mixture" set: 8 Gaussians (σ = 0.15) on a circle of radius 1.4, unequal weights.

    Its exact density (``log_prob``) and optimal ε (``optimal_eps``) make it the book's oracle.
    """
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 1.4 * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.tensor([0.20, 0.10, 0.15, 0.05, 0.20, 0.10, 0.15, 0.05], dtype=torch.float64)
    return GaussianMixture(means, 0.15, weights)


def _moons(n: int, g: torch.Generator) -> Dataset:
    """Two interleaved half circles (noise 0.08), centred and scaled by 1/0.7; label = which moon."""
    y = torch.randint(0, 2, (n,), generator=g)
    s = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    outer = torch.stack([s.cos(), s.sin()], dim=1)
    inner = torch.stack([1 - s.cos(), 0.5 - s.sin()], dim=1)
    x = torch.where(y[:, None] == 0, outer, inner) + 0.08 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 0.7
    return Dataset(x.float(), y, 2, "moons")


def _swiss_roll(n: int, g: torch.Generator) -> Dataset:
    """The 2-D swiss roll (s cos s, s sin s), s ~ U[1.5π, 4.5π], noise 0.3, centred and scaled by 1/7."""
    s = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.stack([s * s.cos(), s * s.sin()], dim=1) + 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = (x - torch.tensor([2.0, 0.2], dtype=torch.float64)) / 7.0
    return Dataset(x.float(), None, None, "swiss_roll")


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits and a fixed stratified split: (images 0..16, labels, is_test)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    g = torch.Generator().manual_seed(_DIGITS_SPLIT_SEED)
    counts = np.bincount(labels, minlength=10)
    quota = counts * DIGITS_TEST_SIZE / len(labels)                  # largest-remainder rounding:
    n_test = np.floor(quota).astype(int)                              # per-class test sizes that sum
    n_test[np.argsort(-(quota - n_test), kind="stable")[: DIGITS_TEST_SIZE - n_test.sum()]] += 1
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        pick = torch.randperm(len(members), generator=g)[: n_test[c]].numpy()
        is_test[members[pick]] = True
    return images, labels, is_test


def _digits(split: str) -> Dataset:
    images, labels, is_test = _digits_split()
    keep = is_test if split == "test" else ~is_test
    x = torch.from_numpy(images[keep] / 8.0 - 1.0).float()[:, None]    # 0..16 -> [-1, 1], (N, 1, 8, 8)
    return Dataset(x, torch.from_numpy(labels[keep]), 10, "digits")


# --- files on disk -------------------------------------------------------------------------------

def _find(folder: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{what}: none of {names} found in {folder}")


def _idx_files(name: str, path: Path, split: str, gz: bool = True) -> dict[str, Path]:
    """The images and labels files of an IDX set in ``path`` (or a torchvision-style sub-folder)."""
    prefix = "train" if split == "train" else "t10k"
    folders = [path, path / "raw", path / "MNIST" / "raw", path / "FashionMNIST" / "raw"]
    folder = next((f for f in folders if any(f.glob(f"{prefix}-images*"))), path)
    found = {}
    for part, idx in (("images", 3), ("labels", 1)):
        stems = [f"{prefix}-{part}-idx{idx}-ubyte", f"{prefix}-{part}.idx{idx}-ubyte"]
        names = [s + ext for s in stems for ext in (("", ".gz") if gz else ("",))]
        found[part] = _find(folder, names, f"{name} {split} {part} (IDX format{'' if gz else ', uncompressed'})")
    return found


def _idx_dataset(name: str, path: Path, split: str) -> Dataset:
    found = _idx_files(name, path, split)
    images = read_idx(found["images"], 0x803)
    labels = read_idx(found["labels"], 0x801)
    if len(images) != len(labels):
        raise ValueError(f"{found['images'].name} has {len(images)} images but {found['labels'].name} "
                         f"has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{found['labels'].name}: labels must be 0..9; found {labels.max()}")
    x = torch.from_numpy(images.copy())[:, None]              # uint8 (N, 1, H, W); copy: frombuffer is read-only
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), 10, name)


def _cifar10(path: Path, split: str) -> Dataset:
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"cifar10 {split}: {', '.join(missing)} not found in {folder} "
                                "(expected the python batches of cifar-10-python.tar.gz)")
    parts = [load_cifar_batch(folder / n) for n in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)       # rows are R, G, B planes
    x = torch.from_numpy(np.ascontiguousarray(data))                             # uint8 (N, 3, 32, 32)
    return Dataset(x, torch.from_numpy(np.concatenate([p[1] for p in parts])), 10, "cifar10")


def _folder(path: Path, image_size: int, channels: int) -> Dataset:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"folder: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    top = [f for f in files if f.parent == path]
    nested = [f for f in files if f.parent != path]
    if top and nested:
        raise ValueError(f"folder: {path} has images both at its top level ({top[0].name}, ...) and in "
                         "sub-folders; put every image in a class sub-folder, or none")
    x = torch.stack([read_pixels(f, image_size=image_size, channels=channels) for f in files])  # uint8
    if top:
        return Dataset(x, None, None, "folder")
    classes = sorted({f.relative_to(path).parts[0] for f in files})
    labels = torch.tensor([classes.index(f.relative_to(path).parts[0]) for f in files], dtype=torch.int64)
    return Dataset(x, labels, len(classes), "folder")


def _stream(name: str, path: str | Path | None, split: str, n: int | None, image_size: int,
            channels: int) -> StreamingImages:
    if name not in ("folder", "mnist", "fashion_mnist"):
        raise ValueError(f"stream=True works for 'folder', 'mnist' and 'fashion_mnist'; {name!r} fits in memory "
                         "(load it without stream=True)")
    if n is not None:
        raise ValueError("n= (a random subset) is not available with stream=True")
    if path is None:
        raise ValueError(f"dataset {name!r} needs path= (the folder holding its files); nothing is downloaded")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: {path} is not a folder")
    if name == "folder":
        if split != "train":
            raise ValueError("folder has no test split; point path= at another folder instead")
        return ImageFolderStream(path, image_size=image_size, channels=channels)
    found = _idx_files(name, path, split, gz=False)
    return IdxStream(found["images"], found["labels"], name=name)


def load_dataset(
    name: str, path: str | Path | None = None, *, split: Split = "train", n: int | None = None, seed: int = 0,
    image_size: int = 32, channels: Literal[1, 3] = 3, stream: bool = False,
) -> Dataset | StreamingImages:
    """Load a dataset by name (one of :data:`DATASETS`) as a :class:`Dataset`.

    - ``"digits"``: scikit-learn's 1,797 bundled 8×8 digits, (N, 1, 8, 8), labels 0–9; a fixed
      stratified split, 1,500 ``"train"`` / 297 ``"test"``.
    - ``"moons"``, ``"swiss_roll"``, ``"mixture"`` (:func:`toy_mixture`): ``n`` 2-D points (default
      10,000) drawn with ``torch.Generator().manual_seed(seed)``; ``"test"`` uses an independent stream.
    - ``"mnist"``, ``"fashion_mnist"``: the IDX files (raw or ``.gz``) in ``path``.
    - ``"cifar10"``: the python batches in ``path`` or ``path/cifar-10-batches-py``.
    - ``"folder"``: every image under ``path``, resized and centre-cropped to ``image_size``, with
      ``channels`` 1 or 3; labels from the class sub-folders if there are any (``"train"`` only).

    For image sets, ``n`` takes a random subset of that size (drawn with ``seed``).

    ``stream=True`` (``"folder"``, and ``"mnist"``/``"fashion_mnist"`` with uncompressed files) returns
    a :class:`~tinyddpm.data.stream.StreamingImages` set that reads each image from disk when a batch
    needs it (:func:`~tinyddpm.data.loader.make_batch_source`): for sets larger than memory.
    """
    check_choice("name", name, DATASETS)
    check_choice("split", split, SPLITS)
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be True or False; got {type(stream).__name__}")
    if stream:
        return _stream(name, path, split, n, image_size, channels)
    check_int("seed", seed)
    if n is not None:
        check_int("n", n, low=1)
    if name in ("moons", "swiss_roll", "mixture"):
        g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        count = 10_000 if n is None else n
        if name == "mixture":
            x, k = toy_mixture().sample(count, generator=g, return_labels=True)
            return Dataset(x, k, 8, "mixture")
        return _moons(count, g) if name == "moons" else _swiss_roll(count, g)
    if name == "digits":
        data = _digits(split)
    else:
        if path is None:
            raise ValueError(f"dataset {name!r} needs path= (the folder holding its files); nothing is downloaded")
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{name}: {path} is not a folder")
        if name in ("mnist", "fashion_mnist"):
            data = _idx_dataset(name, path, split)
        elif name == "cifar10":
            data = _cifar10(path, split)
        else:
            if split != "train":
                raise ValueError("folder has no test split; point path= at another folder instead")
            check_int("image_size", image_size, low=1)
            if channels not in (1, 3):
                raise ValueError(f"channels must be 1 or 3; got {channels!r}")
            data = _folder(path, image_size, channels)
    if n is None or n == len(data):
        return data
    if n > len(data):
        raise ValueError(f"n = {n} but {name} {split} has only {len(data)} samples")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return data.subset(idx)
