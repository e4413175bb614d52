"""Scoring edits as the UltraEdit reference does (``docs/algorithm.md`` section 7).

Every score is teacher-forced token accuracy: the fraction of answer tokens where
``argmax(logits) == label``, with prompts and answers tokenised as for editing,
averaged over requests.

- ``ES`` (efficacy): edit prompt, edit target.
- ``GS`` (generalisation): the paraphrase, edit target.
- ``LS`` (specificity): the locality prompt, its dataset answer.
- ``LS_unedited`` (stricter, as MEMIT/EasyEdit): the locality prompt, agreement with
  the unedited model's own predictions, when ``base_predictions`` from
  :func:`capture_predictions` (taken before editing) are given.

Scores are fractions in [0, 1]; ``None`` when no request has the needed field.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .concurrency import model_locks
from .forward import answer_logits, preserved_model_state
from .requests import IGNORE, as_requests, context_length, pad_batch, tokenize_pair


def _device(model):
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def _argmax_at_answers(model, tokenizer, pairs: Sequence[Tuple[str, str]],
                       batch_size: int, names: Optional[Sequence[str]] = None
                       ) -> List[Tuple[List[int], List[int]]]:
    """For each (prompt, answer): (predicted ids, label ids) at the answer tokens.
    ``names``: what to call each pair in an error (default ``pairs[i]``)."""
    device = _device(model)
    limit = context_length(model)
    toks = [tokenize_pair(tokenizer, p, a, limit,
                          where=names[i] if names is not None else f"pairs[{i}]")
            for i, (p, a) in enumerate(pairs)]
    out: List[Optional[Tuple[List[int], List[int]]]] = [None] * len(toks)
    order = sorted(range(len(toks)), key=lambda i: -len(toks[i].input_ids))
    weights = model_locks(model).weights
    with preserved_model_state(model):
        model.eval()
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = pad_batch([toks[i] for i in idx], idx).to(device)
            mask = batch.labels != IGNORE
            with weights.reading():  # a concurrent turn is seen whole or not at all
                pred = answer_logits(model, batch.input_ids, batch.attention_mask,
                                     mask).argmax(-1)
            counts = mask.sum(dim=1).tolist()
            preds = pred.tolist()
            labels = batch.labels[mask].tolist()
            start = 0
            for i, c in zip(idx, counts):  # rows of the mask are row-major
                out[i] = (preds[start:start + c], labels[start:start + c])
                start += c
    return out  # type: ignore[return-value]


def mean(xs: Sequence[float]) -> Optional[float]:
    """The mean of ``xs`` (``None`` when empty)."""
    return float(sum(xs) / len(xs)) if xs else None


def token_accuracy(model, tokenizer, pairs: Sequence[Tuple[str, str]],
                   batch_size: int = 16, names: Optional[Sequence[str]] = None) -> List[float]:
    """Per pair, the fraction of answer tokens predicted exactly (teacher forced)."""
    res = _argmax_at_answers(model, tokenizer, pairs, batch_size, names)
    return [sum(p == l for p, l in zip(pr, lb)) / len(lb) for pr, lb in res]


def capture_predictions(model, tokenizer, requests, batch_size: int = 16
                        ) -> List[Optional[List[int]]]:
    """The model's own argmax predictions at the locality answer tokens of each request
    (``None`` where a request has no locality prompt). Call before editing, pass the
    result to :func:`evaluate` as ``base_predictions``."""
    requests = as_requests(requests)
    idx = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    res = _argmax_at_answers(model, tokenizer,
                             [(requests[i].locality_prompt, requests[i].locality_answer)
                              for i in idx], batch_size,
                             [f"requests[{i}] (locality_prompt)" for i in idx])
    out: List[Optional[List[int]]] = [None] * len(requests)
    for i, (pred, _) in zip(idx, res):
        out[i] = pred
    return out


def evaluate(model, tokenizer, requests, *, base_predictions=None, batch_size: int = 16,
             per_request: bool = False) -> Dict[str, object]:
    """ES, GS, LS (and ``LS_unedited`` given ``base_predictions``) of ``model`` on ``requests``.

    Returns ``{"ES", "GS", "LS", "LS_unedited", "n"}`` (fractions in [0, 1] or ``None``), plus
    ``"per_request"`` (a list of dicts) when asked.
    """
    requests = as_requests(requests)
    if base_predictions is not None and len(base_predictions) != len(requests):
        raise ValueError(f"base_predictions: expected {len(requests)} entries (one per request), "
                         f"got {len(base_predictions)}")
    es = token_accuracy(model, tokenizer, [(r.prompt, r.target) for r in requests], batch_size,
                        [f"requests[{i}] (prompt)" for i in range(len(requests))])
    gi = [i for i, r in enumerate(requests) if r.rephrase is not None]
    gs = token_accuracy(model, tokenizer, [(requests[i].rephrase, requests[i].target)
                                           for i in gi], batch_size,
                        [f"requests[{i}] (rephrase)" for i in gi])
    li = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    loc = _argmax_at_answers(model, tokenizer, [(requests[i].locality_prompt,
                                                 requests[i].locality_answer) for i in li],
                             batch_size, [f"requests[{i}] (locality_prompt)" for i in li])
    ls = [sum(p == l for p, l in zip(pr, lb)) / len(lb) for pr, lb in loc]
    ls_u: List[float] = []
    if base_predictions is not None:
        for i, (pr, _) in zip(li, loc):
            base = base_predictions[i]
            if base is None or len(base) != len(pr):
                raise ValueError(f"base_predictions[{i}]: does not match request {i}'s "
                                 "locality prompt; capture it with capture_predictions() on "
                                 "the same requests")
            ls_u.append(sum(p == b for p, b in zip(pr, base)) / len(pr))
    out: Dict[str, object] = {"ES": mean(es), "GS": mean(gs), "LS": mean(ls),
                              "LS_unedited": mean(ls_u), "n": len(requests)}
    if per_request:
        rows = [{"ES": e} for e in es]
        for i, v in zip(gi, gs):
            rows[i]["GS"] = v
        for i, v in zip(li, ls):
            rows[i]["LS"] = v
        for i, v in zip(li, ls_u):
            rows[i]["LS_unedited"] = v
        out["per_request"] = rows
    return out
