"""The editor's configuration: typed and visible, resolved once, and every option with a
flag accepted by the command line."""

import dataclasses
import inspect
import typing

import pytest
import torch

from conftest import make_tiny
from ultraedit_fast import EditRefused, EditorConfig, ReferenceEditor, UltraEditor
from ultraedit_fast.core.cli_options import cli_option_names
from ultraedit_fast.core.config import EditorOptions, option_names
from ultraedit_fast.core.presets import FACTS_TURN_MAX, choose_regime, resolve_config


def test_the_typed_options_list_exactly_the_config_fields():
    assert set(typing.get_type_hints(EditorOptions)) == set(option_names())


@pytest.mark.parametrize("cls, reference", [(UltraEditor, False), (ReferenceEditor, True)])
def test_every_option_is_in_the_signature_and_help(cls, reference):
    sig = inspect.signature(cls)
    assert list(sig.parameters)[:3] == ["model", "tokenizer", "config"]
    for name in option_names(reference=reference):
        p = sig.parameters[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        assert p.default == getattr(EditorConfig(), name)
        assert name in cls.__doc__


def test_config_object_and_overrides(toy_tokenizer):
    model, _ = make_tiny("llama")
    mods = ["model.layers.1.mlp.up_proj"]
    cfg = EditorConfig(modules=mods, lr=1e-3, batch_size=3)
    ed = UltraEditor(model, toy_tokenizer, cfg, batch_size=4)
    assert ed.config.batch_size == 4 and ed.config.modules == tuple(mods)
    assert cfg.batch_size == 3  # the caller's object is not changed
    with pytest.raises(TypeError, match="config"):
        UltraEditor(model, toy_tokenizer, mods)  # the old positional modules
    with pytest.raises(TypeError, match="unexpected option 'lr_'"):
        UltraEditor(model, toy_tokenizer, lr_=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ed.config.lr = 2.0
    with pytest.raises(AttributeError):
        ed.lr = 2.0  # options change only through configure()
    assert ed.configure(lr=2e-3).lr == 2e-3 == ed.lr
    with pytest.raises(ValueError, match="modules"):
        ed.configure(modules=["model.layers.0.mlp.up_proj"])
    with pytest.raises(TypeError, match="share_normalizer"):
        ReferenceEditor(model, toy_tokenizer, EditorConfig(transactional=False))


def test_regime_is_chosen_by_one_pure_function():
    model, _ = make_tiny("llama")
    open_cfg = EditorConfig()
    assert choose_regime(open_cfg) == "stream"
    assert choose_regime(open_cfg, FACTS_TURN_MAX) == "facts"
    assert choose_regime(open_cfg, FACTS_TURN_MAX + 1) == "stream"
    assert choose_regime(EditorConfig(regime="stream"), 1) == "stream"
    assert choose_regime(EditorConfig(lr=1e-3), 1) == "stream"  # lr given: not open
    before = [p.detach().clone() for p in model.parameters()]
    a, preset = resolve_config(model, open_cfg, "facts")
    assert a == resolve_config(model, open_cfg, "facts")[0] and a.step == "auto"
    assert all(torch.equal(x, p) for x, p in zip(before, model.parameters()))


def test_a_refused_first_turn_leaves_the_editor_as_it_was(toy_tokenizer):
    """The settle step (regime, modules, step) is part of the turn's transaction."""
    model, _ = make_tiny("llama")
    ed = UltraEditor(model, toy_tokenizer)
    config, preset, targets = ed.config, ed.preset, list(ed.targets)
    bad = [{"prompt": "a b c " * 400, "target": "d"}]  # longer than the context
    with pytest.raises(ValueError):
        ed.edit(bad)
    assert ed.config == config and ed.preset == preset and ed.targets == targets
    assert ed.turns == 0 and not ed.normalizers
    # a turn refused later in the turn (a non-finite shift) also leaves the settle undone
    ed2 = UltraEditor(model, toy_tokenizer, step="paper", lr=1e38, modules=None)
    cfg2 = ed2.config
    with pytest.raises(EditRefused):
        ed2.edit([{"prompt": "a b", "target": "c"}])
    assert ed2.config == cfg2


def test_every_option_with_a_flag_is_accepted_by_run():
    from ultraedit_fast.cli.parser import build_parser
    from ultraedit_fast.core.cli_options import _flag

    values = {
        "modules": "a,b",
        "lr": "0.1",
        "batch_size": "2",
        "backend": "torch",
        "tokens_per_pass": "0",
        "regime": "facts",
        "step": "paper",
        "step_target": "0.5",
        "locality_budget": "0.1",
        "max_step_scale": "4",
        "first_step_scale": "16",
        "drift_budget": "0.1",
        "ridge": "2",
        "preserve_general": "4",
        "preserve_weight": "2",
        "preserve_edits": "0.5",
        "preserve_text": "x.txt",
        "null_space": "0.01",
        "drift_from": "unedited",
        "whiten_values": "off",
        "locality_check": "answer",
    }
    for name in cli_option_names():
        argv = [
            "run",
            "--data",
            "x.json",
            "--turns",
            "1",
            "--edits-per-turn",
            "1",
            "--output-dir",
            "o",
            _flag(name),
        ]
        if name in values:
            argv.append(values[name])
        args = build_parser().parse_args(argv)
        assert getattr(args, name) is not None, name


def test_null_space_auto_is_the_presets_choice(monkeypatch):
    from ultraedit_fast.core import presets

    model, _ = make_tiny("llama")
    monkeypatch.setattr(presets, "NULL_SPACE", {("generic:llama", "stream"): 0.02})
    assert EditorConfig().null_space == "auto"
    assert resolve_config(model, EditorConfig(), "stream")[0].null_space == 0.02
    assert resolve_config(model, EditorConfig(), "facts")[0].null_space is None
    assert resolve_config(model, EditorConfig(lr=1e-3), "stream")[0].null_space is None
    assert resolve_config(model, EditorConfig(null_space="off"), "stream")[0].null_space is None
    assert resolve_config(model, EditorConfig(null_space=0.3), "facts")[0].null_space == 0.3
    with pytest.raises(ValueError, match="null_space: expected 'auto', 'off'"):
        EditorConfig(null_space="sometimes")
    with pytest.raises(ValueError, match="null_space"):
        EditorConfig(null_space=1.5)


def test_max_step_scale_left_open_is_the_presets_choice(monkeypatch):
    from ultraedit_fast.core import presets

    model, _ = make_tiny("llama")
    monkeypatch.setattr(presets, "MAX_STEP_SCALE", {("generic:llama", "facts"): 4.0})
    monkeypatch.setattr(presets, "FIRST_STEP_SCALE", {("generic:llama", "facts"): 32.0})
    assert EditorConfig().max_step_scale is None and EditorConfig().first_step_scale is None
    facts = resolve_config(model, EditorConfig(), "facts")[0]
    assert (facts.max_step_scale, facts.first_step_scale) == (4.0, 32.0)
    given = resolve_config(model, EditorConfig(max_step_scale=8), "facts")[0]
    assert (given.max_step_scale, given.first_step_scale) == (8.0, 8.0)
    first = resolve_config(model, EditorConfig(first_step_scale=2), "stream")[0]
    assert (first.max_step_scale, first.first_step_scale) == (64.0, 2.0)
    assert resolve_config(model, EditorConfig(), "stream")[0].max_step_scale == 64.0
    assert resolve_config(model, EditorConfig(lr=1e-3), "facts")[0].max_step_scale == 64.0
    assert resolve_config(model, EditorConfig(max_step_scale=16), "facts")[0].max_step_scale == 16
    with pytest.raises(ValueError, match="max_step_scale: expected a finite number >= 1"):
        EditorConfig(max_step_scale=0.5)


def test_preserve_edits_auto_is_the_presets_choice(monkeypatch):
    from ultraedit_fast.core import presets

    model, _ = make_tiny("llama")
    monkeypatch.setattr(presets, "PRESERVE_EDITS", {("generic:llama", "facts"): 2.0})
    assert EditorConfig().preserve_edits == "auto"
    assert resolve_config(model, EditorConfig(), "facts")[0].preserve_edits == 2.0
    assert resolve_config(model, EditorConfig(), "stream")[0].preserve_edits is None
    assert resolve_config(model, EditorConfig(lr=1e-3), "facts")[0].preserve_edits is None
    assert EditorConfig(preserve_edits="off").preserve_edits is None
    given = EditorConfig(preserve_edits=0.5)
    assert resolve_config(model, given, "stream")[0].preserve_edits == 0.5
    for bad in ("sometimes", 0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="preserve_edits: expected 'auto', 'off'"):
            EditorConfig(preserve_edits=bad)


def test_whiten_values_auto_is_the_presets_choice(monkeypatch):
    from ultraedit_fast.core import presets

    model, _ = make_tiny("llama")
    monkeypatch.setattr(presets, "WHITEN_VALUES", {("generic:llama", "stream")})
    assert EditorConfig().whiten_values == "auto"
    assert resolve_config(model, EditorConfig(), "stream")[0].whiten_values is True
    assert resolve_config(model, EditorConfig(), "facts")[0].whiten_values is False
    assert resolve_config(model, EditorConfig(lr=1e-3), "stream")[0].whiten_values is False
    off = EditorConfig(whiten_values="off")
    assert (
        off.whiten_values is False
        and resolve_config(model, off, "stream")[0].whiten_values is False
    )
    assert resolve_config(model, EditorConfig(whiten_values=True), "facts")[0].whiten_values is True
    with pytest.raises(ValueError, match="whiten_values: expected 'auto', True or False"):
        EditorConfig(whiten_values="sometimes")
