"""Choosing a turn's step after it is solved: ``step="auto"``.

A turn's weight shift is linear in its values ``V`` (``V = -lr ...``; the normaliser's
statistics do not depend on ``lr``), and ``A = (K K^T + I)^-1 V`` is linear in ``V`` row by
row, so once a turn is solved each request's part of the update can be scaled on its own,
without capturing again and with the same factorisation. The search starts from the
published step for every request and doubles the scale of the requests whose edit has not
taken yet (up to ``max_step_scale``), writing each candidate into the weights, checking, and
putting the weights back; it stops when ``step_target`` of the turn's edits take, or keeps
the last scales that left the locality set within ``locality_budget`` (never less than the
published step). ``step="paper"`` writes the published step and runs no search.

The checks are teacher-forced forward passes that say exactly what greedy decoding would
produce:

- an edit *takes* when the argmax at every answer token of ``prompt + target`` is the target
  token (then greedy decoding from the prompt produces the target);
- a locality prompt *keeps its answer* when the argmax at each position of what it checks
  is the token there: with ``locality_check="decoded"`` (the default) the pre-turn model's
  greedy continuation (``len(answer tokens) + 3`` tokens, or 4 for an anchor, decoded
  first: what the generated scores compare); with ``"answer"`` the tokens the pre-turn
  model's full pass over ``prompt + given answer`` proves greedy decoding produces (the
  answer's tokens up to the first it does not predict, and its own token there; for an
  anchor prompt, its next token), found in the same full pass that prepares the checks, so
  no decoding runs (a third of the facts turn's time on a CPU; a weaker check: the tokens
  after those are not checked). Either way, greedy decoding then produces the checked
  tokens.

The locality set is the turn's locality prompts, or, when the requests have none, a fixed
set of unrelated anchor prompts (:data:`ANCHOR_PROMPTS`, minus any that is an edit prompt).
At most :data:`CHECK_SAMPLE` of each are checked (spread evenly over the turn).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..model.partial import ResumedForward, lowest_block
from .options import LOCALITY_CHECKS
from ..scoring.generation import EXTRA_TOKENS, greedy_decode, spread
from ..model.requests import IGNORE, TokenizedRequest, prompt_ids, tokenize_pair

SCALE_FACTOR = 2.0
ANCHOR_TOKENS = 4
CHECK_SAMPLE = 64  # edits and locality prompts checked per candidate step, at most

# Prompts unrelated to any particular edit, on general knowledge and everyday language: the
# locality set of a turn whose requests bring none.
ANCHOR_PROMPTS = (
    "The sun rises in the",
    "Water freezes at a temperature of",
    "A week has seven",
    "The opposite of hot is",
    "Cats and dogs are popular",
    "The color of the sky on a clear day is",
    "Two plus two equals",
    "The first month of the year is",
    "Bread is made from",
    "A triangle has three",
    "The largest animal on Earth is the",
    "People drink coffee in the",
    "An apple a day keeps the",
    "The heart pumps blood through the",
    "Rain falls from the",
    "The alphabet starts with the letter",
    "Ice cream is usually served",
    "Trees produce oxygen through",
    "A doctor works in a",
    "The Moon orbits the",
    "Fish live in the",
    "A piano has black and white",
    "Children go to school to",
    "The boiling point of water is",
)


class ConflictingRequestsWarning(UserWarning):
    """A turn whose requests work against each other in the step search (warned once per
    turn, naming the requests; the turn still runs): a locality prompt that is an edit
    prompt of the turn (its own, or another request's), whose check then fights that edit,
    or one prompt given two different targets, which cannot both take."""


def _norm(text: str) -> str:
    return " ".join(text.split())


def conflicts(requests: Sequence) -> List[str]:
    """What in a turn's requests fights the step search (see
    :class:`ConflictingRequestsWarning`), one sentence per kind; empty when nothing does."""
    by_prompt: Dict[str, List[int]] = {}
    for i, r in enumerate(requests):
        by_prompt.setdefault(_norm(r.prompt), []).append(i)
    own: List[int] = []
    other: List[Tuple[int, int]] = []
    for i, r in enumerate(requests):
        if r.locality_prompt is not None:
            for j in by_prompt.get(_norm(r.locality_prompt), []):
                if i == j:
                    own.append(i)
                else:
                    other.append((i, j))
    out = []
    if own:
        out.append(
            f"requests {own}: the locality prompt is the request's own prompt, so the "
            "locality check fights the edit"
        )
    if other:
        pairs = ", ".join(f"requests[{i}]'s is the prompt of requests[{j}]" for i, j in other)
        out.append(
            f"locality prompts that are edit prompts of the turn ({pairs}) fight those edits"
        )
    for prompt, idx in by_prompt.items():
        targets = sorted({_norm(requests[i].target) for i in idx})
        if len(targets) > 1:
            out.append(
                f"requests {idx} give the prompt {prompt!r} different targets {targets}, "
                "which cannot all take"
            )
    return out


def warn_conflicts(requests: Sequence) -> None:
    """One :class:`ConflictingRequestsWarning` for the turn, when its requests conflict."""
    found = conflicts(requests)
    if found:
        warnings.warn(
            "step='auto': " + "; ".join(found) + " (the turn runs; its step search "
            "cannot satisfy them all)",
            ConflictingRequestsWarning,
            stacklevel=3,
        )


@dataclass
class StepResult:
    """What the search did: the per-request scales chosen (``None``: the published step for
    all) and, per try, the mean scale, the share of the checked edits that took and the
    share of locality prompts whose answer changed."""

    scales: Optional[List[float]] = None
    trials: List[Tuple[float, float, float]] = field(default_factory=list)
    locality: str = "requests"  # "requests" or "anchors"
    general_changed: List[float] = field(default_factory=list)  # per try, with drift_budget

    @property
    def scale(self) -> float:
        """The mean scale over the turn's requests (1.0: the published step)."""
        return 1.0 if self.scales is None else sum(self.scales) / len(self.scales)

    def to_dict(self) -> dict:
        return {
            "mean_scale": self.scale,
            "scales": self.scales,
            "locality": self.locality,
            "trials": [
                {"mean_scale": s, "edits_taken": e, "locality_changed": c}
                for s, e, c in self.trials
            ],
            "general_changed": self.general_changed or None,
        }


