"""The step search warns, once per turn and naming the requests, when a turn's requests work
against each other: a locality prompt that is an edit prompt of the turn (its own or
another's: the locality check then fights that edit), or one prompt given two different
targets (they cannot both take). It warns; it does not refuse."""

import warnings

import pytest

from conftest import ToyTokenizer, make_tiny
from ultraedit_fast import EditRequest, UltraEditor
from ultraedit_fast.core import step_search

pytestmark = pytest.mark.usefixtures("one_thread")


def R(prompt, target, loc=None):
    return EditRequest(
        prompt, target, locality_prompt=loc, locality_answer=None if loc is None else "z"
    )


CONFLICTS = {
    "own locality prompt": ([R("x is", "a", "y is"), R("w is", "c", "w is")], ["[1]"]),
    "own, spaced differently": ([R("x is", "a", " x  is "), R("w is", "c")], ["[0]"]),
    "another's prompt": ([R("x is", "a"), R("w is", "c", "x is")], ["requests[1]", "requests[0]"]),
    "two targets": ([R("x is", "a"), R("w is", "c"), R("x is", "b")], ["[0, 2]"]),
    "three targets": ([R("v is", "a"), R("v is", "b"), R("v is", "d")], ["[0, 1, 2]"]),
}
CLEAN = {
    "distinct": [R("x is", "a", "y is"), R("w is", "c", "u is")],
    "one fact twice": [R("x is", "a"), R("x is", "a")],
    "no locality": [R("x is", "a"), R("w is", "c")],
}


def _ours(caught):
    """The warnings of the step search's own UserWarning subclass."""
    return [
        w
        for w in caught
        if issubclass(w.category, UserWarning)
        and w.category is not UserWarning
        and w.category.__module__ == step_search.__name__
    ]


def _search(requests):
    model, _ = make_tiny("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_search.StepSearch(model, ToyTokenizer(), requests)
    return _ours(caught)


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_conflicting_requests_are_warned_naming_them(case):
    requests, names = CONFLICTS[case]
    found = _search(requests)
    assert len(found) == 1, [str(w.message) for w in found]
    text = str(found[0].message)
    for name in names:
        assert name in text, text


@pytest.mark.parametrize("case", list(CLEAN))
def test_requests_that_do_not_conflict_are_not_warned(case):
    assert _search(CLEAN[case]) == []


def test_the_edit_warns_once_per_turn_and_still_runs():
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, step="auto")
    turn = [R("x is", "a", "x is"), R("w is", "c"), R("w is", "d"), R("u is", "e", "u is")]
    for n in (1, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ed.edit(turn)
        found = _ours(caught)
        assert len(found) == 1, [str(w.message) for w in found]
        text = str(found[0].message)
        assert "[0, 3]" in text and "[1, 2]" in text, text
        assert ed.turns == n
