"""The AlphaEdit and MEMIT baselines on tiny random Llamas: AlphaEdit's update leaves the
preserved keys' outputs unchanged (MEMIT's does not), MEMIT writes its target, only the
chosen layers change, bad input is refused at the boundary, a failing turn changes nothing,
and AlphaEdit's cache of earlier keys grows turn by turn."""

import pytest
import torch

from conftest import LossyTokenizer, ToyTokenizer, make_tiny
from ultraedit_fast import EditRequest
from ultraedit_fast.baselines.alphaedit import (
    AlphaEditConfig,
    AlphaEditEditor,
    MEMITConfig,
    MEMITEditor,
)
from ultraedit_fast.baselines import memit_targets
from ultraedit_fast.baselines.memit_config import default_layers
from ultraedit_fast.editors.protocol import Editor

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (1, 2)
# a random model's activations are tiny: larger steps and clamp reach a target there
REACH = dict(v_lr=0.5, clamp_norm_factor=3.0, v_num_grad_steps=50)
PROMPT = "The capital of alpha is"
GENERAL = (
    "Rivers carry water from hills to the sea, and towns grow along their banks. "
    "Markets open early; farmers bring bread, cheese and apples. Children walk to "
    "school while the bakers close their ovens. In winter the lakes freeze and people "
    "skate on them; in summer they swim. Libraries lend books, museums keep old maps. "
)


def tiny_llama(seed=0, init=0.1):
    """A 4-block Llama (hidden 48, intermediate 96) whose weights are large enough for a
    single vector to move its prediction."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def text_path(tmp_path):
    path = tmp_path / "general.txt"
    path.write_text(GENERAL * 8)
    return str(path)


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(model):
    return {k: bits(v) for k, v in model.state_dict().items()}


def changed(model, snap):
    return sorted(k for k, v in model.state_dict().items() if not torch.equal(bits(v), snap[k]))


def down(model, layer):
    return model.model.layers[layer].mlp.down_proj.weight


def general_keys(model, tok, path, layer, window, max_windows=None):
    """The down-projection inputs of ``layer`` at every position of the general text's
    windows (each after the BOS): collected here, apart from the editor's code."""
    ids = tok(open(path).read(), add_special_tokens=False)["input_ids"]
    wins = [[1] + ids[k * window : (k + 1) * window] for k in range(len(ids) // window)]
    wins = wins[:max_windows]
    got = []
    h = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1]).double())
    )
    with torch.no_grad():
        model(input_ids=torch.tensor(wins))
    h.remove()
    return torch.cat(got)


def teacher_forced(model, tok, prompt, target):
    ids = tok(prompt)["input_ids"]
    a = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + a[:-1]])).logits[0, len(ids) - 1 :]
    return logits.argmax(-1).tolist(), a


# ----------------------------------------------------------------------------- the methods
def test_alphaedit_leaves_every_general_key_unchanged(text_path):
    """A sample of fewer tokens than d_in: the general keys span a subspace, AlphaEdit's
    null space (a threshold under float64 rounding) is its complement, so W_new k0 =
    W_old k0 for every general key k0, to float64 rounding. (MEMIT's solve, with so
    singular a ``C0``, also writes only off the sample's span: the contrast is the next
    test's, on a full-rank sample.)"""
    tok = LossyTokenizer()
    model = tiny_llama().double()
    old = {i: down(model, i).detach().clone() for i in LAYERS}
    keys = {i: general_keys(model, tok, text_path, i, 16, 4) for i in LAYERS}
    ed = AlphaEditEditor(
        model,
        tok,
        layers=LAYERS,
        general_text=text_path,
        cov_window=16,
        cov_max_windows=4,
        nullspace_threshold=1e-9,
        **REACH,
    )
    ed.edit([{"prompt": PROMPT, "target": "x"}])
    assert ed.general_keys == len(keys[LAYERS[0]]) == 4 * 17 < 96  # rank-deficient
    for i in LAYERS:
        delta = down(model, i).detach() - old[i]
        assert delta.norm() > 1e-3 * old[i].norm()  # an update was written
        out_old, out_new = keys[i] @ old[i].t(), keys[i] @ down(model, i).detach().t()
        torch.testing.assert_close(out_new, out_old, rtol=0, atol=1e-12 * out_old.abs().max())