class StepSearch:
    """The checks of one turn, prepared on the pre-turn model (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        requests,
        *,
        batch_size: int = 64,
        chat_template: bool = False,
        max_length: Optional[int] = None,
        drift=None,
        drift_budget: Optional[float] = None,
        modules: Sequence[torch.nn.Module] = (),
        taps: Optional[Dict[str, torch.nn.Module]] = None,
        locality_check: str = "decoded",
    ):
        if locality_check not in LOCALITY_CHECKS:
            raise ValueError(
                f"locality_check: expected one of {LOCALITY_CHECKS}, got {locality_check!r}"
            )
        warn_conflicts(requests)
        self.model = model
        self.drift, self.drift_budget = drift, drift_budget
        self.n_requests = len(requests)
        self.checked = spread(range(len(requests)), CHECK_SAMPLE)  # request indices
        self.edits = [
            tokenize_pair(
                tokenizer,
                requests[i].prompt,
                requests[i].target,
                max_length,
                where=f"requests[{i}]",
                chat_template=chat_template,
            )
            for i in self.checked
        ]
        given = spread(
            [
                (r.locality_prompt, r.locality_answer)
                for r in requests
                if r.locality_prompt is not None
            ],
            CHECK_SAMPLE,
        )
        self.locality_kind, self.locality, self.preserved = _locality_set(
            model, tokenizer, requests, given, locality_check, max_length, chat_template
        )
        n = len(self.edits)
        # every try changes only the edited ``modules``: the checks run from the lowest
        # block holding one of them, on the state the pre-turn model leaves there
        self.checks = ResumedForward(
            model,
            self.edits + self.locality,
            lowest_block(model, modules),
            batch_size,
            extra=self.preserved,
            taps=taps,
            tap_from=n,
        )
        if locality_check == "answer":
            self.locality = _verified(self.checks, n, self.locality)

    def locality_keys(self) -> Dict[str, torch.Tensor]:
        """Each tapped module's input (fp32) at the labelled positions of the locality set
        (and of the given answers): the keys the turn's update should leave alone (see
        ``preserve_locality``); taken in the checks' full pass, empty without ``taps``."""
        return self.checks.keys

    def measure(self) -> Tuple[List[bool], float]:
        """(whether each checked edit takes, share of locality prompts whose answer
        changed) on the model as it is now."""
        res = self.checks.predictions()
        taken = [pr == lb for pr, lb in res[: len(self.edits)]]
        kept = [pr == lb for pr, lb in res[len(self.edits) :]]
        changed = (1.0 - sum(kept) / len(kept)) if kept else 0.0
        return taken, changed

    def _over(self, changed: float, drift: float, budget: float) -> bool:
        """Whether a try spends a budget: the locality prompts', or the drift budget."""
        if changed > budget:
            return True
        return (
            self.drift is not None and self.drift_budget is not None and drift > self.drift_budget
        )

    def _try(self, write, restore, scales, result: StepResult):
        write(scales)
        try:
            taken, changed = self.measure()
            # the share of general text's next tokens changed (drift_budget; 0 without)
            drift = self.drift.changed(self.model) if self.drift is not None else 0.0
        finally:
            restore()
        n = self.n_requests
        result.trials.append((sum(scales) / n, sum(taken) / max(1, len(taken)), changed))
        if self.drift is not None:
            result.general_changed.append(drift)
        return taken, changed, drift

    def run(
        self,
        write: Callable[[List[float]], None],
        restore: Callable[[], None],
        *,
        target: float,
        budget: float,
        max_scale: float,
    ) -> StepResult:
        """``write(scales)`` writes the turn's update with each request's part scaled by
        ``scales[i]`` into the (pre-turn) weights, ``restore()`` puts the pre-turn weights
        back. When a candidate spends the budget, the geometric mean of it and the last
        good one is tried once."""
        result = StepResult(locality=self.locality_kind)
        good = [1.0] * self.n_requests
        cand = list(good)
        while True:
            taken, changed, drift = self._try(write, restore, cand, result)
            first = len(result.trials) == 1
            if self._over(changed, drift, budget) and not first:
                mid = [(g * c) ** 0.5 for g, c in zip(good, cand)]
                _, changed_mid, drift_mid = self._try(write, restore, mid, result)
                if not self._over(changed_mid, drift_mid, budget):
                    good = mid
                break
            good = cand
            if self._over(changed, drift, budget) or sum(taken) >= target * len(taken):
                break
            grow = self._grow(cand, taken, max_scale)
            if grow is None:
                break
            cand = grow
        result.scales = None if all(g == 1.0 for g in good) else good
        return result

    def _grow(self, scales: List[float], taken: List[bool], max_scale: float):
        """The next candidate: the scales of the checked requests whose edit has not taken
        (and of the unchecked requests, which follow the checked ones) multiplied by
        ``SCALE_FACTOR``, capped at ``max_scale``; ``None`` when nothing can grow."""
        out = list(scales)
        lagging = {i for i, ok in zip(self.checked, taken) if not ok}
        unchecked = set(range(self.n_requests)) - set(self.checked)
        for i in lagging | (unchecked if lagging else set()):
            out[i] = min(max_scale, scales[i] * SCALE_FACTOR)
        return None if out == scales else out


