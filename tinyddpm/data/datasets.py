"""Datasets: built-in toy sets and 8×8 digits, and loaders for data already on disk (book chapter 5).

Everything comes back as a :class:`Dataset`: images as float32 (N, C, H, W) in [-1, 1], 2-D points
as float32 (N, 2), labels as int64 (N,). Nothing is downloaded. Files on disk are parsed by hand
(IDX headers with ``struct``; CIFAR pickles through an unpickler that can only rebuild numpy arrays),
so loading data never executes code, and a truncated or foreign file is a clear error naming it.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..checks import check_choice, check_int
from ..diffusion.mixture import GaussianMixture
from .images import IMAGE_SUFFIXES, load_image

DATASETS: tuple[str, ...] = ("digits", "moons", "swiss_roll", "mixture", "mnist", "fashion_mnist", "cifar10", "folder")
Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
DIGITS_TEST_SIZE = 297          # of 1,797 digits: 1,500 train / 297 test, stratified by class, fixed forever
_DIGITS_SPLIT_SEED = 20_200_619  # the split never depends on the user's seed, so "test" stays held out


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value; identity is equality
class Dataset:
    """Samples ``x`` (images (N, C, H, W) in [-1, 1], or points (N, D)), optional int64 ``labels`` (N,)."""

    x: Tensor
    labels: Tensor | None = None
    num_classes: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        x, y = self.x, self.labels
        if not isinstance(x, Tensor) or x.dtype != torch.float32:
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x must be a float32 tensor; got {got}")
        if x.ndim not in (2, 4) or x.shape[0] < 1:
            raise ValueError(f"x must have shape (N, C, H, W) for images or (N, D) for points; got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        if x.ndim == 4 and (float(x.min()) < -1 or float(x.max()) > 1):
            raise ValueError(f"images must lie in [-1, 1]; got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]")
        if (y is None) != (self.num_classes is None):
            raise ValueError("labels and num_classes go together: give both or neither")
        if y is None:
            return
        check_int("num_classes", self.num_classes, low=1)
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"labels must be an int64 tensor of shape (N,) = ({x.shape[0]},); got {got}")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]; got [{int(y.min())}, {int(y.max())}]")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) or (D,)."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    def subset(self, idx: Tensor | slice | list[int]) -> Dataset:
        """The samples at ``idx`` (indices, a boolean mask or a slice), with their labels."""
        y = None if self.labels is None else self.labels[idx]
        return Dataset(self.x[idx], y, self.num_classes, self.name)


def batches(
    data: Dataset, batch_size: int, generator: torch.Generator | None = None, *, drop_last: bool = False
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """One epoch of ``(x, labels)`` minibatches in an order drawn from ``generator``."""
    check_int("batch_size", batch_size, low=1)
    order = torch.randperm(len(data), generator=generator)
    stop = len(data) - len(data) % batch_size if drop_last else len(data)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield data.x[idx], None if data.labels is None else data.labels[idx]


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

def _read_bytes(file: Path, expected: str) -> bytes:
    """The file's bytes, un-gzipped if it is gzip (by its magic bytes), or a ValueError naming it."""
    raw = file.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{file.name}: corrupt or truncated gzip file (expected {expected}): {e}") from None


def read_idx(file: str | Path, magic: int) -> np.ndarray:
    """An IDX file (the MNIST format, raw or gzipped): big-endian magic, dims, then uint8 data.

    ``magic`` is 0x00000803 for images (N, rows, cols) and 0x00000801 for labels (N,).
    """
    file = Path(file)
    kind = {0x803: "IDX image file", 0x801: "IDX label file"}.get(magic, "IDX file")
    data = _read_bytes(file, kind)
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != magic:
        got = f"0x{struct.unpack('>I', data[:4])[0]:08x}" if len(data) >= 4 else f"only {len(data)} bytes"
        raise ValueError(f"{file.name}: not an {kind} (magic 0x{magic:08x} expected, got {got})")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{file.name}: truncated {kind} (header needs {4 + 4 * ndim} bytes, file has {len(data)})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    size, body = math.prod(dims), len(data) - 4 - 4 * ndim
    if body != size:
        raise ValueError(
            f"{file.name}: truncated or corrupt {kind}: header says {'×'.join(map(str, dims))} = {size} bytes "
            f"of data, file holds {body}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{what}: none of {names} found in {folder}")


