"""model/prefix.py: a packed pass split at the answers (prompts without a graph, answer rows
with one on the prompts' cached keys and values) gives the whole pass's logits and
gradients, and the editor's turn the same update, on every family."""

import pytest
import torch

from conftest import (
    ARCHS,
    VOCAB,
    ToyTokenizer,
    clone_model,
    make_tiny,
    make_windowed_mistral,
    random_requests,
)
from ultraedit_fast import UltraEditor
from ultraedit_fast.model import prefix as P
from ultraedit_fast.model.forward import answer_logits

# (tokens, first answer row, answer rows) per request: a one-token prompt, a request whose
# last rows are not answers, odd sizes
SPEC = [(9, 4, 4), (3, 0, 2), (7, 1, 6), (12, 8, 3), (5, 2, 3)]


def _row(spec=SPEC, seed=0):
    n = sum(t for t, _, _ in spec)
    ids = torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    pos = torch.cat([torch.arange(t) for t, _, _ in spec])[None]
    mask = torch.cat([(torch.arange(t) >= f) & (torch.arange(t) < f + a) for t, f, a in spec])
    return ids, pos, mask[None]


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_split_gives_the_whole_pass(arch, dtype, tol, monkeypatch):
    model, _ = make_tiny(arch, seed=2, dtype=dtype)
    ids, pos, mask = _row()
    seen = []
    attend = P.PrefixSplit.attend
    monkeypatch.setattr(
        P.PrefixSplit, "attend", lambda s, *a: seen.append(s._recording) or attend(s, *a)
    )
    with torch.no_grad():
        whole = answer_logits(model, ids, None, mask, pos)
        split = P.split_for(model, ids, pos, mask)  # the probe runs once, here
        assert split is not None, arch
        seen.clear()
        got = split.logits(model)
    layers = model.config.num_hidden_layers
    assert seen.count(True) == seen.count(False) == layers  # prompts, then answers
    assert split.prefix.n == 4 + 0 + 1 + 8 + 2 and split.suffix.n == 4 + 2 + 6 + 3 + 3
    assert got.shape == whole.shape
    assert _rel(got, whole) < tol, arch
    apart = []  # and each request alone
    for (t, f, a), s in zip(SPEC, ids[0].split([t for t, _, _ in SPEC])):
        with torch.no_grad():
            apart.append(model(input_ids=s[None]).logits[0, f : f + a])
    assert _rel(got, torch.cat(apart)) < tol, arch


def test_gradients_at_answer_rows_equal_the_whole_pass():
    model, modules = make_tiny("qwen2", seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    ids, pos, mask = _row(seed=4)
    tap = model.get_submodule(modules[0])

    def run(split):
        box = {}

        def hook(m, a, out):
            if torch.is_grad_enabled():  # the answer rows' pass, not the prompts'
                out.requires_grad_(True)
                box["out"] = out

        h = tap.register_forward_hook(hook)
        try:
            if split:
                s = P.split_for(model, ids, pos, mask)
                logits, rows = s.logits(model), s.suffix_mask
            else:
                logits, rows = answer_logits(model, ids, None, mask, pos), mask
        finally:
            h.remove()
        (g,) = torch.autograd.grad(logits.logsumexp(-1).sum(), box["out"])
        return logits.detach(), g[0][rows[0]]

    (l1, g1), (l0, g0) = run(True), run(False)
    assert g1.shape == g0.shape and float(g0.abs().max()) > 0
    assert _rel(l1, l0) < 1e-5 and _rel(g1, g0) < 1e-5


def test_where_the_whole_pass_runs():
    model, _ = make_tiny("llama", seed=5)
    ids, pos, mask = _row()
    assert P.split_for(model, ids, None, mask) is None  # not a packed pass
    no_answer = mask.clone()
    no_answer[0, :9] = False  # the first request has no answer row
    assert P.split_for(model, ids, pos, no_answer) is None
    eager = clone_model(model)
    eager.config._attn_implementation = "eager"
    assert P.split_for(eager, ids, pos, mask) is None
    windowed = make_windowed_mistral(10)
    assert P.split_for(windowed, ids, pos, mask) is None  # a request of 12 tokens
    short = [(5, 1, 3), (6, 2, 4)]
    assert P.split_for(windowed, *_row(short)) is not None


def test_one_token_prompts_only():
    model, _ = make_tiny("gemma", seed=6)
    spec = [(4, 0, 3), (2, 0, 1)]
    ids, pos, mask = _row(spec)
    with torch.no_grad():
        split = P.split_for(model, ids, pos, mask)
        assert split is not None and split.prefix.n == 0
        assert _rel(split.logits(model), answer_logits(model, ids, None, mask, pos)) < 1e-5


def _turn(model, modules, split, monkeypatch):
    """Two turns, with the capture split at the answers or not; returns the editor and how
    many of its passes ran split."""
    import ultraedit_fast.core.capture as C

    monkeypatch.setattr(C, "SPLIT", split)
    runs, real = [], P.PrefixSplit.logits
    monkeypatch.setattr(
        P.PrefixSplit, "logits", lambda s, *a, **k: runs.append(1) or real(s, *a, **k)
    )
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=1e-3, batch_size=4)
    for s in range(2):
        ed.edit(random_requests(10, seed=20 + s))
    return ed, len(runs)


def test_a_split_turn_writes_the_whole_pass_turn(monkeypatch):
    model, modules = make_tiny("llama", seed=7)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in modules}
    a, b = clone_model(model), clone_model(model)
    (ea, split_runs), (eb, whole_runs) = (
        _turn(a, modules, True, monkeypatch),
        _turn(b, modules, False, monkeypatch),
    )
    assert split_runs >= 2 and whole_runs == 0  # the probe's run counted only once, if at all
    for n in modules:
        da = a.get_submodule(n).weight.detach() - before[n]
        db = b.get_submodule(n).weight.detach() - before[n]
        assert float(db.abs().max()) > 0
        assert float((da - db).norm() / db.norm()) < 1e-4, n  # as packed vs padded
    for k, s in eb.normalizers.items():
        torch.testing.assert_close(ea.normalizers[k].acc, s.acc, rtol=1e-5, atol=1e-7)


def test_a_model_the_probe_refuses_runs_the_whole_pass(monkeypatch):
    model, _ = make_tiny("llama", seed=8)
    ids, pos, mask = _row()
    attend = P.PrefixSplit.attend

    def wrong(self, module, q, k, v, kw):  # answers that miss their prompts
        if not self._recording:
            self.kv = {i: (x[:, :, :0], y[:, :, :0]) for i, (x, y) in self.kv.items()}
            self.prefix = P.PA.Segments.of_lengths(torch.zeros(len(self.prefix.valid)), "cpu")
        return attend(self, module, q, k, v, kw)

    monkeypatch.setattr(P.PrefixSplit, "attend", wrong)
    assert not P.supports_split(model)
    assert P.split_for(model, ids, pos, mask) is None


def test_a_pass_whose_attention_changed_midway_is_an_error(monkeypatch):
    model, _ = make_tiny("llama", seed=9)
    ids, pos, mask = _row()
    split = P.split_for(model, ids, pos, mask)
    assert split is not None
    monkeypatch.setattr(P.PA, "applies", lambda m: False)  # e.g. another thread set eager
    with pytest.raises(RuntimeError, match="attention implementation changed"):
        with torch.no_grad():
            split.logits(model)


def test_length_dependent_rope_keeps_the_whole_pass():
    model, _ = make_tiny("llama", seed=10)
    ids, pos, mask = _row()
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    assert P.split_for(model, ids, pos, mask) is None
