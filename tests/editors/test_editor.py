"""Behaviour of a fast turn: what it touches, what it leaves alone, and atomicity."""

import dataclasses

import pytest
import torch

from conftest import clone_model, make_tiny, random_requests
from ultraedit_fast import (
    EditRefused,
    EditReport,
    EditRequest,
    ReferenceEditor,
    UltraEditor,
    fast_edit,
)
from ultraedit_fast.kernels import resolve_backend
from ultraedit_fast.model.requests import IGNORE, make_minibatches, tokenize_pair


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, saved):
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- tokenisation
def test_tokenisation_follows_the_spec(toy_tokenizer):
    t = tokenize_pair(toy_tokenizer, "ab", "cd")
    p = toy_tokenizer("ab")["input_ids"]  # BOS a b
    a = toy_tokenizer(" cd", add_special_tokens=False)["input_ids"]  # ' ' c d
    assert t.input_ids == p + a[:-1]
    assert t.labels == [IGNORE] * (len(p) - 1) + a
    assert len(t.input_ids) == len(t.labels)


def test_minibatches_sorted_longest_first_stable_and_right_padded(toy_tokenizer):
    reqs = [
        EditRequest("a", "b"),
        EditRequest("abcd", "e"),
        EditRequest("x", "y"),
        EditRequest("abcdefg", "h"),
        EditRequest("q", "r"),
    ]
    batches = make_minibatches(toy_tokenizer, reqs, batch_size=2)
    assert [b.order for b in batches] == [[3, 1], [0, 2], [4]]  # ties keep input order
    b = batches[0]
    assert b.input_ids.shape == (2, 9)
    assert b.attention_mask[1].tolist() == [1] * 6 + [0] * 3
    assert b.labels[1, 6:].tolist() == [IGNORE] * 3
    assert b.input_ids[1, 6:].tolist() == [0] * 3


def test_dicts_are_accepted_like_requests(toy_tokenizer):
    model, modules = make_tiny("llama")
    m2 = clone_model(model)
    reqs = random_requests(5)
    dicts = [{"prompt": r.prompt, "target": r.target, "rephrase": r.rephrase} for r in reqs]
    UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4).edit(reqs)
    UltraEditor(m2, toy_tokenizer, modules=modules, lr=1e-4).edit(dicts)
    for (k, v), (_, w) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, w), k


# ----------------------------------------------------------------------------- model state
def test_turn_restores_flags_modes_hooks_and_makes_no_weight_grads(toy_tokenizer):
    model, modules = make_tiny("llama")
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    hooks = {n: (len(m._forward_hooks), len(m._backward_hooks)) for n, m in model.named_modules()}
    rep = UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4).edit(random_requests(7))
    assert rep.n_tokens > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {
        n: (len(m._forward_hooks), len(m._backward_hooks)) for n, m in model.named_modules()
    } == hooks
    assert all(p.grad is None for p in model.parameters()), "a weight gradient was computed"


def test_backward_stops_at_the_lowest_edited_layer(toy_tokenizer):
    """With every parameter requiring grad (a freshly built model), no gradient reaches
    a module below the lowest edited one (layer 0; layer 1 is the lowest edited); a
    plain backward with the model's own flags does reach it."""
    model, modules = make_tiny("llama")
    assert all(p.requires_grad for p in model.parameters())
    reached = []
    h = model.model.layers[0].mlp.down_proj.register_full_backward_hook(
        lambda *a: reached.append(1)
    )
    UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4).edit(random_requests(4))
    assert reached == []
    model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits.sum().backward()
    h.remove()
    assert reached, "the probe never fires: the check above could not fail"


def test_report_has_counts_phases_memory_and_backend(toy_tokenizer):
    model, modules = make_tiny("gpt2")
    ed = UltraEditor(
        model, toy_tokenizer, modules=modules, lr=1e-4, batch_size=3, measure_memory=True
    )  # opt-in: it resets the process's peak counters
    reqs = random_requests(8)
    rep = ed.edit(reqs)
    assert isinstance(rep, EditReport)
    assert rep.n_requests == 8 and rep.turn == 1
    expected_tokens = sum(
        len(toy_tokenizer(" " + r.target, add_special_tokens=False)["input_ids"]) for r in reqs
    )
    assert rep.n_tokens == expected_tokens
    assert set(rep.seconds) == {"capture", "statistics", "solve", "step", "apply"}
    assert rep.seconds["step"] == 0.0 and rep.step_scale is None  # lr given: the paper's step
    assert all(v >= 0 for v in rep.seconds.values())
    assert rep.total_seconds >= sum(rep.seconds.values()) * 0.99
    assert rep.peak_memory_bytes > 10 * 2**20 and rep.peak_memory_kind.startswith("cpu")
    assert rep.backend == resolve_backend(None, "cpu").name
    assert "turn 1" in str(rep)
    assert ed.edit(reqs).turn == 2


