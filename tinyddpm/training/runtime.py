"""Where and how a training step runs: device, processes, precision, random states, stop signals.

Everything here is about the machine, not the math: the Trainer asks these helpers which device
and number format to use, how to save and restore every random generator (keyed by device type,
so a checkpoint moves between CPU and GPU), and whether SIGINT/SIGTERM asked it to stop.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is an error (not a silent CPU run)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is available; use device='auto' or 'cpu'")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); nccl on CUDA, gloo on CPU.

    With no WORLD_SIZE (or 1) this is a single process and nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


# ----------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: plain fp32) and whether gradients need a GradScaler (fp16)."""

    name: str
    dtype: torch.dtype | None
    scaler: bool

    def autocast(self, device: torch.device):
        import contextlib

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(precision: str, device: torch.device, *, bf16_supported: bool | None = None) -> Precision:
    """The number format a run actually uses, saying (a warning) when it differs from the one asked for.

    "auto": bf16 autocast on CUDA, fp32 on CPU. "bf16" on a GPU without bf16 support falls back to
    fp16 with a GradScaler. "fp16" needs CUDA (CPU fp16 kernels are slow and unscaled gradients
    underflow). "bf16" on CPU autocasts to bfloat16 on the CPU.
    """
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        if precision in ("auto", "bf16"):
            if ok:
                return Precision("bf16", torch.bfloat16, False)
            warnings.warn(f"precision={precision!r}: this GPU does not support bfloat16; training in fp16 with a "
                          "GradScaler instead (pass precision='fp32' for full precision)", stacklevel=3)
            return Precision("fp16", torch.float16, True)
        if precision == "fp16":
            return Precision("fp16", torch.float16, True)
        return Precision("fp32", None, False)
    if precision == "fp16":
        raise ValueError("precision='fp16' needs a CUDA GPU; on CPU use 'bf16' (autocast) or 'fp32'")
    if precision == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    return Precision("fp32", None, False)


def fused_adamw_supported(device: torch.device) -> bool:
    """Fused AdamW exists for CUDA and, from torch 2.4 on, for CPU."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        from torch.torch_version import TorchVersion

        return TorchVersion(torch.__version__) >= "2.4"
    return False


# ----------------------------------------------------------------------------- random states
def rng_state(batch_gen: torch.Generator, noise_gen: torch.Generator) -> dict[str, Any]:
    """Every generator's state, keyed by device type: ``{"batch", "noise": {type: s}, "torch": {type: s}}``."""
    torch_states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch_states["cuda"] = torch.cuda.get_rng_state_all()
    return {"batch": batch_gen.get_state(), "noise": {noise_gen.device.type: noise_gen.get_state()},
            "torch": torch_states}


def restore_rng_state(state: dict[str, Any], batch_gen: torch.Generator, noise_gen: torch.Generator,
                      *, reseed: int) -> list[str]:
    """Restore what :func:`rng_state` saved; return (and warn about) what could not be restored.

    A state is only ever handed to a generator of the device type it was saved from: a noise
    state saved on CUDA cannot drive a CPU generator (and vice versa), so the noise generator is
    then reseeded with ``reseed`` and the run continues, but not bit-identically. Checkpoints from
    before the device keying (plain tensors) are read as CPU states.
    """
    lost: list[str] = []
    batch_gen.set_state(state["batch"])
    noise = state["noise"] if isinstance(state["noise"], dict) else {"cpu": state["noise"]}
    here = noise_gen.device.type
    if here in noise:
        noise_gen.set_state(noise[here])
    else:
        noise_gen.manual_seed(reseed)
        lost.append(f"the noise generator state was saved on {'/'.join(noise)} and cannot drive a {here} "
                    f"generator: reseeded with {reseed}, so the noise draws differ from the original run")
    torch_states = state["torch"] if isinstance(state["torch"], dict) else {"cpu": state["torch"]}
    if "cuda" in state and "cuda" not in torch_states:  # old layout
        torch_states["cuda"] = state["cuda"]
    torch.set_rng_state(torch_states["cpu"])
    cuda = torch_states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            lost.append(f"the global CUDA RNG states of {len(cuda)} GPUs cannot be restored on "
                        f"{torch.cuda.device_count()} (dropout masks on the GPU will differ)")
    elif cuda is None and here == "cuda":
        lost.append("the checkpoint holds no CUDA RNG state (it was saved without a GPU): dropout masks on the "
                    "GPU start from the default state")
    if lost:
        warnings.warn("resuming on another device type: " + "; ".join(lost), stacklevel=3)
    return lost


# ----------------------------------------------------------------------------- stop signals
class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM only set ``self.signum`` (the step in progress
    finishes); a second SIGINT raises KeyboardInterrupt at once. Inactive off the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
