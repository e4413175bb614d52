"""LocFT-BF (:mod:`ultraedit_fast.baselines.locft`): it trains its one weight and nothing else,
reaches the targets (with the EOS after them), stops early by the published rule, refuses bad
input at the boundary, leaves the model as it was when a turn fails, and carries its edits
from turn to turn."""

import dataclasses
import math

import pytest
import torch

from conftest import ToyTokenizer, VOCAB, make_tiny
from ultraedit_fast import EditRequest
from ultraedit_fast.baselines.locft import (
    DEFAULT_DEPTH,
    PUBLISHED_DEPTH,
    LocFTConfig,
    LocFTEditor,
    default_lr,
    default_module,
)
from ultraedit_fast.editors import EditRefused, Editor
from ultraedit_fast.model.targets import resolve_target

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = "model.layers.2.mlp.down_proj"
REQUESTS = [
    EditRequest("capital of Rome", "x"),
    EditRequest("river of Paris", "q"),
    EditRequest("the alpha is", "zz"),
    EditRequest("beta of gamma", "k"),
    EditRequest("delta is", "w"),
]
FAST = dict(lr=3e-2, batch_size=2, epochs=100)  # reaches the stop loss on the tiny model


def tiny_llama(seed=0, dtype=torch.float32, layers=4):
    """A tiny random Llama whose weights are large enough (initializer_range 0.3) for one
    down-projection to drive the loss below the stop loss; random models at the usual 0.02
    have logits too flat for that."""
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).to(dtype).eval()


def bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model):
    return {k: bits(v).clone() for k, v in model.state_dict().items()}


def changed(model, snap):
    return sorted(k for k, v in model.state_dict().items() if not torch.equal(bits(v), snap[k]))


def teacher_forced(ed, requests):
    """Per request: whether the argmax at every trained position is its label (the answer
    tokens and the EOS)."""
    out = []
    with torch.no_grad():
        for t in ed._tokenize(requests):
            ids = torch.tensor([t.input_ids])
            labels = torch.tensor(t.labels)
            mask = labels != -100
            pred = ed.model(input_ids=ids).logits[0].argmax(-1)
            out.append(bool((pred[mask] == labels[mask]).all()))
    return out


# ----------------------------------------------------------------------------- the layer
def test_default_module_is_the_published_relative_depth():
    import transformers as T

    def meta(cfg_cls, layers, **kw):
        cfg = cfg_cls(
            vocab_size=32, hidden_size=8, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, **{"intermediate_size": 16, **kw},
        )  # fmt: skip
        with torch.device("meta"):
            return T.AutoModelForCausalLM.from_config(cfg)

    # the published layers, and SmolLM2-135M's (a 30-layer Llama)
    assert default_module(meta(T.LlamaConfig, 32)) == "model.layers.22.mlp.down_proj"
    assert default_module(meta(T.Qwen2Config, 28)) == "model.layers.6.mlp.down_proj"
    assert default_module(meta(T.MistralConfig, 32)) == "model.layers.23.mlp.down_proj"
    assert default_module(meta(T.LlamaConfig, 30)) == "model.layers.21.mlp.down_proj"
    assert PUBLISHED_DEPTH["llama"] == DEFAULT_DEPTH == 22 / 32
    # the rate: the published 5e-4 at Llama-3-8B's fan-in, 4.7e-3 at SmolLM2-135M's
    for d_in, lr in ((14336, 5e-4), (1536, 5e-4 * 14336 / 1536)):
        m = meta(T.LlamaConfig, 30, intermediate_size=d_in)
        assert default_lr(resolve_target(m, default_module(m))) == pytest.approx(lr)
    assert 4.6e-3 < 5e-4 * 14336 / 1536 < 4.7e-3
    gpt2 = T.GPT2Config(vocab_size=32, n_embd=8, n_layer=8, n_head=2)
    with torch.device("meta"):
        gpt2 = T.AutoModelForCausalLM.from_config(gpt2)
    assert default_module(gpt2) == "transformer.h.6.mlp.c_proj"  # round(0.6875 * 8) = 6


def test_a_turn_touches_only_its_weight():
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()  # whatever mode it was in comes back
    snap = snapshot(model)
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, lr=1e-2, batch_size=2, epochs=3)
    ed.edit(REQUESTS)
    assert changed(model, snap) == [MODULE + ".weight"]
    assert ed.last_turn["steps"] > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- the method
