"""Image sets larger than memory: read from disk one sample at a time (book chapter 5).

A streaming set holds only what it needs to find each sample (a list of file names, or the offset
of the pixels in an IDX file) and its labels; ``set[i]`` decodes sample i as uint8 pixels (C, H, W).
:func:`tinyddpm.data.loader.make_batch_source` feeds it through a ``torch.utils.data.DataLoader``
whose worker processes decode in parallel, so memory holds a few batches, never the set.

    data = td.load_dataset("folder", "~/faces", image_size=64, stream=True)   # an ImageFolderStream
    data = td.load_dataset("mnist", "~/mnist", stream=True)                   # an IdxStream (raw files)
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..checks import check_int
from .images import IMAGE_SUFFIXES, pixels_to_float, read_pixels


class StreamingImages(torch.utils.data.Dataset):
    """What every streaming set offers: ``len``, ``set[i]`` -> uint8 (C, H, W), ``labels``, ``shape``.

    ``labels`` (int64 (N,), or None) and ``num_classes`` are held in memory: they cost 8 bytes a sample.
    There is no ``x``: the whole set as floats is exactly what streaming avoids.
    """

    is_image = True

    def __init__(self, n: int, shape: tuple[int, int, int], labels: Tensor | None, num_classes: int | None,
                 name: str):
        if (labels is None) != (num_classes is None):
            raise ValueError("labels and num_classes go together: give both or neither")
        if labels is not None and (labels.dtype != torch.int64 or labels.shape != (n,)):
            raise ValueError(f"labels must be an int64 tensor of shape ({n},); "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        self._n, self._shape, self.labels, self.num_classes, self.name = n, shape, labels, num_classes, name

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one sample, (C, H, W)."""
        return self._shape

    @property
    def pixels(self) -> None:
        """None: a streaming set has no in-memory pixels (see :class:`tinyddpm.data.Dataset`)."""
        return None

    def nbytes(self, dtype: torch.dtype = torch.uint8) -> int:
        """Bytes the whole set would take in memory as ``dtype`` (it is never loaded)."""
        return self._n * int(np.prod(self._shape)) * torch.empty((), dtype=dtype).element_size()

    def __getitem__(self, i: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def x_at(self, idx: Tensor | list[int]) -> Tensor:
        """Samples ``idx`` decoded now, in this process, as float32 (len(idx), C, H, W) in [-1, 1].

        The same contract as :meth:`tinyddpm.data.Dataset.x_at`; for training, the worker processes of
        :func:`~tinyddpm.data.loader.make_batch_source` decode faster.
        """
        rows = idx.tolist() if isinstance(idx, Tensor) else list(idx)
        if not rows:
            return torch.empty((0, *self.shape))
        return pixels_to_float(torch.stack([self[int(i)] for i in rows]))

    def __getattr__(self, name: str):
        if name == "x":
            raise AttributeError(f"{type(self).__name__} streams from disk and has no in-memory x; "
                                 "read batches through tinyddpm.data.make_batch_source")
        raise AttributeError(name)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes})")


class ImageFolderStream(StreamingImages):
    """Every image under ``path`` (sorted), decoded on demand, resized and centre-cropped to ``image_size``.

    Labels come from class sub-folders if there are any, as in ``load_dataset("folder", ...)``.
    """

    def __init__(self, path: str | Path, image_size: int = 32, channels: Literal[1, 3] = 3):
        check_int("image_size", image_size, low=1)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels!r}")
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"folder: {path} is not a folder")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"folder: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
        top = [f for f in files if f.parent == path]
        if top and len(top) != len(files):
            raise ValueError(f"folder: {path} has images both at its top level ({top[0].name}, ...) and in "
                             "sub-folders; put every image in a class sub-folder, or none")
        labels = num_classes = None
        if not top:
            names = [f.relative_to(path).parts[0] for f in files]
            classes = sorted(set(names))
            lookup = {c: k for k, c in enumerate(classes)}
            labels, num_classes = torch.tensor([lookup[c] for c in names], dtype=torch.int64), len(classes)
        # file names as one numpy array of str: forked DataLoader workers share it without copy-on-write churn
        self._files = np.array([str(f) for f in files])
        self._size, self._channels = image_size, channels
        super().__init__(len(files), (channels, image_size, image_size), labels, num_classes, "folder")

    def __getitem__(self, i: int) -> Tensor:
        return read_pixels(self._files[i], image_size=self._size, channels=self._channels)


class IdxStream(StreamingImages):
    """The images of an uncompressed IDX file (MNIST's format), memory-mapped: a sample is read when asked for.

    ``labels`` come from the matching label file (small; read whole). A ``.gz`` file cannot be mapped:
    ``gunzip`` it, or load it in memory with ``load_dataset`` (uint8, 47 MB for MNIST's 60,000).
    """

    def __init__(self, images: str | Path, labels: str | Path | None = None, name: str = "mnist"):
        from .datasets import read_idx

        images = Path(images)
        head = images.read_bytes()[:16] if images.is_file() else b""
        if head[:2] == b"\x1f\x8b":
            raise ValueError(f"{images.name}: a gzip file cannot be streamed; gunzip it first (or load it in memory)")
        if len(head) < 16 or struct.unpack(">I", head[:4])[0] != 0x803:
            raise ValueError(f"{images.name}: not an uncompressed IDX image file (magic 0x00000803)")
        n, rows, cols = struct.unpack(">3I", head[4:16])
        body = images.stat().st_size - 16
        if body != n * rows * cols:
            raise ValueError(f"{images.name}: truncated or corrupt IDX image file: header says "
                             f"{n}×{rows}×{cols} = {n * rows * cols} bytes of data, file holds {body}")
        y = num_classes = None
        if labels is not None:
            raw = read_idx(labels, 0x801)
            if len(raw) != n:
                raise ValueError(f"{images.name} has {n} images but {Path(labels).name} has {len(raw)} labels")
            y, num_classes = torch.from_numpy(raw.astype(np.int64)), 10
        self._file, self._map = str(images), None
        super().__init__(n, (1, rows, cols), y, num_classes, name)

    def __getitem__(self, i: int) -> Tensor:
        if self._map is None:  # opened lazily, so each DataLoader worker maps the file itself
            c, h, w = self.shape
            self._map = np.memmap(self._file, dtype=np.uint8, mode="r", offset=16, shape=(len(self), c, h, w))
        return torch.from_numpy(np.array(self._map[i]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}  # a worker (spawned or forked) maps its own copy
