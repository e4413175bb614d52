"""The generated scores with the least model work that gives the same numbers.

A generated score asks one question of a greedy continuation (up to ``budget`` new tokens,
stopped at an end-of-text token): does its text start with an answer (``ES_gen``, ``GS_gen``,
``LS_gen``), is it the unedited model's (``LS_gen_unedited``, ``health_unrelated_kept``), or
what is it (``ES_gen_text``). Decoding every continuation in full answers them; most are
answered with less:

- **Teacher forcing shows the continuation's first tokens.** One forward pass over
  ``prompt ++ L`` (``L`` any token ids: the answer, or the unedited model's continuation)
  gives the argmax after ``prompt ++ L[:t]`` for each ``t``; greedy decoding produces
  ``L[t]`` exactly when that argmax is ``L[t]`` and every earlier one matched. So the
  greedy continuation starts with ``L[:m] ++ [argmax at m]`` (``m``: the first mismatch),
  and with all of ``L`` when all match (:func:`known_prefix`); it is complete when one of
  those is an end-of-text token or the budget is reached. The answers' own teacher-forced
  pass (``ES``, ``GS``, ``LS``) is reused, with one more position: the argmax after the
  whole answer (:func:`.teacher.argmax_with_next`), which settles an answer's last
  character.
- **A text is settled before it ends.** Whatever tokens follow, the normalised text of the
  final continuation starts with :func:`settled_prefix` of the text decoded so far. A
  starts-with question is decided as soon as that prefix starts with the answer (yes) or
  leaves it (no); an is-it-the-same question as soon as it leaves the unedited text (no).
- **Only the undecided rows decode**, from ``prompt ++ known tokens``, in large batches,
  and each row leaves its batch the step its questions are decided.

Exact, not approximate: a decided answer is the one full decoding would give. Two
assumptions, both true of the tokenizers in use (byte-level BPE, SentencePiece,
WordPiece): decoding ``ids ++ more`` gives a text that starts with the text of ``ids`` up to
its last character (a character cut in half by a byte-level token shows as U+FFFD and is
not relied on), and, with ``clean_up_tokenization_spaces``, one that may differ only in its
last :data:`CLEANUP_MARGIN` characters. And the argmax is the same whether computed with
teacher forcing or token by token with a KV cache: true in exact arithmetic; in floating
point, as true as the full decode's own independence of its batch's composition (a
near-tie can go either way in both). ``tests/scoring/test_fast_scoring.py`` compares the
two ways on random tiny models and on SmolLM2, before and after edits.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .._log import log
from ..model.forward import preserved_model_state
from ..model.requests import IGNORE, TokenizedRequest, context_length
from ..parallel.concurrency import model_locks
from ..utils.display import bar
from . import generation as G
from .teacher import predictions_at_labels

# Tests only: True routes every generated score through full greedy decoding, the way they
# were computed before the shortcuts (the reference the shortcuts are checked against).
_EXACT_DECODE = False

# characters at a text's end that transformers' clean_up_tokenization (ten replacements of
# up to four characters) may still change when more text follows: 3 per replacement, + 1
CLEANUP_MARGIN = 31
_SIGMA = "\u03a3"  # lowercases by what follows it (final sigma): never settled


def settled_prefix(text: str, cleanup: bool = False) -> str:
    """A prefix of ``normalize_text(decode(ids ++ more))`` for every ``more``, where
    ``text = decode(ids)``.

    The text is cut before its last ASCII character (before the last
    :data:`CLEANUP_MARGIN` characters with ``cleanup``, and before any U+FFFD): an ASCII
    character is a starter no later character composes with under NFKC (no Unicode
    composition has an ASCII second element), so NFKC, lowercasing (up to a capital sigma,
    whose lowercase depends on what follows), the removal of punctuation and symbols and the
    collapsing of whitespace of what comes before it no longer change."""
    end = len(text) - (CLEANUP_MARGIN if cleanup else 1)
    bad = text.find("\ufffd")
    if bad >= 0:
        end = min(end, bad - (CLEANUP_MARGIN if cleanup else 0))
    j = min(end, len(text) - 1)
    while j > 0 and ord(text[j]) >= 128:
        j -= 1
    if j <= 0:
        return ""
    head = unicodedata.normalize("NFKC", text[:j])
    if _SIGMA in head:
        head = head[: head.index(_SIGMA)]
    head = "".join(c for c in head.lower() if unicodedata.category(c)[0] not in "PS")
    return G._WS.sub(" ", head).strip()


def known_prefix(
    labels: Sequence[int], preds: Sequence[int], budget: int, eos
) -> Tuple[List[int], bool]:
    """``(tokens, complete)``: the first tokens of the greedy continuation of at most
    ``budget`` tokens (stopped before an ``eos`` token) of a prompt, from the teacher-forced
    argmax ``preds`` after ``prompt ++ labels[:t]``, ``t = 0, 1, ...`` (``preds`` may be one
    longer than ``labels``); ``complete``: the continuation has no more tokens."""
    out: List[int] = []
    for t, g in enumerate(preds):
        if len(out) >= budget or g in eos:
            return out, True
        out.append(int(g))
        if t >= len(labels) or g != labels[t]:
            break
    return out, len(out) >= budget


@dataclass
class Pending:
    """One greedy continuation and the questions asked of it.

    ``checks``: ``("starts", answer)`` (does the text start with the answer, normalised),
    ``("same", normalised text)`` (is its normalised text this one), ``("text", None)``
    (the text itself), ``("ids", None)`` (the token ids). ``tokens``: its first tokens
    known so far; ``complete``: no more follow. ``answers``: one per check, once decided."""

    prompt: List[int]
    budget: int
    checks: List[Tuple[str, Optional[str]]]
    tokens: List[int] = field(default_factory=list)
    complete: bool = False
    answers: List[object] = field(default_factory=list)

    def start(self, tokens: List[int], complete: bool) -> "Pending":
        self.tokens, self.complete = list(tokens), complete or len(tokens) >= self.budget
        return self


def budget(model, prompt: Sequence[int], wanted: int) -> int:
    """What :func:`generation.greedy_decode` decodes of ``wanted`` tokens after ``prompt``
    (no more than fits in the model's context)."""
    ctx = context_length(model)
    return max(0, wanted if ctx is None else min(wanted, ctx - len(prompt) + 1))


def _answer(kind: str, ref, text: str, tokens, complete: bool, cleanup: bool):
    """The answer to one check, or ``None`` while the tokens so far leave it open."""
    if kind == "starts":
        if complete:
            return float(G.starts_with_answer(text, ref))
        a = G.normalize_text(ref)
        if not a:  # an answer of punctuation only is compared as given: decode it all
            return None
        s = settled_prefix(text, cleanup)
        if s.startswith(a):
            return 1.0
        return 0.0 if not a.startswith(s) else None
    if kind == "same":
        if complete:
            return float(G.normalize_text(text) == ref)
        return 0.0 if not ref.startswith(settled_prefix(text, cleanup)) else None
    if not complete:
        return None
    return text if kind == "text" else list(tokens)


def judge(tokenizer, row: Pending, cleanup: bool) -> bool:
    """Answer what the row's tokens so far decide; whether every check is answered."""
    if len(row.answers) != len(row.checks):
        row.answers = [None] * len(row.checks)
    text = None
    for k, (kind, ref) in enumerate(row.checks):
        if row.answers[k] is None:
            if text is None:
                text = tokenizer.decode(row.tokens, skip_special_tokens=True)
            row.answers[k] = _answer(kind, ref, text, row.tokens, row.complete, cleanup)
    return all(a is not None for a in row.answers)


def cleans_up(tokenizer) -> bool:
    """Whether the tokenizer's decode cleans up spaces before punctuation."""
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))