def test_it_reaches_the_targets_and_stops_early():
    model = tiny_llama()
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, **FAST)
    assert not any(teacher_forced(ed, REQUESTS))
    report = ed.edit(REQUESTS)
    assert all(teacher_forced(ed, REQUESTS))
    rec = ed.last_turn
    losses = rec["epoch_losses"]
    # the published early stop: after the first epoch whose mean loss is under 1e-2
    assert rec["stopped"] and rec["epochs"] == len(losses) < FAST["epochs"]
    assert losses[-1] < 1e-2 <= min(losses[:-1])
    assert losses[0] > 1.0
    # the published skip: mini-batches already under the stop loss take no step
    n_batches = math.ceil(len(REQUESTS) / FAST["batch_size"])
    assert 0 < rec["steps"] < rec["epochs"] * n_batches
    assert report.n_requests == 5 and report.turn == 1


def test_eos_is_appended_to_every_target():
    tok = ToyTokenizer()
    model = tiny_llama()
    ed = LocFTEditor(model, tok, module=MODULE, **FAST)
    plain = LocFTEditor(model, tok, module=MODULE, eos=False)
    for r, t, p in zip(REQUESTS, ed._tokenize(REQUESTS), plain._tokenize(REQUESTS)):
        answer = tok(" " + r.target, add_special_tokens=False)["input_ids"]
        assert [x for x in p.labels if x != -100] == answer
        assert [x for x in t.labels if x != -100] == answer + [tok.eos_token_id]
        assert t.input_ids == p.input_ids + [answer[-1]]  # the last answer token predicts EOS
    report = ed.edit(REQUESTS)
    assert report.n_tokens == sum(len(tok(" " + r.target)["input_ids"]) for r in REQUESTS)
    # the model now ends each answer: EOS is the argmax after the whole answer
    with torch.no_grad():
        for r in REQUESTS:
            ids = (
                tok(r.prompt)["input_ids"]
                + tok(" " + r.target, add_special_tokens=False)["input_ids"]
            )
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert int(logits.argmax()) == tok.eos_token_id


def test_loss_is_the_mean_over_requests_of_their_answer_token_loss():
    """The published loss: each request's mean cross-entropy over its answer tokens and EOS
    (not its prompt, not the padding), then the mean over the mini-batch's requests (not
    over its tokens). Checked against each request run alone, unpadded."""
    from ultraedit_fast.model.requests import pad_batch

    model = tiny_llama()
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE)
    requests = [EditRequest("the alpha is", "zz x"), EditRequest("capital of Paris", "q")]
    items = ed._tokenize(requests)
    alone = []
    with torch.no_grad():
        for t in items:
            logits = model(input_ids=torch.tensor([t.input_ids])).logits[0]
            labels = torch.tensor(t.labels)
            keep = labels != -100
            alone.append(torch.nn.functional.cross_entropy(logits[keep], labels[keep]))
        batched = ed._loss(pad_batch(items, [0, 1]))
    assert len(items[0].input_ids) != len(items[1].input_ids)  # padding is exercised
    assert float(batched) == pytest.approx(float(torch.stack(alone).mean()), rel=1e-5)
    assert float(batched) != pytest.approx(  # a token mean would weigh "zz x" more
        float(sum(a * (len(t.labels) - t.labels.count(-100)) for a, t in zip(alone, items)))
        / sum(len(t.labels) - t.labels.count(-100) for t in items),
        rel=1e-3,
    )


def test_stop_loss_rules():
    model = tiny_llama()
    snap = snapshot(model)
    # every mini-batch is under the stop loss: no step, and the first epoch ends the turn
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, stop_loss=100.0, epochs=5)
    ed.edit(REQUESTS)
    assert ed.last_turn == {
        "epoch_losses": ed.last_turn["epoch_losses"],
        "epochs": 1,
        "steps": 0,
        "stopped": True,
    }
    assert changed(model, snap) == []
    # stop_loss=0: every epoch runs, every mini-batch steps
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, stop_loss=0, epochs=4, batch_size=2)
    ed.edit(REQUESTS)
    assert ed.last_turn["epochs"] == 4 and ed.last_turn["steps"] == 4 * 3
    assert not ed.last_turn["stopped"]


