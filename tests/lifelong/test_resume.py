"""Ctrl-C in a long run: the turns done, their timings and scores so far, and a resumable
editor state are written; resuming gives the run an uninterrupted one would have given."""

import copy
import json

import pytest
import torch

from conftest import random_requests
from test_lifelong import LR, MODULES, tiny_llama
from ultraedit_fast import UltraEditor
from ultraedit_fast.lifelong import run_lifelong
from ultraedit_fast.lifelong.resume import RunInterrupted
from ultraedit_fast.lifelong.scores import Scorer

KW = dict(
    turns=4,
    edits_per_turn=3,
    modules=MODULES,
    lr=LR,
    progress=False,
    plot=False,
    eval_every=2,
    generation=False,
)


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama(seed=3)


def interrupt_at(monkeypatch, cls, name, call):
    """Raise KeyboardInterrupt (as Ctrl-C would) at the ``call``-th call of cls.name."""
    inner = getattr(cls, name)
    count = {"n": 0}

    def wrapped(self, *a, **kw):
        count["n"] += 1
        if count["n"] == call:
            raise KeyboardInterrupt
        return inner(self, *a, **kw)

    monkeypatch.setattr(cls, name, wrapped)


def bits(model):
    return [p.detach().clone() for p in model.state_dict().values()]


@pytest.fixture(scope="module")
def uninterrupted(base_model, tmp_path_factory):
    from conftest import ToyTokenizer

    model = copy.deepcopy(base_model)
    reqs = random_requests(12, seed=11)
    res = run_lifelong(
        model, ToyTokenizer(), reqs, output_dir=str(tmp_path_factory.mktemp("full")), **KW
    )
    return reqs, res, bits(model)


@pytest.mark.parametrize("where", ["edit", "scoring", "final_scoring"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
    base_model, toy_tokenizer, tmp_path, monkeypatch, uninterrupted, where
):
    reqs, full, full_weights = uninterrupted
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        if where == "edit":
            interrupt_at(m, UltraEditor, "edit", 3)  # during turn 3
        elif where == "scoring":
            interrupt_at(m, Scorer, "at", 2)  # after the unedited scores: the turn-2 checkpoint
        else:
            interrupt_at(m, Scorer, "at", 3)  # the final checkpoint's scoring
        with pytest.raises(RunInterrupted) as info:
            run_lifelong(copy.deepcopy(base_model), toy_tokenizer, reqs, output_dir=out, **KW)
    partial = json.loads((tmp_path / "run" / "lifelong.json").read_text())
    done = info.value.turns_done
    assert partial["interrupted"]["turns_done"] == done == len(partial["turns"])
    assert done == {"edit": 2, "scoring": 2, "final_scoring": 4}[where]
    assert [r["turn"] for r in partial["turns"]] == list(range(1, done + 1))
    assert all(r["refused"] is None and r["wall_seconds"] > 0 for r in partial["turns"])
    assert partial["interrupted"]["resume"] == info.value.resume_dir
    # resume on a fresh copy of the unedited model
    model = copy.deepcopy(base_model)
    res = run_lifelong(model, toy_tokenizer, reqs, output_dir=out, resume=out, **KW)
    assert res["resumed_at_turn"] == done and "interrupted" not in res
    assert len(res["turns"]) == 4 and [h["turn"] for h in res["eval_history"]] == [2, 4]
    assert res["metrics"] == full["metrics"]
    assert res["metrics_before"] == full["metrics_before"]
    assert all(torch.equal(a, b) for a, b in zip(bits(model), full_weights))
    final = json.loads((tmp_path / "run" / "lifelong.json").read_text())
    assert "interrupted" not in final and final["metrics"] == full["metrics"]


def test_resume_refuses_what_it_cannot_continue(base_model, toy_tokenizer, tmp_path, uninterrupted):
    reqs, full, _ = uninterrupted
    out = tmp_path / "done"
    run_lifelong(copy.deepcopy(base_model), toy_tokenizer, reqs, output_dir=str(out), **KW)
    with pytest.raises(ValueError, match="finished run"):
        run_lifelong(copy.deepcopy(base_model), toy_tokenizer, reqs, resume=str(out), **KW)
    with pytest.raises(FileNotFoundError, match="resume"):
        run_lifelong(
            copy.deepcopy(base_model), toy_tokenizer, reqs, resume=str(tmp_path / "x"), **KW
        )


def test_a_different_shape_is_refused(
    base_model, toy_tokenizer, tmp_path, monkeypatch, uninterrupted
):
    reqs, _, _ = uninterrupted
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        interrupt_at(m, UltraEditor, "edit", 2)
        with pytest.raises(RunInterrupted):
            run_lifelong(copy.deepcopy(base_model), toy_tokenizer, reqs, output_dir=out, **KW)
    kw = dict(KW, turns=2, edits_per_turn=6)
    with pytest.raises(ValueError, match="turns"):
        run_lifelong(copy.deepcopy(base_model), toy_tokenizer, reqs, resume=out, **kw)
