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

The output layer is then the largest part of a check (a 49K-token vocabulary against four
576-wide blocks), and most of it is skipped without changing any answer: the full pass
keeps, at every labelled row, the input of the output layer ``n0``, its argmax ``y0`` and
the margin ``m0`` of that argmax over the runner-up. A later input ``n`` changes every
logit ``v`` by ``W_v . (n - n0)``, at most ``|W_v| |n - n0|``, so where
``m0 > (|W_y0| + max_v |W_v|) |n - n0|`` (with a rounding allowance) the argmax is still
``y0``, exactly; only the other rows go through the output layer. The rows the turn does
not reach (most of a locality set) are answered so.

The same full pass can also keep the inputs of given modules at the labelled positions of
given sequences (``taps``): the step search's locality keys come from it, not from a pass of
their own; sequences needed only there (``extra``) run in it and are never checked.

It applies to the families of :mod:`.forward` whose model is "embeddings -> blocks -> final
norm -> lm_head (-> soft-capping)", and is checked, not assumed: the first time a model is
resumed from a block (padded or packed), the first batch's logits from the resumed pass are
compared with the full pass's, and any difference (or an error) makes it run full passes
instead (``resumed`` is ``False`` then). Sequences run packed (one row, positions
restarting) where :func:`~.forward.supports_packing` holds, padded otherwise.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..parallel.concurrency import ThreadOwned
from .forward import (
    forward_until,
    _last_mlp,
    _mlp_on_rows,
    _split,
    answer_logits,
    input_device,
    on_device,
    preserved_model_state,
    supports_packing,
)
from .requests import IGNORE, TokenizedRequest, pad_batch

