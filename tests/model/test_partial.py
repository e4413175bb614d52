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


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_small_changes_skip_the_output_layer_and_keep_every_argmax(arch, toy_tokenizer):
    """The bound of the module docstring answers the rows a small change cannot flip without
    the output layer; every answer still equals the full pass's, and a large change sends
    the rows through the output layer again."""
    model, modules = make_tiny(arch, seed=6)
    start = lowest_block(model, [model.get_submodule(m) for m in modules])
    toks = _toks(toy_tokenizer, 11, seed=8)
    checks = ResumedForward(model, toks, start, batch_size=64)
    assert checks.resumed and checks._wn is not None
    _perturb(model, modules, 3, scale=1e-5)
    assert checks.predictions() == predictions_at_labels(model, toks, 4)
    assert checks.settled > 0  # some rows answered by the bound: not vacuous
    small = checks.settled
    _perturb(model, modules, 4, scale=1.0)
    full = predictions_at_labels(model, toks, 4)
    assert checks.predictions() == full
    assert checks.settled < small


def test_batches_hold_a_token_budget():
    from ultraedit_fast.model.partial import token_batches

    lengths = [5, 9, 3, 9, 7, 2, 30]
    groups = token_batches(lengths, batch_size=3, tokens=20)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) <= 3 and (len(g) == 1 or len(g) * longest <= 20)
    assert [6] in groups  # longer than the budget: alone
    padded = token_batches(lengths, batch_size=4, tokens=20)
    packed = token_batches(lengths, batch_size=4, tokens=20, packed=True)
    assert sorted(i for g in packed for i in g) == list(range(len(lengths)))
    for g in packed:
        assert len(g) <= 4 and (len(g) == 1 or sum(lengths[i] for i in g) <= 20)
    assert len(packed) < len(padded)  # no padding: fewer groups


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_taps_keep_the_inputs_at_the_tapped_labelled_positions(arch, toy_tokenizer):
    """The full pass's taps equal each module's input in a plain forward at the labelled
    positions of the sequences from ``tap_from`` on, ``extra`` ones included (the mistral
    tiny model edits its last block's MLP, which the pass runs on labelled rows only)."""
    model, modules = make_tiny(arch, seed=2)
    mods = {m: model.get_submodule(m) for m in modules}
    toks, extra = _toks(toy_tokenizer, 7, seed=3), _toks(toy_tokenizer, 4, seed=4)
    start = lowest_block(model, list(mods.values()))
    checks = ResumedForward(model, toks, start, batch_size=3, extra=extra, taps=mods, tap_from=5)
    want = {m: [] for m in modules}
    seen = {}
    handles = [
        mod.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0][0]))
        for n, mod in mods.items()
    ]
    try:
        with torch.no_grad():
            for t in (toks + extra)[5:]:
                model(input_ids=torch.tensor([t.input_ids]), use_cache=False)
                at = torch.tensor(t.labels) != -100
                for n in modules:
                    want[n].append(seen[n][at].float())
    finally:
        for h in handles:
            h.remove()
    assert set(checks.keys) == set(modules)
    for n in modules:
        got, exp = checks.keys[n], torch.cat(want[n])
        assert got.shape == exp.shape
        # rows in the checks' batch order: compare as multisets, sorted by a projection
        u = torch.randn(got.shape[1], generator=torch.Generator().manual_seed(0))
        a, b = got[(got @ u).argsort()], exp[(exp @ u).argsort()]
        assert float((a - b).abs().max()) < 1e-4 * float(exp.abs().max())


def test_restrict_checks_the_kept_prefix_of_each_sequence(toy_tokenizer):
    from ultraedit_fast.model.requests import TokenizedRequest

    model, modules = make_tiny("llama", seed=5)
    start = lowest_block(model, [model.get_submodule(m) for m in modules])
    toks = _toks(toy_tokenizer, 6, seed=7)
    checks = ResumedForward(model, toks, start, batch_size=4)
    keep = {1: [7], 4: [9, 11]}
    checks.restrict(keep)
    cut = []
    for i, t in enumerate(toks):
        if i in keep:
            n0 = next(j for j, l in enumerate(t.labels) if l != -100)
            k = len(keep[i])
            cut.append(TokenizedRequest(t.input_ids[: n0 + k], [-100] * n0 + keep[i]))
        else:
            cut.append(t)
    assert [lab for _, lab in checks.first] == [[l for l in t.labels if l != -100] for t in cut]
    _perturb(model, modules, 2)
    assert checks.predictions() == predictions_at_labels(model, cut, 4)
    before = checks.predictions()
    with pytest.raises(ValueError, match="keep"):
        checks.restrict({0: [1], 3: [1] * 99})  # refused whole: nothing restricted
    assert checks.predictions() == before


@pytest.mark.parametrize("packed", [True, False])
def test_packed_and_padded_checks_agree(packed, toy_tokenizer, monkeypatch):
    """The checks' sequences run packed (one row, positions restarting) where the model
    supports it, padded otherwise: both give the full pass's argmax, also after a change."""
    from ultraedit_fast.model import partial

    model, modules = make_tiny("llama", seed=7)
    if not packed:
        monkeypatch.setattr(partial, "supports_packing", lambda m: False)
    toks = _toks(toy_tokenizer, 9, seed=1)
    checks = ResumedForward(model, toks, 1, batch_size=64)
    assert checks.resumed
    assert (checks._inputs[0][2] is not None) == packed  # position ids: packed
    assert checks.first == predictions_at_labels(model, toks, 4)
    _perturb(model, modules, 5)
    assert checks.predictions() == predictions_at_labels(model, toks, 4)


def test_the_bound_applies_only_to_a_plain_dense_output_layer():
    from ultraedit_fast.model.partial import _boundable

    assert _boundable(torch.nn.Linear(4, 6))
    assert not _boundable(torch.nn.Linear(4, 6, device="meta"))  # offloaded
    hooked = torch.nn.Linear(4, 6)
    hooked._hf_hook = object()  # accelerate moves its weight in and out
    assert not _boundable(hooked)
    assert not _boundable(torch.nn.Embedding(6, 4))
