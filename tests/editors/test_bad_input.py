"""Everything a user can get wrong is refused at the boundary with a ValueError or
TypeError that names the argument and what was expected, and a refused turn leaves the
model and the editor byte for byte as they were.

(Checkpoints of another model and truncated or tampered checkpoints: test_persistence.py.)
"""

import warnings

import pytest
import torch

from conftest import LossyTokenizer, ToyTokenizer, make_tiny, random_requests
from ultraedit_fast import EditRefused, EditRequest, UltraEditor

LR = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model):
    return {k: bits(v).clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    sd = model.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in sd.items():
        assert torch.equal(bits(v), snap[k]), f"{k} changed"


def state_of(ed):
    return ed.turns, {
        k: (s.n, bits(s.mean).clone(), bits(s.acc).clone(), bits(s.std).clone())
        for k, s in ed.normalizers.items()
    }


def assert_state(ed, before):
    turns, states = before
    assert ed.turns == turns
    assert set(ed.normalizers) == set(states)
    for k, (n, *parts) in states.items():
        s = ed.normalizers[k]
        assert s.n == n
        for part, b in zip(("mean", "acc", "std"), parts):
            assert torch.equal(bits(getattr(s, part)), b)


@pytest.fixture
def tiny():
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, batch_size=4)
    ed.edit(random_requests(5, seed=0))  # a non-trivial lifelong state to keep
    return model, modules, ed


def refused(ed, requests, exc, match):
    model = ed.model
    snap, before = snapshot(model), state_of(ed)
    with pytest.raises(exc, match=match):
        ed.edit(requests)
    assert_unchanged(model, snap)
    assert_state(ed, before)


# ----------------------------------------------------------------------------- requests
@pytest.mark.parametrize("field", ["prompt", "target"])
@pytest.mark.parametrize("value", ["", "   ", "\n\t \u3000"])
def test_empty_or_whitespace_prompt_or_target(tiny, field, value):
    _, _, ed = tiny
    good = {"prompt": "the capital of x is", "target": "Paris"}
    bad = dict(good, **{field: value})
    refused(
        ed,
        [good, bad],
        ValueError,
        rf"requests\[1\]: EditRequest\.{field}: expected a non-empty string",
    )
    with pytest.raises(ValueError, match=rf"EditRequest\.{field}: expected a non-empty string"):
        EditRequest(**bad)


def test_target_that_tokenises_to_nothing():
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, LossyTokenizer(), modules=modules, lr=LR)
    refused(
        ed,
        [EditRequest("capital of Japan?", "Tokyo"), EditRequest("capital?", "東京")],
        ValueError,
        r"requests\[1\]: the target '東京' tokenises to no tokens; expected a "
        r"target of at least one token",
    )
    ed2 = UltraEditor(model, LossyTokenizer(bos=False), modules=modules, lr=LR)
    refused(
        ed2,
        [EditRequest("東京 ", "Tokyo")],
        ValueError,
        r"requests\[0\]: the prompt '東京 ' tokenises to no tokens",
    )


def test_request_beyond_the_context_is_refused_not_truncated(tiny):
    _, _, ed = tiny  # max_position_embeddings = 128
    refused(
        ed,
        [EditRequest("x " * 100, "y"), EditRequest("a", "b " * 40)],
        ValueError,
        r"requests\[0\]: 2\d\d tokens exceed the model's context of 128 tokens",
    )
    refused(
        ed,
        [EditRequest("a", "b " * 70)],
        ValueError,
        r"requests\[0\]: 1\d\d tokens exceed the model's context of 128",
    )


