"""One hash of a module's weights: how a pipeline recognises the frozen VAE or text tower it was trained with."""

from __future__ import annotations

import hashlib

from torch import nn


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, shapes, float32 bytes), 16 hex digits."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]