# ----------------------------------------------------------------------------- lifelong
def test_turns_accumulate_from_the_edited_weight():
    tok = ToyTokenizer()
    first, second = REQUESTS[:3], REQUESTS[3:]
    model = tiny_llama()
    ed = LocFTEditor(model, tok, module=MODULE, **FAST)
    ed.edit(first)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    report = ed.edit(second)
    assert ed.turns == 2 and report.turn == 2
    w2 = model.get_submodule(MODULE).weight.detach().clone()

    def second_turn_from(state):  # the second turn alone, from ``state``
        m = tiny_llama()
        m.load_state_dict(state)
        alone = LocFTEditor(m, tok, module=MODULE, **FAST)
        alone.turns = 1  # the same shuffles as the second turn
        alone.edit(second)
        return m.get_submodule(MODULE).weight.detach()

    # the second turn starts from the first turn's weight, with nothing else carried over
    assert torch.equal(second_turn_from(after_first), w2)
    assert not torch.equal(second_turn_from(tiny_llama().state_dict()), w2)
    assert all(teacher_forced(ed, second))


def test_keep_optimizer_carries_adam_across_turns():
    model = tiny_llama()
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, keep_optimizer=True, **FAST)
    ed.edit(REQUESTS[:3])
    steps1 = ed.last_turn["steps"]
    ed.edit(REQUESTS[3:])
    (state,) = ed._optimizer.state.values()
    assert int(state["step"]) == steps1 + ed.last_turn["steps"]
    fresh = LocFTEditor(tiny_llama(), ToyTokenizer(), module=MODULE, **FAST)
    fresh.edit(REQUESTS[:3])
    assert fresh._optimizer is None  # a fresh Adam per turn; its moments are not kept


def test_low_precision_weight_trains_through_an_fp32_copy():
    model = tiny_llama(dtype=torch.bfloat16)
    snap = snapshot(model)
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, lr=1e-2, batch_size=2, epochs=5)
    ed.edit(REQUESTS)
    assert changed(model, snap) == [MODULE + ".weight"]
    assert model.get_submodule(MODULE).weight.dtype == torch.bfloat16
    losses = ed.last_turn["epoch_losses"]
    assert losses[-1] < losses[0]


def test_conv1d_module_gpt2():
    model, _ = make_tiny("gpt2")
    snap = snapshot(model)
    ed = LocFTEditor(model, ToyTokenizer(), lr=1e-2, batch_size=2, epochs=2)
    assert ed.module_name == "transformer.h.3.mlp.c_proj"
    ed.edit(REQUESTS)
    assert changed(model, snap) == ["transformer.h.3.mlp.c_proj.weight"]


# ----------------------------------------------------------------------------- protocol
def test_protocol_report_config_describe():
    model = tiny_llama()
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, epochs=2)
    assert isinstance(ed, Editor) and ed.name == "locft-bf" and ed.turns == 0
    report = ed.edit([{"prompt": "capital of Rome", "target": "x"}])
    assert report.backend == "torch" and report.device == "cpu"
    assert report.modules == [MODULE] and report.n_requests == 1 and report.n_tokens == 3
    assert set(report.seconds) == {"tokenize", "train"}
    assert report.total_seconds == pytest.approx(sum(report.seconds.values()))
    assert report.peak_memory_bytes is None and report.peak_memory_kind == "not_measured"
    cfg = ed.config
    assert isinstance(cfg, LocFTConfig) and cfg.to_dict()["module"] == MODULE
    assert LocFTConfig(**cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    d = ed.describe()
    assert d["editor"] == "locft-bf" and d["modules"] == [MODULE] and d["preset"] is None
    # the published 5e-4 at Llama-3-8B's fan-in (14336), scaled to this one's (96)
    assert d["lr"] == pytest.approx(5e-4 * 14336 / 96) == default_lr(ed.target)
    assert d["batch_size"] == 8 and d["backend"] == "torch"
    assert d["epochs"] == 2 and d["stop_loss"] == 1e-2
    measured = LocFTEditor(model, ToyTokenizer(), module=MODULE, epochs=1, measure_memory=True)
    assert measured.edit(REQUESTS[:1]).peak_memory_bytes > 0


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(module="model.layers.9.mlp.down_proj"), "module: 'model.layers.9"),
        (dict(module="model.layers.1.mlp"), "module: .*LlamaMLP.*expected nn.Linear"),
        (dict(lr=0), "lr: expected a positive"),
        (dict(lr=-1e-3), "lr: expected a positive"),
        (dict(lr=float("nan")), "lr: expected a positive"),
        (dict(epochs=0), "epochs: expected a positive int"),
        (dict(epochs=2.5), "epochs: expected a positive int"),
        (dict(batch_size=0), "batch_size: expected a positive int"),
        (dict(batch_size=-4), "batch_size: expected a positive int"),
        (dict(stop_loss=-1.0), "stop_loss: expected a finite float >= 0"),
        (dict(weight_decay=float("inf")), "weight_decay: expected a finite float >= 0"),
    ],
)
def test_bad_options_are_refused_at_the_constructor(options, match):
    with pytest.raises(ValueError, match=match):
        LocFTEditor(tiny_llama(), ToyTokenizer(), **options)


