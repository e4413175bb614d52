"""Teacher-forced predictions: the model's argmax at the answer tokens of (prompt, answer)
pairs, given every earlier answer token (``docs/algorithm.md`` section 7), in batches of
similar length. The teacher-forced scores are built on them, and the generated scores reuse
them (:mod:`ultraedit_fast.scoring.shortcuts`)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..model.forward import answer_logits, preserved_model_state
from ..model.requests import IGNORE, TokenizedRequest, context_length, pad_batch, tokenize_pair
from ..parallel.concurrency import model_locks
from ..utils.display import bar
from .resumed import active_for


def _device(model):
    return model.get_input_embeddings().weight.device


def mean(xs: Sequence[float]) -> Optional[float]:
    """The mean of ``xs`` (``None`` when empty)."""
    return float(sum(xs) / len(xs)) if xs else None


def argmax_at_answers(
    model,
    tokenizer,
    pairs: Sequence[Tuple[str, str]],
    batch_size: int,
    names: Optional[Sequence[str]] = None,
    chat_template: bool = False,
) -> List[Tuple[List[int], List[int]]]:
    """For each (prompt, answer): (predicted ids, label ids) at the answer tokens.
    ``names``: what to call each pair in an error (default ``pairs[i]``)."""
    toks = _tokenized(tokenizer, pairs, context_length(model), names, chat_template)
    return predictions_at_labels(model, toks, batch_size)


def _tokenized(tokenizer, pairs, limit, names, chat_template) -> List[TokenizedRequest]:
    """The (prompt, answer) pairs tokenised as for editing (``names`` in errors)."""
    return [
        tokenize_pair(
            tokenizer,
            p,
            a,
            limit,
            where=names[i] if names is not None else f"pairs[{i}]",
            chat_template=chat_template,
        )
        for i, (p, a) in enumerate(pairs)
    ]


@torch.no_grad()
def predictions_at_labels(
    model, toks: Sequence[TokenizedRequest], batch_size: int = 16
) -> List[Tuple[List[int], List[int]]]:
    """For each tokenised request: (argmax ids, label ids) at its labelled positions, with
    teacher forcing, in batches of similar length (or, inside an active
    :class:`~.resumed.ResumedPasses` of the model, from its lowest edited block up)."""
    passes = active_for(model)
    if passes is not None:  # sequences seen before: from the lowest edited block up
        return passes.predictions(toks, batch_size)
    device = _device(model)
    out: List[Optional[Tuple[List[int], List[int]]]] = [None] * len(toks)
    order = sorted(range(len(toks)), key=lambda i: -len(toks[i].input_ids))
    weights = model_locks(model).weights
    progress = bar(len(order), "scoring (teacher forced)")
    with preserved_model_state(model):
        model.eval()
        for s in range(0, len(order), batch_size):
            progress.update(len(order[s : s + batch_size]))
            idx = order[s : s + batch_size]
            batch = pad_batch([toks[i] for i in idx], idx).to(device)
            mask = batch.labels != IGNORE
            with weights.reading():  # a concurrent turn is seen whole or not at all
                pred = answer_logits(model, batch.input_ids, batch.attention_mask, mask).argmax(-1)
            counts = mask.sum(dim=1).tolist()
            preds = pred.tolist()
            labels = batch.labels[mask].tolist()
            start = 0
            for i, c in zip(idx, counts):  # rows of the mask are row-major
                out[i] = (preds[start : start + c], labels[start : start + c])
                start += c
    progress.close()
    return out  # type: ignore[return-value]


def argmax_with_next(
    model,
    tokenizer,
    pairs: Sequence[Tuple[str, str]],
    batch_size: int,
    names: Optional[Sequence[str]] = None,
    chat_template: bool = False,
) -> List[Tuple[List[int], List[int], Optional[int]]]:
    """:func:`argmax_at_answers`, and the argmax after the whole answer too: for each
    (prompt, answer), ``(predicted ids, label ids, next)``, from one pass over
    ``prompt ++ answer`` (``next``: ``None`` where that is longer than the context). The
    answer's predictions are the ones :func:`argmax_at_answers` gives (the extra position
    comes after them, and causal attention does not look ahead)."""
    limit = context_length(model)
    toks, probe = [], []
    for t in _tokenized(tokenizer, pairs, limit, names, chat_template):
        probe.append(limit is None or len(t.input_ids) < limit)
        if probe[-1]:
            t = TokenizedRequest(t.input_ids + t.labels[-1:], t.labels + [0])
        toks.append(t)
    out = []
    for (pred, label), e in zip(predictions_at_labels(model, toks, batch_size), probe):
        out.append((pred[:-1], label[:-1], pred[-1]) if e else (pred, label, None))
    return out