def test_fast_edit_one_call_and_continuing_an_editor(toy_tokenizer):
    model, modules = make_tiny("llama")
    m2 = clone_model(model)
    reqs1, reqs2 = random_requests(5, seed=1), random_requests(6, seed=2)
    ed = UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4)
    fast_edit(model, toy_tokenizer, reqs1, editor=ed)
    rep = fast_edit(model, toy_tokenizer, reqs2, editor=ed)
    assert rep.turn == 2 and ed.turns == 2
    ed2 = UltraEditor(m2, toy_tokenizer, modules=modules, lr=1e-4)
    ed2.edit(reqs1)
    ed2.edit(reqs2)
    assert _same(model, _params(m2))
    with pytest.raises(ValueError, match="editor"):
        fast_edit(model, toy_tokenizer, reqs1, editor=ed, lr=1e-3)
    with pytest.raises(ValueError, match="different model"):
        fast_edit(m2, toy_tokenizer, reqs1, editor=ed)
    rep = fast_edit(m2, toy_tokenizer, reqs1, modules=modules, lr=1e-4)
    assert rep.turn == 1


# ----------------------------------------------------------------------------- atomicity
def test_non_finite_shift_refuses_the_turn_and_changes_nothing(toy_tokenizer):
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4)
    ed.edit(random_requests(5))
    saved, states = _params(model), {k: s.clone() for k, s in ed.normalizers.items()}
    # NaN in the input of an edited module (a hook on the layer below it)
    h = model.model.layers[1].input_layernorm.register_forward_hook(
        lambda m, a, out: out * float("nan")
    )
    with pytest.raises(EditRefused, match="non-finite"):
        ed.edit(random_requests(5, seed=9))
    h.remove()
    assert _same(model, saved)
    assert ed.turns == 1
    for k, s in ed.normalizers.items():
        assert s.n == states[k].n and torch.equal(s.mean, states[k].mean)
        assert torch.equal(s.std, states[k].std) and torch.equal(s.acc, states[k].acc)
    ed.edit(random_requests(5, seed=9))  # and the editor still works
    assert ed.turns == 2


def test_failure_while_writing_weights_restores_every_weight(toy_tokenizer, monkeypatch):
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4, backend="torch")
    ed.edit(random_requests(5))
    saved, n_before = _params(model), {k: s.n for k, s in ed.normalizers.items()}
    backend = ed.backends[torch.device("cpu")]
    calls = []

    def flaky(w, a, k, transposed):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fault")
        backend.rank_update_(w, a, k, transposed)

    monkeypatch.setitem(
        ed.backends, torch.device("cpu"), dataclasses.replace(backend, rank_update_=flaky)
    )
    with pytest.raises(RuntimeError, match="device fault"):
        ed.edit(random_requests(5, seed=4))
    assert len(calls) == 3  # two modules had been written, then restored
    assert _same(model, saved)
    assert {k: s.n for k, s in ed.normalizers.items()} == n_before and ed.turns == 1


def test_failure_during_capture_changes_nothing(toy_tokenizer):
    model, modules = make_tiny("gpt2")
    ed = UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4)
    saved = _params(model)
    reqs = random_requests(9)

    def boom(m, a, out):
        raise KeyboardInterrupt

    h = model.transformer.h[3].register_forward_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        ed.edit(reqs)
    h.remove()
    assert _same(model, saved) and ed.normalizers == {} and ed.turns == 0
    assert all(not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- low precision
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_edits_land_close_to_float32(arch, dtype, toy_tokenizer):
    """The same edits on a bf16/fp16 copy move the weights like the fp32 run, within a
    dozen units of roundoff of that precision (measured: about 5)."""
    shifts = {}
    for dt in (torch.float32, dtype):
        model, modules = make_tiny(arch, dtype=dt)
        before = {n: model.get_submodule(n).weight.detach().float().clone() for n in modules}
        ed = UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4, batch_size=4)
        for t in range(3):
            ed.edit(random_requests(11, seed=t))
        assert model.get_submodule(modules[0]).weight.dtype == dt
        shifts[dt] = {
            n: model.get_submodule(n).weight.detach().float() - before[n] for n in modules
        }
    for n in shifts[dtype]:
        ref = shifts[torch.float32][n]
        err = ((shifts[dtype][n] - ref).norm() / ref.norm()).item()
        assert err < 12 * EPS[dtype], (n, err)


