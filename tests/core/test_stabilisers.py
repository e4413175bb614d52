"""The stabilisers: options beside the paper's turn, each off by default where the paper
mode must stay exactly the paper's, each doing what it says when on."""

import copy

import pytest
import torch

from conftest import make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.core.preserve import GeneralKeys
from ultraedit_fast.core.solve import ShiftSolver, norm_anchored
from ultraedit_fast.model.targets import resolve_targets


@pytest.mark.parametrize("n, d", [(7, 13), (19, 5)])  # dual and primal
def test_the_ridge_is_the_solves_regulariser(n, d):
    g = torch.Generator().manual_seed(n)
    k = torch.randn(n, d, generator=g, dtype=torch.float64).float()
    v = torch.randn(n, 3, generator=g, dtype=torch.float64).float()
    for r in (1.0, 10.0):
        a, kk = ShiftSolver(k.clone(), ridge=r).factors(v)
        delta = (a.t() @ kk).t()  # d x 3
        k64, v64 = k.double(), v.double()
        want = k64.t() @ torch.linalg.solve(
            k64 @ k64.t() + r * torch.eye(n, dtype=torch.float64), v64
        )
        assert torch.allclose(delta.double(), want, rtol=1e-4, atol=1e-5), r
    # ridge 1 is bit for bit the paper's solve
    a1, _ = ShiftSolver(k.clone()).factors(v)
    a2, _ = ShiftSolver(k.clone(), ridge=1.0).factors(v)
    assert torch.equal(a1, a2)


def test_preserved_general_keys_keep_the_modules_outputs(toy_tokenizer):
    """With a heavy weight, the update leaves the edited modules' outputs at the preserved
    keys (almost) as they were, where the plain turn moves them; the report says so."""
    model, modules = make_tiny("llama")
    reqs = random_requests(8, seed=5)
    keys = GeneralKeys(toy_tokenizer, 96)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in modules}
    kp = keys.keys(model, resolve_targets(model, modules))

    def moved(**kw):
        m = copy.deepcopy(model)
        rep = UltraEditor(m, toy_tokenizer, modules=modules, lr=0.5, **kw).edit(reqs)
        out = {}
        for n in modules:
            dw = m.get_submodule(n).weight.detach() - before[n]
            out[n] = float((kp[n] @ dw.t()).norm())
        return out, rep

    plain, rep0 = moved()
    kept, rep1 = moved(preserve_general=96, preserve_weight=1e4)
    assert rep0.stabilisers == [] and rep1.stabilisers == ["preserve_general"]
    for n in modules:
        assert kept[n] < 0.05 * plain[n], (n, kept[n], plain[n])


def test_the_paper_turn_is_untouched_with_the_stabilisers_off(toy_tokenizer):
    model, modules = make_tiny("llama")
    reqs = random_requests(6, seed=6)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    UltraEditor(a, toy_tokenizer, modules=modules, lr=0.5).edit(reqs)
    UltraEditor(b, toy_tokenizer, modules=modules, lr=0.5, preserve_general=0, ridge=1.0).edit(reqs)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_bad_preserve_text_is_refused_at_construction(toy_tokenizer, tmp_path):
    model, modules = make_tiny("llama")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(ValueError, match="short.txt"):
        UltraEditor(
            model,
            toy_tokenizer,
            modules=modules,
            lr=0.5,
            preserve_general=8,
            preserve_text=str(short),
        )
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        UltraEditor(
            model,
            toy_tokenizer,
            modules=modules,
            lr=0.5,
            preserve_general=8,
            preserve_text=str(tmp_path / "missing.txt"),
        )
    with pytest.raises(ValueError, match="ridge"):
        UltraEditor(model, toy_tokenizer, modules=modules, lr=0.5, ridge=0.0)


