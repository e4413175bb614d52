"""ResumedForward (model/partial.py): the step search's checks run from the lowest edited
block give the full pass's argmax, on every family, after the edited blocks change."""

import pytest
import torch

from conftest import ARCHS, make_tiny, random_requests
from ultraedit_fast.model.partial import ResumedForward, lowest_block
from ultraedit_fast.model.requests import tokenize_pair
from ultraedit_fast.scoring.metrics import predictions_at_labels


def _toks(tok, n, seed):
    return [tokenize_pair(tok, r.prompt, r.target) for r in random_requests(n, seed=seed)]


def _perturb(model, names, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            w = model.get_submodule(n).weight
            w.add_(scale * torch.randn(w.shape, generator=g).to(w.dtype))


@pytest.mark.parametrize("arch", ARCHS)
def test_resumed_checks_match_the_full_pass(arch, toy_tokenizer):
    model, modules = make_tiny(arch, seed=3)
    start = lowest_block(model, [model.get_submodule(m) for m in modules])
    assert start == min(int(m.split(".")[-3]) for m in modules)
    toks = _toks(toy_tokenizer, 13, seed=5)  # odd count, batches of 4: a short last batch
    checks = ResumedForward(model, toks, start, batch_size=4)
    assert checks.resumed, arch
    assert checks.first == predictions_at_labels(model, toks, 4)
    for seed in range(3):  # the edited blocks change: the resumed pass follows them
        _perturb(model, modules, seed)
        full = predictions_at_labels(model, toks, 4)
        got = checks.predictions()
        assert got == full, arch
    assert checks.first != full  # the perturbation did change some argmax: not vacuous


def test_unknown_modules_and_bad_start_run_full_passes(toy_tokenizer):
    model, modules = make_tiny("llama", seed=1)
    assert lowest_block(model, [torch.nn.Linear(2, 2)]) is None
    assert lowest_block(model, []) is None
    toks = _toks(toy_tokenizer, 5, seed=2)
    for start in (None, 99):
        checks = ResumedForward(model, toks, start, batch_size=2)
        assert not checks.resumed
        _perturb(model, ["model.layers.0.mlp.up_proj"], 0)  # below any start: still seen
        assert checks.predictions() == predictions_at_labels(model, toks, 2)


def test_a_mismatch_falls_back_to_full_passes(toy_tokenizer, monkeypatch):
    """A family whose top is not "blocks -> norm -> head" (simulated: the resumed pass
    computes something else) is caught at construction and runs full passes."""
    from ultraedit_fast.model import partial

    model, modules = make_tiny("llama", seed=4)
    monkeypatch.setattr(partial, "_FINAL_NORMS", ("no_such_norm",))
    toks = _toks(toy_tokenizer, 6, seed=9)
    checks = ResumedForward(model, toks, 2, batch_size=3)
    assert not checks.resumed
    _perturb(model, modules, 1)
    assert checks.predictions() == predictions_at_labels(model, toks, 3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_until_stops_above_the_highest_module(arch):
    from ultraedit_fast.model.forward import forward_until

    model, modules = make_tiny(arch, seed=2)
    mods = [model.get_submodule(m) for m in modules]
    ids = torch.randint(3, 90, (3, 11))
    seen, top_ran = {}, []

    def keep(name):
        return lambda m, a, o: seen.setdefault(name, []).append(a[0].clone())

    handles = [m.register_forward_hook(keep(n)) for n, m in zip(modules, mods)]
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    handles.append(blocks[-1].register_forward_hook(lambda *a: top_ran.append(1)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        full = {n: v[-1] for n, v in seen.items()}
        assert top_ran == [1]
        assert forward_until(model, mods, input_ids=ids) is True
    for h in handles:
        h.remove()
    assert top_ran == [1]  # the top block did not run the second time
    for n in modules:
        assert len(seen[n]) == 2 and torch.equal(seen[n][1], full[n])
    # a module the pass never reaches: the whole pass runs, and it says so
    assert forward_until(model, [torch.nn.Linear(2, 2)], input_ids=ids) is False
