"""The checkpoint directory as a place to write: the argument checked and the directory
created (:func:`checked_directory`), one writer at a time (:class:`DirLock`, an exclusive
``flock`` on ``<dir>/.lock``), and the temporary files of writers that died removed
(:func:`remove_stale_tmp`)."""

from __future__ import annotations

import os
import re
import time

from ..utils.files import unlink_quietly

LOCKFILE = ".lock"
_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")  # utils.files.tmp_name's names
_FOREIGN_TMP_FILE = re.compile(r"^\.tmp[A-Za-z0-9_]{6,}$")
_FOREIGN_TMP_AGE_S = 60  # a foreign temporary file older than this has no live writer


def as_path(path, argument: str = "path") -> str:
    """``path`` as a ``str`` (``TypeError`` naming ``argument`` for anything but a str or an
    ``os.PathLike``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{argument}: expected a str or os.PathLike directory, got {type(path).__name__}"
        )
    return os.fspath(path)


def checked_directory(path) -> str:
    """``path`` as a checkpoint directory to write into, created if missing; ``ValueError``
    naming it when it cannot be one."""
    directory = as_path(path)
    if os.path.lexists(directory) and not os.path.exists(directory):
        raise ValueError(
            f"path: {directory!r} is a symbolic link that leads nowhere (broken, "
            "or a loop); a checkpoint is a directory"
        )
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"path: {directory!r} exists and is not a directory; a checkpoint is a directory"
        )
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"path: cannot create the checkpoint directory {directory!r}: {e.strerror or e}"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"path: {directory!r}: permission denied (cannot write there)")
    return directory


class DirLock:
    """An exclusive ``flock`` on ``<directory>/.lock`` while held (no lock where ``fcntl``
    is missing: Windows)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCKFILE)
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process lock
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_tmp(directory: str) -> None:
    """Temporary files of writers that died (``kill -9``) mid-save: ours (their pid is gone)
    and those safetensors' own writer left in versions that let it write the tensor file
    (``.tmpXXXXXX``, older than a minute: the directory lock keeps writers out)."""
    now = time.time()
    for f in os.listdir(directory):
        full = os.path.join(directory, f)
        m = _TMP_FILE.match(f)
        if m and not _pid_alive(int(m.group(1))):
            unlink_quietly(full)
        elif _FOREIGN_TMP_FILE.match(f):
            try:
                if now - os.stat(full).st_mtime > _FOREIGN_TMP_AGE_S:
                    unlink_quietly(full)
            except OSError:
                pass
