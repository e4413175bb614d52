"""Streaming loaders for model-editing datasets (zsRE, CounterFact, FEVER, WikiBigEdit,
UltraEditBench) that yield :class:`~ultraedit_fast.model.requests.EditRequest` objects.

Files
-----
A data file is either one JSON array of records or JSON Lines (one record per line).
Which one is decided by the first non-whitespace character: ``[`` is an array, ``{``
is JSON Lines (the file extension is not trusted).  A UTF-8 byte-order mark is allowed.
Arrays are read incrementally in chunks (``chunk_size`` characters, 1 MiB by
default) with :meth:`json.JSONDecoder.raw_decode`, one element at a time, so memory
stays constant however large the file is (UltraEditBench is ~2M records in one array).

How a record of each format (zsRE, CounterFact, FEVER, WikiBigEdit, UltraEditBench)
becomes an ``EditRequest``, and which fields it must have: :mod:`.formats`.

Errors
------
* missing file -> ``FileNotFoundError`` naming the path;
* unknown format / target / on_error name -> ``ValueError`` listing the valid names;
* invalid JSON (including a truncated file) -> :class:`DataFormatError` (a ``ValueError``)
  naming the file, the byte offset (arrays) or line (JSON Lines) and the record index;
* a malformed record (not an object, missing field, wrong type, empty string, undetectable
  format) -> :class:`DataFormatError` naming the file, the record index and the problem,
  or, with ``on_error="skip"``, the record is skipped and counted in :class:`LoadStats`.
  Invalid lines of a JSON Lines file are skippable too; a syntax error inside a JSON
  array is always fatal (the reader cannot resynchronise).

Record indices are 0-based positions in the file (array element / non-blank line),
counted before ``offset`` is applied, so they are stable across runs.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ..model.requests import EditRequest
from .formats import FORMATS, BadRecord, check_target_for, convert, detect_format
from .jsonstream import BadLine, DataFormatError, iter_values

__all__ = [
    "FORMATS",
    "TARGETS",
    "DEFAULT_CHUNK_SIZE",
    "DataFormatError",
    "Example",
    "LoadStats",
    "RequestReader",
    "count_records",
    "detect_format",
    "iter_examples",
    "load_requests",
]

TARGETS: Tuple[str, ...] = ("answers", "alt")
ON_ERROR: Tuple[str, ...] = ("raise", "skip")
DEFAULT_CHUNK_SIZE = 1 << 20  # characters per read
MAX_ERRORS_KEPT = 1000  # LoadStats.errors keeps at most this many messages

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Example:
    """One record: its ``EditRequest``, the fields the request cannot hold (``extras``,
    e.g. WikiBigEdit ``personas`` / ``mhop`` / ``mhop_ans``), its 0-based record
    ``index`` in the file and the dataset ``format`` it was read as."""

    request: EditRequest
    extras: Dict[str, Any]
    index: int
    format: str


@dataclass
class LoadStats:
    """Counters for one pass over a file.

    ``records``: records read at or after ``offset`` (valid or not); ``yielded``: examples
    produced; ``skipped``: malformed records skipped under ``on_error="skip"``;
    ``errors``: ``(index, message)`` of skipped records (the first ``MAX_ERRORS_KEPT``);
    ``format``: the dataset format in use (detected or given)."""

    records: int = 0
    yielded: int = 0
    skipped: int = 0
    errors: List[Tuple[int, str]] = field(default_factory=list)
    format: Optional[str] = None

    def reset(self) -> None:
        self.records = self.yielded = self.skipped = 0
        self.errors = []
        self.format = None


def count_records(path: PathLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Number of records in ``path`` (array elements, or non-blank JSON Lines lines),
    streaming in constant memory.  Invalid JSON in an array raises ``DataFormatError``;
    invalid JSON Lines lines are counted."""
    path = _check_path(path)
    _check_chunk(chunk_size)
    n = 0
    for _ in iter_values(path, chunk_size):
        n += 1
    return n


def _check_path(path: PathLike) -> str:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(errno.ENOENT, f"data file not found: {p}", p)
    if os.path.isdir(p):
        raise IsADirectoryError(errno.EISDIR, f"expected a data file, got a directory: {p}", p)
    return p


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


