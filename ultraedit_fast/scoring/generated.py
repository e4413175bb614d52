"""The generated scores of :func:`~ultraedit_fast.scoring.metrics.evaluate` (``ES_gen``,
``GS_gen``, ``LS_gen``, ``LS_gen_unedited``, the drift, the fluency; defined in
:mod:`.generation`) and the unedited side they compare with, computed with the least model
work that gives the numbers of full greedy decoding (:mod:`.shortcuts`):

- ``ES_gen`` / ``GS_gen`` / ``LS_gen``: the known first tokens of each continuation come
  from the teacher-forced pass of ``ES`` / ``GS`` / ``LS`` (already run, with the position
  after the answer added); where they settle the answer no decoding happens (an edit that
  took: the answer's tokens and the one after; a prompt whose first token leaves the
  answer); the rest decode from there until settled.
- ``LS_gen_unedited``: the baseline keeps the unedited continuation's token ids; one
  teacher-forced pass over ``locality prompt ++ those ids`` (and the position after them,
  where the unedited model stopped at an end-of-text token) shows whether the edited model
  reproduces them token for token (then the continuation is known whole, and ``LS_gen``
  with it); only the others decode, until settled.
- ``ES_gen_text`` (``per_request``): the edit prompts' continuations decode to the end.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from . import generation as G
from . import shortcuts as S
from .teacher import mean
from ..model.requests import prompt_ids

# (teacher-forced argmax, answer ids[, the argmax after the whole answer or None])
Pairs = Sequence[tuple]


def generation_scores(
    model, tokenizer, requests, gen, tf: Tuple[Pairs, Pairs, Pairs], batch_size, chat, rows
) -> Dict[str, object]:
    """The generated scores of ``requests`` against the unedited model's ``gen`` (a
    :class:`~.generation.GenerationBaseline` or ``None``), given ``tf``: the teacher-forced
    (argmax, answer ids) of the edit prompts, the paraphrases, the locality prompts."""
    n = len(requests)
    gi = [i for i, r in enumerate(requests) if r.rephrase is not None]
    li = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    if gen is not None:
        for i in li:
            if gen.locality[i] is None:
                raise ValueError(
                    f"base: no unedited continuation for request {i}'s locality "
                    "prompt; capture the baseline on the same requests"
                )
    gen_batch = 2 * batch_size  # one token a step: larger batches keep the matmuls busy
    how = _by_full_decoding if S._EXACT_DECODE else _by_shortcuts
    es, gs, ls, ls_u, es_text = how(
        model, tokenizer, requests, gi, li, gen, tf, gen_batch, chat, rows is not None
    )
    out: Dict[str, object] = {
        "ES_gen": mean(es),
        "GS_gen": mean(gs),
        "LS_gen": mean(ls),
        "LS_gen_unedited": mean(ls_u) if gen is not None else None,
        "drift_kl": None,
        "drift_top1": None,
    }
    if gen is not None and gen.drift_prompts and gen.drift_logprobs is not None:
        edited = G.next_token_logprobs(model, tokenizer, gen.drift_prompts, gen_batch, chat)
        out.update(G.drift(gen.drift_logprobs, edited))
    out["fluency"] = G.fluency(
        model,
        tokenizer,
        G.spread([r.prompt for r in requests], G.FLUENCY_PROMPTS),
        batch_size=gen_batch,
        chat_template=chat,
    )
    if rows is not None:
        for key, idx, vals in (
            ("ES_gen", range(n), es),
            ("ES_gen_text", range(n), es_text),
            ("GS_gen", gi, gs),
            ("LS_gen", li, ls),
            ("LS_gen_unedited", li, ls_u),
        ):
            for i, v in zip(idx, vals):
                rows[i][key] = v
    return out


def _by_full_decoding(model, tokenizer, requests, gi, li, gen, tf, gen_batch, chat, texts):
    """The scores the original way: every continuation decoded in full (the reference the
    shortcuts are tested against)."""
    n = len(requests)
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
    conts = G.continuations(model, tokenizer, prompts, answers, gen_batch, chat)
    hits = [float(G.starts_with_answer(t, a)) for t, a in zip(conts, answers)]
    loc = conts[n + len(gi) :]
    ls_u = []
    if gen is not None:
        ls_u = [
            float(G.normalize_text(t) == G.normalize_text(gen.locality[i])) for i, t in zip(li, loc)
        ]
    return hits[:n], hits[n : n + len(gi)], hits[n + len(gi) :], ls_u, conts[:n]


def _by_shortcuts(model, tokenizer, requests, gi, li, gen, tf, gen_batch, chat, texts):
    """The same scores from the teacher-forced passes, decoding only what they leave open."""
    es_tf, gs_tf, loc_tf = tf
    eos = G._eos_ids(tokenizer, model)
    es_rows = _rows(
        model,
        tokenizer,
        [(r.prompt, r.target) for r in requests],
        es_tf,
        eos,
        chat,
        [[("starts", r.target)] + ([("text", None)] if texts else []) for r in requests],
    )
    gs_rows = _rows(
        model,
        tokenizer,
        [(requests[i].rephrase, requests[i].target) for i in gi],
        gs_tf,
        eos,
        chat,
        [[("starts", requests[i].target)] for i in gi],
    )
    loc_checks = [
        [("starts", requests[i].locality_answer)]
        + ([("same", G.normalize_text(gen.locality[i]))] if gen is not None else [])
        for i in li
    ]
    loc_rows = _rows(
        model,
        tokenizer,
        [(requests[i].locality_prompt, requests[i].locality_answer) for i in li],
        loc_tf,
        eos,
        chat,
        loc_checks,
    )
    if gen is not None and gen.locality_ids is not None:
        S.known_from(model, loc_rows, [gen.locality_ids[i] for i in li], eos, gen_batch)
    S.settle(model, tokenizer, es_rows + gs_rows + loc_rows, gen_batch)
    return (
        [r.answers[0] for r in es_rows],
        [r.answers[0] for r in gs_rows],
        [r.answers[0] for r in loc_rows],
        [r.answers[1] for r in loc_rows] if gen is not None else [],
        [r.answers[1] for r in es_rows] if texts else [],
    )


def _rows(model, tokenizer, pairs, tf: Pairs, eos, chat, checks) -> List[S.Pending]:
    """One continuation per (prompt, answer), its first tokens known from the answer's
    teacher-forced argmax ``tf``."""
    out = []
    for (prompt, _), (pred, answer, *after), ch in zip(pairs, tf, checks):
        p = prompt_ids(tokenizer, prompt, chat)
        n = S.budget(model, p, len(answer) + G.EXTRA_TOKENS)
        if after and after[0] is not None:  # the argmax after the whole answer
            pred = list(pred) + [after[0]]
        out.append(S.Pending(p, n, ch).start(*S.known_prefix(answer, pred, n, eos)))
    return out


def capture_generation(
    model, tokenizer, requests, predictions, batch_size, chat, drift_prompts
) -> G.GenerationBaseline:
    """The unedited model's greedy continuations of the locality prompts (text and token
    ids) and its next-token distributions on the drift prompts; ``predictions``: its
    teacher-forced argmax at the locality answers (the continuations' first tokens)."""
    li = [i for i, r in enumerate(requests) if r.locality_prompt is not None]
    pairs = [(requests[i].locality_prompt, requests[i].locality_answer) for i in li]
    ids: List[Optional[List[int]]] = [None] * len(requests)
    if S._EXACT_DECODE:
        prompts = [prompt_ids(tokenizer, p, chat) for p, _ in pairs]
        budgets = [len(_answer_ids(tokenizer, a)) + G.EXTRA_TOKENS for _, a in pairs]
        conts = G.greedy_decode(model, tokenizer, prompts, budgets, 2 * batch_size)
    else:
        tf = [(predictions[i], _answer_ids(tokenizer, a)) for i, (_, a) in zip(li, pairs)]
        eos = G._eos_ids(tokenizer, model)
        rows = _rows(model, tokenizer, pairs, tf, eos, chat, [[("ids", None)]] * len(li))
        S.settle(model, tokenizer, rows, 2 * batch_size)
        conts = [r.answers[0] for r in rows]
    for i, c in zip(li, conts):
        ids[i] = list(c)
    loc = [None if c is None else tokenizer.decode(c, skip_special_tokens=True) for c in ids]
    prompts = list(drift_prompts) if drift_prompts is not None else G.drift_sample(requests)
    lp = G.next_token_logprobs(model, tokenizer, prompts, 2 * batch_size, chat) if prompts else None
    return G.GenerationBaseline(loc, prompts, lp, ids)


def _answer_ids(tokenizer, answer: str) -> List[int]:
    return list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
