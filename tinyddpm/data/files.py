"""Raw file formats, parsed by hand so that reading data never executes code (book chapter 5).

- IDX (MNIST, Fashion-MNIST): a big-endian magic number and dimensions, then uint8 data; raw or gzipped.
- CIFAR-10 python batches: pickles read through an unpickler that can only rebuild numpy arrays,
  lists, bytes and dicts, so a hostile file is refused before anything in it runs.

A truncated or foreign file is a ``ValueError`` that names it and says what was expected.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
from pathlib import Path

import numpy as np


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


def load_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
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
