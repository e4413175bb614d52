"""The step of a turn: ``step="paper"`` is the published step exactly, ``step="auto"`` scales
each request's part of the solved update until the edits take within the locality budget,
and the preset's regime is chosen from the first turn's size."""

import dataclasses

import pytest
import torch

from conftest import ToyTokenizer, clone_model, make_tiny, random_requests
from ultraedit_fast import EditRequest, ReferenceEditor, UltraEditor
from ultraedit_fast import evaluate
from ultraedit_fast.editors.turn import Plan, request_of_rows, rescaled
from ultraedit_fast.core.presets import FACTS_TURN_MAX
from ultraedit_fast.model.requests import make_minibatches
from ultraedit_fast.core.solve import ShiftSolver
from ultraedit_fast.core.step_search import StepSearch

LR = 1e-3

pytestmark = pytest.mark.usefixtures("one_thread")


def _delta(model, w0, names):  # noqa: D103
    return [model.get_submodule(n).weight.detach() - w for n, w in zip(names, w0)]


def test_paper_step_is_the_reference(toy_tokenizer):
    model, modules = make_tiny("llama")
    ref_model = clone_model(model)
    w0 = [model.get_submodule(n).weight.detach().clone() for n in modules]
    reqs = random_requests(9, seed=3)
    rep = UltraEditor(model, toy_tokenizer, modules=modules, lr=LR, step="paper").edit(reqs)
    ReferenceEditor(ref_model, toy_tokenizer, modules=modules, lr=LR).edit(reqs)
    assert rep.step_scale is None and rep.seconds["step"] == 0.0
    for a, b in zip(_delta(model, w0, modules), _delta(ref_model, w0, modules)):
        assert float((a - b).norm() / b.norm()) < 1e-4


def test_rows_follow_the_capture_and_rescaling_is_linear(toy_tokenizer):
    reqs = random_requests(7, seed=4)
    batches = make_minibatches(toy_tokenizer, reqs, 3)
    rows = request_of_rows(batches)
    counts = [
        len(toy_tokenizer(" " + r.target, add_special_tokens=False)["input_ids"]) for r in reqs
    ]
    assert rows.bincount(minlength=7).tolist() == counts
    assert rows.tolist() == [i for b in batches for i in b.order for _ in range(counts[i])]
    g = torch.Generator().manual_seed(0)
    k = torch.randn(rows.shape[0], 12, generator=g)
    v = torch.randn(rows.shape[0], 5, generator=g)
    solver = ShiftSolver(k)
    a, kk = solver.factors(v)
    plan = [("t", a, kk)]
    ((_, a3, _),) = rescaled(Plan(plan, [(solver, v)]), rows, [3.0] * 7)
    assert torch.allclose(a3, 3 * a, rtol=1e-5, atol=1e-6)
    scales = [1.0] * 7
    scales[2] = 4.0
    ((_, a4, _),) = rescaled(Plan(plan, [(solver, v)]), rows, scales)
    v4 = v.clone()
    v4[rows == 2] *= 4
    assert torch.allclose(a4, solver.factors(v4)[0], rtol=1e-5, atol=1e-6)


def test_auto_step_lands_more_edits_and_keeps_the_budget(toy_tokenizer):
    model, modules = make_tiny("llama")
    twin = clone_model(model)
    reqs = random_requests(8, seed=9)
    paper = UltraEditor(twin, toy_tokenizer, modules=modules, lr=1e-4, step="paper")
    paper.edit(reqs)
    ed = UltraEditor(
        model,
        toy_tokenizer,
        modules=modules,
        lr=1e-4,
        step="auto",
        locality_budget=0.5,
        max_step_scale=256.0,
    )
    rep = ed.edit(reqs)
    trials = rep.step_search["trials"]
    assert trials[0]["mean_scale"] == 1.0  # starts at the published step
    assert all(s >= 1.0 for s in (rep.step_search["scales"] or [1.0]))  # never below it
    chosen = [t for t in trials if abs(t["mean_scale"] - rep.step_scale) < 1e-9][-1]
    assert chosen["locality_changed"] <= 0.5 or rep.step_scale == 1.0
    assert rep.seconds["step"] > 0
    es_auto = evaluate(model, toy_tokenizer, reqs, generation=False)["ES"]
    es_paper = evaluate(twin, toy_tokenizer, reqs, generation=False)["ES"]
    assert es_auto >= es_paper
    assert rep.step_scale > 1.0 and es_auto > es_paper


def _tapped_search(model, modules, tok, reqs, locality_check):
    """A turn's step search, its locality keys taken at the editor's modules."""
    targets = UltraEditor(model, tok, modules=modules, lr=LR).targets
    taps = {t.name: t.module for t in targets}
    return StepSearch(model, tok, reqs, taps=taps, locality_check=locality_check)


def test_the_search_checks_what_greedy_decoding_produces(toy_tokenizer):
    model, modules = make_tiny("llama")
    reqs = random_requests(6, seed=2)
    search = _tapped_search(model, modules, toy_tokenizer, reqs, "decoded")
    taken, changed = search.measure()
    assert changed == 0.0  # the pre-turn model keeps its own continuations
    m = evaluate(model, toy_tokenizer, reqs)
    assert sum(taken) / len(taken) == pytest.approx(m["ES_gen"], abs=1 / len(reqs))
    none = StepSearch(model, toy_tokenizer, [r.__class__(r.prompt, r.target) for r in reqs])
    assert none.locality_kind == "anchors" and none.locality
    keys = search.locality_keys()
    n_rows = sum(sum(l != -100 for l in t.labels) for t in search.locality + search.preserved)
    assert {k: v.shape[0] for k, v in keys.items()} == {n: n_rows for n in modules}