def _locality_set(
    model, tokenizer, requests, given, locality_check: str, max_length, chat_template: bool
) -> Tuple[str, List[TokenizedRequest], List[TokenizedRequest]]:
    """``(kind, locality rows, preserved rows)``: the locality set's prompts (see
    :func:`_locality_prompts`) with what they check, and the given answers whose keys are
    preserved too (``"decoded"``; in ``"answer"`` the rows are the given answers)."""
    kind, prompts, budgets = _locality_prompts(tokenizer, requests, given)
    ids = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    if locality_check == "answer":
        # each prompt fed its given answer (none for an anchor): one full pass says which
        # of those tokens greedy decoding produces, and the first it does not
        drafts = [_answer_ids(tokenizer, a) for _, a in given] or [[] for _ in ids]
        return kind, _drafted(ids, drafts, max_length), []
    conts = greedy_decode(model, tokenizer, ids, budgets, CHECK_SAMPLE)
    # the keys to preserve: at the model's own continuation and, for the requests' locality
    # prompts, at their given answer too
    preserved = _given_answers(tokenizer, given, max_length, chat_template)
    return kind, _continuations(ids, conts, max_length), preserved


def _locality_prompts(
    tokenizer, requests, given: List[Tuple[str, str]]
) -> Tuple[str, List[str], List[int]]:
    """``(kind, prompts, budgets)``: the locality set (the requests' ``given`` locality
    prompts, else the anchor prompts that are no edit prompt) and how many tokens of each
    prompt's greedy continuation to check."""
    if given:
        prompts = [p for p, _ in given]
        budgets = [len(_answer_ids(tokenizer, a)) + EXTRA_TOKENS for _, a in given]
        return "requests", prompts, budgets
    edit_prompts = {r.prompt.strip() for r in requests}
    prompts = spread([p for p in ANCHOR_PROMPTS if p.strip() not in edit_prompts], CHECK_SAMPLE)
    return "anchors", prompts, [ANCHOR_TOKENS] * len(prompts)


