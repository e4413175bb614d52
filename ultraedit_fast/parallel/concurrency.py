"""Editing a model that keeps serving: the locks every editor of a model shares.

Two locks per model, shared by all editors of that model:

- the **edit lock** (reentrant): editors' ``edit``, ``rollback`` and ``save`` run one after
  another, never interleaved;
- the **weights lock** (:class:`ReadWriteLock`): whatever writes the edited weights (a turn's
  apply phase, a rollback, a load that installs state) holds it for writing; serving code
  holds it for reading (:func:`serving`), and so never sees a half-written turn. A turn's
  capture, statistics and solve run without it: they only read the weights, and the hooks
  they place act for the editing thread alone, so other threads' forward passes meanwhile
  are exactly those of the unhooked model.

Readers block a turn's apply phase (milliseconds to a second) and the apply phase blocks new
readers; waiting writers go first, so a busy server cannot starve an edit.

**One lock order.** Every entry point takes the edit lock before the weights lock, never the
other way round, and no thread that holds the weights lock for reading (inside
:func:`serving`) ever waits for the edit lock:

- entry points that change the model or the editor (``edit``, ``rollback``, ``configure``,
  ``load``'s install, ``apply_patch``) take the edit lock, then the weights lock for writing.
  Called inside :func:`serving` they raise ``RuntimeError`` at once (a reader cannot become a
  writer: it would wait for itself), before taking any lock;
- entry points that only read (``save``, ``export_patch``, ``export_lora``, scoring) take
  the weights lock for reading alone: the editor's state (normaliser states, turn count, undo
  log) changes only while the weights lock is held for writing, so a reader sees it whole,
  between turns. They may be called inside :func:`serving`.

**A writer's patience.** A waiting writer blocks new readers, so that a busy server cannot
starve an edit; but a reader may be waiting for another thread that is about to enter
:func:`serving` (a server joining a worker), which that block would hold back forever. So a
writer blocks new readers for at most :data:`WRITER_PATIENCE` seconds at a time; if the
readers have not all left by then, it lets new readers in until one of the current readers
leaves, then blocks again. Readers therefore always get in eventually, and the writer still
goes first whenever the readers it waits for are independent of each other.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Dict, Iterator, Optional


WRITER_PATIENCE = 0.5  # seconds a waiting writer holds new readers back at a time


class ReadWriteLock:
    """A writer-preferring reader/writer lock with a patient writer (the module's docstring).
    Reentrant: a thread may take the read lock again while it holds it, and the writer may
    take either again. A thread that holds only the read lock cannot take the write lock (it
    would wait for itself): that raises."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers: Dict[int, int] = {}  # thread -> depth
        self._writer: Optional[int] = None
        self._writer_depth = 0
        self._waiting_writers = 0

    def held_for_reading(self) -> bool:
        """Whether this thread holds the lock for reading only (inside :func:`serving`)."""
        me = threading.get_ident()
        with self._cond:
            return me in self._readers and self._writer != me

    def refuse_writer_inside_reading(self, what: str) -> None:
        """``RuntimeError`` naming ``what`` when this thread holds the lock for reading only:
        the check an entry point that will write makes before it takes any lock."""
        if self.held_for_reading():
            raise RuntimeError(
                f"{what}: this thread is inside serving() (it holds the model's read lock) "
                "and asked to write the weights: it would wait for itself; edit outside the "
                "serving() block"
            )

    @contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and me not in self._readers:
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                if me in self._readers:
                    raise RuntimeError(
                        "this thread is inside serving() (it holds the model's read lock) "
                        "and asked to write the weights: it would wait for itself; edit "
                        "outside the serving() block"
                    )
                self._wait_to_write()
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()

    def _wait_to_write(self) -> None:
        """Wait (holding ``_cond``) until no one holds the lock: new readers are held back
        for :data:`WRITER_PATIENCE` at a time, then let in until a current reader leaves."""
        while self._writer is not None or self._readers:
            self._waiting_writers += 1
            try:
                self._cond.wait_for(
                    lambda: self._writer is None and not self._readers, WRITER_PATIENCE
                )
            finally:
                self._waiting_writers -= 1
                self._cond.notify_all()  # readers held back may now come in
            if self._writer is None and not self._readers:
                return
            present = set(self._readers)
            self._cond.wait_for(
                lambda: self._writer is None and not (present <= set(self._readers)),
                WRITER_PATIENCE,
            )


class ModelLocks:
    """The locks of one model: ``edit`` (reentrant) and ``weights`` (read/write)."""

    def __init__(self):
        self.edit = threading.RLock()
        self.weights = ReadWriteLock()


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REGISTRY = threading.Lock()


def model_locks(model) -> ModelLocks:
    """The locks shared by everything that edits or serves ``model``."""
    with _REGISTRY:
        locks = _LOCKS.get(model)
        if locks is None:
            locks = _LOCKS[model] = ModelLocks()
        return locks


@contextmanager
def serving(model) -> Iterator[None]:
    """Hold ``model``'s weights for reading: run forward passes (or ``generate``) inside
    this block and no edit, rollback or load changes the weights until it ends, so every
    output comes from one whole model, before or after a turn, never a mix.

        with ultraedit_fast.serving(model):
            out = model.generate(**inputs)
    """
    with model_locks(model).weights.reading():
        yield


class ThreadOwned:
    """For hooks placed on a shared model: ``owns()`` is true only in the thread that
    created this object, so a hook acts for that thread's passes and lets every other
    thread's through untouched."""

    def __init__(self):
        self.owner = threading.get_ident()

    def owns(self) -> bool:
        return threading.get_ident() == self.owner
