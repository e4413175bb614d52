"""Lifelong runs (ultraedit_fast.lifelong.runner) on a tiny random Llama: turns, scoring every k
turns, the JSON and the PNG, fast vs reference, WikiBigEdit extras, refused turns."""

import copy
import itertools
import json

import pytest
import torch

from conftest import random_requests, tiny_llama
from ultraedit_fast.data.datasets import Example
from ultraedit_fast.scoring.metrics import token_accuracy
from ultraedit_fast.lifelong.runner import (
    RESULTS_JSON,
    RESULTS_PNG,
    SCHEMA,
    plot_results,
    run_lifelong,
)
from ultraedit_fast.core.report import PHASES

MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]
LR = 1e-2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def _check_metrics(m, n):
    assert m["n"] == n
    for k in ("ES", "GS", "LS", "LS_unedited"):
        assert m[k] is not None and 0.0 <= m[k] <= 1.0, (k, m[k])


def test_run_writes_json_and_png(model, toy_tokenizer, tmp_path):
    reqs = random_requests(24, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = run_lifelong(
        model,
        toy_tokenizer,
        reqs,
        turns=4,
        edits_per_turn=6,
        modules=MODULES,
        lr=LR,
        eval_every=2,
        progress=False,
        output_dir=str(tmp_path),
        config_extra={"dataset": "random", "note": 7},
    )
    # the JSON on disk is what was returned
    path = tmp_path / RESULTS_JSON
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert res["files"] == {"json": str(path), "plot": str(tmp_path / RESULTS_PNG)}
    assert res["schema"] == SCHEMA
    cfg = res["config"]
    assert (cfg["turns"], cfg["edits_per_turn"], cfg["n_edits"]) == (4, 6, 24)
    assert cfg["modules"] == MODULES and cfg["lr"] == LR and cfg["editor"] == "fast"
    assert cfg["dataset"] == "random" and cfg["note"] == 7 and cfg["eval_every"] == 2
    assert cfg["tokens_per_pass"] == 512  # the editor's default
    env = res["environment"]
    for k in ("ultraedit_fast", "torch", "transformers", "python", "device_name"):
        assert isinstance(env[k], str) and env[k]
    assert res["date"][:2] == "20"
    # per-turn timings by phase and peak memory
    assert [t["turn"] for t in res["turns"]] == [1, 2, 3, 4]
    for t in res["turns"]:
        assert t["refused"] is None and t["n_requests"] == 6
        assert set(t["seconds"]) == set(PHASES)
        assert all(v >= 0 for v in t["seconds"].values())
        assert t["total_seconds"] >= sum(t["seconds"].values()) * 0.999
        assert t["wall_seconds"] >= t["total_seconds"]
        assert t["peak_memory_bytes"] > 0
    tim = res["timing"]
    assert tim["edits_per_second"] > 0 and tim["peak_memory_bytes"] > 0
    assert set(tim["phase_seconds"]) == set(PHASES)
    # scored at turns 2 and 4, on what was edited so far; the final scores are turn 4's
    hist = res["eval_history"]
    assert [(h["turn"], h["n_edits"]) for h in hist] == [(2, 12), (4, 24)]
    _check_metrics(hist[0]["metrics"], 12)
    _check_metrics(res["metrics"], 24)
    assert res["metrics"] == hist[-1]["metrics"]
    mb = res["metrics_before"]
    _check_metrics(mb, 24)
    assert mb["LS_unedited"] == 1.0  # the unedited model agrees with itself
    # the edits took: efficacy rose well above the unedited model's, and weights moved
    assert res["metrics"]["ES"] > mb["ES"] + 0.2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {m + ".weight" for m in MODULES}
    # the PNG is a real PNG
    png = (tmp_path / RESULTS_PNG).read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000
    import matplotlib.image as mpimg

    img = mpimg.imread(str(tmp_path / RESULTS_PNG))
    assert img.shape[0] > 400 and img.shape[1] > 800


def test_eval_every_none_scores_once_and_stream_is_consumed_lazily(model, toy_tokenizer):
    reqs = random_requests(30, seed=2)
    stream = iter(reqs)
    res = run_lifelong(
        model,
        toy_tokenizer,
        stream,
        turns=2,
        edits_per_turn=5,
        modules=MODULES,
        lr=LR,
        progress=False,
        eval_before=False,
    )
    assert [h["turn"] for h in res["eval_history"]] == [2]
    assert res["metrics_before"] is None and res["files"] == {}
    assert next(stream) == reqs[10]  # exactly turns * edits_per_turn items were taken


def test_reference_and_fast_agree(base_model, toy_tokenizer):
    reqs = random_requests(20, seed=3)
    m_fast, m_ref = copy.deepcopy(base_model), copy.deepcopy(base_model)
    kw = dict(
        turns=2,
        edits_per_turn=10,
        modules=MODULES,
        lr=LR,
        batch_size=4,
        eval_every=1,
        progress=False,
    )
    fast = run_lifelong(m_fast, toy_tokenizer, reqs, editor="fast", **kw)
    ref = run_lifelong(m_ref, toy_tokenizer, reqs, editor="reference", **kw)
    assert ref["config"]["editor"] == "reference" and ref["config"]["backend"] == "reference"
    assert ref["timing"]["phase_seconds"] is None
    assert all(t["total_seconds"] > 0 for t in ref["turns"])
    for name in MODULES:
        w_f = m_fast.get_submodule(name).weight
        w_r = m_ref.get_submodule(name).weight
        w_0 = base_model.get_submodule(name).weight
        assert not torch.equal(w_f, w_0)
        torch.testing.assert_close(w_f, w_r, rtol=1e-4, atol=1e-5)
    assert fast["metrics_before"] == ref["metrics_before"]
    for hf, hr in zip(fast["eval_history"], ref["eval_history"]):
        for k in ("ES", "GS", "LS", "LS_unedited"):
            assert abs(hf["metrics"][k] - hr["metrics"][k]) <= 0.02, (hf["turn"], k)


def test_wikibigedit_extras_are_scored(model, toy_tokenizer):
    reqs = random_requests(8, seed=4)
    examples = []
    for i, r in enumerate(reqs):
        extras = {
            "personas": [f"Tell me: {r.prompt}", f"Q. {r.rephrase}"] if i % 2 else [],
            "mhop": f"so {r.prompt}" if i < 3 else None,
            "mhop_ans": "alpha beta" if i < 3 else None,
        }
        examples.append(Example(r, extras, i, "wikibigedit"))
    res = run_lifelong(
        model,
        toy_tokenizer,
        examples,
        turns=2,
        edits_per_turn=4,
        modules=MODULES,
        lr=LR,
        progress=False,
    )
    m = res["metrics"]
    assert m["n_personas"] == 8 and m["n_mhop"] == 3
    pairs = [
        (p, r.target)
        for i, r in enumerate(reqs)
        if i % 2
        for p in (f"Tell me: {r.prompt}", f"Q. {r.rephrase}")
    ]
    expect = token_accuracy(model, toy_tokenizer, pairs)
    assert m["personas"] == pytest.approx(sum(expect) / len(expect))
    mh = token_accuracy(model, toy_tokenizer, [(f"so {r.prompt}", "alpha beta") for r in reqs[:3]])
    assert m["mhop"] == pytest.approx(sum(mh) / 3)
    assert res["metrics_before"]["n_personas"] == 8
    # plain requests: no WikiBigEdit scores
    res2 = run_lifelong(
        copy.deepcopy(model),
        toy_tokenizer,
        reqs,
        turns=1,
        edits_per_turn=4,
        modules=MODULES,
        lr=LR,
        progress=False,
        eval_before=False,
    )
    assert res2["metrics"]["personas"] is None and res2["metrics"]["mhop"] is None


def test_refused_turn_is_recorded_and_leaves_model_unchanged(model, toy_tokenizer, tmp_path):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = run_lifelong(
        model,
        toy_tokenizer,
        random_requests(10, seed=5),
        turns=2,
        edits_per_turn=5,
        modules=MODULES,
        lr=1e38,
        progress=False,
        eval_before=False,
        output_dir=str(tmp_path),
    )
    assert res["refused_turns"] == [1, 2]
    assert all("non-finite" in t["refused"] for t in res["turns"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert res["metrics"]["LS_unedited"] == 1.0
    assert (tmp_path / RESULTS_PNG).read_bytes()[:8] == PNG_MAGIC


def test_progress_bar_shows_edits_per_second(model, toy_tokenizer, capsys):
    run_lifelong(
        model,
        toy_tokenizer,
        random_requests(6, seed=6),
        turns=2,
        edits_per_turn=3,
        modules=MODULES,
        lr=LR,
        progress=True,
        eval_before=False,
    )
    err = capsys.readouterr().err
    assert "edit/s" in err and "6/6" in err


def test_a_given_baseline_is_used(model, toy_tokenizer):
    from ultraedit_fast import capture_baseline

    reqs = random_requests(6, seed=7)
    base = capture_baseline(model, toy_tokenizer, reqs)
    with pytest.raises(ValueError, match="base"):
        run_lifelong(
            copy.deepcopy(model),
            toy_tokenizer,
            reqs,
            turns=1,
            edits_per_turn=6,
            modules=MODULES,
            lr=LR,
            progress=False,
            base=base.subset(range(3)),
        )
    a = run_lifelong(
        copy.deepcopy(model),
        toy_tokenizer,
        reqs,
        turns=2,
        edits_per_turn=3,
        modules=MODULES,
        lr=LR,
        progress=False,
        base=base,
    )
    b = run_lifelong(
        copy.deepcopy(model),
        toy_tokenizer,
        reqs,
        turns=2,
        edits_per_turn=3,
        modules=MODULES,
        lr=LR,
        progress=False,
    )
    assert a["metrics"] == b["metrics"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(turns=0, edits_per_turn=2), "turns"),
        (dict(turns=2, edits_per_turn=True), "edits_per_turn"),
        (dict(turns=2, edits_per_turn=2, eval_every=0), "eval_every"),
        (dict(turns=2, edits_per_turn=2, editor="slow"), "editor"),
        (dict(turns=2, edits_per_turn=2, editor="reference", backend="cpp"), "backend"),
        (dict(turns=3, edits_per_turn=3), "need 9 requests, the data gave 4"),
    ],
)
def test_argument_errors(model, toy_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_lifelong(
            model,
            toy_tokenizer,
            random_requests(4),
            modules=MODULES,
            lr=LR,
            progress=False,
            **kwargs,
        )


def test_bad_items_raise_type_error(model, toy_tokenizer):
    with pytest.raises(TypeError, match=r"examples_or_requests\[1\]"):
        run_lifelong(
            model,
            toy_tokenizer,
            [random_requests(1)[0], 42],
            turns=1,
            edits_per_turn=2,
            modules=MODULES,
            lr=LR,
            progress=False,
        )


def test_plot_many_turns_and_reference(tmp_path):
    """The plot copes with many turns, no per-phase times and no baseline."""
    rows = [
        {
            "turn": t,
            "seconds": {"total": 0.5 + 0.01 * t},
            "wall_seconds": 0.6,
            "refused": None if t % 50 else "x",
            "total_seconds": 0.5,
        }
        for t in range(1, 201)
    ]
    hist = [
        {
            "turn": t,
            "n_edits": 100 * t,
            "metrics": {
                "ES": 0.9 - t / 1000,
                "GS": 0.8,
                "LS": 0.5,
                "LS_unedited": 0.7,
                "personas": None,
                "mhop": 0.1,
                "n": 100 * t,
            },
        }
        for t in range(20, 201, 20)
    ]
    results = {
        "config": {
            "turns": 200,
            "edits_per_turn": 100,
            "editor": "reference",
            "backend": "reference",
            "lr": 1e-6,
            "modules": MODULES,
            "model_name": "toy",
        },
        "turns": rows,
        "eval_history": hist,
        "metrics_before": None,
        "timing": {
            "mean_turn_seconds": 0.6,
            "edits_per_second": 166.0,
            "peak_memory_bytes": None,
            "peak_memory_kind": None,
        },
    }
    path = plot_results(results, str(tmp_path / "p.png"))
    assert open(path, "rb").read(8) == PNG_MAGIC


def test_counts_exactly_what_was_edited(model, toy_tokenizer):
    """eval_every that does not divide turns still ends with a score on everything."""
    res = run_lifelong(
        model,
        toy_tokenizer,
        itertools.cycle(random_requests(4, seed=8)),
        turns=3,
        edits_per_turn=4,
        modules=MODULES,
        lr=LR,
        eval_every=2,
        progress=False,
        eval_before=False,
    )
    assert [(h["turn"], h["metrics"]["n"]) for h in res["eval_history"]] == [(2, 8), (3, 12)]


class _Counting:
    """A built editor (the Editor protocol): wraps the fast editor and counts its turns,
    as a baseline of ultraedit_fast.baselines would be driven."""

    name = "counting"

    def __init__(self, model, tok):
        from ultraedit_fast import UltraEditor

        self._inner = UltraEditor(model, tok, modules=MODULES, lr=LR, step="paper")
        self.model, self.tokenizer, self.calls = model, tok, []

    @property
    def turns(self):
        return self._inner.turns

    @property
    def config(self):
        return self._inner.config

    def edit(self, requests):
        self.calls.append(len(requests))
        return self._inner.edit(requests)

    def describe(self):
        return {**self._inner.describe(), "editor": self.name}


def test_run_drives_a_built_editor(model, toy_tokenizer, tmp_path):
    ed = _Counting(model, toy_tokenizer)
    before = model.get_submodule(MODULES[0]).weight.clone()
    res = run_lifelong(
        model,
        toy_tokenizer,
        random_requests(12, seed=3),
        turns=3,
        edits_per_turn=4,
        editor=ed,
        generation=False,
        progress=False,
        health=False,
        output_dir=str(tmp_path / "run"),
        plot=False,
    )
    assert ed.calls == [4, 4, 4] and ed.turns == 3
    assert res["config"]["editor"] == "counting"
    assert res["config"]["editor_options"]["modules"] == MODULES  # its own description
    assert len(res["turns"]) == 3 and res["metrics"]["n"] == 12
    assert not torch.equal(before, model.get_submodule(MODULES[0]).weight)


def test_built_editor_refusals(model, base_model, toy_tokenizer, tmp_path):
    ed = _Counting(model, toy_tokenizer)
    common = dict(turns=1, edits_per_turn=2, progress=False, health=False, eval_before=False)
    reqs = random_requests(2, seed=1)
    with pytest.raises(ValueError, match="^lr: an editor given built"):
        run_lifelong(model, toy_tokenizer, reqs, editor=ed, lr=1.0, **common)
    with pytest.raises(ValueError, match="export_patch"):
        run_lifelong(
            model, toy_tokenizer, reqs, editor=ed, export_patch=str(tmp_path / "p"), **common
        )
    with pytest.raises(ValueError, match="^resume: only"):
        run_lifelong(model, toy_tokenizer, reqs, editor=ed, resume=str(tmp_path), **common)
    with pytest.raises(ValueError, match="another model"):
        run_lifelong(base_model, toy_tokenizer, reqs, editor=ed, **common)
    with pytest.raises(ValueError, match="^editor: expected"):
        run_lifelong(model, toy_tokenizer, reqs, editor=object(), **common)
    assert ed.turns == 0
