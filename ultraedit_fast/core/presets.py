"""Which layers to edit, and with which ``lr``, for a given model.

The paper's six models get the paper's layers and ``lr = 1e-6`` (``docs/algorithm.md``
section 6). SmolLM2-135M-Instruct, the embedded default, gets the layers and ``lr``
calibrated on it (``model.layers.18..22.mlp.up_proj``, ``lr = 1e-4``: the best efficacy over
10 turns x 100 zsRE edits among settings that keep LS at or above the unedited model's; the
sweep and its scores are in ``benchmarks/README.md``). Other Llama / Mistral / Qwen2 / GPT-J /
GPT-2 / Phi-3 / Gemma models get a recipe scaled by shape: the MLP input projection of the
five layers around 53% of the depth (upstream's calibrated choice on SmolLM2, 14..18), with
``lr = 1e-4 * 576 / d_in`` since the effect of a shift scales with ``lr * d_in``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .config import REGIMES, EditorConfig
from ..model.targets import editable_modules, resolve_target, summarize_names

__all__ = [
    "Preset",
    "PRESETS",
    "PresetChoice",
    "find_preset",
    "resolve_edit_config",
    "decoder_layers_prefix",
    "summarize_names",
    "REGIMES",
    "FACTS_TURN_MAX",
]


# A first turn of at most this many requests, with the preset's modules and lr, takes the
# "facts" regime (UltraEditor(regime=None)).
FACTS_TURN_MAX = 32


@dataclass(frozen=True)
class Preset:
    """Where and how hard to edit one model. ``layers``/``lr``: the lifelong-stream regime
    (turns of about 100 edits, the paper's setting). ``facts_layers``/``facts_lr``: the
    regime of a handful of facts at a time, where it was measured (``None``: the stream's
    layers, with the step searched: ``step="auto"``)."""

    name: str
    match: Callable[[object], bool]  # on model.config
    layers: Dict[str, Sequence[int]]  # module suffix inside a decoder layer -> layer indices
    lr: float
    facts_layers: Optional[Dict[str, Sequence[int]]] = None
    facts_lr: Optional[float] = None


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        return _cfg(text, *names, default=default)
    return default


def _shape(config):
    return (
        getattr(config, "model_type", None),
        _cfg(config, "hidden_size", "n_embd"),
        _cfg(config, "num_hidden_layers", "n_layer"),
    )


PRESETS: List[Preset] = [
    Preset(
        "Mistral-7B-v0.3",
        lambda c: _shape(c) == ("mistral", 4096, 32),
        {"mlp.down_proj": [29, 30]},
        1e-6,
    ),
    Preset(
        "LLaMA-3-8B-Instruct",
        lambda c: _shape(c) == ("llama", 4096, 32) and _cfg(c, "vocab_size") == 128256,
        {"mlp.gate_proj": range(11, 16), "mlp.up_proj": range(18, 25)},
        1e-6,
    ),
    Preset(
        "Qwen2.5-7B-Instruct",
        lambda c: _shape(c) == ("qwen2", 3584, 28),
        {"mlp.gate_proj": range(18, 27), "mlp.up_proj": range(18, 27)},
        1e-6,
    ),
    Preset(
        "GPT-J-6B", lambda c: _shape(c) == ("gptj", 4096, 28), {"mlp.fc_out": range(18, 27)}, 1e-6
    ),
    Preset(
        "Phi-4",
        lambda c: _shape(c)[1:] == (5120, 40) and _shape(c)[0] in ("phi3", "phi4"),
        {"mlp.down_proj": range(30, 39)},
        1e-6,
    ),
    Preset(
        "Gemma-3-27B",
        lambda c: _shape(c)[1:] == (5376, 62) and str(_shape(c)[0]).startswith("gemma3"),
        {"mlp.gate_proj": range(52, 61), "mlp.up_proj": range(52, 61)},
        1e-6,
    ),
    Preset(
        "SmolLM2-135M-Instruct",
        lambda c: _shape(c) == ("llama", 576, 30),
        {"mlp.up_proj": range(18, 23)},
        1e-4,
        facts_layers={"mlp.down_proj": [26, 27]},
        facts_lr=3e-4,
    ),
]

# The MLP input projection of each supported family, for the generic recipe.
_MLP_IN = {
    "llama": "mlp.up_proj",
    "mistral": "mlp.up_proj",
    "qwen2": "mlp.up_proj",
    "qwen3": "mlp.up_proj",
    "gemma": "mlp.up_proj",
    "gemma2": "mlp.up_proj",
    "gemma3": "mlp.up_proj",
    "gemma3_text": "mlp.up_proj",
    "phi3": "mlp.gate_up_proj",
    "gptj": "mlp.fc_in",
    "gpt2": "mlp.c_fc",
}
_CALIBRATED_LR_X_DIN = 1e-4 * 576  # SmolLM2's calibrated lr times its up_proj d_in


@dataclass(frozen=True)
class PresetChoice:
    modules: List[str]
    lr: float
    preset: str  # name of the preset used, "generic:<model_type>", or "user"
    regime: str = "stream"  # which of the preset's regimes (REGIMES)


def decoder_layers_prefix(model) -> Optional[str]:
    """The dotted name of the model's list of decoder layers (``model.layers``,
    ``transformer.h``, ``model.language_model.layers``, ...)."""
    n_layers = _cfg(model.config, "num_hidden_layers", "n_layer")
    best = None
    for name, m in model.named_modules():
        if (
            isinstance(m, torch.nn.ModuleList)
            and len(m) > 0
            and (n_layers is None or len(m) == n_layers)
        ):
            if best is None or len(m) > best[1]:
                best = (name, len(m))
    return best[0] if best else None


def _expand(model, layers: Dict[str, Sequence[int]]) -> List[str]:
    prefix = decoder_layers_prefix(model)
    if prefix is None:
        raise ValueError(
            "modules: could not find the decoder layers of this model; pass "
            f"modules= explicitly, from {summarize_names(editable_modules(model))}"
        )
    return [f"{prefix}.{i}.{suffix}" for suffix, idx in layers.items() for i in idx]


def find_preset(model) -> Optional[Preset]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    for p in PRESETS:
        try:
            if p.match(config):
                return p
        except Exception:
            continue
    return None


def _generic(model) -> Optional[PresetChoice]:
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    suffix = _MLP_IN.get(str(mtype))
    n_layers = _cfg(config, "num_hidden_layers", "n_layer") if config is not None else None
    if suffix is None or not n_layers:
        return None
    n = max(1, min(5, n_layers // 6))
    centre = min(n_layers - 1, int(n_layers * 16 / 30))
    start = max(0, min(centre - n // 2, n_layers - n))
    modules = _expand(model, {suffix: range(start, start + n)})
    d_in, _ = resolve_target(model, modules[0]).shape
    return PresetChoice(modules, _CALIBRATED_LR_X_DIN / d_in, f"generic:{mtype}")


def resolve_edit_config(
    model, modules: Optional[Sequence[str]], lr: Optional[float], regime: str = "stream"
) -> PresetChoice:
    """Fill ``modules``/``lr`` (already checked by :class:`~ultraedit_fast.core.config.EditorConfig`)
    from the model's preset for ``regime`` ("stream" or "facts"), and check that every
    module can be edited."""
    if regime not in REGIMES:
        raise ValueError(f"regime: expected one of {list(REGIMES)}, got {regime!r}")
    source = "user"
    preset = find_preset(model)
    if modules is None:
        if preset is not None:
            if regime == "facts" and preset.facts_layers is not None:
                cfg = PresetChoice(
                    _expand(model, preset.facts_layers),
                    preset.facts_lr or preset.lr,
                    f"{preset.name} (facts)",
                    "facts",
                )
            else:
                cfg = PresetChoice(_expand(model, preset.layers), preset.lr, preset.name, regime)
        else:
            generic = _generic(model)
            if generic is None:
                mtype = getattr(getattr(model, "config", None), "model_type", None)
                raise ValueError(
                    f"modules: no preset for this model (model_type {mtype!r}); pass modules= "
                    f"with names from {summarize_names(editable_modules(model))}"
                )
            cfg = PresetChoice(generic.modules, generic.lr, generic.preset, regime)
        modules, source = cfg.modules, cfg.preset
        if lr is None:
            lr = cfg.lr
    elif lr is None:
        generic = None if preset is not None else _generic(model)
        if preset is None and generic is None:
            raise ValueError("lr: no preset for this model; pass lr= explicitly")
        lr = preset.lr if preset is not None else generic.lr  # type: ignore[union-attr]
    for name in modules:
        if resolve_target(model, name).weight.is_meta:
            raise ValueError(
                f"modules: {name!r} has its weight on the meta device; "
                "load the model's weights before editing"
            )
    return PresetChoice(list(modules), float(lr), source, regime)


# ----------------------------------------------------------------------------- resolution
def regime_is_open(requested: EditorConfig) -> bool:
    """Whether the first turn's size chooses the preset's regime: nothing else fixes it."""
    return requested.modules is None and requested.lr is None and requested.regime is None


def choose_regime(requested: EditorConfig, first_turn_size: Optional[int] = None) -> str:
    """The preset's regime for ``requested``: the one it names; else, when nothing fixes
    it, ``"facts"`` for a first turn of at most :data:`FACTS_TURN_MAX` requests; else
    ``"stream"`` (also before the first turn's size is known)."""
    if requested.regime is not None:
        return requested.regime
    if (
        regime_is_open(requested)
        and first_turn_size is not None
        and first_turn_size <= FACTS_TURN_MAX
    ):
        return "facts"
    return "stream"


# null_space="auto": the threshold of a (preset, regime) measured with it (any other: off),
# chosen on the tuning split of benchmarks/health_smollm2.py (results/health-smollm2-cpu.json)
NULL_SPACE: Dict[Tuple[str, str], float] = {
    ("SmolLM2-135M-Instruct", "stream"): 0.01,
    ("SmolLM2-135M-Instruct (facts)", "facts"): 0.01,
}


# step="auto"'s largest scale where the preset sets the layers and lr (any other: 64), chosen
# on the same tuning split: beyond 8 the daily turns compound into damage for no more edits;
# an editor's first turn has nothing to compound with and keeps the wider search
MAX_STEP_SCALE: Dict[Tuple[str, str], float] = {
    ("SmolLM2-135M-Instruct (facts)", "facts"): 8.0,
}
FIRST_STEP_SCALE: Dict[Tuple[str, str], float] = {
    ("SmolLM2-135M-Instruct (facts)", "facts"): 64.0,
}
DEFAULT_MAX_STEP_SCALE = 64.0
# preserve_edits="auto": the weight of earlier turns' keys for a (preset, regime) measured
# with it (any other: off), chosen on the same tuning split as the configuration with the
# best health whose ES_gen over all edits meets the daily target (0.8): the daily turns kept
# 0.86 of their edits (0.60 without) at the same perplexity
PRESERVE_EDITS: Dict[Tuple[str, str], float] = {
    ("SmolLM2-135M-Instruct (facts)", "facts"): 0.1,
}
# whiten_values="auto": the (preset, regime)s that whiten, chosen on the same tuning split as
# the configuration with the most edits (ES_gen) within the stream's perplexity bar (1.10x)
WHITEN_VALUES = {("SmolLM2-135M-Instruct", "stream")}


def resolve_config(model, requested: EditorConfig, regime: str) -> Tuple[EditorConfig, str]:
    """``(config, preset)``: ``requested`` with ``modules``, ``lr``, ``step``, ``regime``
    ``null_space`` and ``max_step_scale`` filled from the model's preset for ``regime``.
    Pure: it reads the model and changes nothing. ``step`` left open is ``"auto"`` in the
    facts regime with the preset's lr, ``"paper"`` otherwise; ``null_space="auto"`` is
    :data:`NULL_SPACE`'s threshold for the regime with the preset's lr, off otherwise;
    ``max_step_scale`` left open is :data:`MAX_STEP_SCALE`'s with the preset's lr, else 64,
    and ``first_step_scale`` :data:`FIRST_STEP_SCALE`'s (both left open), else the former;
    ``whiten_values="auto"`` is on for :data:`WHITEN_VALUES` with the preset's lr, and
    ``preserve_edits="auto"`` is :data:`PRESERVE_EDITS`'s weight with it, off otherwise."""
    chosen = resolve_edit_config(model, requested.modules, requested.lr, regime)
    step = requested.step or (
        "auto" if requested.lr is None and chosen.regime == "facts" else "paper"
    )
    from_preset = requested.lr is None or requested.modules is None
    null = requested.null_space
    key = (chosen.preset, chosen.regime) if requested.lr is None else None
    if null == "auto":
        null = NULL_SPACE.get(key) if key else None
    max_scale = requested.max_step_scale or (
        MAX_STEP_SCALE.get(key, DEFAULT_MAX_STEP_SCALE) if key else DEFAULT_MAX_STEP_SCALE
    )
    first_scale = requested.first_step_scale or (
        FIRST_STEP_SCALE.get(key, max_scale)
        if key and requested.max_step_scale is None
        else max_scale
    )
    config = requested.replace(
        modules=tuple(chosen.modules),
        lr=chosen.lr,
        step=step,
        regime=chosen.regime if from_preset else requested.regime,
        null_space=null,
        max_step_scale=max_scale,
        first_step_scale=first_scale,
        whiten_values=(key in WHITEN_VALUES)
        if requested.whiten_values == "auto"
        else requested.whiten_values,
        preserve_edits=(PRESERVE_EDITS.get(key) if key else None)
        if requested.preserve_edits == "auto"
        else requested.preserve_edits,
    )
    return config, chosen.preset
