"""Scoring edits: teacher-forced token accuracy as the UltraEdit reference scores it
(``docs/algorithm.md`` section 7), and beside it what the model generates on its own
(:mod:`ultraedit_fast.scoring.generation`).

Teacher forced: the fraction of answer tokens where ``argmax(logits) == label``, with
prompts and answers tokenised as for editing, averaged over requests.

- ``ES`` (efficacy): edit prompt, edit target.
- ``GS`` (generalisation): the paraphrase, edit target.
- ``LS`` (specificity): the locality prompt, its dataset answer.
- ``LS_unedited`` (stricter, as MEMIT/EasyEdit): the locality prompt, agreement with
  the unedited model's own predictions, when a baseline captured before editing is given.

Generation based (``generation=True``, the default): ``ES_gen``, ``GS_gen``, ``LS_gen``,
``LS_gen_unedited``, ``fluency``, ``drift_kl``, ``drift_top1`` (defined in
:mod:`ultraedit_fast.scoring.generation`). Their baseline parts come from :func:`capture_baseline`.

Scores are fractions in [0, 1] (``fluency``: bits; ``drift_kl``: nats); ``None`` when no
request has the needed field or no baseline was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import generation as G
from .health import HealthBaseline, capture_health, measure_health
from ..parallel.concurrency import model_locks
from ..utils.display import bar
from ..model.forward import answer_logits, preserved_model_state
from ..model.requests import (
    IGNORE,
    TokenizedRequest,
    as_requests,
    context_length,
    pad_batch,
    tokenize_pair,
)


def _device(model):
    return model.get_input_embeddings().weight.device


def _argmax_at_answers(
    model,
    tokenizer,
    pairs: Sequence[Tuple[str, str]],
    batch_size: int,
    names: Optional[Sequence[str]] = None,
    chat_template: bool = False,
) -> List[Tuple[List[int], List[int]]]:
    """For each (prompt, answer): (predicted ids, label ids) at the answer tokens.
    ``names``: what to call each pair in an error (default ``pairs[i]``)."""
    limit = context_length(model)
    toks = [
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
    return predictions_at_labels(model, toks, batch_size)


@torch.no_grad()
def predictions_at_labels(
    model, toks: Sequence[TokenizedRequest], batch_size: int = 16
) -> List[Tuple[List[int], List[int]]]:
    """For each tokenised request: (argmax ids, label ids) at its labelled positions, with
    teacher forcing, in batches of similar length."""
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


def mean(xs: Sequence[float]) -> Optional[float]:
    """The mean of ``xs`` (``None`` when empty)."""
    return float(sum(xs) / len(xs)) if xs else None


def token_accuracy(
    model,
    tokenizer,
    pairs: Sequence[Tuple[str, str]],
    batch_size: int = 16,
    names: Optional[Sequence[str]] = None,
    chat_template: bool = False,
) -> List[float]:
    """Per pair, the fraction of answer tokens predicted exactly (teacher forced)."""
    res = _argmax_at_answers(model, tokenizer, pairs, batch_size, names, chat_template)
    return [sum(p == l for p, l in zip(pr, lb)) / len(lb) for pr, lb in res]


def capture_predictions(
    model, tokenizer, requests, batch_size: int = 16, chat_template: bool = False
) -> List[Optional[List[int]]]:
    """The model's own argmax predictions at the locality answer tokens of each request
    (``None`` where a request has no locality prompt). Call before editing, pass the
    result to :func:`evaluate` as ``base`` (or use :func:`capture_baseline`,
    which also captures what the generation-based scores need)."""
    requests = as_requests(requests)
    idx = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    res = _argmax_at_answers(
        model,
        tokenizer,
        [(requests[i].locality_prompt, requests[i].locality_answer) for i in idx],
        batch_size,
        [f"requests[{i}] (locality_prompt)" for i in idx],
        chat_template,
    )
    out: List[Optional[List[int]]] = [None] * len(requests)
    for i, (pred, _) in zip(idx, res):
        out[i] = pred
    return out


@dataclass
class Baseline:
    """The unedited model's answers, captured before editing with :func:`capture_baseline`:
    its teacher-forced locality predictions (for ``LS_unedited``) and, with ``generation``,
    its greedy locality continuations and next-token distributions (for
    ``LS_gen_unedited`` and the drift) and, with ``health``, the unedited side of the health
    figures (:mod:`ultraedit_fast.scoring.health`)."""

    predictions: List[Optional[List[int]]]
    generation: Optional[G.GenerationBaseline] = None
    health: Optional[HealthBaseline] = None

    def __len__(self) -> int:
        return len(self.predictions)

    def subset(self, idx: Sequence[int]) -> "Baseline":
        """The baseline of ``[requests[i] for i in idx]`` (the drift prompts are kept)."""
        gen = self.generation
        if gen is not None:
            gen = G.GenerationBaseline(
                [gen.locality[i] for i in idx], gen.drift_prompts, gen.drift_logprobs
            )
        return Baseline([self.predictions[i] for i in idx], gen, self.health)


def capture_baseline(
    model,
    tokenizer,
    requests,
    *,
    generation: bool = True,
    batch_size: int = 32,
    chat_template: bool = False,
    drift_prompts: Optional[Sequence[str]] = None,
    health: Union[bool, str, None] = None,
) -> Baseline:
    """What the unedited model answers on ``requests``; call before editing and pass it to
    :func:`evaluate` as ``base``. ``drift_prompts``: the unrelated prompts of the drift
    score (default: a fixed sample of the requests' locality prompts). ``health``: also
    capture the unedited side of the health figures, on the general text of the file it
    names (``True``: the package's sample); :func:`evaluate` then reports them."""
    requests = as_requests(requests)
    hb = None
    if health is not None and health is not False:
        hb = capture_health(model, tokenizer, None if health is True else health)
    preds = capture_predictions(model, tokenizer, requests, batch_size, chat_template)
    if not generation:
        return Baseline(preds, None, hb)
    li = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    texts = G.continuations(
        model,
        tokenizer,
        [requests[i].locality_prompt for i in li],
        [requests[i].locality_answer for i in li],
        2 * batch_size,
        chat_template,
    )
    loc: List[Optional[str]] = [None] * len(requests)
    for i, t in zip(li, texts):
        loc[i] = t
    prompts = list(drift_prompts) if drift_prompts is not None else G.drift_sample(requests)
    lp = (
        G.next_token_logprobs(model, tokenizer, prompts, 2 * batch_size, chat_template)
        if prompts
        else None
    )
    return Baseline(preds, G.GenerationBaseline(loc, prompts, lp), hb)


def _generation_scores(
    model, tokenizer, requests, base: Optional[Baseline], batch_size, chat_template, rows
) -> Dict[str, object]:
    n = len(requests)
    gi = [i for i, r in enumerate(requests) if r.rephrase is not None]
    li = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    prompts = (
        [r.prompt for r in requests]
        + [requests[i].rephrase for i in gi]
        + [requests[i].locality_prompt for i in li]
    )
    answers = (
        [r.target for r in requests]
        + [requests[i].target for i in gi]
        + [requests[i].locality_answer for i in li]
    )
    gen_batch = 2 * batch_size  # one token a step: larger batches keep the matmuls busy
    texts = G.continuations(model, tokenizer, prompts, answers, gen_batch, chat_template)
    es = [float(G.starts_with_answer(t, a)) for t, a in zip(texts[:n], answers[:n])]
    gs = [
        float(G.starts_with_answer(t, a))
        for t, a in zip(texts[n : n + len(gi)], answers[n : n + len(gi)])
    ]
    loc = texts[n + len(gi) :]
    ls = [float(G.starts_with_answer(t, requests[i].locality_answer)) for i, t in zip(li, loc)]
    out: Dict[str, object] = {
        "ES_gen": mean(es),
        "GS_gen": mean(gs),
        "LS_gen": mean(ls),
        "LS_gen_unedited": None,
        "drift_kl": None,
        "drift_top1": None,
    }
    gen = base.generation if base is not None else None
    ls_u: List[float] = []
    if gen is not None:
        ls_u, unedited = _scores_against_unedited(
            model, tokenizer, gen, li, loc, gen_batch, chat_template
        )
        out.update(unedited)
    out["fluency"] = G.fluency(
        model,
        tokenizer,
        G.spread([r.prompt for r in requests], G.FLUENCY_PROMPTS),
        batch_size=gen_batch,
        chat_template=chat_template,
    )
    if rows is not None:
        _put(rows, range(n), "ES_gen", es)
        _put(rows, range(n), "ES_gen_text", texts[:n])
        _put(rows, gi, "GS_gen", gs)
        _put(rows, li, "LS_gen", ls)
        _put(rows, li, "LS_gen_unedited", ls_u)
    return out


def _scores_against_unedited(
    model,
    tokenizer,
    gen: G.GenerationBaseline,
    li: Sequence[int],
    loc: Sequence[str],
    gen_batch: int,
    chat_template: bool,
) -> Tuple[List[float], Dict[str, object]]:
    """Each locality continuation ``loc`` (of the requests ``li``) against the unedited
    model's, and the drift of the next-token distributions on the baseline's drift prompts:
    ``(per-request agreement, {"LS_gen_unedited", and "drift_kl"/"drift_top1" when the
    baseline has drift prompts})``."""
    ls_u: List[float] = []
    for i, t in zip(li, loc):
        b = gen.locality[i]
        if b is None:
            raise ValueError(
                f"base: no unedited continuation for request {i}'s locality "
                "prompt; capture the baseline on the same requests"
            )
        ls_u.append(float(G.normalize_text(t) == G.normalize_text(b)))
    out: Dict[str, object] = {"LS_gen_unedited": mean(ls_u)}
    if gen.drift_prompts and gen.drift_logprobs is not None:
        out.update(
            G.drift(
                gen.drift_logprobs,
                G.next_token_logprobs(
                    model, tokenizer, gen.drift_prompts, gen_batch, chat_template
                ),
            )
        )
    return ls_u, out


def _put(rows: List[dict], idx, key: str, values) -> None:
    """``rows[i][key] = v`` for the requests ``idx`` and their ``values``."""
    for i, v in zip(idx, values):
        rows[i][key] = v


def evaluate(
    model,
    tokenizer,
    requests,
    *,
    base=None,
    generation: bool = True,
    batch_size: int = 32,
    chat_template: bool = False,
    per_request: bool = False,
) -> Dict[str, object]:
    """Teacher-forced and generation-based scores of ``model`` on ``requests``.

    ``base``: a :class:`Baseline` (:func:`capture_baseline`, before editing) for the scores
    against the unedited model (``LS_unedited``, ``LS_gen_unedited``, the drift), or its
    teacher-forced part alone (a :func:`capture_predictions` result: ``LS_unedited`` only).
    ``generation=False`` skips the generation-based scores (they decode, and cost more).
    ``chat_template``: wrap every prompt in the tokenizer's chat template.

    Returns ``{"ES", "GS", "LS", "LS_unedited", "n"}`` and, with ``generation``, ``ES_gen``,
    ``GS_gen``, ``LS_gen``, ``LS_gen_unedited``, ``fluency``, ``drift_kl``, ``drift_top1``
    (``None`` where not measurable), the health figures ``health_ppl_ratio``,
    ``health_top1``, ``health_unrelated_kept`` when ``base`` carries their unedited side,
    plus ``"per_request"`` (a list of dicts) when asked.
    """
    requests = as_requests(requests)
    base, base_predictions = _resolve_base(base, len(requests))
    out, rows = _teacher_forced_scores(
        model, tokenizer, requests, base_predictions, batch_size, chat_template, per_request
    )
    if generation:
        out.update(
            _generation_scores(model, tokenizer, requests, base, batch_size, chat_template, rows)
        )
    if base is not None and base.health is not None:
        out.update(measure_health(model, tokenizer, base.health))
    if per_request:
        out["per_request"] = rows
    return out


def _resolve_base(base, n: int) -> Tuple[Optional[Baseline], Optional[List[Optional[List[int]]]]]:
    """``(baseline, its teacher-forced predictions)`` from :func:`evaluate`'s ``base`` (a
    :class:`Baseline`, or a :func:`capture_predictions` result), checked against the ``n``
    requests."""
    base_predictions = None
    if isinstance(base, list):  # a capture_predictions() result: the teacher-forced part
        base_predictions, base = base, None
    if base is not None and not isinstance(base, Baseline):
        raise TypeError(
            f"base: expected a Baseline from capture_baseline(), got {type(base).__name__}"
        )
    if base is not None:
        base_predictions = base.predictions
    if base_predictions is not None and len(base_predictions) != n:
        raise ValueError(
            f"base: expected {n} entries (one per request), got {len(base_predictions)}"
        )
    return base, base_predictions


def _teacher_forced_scores(
    model, tokenizer, requests, base_predictions, batch_size, chat_template, per_request
) -> Tuple[Dict[str, object], Optional[List[dict]]]:
    """``ES``, ``GS``, ``LS``, ``LS_unedited`` and ``n``, and the per-request rows (``None``
    unless ``per_request``)."""
    kw = dict(batch_size=batch_size, chat_template=chat_template)
    es = token_accuracy(
        model,
        tokenizer,
        [(r.prompt, r.target) for r in requests],
        names=[f"requests[{i}] (prompt)" for i in range(len(requests))],
        **kw,
    )
    gi = [i for i, r in enumerate(requests) if r.rephrase is not None]
    gs = token_accuracy(
        model,
        tokenizer,
        [(requests[i].rephrase, requests[i].target) for i in gi],
        names=[f"requests[{i}] (rephrase)" for i in gi],
        **kw,
    )
    li = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    loc = _argmax_at_answers(
        model,
        tokenizer,
        [(requests[i].locality_prompt, requests[i].locality_answer) for i in li],
        batch_size,
        [f"requests[{i}] (locality_prompt)" for i in li],
        chat_template,
    )
    ls = [sum(p == l for p, l in zip(pr, lb)) / len(lb) for pr, lb in loc]
    ls_u = (
        _unedited_agreement(li, [pr for pr, _ in loc], base_predictions)
        if base_predictions is not None
        else []
    )
    out: Dict[str, object] = {
        "ES": mean(es),
        "GS": mean(gs),
        "LS": mean(ls),
        "LS_unedited": mean(ls_u),
        "n": len(requests),
    }
    rows = None
    if per_request:
        rows = [{"ES": e} for e in es]
        _put(rows, gi, "GS", gs)
        _put(rows, li, "LS", ls)
        _put(rows, li, "LS_unedited", ls_u)
    return out, rows


def _unedited_agreement(
    li: Sequence[int], preds: Sequence[List[int]], base_predictions: Sequence[Optional[List[int]]]
) -> List[float]:
    """Per locality prompt ``li[k]``, the share of its answer tokens where the model predicts
    what the unedited model did (``LS_unedited``)."""
    ls_u: List[float] = []
    for i, pr in zip(li, preds):
        b = base_predictions[i]
        if b is None or len(b) != len(pr):
            raise ValueError(
                f"base[{i}]: does not match request {i}'s "
                "locality prompt; capture it with capture_predictions() on "
                "the same requests"
            )
        ls_u.append(sum(p == q for p, q in zip(pr, b)) / len(pr))
    return ls_u