def test_the_drift_budget_bounds_the_step_search(toy_tokenizer):
    """drift_budget: every try of step="auto" also measures the share of general text's next
    tokens it changes; the kept step is one within the budget (or the published step)."""
    model, modules = make_tiny("llama")
    reqs = random_requests(8, seed=7)
    free = UltraEditor(
        copy.deepcopy(model), toy_tokenizer, modules=modules, lr=0.05, step="auto"
    ).edit(reqs)
    assert free.step_search["general_changed"] is None and free.stabilisers == []
    rep = UltraEditor(
        copy.deepcopy(model), toy_tokenizer, modules=modules, lr=0.05, step="auto", drift_budget=0.0
    ).edit(reqs)
    s = rep.step_search
    assert rep.stabilisers == ["drift_budget"]
    assert len(s["general_changed"]) == len(s["trials"])
    kept = [t["mean_scale"] for t, g in zip(s["trials"], s["general_changed"]) if g <= 0.0]
    assert rep.step_scale in kept + [1.0]
    assert rep.step_scale <= free.step_scale


def test_the_drift_windows_are_never_preserved(toy_tokenizer):
    """With preserve_general and drift_budget together, the drift budget checks windows
    whose keys are not preserved (a check on preserved text would be blind)."""
    from ultraedit_fast.core.config import EditorConfig
    from ultraedit_fast.core.preserve import GeneralDrift, general_keys_for

    model, modules = make_tiny("llama")
    cfg = EditorConfig(modules=modules, lr=0.1, preserve_general=100000, drift_budget=0.1)
    keys = general_keys_for(toy_tokenizer, cfg, resolve_targets(model, modules))
    drift = GeneralDrift.windows_of(toy_tokenizer)
    used = {int(w) for w, _ in keys.positions}
    preserved = {tuple(keys.windows[w].tolist()) for w in used}
    assert drift.shape[0] == 4
    assert not preserved & {tuple(row.tolist()) for row in drift}


@pytest.mark.parametrize("transposed, with_bias", [(False, False), (True, True)])
def test_norm_anchoring_never_lengthens_an_output(transposed, with_bias):
    """Rows whose target ``o + v`` is longer than ``o`` are rescaled to ``|o|`` along the
    same direction; the others are left as they are (fp64 oracle)."""
    g = torch.Generator().manual_seed(31)
    n, d_in, d_out = 23, 9, 7
    k = torch.randn(n, d_in, generator=g)
    w = (
        torch.randn(d_in, d_out, generator=g)
        if transposed
        else torch.randn(d_out, d_in, generator=g)
    )
    b = torch.randn(d_out, generator=g) if with_bias else None
    v = 0.3 * torch.randn(n, d_out, generator=g)
    out, rescaled = norm_anchored(k, v, w, b, transposed)
    w64 = w.double() if transposed else w.double().t()
    o = k.double() @ w64 + (b.double() if with_bias else 0)
    t, t2 = o + v.double(), o + out.double()
    longer = t.norm(dim=1) > o.norm(dim=1)
    assert 0 < int(longer.sum()) < n and rescaled == int(longer.sum())
    assert torch.allclose(t2[longer].norm(dim=1), o[longer].norm(dim=1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(t2[longer], t[longer], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
    assert torch.equal(out[~longer], v[~longer])


def test_norm_anchor_in_a_turn(toy_tokenizer):
    model, modules = make_tiny("llama")
    reqs = random_requests(8, seed=32)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    r0 = UltraEditor(a, toy_tokenizer, modules=modules, lr=0.5).edit(reqs)
    r1 = UltraEditor(b, toy_tokenizer, modules=modules, lr=0.5, norm_anchor=True).edit(reqs)
    assert r0.stabilisers == [] and r1.stabilisers == ["norm_anchor"]
    moved = [
        float((b.get_submodule(n).weight - model.get_submodule(n).weight).norm())
        / float((a.get_submodule(n).weight - model.get_submodule(n).weight).norm())
        for n in modules
    ]
    assert all(0 < m < 1.5 for m in moved) and any(abs(m - 1) > 1e-3 for m in moved), moved
