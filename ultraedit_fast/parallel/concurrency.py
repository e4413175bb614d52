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
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Dict, Iterator, Optional


class ReadWriteLock:
    """A writer-preferring reader/writer lock. Reentrant: a thread may take the read lock
    again while it holds it, and the writer may take either again. A thread that holds only
    the read lock cannot take the write lock (it would wait for itself): that raises."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers: Dict[int, int] = {}  # thread -> depth
        self._writer: Optional[int] = None
        self._writer_depth = 0
        self._waiting_writers = 0

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
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()


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
