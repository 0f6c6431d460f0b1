"""Atomic writes: a reader (or a crash) sees the old content or the new one, never half of either.

Every file is written under a hidden temporary name in the destination's directory, flushed and
fsync'ed, then renamed over the destination (``os.replace`` is atomic within a filesystem), and the
directory itself is fsync'ed so that the rename survives a power cut. Checkpoints, cached
classifiers and cached models all go through these functions.

Directories are also safe against concurrent writers (two notebooks or test workers that train the
same cached model at once): :func:`write_dir_atomic` holds an exclusive lock on a hidden
``.<name>.lock`` file beside the destination while it writes, and a writer that finds the destination
created by another process while it waited keeps that one instead of writing its own.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, concurrent writers are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["fsync_dir", "write_bytes_atomic", "write_dir_atomic", "write_file_atomic", "write_text_atomic"]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (creations, renames) durable; a no-op where the OS refuses."""
    try:
        _fsync_path(Path(path))
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def _tmp_name(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def _exclusive_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``.<name>.lock`` beside ``final`` (POSIX; a no-op elsewhere).

    The lock file is removed while still held; a waiter that then locks the removed file notices
    (its inode is no longer the one at the path) and tries again, so no lock files pile up.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, fsync it and rename it to ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final, "tmp")
    try:
        write(tmp)
        if not tmp.is_file():
            raise FileNotFoundError(f"write_file_atomic: the writer did not create {tmp}")
        _fsync_path(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return final


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` by a file holding ``data``, atomically."""
    return write_file_atomic(path, lambda p: p.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` by a UTF-8 file holding ``text``, atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_dir_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh hidden directory next to ``path``, fsync every file in it,
    then rename it to ``path`` (an existing ``path`` is moved aside first and removed afterwards).

    If ``write`` raises, the temporary directory is removed and ``path`` is untouched. Concurrent
    calls for the same ``path`` run one at a time; one that did not find ``path`` when called but
    finds it once it holds the lock (created meanwhile by another process) returns without calling
    ``write``, so a cached model is trained once, not once per process.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    existed = final.exists()
    with _exclusive_lock(final):
        if not existed and final.exists():  # another process created it while we waited: keep theirs
            return final
        tmp = _tmp_name(final, "tmp")
        tmp.mkdir()
        try:
            write(tmp)
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync_path(f)
            for d in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
                fsync_dir(d)
            if final.exists():  # replacing: move the old one aside, put the new one in place, drop the old
                old = _tmp_name(final, "old")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(final.parent)
    return final