def test_low_precision_fast_matches_reference_in_bf16(toy_tokenizer):
    model, modules = make_tiny("llama", dtype=torch.bfloat16)
    ref_model = clone_model(model)
    before = {n: model.get_submodule(n).weight.detach().float().clone() for n in modules}
    fast = UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4, batch_size=4)
    ref = ReferenceEditor(ref_model, toy_tokenizer, modules=modules, lr=1e-4, batch_size=4)
    for t in range(2):
        fast.edit(random_requests(9, seed=t))
        ref.edit(random_requests(9, seed=t))
    for n in modules:
        a = model.get_submodule(n).weight.float() - before[n]
        b = ref_model.get_submodule(n).weight.float() - before[n]
        assert ((a - b).norm() / b.norm()).item() < 3 * EPS[torch.bfloat16], n


# ----------------------------------------------------------------------------- configuration
def test_presets_pick_modules_and_lr(toy_tokenizer):
    model, _ = make_tiny("llama")
    ed = UltraEditor(model, toy_tokenizer)
    assert ed.preset == "generic:llama"
    assert ed.module_names and all(n.endswith("mlp.up_proj") for n in ed.module_names)
    d_in = model.config.hidden_size
    assert ed.lr == pytest.approx(1e-4 * 576 / d_in)
    gpt2, _ = make_tiny("gpt2")
    assert UltraEditor(gpt2, toy_tokenizer).module_names[0].endswith("mlp.c_fc")


def test_paper_presets_match_the_real_shapes():
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config
    from ultraedit_fast.core.presets import find_preset, resolve_edit_config

    with torch.device("meta"):
        mistral = AutoModelForCausalLM.from_config(
            MistralConfig(
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=32768,
            )
        )
        qwen = AutoModelForCausalLM.from_config(
            Qwen2Config(
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=152064,
            )
        )
    assert find_preset(mistral).name == "Mistral-7B-v0.3"
    assert find_preset(qwen).name == "Qwen2.5-7B-Instruct"
    # meta weights are refused at the boundary, naming the module
    with pytest.raises(ValueError, match="meta"):
        resolve_edit_config(mistral, None, None)


def test_unknown_model_error_lists_the_module_names(toy_tokenizer):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])

    with pytest.raises(ValueError, match=r"blocks\.\{0\.\.2\}|blocks\.0"):
        UltraEditor(Tiny(), toy_tokenizer)


def test_bad_arguments_are_refused_at_construction(toy_tokenizer):
    model, modules = make_tiny("llama")
    for lr in (0, -1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            UltraEditor(model, toy_tokenizer, modules=modules, lr=lr)
    with pytest.raises(ValueError, match="not a module"):
        UltraEditor(model, toy_tokenizer, modules=["model.layers.9.mlp.up_proj"], lr=1e-4)
    with pytest.raises(TypeError, match="nn.Linear"):
        UltraEditor(model, toy_tokenizer, modules=["model.layers.1.mlp"], lr=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4, batch_size=0)
    with pytest.raises(ValueError, match="backend"):
        UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4, backend="opencl")
    with pytest.raises(ValueError, match="cuda"):
        UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4, backend="cuda")
    ed = UltraEditor(model, toy_tokenizer, modules=modules, lr=1e-4)
    with pytest.raises(ValueError, match="requests"):
        ed.edit([])
    with pytest.raises(TypeError, match=r"requests\[1\]"):
        ed.edit([EditRequest("a", "b"), "c"])
    with pytest.raises(ValueError, match="prompt"):
        ed.edit([{"prompt": "  ", "target": "x"}])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi3", "gptj", "gpt2"])
def test_answer_logits_equal_the_full_forward_at_answer_tokens(arch, toy_tokenizer):
    from ultraedit_fast.model.forward import _last_mlp, _split, answer_logits

    model, _ = make_tiny(arch)
    assert _split(model) is not None  # the rows-only path is the one tested
    batch = make_minibatches(toy_tokenizer, random_requests(6), batch_size=6)[0]
    mask = batch.labels != IGNORE
    mlp = _last_mlp(_split(model)[0])
    seen = []
    h = mlp.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
        assert seen[-1][:2] == tuple(mask.shape)
        rows = answer_logits(model, batch.input_ids, batch.attention_mask, mask)
        assert seen[-1][:2] == (1, int(mask.sum()))  # the last MLP ran on answer rows only
    h.remove()
    assert mask.sum() < mask.numel() / 2
    torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-5)
    # the hooks are gone: a plain forward runs every row again
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks
