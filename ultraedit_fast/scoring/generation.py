"""Scores from what the model says, not what it is handed: greedy decoding from the prompt
alone (no answer tokens given), the fluency of free text, and the drift of next-token
distributions on unrelated prompts.

Teacher forcing hands the model the answer's content and length, and can call an edit a
success that the model never produces on its own; these scores ask the model to answer.

- ``ES_gen`` / ``GS_gen``: greedy decoding from the edit prompt / the paraphrase of up to
  ``len(target tokens) + 3`` new tokens; a success when the continuation, lowercased, with
  punctuation removed and whitespace collapsed, starts with the target normalised the same
  way (:func:`normalize_text`).
- ``LS_gen``: the same on the locality prompt against its dataset answer; ``LS_gen_unedited``:
  whether the locality prompt's greedy continuation is the unedited model's (captured
  before editing with :func:`capture_generation_baseline`).
- ``fluency``: the n-gram entropy of free greedy generations from the edit prompts (bigrams
  and trigrams, weighted 2/3 and 4/3, in bits, averaged: the measure EasyEdit and ROME
  report), on a fixed sample of prompts.
- ``drift_kl`` / ``drift_top1``: on prompts unrelated to the edits (the locality prompts, a
  fixed sample), the mean KL divergence ``KL(unedited || edited)`` of the next-token
  distribution and the share of prompts whose most likely next token is unchanged.

Decoding is batched with a KV cache, prompts left-padded (positions counted from each
prompt's first real token), and checked against one-prompt-at-a-time decoding in the tests.
:func:`~ultraedit_fast.scoring.metrics.evaluate` gets the same scores with far less of it:
teacher-forced passes show most continuations' first tokens, and a row decodes only until
its score is settled (:mod:`.shortcuts`, :mod:`.generated`).
"""

from __future__ import annotations

import inspect
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..parallel.concurrency import model_locks
from ..utils.display import bar
from ..model.forward import preserved_model_state
from ..model.requests import context_length, prompt_ids
from .resumed import active_for

EXTRA_TOKENS = 3  # new tokens beyond the target's length
FLUENCY_PROMPTS = 32
FLUENCY_TOKENS = 48
DRIFT_PROMPTS = 200

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed (every Unicode punctuation or symbol character, as
    SQuAD-style answer normalisation removes it), whitespace collapsed to single spaces,
    stripped."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if unicodedata.category(c)[0] not in "PS")
    return _WS.sub(" ", text).strip()


def starts_with_answer(continuation: str, answer: str) -> bool:
    """Whether ``continuation`` begins with ``answer`` once both are normalised (a plain
    prefix test: the rule EasyEdit-style generation scores use)."""
    c, a = normalize_text(continuation), normalize_text(answer)
    if not a:  # an answer of punctuation only: compare as given
        return continuation.strip().startswith(answer.strip())
    return c.startswith(a)


def _device(model):
    return model.get_input_embeddings().weight.device


def _eos_ids(tokenizer, model) -> set:
    ids = set()
    for v in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def _forward_params(model) -> set:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return set()