def _idx_dataset(name: str, path: Path, split: str) -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    folders = [path, path / "raw", path / "MNIST" / "raw", path / "FashionMNIST" / "raw"]
    folder = next((f for f in folders if any(f.glob(f"{prefix}-images*"))), path)
    found = {}
    for part, idx in (("images", 3), ("labels", 1)):
        stems = [f"{prefix}-{part}-idx{idx}-ubyte", f"{prefix}-{part}.idx{idx}-ubyte"]
        names = [s + ext for s in stems for ext in ("", ".gz")]
        found[part] = _find(folder, names, f"{name} {split} {part} (IDX format)")
    images = read_idx(found["images"], 0x803)
    labels = read_idx(found["labels"], 0x801)
    if len(images) != len(labels):
        raise ValueError(f"{found['images'].name} has {len(images)} images but {found['labels'].name} "
                         f"has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{found['labels'].name}: labels must be 0..9; found {labels.max()}")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), 10, name)


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may name: what numpy needs to rebuild an array (numpy 1 and 2)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_bytes   # how Python 3 writes bytes at pickle protocol 2
    return allowed


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``codecs.encode`` restricted to what pickle protocol 2 uses it for: str -> bytes in latin-1."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codecs.encode with encoding {encoding!r} (only latin1 rebuilds bytes)")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays; refuses every other global, so nothing can run."""

    def __init__(self, file, name: str):
        super().__init__(file, encoding="latin1")
        self._name, self._allowed = name, _numpy_globals()

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"{self._name}: refused to load {module}.{name}: a CIFAR batch may only contain numpy arrays, "
            "lists, bytes and dicts (loading data never executes code)"
        )


def _load_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    expected = "a CIFAR-10 python batch (a pickled dict with 'data' (N, 3072) uint8 and 'labels')"
    try:
        d = _ArrayUnpickler(io.BytesIO(file.read_bytes()), file.name).load()
    except pickle.UnpicklingError as e:
        if "refused" in str(e):
            raise ValueError(str(e) if str(e).startswith(file.name) else f"{file.name}: {e}") from None
        raise ValueError(f"{file.name}: corrupt or truncated pickle (expected {expected}): {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as e:
        raise ValueError(f"{file.name}: corrupt or truncated pickle (expected {expected}): {e!r}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file.name}: not {expected}; got a {type(d).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{file.name}: not {expected}; keys are {sorted(map(str, d))}")
    data, labels = np.asarray(d["data"]), np.asarray(d["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"{file.name}: not {expected}; data is {data.dtype} {data.shape}, labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{file.name}: labels must be 0..9; got [{labels.min()}, {labels.max()}]")
    return data, labels.astype(np.int64)


def _cifar10(path: Path, split: str) -> Dataset:
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"cifar10 {split}: {', '.join(missing)} not found in {folder} "
                                "(expected the python batches of cifar-10-python.tar.gz)")
    parts = [_load_cifar_batch(folder / n) for n in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)       # rows are R, G, B planes
    x = torch.from_numpy(data.astype(np.float32) / 127.5 - 1.0)
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
    x = torch.stack([load_image(f, image_size=image_size, channels=channels) for f in files])
    if top:
        return Dataset(x, None, None, "folder")
    classes = sorted({f.relative_to(path).parts[0] for f in files})
    labels = torch.tensor([classes.index(f.relative_to(path).parts[0]) for f in files], dtype=torch.int64)
    return Dataset(x, labels, len(classes), "folder")


def load_dataset(
    name: str, path: str | Path | None = None, *, split: Split = "train", n: int | None = None, seed: int = 0,
    image_size: int = 32, channels: Literal[1, 3] = 3,
) -> Dataset:
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
    """
    check_choice("name", name, DATASETS)
    check_choice("split", split, SPLITS)
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