_FINAL_NORMS = ("norm", "ln_f", "final_layernorm")
TOKENS_PER_BATCH = 2048  # padded tokens per batch of a check, at most (one row at least)
# model -> the ways (start, packing, dtype, device, attention) whose resumed pass matched the
# full pass once
_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _blocks(base) -> Optional[torch.nn.ModuleList]:
    for name in ("layers", "h"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return blocks
    return None


def _final_norm(base) -> Optional[torch.nn.Module]:
    return next((getattr(base, n) for n in _FINAL_NORMS if hasattr(base, n)), None)


def lowest_block(model, modules: Sequence[torch.nn.Module]) -> Optional[int]:
    """The index of the lowest decoder block holding one of ``modules`` (``None`` when the
    model's blocks cannot be found or a module is in none of them)."""
    split = _split(model)
    blocks = _blocks(split[0]) if split is not None else None
    if blocks is None:
        return None
    where: Dict[int, int] = {}
    for i, blk in enumerate(blocks):
        for m in blk.modules():
            where.setdefault(id(m), i)
    found = [where.get(id(m)) for m in modules]
    if not found or any(i is None for i in found):
        return None
    return min(i for i in found if i is not None)


def head_row_norms(head: torch.nn.Linear) -> torch.Tensor:
    """``|W_v|`` (float32) for every row of the output layer's weight (taken per check set:
    a weight written through ``.data`` does not say so, so nothing is cached)."""
    w = head.weight
    with torch.no_grad():
        return torch.cat(
            [
                torch.linalg.vector_norm(w[s : s + 8192].float(), dim=1)
                for s in range(0, w.shape[0], 8192)
            ]
        )


def _boundable(head) -> bool:
    """Whether the output layer is a plain dense ``y = W x (+ b)`` whose weight is here:
    not sharded (DTensor), offloaded (meta, accelerate's hooks) or quantized."""
    if not isinstance(head, torch.nn.Linear) or hasattr(head, "_hf_hook"):
        return False
    w = head.weight
    return type(w.data) is torch.Tensor and not w.is_meta and w.dtype.is_floating_point


def token_batches(
    lengths: Sequence[int], batch_size: int, tokens: int, packed: bool = False
) -> List[List[int]]:
    """Indices grouped longest first: at most ``batch_size`` rows and ``tokens`` tokens a
    group, padded (or, ``packed``, one after another), one row at least."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: List[List[int]] = []
    size = 0  # the last group's tokens
    for i in order:
        if out:
            grown = size + lengths[i] if packed else (len(out[-1]) + 1) * lengths[out[-1][0]]
            if len(out[-1]) < batch_size and grown <= tokens:
                out[-1].append(i)
                size = grown
                continue
        out.append([i])
        size = lengths[i]
    return out


def _packed(items: Sequence[TokenizedRequest]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, position_ids, labels)``, each ``[1, L]``: the sequences one after
    another, positions restarting at 0 for each."""
    ids = [i for t in items for i in t.input_ids]
    pos = [p for t in items for p in range(len(t.input_ids))]
    labels = [lab for t in items for lab in t.labels]
    return torch.tensor([ids]), torch.tensor([pos]), torch.tensor([labels])


def _rounding(rows: torch.Tensor) -> float:
    """The relative rounding allowed in the output layer's logits: fp32 on the CPU or with
    full-precision matmuls 1e-4, TF32 2e-3, half precision 2e-2."""
    if rows.dtype != torch.float32:
        return 2e-2
    if rows.is_cuda and (
        torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    ):
        return 2e-3
    return 1e-4


class _Batch:
    """One padded batch of the check set: its rows' order, labels and the cached state."""

    def __init__(self, idx: List[int], labels: torch.Tensor, mask: torch.Tensor):
        self.idx, self.labels, self.mask = idx, labels, mask
        # labelled positions of each sequence, in order (row-major: rows, or one packed row)
        self.counts: List[int] = []
        self.hidden: Optional[torch.Tensor] = None
        self.calls: List[Tuple[tuple, Dict[str, Any]]] = []  # per block from the lowest up
        # the output layer's input, argmax and margin at the labelled rows (full pass)
        self.n0: Optional[torch.Tensor] = None
        self.y0: Optional[torch.Tensor] = None
        self.m0: Optional[torch.Tensor] = None
        # per labelled row, taken once: |W_y0| + max_v |W_v|, and |n0|
        self.reach: Optional[torch.Tensor] = None
        self.n0_norm: Optional[torch.Tensor] = None
        self.tap: Optional[torch.Tensor] = None  # the tapped labelled positions (full pass)


class ResumedForward:
    """Teacher-forced argmax at the labelled positions of ``toks``, run from block ``start``
    up on the state the full pass left there (see the module docstring). Build it on the
    model whose blocks below ``start`` stay as they are for as long as it is used.

    ``taps`` (``{name: module}``): the full pass keeps each module's input (float32) at the
    labelled positions of the sequences ``tap_from`` on of ``toks + extra``, in ``keys``;
    ``extra`` sequences run in that pass alone (as far as the tapped modules)."""

    def __init__(
        self,
        model,
        toks: Sequence[TokenizedRequest],
        start: Optional[int],
        batch_size: int,
        *,
        extra: Sequence[TokenizedRequest] = (),
        taps: Optional[Dict[str, torch.nn.Module]] = None,
        tap_from: int = 0,
        tokens_per_batch: int = TOKENS_PER_BATCH,
    ):
        self.model = model
        self.n = len(toks)
        device = input_device(model)
        split = _split(model)
        # sequences one after another in one row where the model keeps them apart
        packed = split is not None and supports_packing(model)
        self._packed = packed
        self._inputs: List[Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]
        self._inputs = []
        self.batches: List[_Batch] = []
        extra_batches: List[tuple] = []
        for group, offset in ((list(toks), 0), (list(extra), len(toks))):
            lengths = [len(t.input_ids) for t in group]
            for idx in token_batches(lengths, batch_size, tokens_per_batch, packed):
                items = [group[i] for i in idx]
                inputs: Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]
                if packed:
                    ids, pos, labels = _packed(items)
                    inputs = (ids.to(device), None, pos.to(device))
                    owner = torch.tensor([i for i in idx for _ in group[i].input_ids])[None]
                else:
                    b = pad_batch(items, idx).to(device)
                    inputs, labels = (b.input_ids, b.attention_mask, None), b.labels
                    owner = torch.tensor(idx)[:, None].expand_as(labels)
                labels = labels.to(device)
                mask = labels != IGNORE
                tap = mask & (owner.to(device) + offset >= tap_from)
                if offset == 0:
                    self._inputs.append(inputs)
                    batch = _Batch(idx, labels[mask], mask)
                    batch.counts = [sum(lab != IGNORE for lab in group[i].labels) for i in idx]
                    batch.tap = tap
                    self.batches.append(batch)
                elif taps:
                    extra_batches.append((inputs, mask, tap))
        self.start = start
        self.first: Optional[List[Tuple[List[int], List[int]]]] = None
        self.keys: Dict[str, torch.Tensor] = {}
        self._wn: Optional[torch.Tensor] = None  # |W_v| of the output layer, when pruning
        self._wmax = 0.0
        self.settled = 0  # rows the last predictions answered without the output layer
        resume = start is not None and split is not None and bool(self.batches)
        self.resumed = False
        if self.batches:  # one full pass: ``first``, the taps, the state to resume from
            self.resumed = self._capture(resume, taps or {}, extra_batches)

    # ------------------------------------------------------------------ the full pass
    @torch.no_grad()
    def _capture(self, resume: bool, taps, extra_batches) -> bool:
        """One full pass keeping the state at block ``start`` and the taps; the resumed
        pass checked against it on the first batch. Returns whether the resumed pass can be
        used."""
        split = _split(self.model)
        base = split[0] if split is not None else None
        blocks = _blocks(base) if base is not None else None
        resume = resume and blocks is not None and self.start < len(blocks)  # type: ignore
        thread = ThreadOwned()
        box: Dict[str, Any] = {"batch": None, "mask": None, "tap": None}
        kept: Dict[str, List[torch.Tensor]] = {n: [] for n in taps}
        handles = [
            m.register_forward_hook(self._tap_hook(n, kept, thread, box)) for n, m in taps.items()
        ]
        if resume and blocks is not None and self.start is not None:
            handles += [
                blocks[i].register_forward_pre_hook(
                    self._block_hook(i, thread, box), with_kwargs=True
                )
                for i in range(self.start, len(blocks))
            ]
            norm = _final_norm(base)
            if norm is not None:
                handles.append(norm.register_forward_hook(self._norm_hook(thread, box)))
        full = []
        try:
            with preserved_model_state(self.model):
                self.model.eval()
                for b, (ids, att, pos) in zip(self.batches, self._inputs):
                    box.update(batch=b, mask=b.mask, tap=b.tap)
                    full.append(answer_logits(self.model, ids, att, b.mask, pos).float())
                box["batch"] = None
                for (ids, att, pos), mask, tap in extra_batches:  # as far as the taps
                    box.update(mask=mask, tap=tap)
                    kw = {"attention_mask": att} if pos is None else {"position_ids": pos}
                    forward_until(self.model, list(taps.values()), input_ids=ids, **kw)
        finally:
            box.update(batch=None, mask=None, tap=None)
            for h in handles:
                h.remove()
        self.keys = {n: torch.cat(v) for n, v in kept.items() if v}
        self.first = self._collect([f.argmax(-1) for f in full])
        for b, f in zip(self.batches, full):
            if f.shape[0] and f.shape[-1] > 1:
                top = f.topk(2, dim=-1)
                b.y0, b.m0 = top.indices[:, 0], top.values[:, 0] - top.values[:, 1]
            b.tap = None
        return resume and self._verify(full[0])

    def _verify(self, full: torch.Tensor) -> bool:
        """Whether the resumed pass gives the full pass's logits ``full`` on the first
        batch (checked once per model and way of running it); with the output layer's row
        norms taken where its argmax can be bounded."""
        ok = all(b.hidden is not None and b.hidden.shape[:2] == b.mask.shape for b in self.batches)
        emb = self.model.get_input_embeddings().weight
        cfg = getattr(self.model, "config", None)
        attention = getattr(cfg, "_attn_implementation", None)
        way = (self.start, self._packed, str(emb.dtype), str(emb.device), attention)
        if ok and way not in _VERIFIED.get(self.model, ()):
            try:
                ok = self._close(self._logits(self.batches[0]).float(), full)
            except Exception:  # an architecture the resumed pass does not fit: run full
                ok = False
            if ok:
                _VERIFIED.setdefault(self.model, set()).add(way)
        _, head, softcap = _split(self.model)  # type: ignore[misc]
        if ok and softcap is None and _boundable(head):
            if all(b.n0 is not None and b.y0 is not None for b in self.batches):
                self._wn = head_row_norms(head)
                wmax = self._wn.max()
                for b in self.batches:
                    assert b.n0 is not None and b.y0 is not None
                    b.reach = self._wn.to(b.y0.device)[b.y0] + wmax.to(b.y0.device)
                    b.n0_norm = torch.linalg.vector_norm(b.n0, dim=1)
                self._wmax = float(wmax)
        return ok

    def _block_hook(self, i: int, thread: ThreadOwned, box: dict):
        def keep(module, args, kwargs):
            b = box["batch"]
            if b is not None and thread.owns():
                if i == self.start:
                    h = args[0] if args else kwargs.get("hidden_states")
                    b.hidden = h.detach()
                b.calls.append((tuple(args[1:]), {k: v for k, v in kwargs.items()}))

        return keep

    @staticmethod
    def _norm_hook(thread: ThreadOwned, box: dict):
        def keep(module, args, out):
            b = box["batch"]
            if b is not None and thread.owns():
                h = out[0] if isinstance(out, tuple) else out
                if h.shape[:-1] == b.mask.shape:
                    b.n0 = h[on_device(b.mask, h)].float()

        return keep

    @staticmethod
    def _tap_hook(name: str, kept: Dict[str, List[torch.Tensor]], thread: ThreadOwned, box):
        def keep(module, args, out):
            tap, mask = box["tap"], box["mask"]
            if tap is None or not thread.owns():
                return
            x = args[0]
            if x.shape[:-1] == mask.shape:
                rows = x[on_device(tap, x)]
            else:  # a module the pass runs on the labelled rows alone ([1, n, d] or [n, d])
                rows = x.reshape(-1, x.shape[-1])[on_device(tap[mask], x)]
            if rows.shape[0]:
                kept[name].append(rows.float())

        return keep

    @staticmethod
    def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape or not bool(torch.isfinite(a).all()):
            return False
        scale = b.abs().max().clamp_min(1e-30)
        tol = 1e-4 if a.dtype == torch.float32 and b.dtype == torch.float32 else 2e-2
        return float((a - b).abs().max() / scale) <= tol

    # ------------------------------------------------------------------ the resumed pass
    def _rows(self, b: _Batch) -> torch.Tensor:
        """The output layer's input at the labelled rows, from block ``start`` up."""
        base = _split(self.model)[0]  # type: ignore[index]
        blocks = _blocks(base)
        h = b.hidden
        with _mlp_on_rows(_last_mlp(base), b.mask):
            for blk, (args, kwargs) in zip(blocks[self.start :], b.calls):  # type: ignore[index]
                out = blk(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        norm = _final_norm(base)
        if norm is None:
            raise RuntimeError("no final norm found")
        assert h is not None
        return norm(h[on_device(b.mask, h)])

    def _logits(self, b: _Batch) -> torch.Tensor:
        _, head, softcap = _split(self.model)  # type: ignore[misc]
        logits = head(self._rows(b))
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def _argmax(self, b: _Batch) -> torch.Tensor:
        """The argmax at ``b``'s labelled rows; through the output layer only where the
        bound of the module docstring does not settle it."""
        if b.n0 is None or b.y0 is None or b.m0 is None or b.reach is None or b.n0_norm is None:
            return self._logits(b).argmax(-1)
        rows = self._rows(b)
        dev = rows.device
        dn = torch.linalg.vector_norm(rows.float() - b.n0.to(dev), dim=1)
        y0, m0 = b.y0.to(dev), b.m0.to(dev)
        slack = _rounding(rows) * self._wmax * b.n0_norm.to(dev)
        settled = m0 > b.reach.to(dev) * dn + slack
        self.settled += int(settled.sum())
        pred = y0.clone()
        todo = ~settled
        if bool(todo.any()):
            _, head, _ = _split(self.model)  # type: ignore[misc]
            pred[todo] = head(rows[todo]).argmax(-1).to(pred.device)
        return pred

    def _collect(self, preds: List[torch.Tensor]) -> List[Tuple[List[int], List[int]]]:
        out: List[Optional[Tuple[List[int], List[int]]]] = [None] * self.n
        for b, pred in zip(self.batches, preds):
            p, lab = pred.tolist(), b.labels.tolist()
            start = 0
            for i, c in zip(b.idx, b.counts):  # the mask's rows are row-major
                out[i] = (p[start : start + c], lab[start : start + c])
                start += c
        return out  # type: ignore[return-value]

    def restrict(self, keep: Dict[int, List[int]]) -> None:
        """From now on check, of sequence ``i`` in ``keep``, only its first
        ``len(keep[i])`` labelled positions, with labels ``keep[i]`` (the other sequences as
        they are); ``first`` follows."""
        for b in self.batches:  # checked before anything changes
            for i, c in zip(b.idx, b.counts):
                if i in keep and len(keep[i]) > c:
                    raise ValueError(f"keep[{i}]: {len(keep[i])} labels for {c} labelled positions")
        for b in self.batches:
            lab = b.labels.tolist()
            sel: List[bool] = []
            labels: List[int] = []
            start = 0
            counts = []
            for i, c in zip(b.idx, b.counts):
                k = len(keep[i]) if i in keep else c
                counts.append(k)
                sel += [True] * k + [False] * (c - k)
                labels += keep[i] if i in keep else lab[start : start + c]
                start += c
            chosen = torch.tensor(sel, dtype=torch.bool, device=b.mask.device)
            mask = b.mask.clone()
            mask[b.mask] = chosen
            b.mask, b.counts = mask, counts
            b.labels = torch.tensor(labels, dtype=b.labels.dtype, device=b.labels.device)
            for name in ("n0", "y0", "m0", "reach", "n0_norm"):
                v = getattr(b, name)
                if v is not None:
                    setattr(b, name, v[chosen.to(v.device)])
        if self.first is not None:
            self.first = [
                (p[: len(keep[i])], list(keep[i])) if i in keep else (p, lab)
                for i, (p, lab) in enumerate(self.first)
            ]

    @torch.no_grad()
    def predictions(self) -> List[Tuple[List[int], List[int]]]:
        """``(argmax ids, label ids)`` at each sequence's labelled positions, on the model as
        it is now (its blocks below ``start`` as they were at construction)."""
        with preserved_model_state(self.model):
            self.model.eval()
            self.settled = 0
            if self.resumed:
                return self._collect([self._argmax(b) for b in self.batches])
            return self._collect(
                [
                    answer_logits(self.model, ids, att, b.mask, pos).argmax(-1)
                    for b, (ids, att, pos) in zip(self.batches, self._inputs)
                ]
            )