def _last_logits(model, cache=None, **kw) -> tuple:
    """The logits at the last position (float32) and the KV cache, for the transformers
    version at hand (the cache argument was ``past_key_values`` before 5.x's ``cache``)."""
    params = _forward_params(model)
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    if cache is not None:
        kw["cache" if "cache" in params else "past_key_values"] = cache
    out = model(**kw, use_cache=True)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits[:, -1].float(), new_cache


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _left_padded(seqs: Sequence[Sequence[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token-id sequences, left-padded to the longest."""
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, T - len(x) :] = torch.tensor(list(x), dtype=torch.long)
        mask[r, T - len(x) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_decode(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    batch_size: int = 16,
    stop_at_eos: bool = True,
) -> List[List[int]]:
    """Greedy continuations (new token ids) of the token-id ``prompts``, each of at most
    ``max_new_tokens[i]`` tokens, stopping at an end-of-sequence token (not included), and
    never past the model's context: each budget is cut to what fits after its prompt (none
    for a prompt longer than the context).

    Prompts of similar length run together, left-padded, with a KV cache: one pass over the
    prompts, then one single-token pass per new token. A batch runs every row as long as its
    longest, so prompts too near the context's end for the longest budget run one by one."""
    if len(prompts) != len(max_new_tokens):
        raise ValueError("max_new_tokens: expected one count per prompt")
    ctx = context_length(model)
    if ctx is None:
        return _greedy(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_eos)
    budgets = [max(0, min(b, ctx - len(p) + 1)) for p, b in zip(prompts, max_new_tokens)]
    longest = max(budgets, default=0)
    roomy = [i for i, p in enumerate(prompts) if len(p) + longest - 1 <= ctx]
    out: List[List[int]] = [[] for _ in prompts]
    conts = _greedy(
        model,
        tokenizer,
        [prompts[i] for i in roomy],
        [budgets[i] for i in roomy],
        batch_size,
        stop_at_eos,
    )
    for i, c in zip(roomy, conts):
        out[i] = c
    for i in sorted(set(range(len(prompts))) - set(roomy)):
        if budgets[i] > 0:
            out[i] = _greedy(model, tokenizer, [prompts[i]], [budgets[i]], 1, stop_at_eos)[0]
    return out


def _greedy(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_eos):
    device = _device(model)
    pad = _pad_id(tokenizer)
    eos = _eos_ids(tokenizer, model) if stop_at_eos else set()
    out: List[List[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), max_new_tokens[i]))
    weights = model_locks(model).weights
    progress = bar(len(order), "scoring (greedy decoding)")
    with preserved_model_state(model):
        model.eval()
        for s in range(0, len(order), batch_size):
            progress.update(len(order[s : s + batch_size]))
            idx = [i for i in order[s : s + batch_size] if max_new_tokens[i] > 0]
            if not idx:
                continue
            ids, mask = _left_padded([prompts[i] for i in idx], pad)
            with weights.reading():  # one whole model for the whole continuation
                rows = _greedy_batch(
                    model, ids.to(device), mask.to(device), [max_new_tokens[i] for i in idx], eos
                )
            for i, row in zip(idx, rows):
                out[i] = row
    progress.close()
    return out


def _greedy_batch(
    model, ids: torch.Tensor, mask: torch.Tensor, limits: Sequence[int], eos: set
) -> List[List[int]]:
    """The greedy continuations of one left-padded batch: row ``r`` runs until an ``eos``
    token (not kept) or ``limits[r]`` new tokens; the batch stops when every row has."""
    device = ids.device
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    limit = torch.tensor(list(limits), device=device)
    done = torch.zeros(len(limits), dtype=torch.bool, device=device)
    new: List[torch.Tensor] = []
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device) if eos else None
    steps = int(limit.max())
    logits, cache = _last_logits(model, input_ids=ids, attention_mask=mask, position_ids=pos)
    for step in range(steps):
        nxt = logits.argmax(-1)
        if eos_t is not None:
            done |= torch.isin(nxt, eos_t)
        done |= limit <= step
        new.append(torch.where(done, torch.full_like(nxt, -1), nxt))  # -1: the row is done
        if step + 1 == steps or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        logits, cache = _last_logits(
            model, cache, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos
        )
    toks = torch.stack(new, 1).tolist() if new else [[] for _ in limits]
    return [row[: row.index(-1)] if -1 in row else row for row in toks]


def continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 16,
    chat_template: bool = False,
    extra: int = EXTRA_TOKENS,
) -> List[str]:
    """The greedy continuation of each prompt, of up to ``len(tok(" " + answer)) + extra``
    tokens, decoded (special tokens skipped)."""
    ids = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    budget = [
        len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + extra for a in answers
    ]
    gen = greedy_decode(model, tokenizer, ids, budget, batch_size)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in gen]


# ----------------------------------------------------------------------------- fluency
def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """Weighted mean over ``ns`` of the entropy (bits) of the text's word n-gram
    frequencies (0 for a text too short to have any)."""
    words = _WORD.findall(text)
    vals = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        vals.append(w * h)
    return sum(vals) / len(vals)


