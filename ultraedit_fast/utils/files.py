"""Files the package writes and reads: atomic writes (a temporary file in the same
directory, flushed and ``fsync``-ed, renamed into place, the directory ``fsync``-ed), the
check that an output directory can be written before any work is done, and reading a
regular file only (never a FIFO or a device, which could block or never end)."""

from __future__ import annotations

import json
import os
import secrets
import stat
from typing import Any, Callable, Optional


def fsync_dir(path: str) -> None:
    """``fsync`` a directory, so that a rename inside it survives a crash (a no-op where a
    directory cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def tmp_name(directory: str, name: str) -> str:
    """A temporary name beside ``name`` that no other process or thread will pick."""
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically and durably: a crash at any moment leaves
    either the old file or the new one, never a mixture. Returns ``path``."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = tmp_name(directory, name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(directory)
    return path


def atomic_write_json(
    path: str,
    doc: Any,
    *,
    indent: Optional[int] = 1,
    default: Optional[Callable[[Any], Any]] = None,
    sort_keys: bool = False,
) -> str:
    """:func:`atomic_write_bytes` of ``doc`` as JSON (a final newline). Returns ``path``."""
    text = json.dumps(doc, indent=indent, default=default, sort_keys=sort_keys) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(path: str, what: str = "output_dir") -> str:
    """Create ``path`` if needed and check that files can be written there, before any
    work is done; ``ValueError`` naming ``what`` otherwise. Returns ``path``."""
    if os.path.lexists(path) and not os.path.exists(path):
        raise ValueError(f"{what}: {path!r} is a symbolic link that leads nowhere")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}: {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}-{secrets.token_hex(4)}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {path!r}: {e.strerror or e}") from None
    return path


def read_regular_file(path: str, what: str, limit: Optional[int] = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (``ValueError`` naming ``what``
    for a FIFO, a device, a directory; ``FileNotFoundError`` when missing) of at most
    ``limit`` bytes. Opened without following a FIFO's block: the type is checked on the
    open descriptor."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(
                f"{what}: {path!r} is not a regular file ({_kind(st.st_mode)}); refused unread"
            )
        if limit is not None and st.st_size > limit:
            raise ValueError(
                f"{what}: {path!r} is {st.st_size} bytes, more than the {limit} expected"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "of an unknown kind"
