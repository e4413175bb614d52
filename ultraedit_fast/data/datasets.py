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

Formats and how a record becomes an ``EditRequest``
---------------------------------------------------
``target="answers"`` (default) uses the dataset's own edit target; ``target="alt"``
uses the ``alt`` field (the counterfactual setting) and is only valid for formats
that have one (``zsre``, ``zsre_ultraedit``, ``fever``).

=================  ==========================================================================
format             mapping
=================  ==========================================================================
zsre               MEND zsRE (``subject, src, pred, rephrase, alt, answers[], loc, loc_ans,
                   cond``): prompt=``src``; target=``answers[0]`` (or ``alt``);
                   rephrase=``rephrase``; locality_prompt=``loc + "?"`` (the ``nq question: ``
                   prefix is kept as in the data and a ``?`` is always appended, as the
                   UltraEdit reference does); locality_answer=``loc_ans``.
zsre_ultraedit     zsRE as the UltraEdit reference stores it (``src, rephrase, alt, ans, loc,
                   loc_ans, subject``): the same as ``zsre`` with target=``ans`` (or ``alt``).
counterfact        MEMIT/ROME CounterFact: prompt=``requested_rewrite.prompt`` with its single
                   ``{}`` replaced by ``requested_rewrite.subject``;
                   target=``requested_rewrite.target_new.str``;
                   rephrase=``paraphrase_prompts[0]``;
                   locality_prompt=``neighborhood_prompts[0]``;
                   locality_answer=``requested_rewrite.target_true.str``.
counterfact_flat   EasyEdit flat CounterFact (``prompt, target_new, subject, ground_truth,
                   rephrase_prompt, locality_prompt, locality_ground_truth``): taken as is;
                   any of these that is a list contributes its first element.
fever              MEND/MALMEN FEVER (``prompt, equiv_prompt[], alt, unrel_prompt,
                   unrel_ans``): target=``alt``; rephrase=``equiv_prompt[0]``;
                   locality=``unrel_prompt`` / ``unrel_ans``.
wikibigedit        WikiBigEdit (``tag, subject, update, rephrase, personas, ans, loc, loc_ans,
                   mhop, mhop_ans``): prompt=``update``; target=``ans``;
                   rephrase=``rephrase``; locality=``loc`` / ``loc_ans`` (as is).
                   ``personas``, ``mhop``, ``mhop_ans`` go into :attr:`Example.extras`.
ultraeditbench     UltraEditBench (``prompt, subject, rephrase_prompt, ans, loc, loc_ans``):
                   target=``ans``; rephrase=``rephrase_prompt``; locality=``loc`` /
                   ``loc_ans`` (as is).
=================  ==========================================================================

Every field that the mapping uses is required and must be a non-empty string (or, where a
list is expected, a non-empty list of non-empty strings).  Values are not stripped or
otherwise rewritten beyond what the table says.  ``Example.extras`` keeps the remaining
useful fields (subject, all paraphrases, personas, multi-hop question, ...).

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
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .jsonstream import BadLine, DataFormatError, iter_values
from ..model.requests import EditRequest

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

FORMATS: Tuple[str, ...] = (
    "zsre",
    "zsre_ultraedit",
    "counterfact",
    "counterfact_flat",
    "fever",
    "wikibigedit",
    "ultraeditbench",
)
TARGETS: Tuple[str, ...] = ("answers", "alt")
ON_ERROR: Tuple[str, ...] = ("raise", "skip")
DEFAULT_CHUNK_SIZE = 1 << 20  # characters per read
MAX_ERRORS_KEPT = 1000  # LoadStats.errors keeps at most this many messages

_FORMATS_WITH_ALT = ("zsre", "zsre_ultraedit", "fever")

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


# --------------------------------------------------------------------------- records


class _Bad(Exception):
    """Internal: what is wrong with a record."""


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _get(rec: Dict[str, Any], key: str, name: str) -> Any:
    if key not in rec:
        raise _Bad(f"missing field {name!r}")
    return rec[key]