def fluency(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = FLUENCY_TOKENS,
    batch_size: int = 16,
    chat_template: bool = False,
) -> Optional[float]:
    """The mean n-gram entropy of free greedy generations from ``prompts``."""
    if not prompts:
        return None
    ids = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    gen = greedy_decode(
        model, tokenizer, ids, [max_new_tokens] * len(ids), batch_size, stop_at_eos=False
    )
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
    return sum(ngram_entropy(t) for t in texts) / len(texts)


# ----------------------------------------------------------------------------- drift
@torch.no_grad()
def next_token_logprobs(
    model, tokenizer, prompts: Sequence[str], batch_size: int = 16, chat_template: bool = False
) -> torch.Tensor:
    """``[len(prompts), vocab]`` float32 log-probabilities of the token after each prompt
    (on the CPU)."""
    passes = active_for(model)
    if passes is not None:  # the same model as last time: the same answer
        key = ("next_token_logprobs", tuple(prompts), chat_template)
        return passes.again(
            key, lambda: _next_token_logprobs(model, tokenizer, prompts, batch_size, chat_template)
        )
    return _next_token_logprobs(model, tokenizer, prompts, batch_size, chat_template)


def _next_token_logprobs(model, tokenizer, prompts, batch_size, chat_template) -> torch.Tensor:
    device = _device(model)
    pad = _pad_id(tokenizer)
    ids = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    rows: List[Optional[torch.Tensor]] = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    weights = model_locks(model).weights
    with preserved_model_state(model):
        model.eval()
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            x, m = _left_padded([ids[i] for i in idx], pad)
            x, m = x.to(device), m.to(device)
            with weights.reading():
                logits, _ = _last_logits(
                    model,
                    input_ids=x,
                    attention_mask=m,
                    position_ids=(m.cumsum(-1) - 1).clamp_min(0),
                )
            lp = torch.log_softmax(logits, -1).cpu()
            for r, i in enumerate(idx):
                rows[i] = lp[r]
    return torch.stack(rows) if rows else torch.empty(0)


def drift(base: torch.Tensor, edited: torch.Tensor) -> Dict[str, float]:
    """``{"drift_kl": mean KL(base || edited), "drift_top1": share of unchanged argmax}``
    from two :func:`next_token_logprobs` results."""
    if base.shape != edited.shape:
        raise ValueError(
            f"drift: the baseline has shape {tuple(base.shape)}, the edited model's "
            f"{tuple(edited.shape)}; capture both on the same prompts"
        )
    p = base.exp()
    kl = (p * (base - edited)).sum(-1).clamp_min(0)
    top1 = (base.argmax(-1) == edited.argmax(-1)).float()
    return {"drift_kl": float(kl.mean()), "drift_top1": float(top1.mean())}


# ----------------------------------------------------------------------------- the baseline
@dataclass
class GenerationBaseline:
    """What the unedited model says, captured before editing: the greedy continuation of
    each request's locality prompt (``None`` without one), as text and as token ids
    (``locality_ids``; ``None`` in a baseline from before they were kept: the edited model's
    continuations are then decoded in full), and the next-token log-probabilities on the
    drift prompts."""

    locality: List[Optional[str]]
    drift_prompts: List[str] = field(default_factory=list)
    drift_logprobs: Optional[torch.Tensor] = None
    locality_ids: Optional[List[Optional[List[int]]]] = None


def drift_sample(requests, limit: int = DRIFT_PROMPTS) -> List[str]:
    """The drift prompts of a set of requests: their locality prompts (unrelated to the
    edits by construction), distinct, first ``limit``, in order."""
    seen, out = set(), []
    for r in requests:
        p = r.locality_prompt
        if p is not None and p not in seen:
            seen.add(p)
            out.append(p)
            if len(out) >= limit:
                break
    return out


def spread(items: Sequence, limit: int) -> list:
    """At most ``limit`` items spread evenly over ``items`` (a fixed, reproducible sample)."""
    n = len(items)
    if n <= limit:
        return list(items)
    return [items[(k * n) // limit] for k in range(limit)]
