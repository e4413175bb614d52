"""Attention of a packed pass, one request at a time.

A packed pass (:class:`~ultraedit_fast.model.requests.PackedPass`) runs several requests one
after another in one row, positions restarting at 0 for each. Transformers keeps them apart
with a block-diagonal causal mask, and its ``sdpa`` attention then computes every score of
the ``T x T`` square of the pass and masks all but the blocks on the diagonal: for a pass
of 520 tokens from 40 requests of 8-19 tokens, 40x the scores it needs (on SmolLM2 on the
CPU, attention was 1.5 s of a 5.8 s stream turn: ``benchmarks/README.md``).

:func:`packed_attention` runs the model's forward with an attention that gathers each
request's queries, keys and values into a batch of its own (``[requests, heads, longest,
head_dim]``, right-padded) and calls transformers' own ``sdpa`` attention on it, causal,
without a mask: right padding sits after every real key of its request, so the causal
rule alone keeps it out of every real row, and the padded rows are dropped. The results
are those of the masked pass up to rounding (the same dot products and softmax over the
same keys; the order of the sums differs).

Scope, so that nothing else changes:

- only for a model whose attention is ``sdpa`` (eager, flash or flex are left alone);
- only in the thread that entered the context, and only for calls whose queries and keys
  are the packed row itself (a cached decode step or another thread's padded batch goes
  to ``sdpa`` with its mask, built for them as for ``sdpa``);
- a layer with a sliding window shorter than the longest request falls back to the
  masked pass (the window lives in the mask);
- while any thread is inside, the model's ``config._attn_implementation`` names this
  attention (restored when the last one leaves); it answers every call exactly as
  ``sdpa`` does outside the packed passes.

:func:`~ultraedit_fast.model.forward.supports_packing` probes packed passes through this
path, so a model for which it fails runs padded mini-batches.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Optional

import torch

NAME = "ultraedit_packed_sdpa"
_LOCAL = threading.local()
_LOCK = threading.Lock()
# id(config) -> [threads inside, the implementation to restore]; configs are unhashable,
# and an entry lives only while a thread is inside
_INSIDE: Dict[int, list] = {}
_REGISTERED = False
# what the last passes did, for tests and profiles: calls answered per request / by sdpa
COUNTS: Dict[str, int] = {"segments": 0, "fallback": 0}


@dataclass(frozen=True)
class Segments:
    """Where the requests of a packed row of ``n`` tokens lie: ``index`` ``[S, L]`` (each
    request's positions, right-padded with its first), ``valid`` ``[S, L]`` bool, and
    ``real`` ``[n]``: the flat positions of ``valid``'s true entries (found once, so that
    no layer indexes with a boolean mask: a host sync on a GPU)."""

    n: int
    index: torch.Tensor
    valid: torch.Tensor
    real: torch.Tensor

    @property
    def longest(self) -> int:
        return int(self.index.shape[1])

    @property
    def cheaper(self) -> bool:
        """Whether the padded batch computes fewer scores than the pass's square (one
        long request among short ones can make it more)."""
        return scores_padded(self.index.shape[0], self.longest) <= self.n * self.n

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> "Segments":
        """The requests of a ``[1, T]`` packed row: a new one wherever a position is not
        the one before plus 1 (as transformers' ``find_packed_sequence_indices``)."""
        pos = position_ids.reshape(-1).to("cpu", torch.long)
        n = int(pos.numel())
        starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 2) != 1).reshape(-1)
        return cls.of_lengths(torch.diff(starts, append=torch.tensor([n])), position_ids.device)

    @classmethod
    def of_lengths(cls, lengths: torch.Tensor, device) -> "Segments":
        """Requests of ``lengths`` tokens (some may be 0), one after another."""
        lengths = lengths.to("cpu", torch.long)
        n = int(lengths.sum())
        starts = torch.cumsum(lengths, 0) - lengths
        steps = torch.arange(max(int(lengths.max()), 1) if len(lengths) else 0)
        valid = steps[None] < lengths[:, None]
        index = torch.where(
            valid, starts[:, None] + steps[None], starts.clamp(max=max(n - 1, 0))[:, None]
        )
        real = torch.nonzero(valid.reshape(-1)).reshape(-1)
        return cls(n, index.to(device), valid.to(device), real.to(device))


def scores_padded(requests: int, longest: int) -> int:
    """Attention scores of ``requests`` requests padded to ``longest`` tokens each."""
    return requests * longest * longest


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def grouped(seg: Segments, x: torch.Tensor) -> torch.Tensor:
    """``[1, H, T, D]`` -> ``[S, H, L, D]``: each request's rows, right-padded."""
    s, L = seg.index.shape
    flat = seg.index.reshape(-1).to(x.device)
    return x[0].index_select(1, flat).reshape(x.shape[1], s, L, x.shape[3]).transpose(0, 1)


