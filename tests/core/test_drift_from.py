"""``drift_from="unedited"``: the drift budget counts the damage of every turn so far,
against the model before the editor's first turn, kept in the editor's state."""

import copy

import pytest
import torch

from conftest import make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.core.preserve import GeneralDrift

OPTS = dict(lr=0.05, step="auto", drift_budget=1.0)


def _share(reference, model, toy_tokenizer, modules):
    """The share of the drift windows' argmax that differ on ``model`` from ``reference``,
    by a fresh full check (not the editor's)."""
    windows = GeneralDrift.windows_of(toy_tokenizer)
    now = GeneralDrift(windows, model).reference
    return float((now != reference).double().mean())


def _unedited_budget(model, toy_tokenizer, modules):
    """An editor whose (generous) drift budget counts from the unedited model."""
    return UltraEditor(
        model,
        toy_tokenizer,
        modules=modules,
        drift_from="unedited",
        lr=0.5,
        step="auto",
        drift_budget=1.0,
    )


def test_the_first_turn_is_the_turn_budgets(toy_tokenizer):
    model, modules = make_tiny("llama")
    reqs = random_requests(6, seed=21)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = UltraEditor(a, toy_tokenizer, modules=modules, **OPTS).edit(reqs)
    rb = UltraEditor(b, toy_tokenizer, modules=modules, drift_from="unedited", **OPTS).edit(reqs)
    assert ra.step_search["general_changed"] == rb.step_search["general_changed"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_later_turns_count_from_the_unedited_model(toy_tokenizer):
    """On turn 2 the kept step's measured drift is the edited model's against the model
    before turn 1, as a fresh check on copies finds it."""
    model, modules = make_tiny("llama")
    unedited = GeneralDrift(GeneralDrift.windows_of(toy_tokenizer), copy.deepcopy(model)).reference
    ed = _unedited_budget(model, toy_tokenizer, modules)
    ed.edit(random_requests(6, seed=22))
    rep = ed.edit(random_requests(6, seed=23))
    s = rep.step_search
    kept = [
        g for t, g in zip(s["trials"], s["general_changed"]) if t["mean_scale"] == rep.step_scale
    ]
    assert kept, (s["trials"], rep.step_scale)
    want = _share(unedited, model, toy_tokenizer, modules)
    assert want > 0  # the check can tell the two references apart
    assert kept[-1] == pytest.approx(want, abs=1e-12)


def test_a_spent_budget_keeps_the_published_step(toy_tokenizer):
    model, modules = make_tiny("llama")
    ed = _unedited_budget(model, toy_tokenizer, modules)
    ed.edit(random_requests(6, seed=24))
    ed.configure(drift_budget=0.0)
    rep = ed.edit(random_requests(6, seed=25))
    assert rep.step_search["general_changed"][0] > 0.0
    assert rep.step_scale == 1.0 and len(rep.step_search["trials"]) == 1


def test_resumed_runs_keep_the_unedited_reference(toy_tokenizer, tmp_path):
    model, modules = make_tiny("llama")
    opts = dict(modules=modules, drift_from="unedited", lr=0.5, step="auto", drift_budget=0.05)
    a = copy.deepcopy(model)
    ea = UltraEditor(a, toy_tokenizer, **opts)
    ea.edit(random_requests(6, seed=26))
    ea.save(tmp_path / "ck")
    b = copy.deepcopy(a)
    ra = ea.edit(random_requests(6, seed=27))
    eb = UltraEditor.load(tmp_path / "ck", b, toy_tokenizer)
    rb = eb.edit(random_requests(6, seed=27))
    assert ra.step_search["general_changed"] == rb.step_search["general_changed"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="drift_from"):
        UltraEditor.load(tmp_path / "ck", b, toy_tokenizer, drift_from="turn")


def test_a_bad_drift_from_is_refused(toy_tokenizer):
    model, modules = make_tiny("llama")
    with pytest.raises(ValueError, match="drift_from"):
        UltraEditor(model, toy_tokenizer, modules=modules, lr=0.5, drift_from="yesterday")
