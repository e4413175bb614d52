"""A packed pass split at the answers: the prompts without a graph, the answer rows with one.

A turn needs the gradient of its loss at the edited modules' outputs at answer rows only
(``docs/algorithm.md`` section 2). Nothing at a prompt position depends on an answer row
(causal attention), and the gradient at an answer row flows only through that row and the
rows after it. So the prompt tokens before each request's first answer row (the prefix)
can run first, under ``torch.no_grad()``, keeping only their keys and values at every
layer; then the answer rows run alone (the suffix, a packed row of their own at their true
positions), with a graph, each attending to its own prefix's cached keys and values and
causally to its own rows. The logits, keys and gradients are those of the whole packed
pass up to rounding; the backward covers the answer rows only, and no prompt position
keeps activations for it.

It applies where :mod:`.packed_attention` does (sdpa attention) and a probe on the model
(:func:`supports_split`, once per model, dtype, device and attention) shows the split
gives the whole pass's logits; a sliding window shorter than a request, or a request
without an answer row, keeps the whole pass.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from typing import Dict, Optional, Tuple

import torch

from . import packed_attention as PA

_SUPPORT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _windows(model):
    cfg = getattr(model, "config", None)
    return [
        w
        for c in (cfg, getattr(cfg, "text_config", None))
        if c is not None
        for w in [getattr(c, "sliding_window", None)]
        if isinstance(w, int) and w > 0
    ]


class PrefixSplit:
    """One packed row (``input_ids``, ``position_ids`` ``[1, T]``, positions restarting at 0
    per request) with ``mask`` ``[1, T]`` (its answer rows), split at each request's first
    answer row. Rows after a request's last answer row reach nothing and are dropped."""

    def __init__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor):
        pos, m = position_ids[0].cpu(), mask[0].cpu()
        n = int(pos.numel())
        starts = torch.nonzero(pos == 0).reshape(-1).tolist()
        prefix, suffix, plen, slen = [], [], [], []
        for a, b in zip(starts, starts[1:] + [n]):
            rows = torch.nonzero(m[a:b]).reshape(-1)
            if not len(rows):
                raise ValueError("a request without answer rows")
            f, last = a + int(rows[0]), a + int(rows[-1])
            prefix.append(torch.arange(a, f))
            suffix.append(torch.arange(f, last + 1))
            plen.append(f - a)
            slen.append(last + 1 - f)
        dev = input_ids.device
        self.prefix_index = torch.cat(prefix).to(dev)
        self.suffix_index = torch.cat(suffix).to(dev)
        self.prefix = PA.Segments.of_lengths(torch.tensor(plen), dev)
        self.suffix = PA.Segments.of_lengths(torch.tensor(slen), dev)
        self.longest = max(p + s for p, s in zip(plen, slen))
        # padded per request, at most 4x the scores of the whole pass's square (one long
        # request among many short ones can make it far more; the split saves the prompts'
        # graph and backward, worth more than their attention)
        total = sum(plen) + sum(slen)
        self.cheaper = PA.scores_padded(len(plen), self.longest) <= 4 * total * total
        self.calls = [0, 0]  # attention calls of the answers' pass, of the prompts' pass
        self._ids, self._pos, self._mask = input_ids, position_ids, mask
        self.kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._recording = False
        self._mask_on: Optional[torch.Tensor] = None

    def rows(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, index.to(x.device))

    @property
    def suffix_mask(self) -> torch.Tensor:
        """The answer rows among the suffix row's (``[1, n]``)."""
        return self.rows(self._mask, self.suffix_index)

    # -------------------------------------------------------------- the attention
    def attend(self, module, query, key, value, kwargs):
        seg = self.prefix if self._recording else self.suffix
        if query.shape[0] != 1 or query.shape[2] != seg.n or key.shape[2] != seg.n:
            raise RuntimeError(
                f"split pass: attention got {tuple(query.shape)}, expected {seg.n} rows"
            )
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        if window is not None and self.longest >= int(window):
            raise RuntimeError("split pass: a request is longer than the sliding window")
        kwargs.pop("is_causal", None)
        self.calls[self._recording] += 1
        q, k, v = (PA.grouped(seg, x) for x in (query, key, value))
        if self._recording:  # the prompts: causal within each, keys and values kept
            self.kv[id(module)] = (k, v)
            out, _ = PA._sdpa()(module, q, k, v, None, is_causal=True, **kwargs)
            return PA.ungrouped(seg, out), None
        if not self.prefix.n:  # every prompt is one token: nothing before the answers
            out, _ = PA._sdpa()(module, q, k, v, None, is_causal=True, **kwargs)
            return PA.ungrouped(seg, out), None
        pk, pv = self.kv[id(module)]
        k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        out, _ = PA._sdpa()(module, q, k, v, self._answer_mask(q.device), **kwargs)
        return PA.ungrouped(seg, out), None

    def _answer_mask(self, device) -> torch.Tensor:
        """``[S, 1, answers, prompt + answers]`` bool: each request's answer rows see its
        prompt's cached rows and, causally, its own (built once per pass and device)."""
        if self._mask_on is None or self._mask_on.device != device:
            n_pre, n_suf = self.prefix.longest, self.suffix.longest
            seen = self.prefix.valid.to(device)[:, None, None, :].expand(-1, 1, n_suf, n_pre)
            causal = torch.ones(n_suf, n_suf, dtype=torch.bool, device=device).tril()
            self._mask_on = torch.cat([seen, causal.expand(len(seen), 1, n_suf, n_suf)], dim=-1)
        return self._mask_on

    @contextmanager
    def _active(self, recording: bool):
        outer = getattr(PA._LOCAL, "split", None)
        PA._LOCAL.split, self._recording = self, recording
        try:
            yield
        finally:
            PA._LOCAL.split = outer

    # -------------------------------------------------------------- the two passes
    def logits(self, model, quiet=None) -> torch.Tensor:
        """The answer rows' logits (``[mask.sum(), vocab]``, row-major, as
        :func:`~ultraedit_fast.model.forward.answer_logits` gives for the whole row), with
        a graph through the suffix only. ``quiet``: a context under which the prefix pass
        runs (a capture's hooks paused)."""
        from .forward import _split, answer_logits

        split = _split(model)
        base = split[0] if split is not None else model
        self.kv.clear()
        self.calls = [0, 0]
        try:
            if self.prefix.n:
                ids, pos = (
                    self.rows(self._ids, self.prefix_index),
                    self.rows(self._pos, self.prefix_index),
                )
                with torch.no_grad(), quiet or nullcontext():
                    with PA.packed_attention(model, pos), self._active(True):
                        base(input_ids=ids, position_ids=pos, use_cache=False)
            ids, pos = (
                self.rows(self._ids, self.suffix_index),
                self.rows(self._pos, self.suffix_index),
            )
            with self._active(False):
                logits = answer_logits(model, ids, None, self.suffix_mask, pos)
        finally:
            self.kv.clear()
        # each pass went through every layer's attention here, or the answers would have
        # run without their prompts (the model's attention changed since split_for)
        if not self.calls[0] or (self.prefix.n and self.calls[1] != self.calls[0]):
            raise RuntimeError(
                f"split pass: the attention ran {self.calls[1]} times for the prompts and "
                f"{self.calls[0]} for the answers; the model's attention implementation "
                "changed during the pass"
            )
        return logits