def settle(model, tokenizer, rows: Sequence[Pending], batch_size: int = 64) -> None:
    """Answer every check of ``rows``: from the tokens each already knows, and by greedy
    decoding the rest from ``prompt ++ tokens``, each row stopped as soon as its checks are
    answered."""
    cleanup = cleans_up(tokenizer)
    open_rows = [r for r in rows if not judge(tokenizer, r, cleanup)]
    log.debug(
        "generated scores: %d of %d continuations settled without decoding",
        len(rows) - len(open_rows),
        len(rows),
    )
    if not open_rows:
        return
    device = G._device(model)
    pad = G._pad_id(tokenizer)
    eos = G._eos_ids(tokenizer, model)
    ctx = context_length(model)
    order = sorted(open_rows, key=lambda r: (len(r.prompt) + len(r.tokens), r.budget))
    weights = model_locks(model).weights
    progress = bar(len(order), "scoring (greedy decoding, undecided only)")
    with preserved_model_state(model), torch.no_grad():
        model.eval()
        for s in range(0, len(order), batch_size):
            batch = order[s : s + batch_size]
            progress.update(len(batch))
            ids, mask = G._left_padded([r.prompt + r.tokens for r in batch], pad)
            with weights.reading():  # one whole model for the whole continuation
                _decode_batch(
                    model, tokenizer, batch, ids.to(device), mask.to(device), eos, ctx, cleanup
                )
    progress.close()


