"""The one broadcasting helper: pick a per-step scalar and shape it like x."""

from __future__ import annotations

from torch import Tensor


def extract(a: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Return ``a[t]`` shaped (B, 1, ..., 1) to broadcast against ``x``, in x's dtype and device.

    ``a`` is a paper-indexed per-step array (length T+1, usually float64); ``t`` is a LongTensor of
    shape () or (B,). Indexing happens in a's precision before the cast, so float32 callers still
    get correctly rounded coefficients. Works for any rank of x: (B, D), (B, C, H, W), ...
    """
    v = a.to(device=t.device)[t] if a.device != t.device else a[t]
    v = v.to(device=x.device, dtype=x.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))
