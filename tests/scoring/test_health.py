"""The model's health against the unedited model: perplexity ratio and next-token agreement
on general text, greedy answers kept on unrelated prompts; measured by evaluate, the
lifelong runner and the CLI, and a bad health text refused before any work."""

import copy
import json
import os

import pytest
import torch

from conftest import DATA, make_tiny, random_requests
from ultraedit_fast import UltraEditor, capture_baseline, evaluate
from ultraedit_fast.lifelong import run_lifelong
from ultraedit_fast.scoring.health import (
    UNRELATED_PROMPTS,
    WINDOW,
    capture_health,
    measure_health,
    read_health_text,
)

HEALTH_KEYS = ("health_ppl_ratio", "health_top1", "health_unrelated_kept")
GENERAL = DATA / "general" / "lee_background.txt"


def test_the_unedited_model_is_perfectly_healthy_and_an_edit_is_seen(toy_tokenizer):
    model, modules = make_tiny("llama")
    reqs = random_requests(6, seed=1)
    base = capture_baseline(model, toy_tokenizer, reqs, health=True)
    m0 = evaluate(model, toy_tokenizer, reqs, base=base)
    assert [m0[k] for k in HEALTH_KEYS] == [1.0, 1.0, 1.0]
    assert "built-in" in m0["health_text"]
    UltraEditor(model, toy_tokenizer, modules=modules, lr=1.0).edit(reqs)
    m1 = evaluate(model, toy_tokenizer, reqs, base=base)
    assert m1["health_ppl_ratio"] != 1.0 and m1["health_top1"] < 1.0
    # the subset used by lifelong checkpoints keeps the health baseline
    assert base.subset([0, 2]).health is base.health


def test_the_figures_are_what_they_say(toy_tokenizer):
    """The ratio is exp(mean NLL edited - mean NLL unedited) over the same tokens; top-1 is
    the share of positions with the same argmax (computed here the plain way)."""
    model, modules = make_tiny("llama")
    hb = capture_health(model, toy_tokenizer)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for name in modules:
            edited.get_submodule(name).weight.mul_(1.5)
    got = measure_health(edited, toy_tokenizer, hb)

    def stats(m):
        with torch.no_grad():
            lp = torch.log_softmax(m(input_ids=hb.windows).logits[:, :-1].double(), -1)
        nll = -lp.gather(-1, hb.windows[:, 1:, None])[..., 0]
        return nll.mean(), lp.argmax(-1)

    n0, a0 = stats(model)
    n1, a1 = stats(edited)
    assert got["health_ppl_ratio"] == pytest.approx(float(torch.exp(n1 - n0)), rel=1e-4)
    assert got["health_top1"] == pytest.approx(float((a0 == a1).double().mean()), abs=1e-9)
    assert len(hb.prompts) == len(UNRELATED_PROMPTS) == len(hb.continuations)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("latin1", "not UTF-8"),
        ("short", "too short for one context window"),
        ("directory", "not a regular file"),
    ],
)
def test_a_bad_health_text_is_refused_before_the_first_turn(
    toy_tokenizer, tmp_path, monkeypatch, kind, match
):
    path = tmp_path / "text.txt"
    if kind == "empty":
        path.write_text("  \n")
    elif kind == "latin1":
        path.write_bytes("caf\xe9 au lait ".encode("latin-1") * 200)
    elif kind == "short":
        path.write_text("only a few words here")
    elif kind == "directory":
        path.mkdir()
    model, modules = make_tiny("llama")
    monkeypatch.setattr(UltraEditor, "edit", lambda *a, **k: pytest.fail("a turn ran"))
    err = FileNotFoundError if kind == "missing" else ValueError
    with pytest.raises(err, match=match) as info:
        run_lifelong(
            model,
            toy_tokenizer,
            random_requests(4, seed=2),
            turns=1,
            edits_per_turn=4,
            modules=modules,
            lr=1e-2,
            progress=False,
            health=str(path),
        )
    assert str(path) in str(info.value)


def test_a_lifelong_run_reports_health_along_the_stream(toy_tokenizer, tmp_path):
    model, modules = make_tiny("llama")
    res = run_lifelong(
        model,
        toy_tokenizer,
        random_requests(8, seed=3),
        turns=4,
        edits_per_turn=2,
        eval_every=2,
        modules=modules,
        lr=0.5,
        progress=False,
        output_dir=str(tmp_path),
        generation=False,
    )
    assert [res["metrics_before"][k] for k in HEALTH_KEYS] == [1.0, 1.0, 1.0]
    for entry in res["eval_history"]:
        assert all(entry["metrics"][k] is not None for k in HEALTH_KEYS)
    saved = json.loads((tmp_path / "lifelong.json").read_text())
    assert saved["metrics"]["health_top1"] == res["metrics"]["health_top1"]
    assert (tmp_path / "lifelong.png").exists()
    off = run_lifelong(
        make_tiny("llama")[0],
        toy_tokenizer,
        random_requests(2, seed=3),
        turns=1,
        edits_per_turn=2,
        modules=modules,
        lr=0.5,
        progress=False,
        generation=False,
        health=False,
    )
    assert "health_top1" not in off["metrics"]


@pytest.mark.skipif(not GENERAL.exists(), reason="../shared/data/general is absent")
def test_a_named_general_text_is_used(toy_tokenizer):
    text, source = read_health_text(str(GENERAL))
    assert source == str(GENERAL) and len(text) > 100_000
    model, _ = make_tiny("llama")
    hb = capture_health(model, toy_tokenizer, str(GENERAL))
    assert hb.windows.shape[1] == WINDOW and hb.source == str(GENERAL)


def test_eval_reports_health_against_a_base_model(capsys, tmp_path, small_zsre, tiny_model_dir):
    from ultraedit_fast.cli import main

    out = tmp_path / "scores.json"
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small_zsre),
            "--base-model",
            str(tiny_model_dir),
            "--no-generation",
            "--no-progress",
            "--output",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())["metrics"]
    assert [m[k] for k in HEALTH_KEYS] == [1.0, 1.0, 1.0]  # the model is its own base
    assert "health: perplexity x1.000" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(small_zsre),
                "--health-text",
                os.devnull,
            ]
        )
        == 2
    )