def _decode_batch(model, tokenizer, rows, ids, mask, eos, ctx, cleanup) -> None:
    """Greedy decoding of one left-padded batch of open rows; a row leaves the batch when
    its checks are answered (kept, its output unused, where the cache cannot drop rows)."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    live = list(range(len(rows)))  # the batch's rows, in cache order
    logits, cache = G._last_logits(model, input_ids=ids, attention_mask=mask, position_ids=pos)
    while True:
        nxt = logits.argmax(-1)
        keep = []
        for k, (i, t) in enumerate(zip(live, nxt.tolist())):
            r = rows[i]
            if r.answers and all(a is not None for a in r.answers):
                continue  # answered; still in a cache that cannot drop rows
            if t in eos:
                r.complete = True
            else:
                r.tokens.append(t)
                r.complete = len(r.tokens) >= r.budget
            if not judge(tokenizer, r, cleanup):
                keep.append(k)
        if not keep:
            return
        if len(keep) < len(live) and hasattr(cache, "batch_select_indices"):
            sel = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(sel)
            live, nxt, mask, pos = [live[k] for k in keep], nxt[sel], mask[sel], pos[sel]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        if ctx is not None:  # rows kept after they are answered may run past the context
            pos = pos.clamp_max(ctx - 1)
        logits, cache = G._last_logits(
            model, cache, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos
        )


def replay(
    model,
    prompts: Sequence[List[int]],
    conts: Sequence[Optional[List[int]]],
    probe: Sequence[bool],
    batch_size: int,
) -> List[Optional[List[int]]]:
    """Teacher-forced argmax after ``prompt ++ cont[:t]`` for ``t < len(cont)`` (and
    ``t = len(cont)`` where ``probe``), one forward pass per batch; ``None`` where
    ``cont`` is ``None`` or there is nothing to predict."""
    toks, where = [], []
    for i, (p, c, e) in enumerate(zip(prompts, conts, probe)):
        if c is None or not p or (not c and not e):
            continue
        seq = list(p) + list(c if e else c[:-1])
        labels = [IGNORE] * (len(p) - 1) + list(c) + ([0] if e else [])
        toks.append(TokenizedRequest(seq, labels))
        where.append(i)
    out: List[Optional[List[int]]] = [None] * len(prompts)
    for i, (pred, _) in zip(where, predictions_at_labels(model, toks, batch_size)):
        out[i] = pred
    return out


def known_from(
    model, rows: List[Pending], unedited: Sequence[Optional[List[int]]], eos, batch_size
) -> None:
    """Extend each row's known tokens with a teacher-forced pass over its prompt and the
    unedited model's continuation ``unedited`` (and the position after it where the unedited
    model stopped at an end-of-text token, shorter than the budget); not for a row whose
    known tokens already leave that continuation (the pass would show nothing new)."""
    conts = [
        u
        if u is not None
        and len(u) <= r.budget
        and not r.complete
        and r.tokens == list(u[: len(r.tokens)])
        else None
        for r, u in zip(rows, unedited)
    ]
    probe = [u is not None and len(u) < r.budget for r, u in zip(rows, conts)]
    preds = replay(model, [r.prompt for r in rows], conts, probe, batch_size)
    for r, u, pr in zip(rows, conts, preds):
        if u is None or pr is None:  # not replayed, or nothing to predict
            continue
        k, done = known_prefix(u, pr, r.budget, eos)
        if done or len(k) > len(r.tokens):
            r.start(k, done)
