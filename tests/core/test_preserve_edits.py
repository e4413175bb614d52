"""``preserve_edits``: every turn's solve asks the edited modules to leave the keys of the
earlier turns alone; their Gram is lifelong state (saved, loaded, rolled back)."""

import copy

import pytest
import torch

from conftest import make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.core.solve import ShiftSolver


def _delta(solver, v):
    a, kk = solver.factors(v)
    return (a.t() @ kk).t().double()  # d_in x d_out


def _d_in(model, name):
    return model.get_submodule(name).weight.shape[1]


def _two_turns(model, modules, tok, first, second, step="paper", **kw):
    """``(editor, [report 1, report 2], turn 2's weight change per module)`` on a copy."""
    m = copy.deepcopy(model)
    ed = UltraEditor(m, tok, modules=modules, lr=0.5, step=step, **kw)
    r1 = ed.edit(first)
    w1 = {n: m.get_submodule(n).weight.detach().clone() for n in modules}
    r2 = ed.edit(second)
    return ed, [r1, r2], {n: m.get_submodule(n).weight.detach() - w1[n] for n in modules}


def _hits(dw, grams):
    """``|K1 dW^T|_F^2 = tr(dW G1 dW^T)`` per module: a change at the keys behind ``G1``."""
    return {n: float(torch.trace(d @ grams[n] @ d.t())) for n, d in dw.items()}


def _first_grams(model, modules, tok, first):
    """The Grams after one turn of ``first``: ``K1^T K1`` per module."""
    ed = UltraEditor(
        copy.deepcopy(model), tok, modules=modules, lr=0.5, step="paper", preserve_edits=1.0
    )
    ed.edit(first)
    return _grams(ed)


def _grams(editor):
    """Every edited module's Gram, over the editor's normaliser states."""
    out = {}
    for s in editor.normalizers.values():
        out.update(s.grams)
    return out


