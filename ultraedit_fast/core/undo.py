"""The undo log behind ``UltraEditor(..., undo=...)`` and :meth:`UltraEditor.rollback`.

The log keeps, on the host,

* each edited weight as it was before the first logged turn, once (the *base*),
* each logged turn's factors ``(a, kk)`` with ``Delta W = a^T kk``, fp32, with ``kk``
  stored once per distinct key matrix (``gate_proj`` and ``up_proj`` of one layer
  share theirs) and not at all when it is the identity (the primal solve),
* each logged turn's normaliser states before the turn (references: the editor
  never changes a committed state in place, so these cost nothing extra but the
  ``3 (d_in + d_out)`` floats per key and turn that the next turn would free; with
  ``preserve_edits``, also the ``d_in x d_in`` Gram of each module, on its device,
  counted in :meth:`UndoLog.memory_bytes`: bound the log with ``undo=<turns>``).

``rollback(k)`` copies the base back into the edited weights and replays the
kept turns' factors with the same rank-update kernel that applied them: on
the CPU, and on a GPU whose kernels are deterministic, the weights come back bit
for bit. When the log holds more than ``max_turns`` turns the oldest is folded
into the base (the same kernel, on the weight's device).

Memory: the base is the edited weights once (``sum d_out x d_in x itemsize``); a
turn of ``N`` answer tokens costs ``sum over modules of N x d_out x 4`` bytes for
``a`` plus ``sum over distinct key matrices of N x d_in x 4`` for ``kk`` (primal
turns, ``N > d_in``: ``d_in x d_out x 4`` per module and no ``kk``).

The log is handed what it needs: the edited modules (:class:`~ultraedit_fast.model.targets.EditTarget`)
and a ``rank_update(w, a, kk, transposed)`` callable (the kernel that applies a turn).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

RankUpdate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]


@dataclass
class TurnRecord:
    """One logged turn: the normaliser states before it and its factors."""

    states: Dict[object, object]  # normaliser key -> NormalizerState before the turn
    a: Dict[str, torch.Tensor]  # module -> a (fp32, host)
    kk: Dict[str, Optional[int]]  # module -> index into ``keys``; None: identity
    keys: List[torch.Tensor] = field(default_factory=list)  # fp32, host

    def nbytes(self) -> int:
        """The factors' bytes, and the ``preserve_edits`` Grams of the states before the
        turn (each tensor once; the editor's current states hold the newest ones)."""
        tensors = {id(t): t for t in list(self.a.values()) + self.keys}
        for state in self.states.values():
            tensors.update({id(g): g for g in (getattr(state, "grams", None) or {}).values()})
        return sum(t.numel() * t.element_size() for t in tensors.values())


def _host(t: torch.Tensor) -> torch.Tensor:
    """A host fp32 tensor with the same values, not aliasing anything the turn may reuse."""
    t = t.detach()
    if t.device.type == "cpu" and t.dtype == torch.float32:
        return t  # fresh outputs of the solve; nothing writes into them later
    return t.to("cpu", torch.float32, copy=True)


def _is_identity(kk: torch.Tensor) -> bool:
    if kk.dim() != 2 or kk.shape[0] != kk.shape[1]:
        return False
    return bool(torch.equal(kk, torch.eye(kk.shape[0], dtype=kk.dtype, device=kk.device)))


class UndoLog:
    """Base copies of the edited weights plus per-turn factors; see the module docstring.

    ``max_turns``: ``None`` keeps every turn; an int keeps the last ``max_turns``.
    """

    def __init__(self, max_turns: Optional[int]):
        self.max_turns = max_turns
        self.base: Optional[Dict[str, torch.Tensor]] = None
        self.turns: List[TurnRecord] = []

    def __len__(self) -> int:
        return len(self.turns)

    # ---------------------------------------------------------------- recording
    def prepare(self, plan, pre_states) -> Tuple[TurnRecord, Optional[Dict[str, torch.Tensor]]]:
        """Called after the finiteness check and before any weight is written, with the
        turn's ``plan`` (``[(target, a, kk)]``) and the normaliser states before it: copies
        the factors to the host and, for the first logged turn, the weights. Nothing is
        committed until :meth:`push`."""
        base = None
        if self.base is None:
            base = {t.name: t.weight.detach().to("cpu", copy=True) for t, _, _ in plan}
        rec = TurnRecord(dict(pre_states), {}, {})
        seen: Dict[int, Optional[int]] = {}
        for t, a, kk in plan:
            rec.a[t.name] = _host(a)
            if id(kk) not in seen:
                if _is_identity(kk):
                    seen[id(kk)] = None
                else:
                    seen[id(kk)] = len(rec.keys)
                    rec.keys.append(_host(kk))
            rec.kk[t.name] = seen[id(kk)]
        return rec, base

    def push(self, prepared, targets, rank_update: RankUpdate) -> None:
        """Commit a turn that was applied; fold the oldest turns beyond ``max_turns``.
        The turn itself is committed already: a failure here (out of memory while
        folding) clears the log with a warning rather than failing the turn."""
        rec, base = prepared
        if self.base is None:
            self.base = base
        self.turns.append(rec)
        try:
            self.trim(targets, rank_update)
        except Exception as e:  # pragma: no cover - needs an allocation failure
            self.base, self.turns = None, []
            warnings.warn(
                f"undo: the undo log was cleared, folding its oldest turn failed ({e})",
                RuntimeWarning,
                stacklevel=3,
            )

    def trim(self, targets, rank_update: RankUpdate, max_turns: Optional[int] = -1) -> None:
        limit = self.max_turns if max_turns == -1 else max_turns
        while limit is not None and len(self.turns) > limit:
            self._fold_oldest(targets, rank_update)

    def _base(self) -> Dict[str, torch.Tensor]:
        if self.base is None:
            raise RuntimeError("the undo log has no base copy: no turn is logged")
        return self.base

    def _factors(self, rec: TurnRecord, target, device) -> Tuple[torch.Tensor, torch.Tensor]:
        a = rec.a[target.name].to(device)
        i = rec.kk[target.name]
        if i is None:
            d_in = target.local_shape[0]
            kk = torch.eye(d_in, dtype=torch.float32, device=device)
        else:
            kk = rec.keys[i].to(device)
        return a, kk

    def _fold_oldest(self, targets, rank_update: RankUpdate) -> None:
        """base += the oldest turn's update, computed on the weight's device with the
        weight's strides and the same kernel as the live update (so the result is the
        live weight after that turn, bit for bit); all-or-nothing."""
        rec = self.turns[0]
        new: Dict[str, torch.Tensor] = {}
        base = self._base()
        with torch.no_grad():
            for t in targets:
                w = t.weight
                tmp = torch.empty_strided(w.size(), w.stride(), dtype=w.dtype, device=w.device)
                tmp.copy_(base[t.name])
                rank_update(tmp, *self._factors(rec, t, w.device), t.transposed)
                new[t.name] = tmp.to("cpu")
        self.base = new
        self.turns.pop(0)
        if not self.turns:
            self.base = None

    # ---------------------------------------------------------------- rollback
    def rollback(self, targets, turns: int, rank_update: RankUpdate) -> Dict[object, object]:
        """Put the weights of ``targets`` back to what they were before the last ``turns``
        turns; returns the normaliser states of that moment (the caller restores them)."""
        n = len(self.turns)
        keep = self.turns[: n - turns]
        base = self._base()
        with torch.no_grad():
            for t in targets:
                w = t.weight
                w.data.copy_(base[t.name])
                for rec in keep:
                    rank_update(w.data, *self._factors(rec, t, w.device), t.transposed)
        states = dict(self.turns[n - turns].states)
        self.turns = keep
        if not keep:
            self.base = None
        return states

    # ---------------------------------------------------------------- accounting
    def memory_bytes(self) -> Dict[str, object]:
        base = (
            0
            if self.base is None
            else sum(t.numel() * t.element_size() for t in self.base.values())
        )
        per_turn = [r.nbytes() for r in self.turns]
        return {"base": base, "turns": per_turn, "total": base + sum(per_turn)}

    # ---------------------------------------------------------------- to disk and back
    def export(self) -> Optional[dict]:
        """The log as plain data for a checkpoint: ``{"base": {module: weight}, "turns":
        [{"states", "a", "kk", "keys"}]}``, or ``None`` when empty."""
        if not self.turns:
            return None
        return {
            "base": dict(self._base()),
            "turns": [
                {"states": dict(r.states), "a": dict(r.a), "kk": dict(r.kk), "keys": list(r.keys)}
                for r in self.turns
            ],
        }

    def restore(self, data: Optional[dict], targets: Sequence, rank_update: RankUpdate) -> None:
        """Take the log from :meth:`export`'s data (checked by the checkpoint reader), then
        fold what exceeds ``max_turns``."""
        if not data:
            self.base, self.turns = None, []
            return
        self.base = dict(data["base"])
        self.turns = [
            TurnRecord(dict(r["states"]), dict(r["a"]), dict(r["kk"]), list(r["keys"]))
            for r in data["turns"]
        ]
        self.trim(targets, rank_update)
