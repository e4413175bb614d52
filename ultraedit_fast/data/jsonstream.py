"""Reading JSON data files as a stream of values: one JSON array read element by element in
constant memory, or JSON Lines, from a file, a pipe or a FIFO, read once.

Which one a file is, is decided by its first non-whitespace character (``[``: an array,
``{``: JSON Lines; the file extension is not trusted). A UTF-8 byte-order mark is allowed.
Errors are :class:`DataFormatError` naming the file and the byte offset (arrays), the line
(JSON Lines) and the record index.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
from typing import Any, Iterator, Optional


class DataFormatError(ValueError):
    """A data file or one of its records is malformed.

    ``path`` is the file, ``index`` the 0-based record index (None when unknown) and
    ``offset`` the byte offset in the file (None when unknown)."""

    def __init__(
        self, message: str, path: str, index: Optional[int] = None, offset: Optional[int] = None
    ):
        super().__init__(message)
        self.path = path
        self.index = index
        self.offset = offset


_NON_WS = re.compile(r"[^ \t\n\r]")
_NUMBER_TAIL = re.compile(r"[0-9eE.+-]*")


class BadLine:
    """Sentinel value for a JSON Lines line that is not valid JSON (skippable)."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


_FIFO_WAIT_S = 10.0  # how long a FIFO may have no writer before the read is given up