class RequestReader:
    """A re-iterable reader of one data file.

    >>> reader = RequestReader("zsre.json", on_error="skip")
    >>> for request in reader: ...            # EditRequest objects
    >>> reader.skipped, reader.errors         # malformed records of the last pass
    >>> for ex in reader.examples(): ...      # Example(request, extras, index, format)

    Arguments are those of :func:`load_requests`.  Each pass (``iter(reader)`` or
    ``reader.examples()``) reads the file again and resets :attr:`stats`.
    """

    def __init__(
        self,
        path: PathLike,
        format: str = "auto",
        *,
        target: str = "answers",
        limit: Optional[int] = None,
        offset: int = 0,
        on_error: str = "raise",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        self.path = _check_path(path)
        if format != "auto" and format not in FORMATS:
            raise ValueError(
                f"format: unknown format {format!r}; valid: 'auto', "
                + ", ".join(repr(f) for f in FORMATS)
            )
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
        ):
            raise ValueError(f"limit: expected None or an int >= 0, got {limit!r}")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
        _check_chunk(chunk_size)
        if format != "auto":
            check_target_for(format, target)
        self.format = format
        self.target = target
        self.limit = limit
        self.offset = offset
        self.on_error = on_error
        self.chunk_size = chunk_size
        self.stats = LoadStats()

    @property
    def skipped(self) -> int:
        return self.stats.skipped

    @property
    def errors(self) -> List[Tuple[int, str]]:
        return self.stats.errors

    def __iter__(self) -> Iterator[EditRequest]:
        return (ex.request for ex in self.examples())

    def examples(self) -> Iterator[Example]:
        """Yield :class:`Example` objects (request, extras, index, format)."""
        return self._examples(self.stats)

    def _examples(self, stats: LoadStats) -> Iterator[Example]:
        stats.reset()
        path, target, on_error = self.path, self.target, self.on_error
        fmt = None if self.format == "auto" else self.format
        detected_at = None
        stats.format = fmt
        if self.limit == 0:
            return
        for index, record in enumerate(iter_values(path, self.chunk_size)):
            if index < self.offset:
                continue
            stats.records += 1
            try:
                if isinstance(record, BadLine):
                    raise BadRecord(record.message)
                if fmt is None:
                    fmt = _detect(record, target)
                    detected_at = index
                    stats.format = fmt
                request, extras = convert(record, fmt, target)
            except BadRecord as e:
                msg = _record_error(path, index, e, record, fmt, detected_at)
                if on_error == "raise":
                    raise DataFormatError(msg, path, index) from None
                stats.skipped += 1
                if len(stats.errors) < MAX_ERRORS_KEPT:
                    stats.errors.append((index, msg))
                continue
            stats.yielded += 1
            yield Example(request, extras, index, fmt)
            if self.limit is not None and stats.yielded >= self.limit:
                return


def _detect(record: Any, target: str) -> str:
    """The format of the first record read (:class:`BadRecord` when it has none); a
    ``target`` the format cannot give is a configuration error, always raised."""
    try:
        fmt = detect_format(record)
    except ValueError as e:
        raise BadRecord(str(e)) from None
    check_target_for(fmt, target)
    return fmt


def _record_error(
    path: str,
    index: int,
    error: BadRecord,
    record: Any,
    fmt: Optional[str],
    detected_at: Optional[int],
) -> str:
    """The message for a malformed record: the file, the record, what is wrong, and the
    format it was read as (and the format it looks like, when that is another)."""
    how = (
        f"format {fmt!r} detected from record {detected_at}"
        if detected_at is not None
        else f"format {fmt!r}"
        if fmt is not None
        else "format not detected"
    )
    if fmt is not None and isinstance(record, dict):
        try:
            other = detect_format(record)
        except ValueError:
            other = None
        if other is not None and other != fmt:
            how += f"; the record looks like {other!r}"
    return f"{path}: record {index}: {error} ({how})"


def iter_examples(
    path: PathLike,
    format: str = "auto",
    *,
    target: str = "answers",
    limit: Optional[int] = None,
    offset: int = 0,
    on_error: str = "raise",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    stats: Optional[LoadStats] = None,
) -> Iterator[Example]:
    """Stream :class:`Example` objects (``request``, ``extras``, ``index``, ``format``) from
    ``path``.  Arguments as in :func:`load_requests`; they are checked (and a missing file
    reported) when this is called, not at the first ``next()``.  Pass a
    :class:`LoadStats` as ``stats`` to get the counts (skipped records, errors)."""
    reader = RequestReader(
        path,
        format,
        target=target,
        limit=limit,
        offset=offset,
        on_error=on_error,
        chunk_size=chunk_size,
    )
    return reader._examples(stats if stats is not None else reader.stats)


def load_requests(
    path: PathLike,
    format: str = "auto",
    *,
    target: str = "answers",
    limit: Optional[int] = None,
    offset: int = 0,
    on_error: str = "raise",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    stats: Optional[LoadStats] = None,
) -> Iterator[EditRequest]:
    """Stream :class:`EditRequest` objects from a JSON array or JSON Lines file, in
    constant memory.

    ``format``: ``"auto"`` (detect from the first record read, then hold every record to
    that format) or one of :data:`FORMATS`.  ``target``: ``"answers"`` (the dataset's edit
    target) or ``"alt"`` (the ``alt`` field; zsre, zsre_ultraedit and fever only).
    ``offset``: skip the first ``offset`` records of the file (not parsed into requests);
    ``limit``: yield at most this many requests.  ``on_error``: ``"raise"`` (a
    :class:`DataFormatError` naming the file and record index) or ``"skip"`` (skip
    malformed records, counted in ``stats``).  ``chunk_size``: characters read at a time.
    See :mod:`.formats` for the field mapping of each format."""
    return (
        ex.request
        for ex in iter_examples(
            path,
            format,
            target=target,
            limit=limit,
            offset=offset,
            on_error=on_error,
            chunk_size=chunk_size,
            stats=stats,
        )
    )
