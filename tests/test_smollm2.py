"""Real edits on a real model: SmolLM2-135M-Instruct (the embedded default) with
zsRE requests from ../shared/data."""

import json

import pytest
import torch

from conftest import require_data
from ultraedit_fast import EditRequest, ReferenceEditor, UltraEditor, evaluate, fast_edit
from ultraedit_fast.scoring.metrics import capture_predictions

pytestmark = pytest.mark.slow

LATE_DOWN = [f"model.layers.{i}.mlp.down_proj" for i in (25, 26, 27, 28)]


def _zsre(start, n, target="alt"):
    path = require_data("zsre", "zsre_mend_train-1k.json")
    with open(path) as f:
        recs = json.load(f)[start : start + n]
    return [
        EditRequest(
            r["src"],
            r[target] if target == "alt" else r["answers"][0],
            rephrase=r["rephrase"],
            locality_prompt=r["loc"] + "?",
            locality_answer=r["loc_ans"],
        )
        for r in recs
    ]


def test_twenty_counterfactual_edits_take(fresh_smollm2):
    """20 counterfactual zsRE edits in one turn: ES goes from ~0.2 (teacher-forced
    accuracy gives partial credit on multi-token answers) to above 0.9, paraphrases
    follow, and accuracy on the unrelated locality questions does not fall.

    Measured on a 2-core CPU: ES 0.20 -> 0.96, GS 0.21 -> 0.79, LS 0.22 -> 0.32,
    LS_unedited 0.48 (records 20..39; one strong turn on four late down_proj layers).
    """
    model, tok = fresh_smollm2
    reqs = _zsre(20, 20)
    base = capture_predictions(model, tok, reqs)
    before = evaluate(model, tok, reqs, base=base)
    assert before["ES"] < 0.35 and before["LS_unedited"] == 1.0
    rep = fast_edit(model, tok, reqs, modules=LATE_DOWN, lr=3e-3)
    assert rep.n_requests == 20 and rep.n_tokens >= 40
    after = evaluate(model, tok, reqs, base=base)
    assert after["ES"] > 0.9, after
    assert after["GS"] > 0.6, after
    assert after["LS"] >= before["LS"] - 0.05, (before, after)
    assert after["LS_unedited"] > 0.35, after


def test_preset_edits_gently_and_keeps_locality(fresh_smollm2):
    """The lifelong preset (a balance over many turns) in one turn: a clear gain with
    most of the unedited model's locality predictions kept."""
    model, tok = fresh_smollm2
    reqs = _zsre(40, 20)
    base = capture_predictions(model, tok, reqs)
    before = evaluate(model, tok, reqs, base=base)
    ed = UltraEditor(model, tok)
    assert ed.preset == "SmolLM2-135M-Instruct"
    ed.edit(reqs)
    after = evaluate(model, tok, reqs, base=base)
    assert after["ES"] > before["ES"] + 0.15, (before, after)
    assert after["LS_unedited"] > 0.55, after


def test_fast_matches_reference_on_the_real_model(fresh_smollm2):
    """Real weights, real data, the preset's five layers, two turns: fast and reference
    agree on the edited weights and the normaliser states."""
    import copy

    model, tok = fresh_smollm2
    ref_model = copy.deepcopy(model)
    names = UltraEditor(model, tok).module_names
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    fast = UltraEditor(model, tok, lr=3e-4)
    ref = ReferenceEditor(ref_model, tok, lr=3e-4)
    for start in (100, 130):
        reqs = _zsre(start, 30, target="answers")
        fast.edit(reqs)
        ref.edit(reqs)
    for n in names:
        w, r = model.get_submodule(n).weight, ref_model.get_submodule(n).weight
        assert ((w - r).norm() / r.norm()).item() < 1e-4, n
        shift, ref_shift = w - before[n], r - before[n]
        assert ((shift - ref_shift).norm() / ref_shift.norm()).item() < 1e-3, n
    for key, s in fast.normalizers.items():
        torch.testing.assert_close(s.std, ref.normalizers[key].std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.mean, ref.normalizers[key].mean, rtol=1e-4, atol=1e-6)
    del ref_model


def test_the_presets_stabilisers_on_the_real_model(smollm2):
    """What SmolLM2's presets resolve to with no option: the null space in both regimes,
    the step search capped at 8x in the facts regime after a first turn's 64x and earlier
    turns' keys kept there (weight 0.1), whitening in the stream regime
    (benchmarks/health_smollm2.py)."""
    from ultraedit_fast.core.config import EditorConfig
    from ultraedit_fast.core.presets import resolve_config

    model, _ = smollm2
    facts, preset = resolve_config(model, EditorConfig(), "facts")
    assert preset == "SmolLM2-135M-Instruct (facts)" and facts.step == "auto"
    assert (facts.null_space, facts.max_step_scale, facts.first_step_scale) == (0.01, 8.0, 64.0)
    assert facts.preserve_edits == 0.1
    stream, preset = resolve_config(model, EditorConfig(), "stream")
    assert preset == "SmolLM2-135M-Instruct" and stream.step == "paper"
    assert (stream.null_space, stream.whiten_values, stream.preserve_edits) == (0.01, True, None)
    assert facts.whiten_values is False
    given = resolve_config(model, EditorConfig(lr=1e-4), "facts")[0]
    assert (given.null_space, given.max_step_scale, given.whiten_values) == (None, 64.0, False)
    assert given.preserve_edits is None