def test_alphaedit_leaves_the_preserved_directions_unchanged():
    """A full-rank sample (the package's): the eigen-directions of the general keys'
    second moment far above the threshold are preserved by AlphaEdit, not by MEMIT."""
    tok = LossyTokenizer()
    threshold = 0.01
    moved = {}
    for cls, extra in ((AlphaEditEditor, dict(nullspace_threshold=threshold)), (MEMITEditor, {})):
        model = tiny_llama()
        old = {i: down(model, i).detach().double().clone() for i in LAYERS}
        preserved = {}
        for i in LAYERS:
            k = general_keys(model, tok, _builtin(), i, 64)
            evals, evecs = torch.linalg.eigh(k.t() @ k / len(k))
            preserved[i] = evecs[:, evals > 10 * threshold]
            assert preserved[i].shape[1] >= 5
        ed = cls(model, tok, layers=LAYERS, cov_window=64, mom2_update_weight=100.0, **extra)
        ed.edit([{"prompt": PROMPT, "target": "x"}])
        moved[cls.name] = max(
            float(((down(model, i).detach().double() - old[i]) @ preserved[i]).norm())
            / float((down(model, i).detach().double() - old[i]).norm())
            for i in LAYERS
        )
        if cls is AlphaEditEditor:
            assert 0 < min(u.shape[1] for u in ed.null_bases.values()) < 96
    assert moved["alphaedit"] < 1e-5, moved
    assert moved["memit"] > 1e-2, moved


def _builtin():
    from ultraedit_fast.scoring.health import BUILTIN

    return BUILTIN


@pytest.mark.parametrize("cls", [MEMITEditor, AlphaEditEditor])
@pytest.mark.parametrize("target", ["x", "Q"])
def test_a_single_edit_reaches_its_target(cls, target):
    tok = LossyTokenizer()
    model = tiny_llama()
    before, answer = teacher_forced(model, tok, PROMPT, target)
    assert before != answer
    snap = snapshot(model)
    extra = dict(mom2_update_weight=100.0) if cls is MEMITEditor else dict(nullspace_threshold=0.1)
    ed = cls(model, tok, layers=LAYERS, cov_window=64, **REACH, **extra)
    report = ed.edit([EditRequest(PROMPT, target)])
    after, _ = teacher_forced(model, tok, PROMPT, target)
    assert after == answer
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in LAYERS]
    assert changed(model, snap) == names  # only the chosen layers change
    assert report.turn == 1 and report.n_requests == 1 and report.n_tokens == 1
    assert set(report.seconds) == {"statistics", "targets", "keys", "solve", "apply"}


def test_the_key_token_is_the_subjects_last_else_the_prompts_last():
    tok = ToyTokenizer()  # BOS then one id per character
    reqs = [EditRequest(PROMPT, "Rome"), EditRequest("Rome is in", "x")]
    rows = memit_targets.build_rows(tok, reqs, ["alpha", None], ["Hi. "], 128)
    n = 2
    assert rows.lookup[0] == PROMPT.index("alpha") + len("alpha")  # BOS shifts by one
    assert rows.lookup[1] == len("Rome is in")
    assert rows.lookup[n] == len("Hi. ") + PROMPT.index("alpha") + len("alpha")
    assert rows.lookup[2 * n] == len("alpha")  # "alpha is a"
    assert rows.lookup[2 * n + 1] == len("Rome is in")  # subject-free: "Rome is in is a"
    assert tok.decode(rows.input_ids[2 * n, : len("alpha is a") + 1]) == "<s>alpha is a"


def test_batched_targets_match_targets_computed_alone():
    tok = LossyTokenizer()
    model = tiny_llama()
    cfg = AlphaEditConfig(**REACH)
    reqs = [EditRequest(PROMPT, "x"), EditRequest("Rome is the capital of", "Qz")]
    block = model.model.layers[LAYERS[-1]]
    ctx = ["Hello there. "]
    both = memit_targets.optimise_targets(
        model, block, memit_targets.build_rows(tok, reqs, [None, "Rome"], ctx, 256), cfg
    )
    for i, (r, s) in enumerate(zip(reqs, [None, "Rome"])):
        alone = memit_targets.optimise_targets(
            model, block, memit_targets.build_rows(tok, [r], [s], ctx, 256), cfg
        )
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-4, rtol=1e-4)


