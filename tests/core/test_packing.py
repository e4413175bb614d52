"""Packed passes: several mini-batches in one forward/backward, each keeping its own mean
loss and normaliser block (docs/algorithm.md section 2), and the probe that decides when a
model may be given packed sequences."""

import pytest
import torch

from conftest import ARCHS, ToyTokenizer, clone_model, make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.model import forward
from ultraedit_fast.model.requests import IGNORE, make_minibatches, pack_minibatches

LR = 1e-4


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_pack_minibatches_groups_in_order_within_the_budget(toy_tokenizer):
    batches = make_minibatches(toy_tokenizer, random_requests(23, seed=5), batch_size=4)
    sizes = [int(b.attention_mask.sum()) for b in batches]
    budget = max(sizes) + 5
    passes = pack_minibatches(batches, budget)
    assert 1 < len(passes) < len(batches)
    assert sum(len(p.counts) for p in passes) == len(batches)
    i = 0
    for p in passes:
        group = batches[i : i + len(p.counts)]
        i += len(p.counts)
        total = sum(int(b.attention_mask.sum()) for b in group)
        assert p.input_ids.shape == p.labels.shape == p.position_ids.shape == (1, total)
        assert total <= budget or len(group) == 1
        # the requests' own tokens and labels, in order, positions restarting per request
        ids, labels, pos = [], [], []
        for b in group:
            for r in range(b.input_ids.shape[0]):
                n = int(b.attention_mask[r].sum())
                ids += b.input_ids[r, :n].tolist()
                labels += b.labels[r, :n].tolist()
                pos += list(range(n))
        assert p.input_ids[0].tolist() == ids and p.labels[0].tolist() == labels
        assert p.position_ids[0].tolist() == pos
        assert p.counts == [b.n_tokens for b in group]
        assert int((p.labels != IGNORE).sum()) == len(p.token_weights) == sum(p.counts)
        # each mini-batch's weights sum to one: its mean, as if it ran alone
        for w in p.token_weights.split(p.counts):
            assert abs(float(w.sum()) - 1.0) < 1e-6 and len(set(w.tolist())) == 1
    assert i == len(batches)
    # a mini-batch larger than the budget still gets a pass of its own
    assert [len(p.counts) for p in pack_minibatches(batches, 1)] == [1] * len(batches)


@pytest.fixture
def passes_seen(monkeypatch):
    """The input shapes of the editor's forward passes, as they run."""
    import ultraedit_fast.core.capture as E

    calls, orig, orig_split = [], forward.answer_logits, E.split_for
    monkeypatch.setattr(
        E, "answer_logits", lambda *a, **k: calls.append(a[1].shape) or orig(*a, **k)
    )

    def split_for(*a, **k):  # a packed pass split at its answers (model/prefix.py)
        split = orig_split(*a, **k)
        if split is not None:
            calls.append(a[1].shape)
        return split

    monkeypatch.setattr(E, "split_for", split_for)
    return calls


def _edit(arch, tokens_per_pass, turns=2, dtype=torch.float32, modules=None):
    model, default = make_tiny(arch, seed=1, dtype=dtype)
    ed = UltraEditor(
        model,
        ToyTokenizer(),
        modules=modules or default,
        lr=LR,
        batch_size=3,
        tokens_per_pass=tokens_per_pass,
    )
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ed.module_names}
    for t in range(turns):
        ed.edit(random_requests(10 + 3 * t, seed=40 + t))
    return model, ed, before


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tokens_per_pass", [40, 150, 100000])
def test_packed_turns_equal_padded_turns(arch, tokens_per_pass):
    padded, ed0, before = _edit(arch, 0)
    packed, ed1, _ = _edit(arch, tokens_per_pass)
    assert forward.supports_packing(packed)  # the packed path is the one compared
    for name in ed0.module_names:
        w0 = padded.get_submodule(name).weight
        w1 = packed.get_submodule(name).weight
        shift0, shift1 = w0 - before[name], w1 - before[name]
        assert shift0.norm() > 1e-3 * before[name].norm()
        assert _rel(shift1, shift0) < 1e-4, name
    for key, s0 in ed0.normalizers.items():
        s1 = ed1.normalizers[key]
        assert s0.n == s1.n
        torch.testing.assert_close(s1.mean, s0.mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s1.acc, s0.acc, rtol=1e-5, atol=1e-7)


def test_packed_turn_runs_fewer_passes(passes_seen):
    model, modules = make_tiny("llama", seed=1)
    calls = passes_seen
    reqs = random_requests(12, seed=3)
    UltraEditor(
        model, ToyTokenizer(), modules=modules, lr=LR, batch_size=3, tokens_per_pass=0
    ).edit(reqs)
    assert len(calls) == 4 and all(s[0] > 1 for s in calls)
    calls.clear()
    UltraEditor(clone_model(model), ToyTokenizer(), modules=modules, lr=LR, batch_size=3).edit(reqs)
    assert len(calls) == 1 and calls[0][0] == 1  # one packed row


def test_bf16_packed_turn_is_close_to_padded():
    padded, ed0, before = _edit("llama", 0, dtype=torch.bfloat16)
    packed, _, _ = _edit("llama", 1024, dtype=torch.bfloat16)
    for name in ed0.module_names:
        s0 = padded.get_submodule(name).weight.float() - before[name].float()
        s1 = packed.get_submodule(name).weight.float() - before[name].float()
        assert _rel(s1, s0) < 0.05, name


def test_probe_refuses_packing_when_requests_would_attend_to_each_other(monkeypatch, passes_seen):
    """Without transformers' packed-sequence masks (as in its older versions), one
    request would see the one before it under an attention that reads the mask (eager):
    the probe must notice and the editor pad. Under sdpa the package's grouped attention
    (model/packed_attention.py) keeps requests apart without the mask: packing stays."""
    import transformers.masking_utils as mu

    if not hasattr(mu, "find_packed_sequence_indices"):
        pytest.skip("this transformers has no packed-sequence masks")
    model, modules = make_tiny("llama", seed=1)
    assert forward.supports_packing(model)
    other, grouped = clone_model(model), clone_model(model)
    other.config._attn_implementation = "eager"
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    assert not forward.supports_packing(other)  # a fresh probe, on a fresh model
    assert forward.supports_packing(model)  # cached per model
    assert forward.supports_packing(grouped)  # sdpa: grouped, the mask not needed
    ed = UltraEditor(other, ToyTokenizer(), modules=modules, lr=LR, batch_size=3)
    ed.edit(random_requests(9, seed=2))
    assert len(passes_seen) == 3  # padded mini-batches


def test_models_without_the_rows_path_do_not_pack():
    model, _ = make_tiny("llama")
    model.config.model_type = "something-else"
    assert not forward.supports_packing(model)


def test_tokens_per_pass_is_validated():
    model, modules = make_tiny("llama")
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="tokens_per_pass"):
            UltraEditor(model, ToyTokenizer(), modules=modules, tokens_per_pass=bad)
