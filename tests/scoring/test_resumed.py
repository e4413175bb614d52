"""Teacher-forced passes resumed at the lowest edited block (ultraedit_fast.scoring.resumed):
the same predictions as full passes, before and after the upper blocks change; kept states
dropped when a lower block changes; nothing kept past the byte cap; per thread and model;
a lifelong run scores the same with and without."""

import copy
import threading

import pytest
import torch

from conftest import random_requests, tiny_llama
from ultraedit_fast.lifelong.runner import run_lifelong
from ultraedit_fast.scoring import resumed as R
from ultraedit_fast.scoring.teacher import _tokenized, predictions_at_labels


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama(layers=6)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def _toks(tok, n=40, seed=3):
    reqs = random_requests(n, seed=seed)
    pairs = [(r.prompt, r.target) for r in reqs]
    pairs += [(r.locality_prompt, r.locality_answer) for r in reqs]
    return _tokenized(tok, pairs, None, None, False)


def _shift(model, blocks, seed):
    """A large random change of the MLP of ``blocks`` (what an edit does, and more)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in blocks:
            w = model.model.layers[i].mlp.up_proj.weight
            w.add_(torch.randn(w.shape, generator=g) * 3 * w.std())


def _unique(toks):
    return len({R._key(t) for t in toks})


def test_same_predictions_as_full_passes_as_the_upper_blocks_change(
    model, toy_tokenizer, one_thread
):
    toks = _toks(toy_tokenizer)
    passes = R.ResumedPasses(model, 3, group=16)
    with passes.active():
        first = predictions_at_labels(model, toks, 8)
    assert first == predictions_at_labels(model, toks, 8)  # outside: full passes
    assert passes.counts == {"full": _unique(toks), "resumed": 0, "again": 0}
    assert passes.nbytes > 0
    for seed in range(2):
        _shift(model, [3, 4, 5], seed)
        want = predictions_at_labels(model, toks, 8)
        with passes.active():
            got = predictions_at_labels(model, toks[5:30] + toks[:3], 8)
        assert got == want[5:30] + want[:3]
    assert passes.counts["resumed"] >= 2 * 28 and passes.counts["again"] == 0
    assert want != first  # the changes moved some predictions: the check can fail


def test_new_and_repeated_sequences_in_one_call(model, toy_tokenizer, one_thread):
    toks = _toks(toy_tokenizer)
    passes = R.ResumedPasses(model, 2, group=7)
    with passes.active():
        predictions_at_labels(model, toks[:20], 8)
    _shift(model, [2, 5], 0)
    asked = toks + toks[:4] + toks[30:33]
    with passes.active():
        got = predictions_at_labels(model, asked, 8)
    assert got == predictions_at_labels(model, asked, 8)
    assert passes.counts["full"] == _unique(toks)


def test_a_change_below_the_start_drops_what_was_kept(model, toy_tokenizer, one_thread):
    toks = _toks(toy_tokenizer, 12)
    passes = R.ResumedPasses(model, 3)
    with passes.active():
        predictions_at_labels(model, toks, 8)
    _shift(model, [1], 0)
    with passes.active():
        got = predictions_at_labels(model, toks, 8)
    assert got == predictions_at_labels(model, toks, 8)
    assert passes.counts == {"full": 2 * _unique(toks), "resumed": 0, "again": 0}
    with passes.active():  # a change inside one active block counts the same
        predictions_at_labels(model, toks, 8)
        with torch.no_grad():  # the embeddings count too
            model.model.embed_tokens.weight[5] += 1.0
        got = predictions_at_labels(model, toks, 8)
    assert got == predictions_at_labels(model, toks, 8)
    assert passes.counts == {"full": 3 * _unique(toks), "resumed": 0, "again": _unique(toks)}


def test_nothing_kept_past_the_byte_cap(model, toy_tokenizer, one_thread):
    toks = _toks(toy_tokenizer, 10)
    passes = R.ResumedPasses(model, 3, max_bytes=0)
    for _ in range(2):
        with passes.active():
            predictions_at_labels(model, toks, 8)
    assert passes.nbytes == 0 and passes.counts["resumed"] == 0


def test_only_this_thread_and_this_model(model, base_model, toy_tokenizer, one_thread):
    toks = _toks(toy_tokenizer, 6)
    passes = R.ResumedPasses(model, 3)
    seen = []
    with passes.active():
        assert R.active_for(model) is passes
        assert R.active_for(base_model) is None
        t = threading.Thread(target=lambda: seen.append(R.active_for(model)))
        t.start()
        t.join()
        predictions_at_labels(base_model, toks, 8)
    assert seen == [None]
    assert R.active_for(model) is None
    assert passes.counts == {"full": 0, "resumed": 0, "again": 0}


def test_start_and_modules_checked(model):
    with pytest.raises(ValueError, match="start"):
        R.ResumedPasses(model, 0)
    with pytest.raises(ValueError, match="group"):
        R.ResumedPasses(model, 2, group=0)
    layers = model.model.layers
    assert R.ResumedPasses.for_modules(model, [layers[0].mlp.up_proj]) is None
    assert R.ResumedPasses.for_modules(model, [layers[4].mlp, layers[2].mlp]).start == 2
    assert R.lower_fingerprint(model, 6) is None  # no block above to resume
    passes = R.ResumedPasses(model, 9)  # past the last block: turns itself off
    with passes.active():
        assert R.active_for(model) is None
    assert not passes.enabled


def test_lifelong_scores_the_same_resumed(base_model, toy_tokenizer, one_thread):
    reqs = random_requests(12, seed=5)
    runs = {}
    for resumed in (True, False):
        res = run_lifelong(
            copy.deepcopy(base_model),
            toy_tokenizer,
            reqs,
            turns=3,
            edits_per_turn=4,
            eval_every=1,
            progress=False,
            plot=False,
            health=False,
            modules=["model.layers.3.mlp.up_proj", "model.layers.4.mlp.up_proj"],
            lr=1e-1,
            eval_resumed=resumed,
        )
        runs[resumed] = res
    on, off = runs[True], runs[False]
    assert on["metrics_before"] == off["metrics_before"]
    assert [e["metrics"] for e in on["eval_history"]] == [e["metrics"] for e in off["eval_history"]]
    assert on["metrics"]["ES"] != on["metrics_before"]["ES"]  # the edits moved the scores
    assert on["eval_passes"]["start_block"] == 3 and on["eval_passes"]["resumed"] > 0
    assert "eval_passes" not in off and off["config"]["eval_resumed"] is False


def test_an_unchanged_model_is_answered_from_the_last_pass(
    model, toy_tokenizer, one_thread, monkeypatch
):
    toks = _toks(toy_tokenizer, 20)
    runs = []
    real = R.ResumedForward.predictions
    monkeypatch.setattr(R.ResumedForward, "predictions", lambda self: runs.append(1) or real(self))
    passes = R.ResumedPasses(model, 3, group=8)
    with passes.active():
        first = predictions_at_labels(model, toks, 8)
        again = predictions_at_labels(model, toks[::-1], 8)
    assert again == first[::-1] and runs == []  # nothing changed: no pass at all
    assert passes.counts["again"] == _unique(toks)
    _shift(model, [4], 0)
    with passes.active():
        got = predictions_at_labels(model, toks, 8)
    assert len(runs) == -(-_unique(toks) // 8) > 1  # every kept group once
    assert got == predictions_at_labels(model, toks, 8) != first
    with passes.active():
        predictions_at_labels(model, toks, 8)
        with torch.no_grad():  # the output layer (its argmax margins were kept), in one block
            model.lm_head.weight[7] *= 3.0
        got = predictions_at_labels(model, toks, 8)
    assert got == predictions_at_labels(model, toks, 8)
    assert passes.counts["full"] == 2 * _unique(toks)  # everything kept was dropped


def test_whole_network_passes_given_again_while_nothing_changes(model, toy_tokenizer, one_thread):
    from ultraedit_fast.scoring import health as H
    from ultraedit_fast.scoring.generation import next_token_logprobs

    prompts = [r.prompt for r in random_requests(9, seed=2)]
    windows = torch.randint(3, 101, (3, 12), generator=torch.Generator().manual_seed(0))
    passes = R.ResumedPasses(model, 3)
    with passes.active():
        lp = next_token_logprobs(model, toy_tokenizer, prompts, 4)
        nll, top = H._window_stats(model, windows, 2)
        lp.zero_()  # a copy: what is kept stays as it was
        again = next_token_logprobs(model, toy_tokenizer, prompts, 4)
        assert torch.equal(H._window_stats(model, windows, 2)[0], nll)
    assert passes.counts == {"full": 2, "resumed": 0, "again": 2}
    assert torch.equal(again, next_token_logprobs(model, toy_tokenizer, prompts, 4))
    _shift(model, [5], 0)
    with passes.active():
        after = next_token_logprobs(model, toy_tokenizer, prompts, 4)
    assert passes.counts == {"full": 3, "resumed": 0, "again": 2}
    assert torch.equal(after, next_token_logprobs(model, toy_tokenizer, prompts, 4))
    assert not torch.equal(after, again)


def test_rows_settled_by_the_kept_margins_match_full_passes(model, toy_tokenizer, one_thread):
    """A small change (as one edit makes): most rows' argmax is settled by the kept margin
    without the output layer, and every row still matches a full pass."""
    toks = _toks(toy_tokenizer)
    passes = R.ResumedPasses(model, 3)
    with passes.active():
        predictions_at_labels(model, toks, 8)
    with torch.no_grad():
        w = model.model.layers[4].mlp.up_proj.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 1e-3 * w.std())
    with passes.active():
        got = predictions_at_labels(model, toks, 8)
    assert got == predictions_at_labels(model, toks, 8)
    assert sum(g.settled for g in passes._groups) > 0
    assert passes.counts["resumed"] == _unique(toks)