def test_mixed_request_types(tiny):
    model, modules, ed = tiny
    reqs = random_requests(4, seed=3)
    mixed = [
        reqs[0],
        {"prompt": reqs[1].prompt, "target": reqs[1].target},
        reqs[2],
        {"prompt": reqs[3].prompt, "target": reqs[3].target},
    ]
    other, _ = make_tiny("llama")
    ed_other = UltraEditor(other, ToyTokenizer(), modules=modules, lr=LR, batch_size=4)
    ed_other.edit(random_requests(5, seed=0))
    ed.edit(mixed)  # EditRequests and dicts mixed: accepted, and the same turn
    ed_other.edit([EditRequest(r.prompt, r.target) for r in reqs])
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k

    refused(
        ed,
        [reqs[0], "capital of France?"],
        TypeError,
        r"requests\[1\]: expected EditRequest or dict, got str",
    )
    refused(
        ed,
        [reqs[0], reqs[1], 7],
        TypeError,
        r"requests\[2\]: expected EditRequest or dict, "
        r"got int",
    )
    refused(ed, [None], TypeError, r"requests\[0\]: expected EditRequest or dict, got NoneType")
    refused(ed, "capital of France?", TypeError, r"requests: expected a list of EditRequest")
    refused(ed, 5, TypeError, r"requests: expected a list")
    refused(
        ed,
        [{"prompt": "a", "target": "b", "colour": 1}],
        ValueError,
        r"requests\[0\]: unknown keys \['colour'\]",
    )
    refused(ed, [{"prompt": "a"}], ValueError, r"requests\[0\]: missing keys \['target'\]")
    refused(
        ed,
        [{"prompt": 3, "target": "b"}],
        TypeError,
        r"requests\[0\]: EditRequest\.prompt: expected str, got int",
    )
    refused(
        ed,
        [{"prompt": "a", "target": "b", "locality_prompt": "c"}],
        ValueError,
        r"requests\[0\]: EditRequest: locality_prompt and locality_answer",
    )


def test_empty_request_list(tiny):
    _, _, ed = tiny
    refused(ed, [], ValueError, r"requests: expected at least one request, got an empty list")
    refused(ed, iter([]), ValueError, r"requests: expected at least one request")


# ----------------------------------------------------------------------------- the editor
def test_unknown_module_names():
    model, _ = make_tiny("llama")
    with pytest.raises(
        ValueError,
        match=r"modules: 'model\.layers\.9\.mlp\.up_proj' is not a "
        r"module of this model; editable modules are",
    ):
        UltraEditor(model, ToyTokenizer(), modules=["model.layers.9.mlp.up_proj"], lr=LR)
    with pytest.raises(ValueError, match=r"modules: expected at least one module name"):
        UltraEditor(model, ToyTokenizer(), modules=[], lr=LR)
    with pytest.raises(ValueError, match=r"modules: duplicate names"):
        UltraEditor(model, ToyTokenizer(), modules=["model.layers.1.mlp.up_proj"] * 2, lr=LR)
    with pytest.raises(TypeError, match=r"modules: expected module names \(str\), got int"):
        UltraEditor(model, ToyTokenizer(), modules=[3], lr=LR)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("model.layers.1.mlp", "LlamaMLP"),
        ("model.embed_tokens", "Embedding"),
        ("model.layers.1.input_layernorm", "LlamaRMSNorm"),
    ],
)
def test_modules_that_are_not_linear(name, kind):
    model, _ = make_tiny("llama")
    with pytest.raises(
        TypeError,
        match=rf"modules: '{name}' is a {kind}; expected nn\.Linear "
        r"or Conv1D",
    ):
        UltraEditor(model, ToyTokenizer(), modules=[name], lr=LR)


def test_meta_tensors():
    from transformers import AutoModelForCausalLM

    model, modules = make_tiny("llama")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(
        ValueError,
        match=r"modules: 'model\.layers\.1\.mlp\.gate_proj' has its "
        r"weight on the meta device",
    ):
        UltraEditor(meta, ToyTokenizer(), modules=modules, lr=LR)
    # edited layers materialised, another one not
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))
    with pytest.raises(
        ValueError,
        match=r"model: 1 parameters are on the meta device "
        r"\(e\.g\. 'lm_head\.weight'\)",
    ):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR)


@pytest.mark.parametrize("lr", [0, 0.0, -1e-4, float("nan"), float("inf"), -float("inf")])
def test_bad_lr_is_refused_when_the_editor_is_built(lr):
    model, modules = make_tiny("llama")
    with pytest.raises(ValueError, match=r"lr: expected a positive finite float"):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=lr)


@pytest.mark.parametrize("lr", ["1e-4", True, [1e-4]])
def test_lr_of_the_wrong_type(lr):
    model, modules = make_tiny("llama")
    with pytest.raises(TypeError, match=r"lr: expected a positive finite float"):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=lr)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "10", None])
def test_bad_batch_size(batch_size):
    model, modules = make_tiny("llama")
    with pytest.raises(ValueError, match=r"batch_size: expected a positive int"):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, batch_size=batch_size)


