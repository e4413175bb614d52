"""The protocol every editor implements, so that a lifelong run, the scoring and the
benchmarks can drive any of them (the fast editor, the reference, the peers' baselines)
without knowing which.

An editor edits ``model`` in place, one turn per :meth:`Editor.edit` call, and returns an
:class:`~ultraedit_fast.core.report.EditReport`; a turn it cannot make raises a
``ValueError`` (:class:`~ultraedit_fast.editors.ultraedit.EditRefused` for the package's
editors) and leaves the model as it was. ``config`` is its frozen, resolved configuration;
``describe()`` is what a run records about it.
"""

from __future__ import annotations

from typing import Any, Dict, Protocol, runtime_checkable

from ..core.report import EditReport


@runtime_checkable
class Editor(Protocol):
    """What the lifelong runner, the scoring and the benchmarks need of an editor."""

    #: a short name for tables and results files ("ultraedit", "reference", ...)
    name: str
    model: Any
    tokenizer: Any
    #: turns made so far
    turns: int

    @property
    def config(self) -> Any:
        """The editor's configuration, resolved and frozen (a dataclass with ``to_dict``)."""

    def edit(self, requests: Any) -> EditReport:
        """One turn over ``requests`` (``EditRequest`` objects or dicts)."""

    def describe(self) -> Dict[str, Any]:
        """What a results file records of the editor: at least ``editor``, ``modules``,
        ``lr``, ``preset``, ``batch_size``, ``backend``."""
