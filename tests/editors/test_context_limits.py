"""Every text of a request must fit the model's context, not only the prompt and target:
a rephrase (with the target) or a locality prompt (with its answer) longer than the context
is refused at the boundary, naming ``requests[i]`` and the field, before any turn runs; and
the step search, given requests that fit, never feeds the model a position past its
context (its greedy continuations included)."""

import warnings

import pytest
import torch
import transformers as T

from conftest import VOCAB, ToyTokenizer, make_tiny
from ultraedit_fast import EditRequest, ReferenceEditor, UltraEditor

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = "a" * 200  # the tiny models' context is 128 tokens, one per character here
OVERLONG = {
    "rephrase": dict(rephrase=LONG),
    "locality_prompt": dict(locality_prompt=LONG, locality_answer="b"),
    "locality_answer": dict(locality_prompt="what is x", locality_answer=LONG),
    # each part fits, together they do not
    "locality_pair": dict(locality_prompt="c" * 70, locality_answer="d" * 70),
    "rephrase_with_target": dict(rephrase="e" * 120),
}
FIELD = {
    "rephrase": "rephrase",
    "locality_prompt": "locality_prompt",
    "locality_answer": "locality_prompt",
    "locality_pair": "locality_prompt",
    "rephrase_with_target": "rephrase",
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _requests(kind):
    return [
        EditRequest("the capital of x is", "Rome"),
        EditRequest("the colour of y is", "green " * 2, **OVERLONG[kind]),
        EditRequest("z was born in", "Paris"),
    ]


@pytest.mark.parametrize("step", ["paper", "auto"])
@pytest.mark.parametrize("kind", list(OVERLONG))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_overlong_rephrase_or_locality_prompt_is_refused_before_the_turn(arch, kind, step):
    model, modules = make_tiny(arch)
    before = _weights(model)
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, step=step)
    with pytest.raises(ValueError, match=rf"requests\[1\] \({FIELD[kind]}\).*context of 128"):
        ed.edit(_requests(kind))
    assert ed.turns == 0 and not ed.normalizers
    assert _same(model, before)


@pytest.mark.parametrize("kind", ["rephrase", "locality_answer"])
def test_the_reference_editor_refuses_them_too(kind):
    model, modules = make_tiny("gpt2")
    before = _weights(model)
    ed = ReferenceEditor(model, ToyTokenizer(), modules=modules)
    with pytest.raises(ValueError, match=rf"requests\[1\] \({FIELD[kind]}\)"):
        ed.edit(_requests(kind))
    assert ed.turns == 0 and _same(model, before)


def test_texts_that_just_fit_are_edited():
    model, modules = make_tiny("gpt2")
    # prompt ids = 1 + len(prompt), answer ids = 1 + len(answer); fed: both minus one = 128
    fits = EditRequest(
        "q is", "r", rephrase="f" * 125, locality_prompt="g" * 100, locality_answer="h" * 27
    )
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, step="paper")
    ed.edit([fits])
    assert ed.turns == 1


@pytest.mark.parametrize(
    "requests",
    [
        # the locality prompt and its answer fill the context: its continuation (answer + a
        # few tokens) would run past it
        [EditRequest("q is", "r", locality_prompt="g" * 100, locality_answer="h" * 27)],
        # a short locality prompt with a long answer beside one near the context's end:
        # one batch of greedy decoding runs every row as long as its longest
        [
            EditRequest("q is", "r", locality_prompt="s", locality_answer="t" * 30),
            EditRequest("u is", "v", locality_prompt="w" * 120, locality_answer="x"),
        ],
    ],
    ids=["at-the-limit", "mixed-batch"],
)
def test_the_step_search_stays_within_the_context(requests):
    model, modules = make_tiny("gpt2")  # learned positions: any index past 128 raises
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, step="auto")
    ed.edit(requests)
    assert ed.turns == 1


def test_the_step_search_leaves_out_anchor_prompts_longer_than_the_context():
    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=4, n_head=4, n_positions=24)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    ed = UltraEditor(model, ToyTokenizer(), modules=["transformer.h.2.mlp.c_fc"], step="auto")
    ed.edit([EditRequest("x is", "Rome"), EditRequest("y is", "Paris")])
    assert ed.turns == 1


def test_scoring_stays_within_the_context():
    """evaluate() decodes len(answer) + 3 tokens after each prompt: for texts that just fit,
    greedy decoding is cut at the context (GPT-2's learned positions end at 128)."""
    from ultraedit_fast import capture_baseline, evaluate

    model, _ = make_tiny("gpt2")
    reqs = [
        EditRequest(
            "q is", "r", rephrase="f" * 125, locality_prompt="g" * 100, locality_answer="h" * 27
        ),
        EditRequest("s is", "t", rephrase="u", locality_prompt="v", locality_answer="w" * 30),
    ]
    base = capture_baseline(model, ToyTokenizer(), reqs)
    m = evaluate(model, ToyTokenizer(), reqs, base=base)
    assert m["n"] == 2 and m["ES_gen"] is not None
