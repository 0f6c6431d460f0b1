"""Minibatches for training, from memory or streamed from disk, resumable and sharded (book chapter 5).

:func:`make_batch_source` is how the Trainer reads a streamed set, or any images with random flips
(``TrainConfig(hflip=True)``); an in-memory set without flips is sampled with replacement by the
objective itself (the book's chapters were measured that way)::

    batches = make_batch_source(data, batch_size=128, seed=0, device="cuda", hflip=True)
    x0, y = next(batches)          # (b, C, H, W) float32 in [-1, 1]; labels or None
    state = batches.state_dict()   # {"epoch", "position", ...}: save it with the checkpoint
    batches.load_state_dict(state) # ...and the same batches follow, bit for bit

**Order.** Epoch e is a permutation of the N samples drawn from a generator seeded by (seed, e), so
it depends on nothing else (not on workers, timing or how many processes there are). The global
batches are consecutive runs of ``batch_size`` entries of the concatenated epochs (a batch may
straddle two epochs; nothing is dropped), and every sample is seen once per epoch. The position
(epoch, entries used) is the whole state.

**Processes.** Under torchrun each of ``world_size`` processes takes its slice
``[rank·b, (rank+1)·b)``, b = batch_size / world_size, of every global batch: N processes together
see exactly what one process sees, and a run can resume with a different number of processes.

**Flips.** With ``hflip=True`` each entry of epoch e is mirrored left-right with probability 1/2,
drawn from a second generator seeded by (seed, e) (the DDPM CIFAR-10 recipe uses random flips).

**Storage.** A :class:`~tinyddpm.data.Dataset` (uint8 pixels or floats) is kept on the device when
it is smaller than ``max_device_bytes`` and gathered on the CPU otherwise; pixels become floats only
after the batch reaches the device. A :class:`~tinyddpm.data.stream.StreamingImages` set is decoded
by ``num_workers`` DataLoader processes; memory then holds a few batches, never the set.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checks import check_int
from .images import pixels_to_float
from .stream import StreamingImages

FEW_IMAGES = 500  # below this many images a model tends to reproduce its training set


def _seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit generator seed mixing (seed, epoch, stream) so that nearby triples are unrelated."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) as given; else from torch.distributed if initialised; else env RANK/WORLD_SIZE."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    check_int("world_size", world_size, low=1)
    check_int("rank", rank, low=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size = {world_size}; got {rank}")
    return rank, world_size


class EpochOrder:
    """The infinite sequence of global batches described in the module docstring: (indices, flips)."""

    def __init__(self, n: int, batch_size: int, seed: int, hflip: bool, epoch: int = 0, position: int = 0):
        self.n, self.batch_size, self.seed, self.hflip = n, batch_size, seed, hflip
        self.epoch, self.position = epoch, position
        self._cached: tuple[int, Tensor, Tensor | None] | None = None

    def permutation(self, epoch: int) -> tuple[Tensor, Tensor | None]:
        """Epoch ``epoch``'s order (int64 (N,)) and flip flags (bool (N,), or None)."""
        if self._cached is None or self._cached[0] != epoch:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_seed(self.seed, epoch, 0)))
            flips = None
            if self.hflip:
                g = torch.Generator().manual_seed(_seed(self.seed, epoch, 1))
                flips = torch.rand(self.n, generator=g) < 0.5
            self._cached = (epoch, perm, flips)
        return self._cached[1], self._cached[2]

    def next(self) -> tuple[Tensor, Tensor | None]:
        """The next global batch: indices (batch_size,) and flips (batch_size,) or None; advances."""
        idx, flips, need = [], [], self.batch_size
        while need:
            perm, flip = self.permutation(self.epoch)
            take = min(need, self.n - self.position)
            idx.append(perm[self.position:self.position + take])
            if flip is not None:
                flips.append(flip[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return torch.cat(idx), (torch.cat(flips) if self.hflip else None)


class _RankBatches(torch.utils.data.Sampler):
    """This rank's index lists, forever, from a given (epoch, position): the DataLoader's batch sampler."""

    def __init__(self, order: EpochOrder, part: slice):
        self.order, self.part = order, part

    def __iter__(self) -> Iterator[list[int]]:
        o = self.order
        own = EpochOrder(o.n, o.batch_size, o.seed, False, o.epoch, o.position)  # flips are applied later
        while True:
            yield own.next()[0][self.part].tolist()


class BatchSource:
    """``next(source)`` -> (x0 float32 on ``device``, labels int64 on ``device`` or None); see the module docstring."""

    def __init__(
        self, data: Any, batch_size: int, *, seed: int = 0, rank: int | None = None, world_size: int | None = None,
        device: str | torch.device = "cpu", hflip: bool = False, num_workers: int | None = None,
        max_device_bytes: int = 2 << 30, warn_few: bool = True,
    ):
        check_int("batch_size", batch_size, low=1)
        check_int("seed", seed, low=0)
        if not isinstance(hflip, bool):
            raise TypeError(f"hflip must be True or False; got {type(hflip).__name__}")
        rank, world_size = dist_rank_world(rank, world_size)
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        self.device = torch.device(device)
        self.streaming = isinstance(data, StreamingImages)
        self.data, self.rank, self.world_size = data, rank, world_size
        n, shape = self._describe(data)
        if hflip and len(shape) != 3:
            raise ValueError(f"hflip=True needs images (C, H, W); this data has samples of shape {shape}")
        if warn_few:
            warn_few_images(n, shape, stacklevel=4)
        b = batch_size // world_size
        self._part = slice(rank * b, (rank + 1) * b)
        self._order = EpochOrder(n, batch_size, seed, hflip)
        labels = getattr(data, "labels", None)
        if self.streaming:
            self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else check_int(
                "num_workers", num_workers, low=0)
            self._store: Tensor | None = None
            self._labels = labels
            self._it: Iterator[Tensor] | None = None
        else:
            self.num_workers = 0
            pixels = getattr(data, "pixels", None)
            store = pixels if isinstance(pixels, Tensor) else data.x
            home = self.device if store.numel() * store.element_size() < max_device_bytes else torch.device("cpu")
            self._store = store.to(home)
            self._labels = None if labels is None else labels.to(home)

    @staticmethod
    def _describe(data: Any) -> tuple[int, tuple[int, ...]]:
        if isinstance(data, StreamingImages):
            return len(data), tuple(data.shape)
        pixels = getattr(data, "pixels", None)
        store = pixels if isinstance(pixels, Tensor) else getattr(data, "x", None)
        if not isinstance(store, Tensor) or store.ndim < 2 or len(store) == 0:
            raise TypeError("data must be a tinyddpm Dataset (non-empty x or pixels of shape (N, ...)) or a "
                            f"StreamingImages set; got {type(data).__name__}")
        return len(store), tuple(store.shape[1:])

    def __iter__(self) -> BatchSource:
        return self

    def __next__(self) -> tuple[Tensor, Tensor | None]:
        if self.streaming and self._it is None:
            self._it = iter(self._loader())  # before advancing: its batch sampler starts where we are now
        idx, flip = self._order.next()
        idx = idx[self._part]
        self.last_indices = idx  # this process's rows of the dataset (CPU int64): labels, captions
        if self.streaming:
            x = pixels_to_float(next(self._it).to(self.device, non_blocking=True))
            y = None if self._labels is None else self._labels[idx].to(self.device, non_blocking=True)
        else:
            at = idx.to(self._store.device, non_blocking=True)
            x = self._store[at].to(self.device, non_blocking=True)
            x = pixels_to_float(x) if x.dtype == torch.uint8 else x
            y = None if self._labels is None else self._labels[at].to(self.device, non_blocking=True)
        if flip is not None:
            mirror = flip[self._part].to(self.device, non_blocking=True)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x, y

    def _loader(self) -> torch.utils.data.DataLoader:
        """A DataLoader whose batch sampler starts at the current position (workers decode, main collates)."""
        kw: dict[str, Any] = {}
        if self.num_workers:
            kw = {"persistent_workers": False, "prefetch_factor": 2}
        return torch.utils.data.DataLoader(
            self.data, batch_sampler=_RankBatches(self._order, self._part), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", **kw,
        )

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts: epoch and entries of it used (global), plus what must match on load."""
        o = self._order
        return {"epoch": o.epoch, "position": o.position, "seed": o.seed, "n": o.n, "batch_size": o.batch_size,
                "hflip": int(o.hflip)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); the data, seed, batch size and flips must match."""
        o = self._order
        for key, have in (("seed", o.seed), ("n", o.n), ("batch_size", o.batch_size), ("hflip", int(o.hflip))):
            if key in state and int(state[key]) != have:
                raise ValueError(f"cannot resume the batch order: the saved state has {key} = {state[key]}, "
                                 f"this source has {have}")
        epoch, position = check_int("epoch", state["epoch"], low=0), check_int("position", state["position"], low=0)
        if position >= o.n:
            raise ValueError(f"position must be < the dataset size {o.n}; got {position}")
        o.epoch, o.position = epoch, position
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` starts new ones at the current position)."""
        it, self._it = getattr(self, "_it", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        self.close()


def warn_few_images(n: int, shape: tuple[int, ...], *, stacklevel: int = 2) -> None:
    """Warn when a set of images (samples of shape (C, H, W)) has fewer than FEW_IMAGES of them."""
    if len(shape) == 3 and n < FEW_IMAGES:
        warnings.warn(f"the dataset has only {n} images: a diffusion model trained on so few tends to "
                      "reproduce its training images rather than make new ones", UserWarning, stacklevel=stacklevel)


def make_batch_source(
    data: Any, batch_size: int, *, seed: int = 0, rank: int | None = None, world_size: int | None = None,
    device: str | torch.device = "cpu", hflip: bool = False, num_workers: int | None = None,
    warn_few: bool = True,
) -> BatchSource:
    """An endless, resumable source of this process's minibatches of ``data`` (see the module docstring).

    ``batch_size`` is the global batch; each of ``world_size`` processes gets batch_size / world_size
    samples. ``rank``/``world_size`` default to torch.distributed's (or env RANK/WORLD_SIZE).
    ``num_workers`` (streaming sets only) defaults to min(4, CPUs). ``warn_few``: warn when there are
    fewer than FEW_IMAGES images (the Trainer warns itself, for generative objectives only).
    """
    return BatchSource(data, batch_size, seed=seed, rank=rank, world_size=world_size, device=device,
                       hflip=hflip, num_workers=num_workers, warn_few=warn_few)
