"""``whiten_values`` (StableEdit's normaliser) and ``preheat``: the scatter matrix against all
rows at once, the whitening transform against its definition, a turn against the paper's
turn times the transform, and the preheat's warm start."""

import copy

import pytest
import torch

from conftest import make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.core.normalizer import NormalizerState
from ultraedit_fast.core.whiten import value_transform
from ultraedit_fast.kernels.formulas import EPS, normalizer_merge


def _merge_rows(mean, acc, std, ks, gs, n):
    for k, g in zip(ks, gs):
        n = normalizer_merge(mean, acc, std, n, torch.cat([k, g], dim=1))


def _correlated(m, d, gen):
    mix = torch.randn(d, d, generator=gen) / d**0.5
    return (torch.randn(m, d, generator=gen) @ mix + 0.3) * 1e-3


@pytest.mark.parametrize("d_in,d_out,blocks", [(7, 5, (3, 1, 6)), (13, 9, (2, 11, 4, 5))])
def test_the_scatter_matrix_is_all_rows_about_their_mean(d_in, d_out, blocks):
    gen = torch.Generator().manual_seed(d_in)
    state = NormalizerState.zeros(d_in, d_out, "cpu", scatter=True)
    seen = []
    for m in blocks:  # one turn per block size, two mini-batches each
        ks = [torch.randn(m, d_in, generator=gen) for _ in range(2)]
        gs = [_correlated(m, d_out, gen) for _ in range(2)]
        state = state.merged(ks, gs, _merge_rows)
        seen += gs
    g = torch.cat(seen).double()
    want = (g - g.mean(0)).t() @ (g - g.mean(0))
    assert state.n == g.shape[0]
    assert torch.allclose(state.scatter.double(), want, rtol=1e-4, atol=1e-12)
    plain = NormalizerState.zeros(d_in, d_out, "cpu").merged(ks, gs, _merge_rows)
    assert plain.scatter is None


