"""Edits that ship: a weight patch applied to a fresh base reproduces the edited weights
exactly; an exact PEFT LoRA adapter reproduces the edited model's logits within float
rounding; a rank-limited one reports its error; another base model is refused."""

import pytest
import torch

from conftest import ToyTokenizer, clone_model, make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.storage import apply_patch, load_lora
from ultraedit_fast import evaluate

peft = pytest.importorskip("peft")
LR = 3e-2

pytestmark = pytest.mark.usefixtures("one_thread")


def _edited(arch, undo=True, dtype=torch.float32, turns=2, modules=None):
    model, default = make_tiny(arch, dtype=dtype)
    base = clone_model(model)
    ed = UltraEditor(
        model, ToyTokenizer(), modules=modules or default, lr=LR, batch_size=4, undo=undo
    )
    for t in range(turns):
        ed.edit(random_requests(6, seed=t))
    return model, base, ed


def _logits(model, seed=0):
    ids = torch.randint(3, 101, (3, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_patch_reproduces_the_edited_weights_exactly(tmp_path, arch):
    model, base, ed = _edited(arch, undo=False)
    ed.export_patch(tmp_path / "p")
    fresh = clone_model(base)
    assert apply_patch(fresh, tmp_path / "p") == ed.module_names
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="not the base model's"):
        apply_patch(fresh, tmp_path / "p")  # already patched
    other, _ = make_tiny(arch, seed=1)
    with pytest.raises(ValueError, match="not the base model's"):
        apply_patch(other, tmp_path / "p")
    foreign, _ = make_tiny("qwen2" if arch == "llama" else "llama")
    with pytest.raises(ValueError, match="not the base model of the patch"):
        apply_patch(foreign, tmp_path / "p")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("source", ["undo", "base"])
def test_an_exact_lora_gives_the_edited_logits(tmp_path, arch, source):
    model, base, ed = _edited(arch, undo=source == "undo")
    rep = ed.export_lora(tmp_path / "lora", base=base if source == "base" else None)
    assert all(e == 0.0 for e in rep["relative_error"].values())
    served = load_lora(clone_model(base), tmp_path / "lora")
    want, got = _logits(model), _logits(served)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (got - _logits(base)).abs().max() > 1e-3  # the adapter is not a no-op
    plain = peft.PeftModel.from_pretrained(clone_model(base), str(tmp_path / "lora"))
    assert torch.allclose(_logits(plain), got)  # PEFT reads the files as they are
    reqs = random_requests(6, seed=1)  # and the scores read a PeftModel as they read the model
    m_served = evaluate(served, ToyTokenizer(), reqs, generation=False)
    m_edited = evaluate(model, ToyTokenizer(), reqs, generation=False)
    assert m_served["ES"] == pytest.approx(m_edited["ES"], abs=1e-9)


def test_a_rank_limited_lora_reports_its_error(tmp_path):
    model, base, ed = _edited("llama")
    exact = ed.export_lora(tmp_path / "exact")
    small = ed.export_lora(tmp_path / "small", rank=2)
    assert set(small["rank"].values()) == {2} and max(exact["rank"].values()) > 2
    assert all(0 < e < 1 for e in small["relative_error"].values())
    assert small["bytes"] < exact["bytes"]
    served = load_lora(clone_model(base), tmp_path / "small")
    err = (_logits(served) - _logits(model)).abs().max()
    assert err > 1e-6  # approximate: the error shows
    with pytest.raises(ValueError, match="rank"):
        ed.export_lora(tmp_path / "bad", rank=0)


def test_an_adapter_for_another_base_is_refused(tmp_path):
    model, base, ed = _edited("llama")
    ed.export_lora(tmp_path / "lora")
    other, _ = make_tiny("llama", seed=3)
    with pytest.raises(ValueError, match="not the adapter's base"):
        load_lora(other, tmp_path / "lora")
    foreign, _ = make_tiny("mistral")
    with pytest.raises(ValueError, match="not the base model of the adapter"):
        load_lora(foreign, tmp_path / "lora")


def test_a_lora_for_a_bf16_model(tmp_path):
    model, base, ed = _edited("llama", dtype=torch.bfloat16)
    ed.export_lora(tmp_path / "lora")
    served = load_lora(clone_model(base), tmp_path / "lora")
    want, got = _logits(model), _logits(served)
    moved = (want - _logits(base)).abs().max()
    assert (got - want).abs().max() <= 0.1 * moved  # bf16 rounding, far below the edit


def test_exports_need_what_they_name(tmp_path):
    model, base, ed = _edited("llama", undo=False)
    with pytest.raises(ValueError, match="undo=True"):
        ed.export_lora(tmp_path / "x")
    fresh, modules = make_tiny("llama")
    with pytest.raises(ValueError, match="no turn"):
        UltraEditor(fresh, ToyTokenizer(), modules=modules, lr=LR).export_patch(tmp_path / "y")
    tied, _ = make_tiny("gpt2")
    ed2 = UltraEditor(tied, ToyTokenizer(), modules=["lm_head"], lr=LR, undo=True)
    ed2.edit(random_requests(4))
    with pytest.raises(ValueError, match="tied embeddings"):
        ed2.export_lora(tmp_path / "z")


def test_patches_survive_a_checkpoint(tmp_path):
    model, base, ed = _edited("llama", undo=False)
    ed.save(tmp_path / "ckpt")
    again = UltraEditor.load(tmp_path / "ckpt", model, ToyTokenizer())
    again.export_patch(tmp_path / "p")
    fresh = clone_model(base)
    apply_patch(fresh, tmp_path / "p")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
    )


