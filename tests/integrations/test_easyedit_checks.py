"""EasyEdit's hparams and ``batch_edit`` arguments are checked at the boundary: every value
of the YAML or dict is of the kind EasyEdit means (positive ints are ints, not bools or
strings; booleans are real bools), a bad one raises a ``ValueError``/``TypeError`` naming the
hparam and what was expected, and nothing is edited."""

import pytest
import torch

from conftest import ToyTokenizer, make_tiny, random_requests
from ultraedit_fast.core.hparams import to_options
from ultraedit_fast.integrations.easyedit import BaseEditor

BASE = {
    "alg_name": "ULTRAEDIT",
    "model_name": "./hugging_cache/llama-3-8b-instruct",
    "model_class": "LlamaForCausalLM",
    "tokenizer_class": "AutoTokenizer",
    "tokenizer_name": "./hugging_cache/llama-3-8b-instruct",
    "inner_params": ["model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.down_proj.weight"],
    "device": 0,
    "alg": "ULTRAEDIT",
    "dropout": 0.0,
    "no_grad_layers": None,
    "batch_size": 4,
    "batch_size_once": 2,
    "editor_batch_size": 1024,
    "lr": 3e-2,
    "token": "ans",
    "silent": False,
    "max_length": 40,
    "half": False,
    "model_parallel": False,
    "results_dir": "../results",
}
POSITIVE_INTS = ("batch_size", "batch_size_once", "editor_batch_size", "max_length")
BOOLS = ("silent", "half", "model_parallel")
BAD = (
    [(f, v) for f in POSITIVE_INTS for v in (-1, 0, "10", "four", True, False, 2.5, [4])]
    + [(f, v) for f in BOOLS for v in ("no", "yes", "False", "true", 0, 1, None, [])]
    + [("lr", v) for v in (True, "fast", -1e-3, 0, float("nan"), float("inf"), [1e-3], None)]
    + [("inner_params", v) for v in ("model.layers.1.mlp.up_proj.weight", [1], [], {"a": 1}, 3)]
    + [("token", v) for v in (1, None, "mask", True)]
    + [("alg_name", v) for v in (None, 1, "ROME")]
    + [("device", v) for v in (-1, True, 1.5, [0])]
    + [("dropout", v) for v in (-0.1, 1.5, "0.1", True)]
    + [
        (f, v)
        for f in ("model_name", "tokenizer_name", "results_dir", "alg")
        for v in (1, True, [])
    ]
)


def _hp(**changes):
    hp = dict(BASE)
    hp.update(changes)
    return hp


def test_the_reference_hparams_pass():
    options, settings = to_options(BASE)
    assert options["batch_size"] == 2 and settings == {"edits_per_turn": 4}
    assert to_options(_hp(batch_size=None))[1] == {"edits_per_turn": None}
    assert to_options(_hp(lr="1e-4"))[0]["lr"] == 1e-4  # YAML 1.1 reads 1e-4 as a string


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_a_bad_hparam_is_refused_naming_it(field, value):
    with pytest.raises((ValueError, TypeError), match=rf"hparams: {field}: .*expected"):
        to_options(_hp(**{field: value}))


@pytest.mark.parametrize(
    "line, field",
    [
        ('batch_size: "10"', "batch_size"),
        ("batch_size: -1", "batch_size"),
        ("batch_size_once: yes", "batch_size_once"),
        ('half: "no"', "half"),
        ("silent: 0", "silent"),
    ],
)
def test_bad_yaml_values_are_refused_before_anything_is_edited(tmp_path, line, field):
    key = line.split(":")[0]
    text = "\n".join(
        line if ln.startswith(key + ":") else ln
        for ln in [f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in BASE.items()]
    )
    text = text.replace("None", "null").replace("inner_params: [", "inner_params: [")
    p = tmp_path / "h.yaml"
    p.write_text(text + "\n")
    model, _ = make_tiny("llama")
    with pytest.raises((ValueError, TypeError), match=rf"hparams: {field}: expected"):
        BaseEditor.from_hparams(str(p), model, ToyTokenizer())


def test_yaml_booleans_are_taken(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text(
        "alg_name: ULTRAEDIT\ninner_params: [model.layers.1.mlp.up_proj.weight]\n"
        "half: no\nsilent: off\nmodel_parallel: false\nbatch_size: 3\nlr: 1e-3\n"
    )
    assert to_options(str(p))[1] == {"edits_per_turn": 3}


def _batch_edit_args(n=4):
    reqs = random_requests(n, seed=1)
    return dict(
        prompts=[r.prompt for r in reqs],
        target_new=[r.target for r in reqs],
        rephrase_prompts=[r.rephrase for r in reqs],
        locality_inputs={
            "neighborhood": {
                "prompt": [r.locality_prompt for r in reqs],
                "ground_truth": [r.locality_answer for r in reqs],
            }
        },
    )


@pytest.mark.parametrize("value", ["no", "yes", "False", 0, 1, None, [True]])
def test_sequential_edit_must_be_a_bool(value):
    model, _ = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = BaseEditor.from_hparams(BASE, model, ToyTokenizer())
    with pytest.raises(TypeError, match="sequential_edit: expected True or False"):
        editor.batch_edit(**_batch_edit_args(), sequential_edit=value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "options, per_turn, match",
    [
        ({}, -1, "edits_per_turn: expected"),
        ({}, "10", "edits_per_turn: expected"),
        ({}, True, "edits_per_turn: expected"),
        ({"batch_size": "10"}, None, "batch_size"),
        ({"lr": True}, None, "lr"),
        ({"colour": "red"}, None, "colour"),
    ],
)
def test_the_adapter_checks_what_it_is_built_with(options, per_turn, match):
    model, _ = make_tiny("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        BaseEditor(model, ToyTokenizer(), options, per_turn)


def test_a_bad_locality_entry_is_refused_before_any_turn():
    model, _ = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = BaseEditor.from_hparams(BASE, model, ToyTokenizer())
    args = _batch_edit_args()
    args["locality_inputs"]["neighborhood"]["prompt"][2] = "a" * 300  # past the context
    with pytest.raises(ValueError, match=r"locality_inputs\['neighborhood'\].*\[2\]"):
        editor.batch_edit(**args, sequential_edit=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