def _check_str(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise _Bad(f"field {name!r}: expected a string, got {_type_name(v)}")
    if not v.strip():
        raise _Bad(f"field {name!r}: empty string")
    return v


def _str(rec: Dict[str, Any], key: str, name: Optional[str] = None) -> str:
    name = name or key
    return _check_str(_get(rec, key, name), name)


def _str_list(rec: Dict[str, Any], key: str, name: Optional[str] = None, *,
              allow_str: bool = False) -> List[str]:
    """A non-empty list of non-empty strings (a bare string too when ``allow_str``)."""
    name = name or key
    v = _get(rec, key, name)
    if allow_str and isinstance(v, str):
        return [_check_str(v, name)]
    if not isinstance(v, list):
        kind = "a string or a list of strings" if allow_str else "a list of strings"
        raise _Bad(f"field {name!r}: expected {kind}, got {_type_name(v)}")
    if not v:
        raise _Bad(f"field {name!r}: empty list")
    return [_check_str(x, f"{name}[{i}]") for i, x in enumerate(v)]


def _dict(rec: Dict[str, Any], key: str, name: Optional[str] = None) -> Dict[str, Any]:
    name = name or key
    v = _get(rec, key, name)
    if not isinstance(v, dict):
        raise _Bad(f"field {name!r}: expected an object, got {_type_name(v)}")
    return v


def _opt_str(rec: Dict[str, Any], key: str) -> Optional[str]:
    """Optional string: missing, null or blank -> None."""
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _Bad(f"field {key!r}: expected a string or null, got {_type_name(v)}")
    return v if v.strip() else None


def _opt_str_list(rec: Dict[str, Any], key: str) -> List[str]:
    """Optional list of strings (a bare string is one element): missing or null -> []."""
    v = rec.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    if not isinstance(v, list):
        raise _Bad(f"field {key!r}: expected a list of strings or null, got {_type_name(v)}")
    return [_check_str(x, f"{key}[{i}]") for i, x in enumerate(v)]


def _target(rec: Dict[str, Any], target: str, default_key: str) -> str:
    return _str(rec, "alt") if target == "alt" else _str(rec, default_key)


_Converted = Tuple[Dict[str, Any], Dict[str, Any]]  # (EditRequest kwargs, extras)


def _conv_zsre(rec: Dict[str, Any], target: str) -> _Converted:
    answers = _str_list(rec, "answers")
    tgt = _str(rec, "alt") if target == "alt" else answers[0]
    kw = dict(prompt=_str(rec, "src"), target=tgt, rephrase=_str(rec, "rephrase"),
              locality_prompt=_str(rec, "loc") + "?", locality_answer=_str(rec, "loc_ans"))
    extras = {"subject": _opt_str(rec, "subject"), "answers": answers,
              "alt": _opt_str(rec, "alt"), "pred": _opt_str(rec, "pred")}
    return kw, extras


def _conv_zsre_ultraedit(rec: Dict[str, Any], target: str) -> _Converted:
    kw = dict(prompt=_str(rec, "src"), target=_target(rec, target, "ans"),
              rephrase=_str(rec, "rephrase"),
              locality_prompt=_str(rec, "loc") + "?", locality_answer=_str(rec, "loc_ans"))
    extras = {"subject": _opt_str(rec, "subject"), "ans": _opt_str(rec, "ans"),
              "alt": _opt_str(rec, "alt")}
    return kw, extras


def _conv_counterfact(rec: Dict[str, Any], target: str) -> _Converted:
    rw = _dict(rec, "requested_rewrite")
    template = _str(rw, "prompt", "requested_rewrite.prompt")
    subject = _str(rw, "subject", "requested_rewrite.subject")
    n = template.count("{}")
    if n != 1:
        raise _Bad(f"field 'requested_rewrite.prompt': expected exactly one '{{}}' "
                   f"placeholder, found {n} in {template!r}")
    new = _str(_dict(rw, "target_new", "requested_rewrite.target_new"), "str",
               "requested_rewrite.target_new.str")
    true = _str(_dict(rw, "target_true", "requested_rewrite.target_true"), "str",
                "requested_rewrite.target_true.str")
    para = _str_list(rec, "paraphrase_prompts")
    neigh = _str_list(rec, "neighborhood_prompts")
    kw = dict(prompt=template.replace("{}", subject), target=new, rephrase=para[0],
              locality_prompt=neigh[0], locality_answer=true)
    extras = {"subject": subject, "case_id": rec.get("case_id"),
              "relation_id": rw.get("relation_id"), "target_true": true,
              "paraphrase_prompts": para, "neighborhood_prompts": neigh}
    return kw, extras


def _conv_counterfact_flat(rec: Dict[str, Any], target: str) -> _Converted:
    para = _str_list(rec, "rephrase_prompt", allow_str=True)
    loc = _str_list(rec, "locality_prompt", allow_str=True)
    loc_ans = _str_list(rec, "locality_ground_truth", allow_str=True)
    kw = dict(prompt=_str_list(rec, "prompt", allow_str=True)[0],
              target=_str_list(rec, "target_new", allow_str=True)[0],
              rephrase=para[0], locality_prompt=loc[0], locality_answer=loc_ans[0])
    gt = rec.get("ground_truth")
    if isinstance(gt, list):
        gt = gt[0] if gt else None
    extras = {"subject": _opt_str(rec, "subject"),
              "ground_truth": gt if isinstance(gt, str) else None,
              "rephrase_prompts": para, "locality_prompts": loc,
              "locality_ground_truths": loc_ans}
    return kw, extras


def _conv_fever(rec: Dict[str, Any], target: str) -> _Converted:
    equiv = _str_list(rec, "equiv_prompt", allow_str=True)
    kw = dict(prompt=_str(rec, "prompt"), target=_str(rec, "alt"), rephrase=equiv[0],
              locality_prompt=_str(rec, "unrel_prompt"),
              locality_answer=_str(rec, "unrel_ans"))
    return kw, {"equiv_prompts": equiv}


def _conv_wikibigedit(rec: Dict[str, Any], target: str) -> _Converted:
    kw = dict(prompt=_str(rec, "update"), target=_str(rec, "ans"),
              rephrase=_str(rec, "rephrase"),
              locality_prompt=_str(rec, "loc"), locality_answer=_str(rec, "loc_ans"))
    mhop, mhop_ans = _opt_str(rec, "mhop"), _opt_str(rec, "mhop_ans")
    if (mhop is None) != (mhop_ans is None):
        have, lack = ("mhop", "mhop_ans") if mhop is not None else ("mhop_ans", "mhop")
        raise _Bad(f"field {have!r} is given but {lack!r} is missing, null or empty")
    extras = {"tag": rec.get("tag"), "subject": _opt_str(rec, "subject"),
              "personas": _opt_str_list(rec, "personas"), "mhop": mhop, "mhop_ans": mhop_ans}
    return kw, extras


def _conv_ultraeditbench(rec: Dict[str, Any], target: str) -> _Converted:
    kw = dict(prompt=_str(rec, "prompt"), target=_str(rec, "ans"),
              rephrase=_str(rec, "rephrase_prompt"),
              locality_prompt=_str(rec, "loc"), locality_answer=_str(rec, "loc_ans"))
    return kw, {"subject": _opt_str(rec, "subject")}


_CONVERTERS: Dict[str, Callable[[Dict[str, Any], str], _Converted]] = {
    "zsre": _conv_zsre,
    "zsre_ultraedit": _conv_zsre_ultraedit,
    "counterfact": _conv_counterfact,
    "counterfact_flat": _conv_counterfact_flat,
    "fever": _conv_fever,
    "wikibigedit": _conv_wikibigedit,
    "ultraeditbench": _conv_ultraeditbench,
}
assert tuple(_CONVERTERS) == FORMATS


def detect_format(record: Dict[str, Any]) -> str:
    """The dataset format of ``record`` (one of :data:`FORMATS`), from its keys:

    ``requested_rewrite`` -> counterfact; ``update`` or ``tag`` -> wikibigedit;
    ``prompt`` + ``rephrase_prompt`` + ``ans`` -> ultraeditbench; ``prompt`` +
    ``target_new`` -> counterfact_flat; ``prompt`` + ``equiv_prompt`` -> fever;
    ``src`` + ``answers`` -> zsre; ``src`` + ``ans`` -> zsre_ultraedit.
    Raises ``ValueError`` when none applies."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(record)}")
    k = record.keys()
    if "requested_rewrite" in k:
        return "counterfact"
    if "update" in k or "tag" in k:
        return "wikibigedit"
    if "prompt" in k:
        if "rephrase_prompt" in k and "ans" in k:
            return "ultraeditbench"
        if "target_new" in k:
            return "counterfact_flat"
        if "equiv_prompt" in k:
            return "fever"
    if "src" in k:
        if "answers" in k:
            return "zsre"
        if "ans" in k:
            return "zsre_ultraedit"
    raise ValueError(f"cannot detect the dataset format from the keys {sorted(k)}; "
                     f"known formats: {', '.join(FORMATS)}")


def _convert(record: Any, fmt: str, target: str, index: int) -> Example:
    if not isinstance(record, dict):
        raise _Bad(f"expected a JSON object, got {_type_name(record)}")
    kw, extras = _CONVERTERS[fmt](record, target)
    try:
        request = EditRequest(**kw)
    except (TypeError, ValueError) as e:  # pragma: no cover - fields are checked above
        raise _Bad(str(e)) from None
    return Example(request, extras, index, fmt)


# --------------------------------------------------------------------------- public API


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


def _check_target_for(fmt: str, target: str) -> None:
    if target == "alt" and fmt not in _FORMATS_WITH_ALT:
        raise ValueError(f"target='alt' is not available for the {fmt!r} format "
                         f"(formats with an 'alt' field: {', '.join(_FORMATS_WITH_ALT)})")


class RequestReader:
    """A re-iterable reader of one data file.

    >>> reader = RequestReader("zsre.json", on_error="skip")
    >>> for request in reader: ...            # EditRequest objects
    >>> reader.skipped, reader.errors         # malformed records of the last pass
    >>> for ex in reader.examples(): ...      # Example(request, extras, index, format)

    Arguments are those of :func:`load_requests`.  Each pass (``iter(reader)`` or
    ``reader.examples()``) reads the file again and resets :attr:`stats`.
    """

    def __init__(self, path: PathLike, format: str = "auto", *, target: str = "answers",
                 limit: Optional[int] = None, offset: int = 0, on_error: str = "raise",
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.path = _check_path(path)
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"format: unknown format {format!r}; valid: 'auto', "
                             + ", ".join(repr(f) for f in FORMATS))
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 0):
            raise ValueError(f"limit: expected None or an int >= 0, got {limit!r}")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
        _check_chunk(chunk_size)
        if format != "auto":
            _check_target_for(format, target)
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
                    raise _Bad(record.message)
                if fmt is None:
                    try:
                        fmt = detect_format(record)
                    except ValueError as e:
                        raise _Bad(str(e)) from None
                    _check_target_for(fmt, target)  # configuration error: always raised
                    detected_at = index
                    stats.format = fmt
                ex = _convert(record, fmt, target, index)
            except _Bad as e:
                how = (f"format {fmt!r} detected from record {detected_at}"
                       if detected_at is not None else
                       f"format {fmt!r}" if fmt is not None else "format not detected")
                if fmt is not None and isinstance(record, dict):
                    try:
                        other = detect_format(record)
                    except ValueError:
                        other = None
                    if other is not None and other != fmt:
                        how += f"; the record looks like {other!r}"
                msg = f"{path}: record {index}: {e} ({how})"
                if on_error == "raise":
                    raise DataFormatError(msg, path, index) from None
                stats.skipped += 1
                if len(stats.errors) < MAX_ERRORS_KEPT:
                    stats.errors.append((index, msg))
                continue
            stats.yielded += 1
            yield ex
            if self.limit is not None and stats.yielded >= self.limit:
                return


def iter_examples(path: PathLike, format: str = "auto", *, target: str = "answers",
                  limit: Optional[int] = None, offset: int = 0, on_error: str = "raise",
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  stats: Optional[LoadStats] = None) -> Iterator[Example]:
    """Stream :class:`Example` objects (``request``, ``extras``, ``index``, ``format``) from
    ``path``.  Arguments as in :func:`load_requests`; they are checked (and a missing file
    reported) when this is called, not at the first ``next()``.  Pass a
    :class:`LoadStats` as ``stats`` to get the counts (skipped records, errors)."""
    reader = RequestReader(path, format, target=target, limit=limit, offset=offset,
                           on_error=on_error, chunk_size=chunk_size)
    return reader._examples(stats if stats is not None else reader.stats)


def load_requests(path: PathLike, format: str = "auto", *, target: str = "answers",
                  limit: Optional[int] = None, offset: int = 0, on_error: str = "raise",
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  stats: Optional[LoadStats] = None) -> Iterator[EditRequest]:
    """Stream :class:`EditRequest` objects from a JSON array or JSON Lines file, in
    constant memory.

    ``format``: ``"auto"`` (detect from the first record read, then hold every record to
    that format) or one of :data:`FORMATS`.  ``target``: ``"answers"`` (the dataset's edit
    target) or ``"alt"`` (the ``alt`` field; zsre, zsre_ultraedit and fever only).
    ``offset``: skip the first ``offset`` records of the file (not parsed into requests);
    ``limit``: yield at most this many requests.  ``on_error``: ``"raise"`` (a
    :class:`DataFormatError` naming the file and record index) or ``"skip"`` (skip
    malformed records, counted in ``stats``).  ``chunk_size``: characters read at a time.
    See the module docstring for the field mapping of each format."""
    return (ex.request for ex in iter_examples(
        path, format, target=target, limit=limit, offset=offset, on_error=on_error,
        chunk_size=chunk_size, stats=stats))