def _open_binary(path: str):
    """Open ``path`` for reading once, as bytes. A FIFO (a named pipe, or ``/dev/fd/N`` of a
    shell's process substitution) is opened without blocking and given ``_FIFO_WAIT_S``
    seconds to produce data: a FIFO nobody writes to is an error, not a hang."""
    try:
        is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        is_fifo = False
    if not is_fifo:
        return open(path, "rb")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        if not poller.poll(int(_FIFO_WAIT_S * 1000)):
            raise DataFormatError(
                f"{path}: a FIFO (named pipe) that nothing wrote to within "
                f"{_FIFO_WAIT_S:.0f} s; start its writer first",
                path,
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _Utf8Stream:
    """UTF-8 text read from a byte stream chunk by chunk (a leading byte-order mark
    skipped), so that a decoding error names its exact byte offset in the file, and a pipe
    is read once."""

    def __init__(self, fb, path: str):
        self.fb = fb
        self.path = path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        head = fb.read(3)
        self.bom = 3 if head == b"\xef\xbb\xbf" else 0
        self.bytes_in = self.bom  # bytes of the file handed to the decoder so far
        self._head = head[self.bom :]

    def read(self, size: int) -> str:
        """About ``size`` characters, at least one ('' only at the end of the file)."""
        while True:
            data = self._head + self.fb.read(size)
            self._head = b""
            pending = len(self.decoder.getstate()[0])
            start = self.bytes_in - pending  # the file offset of the decoder's input
            self.bytes_in += len(data)
            try:
                text = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                off = start + e.start
                raise DataFormatError(
                    f"{self.path}: not valid UTF-8 at byte {off}: {e.reason}", self.path, offset=off
                ) from None
            if text or not data:  # bytes that end inside a character: read on
                return text


_TOKEN_PREFIX = re.compile(r"-?[0-9.eE+-]*|t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?")


def _truncated(buf: str, e: json.JSONDecodeError) -> bool:
    """Whether a decode error at the end of the data means the data was cut short."""
    if e.msg.startswith("Unterminated string"):
        return True
    tail = buf[e.pos :]
    if not tail.strip():
        return True
    if e.msg.startswith("Invalid \\uXXXX escape") and len(tail) <= 6:
        return True
    return _TOKEN_PREFIX.fullmatch(tail) is not None


class _ArrayScanner:
    """Incremental reader of the elements of one top-level JSON array."""

    def __init__(self, stream: "_Utf8Stream", path: str, chunk_size: int):
        self.f = stream
        self.path = path
        self.chunk = chunk_size
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.dropped_bytes = stream.bom  # bytes of the file before buf[0]
        self.dropped_lines = 0  # line breaks before buf[0]
        self.decode = json.JSONDecoder().raw_decode

    # -- buffer management
    def fill(self, at_least: int = 0) -> bool:
        """Drop consumed text and append at least ``max(at_least, chunk)`` characters;
        False at end of file."""
        if self.pos:
            dropped = self.buf[: self.pos]
            self.dropped_bytes += (
                len(dropped) if dropped.isascii() else len(dropped.encode("utf-8", "surrogatepass"))
            )
            self.dropped_lines += dropped.count("\n")
            del dropped
            self.buf = self.buf[self.pos :]
            self.pos = 0
        data = self.f.read(max(at_least, self.chunk))
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def byte_offset(self, pos: int) -> int:
        head = self.buf[:pos]
        return self.dropped_bytes + (
            len(head) if head.isascii() else len(head.encode("utf-8", "surrogatepass"))
        )

    def skip_ws(self) -> str:
        """Advance to the next non-whitespace character and return it ('' at EOF)."""
        while True:
            m = _NON_WS.search(self.buf, self.pos)
            if m is not None:
                self.pos = m.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.fill():
                return ""

    def error(self, message: str, index: Optional[int], pos: Optional[int] = None):
        off = self.byte_offset(self.pos if pos is None else pos)
        where = f"byte {off}" + (f", record {index}" if index is not None else "")
        return DataFormatError(
            f"{self.path}: invalid JSON at {where}: {message}", self.path, index, off
        )

    # -- elements
    def value(self, index: int) -> Any:
        """Decode the value starting at ``pos`` (which is not whitespace)."""
        while True:
            try:
                value, end = self.decode(self.buf, self.pos)
            except RecursionError:
                raise self.error(f"record {index} is nested too deeply to parse", index) from None
            except json.JSONDecodeError as e:
                if self.eof:
                    if _truncated(self.buf, e):
                        raise self.error(
                            f"the file ends inside record {index} (truncated file?): {e.msg}",
                            index,
                            e.pos,
                        ) from None
                    raise self.error(e.msg, index, e.pos) from None
                # An error at (or just before) the end of the buffer, or an unterminated
                # string, may just mean the element continues in the next chunk.
                if e.pos >= len(self.buf) - 8 or e.msg.startswith("Unterminated string"):
                    self.fill(len(self.buf) - self.pos)  # grow geometrically
                    continue
                raise self.error(e.msg, index, e.pos) from None
            if (
                not self.eof
                and not isinstance(value, (dict, list, str))
                and _NUMBER_TAIL.match(self.buf, end).end() == len(self.buf)
            ):
                # a number whose text reaches the buffer end may continue ("0" of "0.5")
                self.fill(len(self.buf) - self.pos)
                continue
            self.pos = end
            return value

    def elements(self) -> Iterator[Any]:
        """Yield the elements of the array; ``pos`` must be at the opening ``[``."""
        self.pos += 1
        index = 0
        c = self.skip_ws()
        if c == "]":
            self.pos += 1
        else:
            while True:
                if c == "":
                    raise self.error(
                        f"the file ends before record {index} (truncated file? expected a value or ']')",
                        index,
                    )
                yield self.value(index)
                c = self.skip_ws()
                if c == ",":
                    self.pos += 1
                    c = self.skip_ws()
                    if c == "]":
                        raise self.error(f"trailing comma after record {index}", index)
                    index += 1
                    continue
                if c == "]":
                    self.pos += 1
                    break
                if c == "":
                    raise self.error(
                        f"the file ends after record {index} without the closing ']' (truncated file?)",
                        index,
                    )
                raise self.error(f"expected ',' or ']' after record {index}, found {c!r}", index)
        c = self.skip_ws()
        if c != "":
            raise self.error(f"unexpected data after the closing ']': {c!r}", None)


def iter_values(path: str, chunk_size: int) -> Iterator[Any]:
    """Yield the records of a JSON array or JSON Lines file, in order, reading the file
    once. Invalid JSON Lines lines come out as :class:`BadLine`; everything else that is
    invalid raises."""
    with _open_binary(path) as fb:
        sc = _ArrayScanner(_Utf8Stream(fb, path), path, chunk_size)
        c = sc.skip_ws()
        if c == "[":
            yield from sc.elements()
            return
        if c == "":
            raise DataFormatError(
                f"{path}: the file contains no JSON data (expected a JSON array or JSON Lines)",
                path,
            )
        if c != "{":
            raise sc.error(f"expected a JSON array ('[') or JSON Lines ('{{'), found {c!r}", None)
        # JSON Lines: go on from what the scanner has read, line by line
        start = sc.buf.rfind("\n", 0, sc.pos) + 1
        lineno = sc.dropped_lines + sc.buf.count("\n", 0, start)
        index = 0
        for line in _lines(sc.buf[start:], sc.f, chunk_size):
            lineno += 1
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except RecursionError:
                value = BadLine(f"line {lineno}: nested too deeply to parse")
            except json.JSONDecodeError as e:
                value = BadLine(
                    f"line {lineno}: invalid JSON at column {e.colno}: {e.msg}"
                    + ("" if line.endswith(("\n", "\r")) else " (truncated last line?)")
                )
            yield value
            index += 1


def _lines(prefix: str, stream: "_Utf8Stream", chunk_size: int) -> Iterator[str]:
    """The lines of ``prefix`` followed by the rest of ``stream`` (line ends kept)."""
    buf, pos = prefix, 0
    while True:
        i = buf.find("\n", pos)
        if i >= 0:
            yield buf[pos : i + 1]
            pos = i + 1
            continue
        more = stream.read(chunk_size)
        if not more:
            if pos < len(buf):
                yield buf[pos:]
            return
        buf, pos = buf[pos:] + more, 0