def _given_answers(
    tokenizer, given: List[Tuple[str, str]], max_length: Optional[int], chat_template: bool
) -> List[TokenizedRequest]:
    """The requests' locality prompts with their given answers, tokenised as for editing
    (those too long for the context left out)."""
    out: List[TokenizedRequest] = []
    for p, a in given:
        try:
            out.append(tokenize_pair(tokenizer, p, a, max_length, chat_template=chat_template))
        except ValueError:  # too long for the context: not preserved
            pass
    return out


def _continuations(
    ids: List[List[int]], conts: List[List[int]], max_length: Optional[int]
) -> List[TokenizedRequest]:
    """Each locality prompt fed its greedy continuation, labelled with the continuation's
    next tokens (prompts the model ends at once, or too long for the context, left out)."""
    out: List[TokenizedRequest] = []
    for p, c in zip(ids, conts):
        if not c:  # the model ends its text at once: nothing to compare
            continue
        if max_length is not None and len(p) + len(c) - 1 > max_length:
            continue
        out.append(TokenizedRequest(list(p) + list(c[:-1]), [IGNORE] * (len(p) - 1) + list(c)))
    return out


def _answer_ids(tokenizer, answer: str) -> List[int]:
    return list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])


def _drafted(
    ids: List[List[int]], drafts: List[List[int]], max_length: Optional[int]
) -> List[TokenizedRequest]:
    """``locality_check="answer"``: each locality prompt followed by its draft (its given
    answer), labelled at the prompt's last token and at every draft token (the labels are
    placeholders until :func:`_verified`); prompts too long for the context left out."""
    out: List[TokenizedRequest] = []
    for p, d in zip(ids, drafts):
        if max_length is not None and len(p) + len(d) > max_length:
            continue
        out.append(TokenizedRequest(list(p) + list(d), [IGNORE] * (len(p) - 1) + list(d) + [0]))
    return out


def _verified(
    checks: ResumedForward, first: int, rows: List[TokenizedRequest]
) -> List[TokenizedRequest]:
    """Each drafted locality row cut to what the pre-turn model's greedy decoding is known
    to produce from its full pass: the draft tokens it predicts, up to the first it does
    not, and its own token there. ``checks`` is restricted to those positions, labelled
    with those tokens; returns the rows as checked."""
    assert checks.first is not None
    keep: Dict[int, List[int]] = {}
    out: List[TokenizedRequest] = []
    for k, row in enumerate(rows):
        pred, lab = checks.first[first + k]
        a = 0
        while a < len(lab) - 1 and pred[a] == lab[a]:
            a += 1
        known = list(pred[: a + 1])
        keep[first + k] = known
        n_prompt = len(row.input_ids) - len(lab) + 1
        ids = row.input_ids[: n_prompt + len(known) - 1]
        out.append(TokenizedRequest(ids, [IGNORE] * (n_prompt - 1) + known))
    checks.restrict(keep)
    return out