@pytest.mark.parametrize("n, m, d", [(5, 9, 13), (21, 4, 11)])
def test_a_preserved_gram_is_the_keys_as_rows_of_value_zero(n, m, d):
    """``extra=w G`` with ``G = K_p^T K_p`` solves the system with ``sqrt(w) K_p`` joined
    to the keys and values zero, whichever side (dual, primal) the plain solve takes, and
    with a projection too."""
    g = torch.Generator().manual_seed(n * m)
    k = torch.randn(n, d, generator=g, dtype=torch.float64).float()
    kp = torch.randn(m, d, generator=g, dtype=torch.float64).float()
    v = torch.randn(n, 3, generator=g, dtype=torch.float64).float()
    w = 2.5
    q, _ = torch.linalg.qr(torch.randn(d, d // 2, generator=g, dtype=torch.float64))
    proj = (torch.eye(d, dtype=torch.float64) - q @ q.t()).float()
    for project in (None, lambda x: x @ proj):
        got = _delta(ShiftSolver(k, project=project, extra=w * kp.t() @ kp), v)
        rows = torch.cat([k, w**0.5 * kp])
        zeros = torch.cat([v, v.new_zeros(m, 3)])
        want = _delta(ShiftSolver(rows, project=project), zeros)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        plain = _delta(ShiftSolver(k, project=project), v)
        assert (got - plain).abs().max() > 1e-3  # the Gram changed the solve


def test_a_preserved_gram_needs_unsharded_keys():
    k = torch.randn(4, 6)
    with pytest.raises(ValueError, match="unsharded"):
        ShiftSolver(k, reduce=lambda t: t, extra=torch.eye(6))


def test_later_turns_leave_earlier_keys_alone(toy_tokenizer):
    """Turn 1 is the paper's (nothing earlier); with a heavy weight (against the ridge of
    1: the tiny model's keys are small), turn 2's update moves the modules' outputs at turn
    1's keys by a hundredth of what it does without the option; the Gram grows by turn 2's
    ``K^T K``."""
    model, modules = make_tiny("llama")
    first, second = random_requests(6, seed=1), random_requests(6, seed=2)

    plain_ed, _, plain = _two_turns(model, modules, toy_tokenizer, first, second)
    ed, (r1, r2), kept = _two_turns(
        model, modules, toy_tokenizer, first, second, preserve_edits=1e6
    )
    assert r1.stabilisers == [] and r2.stabilisers == ["preserve_edits"]
    assert all(s.grams is None for s in plain_ed.normalizers.values())
    g1, g2 = _first_grams(model, modules, toy_tokenizer, first), _grams(ed)
    hit_plain, hit_kept = _hits(plain, g1), _hits(kept, g1)
    for n in modules:
        # after two turns the Gram grew by turn 2's K^T K: symmetric, positive semidefinite
        grown = (g2[n] - g1[n]).double()
        assert torch.allclose(grown, grown.t(), atol=1e-4)
        assert torch.linalg.eigvalsh(grown).min() > -1e-3 * grown.abs().max()
        assert grown.abs().max() > 0
        assert hit_kept[n] < 0.01 * hit_plain[n], (n, hit_kept[n], hit_plain[n])


def test_the_gram_is_saved_loaded_and_rolled_back(toy_tokenizer, tmp_path):
    model, modules = make_tiny("llama")
    ed = UltraEditor(
        model,
        toy_tokenizer,
        modules=modules,
        lr=0.5,
        step="paper",
        preserve_edits=1.0,
        undo=True,
    )
    ed.edit(random_requests(5, seed=3))
    after1 = _grams(ed)
    assert set(after1) == set(modules)
    ed.edit(random_requests(5, seed=4))
    ed.save(tmp_path / "ck")
    loaded = UltraEditor.load(tmp_path / "ck", copy.deepcopy(model), toy_tokenizer)
    for key, s in ed.normalizers.items():
        got = loaded.normalizers[key].grams
        assert set(got) == set(s.grams)
        assert all(torch.equal(got[n], s.grams[n]) for n in s.grams)
    assert any(not torch.equal(_grams(ed)[n], after1[n]) for n in modules)
    ed.rollback(1)
    assert all(torch.equal(_grams(ed)[n], g) for n, g in after1.items())


def test_a_preheat_is_no_edit_to_keep(toy_tokenizer, tmp_path):
    """The preheat's keys shape the statistics only: no Gram until the first turn, and a
    checkpoint saved in between loads."""
    model, modules = make_tiny("llama")
    ed = UltraEditor(
        model, toy_tokenizer, modules=modules, lr=0.5, step="paper", preserve_edits=1.0
    )
    ed.preheat(random_requests(6, seed=7))
    assert ed.normalizers and all(s.grams is None for s in ed.normalizers.values())
    ed.save(tmp_path / "pre")
    again = UltraEditor.load(tmp_path / "pre", copy.deepcopy(model), toy_tokenizer)
    assert again.edit(random_requests(4, seed=8)).stabilisers == []  # nothing earlier to keep
    assert set(_grams(again)) == set(modules)


def test_a_checkpoint_whose_grams_do_not_match_the_option_is_refused(toy_tokenizer, tmp_path):
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, toy_tokenizer, modules=modules, lr=0.5, step="paper")
    ed.edit(random_requests(4, seed=9))
    for s in ed.normalizers.values():  # as a hand-edited checkpoint would have them
        s.grams = {n: torch.eye(s.d_in) for n in modules if s.d_in == _d_in(model, n)}
    ed.save(tmp_path / "ck")
    with pytest.raises(ValueError, match="preserve_edits is None but .* has its keys' Gram"):
        UltraEditor.load(tmp_path / "ck", copy.deepcopy(model), toy_tokenizer)


def test_a_checkpoint_without_the_grams_the_option_needs_is_refused(toy_tokenizer, tmp_path):
    model, modules = make_tiny("llama")
    ed = UltraEditor(
        model, toy_tokenizer, modules=modules, lr=0.5, step="paper", preserve_edits=1.0
    )
    ed.edit(random_requests(4, seed=10))
    for s in ed.normalizers.values():  # as a damaged checkpoint would have them
        s.grams = None
    ed.save(tmp_path / "ck")
    with pytest.raises(ValueError, match="preserve_edits is 1.0 but .* lacks its keys' Gram"):
        UltraEditor.load(tmp_path / "ck", copy.deepcopy(model), toy_tokenizer)


def test_a_tensor_parallel_module_is_refused_with_preserve_edits(toy_tokenizer):
    from ultraedit_fast.core.preserve import stabiliser_inputs
    from ultraedit_fast.core.config import EditorConfig

    class Target:
        name, tp = "model.layers.0.mlp.down_proj", object()

    with pytest.raises(ValueError, match="preserve_edits: module 'model.layers.0.mlp.down_proj'"):
        stabiliser_inputs(
            toy_tokenizer,
            EditorConfig(preserve_edits=1.0, null_space=None, whiten_values=False),
            [Target()],
        )


def test_the_step_search_keeps_earlier_keys_too(toy_tokenizer):
    """With ``step="auto"`` the locality rows join a system that carries the earlier
    turns' Gram: turn 2 still moves turn 1's keys far less than without the option."""
    model, modules = make_tiny("llama")
    first, second = random_requests(5, seed=11), random_requests(5, seed=12)

    _, (_, rep0), plain = _two_turns(model, modules, toy_tokenizer, first, second, step="auto")
    _, (_, rep1), kept = _two_turns(
        model, modules, toy_tokenizer, first, second, step="auto", preserve_edits=1e6
    )
    assert "preserve_edits" in rep1.stabilisers and "preserve_edits" not in rep0.stabilisers
    g1 = _first_grams(model, modules, toy_tokenizer, first)
    hit_plain, hit_kept = _hits(plain, g1), _hits(kept, g1)
    for n in modules:
        assert hit_plain[n] > 0 and hit_kept[n] < 0.05 * hit_plain[n], n


def test_the_undo_log_counts_the_grams_it_keeps(toy_tokenizer):
    model, modules = make_tiny("llama")
    sizes = {}
    for keep in (None, 1.0):
        ed = UltraEditor(
            copy.deepcopy(model),
            toy_tokenizer,
            modules=modules,
            lr=0.5,
            step="paper",
            preserve_edits=keep,
            undo=True,
        )
        for seed in (21, 22):
            ed.edit(random_requests(4, seed=seed))
        sizes[keep] = ed.undo_memory()["turns"]
    # turn 1's pre-state had no Gram; turn 2's holds turn 1's (one per distinct tensor:
    # modules sharing an input share it); the factors are rank N either way (Woodbury)
    held = {}
    for state in ed._undo.turns[1].states.values():
        held.update({id(g): g for g in state.grams.values()})
    assert sizes[1.0][0] == sizes[None][0]
    assert sizes[1.0][1] - sizes[None][1] == sum(g.numel() * 4 for g in held.values()) > 0


def test_a_bf16_model_keeps_fp32_grams(toy_tokenizer):
    """bf16 keys grow an fp32 Gram; the second turn's update is finite and written."""
    model, modules = make_tiny("llama", dtype=torch.bfloat16)
    first, second = random_requests(4, seed=31), random_requests(4, seed=32)
    ed, (_, r2), dw = _two_turns(model, modules, toy_tokenizer, first, second, preserve_edits=1.0)
    assert r2.stabilisers == ["preserve_edits"]
    assert all(g.dtype == torch.float32 for g in _grams(ed).values())
    for n in modules:
        assert torch.isfinite(dw[n].float()).all() and dw[n].abs().max() > 0, n