def split_for(model, input_ids, position_ids, mask) -> Optional[PrefixSplit]:
    """The split of a packed pass, or ``None`` where the whole pass must run (not a packed
    pass, an attention it does not apply to, a request longer than a sliding window or
    without an answer row, or a model the probe refused)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    if not PA.applies(model) or not supports_split(model):
        return None
    try:
        split = PrefixSplit(input_ids, position_ids, mask)
    except ValueError:
        return None
    if any(split.longest >= w for w in _windows(model)) or not split.cheaper:
        return None
    if _rope_type(model) in ("dynamic", "longrope"):  # frequencies from the longest position
        return None
    return split


def _rope_type(model):
    cfg = getattr(model, "config", None)
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(cfg, name, None)
        if isinstance(rope, dict):
            return rope.get("rope_type", rope.get("type"))
    return None


_PROBE = ((6, 3), (4, 1), (5, 2))  # (tokens, first answer row) of the probe's requests


def supports_split(model) -> bool:
    """Whether :class:`PrefixSplit` gives the whole packed pass's logits on ``model``:
    checked on three short requests, once per model, dtype, device and attention."""
    from .forward import answer_logits, supports_packing

    emb = model.get_input_embeddings().weight
    key = (str(emb.dtype), str(emb.device), getattr(model.config, "_attn_implementation", None))
    cached = _SUPPORT.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    ok = False
    if supports_packing(model):
        vocab = emb.shape[0]
        n = sum(t for t, _ in _PROBE)
        ids = torch.tensor([(11 * j + 5) % vocab for j in range(n)], device=emb.device)[None]
        pos = torch.cat([torch.arange(t) for t, _ in _PROBE]).to(emb.device)[None]
        mask = torch.cat([torch.arange(t) >= f for t, f in _PROBE]).to(emb.device)[None]
        try:
            with torch.no_grad():
                whole = answer_logits(model, ids, None, mask, pos).float()
                got = PrefixSplit(ids, pos, mask).logits(model).float()
            err = (got - whole).abs().max() / whole.abs().max().clamp_min(1e-30)
            tol = 1e-3 if emb.dtype == torch.float32 else 5e-2
            ok = bool(torch.isfinite(err)) and float(err) <= tol
        except Exception:  # an attention path that rejects the inputs: the whole pass
            ok = False
    _SUPPORT[model] = (key, ok)
    return ok
