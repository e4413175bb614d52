"""Forward passes that start part-way up the network, for checks run many times on the same
inputs while only the top of the network changes.

A turn's step search (:mod:`ultraedit_fast.core.step_search`) writes candidate updates into
the edited modules and checks, each time, the model's argmax on the same teacher-forced
sequences. Every block below the lowest edited one computes the same thing at every try,
so :class:`ResumedForward` runs the whole network once (on the pre-turn model), keeps the
hidden state entering the lowest edited block and what each block above it is called with
(attention mask, position embeddings, ...), and answers every later check from there: the
blocks from the lowest edited one up, the final norm and the output layer on the labelled
rows only. With SmolLM2's facts regime (blocks 26 and 27 of 30) a check runs 4 of 30
blocks.

It applies to the families of :mod:`.forward` whose model is "embeddings -> blocks -> final
norm -> lm_head (-> soft-capping)", and is checked, not assumed: at construction the first
batch's logits from the resumed pass are compared with the full pass's, and any difference
(or an error) makes it run full passes instead (``resumed`` is ``False`` then).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..parallel.concurrency import ThreadOwned
from .forward import _split, answer_logits, input_device, on_device, preserved_model_state
from .requests import IGNORE, TokenizedRequest, pad_batch

_FINAL_NORMS = ("norm", "ln_f", "final_layernorm")


def _blocks(base) -> Optional[torch.nn.ModuleList]:
    for name in ("layers", "h"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return blocks
    return None


def lowest_block(model, modules: Sequence[torch.nn.Module]) -> Optional[int]:
    """The index of the lowest decoder block holding one of ``modules`` (``None`` when the
    model's blocks cannot be found or a module is in none of them)."""
    split = _split(model)
    blocks = _blocks(split[0]) if split is not None else None
    if blocks is None:
        return None
    where = {}
    for i, blk in enumerate(blocks):
        for m in blk.modules():
            where.setdefault(id(m), i)
    found = [where.get(id(m)) for m in modules]
    if not found or any(i is None for i in found):
        return None
    return min(i for i in found if i is not None)


class _Batch:
    """One padded batch of the check set: its rows' order, labels and the cached state."""

    def __init__(self, idx: List[int], labels: torch.Tensor, mask: torch.Tensor):
        self.idx, self.labels, self.mask = idx, labels, mask
        self.hidden: Optional[torch.Tensor] = None
        self.calls: List[Tuple[tuple, Dict[str, Any]]] = []  # per block from the lowest up


class ResumedForward:
    """Teacher-forced argmax at the labelled positions of ``toks``, run from block ``start``
    up on the state the full pass left there (see the module docstring). Build it on the
    model whose blocks below ``start`` stay as they are for as long as it is used."""

    def __init__(
        self, model, toks: Sequence[TokenizedRequest], start: Optional[int], batch_size: int
    ):
        self.model = model
        self.n = len(toks)
        order = sorted(range(len(toks)), key=lambda i: -len(toks[i].input_ids))
        device = input_device(model)
        self._inputs = []
        self.batches: List[_Batch] = []
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = pad_batch([toks[i] for i in idx], idx).to(device)
            mask = b.labels != IGNORE
            self._inputs.append((b.input_ids, b.attention_mask))
            self.batches.append(_Batch(idx, b.labels[mask], mask))
        split = _split(model)
        self.resumed = start is not None and split is not None and bool(self.batches)
        self.start = start
        self.first: Optional[List[Tuple[List[int], List[int]]]] = None
        if self.resumed:
            self.resumed = self._capture()

    # ------------------------------------------------------------------ the full pass
    @torch.no_grad()
    def _capture(self) -> bool:
        """One full pass keeping the state at block ``start``; the resumed pass checked
        against it on the first batch. Returns whether the resumed pass can be used."""
        base, _, _ = _split(self.model)  # type: ignore[misc]
        blocks = _blocks(base)
        if blocks is None or self.start is None or self.start >= len(blocks):
            return False
        thread, box = ThreadOwned(), {}

        def pre(i):
            def keep(module, args, kwargs):
                if thread.owns():
                    b = box["batch"]
                    if i == self.start:
                        h = args[0] if args else kwargs.get("hidden_states")
                        b.hidden = h.detach()
                    b.calls.append((tuple(args[1:]), {k: v for k, v in kwargs.items()}))

            return keep

        handles = [
            blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True)
            for i in range(self.start, len(blocks))
        ]
        full = []
        try:
            with preserved_model_state(self.model):
                self.model.eval()
                for b, (ids, att) in zip(self.batches, self._inputs):
                    box["batch"] = b
                    full.append(answer_logits(self.model, ids, att, b.mask).float())
        finally:
            for h in handles:
                h.remove()
        ok = all(b.hidden is not None and b.hidden.shape[:2] == b.mask.shape for b in self.batches)
        try:
            ok = ok and self._close(self._logits(self.batches[0]).float(), full[0])
        except Exception:  # an architecture the resumed pass does not fit: run full
            ok = False
        self.first = self._collect([f.argmax(-1) for f in full])
        return ok

    @staticmethod
    def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape or not bool(torch.isfinite(a).all()):
            return False
        scale = b.abs().max().clamp_min(1e-30)
        tol = 1e-4 if a.dtype == torch.float32 and b.dtype == torch.float32 else 2e-2
        return float((a - b).abs().max() / scale) <= tol

    # ------------------------------------------------------------------ the resumed pass
    def _logits(self, b: _Batch) -> torch.Tensor:
        base, head, softcap = _split(self.model)  # type: ignore[misc]
        blocks = _blocks(base)
        h = b.hidden
        for blk, (args, kwargs) in zip(blocks[self.start :], b.calls):  # type: ignore[index]
            out = blk(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        norm = next((getattr(base, n) for n in _FINAL_NORMS if hasattr(base, n)), None)
        if norm is None:
            raise RuntimeError("no final norm found")
        rows = norm(h[on_device(b.mask, h)])
        logits = head(rows)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def _collect(self, preds: List[torch.Tensor]) -> List[Tuple[List[int], List[int]]]:
        out: List[Optional[Tuple[List[int], List[int]]]] = [None] * self.n
        for b, pred in zip(self.batches, preds):
            counts = b.mask.sum(dim=1).tolist()
            p, lab = pred.tolist(), b.labels.tolist()
            start = 0
            for i, c in zip(b.idx, counts):  # the mask's rows are row-major
                out[i] = (p[start : start + c], lab[start : start + c])
                start += c
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def predictions(self) -> List[Tuple[List[int], List[int]]]:
        """``(argmax ids, label ids)`` at each sequence's labelled positions, on the model as
        it is now (its blocks below ``start`` as they were at construction)."""
        with preserved_model_state(self.model):
            self.model.eval()
            if self.resumed:
                return self._collect([self._logits(b).argmax(-1) for b in self.batches])
            return self._collect(
                [
                    answer_logits(self.model, ids, att, b.mask).argmax(-1)
                    for b, (ids, att) in zip(self.batches, self._inputs)
                ]
            )