def test_answer_checks_what_greedy_decoding_is_proved_to_produce(toy_tokenizer, monkeypatch):
    """locality_check="answer": each locality row is its prompt and the tokens the pre-turn
    model's full pass proves greedy decoding produces (its given answer's tokens up to the
    first it does not predict, and its own token there); no decoding runs."""
    from ultraedit_fast.core import step_search
    from ultraedit_fast.scoring.generation import greedy_decode

    # the toy tokenizer gives every answer a leading space token the tiny model never
    # predicts: draft the answer without it, so that a draft can be accepted
    monkeypatch.setattr(
        step_search, "_answer_ids", lambda tok, a: tok(a, add_special_tokens=False)["input_ids"]
    )
    model, modules = make_tiny("llama", seed=1)
    reqs = random_requests(6, seed=5)
    own = None
    for i, r in enumerate(reqs):  # one locality answer is the model's own continuation
        ids = toy_tokenizer(r.locality_prompt)["input_ids"]
        g = greedy_decode(model, toy_tokenizer, [ids], [3], stop_at_eos=False)[0]
        if min(g) >= 3:
            own = reqs[i] = dataclasses.replace(r, locality_answer=toy_tokenizer.decode(g))
            break
    assert own is not None
    search = _tapped_search(model, modules, toy_tokenizer, reqs, "answer")
    assert search.measure()[1] == 0.0 and not search.preserved
    for r, row in zip(reqs, search.locality):
        labelled = [lab for lab in row.labels if lab != -100]
        prompt = row.input_ids[: len(row.input_ids) - len(labelled) + 1]
        assert prompt == toy_tokenizer(r.locality_prompt)["input_ids"]
        got = greedy_decode(model, toy_tokenizer, [prompt], [len(labelled)], stop_at_eos=False)
        assert got[0] == labelled
        answer = toy_tokenizer(r.locality_answer, add_special_tokens=False)["input_ids"]
        assert labelled[:-1] == answer[: len(labelled) - 1]  # the accepted draft
        if r is own:
            assert len(labelled) == 4  # the whole answer accepted, and the token after it
    # the keys: at every drafted position (the given answer and the token after it)
    n_rows = sum(len(r.locality_answer) + 1 for r in reqs)
    keys = search.locality_keys()
    assert {k: v.shape[0] for k, v in keys.items()} == {n: n_rows for n in modules}
    with pytest.raises(ValueError, match="locality_check"):
        StepSearch(model, toy_tokenizer, reqs, locality_check="greedy")
    # no edited modules known (checks run full passes) and no taps: the same rows
    bare = StepSearch(model, toy_tokenizer, reqs, locality_check="answer")
    assert not bare.checks.resumed and not bare.locality_keys()
    assert [r.labels for r in bare.locality] == [r.labels for r in search.locality]


def test_rescaled_with_all_ones_is_the_plan():
    plan = [("t", torch.ones(3, 2), torch.ones(3, 4))]
    assert rescaled(Plan(plan, [(None, None)]), torch.zeros(3, dtype=torch.long), [1.0]) is plan


@pytest.mark.slow
@pytest.mark.parametrize("n,regime", [(FACTS_TURN_MAX, "facts"), (FACTS_TURN_MAX + 1, "stream")])
def test_the_first_turn_chooses_the_regime(fresh_smollm2, n, regime):
    model, tok = fresh_smollm2
    ed = UltraEditor(model, tok, undo=True)
    stream = list(ed.module_names)
    reqs = [EditRequest(f"Fact number {i} is", f"value {i}") for i in range(n)]
    ed.edit(reqs)
    try:
        assert ed.config.regime == regime
        if regime == "facts":
            assert ed.module_names != stream and ed.config.step == "auto"
            assert ed.preset.endswith("(facts)")
        else:
            assert ed.module_names == stream and ed.config.step == "paper"
    finally:
        ed.rollback()


def test_given_modules_or_lr_keep_the_paper_step():
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR)
    ed.edit(random_requests(3))
    assert ed.config.step == "paper" and ed.module_names == modules
    with pytest.raises(ValueError, match="regime: expected one of"):
        UltraEditor(model, ToyTokenizer(), regime="few")
    with pytest.raises(ValueError, match="step: expected one of"):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, step="bigger")
    with pytest.raises(ValueError, match="locality_budget"):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, locality_budget=1.5)


def test_the_first_turn_searches_wider_than_the_later_ones(toy_tokenizer):
    """first_step_scale caps the editor's first turn, max_step_scale every later one (a
    loaded editor's turns count: its next turn is a later one)."""
    model, modules = make_tiny("llama")
    opts = dict(modules=modules, lr=1e-4, step="auto", locality_budget=0.5)
    ed = UltraEditor(model, toy_tokenizer, max_step_scale=2.0, first_step_scale=256.0, **opts)
    assert (ed.config.max_step_scale, ed.config.first_step_scale) == (2.0, 256.0)
    first = ed.edit(random_requests(8, seed=9))
    later = ed.edit(random_requests(8, seed=10))
    assert first.step_scale > 2.0  # as in the test above: these edits need more than 2x
    assert max(later.step_search["scales"] or [1.0]) <= 2.0
    assert max(t["mean_scale"] for t in later.step_search["trials"]) <= 2.0
    same = UltraEditor(clone_model(model), toy_tokenizer, max_step_scale=2.0, **opts)
    assert same.config.first_step_scale == 2.0  # a cap given alone caps every turn