def test_unknown_backend(monkeypatch):
    model, modules = make_tiny("llama")
    with pytest.raises(
        ValueError,
        match=r"backend: expected one of \['auto', 'cuda', 'triton', "
        r"'cpp', 'torch'\], got 'fastest'",
    ):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, backend="fastest")
    with pytest.raises(ValueError, match=r"backend='cuda' is not available"):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, backend="cuda")
    monkeypatch.setenv("ULTRAEDIT_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"ULTRAEDIT_FAST_BACKEND: expected one of"):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR)


def test_bad_model_or_tokenizer():
    model, modules = make_tiny("llama")
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module, got str"):
        UltraEditor("llama", ToyTokenizer(), modules=modules, lr=LR)
    with pytest.raises(TypeError, match=r"tokenizer: expected a Hugging Face tokenizer"):
        UltraEditor(model, None, modules=modules, lr=LR)


# ----------------------------------------------------------------------------- tokenizers
def _hf_tokenizer(**kw):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ?.,'"
    vocab = {"[UNK]": 0, "[BOS]": 1, "[PAD]": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="[BOS]", unk_token="[UNK]", **kw)


def test_tokenizer_without_pad_token_or_with_left_padding_edits_identically():
    """The package right-pads its mini-batches itself (ids 0, labels -100): the
    tokenizer's pad token and padding side are never used, by design."""
    reqs = [
        EditRequest("the capital of France is", "Paris"),
        EditRequest("Rome is in", "Italy"),
        EditRequest("2 plus 2 is", "4"),
        EditRequest("the river of Egypt is the", "Nile"),
    ]
    normal = _hf_tokenizer(pad_token="[PAD]", padding_side="right")
    results = []
    for tok in (
        normal,
        _hf_tokenizer(),
        _hf_tokenizer(padding_side="left"),
        _hf_tokenizer(pad_token="[PAD]", padding_side="left"),
    ):
        model, modules = make_tiny("llama")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ed = UltraEditor(model, tok, modules=modules, lr=LR, batch_size=3)
        ed.edit(reqs)
        ed.edit(reqs[::-1])
        results.append(model.state_dict())
        assert any(not torch.equal(v, before[k]) for k, v in results[-1].items())
    assert normal.pad_token is not None
    for sd in results[1:]:
        for k, v in sd.items():
            assert torch.equal(v, results[0][k]), k


# ----------------------------------------------------------------------------- non-finite
def _nan_hook(module, args, output):
    if isinstance(output, tuple):
        return (output[0] * float("nan"),) + tuple(output[1:])
    return output * float("nan")


@pytest.mark.parametrize(
    "how",
    ["lr_overflow", "nan_weight_above", "nan_output_above", "nan_output_below", "inf_input_below"],
)
def test_non_finite_turn_is_refused_and_nothing_changes(tiny, how):
    model, modules, ed = tiny
    reqs = random_requests(6, seed=11)
    handle = None
    if how == "lr_overflow":
        ed.configure(lr=1e38)
    elif how == "nan_weight_above":  # the head, above every edited layer
        with torch.no_grad():
            model.lm_head.weight[5, 3] = float("nan")
    elif how == "nan_output_above":
        handle = model.model.layers[3].register_forward_hook(_nan_hook)
    elif how == "nan_output_below":  # the keys themselves are NaN
        handle = model.model.layers[0].register_forward_hook(_nan_hook)
    elif how == "inf_input_below":
        handle = model.model.embed_tokens.register_forward_hook(
            lambda m, a, out: out.masked_fill(torch.ones_like(out, dtype=torch.bool), float("inf"))
        )
    refused(ed, reqs, EditRefused, r"the turn was refused|refused")
    # EditRefused is a ValueError, so a caller catching ValueError catches it
    assert issubclass(EditRefused, ValueError)
    if handle is not None:
        handle.remove()
        ed.edit(reqs)  # the editor still works after a refused turn
        assert ed.turns == 2


def test_fp16_overflow_of_the_shifted_weights_is_refused():
    model, modules = make_tiny("llama", dtype=torch.float16)
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=1e4, batch_size=4)
    refused(
        ed,
        random_requests(6, seed=1),
        EditRefused,
        r"the shifted weights of modules \[.*\] are not finite",
    )


def test_refused_first_turn_creates_no_normaliser_state():
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=1e38)
    refused(ed, random_requests(3), EditRefused, "refused")
    assert ed.normalizers == {} and ed.turns == 0