def test_bad_types_and_unknown_options():
    model = tiny_llama()
    with pytest.raises(TypeError, match="lr"):
        LocFTEditor(model, ToyTokenizer(), lr="1e-3")
    with pytest.raises(TypeError, match="keep_optimizer"):
        LocFTEditor(model, ToyTokenizer(), keep_optimizer=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'modules'"):
        LocFTEditor(model, ToyTokenizer(), modules=[MODULE])
    with pytest.raises(TypeError, match="model"):
        LocFTEditor("gpt2", ToyTokenizer())

    class NoEos(ToyTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError, match="eos: the tokenizer has no eos_token_id"):
        LocFTEditor(model, NoEos())
    assert LocFTEditor(model, NoEos(), eos=False).eos_id is None


@pytest.mark.parametrize(
    "requests, exc, match",
    [
        ([], ValueError, "requests: expected at least one request"),
        ([{"prompt": "a b"}], ValueError, r"requests\[0\]: missing keys \['target'\]"),
        ([REQUESTS[0], {"prompt": " ", "target": "x"}], ValueError, r"requests\[1\]"),
        ("capital of Rome", TypeError, "requests: expected a list"),
        ([EditRequest("p" * 70, "x")], ValueError, r"requests\[0\]: 73 tokens .* context of 64"),
        ([EditRequest("p" * 62, "x")], ValueError, r"requests\[0\]: 65 tokens \(prompt, target and EOS\)"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_before_anything_runs(requests, exc, match):
    model = tiny_llama()
    snap = snapshot(model)
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, epochs=2)
    with pytest.raises(exc, match=match):
        ed.edit(requests)
    assert changed(model, snap) == [] and ed.turns == 0 and ed.last_turn is None


# ----------------------------------------------------------------------------- all or nothing
def _fail_on_call(ed, n, make):
    """Make the ``n``-th loss of ``ed`` what ``make(loss)`` returns (or raises)."""
    real, calls = ed._loss, [0]

    def loss(batch):
        calls[0] += 1
        value = real(batch)
        return make(value) if calls[0] == n else value

    ed._loss = loss
    return calls


def _boom(loss):
    raise RuntimeError("out of memory (simulated)")


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda loss: loss * float("nan"), EditRefused, "loss is not finite"),
        (lambda loss: loss * float("inf"), EditRefused, "loss is not finite"),
        (_boom, RuntimeError, "simulated"),
    ],
)
@pytest.mark.parametrize("keep_optimizer", [False, True])
def test_a_failed_turn_leaves_everything_as_it_was(make, exc, match, keep_optimizer):
    model = tiny_llama()
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, keep_optimizer=keep_optimizer, **FAST)
    ed.edit(REQUESTS[:2])
    snap = snapshot(model)
    adam = None
    if keep_optimizer:
        adam = {k: bits(v).clone() for k, v in ed._optimizer.state_dict()["state"][0].items()}
    calls = _fail_on_call(ed, 7, make)  # midway: after several Adam steps of this turn
    with pytest.raises(exc, match=match):
        ed.edit(REQUESTS[2:])
    assert calls[0] == 7
    assert changed(model, snap) == []
    assert ed.turns == 1 and ed.last_turn["epochs"] > 0
    assert all(p.grad is None for p in model.parameters())
    if keep_optimizer:
        state = ed._optimizer.state_dict()["state"][0]
        assert {k: bits(v) for k, v in state.items()}.keys() == adam.keys()
        assert all(torch.equal(bits(v), adam[k]) for k, v in state.items())
    else:
        assert ed._optimizer is None
    # and the editor goes on: the next turn is made as if the failed one never was
    del ed._loss
    assert ed.edit(REQUESTS[2:]).turn == 2


def test_a_non_finite_gradient_is_refused():
    model = tiny_llama()
    snap = snapshot(model)
    ed = LocFTEditor(model, ToyTokenizer(), module=MODULE, **FAST)
    w = model.get_submodule(MODULE).weight
    handle = w.register_hook(lambda g: g * float("nan"))
    try:
        with pytest.raises(EditRefused, match="gradient .* is not finite"):
            ed.edit(REQUESTS)
    finally:
        handle.remove()
    assert changed(model, snap) == [] and ed.turns == 0
