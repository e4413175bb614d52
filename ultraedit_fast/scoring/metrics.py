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

from . import generation as G
from .generated import capture_generation, generation_scores
from .health import HealthBaseline, capture_health, measure_health
from .teacher import argmax_at_answers as _argmax_at_answers
from .teacher import argmax_with_next
from .teacher import mean, predictions_at_labels
from ..model.requests import as_requests

__all__ = [
    "Baseline",
    "capture_baseline",
    "capture_predictions",
    "evaluate",
    "mean",
    "predictions_at_labels",
    "token_accuracy",
]


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
    # the pass evaluate() runs on the locality prompts (with the position after the answer):
    # an unchanged model's later evaluation finds it kept (scoring.resumed)
    res = argmax_with_next(
        model,
        tokenizer,
        [(requests[i].locality_prompt, requests[i].locality_answer) for i in idx],
        batch_size,
        [f"requests[{i}] (locality_prompt)" for i in idx],
        chat_template,
    )
    out: List[Optional[List[int]]] = [None] * len(requests)
    for i, (pred, _, _) in zip(idx, res):
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
            ids = gen.locality_ids
            gen = G.GenerationBaseline(
                [gen.locality[i] for i in idx],
                gen.drift_prompts,
                gen.drift_logprobs,
                None if ids is None else [ids[i] for i in idx],
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
    gen = capture_generation(
        model, tokenizer, requests, preds, batch_size, chat_template, drift_prompts
    )
    return Baseline(preds, gen, hb)


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
    out, rows, tf = _teacher_forced_scores(
        model, tokenizer, requests, base_predictions, batch_size, chat_template, per_request
    )
    if generation:
        gen = base.generation if base is not None else None
        out.update(
            generation_scores(model, tokenizer, requests, gen, tf, batch_size, chat_template, rows)
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
) -> Tuple[Dict[str, object], Optional[List[dict]], tuple]:
    """``ES``, ``GS``, ``LS``, ``LS_unedited`` and ``n``, the per-request rows (``None``
    unless ``per_request``), and the (argmax, answer ids, the argmax after the whole answer)
    of the edit prompts, paraphrases and locality prompts they come from (the generated
    scores reuse them; :func:`.teacher.argmax_with_next`: the same pass as
    :func:`capture_predictions`', so a kept one serves both, :mod:`.resumed`)."""
    gi = [i for i, r in enumerate(requests) if r.rephrase is not None]
    li = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    tf = tuple(
        argmax_with_next(
            model,
            tokenizer,
            [(getattr(requests[i], field), getattr(requests[i], answer)) for i in idx],
            batch_size,
            [f"requests[{i}] ({field})" for i in idx],
            chat_template,
        )
        for field, answer, idx in (
            ("prompt", "target", range(len(requests))),
            ("rephrase", "target", gi),
            ("locality_prompt", "locality_answer", li),
        )
    )
    es, gs, ls = ([sum(p == q for p, q in zip(t[0], t[1])) / len(t[1]) for t in res] for res in tf)
    ls_u = (
        _unedited_agreement(li, [t[0] for t in tf[2]], base_predictions)
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
    return out, rows, tf


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
