"""Property tests over random requests: any unicode (emoji, CJK, combining marks,
whitespace-only, control characters), any length, any mini-batch size, odd tokenizers.

Properties: an edit either succeeds or raises one of the documented exceptions
(``ValueError``, including ``EditRefused``, or ``TypeError``); when it is refused the
model is byte-identical and the editor's state untouched; when it succeeds, rolling it
back restores the model byte for byte.
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import LossyTokenizer, ToyTokenizer, make_tiny
from ultraedit_fast import EditRequest, UltraEditor
from ultraedit_fast.model.requests import as_requests, make_minibatches, IGNORE


pytestmark = pytest.mark.usefixtures("one_thread")


TOKENIZERS = {
    "toy": ToyTokenizer(),
    "lossy": LossyTokenizer(),
    "lossy-nobos": LossyTokenizer(False),
}

SPECIAL = [
    "😀",
    "👍🏽",
    "👨‍👩‍👧",
    "東京",
    "北",
    "한국",
    "e\u0301",
    "\u0301",
    "\u0308\u0323",
    " ",
    "\t",
    "\n",
    "\u3000",
    "\u200b",
    "\u00a0",
    "\x00",
    "\ufeff",
    "Paris",
    "the ",
    "42",
]
good_text = st.one_of(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),
    st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=8).map("".join),
)
bad_text = st.one_of(
    st.just(""),
    st.text(st.sampled_from(" \t\n\u3000\u00a0"), min_size=1, max_size=4),  # whitespace only
    st.integers(60, 140).map(lambda n: "ab " * n),  # at and beyond the 128-token context
)
# mostly good text, so that about half the turns are made and rolled back
# (hypothesis favours small integers: sampled_from draws the branches more evenly)
text = st.sampled_from([False] * 11 + [True]).flatmap(lambda bad: bad_text if bad else good_text)
request = st.builds(lambda p, t: {"prompt": p, "target": t}, text, text)
junk = st.one_of(st.none(), st.integers(), st.just("a prompt"), st.just({"prompt": "x"}))


def _insert(reqs, add, thing, where):
    if add:  # now and then, something that is no request
        reqs.insert(min(where, len(reqs)), thing)
    return reqs


def request_lists():
    return st.builds(
        _insert,
        st.lists(st.one_of(request, request.map(_maybe_request)), max_size=6),
        st.sampled_from([False] * 9 + [True]),
        junk,
        st.integers(0, 6),
    )


def _maybe_request(d):
    try:
        return EditRequest(**d)
    except (TypeError, ValueError):
        return d


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def shared_model():
    model, modules = make_tiny("llama")
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, modules, original


def _identical(model, original):
    return all(torch.equal(bits(v), bits(original[k])) for k, v in model.state_dict().items())


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    requests=request_lists(),
    tokenizer=st.sampled_from(sorted(TOKENIZERS)),
    batch_size=st.integers(1, 12),
    lr=st.sampled_from([1e-4, 1e-4, 3e-2, 1e38]),
)
def test_edit_is_refused_cleanly_or_rolls_back_exactly(
    shared_model, requests, tokenizer, batch_size, lr
):
    model, modules, original = shared_model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ed = UltraEditor(
                model,
                TOKENIZERS[tokenizer],
                modules=modules,
                lr=lr,
                batch_size=batch_size,
                undo=True,
            )
        try:
            report = ed.edit(requests)
        except (ValueError, TypeError) as e:  # the documented refusals (EditRefused too)
            event(f"refused: {type(e).__name__}")
            assert _identical(model, original), "a refused edit changed the model"
            assert ed.turns == 0 and ed.normalizers == {} and ed.undo_turns == 0
            return
        event("edited")
        assert ed.turns == 1 and report.n_requests == len(requests)
        assert all(torch.isfinite(t.weight).all() for t in ed.targets)
        ed.rollback()
        assert _identical(model, original), "rollback did not restore the model"
        assert ed.turns == 0 and ed.normalizers == {}
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(original[k])


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(request, min_size=1, max_size=9),
    batch_size=st.integers(1, 5),
    tokenizer=st.sampled_from(sorted(TOKENIZERS)),
)
def test_minibatches_are_well_formed_or_refused(requests, batch_size, tokenizer):
    """Tokenisation never fails but with a ValueError/TypeError; when it succeeds every
    request is in exactly one right-padded mini-batch, longest first, with at least one
    answer token, and every answer token's label is a real id."""
    tok = TOKENIZERS[tokenizer]
    try:
        reqs = as_requests(requests)
        batches = make_minibatches(tok, reqs, batch_size, max_length=128)
    except (ValueError, TypeError):
        return
    order = [i for b in batches for i in b.order]
    assert sorted(order) == list(range(len(reqs)))
    lengths = [int(b.attention_mask[j].sum()) for b in batches for j in range(len(b.order))]
    assert lengths == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b.order) <= batch_size
        assert b.input_ids.shape[1] <= 128
        for j in range(len(b.order)):
            n = int(b.attention_mask[j].sum())
            assert b.attention_mask[j, :n].all() and not b.attention_mask[j, n:].any()
            labels = b.labels[j]
            assert (labels[:n] != IGNORE).sum() >= 1 and (labels[n:] == IGNORE).all()
            assert (labels[labels != IGNORE] >= 0).all()
