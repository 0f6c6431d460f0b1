"""Where tinyddpm keeps files it can rebuild (the metrics classifier): one directory, created on use."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str | None = None) -> Path:
    """``$TINYDDPM_CACHE`` if set, else ``~/.cache/tinyddpm``; with ``sub``, that sub-folder. Created.

    ``sub`` is a relative folder name such as ``"classifiers"``; it may not climb out of the cache.
    """
    root = os.environ.get("TINYDDPM_CACHE") or Path.home() / ".cache" / "tinyddpm"
    path = Path(root).expanduser()
    if sub is not None:
        if not isinstance(sub, str) or not sub or Path(sub).is_absolute() or ".." in Path(sub).parts:
            raise ValueError(f"sub must be a relative folder name inside the cache, like 'classifiers'; got {sub!r}")
        path = path / sub
    path.mkdir(parents=True, exist_ok=True)
    return path