def test_the_cache_accumulates_the_keys_of_every_turn():
    tok = LossyTokenizer()
    model = tiny_llama()
    ed = AlphaEditEditor(
        model, tok, layers=LAYERS, cov_window=64, nullspace_threshold=0.1, context_prefixes=()
    )
    assert ed.describe()["cached_keys"] == 0
    ed.edit([EditRequest(PROMPT, "x")])
    layer = LAYERS[0]
    # after turn 1: U^T k k^T U, k the bare prompt's key at its last token, edited model
    got = []
    h = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: got.append(a[0][0, -1].double())
    )
    with torch.no_grad():
        model(input_ids=torch.tensor([tok(PROMPT)["input_ids"]]))
    h.remove()
    u = ed.null_bases[layer].double()
    expect = (u.t() @ got[0])[:, None] @ (u.t() @ got[0])[None, :]
    torch.testing.assert_close(ed.cache[layer].double(), expect, rtol=1e-4, atol=1e-6)
    first = {i: c.clone() for i, c in ed.cache.items()}
    ed.edit([EditRequest("Rome is the capital of", "Q"), EditRequest("Paris is in", "z")])
    assert ed.cached_keys == 3 and ed.turns == 2
    for i in LAYERS:
        grown = ed.cache[i] - first[i]
        assert float(torch.linalg.eigvalsh(grown.double()).min()) > -1e-5  # PSD increment
        assert float(grown.trace()) > 0


def test_the_cache_shapes_the_next_turn():
    """The same second turn, from the same weights, with and without the first turn's
    cache: the cache changes the update."""
    tok = LossyTokenizer()
    updates = []
    for keep in (True, False):
        model = tiny_llama()
        ed = AlphaEditEditor(model, tok, layers=LAYERS, cov_window=64, nullspace_threshold=0.1)
        ed.edit([EditRequest(PROMPT, "x")])
        if not keep:
            ed.cache = {i: torch.zeros_like(c) for i, c in ed.cache.items()}
        w = down(model, LAYERS[0]).detach().clone()
        ed.edit([EditRequest("Rome is the capital of", "Q")])
        updates.append(down(model, LAYERS[0]).detach() - w)
    assert (updates[0] - updates[1]).norm() > 1e-3 * updates[1].norm()


# ----------------------------------------------------------------------------- the protocol
def test_the_editors_follow_the_protocol():
    tok = LossyTokenizer()
    for cls, cfg_cls in ((MEMITEditor, MEMITConfig), (AlphaEditEditor, AlphaEditConfig)):
        ed = cls(tiny_llama(), tok, cov_window=64)
        assert isinstance(ed, Editor)
        assert isinstance(ed.config, cfg_cls) and ed.config.layers == (0, 1, 2, 3)
        d = ed.describe()
        for key in ("editor", "modules", "lr", "preset", "batch_size", "backend"):
            assert key in d
        assert d["editor"] == cls.name and d["preset"] == "published"
        assert ed.config.to_dict()["layers"] == [0, 1, 2, 3]
    assert default_layers(30) == (4, 5, 6, 7, 8)  # SmolLM2-135M
    assert default_layers(32) == (4, 5, 6, 7, 8)  # Llama-3-8B, as published
    ed = AlphaEditEditor(tiny_llama(), tok, cov_window=64, layers=(2,))
    assert ed.describe()["modules"] == ["model.layers.2.mlp.down_proj"]
    assert ed.describe()["preset"] == "user"
    assert MEMITEditor(tiny_llama(), tok, cov_window=64, v_lr=1.0).describe()["preset"] == "user"


