"""Scoring a lifelong run: the package's scores plus WikiBigEdit's (personas, multi-hop),
on any subset of the run's requests, against the unedited model's baseline."""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .._log import log
from ..model.requests import EditRequest, as_requests
from ..scoring.health import capture_health
from ..scoring.metrics import capture_baseline, evaluate, mean, token_accuracy
from ..scoring.resumed import ResumedPasses


def _split(items: Sequence[Any]):
    """``(requests, extras)`` from Examples, EditRequests or dicts."""
    requests: List[Any] = []
    extras: List[Dict[str, Any]] = []
    for i, it in enumerate(items):
        if hasattr(it, "request") and hasattr(it, "extras"):  # data.Example
            requests.append(it.request)
            extras.append(dict(it.extras or {}))
        elif isinstance(it, (EditRequest, Mapping)):
            requests.append(it)
            extras.append({})
        else:
            raise TypeError(
                f"examples_or_requests[{i}]: expected an Example, EditRequest or "
                f"dict, got {type(it).__name__}"
            )
    return as_requests(requests, "examples_or_requests"), extras


def score(
    model,
    tokenizer,
    requests,
    extras: Optional[Sequence[Mapping]] = None,
    *,
    base=None,
    generation: bool = True,
    batch_size: int = 32,
    chat_template: bool = False,
) -> Dict[str, Any]:
    """:func:`~ultraedit_fast.scoring.metrics` (teacher-forced and, with ``generation``,
    generation-based scores) plus the WikiBigEdit scores: ``personas``, ``n_personas``,
    ``mhop``, ``n_mhop`` (fractions, ``None`` when absent)."""
    requests = as_requests(requests)
    out = dict(
        evaluate(
            model,
            tokenizer,
            requests,
            base=base,
            generation=generation,
            batch_size=batch_size,
            chat_template=chat_template,
        )
    )
    extras = list(extras) if extras is not None else [{}] * len(requests)
    persona_pairs = [
        (p, r.target)
        for r, x in zip(requests, extras)
        for p in (x.get("personas") or [])
        if isinstance(p, str) and p.strip()
    ]
    mhop_pairs = [(x["mhop"], x["mhop_ans"]) for x in extras if x.get("mhop") and x.get("mhop_ans")]
    out["personas"] = mean(
        token_accuracy(model, tokenizer, persona_pairs, batch_size) if persona_pairs else []
    )
    out["n_personas"] = len(persona_pairs)
    out["mhop"] = mean(
        token_accuracy(model, tokenizer, mhop_pairs, batch_size) if mhop_pairs else []
    )
    out["n_mhop"] = len(mhop_pairs)
    return out


class Scorer:
    """Scores subsets of the run's requests against the unedited model's baseline; once
    :meth:`resume_below` has named the editor, every teacher-forced pass over a sequence
    scored before runs from the lowest edited block up (:mod:`..scoring.resumed`)."""

    def __init__(
        self,
        model,
        tokenizer,
        requests,
        extras,
        generation,
        batch_size,
        chat,
        health=True,
        resumed=True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.requests, self.extras = requests, extras
        self.generation, self.batch_size, self.chat = generation, batch_size, chat
        self.health = health  # True: the package's general text; a path; False: none
        self.base = None
        self.resumed = resumed  # keep the states for later passes (resume_below)
        self.passes: Optional[ResumedPasses] = None

    @classmethod
    def for_run(cls, model, tokenizer, requests, extras, chat, health, settings) -> "Scorer":
        """The scorer of a run with ``settings`` (``generation``, ``eval_batch_size``,
        ``eval_resumed``)."""
        gen, size = settings["generation"], settings["eval_batch_size"]
        resumed = settings["eval_resumed"]
        return cls(model, tokenizer, requests, extras, gen, size, chat, health, resumed)

    def resume_below(self, editor) -> None:
        """Keep the state entering the lowest block ``editor`` writes for the sequences
        scored (nothing when its modules cannot be told: every pass then runs in full)."""
        if not self.resumed or self.passes is not None:
            return
        names = getattr(editor, "module_names", None)
        if names is None:
            describe = getattr(editor, "describe", None)
            names = (describe() or {}).get("modules") if callable(describe) else None
        try:
            modules = [self.model.get_submodule(n) for n in names or ()]
        except AttributeError:  # a name that is no module of the model
            return
        if modules:
            self.passes = ResumedPasses.for_modules(self.model, modules)

    def capture_base(self, base) -> float:
        """The unedited model's answers on every request (given, or captured now)."""
        n = len(self.requests)
        log.info("scoring the unedited model on the %d requests to edit ...", n)
        t0 = time.perf_counter()
        with self._active():  # its passes are the unedited model's first scores'
            self.base = self._capture(base)
        return time.perf_counter() - t0

    def _capture(self, base):
        n = len(self.requests)
        if base is None:
            base = capture_baseline(
                self.model,
                self.tokenizer,
                self.requests,
                generation=self.generation,
                batch_size=self.batch_size,
                chat_template=self.chat,
            )
        if len(base) != n:
            raise ValueError(f"base: expected {n} entries, got {len(base)}")
        if self.health is not False and self.health is not None and base.health is None:
            path = None if self.health is True else self.health
            base = dataclasses.replace(
                base, health=capture_health(self.model, self.tokenizer, path)
            )
        return base

    def _active(self):
        return self.passes.active() if self.passes is not None else nullcontext()

    def at(self, idx) -> Dict[str, Any]:
        idx = list(idx)
        with self._active():
            return score(
                self.model,
                self.tokenizer,
                [self.requests[i] for i in idx],
                [self.extras[i] for i in idx],
                base=self.base.subset(idx),
                generation=self.generation,
                batch_size=self.batch_size,
                chat_template=self.chat,
            )