def test_the_cli_exports(tmp_path, monkeypatch, capsys):
    import json
    from ultraedit_fast.cli import commands as cli

    model, modules = make_tiny("llama")
    base = clone_model(model)
    monkeypatch.setattr(cli, "_load", lambda args: (model, ToyTokenizer()))
    reqs = random_requests(8, seed=1)
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps(
            [
                {
                    "prompt": r.prompt,
                    "target_new": r.target,
                    "subject": "s",
                    "ground_truth": "g",
                    "rephrase_prompt": r.rephrase,
                    "locality_prompt": r.locality_prompt,
                    "locality_ground_truth": r.locality_answer,
                }
                for r in reqs
            ]
        )
    )
    rc = cli.main(
        [
            "run",
            "--data",
            str(data),
            "--turns",
            "2",
            "--edits-per-turn",
            "4",
            "--modules",
            ",".join(modules),
            "--lr",
            str(LR),
            "--no-generation",
            "--output-dir",
            str(tmp_path / "out"),
            "--no-plot",
            "--no-progress",
            "--save-editor",
            str(tmp_path / "ed"),
            "--export-patch",
            str(tmp_path / "p"),
            "--export-lora",
            str(tmp_path / "l"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "out" / "lifelong.json").read_text())
    assert set(res["files"]) >= {"patch", "lora", "editor", "json"}
    assert max(res["lora"]["relative_error"].values()) == 0.0
    import ultraedit_fast.model.loading as models

    monkeypatch.setattr(models, "load_model", lambda spec, **kw: (base, ToyTokenizer()))
    rc = cli.main(
        [
            "export",
            "--checkpoint",
            str(tmp_path / "ed"),
            "--patch",
            str(tmp_path / "p2"),
            "--lora",
            str(tmp_path / "l2"),
            "--rank",
            "3",
            "--base-model",
            "the-unedited-model",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "patch:" in out and "rank [3]" in out
    fresh = clone_model(base)
    apply_patch(fresh, tmp_path / "p2")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
    )
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ed")]) == 2  # nothing to do


@pytest.mark.slow
def test_an_exact_lora_on_smollm2(tmp_path, fresh_smollm2):
    from ultraedit_fast.data.demo import demo_requests

    model, tok = fresh_smollm2
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ed = UltraEditor(model, tok, undo=True)
    ed.edit(demo_requests())
    ed.export_patch(tmp_path / "p")
    rep = ed.export_lora(tmp_path / "lora")
    ids = tok(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)[
        "input_ids"
    ]
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    ed.rollback()  # the session's model is shared; the base again
    with torch.no_grad():
        assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
        before = model(input_ids=ids).logits.float()
    served = load_lora(model, tmp_path / "lora")
    with torch.no_grad():
        got = served(input_ids=ids).logits.float()
    assert (want - before).abs().max() > 0.1  # the edit moved these logits
    assert (got - want).abs().max() <= 1e-3 * want.abs().max(), rep["rank"]
    served.unload()  # take the adapter's layers out again