def test_gpt2_conv1d_down_projections_are_edited_transposed():
    model, _ = make_tiny("gpt2", dtype=torch.float64)  # its update is tiny: no fp32 rounding
    tok = LossyTokenizer()
    snap = snapshot(model)
    old = model.transformer.h[1].mlp.c_proj.weight.detach().double().clone()
    ed = AlphaEditEditor(model, tok, layers=(1, 2), cov_window=64, nullspace_threshold=1e-4)
    ed.edit([EditRequest(PROMPT, "x")])
    assert changed(model, snap) == [f"transformer.h.{i}.mlp.c_proj.weight" for i in (1, 2)]
    delta = model.transformer.h[1].mlp.c_proj.weight.detach() - old  # (d_in, d_out)
    u = ed.null_bases[1].double()
    outside = delta.t() - (delta.t() @ u) @ u.t()  # the part acting off the null space
    assert delta.norm() > 0 and outside.norm() < 1e-9 * delta.norm()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(v_lr=-1.0), "v_lr"),
        (dict(v_num_grad_steps=0), "v_num_grad_steps"),
        (dict(layers=(2, 1)), "layers"),
        (dict(layers=(1, 9)), "layers"),
        (dict(layers=(-1,)), "layers"),
        (dict(nullspace_threshold=0.0), "nullspace_threshold"),
        (dict(l2=float("nan")), "l2"),
        (dict(kl_factor=-0.1), "kl_factor"),
        (dict(context_prefixes="The"), "context_prefixes"),
        (dict(cov_window=500), "cov_window"),
        (dict(cov_max_windows=0), "cov_max_windows"),
        (dict(no_such_option=1), "no_such_option"),
        (dict(general_text="/nonexistent/general.txt"), "general"),
    ],
)
def test_bad_options_are_refused_naming_them(options, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        AlphaEditEditor(tiny_llama(), LossyTokenizer(), cov_window=64, **{**options})


def test_bad_subjects_and_configs_are_refused():
    model, tok = tiny_llama(), LossyTokenizer()
    with pytest.raises(ValueError, match=r"subjects\["):
        MEMITEditor(model, tok, cov_window=64, subjects={PROMPT: "beta"})
    with pytest.raises(TypeError, match="subjects"):
        MEMITEditor(model, tok, cov_window=64, subjects=[PROMPT])
    with pytest.raises(TypeError, match="config"):
        MEMITEditor(model, tok, AlphaEditConfig(), cov_window=64)


def test_a_module_that_is_not_linear_is_refused_naming_it():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj = torch.nn.Sequential(torch.nn.Linear(96, 48))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj"):
        AlphaEditEditor(model, LossyTokenizer(), layers=(1, 2), cov_window=64)


@pytest.mark.parametrize(
    "requests, match",
    [
        ([], "requests"),
        ([{"prompt": PROMPT}], r"requests\[0\]"),
        ([{"prompt": PROMPT, "target": "x", "colour": 1}], r"requests\[0\]"),
        ([EditRequest(PROMPT, "x"), EditRequest("a" * 300, "x")], r"requests\[1\]"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(requests, match):
    model = tiny_llama()
    snap = snapshot(model)
    ed = AlphaEditEditor(model, LossyTokenizer(), layers=LAYERS, cov_window=64)
    with pytest.raises((ValueError, TypeError), match=match):
        ed.edit(requests)
    assert changed(model, snap) == [] and ed.turns == 0


# ----------------------------------------------------------------------------- all or nothing
def _failing_turn(monkeypatch, where):
    model = tiny_llama()
    ed = AlphaEditEditor(model, LossyTokenizer(), layers=LAYERS, cov_window=64)
    ed.edit([EditRequest(PROMPT, "x")])
    snap = snapshot(model)
    cache = {i: c.clone() for i, c in ed.cache.items()}
    calls = []
    original = getattr(ed, where)

    def second_fails(layer, *args):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(layer, *args)

    monkeypatch.setattr(ed, where, second_fails)
    with pytest.raises(RuntimeError, match="boom"):
        ed.edit([EditRequest("Rome is the capital of", "Q")])
    assert calls == list(LAYERS)
    assert changed(model, snap) == []
    assert ed.turns == 1 and ed.cached_keys == 1
    for i in LAYERS:
        assert torch.equal(ed.cache[i], cache[i])


@pytest.mark.parametrize("where", ["_solve", "_write"])
def test_a_turn_that_fails_midway_leaves_the_model_as_it_was(monkeypatch, where):
    """``_solve``: the second layer's solve raises (nothing written yet); ``_write``: the
    second layer's write raises, the first layer's write is undone."""
    _failing_turn(monkeypatch, where)


def test_a_non_finite_update_is_refused_with_no_change(monkeypatch):
    model = tiny_llama()
    ed = MEMITEditor(model, LossyTokenizer(), layers=LAYERS, cov_window=64)
    snap = snapshot(model)
    original = ed._solve
    monkeypatch.setattr(ed, "_solve", lambda *a: original(*a) * float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        ed.edit([EditRequest(PROMPT, "x")])
    assert changed(model, snap) == [] and ed.turns == 0
