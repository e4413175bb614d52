"""Teacher-forced passes that start at the lowest edited block for sequences seen before.

An editor writes its modules and nothing below them: the hidden state entering the lowest
edited block, at every position of a sequence, is the same before the first turn and after
the thousandth. A lifelong run scores the same sequences again and again (its requests'
prompts with their answers, the locality prompts with the unedited model's continuations:
before the first turn, along the stream, after the last), so :class:`ResumedPasses` keeps,
the first time it is asked about a sequence, the state at that block (a
:class:`~ultraedit_fast.model.partial.ResumedForward` over a group of sequences: its full
pass answers that first question), and answers every later question about it from there:
the blocks from the lowest edited one up, and the output layer only at the rows whose
argmax the bound of :mod:`~ultraedit_fast.model.partial` leaves open. With SmolLM2's stream
setting (blocks 18 to 22 of 30 edited) a later pass costs about 40% of a full one. Where the
blocks above have not changed either since a group's last pass (the unedited model's
baseline, then its scores before the first turn), that pass's answers are given again.

The same answers as full passes up to rounding (the passes are batched differently: an
argmax at a near tie can go either way, as with any change of batch), and checked rather
than assumed:

- the blocks below (with the embeddings and everything else of the base model outside the
  resumed blocks and the final norm) and the output layer (the bound keeps margins measured
  with its weights) are fingerprinted (each tensor's storage, shape and float64 sum)
  at every call; a change drops everything kept; the blocks above, the final norm and the
  output layer likewise (a change reruns the kept groups);
- :class:`~ultraedit_fast.model.partial.ResumedForward` compares its resumed logits with the
  full pass's the first time a model is resumed, and a model it cannot resume turns the
  reuse off (every pass then runs in full, as without it).

:func:`~ultraedit_fast.scoring.teacher.predictions_at_labels` consults it (every
teacher-forced score, and the replays of the generated scores' shortcuts), for the thread
inside :meth:`ResumedPasses.active` and the model it was built on; so do the drift's
next-token distributions and the health figures' windows of general text, through
:meth:`ResumedPasses.again` (given again where the model has not changed since: the
unedited model's scores after its baseline).
:func:`~ultraedit_fast.lifelong.run_lifelong` uses it (``eval_resumed=True``); by hand::

    modules = [model.get_submodule(n) for n in editor.module_names]
    passes = ResumedPasses.for_modules(model, modules)
    with passes.active():
        before = evaluate(model, tok, requests, base=base)  # full passes; states kept
    editor.edit(requests)
    with passes.active():
        after = evaluate(model, tok, requests, base=base)  # from the lowest edited block
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..model.forward import _split
from ..model.partial import ResumedForward, _blocks, _final_norm, lowest_block
from ..model.requests import TokenizedRequest
from ..parallel.concurrency import model_locks

GROUP = 128  # sequences per kept group: a later pass over any of them runs the group
MAX_BYTES = 1 << 30  # kept hidden states, at most (sequences beyond run in full)

_Key = Tuple[Tuple[int, ...], Tuple[int, ...]]
_ACTIVE: "ContextVar[Optional[ResumedPasses]]" = ContextVar("ultraedit_resumed", default=None)


def active_for(model) -> Optional["ResumedPasses"]:
    """The passes active in this thread for ``model`` (``None`` when none is, or when it
    has turned itself off)."""
    passes = _ACTIVE.get()
    if passes is None or passes.model is not model or not passes.enabled:
        return None
    return passes


def lower_fingerprint(model, start: int) -> Optional[tuple]:
    """What the kept states depend on, in brief: each tensor of the base model outside
    blocks ``start..`` and the final norm (what the hidden state entering block ``start``
    comes from), and the output layer's (what the kept argmax margins were measured with),
    as (name, storage, shape, float64 sum). ``None`` when it cannot be read (no blocks
    found, weights offloaded or sharded)."""
    split = _split(model)
    blocks = _blocks(split[0]) if split is not None else None
    if split is None or blocks is None or not 0 < start < len(blocks):
        return None
    base, head = split[0], split[1]
    upper = list(blocks[start:]) + [m for m in (_final_norm(base),) if m is not None]
    skip = {id(t) for m in upper for t in itertools.chain(m.parameters(), m.buffers())}
    # the output layer too: the kept margins of its argmax hold for its weights of then
    named = itertools.chain(
        base.named_parameters(),
        base.named_buffers(),
        (("output." + n, t) for n, t in head.named_parameters()),
    )
    out = [(name, _brief(t)) for name, t in named if id(t) not in skip]
    return None if any(b is None for _, b in out) else tuple(out)


def upper_fingerprint(model, start: int) -> tuple:
    """The same for what comes after: blocks ``start..``, the final norm, the output layer
    (an unchanged model's later pass over a kept group is answered with no model work)."""
    split = _split(model)
    assert split is not None
    base, head, softcap = split
    blocks = _blocks(base)
    assert blocks is not None
    mods = list(blocks[start:]) + [m for m in (_final_norm(base), head) if m is not None]
    tensors = (t for m in mods for t in itertools.chain(m.parameters(), m.buffers()))
    return (softcap, *(_brief(t) for t in tensors))


@torch.no_grad()
def _brief(t: torch.Tensor) -> Optional[tuple]:
    """``(storage, shape, sum)`` of a tensor (float64 sum of a floating one); ``None`` for
    one that is not here (sharded, offloaded)."""
    if type(t.data) is not torch.Tensor or t.is_meta:
        return None
    total = t.sum(dtype=torch.float64) if t.dtype.is_floating_point else t.sum()
    return t.data_ptr(), tuple(t.shape), total.item()


def _nbytes(obj) -> int:
    """Bytes of the distinct tensors in ``obj`` (nested lists, tuples and dicts): what
    keeping it keeps alive."""
    seen: Dict[int, int] = {}
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            seen[id(x)] = x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif isinstance(x, dict):
            todo.extend(x.values())
    return sum(seen.values())


def _key(t: TokenizedRequest) -> _Key:
    return tuple(t.input_ids), tuple(t.labels)


class ResumedPasses:
    """Teacher-forced predictions of ``model`` that reuse, for every sequence asked about
    before, the hidden state entering block ``start`` (see the module docstring). Build it
    with ``start`` at or below the lowest block an editor writes (:meth:`for_modules`), and
    score inside :meth:`active`.

    ``max_bytes``: the kept states' size at most (sequences past it run in full each time);
    ``group``: sequences kept together (a later pass over one of them runs its group).
    ``counts``: sequences (and :meth:`again`'s passes) answered by a full pass (``"full"``),
    from block ``start`` up (``"resumed"``), and, where nothing changed since their last
    pass, by that pass's answers (``"again"``) so far. One thread at a time uses it."""

    def __init__(self, model, start: int, *, max_bytes: int = MAX_BYTES, group: int = GROUP):
        if not isinstance(start, int) or start < 1:
            raise ValueError(f"start: expected a block index >= 1, got {start!r}")
        if group < 1:
            raise ValueError(f"group: expected a positive count, got {group!r}")
        self.model, self.start = model, start
        self.max_bytes, self.group = int(max_bytes), int(group)
        self._print = lower_fingerprint(model, start)
        self.enabled = self._print is not None  # off where the blocks cannot be read
        self.nbytes = 0
        self.counts = {"full": 0, "resumed": 0, "again": 0}
        self._lock = threading.RLock()
        self._groups: List[ResumedForward] = []
        # per group: (upper_fingerprint, predictions) of the last pass over it
        self._last: List[tuple] = []
        self._where: Dict[_Key, Tuple[int, int]] = {}
        self._again: Dict[Hashable, tuple] = {}  # key -> (fingerprints, result): again()

    @classmethod
    def for_modules(cls, model, modules: Sequence[torch.nn.Module], **kw):
        """Passes resumed at the lowest block holding one of ``modules`` (``None`` when that
        is the first block, or when the model's blocks cannot be found)."""
        start = lowest_block(model, modules)
        return cls(model, start, **kw) if start else None

    def clear(self) -> None:
        """Forget every kept state."""
        self._groups, self._last, self._where, self.nbytes = [], [], {}, 0
        self._again = {}

    @contextmanager
    def active(self) -> Iterator["ResumedPasses"]:
        """Route this thread's teacher-forced passes on the model through these."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def _check(self) -> tuple:
        """Drop what was kept if the blocks below ``start``, the embeddings or the output
        layer changed since (turned off where they cannot be read); returns the fingerprint
        of everything (an unreadable upper tensor counts as changed)."""
        now = lower_fingerprint(self.model, self.start)
        if now is None:
            self.enabled = False
        if now is None or now != self._print:
            self.clear()
            self._print = now
        upper = upper_fingerprint(self.model, self.start)
        return (now, upper) if None not in upper[1:] else (now, object())

    def predictions(
        self, toks: Sequence[TokenizedRequest], batch_size: int
    ) -> List[Tuple[List[int], List[int]]]:
        """``(argmax ids, label ids)`` at each sequence's labelled positions, as
        :func:`~ultraedit_fast.scoring.teacher.predictions_at_labels` gives them (up to
        rounding: the passes are batched differently)."""
        keys = [_key(t) for t in toks]
        got: Dict[_Key, Tuple[List[int], List[int]]] = {}
        with self._lock, model_locks(self.model).weights.reading():  # one whole model
            now = self._check()
            where = {k: self._where[k] for k in keys if k in self._where}
            first = {k: t for k, t in zip(keys, toks) if k not in where}
            for g in sorted({g for g, _ in where.values()}):
                last = self._last[g]
                if last[0] != now:  # the model changed since: run it
                    last = self._last[g] = (now, self._groups[g].predictions())
                    self.counts["resumed"] += len(last[1])
                else:
                    self.counts["again"] += len(last[1])
                got.update((k, last[1][j]) for k, (h, j) in where.items() if h == g)
            new = list(first)
            for s in range(0, len(new), self.group):
                chunk = new[s : s + self.group]
                rf = ResumedForward(self.model, [first[k] for k in chunk], self.start, batch_size)
                assert rf.first is not None
                got.update(zip(chunk, rf.first))
                self._keep(rf, chunk, (now, rf.first))
            self.counts["full"] += len(new)
        return [got[k] for k in keys]

    def again(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, or what it gave the last time it was called with ``key`` when the
        model has not changed since (any other pass over the whole network: the drift's
        next-token distributions, the health windows); tensors come back as copies."""
        with self._lock, model_locks(self.model).weights.reading():
            now = self._check()
            hit = self._again.get(key)
            if hit is None or hit[0] != now:
                hit = (now, compute())
                self.counts["full"] += 1
                size = _nbytes(hit[1])
                if self.enabled and self.nbytes + size <= self.max_bytes:
                    self._again[key] = hit
                    self.nbytes += size
            else:
                self.counts["again"] += 1
        out = hit[1]
        if isinstance(out, tuple):
            return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in out)
        return out.clone() if isinstance(out, torch.Tensor) else out

    def _keep(self, rf: ResumedForward, chunk: List[_Key], last) -> None:
        if not self.enabled:
            return
        if not rf.resumed:  # a model the resumed pass does not fit: every pass in full
            self.enabled = False
            self.clear()
            return
        size = _nbytes([rf._inputs] + [list(vars(b).values()) for b in rf.batches])
        if self.nbytes + size > self.max_bytes:
            return
        self.nbytes += size
        self._groups.append(rf)
        self._last.append(last)
        g = len(self._groups) - 1
        for j, k in enumerate(chunk):
            self._where[k] = (g, j)