def ungrouped(seg: Segments, out: torch.Tensor) -> torch.Tensor:
    """``[S, L, H, D]`` (an attention's output) -> ``[1, T, H, D]``: the real rows, in order."""
    s, L = seg.index.shape
    return out.reshape(s * L, *out.shape[2:]).index_select(0, seg.real.to(out.device))[None]


def _attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature: ``[B, H, T, D]`` in, ``([B, T, H, D],
    None)`` out."""
    split = getattr(_LOCAL, "split", None)
    if split is not None:  # a pass split at the answers (model/prefix.py): never falls back
        return split.attend(module, query, key, value, kwargs)
    seg: Optional[Segments] = getattr(_LOCAL, "segments", None)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if (
        seg is None
        or query.shape[0] != 1
        or query.shape[2] != seg.n
        or key.shape[2] != seg.n
        or (window is not None and seg.longest >= int(window))
        or not seg.cheaper
    ):
        COUNTS["fallback"] += 1
        return _sdpa()(module, query, key, value, attention_mask, **kwargs)
    COUNTS["segments"] += 1
    kwargs.pop("is_causal", None)
    q, k, v = (grouped(seg, x) for x in (query, key, value))
    out, _ = _sdpa()(module, q, k, v, None, is_causal=True, **kwargs)  # [S, L, H, D]
    return ungrouped(seg, out), None


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    # masks built as for sdpa, for every call this attention hands on to sdpa
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _REGISTERED = True


def _configs(model):
    """The model's config and its sub-configs that name an attention implementation."""
    cfg = getattr(model, "config", None)
    out = [cfg] if cfg is not None else []
    for name in ("text_config", "decoder"):
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out.append(sub)
    return out


def _tree(model):
    """The model's config and all its sub-configs, each once."""
    out, todo = [], [getattr(model, "config", None)]
    while todo:
        cfg = todo.pop()
        if cfg is None or any(cfg is c for c in out):
            continue
        out.append(cfg)
        todo += [getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", None) or {}]
    return out


def _get(cfg):
    return getattr(cfg, "_attn_implementation_internal", getattr(cfg, "_attn_implementation", None))


def _set(cfg, value) -> None:
    # transformers 5's ``_attn_implementation`` setter also writes every sub-config: each
    # config is written alone, so that one whose attention is not sdpa keeps its own
    if hasattr(cfg, "_attn_implementation_internal"):
        cfg._attn_implementation_internal = value
    else:
        cfg._attn_implementation = value


def _enter(configs) -> None:
    """Every sdpa config of ``configs`` names this attention (counted per config)."""
    with _LOCK:
        for cfg in configs:
            slot = _INSIDE.setdefault(id(cfg), [0, None])
            if slot[0] == 0:
                slot[1] = _get(cfg)
                if slot[1] == "sdpa":
                    _set(cfg, NAME)
            slot[0] += 1


def _leave(configs) -> None:
    with _LOCK:
        for cfg in configs:
            slot = _INSIDE[id(cfg)]
            slot[0] -= 1
            if slot[0] == 0:
                _set(cfg, slot[1])
                del _INSIDE[id(cfg)]


def applies(model) -> bool:
    """Whether :func:`packed_attention` changes anything for ``model``: its attention is
    transformers' ``sdpa`` (or this one, entered by another thread)."""
    if callable(getattr(type(model), "get_base_model", None)):  # peft: the wrapped model
        model = model.get_base_model()
    configs = _configs(model)
    return bool(configs) and all(
        getattr(c, "_attn_implementation", None) in ("sdpa", NAME) for c in configs
    )


@contextmanager
def packed_attention(
    model, position_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor] = None
):
    """Inside, this thread's forward passes over the packed row ``position_ids``
    (``[1, T]``, no ``attention_mask``) attend request by request. Does nothing without
    ``position_ids``, with an ``attention_mask`` (a padded batch), for a batch of more
    than one row, or where :func:`applies` does not hold."""
    if (
        position_ids is None
        or attention_mask is not None
        or position_ids.dim() != 2
        or position_ids.shape[0] != 1
        or position_ids.shape[1] == 0
        or not applies(model)
    ):
        yield
        return
    _register()
    if callable(getattr(type(model), "get_base_model", None)):
        model = model.get_base_model()
    configs = _tree(model)
    segments = Segments.of(position_ids)
    _enter(configs)
    outer = getattr(_LOCAL, "segments", None)
    _LOCAL.segments = segments
    try:
        yield
    finally:
        _LOCAL.segments = outer
        _leave(configs)
