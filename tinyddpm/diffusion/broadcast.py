"""The one broadcasting helper: pick a per-step scalar and shape it like x."""

from __future__ import annotations

from torch import Tensor


def extract(a: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Return ``a[t]`` shaped (B, 1, ..., 1) to broadcast against ``x``, in x's dtype and on x's device.

    A scalar ``t`` gives a 0-d tensor left on t's device: a CPU scalar multiplies x on any device
    without a host-to-device copy, so sampling loops that pass Python ints never synchronise a GPU.

    ``a`` is a paper-indexed per-step array (length T+1, usually float64); ``t`` is a LongTensor of
    shape () or (B,). Indexing happens in a's precision before the cast, so float32 callers still
    get correctly rounded coefficients. Works for any rank of x: (B, D), (B, C, H, W), ...
    """
    v = a.to(device=t.device)[t] if a.device != t.device else a[t]
    if v.ndim == 0:   # one step for the whole batch: a 0-d tensor multiplies x on any device without a copy
        return v.to(dtype=x.dtype)
    v = v.to(device=x.device, dtype=x.dtype)
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))