def test_the_transform_whitens_the_gradients():
    gen = torch.Generator().manual_seed(3)
    d_in, d_out = 4, 6
    state = NormalizerState.zeros(d_in, d_out, "cpu", scatter=True)
    ks = [torch.randn(d_out + 1, d_in, generator=gen)]
    state = state.merged(ks, [_correlated(d_out + 1, d_out, gen)], _merge_rows)
    assert value_transform(state) is None  # d_out + 1 rows: the covariance is singular
    g = _correlated(200, d_out, gen)
    state = state.merged([torch.randn(200, d_in, generator=gen)], [g], _merge_rows)
    m = value_transform(state).double()
    # the paper's g_hat = (g - mean) / (std + eps); times m it is (g - mean) C^-1/2
    w = m / (state.std[d_in:].double() + EPS)[:, None]
    cov = state.scatter.double() / (state.n - d_out - 1)
    assert torch.allclose(w.t() @ cov @ w, torch.eye(d_out, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(w, w.t(), atol=1e-6 * float(w.abs().max()))  # the symmetric root


def _editor(model, tokenizer, modules, **kw):
    return UltraEditor(model, tokenizer, modules=modules, lr=0.5, **kw)


def test_a_whitened_turn_is_the_paper_turn_times_the_transform(toy_tokenizer):
    """Same preheat, same requests: the whitened update is ``M^T`` times the paper's, with
    ``M`` from the whitened editor's committed state, since ``V_w = V M``."""
    model, modules = make_tiny("llama")
    warm, reqs = random_requests(60, seed=40), random_requests(8, seed=41)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ea, eb = (
        _editor(a, toy_tokenizer, modules),
        _editor(b, toy_tokenizer, modules, whiten_values=True),
    )
    assert ea.preheat(warm) == eb.preheat(warm) > 0
    ra, rb = ea.edit(reqs), eb.edit(reqs)
    assert ra.stabilisers == [] and rb.stabilisers == ["whiten_values"]
    for name in modules:
        t = next(t for t in eb.targets if t.name == name)
        m = value_transform(eb.normalizers[eb.normalizer_key(t)])
        w0 = model.get_submodule(name).weight
        da = a.get_submodule(name).weight - w0
        db = b.get_submodule(name).weight - w0
        assert float(db.detach().norm()) > 0
        want = m.t() @ da
        # fp32 rounding through C^-1/2: ~1e-5 of the largest entry (9e-6 to 1.1e-5 seen,
        # depending on how the attention sums), against >1e-3 for the paper's update
        assert torch.allclose(db, want, atol=3e-5 * float(want.abs().max())), name
        assert not torch.allclose(db, da, atol=1e-3 * float(da.abs().max()))


def test_preheat_warms_the_statistics_and_writes_nothing(toy_tokenizer):
    model, modules = make_tiny("llama")
    before = copy.deepcopy(model.state_dict())
    ed = _editor(model, toy_tokenizer, modules)
    rows = ed.preheat(random_requests(12, seed=42))
    assert rows > 0 and ed.turns == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    n = {k: s.n for k, s in ed.normalizers.items()}
    keys = [ed.normalizer_key(t) for t in ed.targets]  # modules of one shape share a state
    assert n == {k: rows * keys.count(k) for k in keys} and len(n) == 2
    ed.edit(random_requests(4, seed=43))
    assert all(s.n > n[k] for k, s in ed.normalizers.items())


def test_preheat_needs_the_regime(toy_tokenizer):
    model, _ = make_tiny("llama")
    ed = UltraEditor(model, toy_tokenizer)  # the generic preset; the first turn picks
    with pytest.raises(ValueError, match="regime='stream' or 'facts'"):
        ed.preheat(random_requests(3, seed=44))
    assert ed.normalizers == {}
    fixed = UltraEditor(model, toy_tokenizer, regime="stream")
    assert fixed.preheat(random_requests(3, seed=44)) > 0 and fixed.normalizers


def test_a_whitened_editor_resumes_bit_for_bit(toy_tokenizer, tmp_path):
    model, modules = make_tiny("llama")
    r0, r1, r2 = (random_requests(n, seed=s) for n, s in ((50, 45), (6, 46), (6, 47)))
    a = copy.deepcopy(model)
    ea = _editor(a, toy_tokenizer, modules, whiten_values=True)
    ea.preheat(r0)
    ea.edit(r1)
    ea.save(tmp_path / "ck")
    b = copy.deepcopy(a)
    ea.edit(r2)
    eb = UltraEditor.load(tmp_path / "ck", b, toy_tokenizer)
    assert eb.config.whiten_values
    assert all(s.scatter is not None for s in eb.normalizers.values())
    assert eb.edit(r2).stabilisers == ["whiten_values"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_lifelong_run_preheats_on_the_records_after_its_own(toy_tokenizer):
    from ultraedit_fast.lifelong import run_lifelong

    model, modules = make_tiny("llama")
    reqs = random_requests(10, seed=48)
    kw = dict(turns=2, edits_per_turn=3, modules=modules, lr=0.5, progress=False)
    kw.update(generation=False, health=False, eval_before=False)
    with pytest.raises(ValueError, match="preheat 5 more need 11 requests"):
        run_lifelong(copy.deepcopy(model), toy_tokenizer, reqs, preheat=5, **kw)
    with pytest.raises(ValueError, match="preheat: the reference editor"):
        run_lifelong(model, toy_tokenizer, reqs, preheat=4, editor="reference", **kw)
    a = copy.deepcopy(model)
    res = run_lifelong(a, toy_tokenizer, reqs, preheat=4, **kw)
    ed = _editor(copy.deepcopy(model), toy_tokenizer, modules)
    rows = ed.preheat(reqs[6:])  # the same warm start, then the same two turns
    ed.edit(reqs[:3])
    ed.edit(reqs[3:6])
    assert res["config"]["preheat"] == 4 and rows > 0
    assert res["timing"]["preheat_seconds"] > 0
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), ed.model.state_dict().values())
    )
