"""Every option of an editor, declared once.

:class:`EditorConfig` holds the options of an :class:`~ultraedit_fast.UltraEditor` (and the
subset a :class:`~ultraedit_fast.ReferenceEditor` takes). Each field declares its default, its
check (which raises ``TypeError``/``ValueError`` naming the option), what a checkpoint does
with it on load (``fixed``: the lifelong state depends on it; ``overridable``), whether the
reference editor takes it, and its command-line flag. The editor, the checkpoint format,
lifelong runs, the benchmarks and the CLI all read these declarations; a new option is one
field here plus its use. The checks and flag parsers the fields name are in
:mod:`ultraedit_fast.core.options`; the flags built from the fields, in
:mod:`ultraedit_fast.core.cli_options`.

``modules`` and ``lr`` may be ``None``: the model's preset fills them
(:mod:`ultraedit_fast.core.presets`); an editor's ``config`` holds the resolved values.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..kernels import BACKENDS
from ..utils.checks import check_bool
from .option_types import EditorOptions  # noqa: F401  (re-exported: editors' **overrides)
from .options import (
    DEFAULT_TOKENS_PER_PASS,
    DRIFT_FROM,
    LOCALITY_CHECKS,
    REGIMES,
    STEPS,
    check_backend,
    check_count,
    check_drift_from,
    check_locality_check,
    check_fraction,
    check_lr,
    check_modules,
    check_null_space,
    check_optional_fraction,
    check_positive_count,
    check_regime,
    check_optional_scale,
    check_auto_bool,
    cli_auto_bool,
    check_step,
    check_text_path,
    check_tokens_per_pass,
    check_undo,
    check_weight,
    check_auto_weight,
    cli_auto_weight,
    cli_fraction,
    cli_int_at_least,
    cli_modules,
    cli_null_space,
    cli_positive_float,
)

FIXED = "fixed"
OVERRIDABLE = "overridable"


# ----------------------------------------------------------------------------- declarations
def _option(
    default,
    check,
    doc: str,
    *,
    load: str = OVERRIDABLE,
    reference: bool = False,
    cli: Optional[Dict[str, Any]] = None,
):
    """A field of :class:`EditorConfig`: its default, check, doc and where it is used."""
    return field(
        default=default,
        metadata={"check": check, "doc": doc, "load": load, "reference": reference, "cli": cli},
    )


@dataclass(frozen=True)
class EditorConfig:
    """The options of an editor. Construct with keywords; every value is checked."""

    modules: Optional[Tuple[str, ...]] = _option(
        None,
        check_modules,
        "names of the nn.Linear / GPT-2 Conv1D modules to edit (None: the model's preset)",
        load=FIXED,
        reference=True,
        cli={
            "type": cli_modules,
            "help": "comma-separated names of the layers to edit (default: the model's preset)",
        },
    )
    lr: Optional[float] = _option(
        None,
        check_lr,
        "the learning rate, the published step size of the solve (None: the preset's)",
        reference=True,
        cli={
            "type": cli_positive_float,
            "help": "learning rate, the published step size (default: the preset's)",
        },
    )
    batch_size: int = _option(
        10,
        check_positive_count,
        "requests per forward/backward mini-batch (10 in the paper); it sets the loss of "
        "each token (its mini-batch's mean) and the normaliser's blocks",
        reference=True,
        cli={
            "type": cli_int_at_least(1, "a positive integer"),
            "help": "requests per mini-batch (default 10)",
        },
    )
    backend: Optional[str] = _option(
        None,
        check_backend,
        f"kernels: one of {', '.join(BACKENDS)} (None: $ULTRAEDIT_FAST_BACKEND, else auto)",
        cli={"choices": BACKENDS, "help": "kernels (default: $ULTRAEDIT_FAST_BACKEND or auto)"},
    )
    share_normalizer: bool = _option(
        True,
        check_bool,
        "one lifelong normaliser per layer shape (the published behaviour) rather than one per module",
        load=FIXED,
        reference=True,
    )
    transactional: bool = _option(
        True,
        check_bool,
        "snapshot each weight before writing it, so that a failure while writing restores "
        "the pre-turn model; also checks the shifted weights are finite",
    )
    undo: Union[bool, int] = _option(
        False,
        check_undo,
        "keep an undo log for rollback(): False (none), True (every turn) or k (the last k turns)",
    )
    tokens_per_pass: int = _option(
        None,
        check_tokens_per_pass,
        f"pack consecutive mini-batches into forward/backward passes of at most this many "
        f"tokens (None: {DEFAULT_TOKENS_PER_PASS}; 0: one padded mini-batch per pass)",
        cli={
            "type": cli_int_at_least(0, "an integer >= 0"),
            "help": "fast editor: mini-batches packed into passes of at most this many "
            f"tokens (default {DEFAULT_TOKENS_PER_PASS}; 0: padded, one mini-batch "
            "per pass)",
        },
    )

    regime: Optional[str] = _option(
        None,
        check_regime,
        "which of the preset's regimes, when modules and lr come from it: 'stream' (turns "
        "of about 100 edits, the paper's setting and layers) or 'facts' (a handful of facts "
        "at a time: the layers measured for that where the preset has them, and step "
        "'auto'); None: 'facts' if the first turn has at most 32 requests, else 'stream'",
        cli={
            "choices": REGIMES,
            "help": "the preset's regime: stream (about 100 edits per "
            "turn) or facts (a handful); default: from the first turn's size",
        },
    )
    step: Optional[str] = _option(
        None,
        check_step,
        "the turn's step: 'auto' scales each solved turn by the smallest power of 2 (up to "
        "max_step_scale) at which step_target of its edits take within locality_budget "
        "(ultraedit_fast.core.step_search); 'paper' writes the published fixed step; None: 'auto' in the "
        "facts regime, 'paper' otherwise (and whenever lr is given)",
        cli={
            "choices": STEPS,
            "help": "auto: scale each turn until its edits take, within a "
            "locality budget; paper: the published fixed step (default: auto in the facts "
            "regime, paper otherwise)",
        },
    )
    step_target: float = _option(
        0.9,
        check_fraction,
        "step='auto': the share of a turn's edits that must take",
        cli={
            "type": cli_fraction,
            "help": "step auto: share of a turn's edits that must take (default 0.9)",
        },
    )
    locality_budget: float = _option(
        0.2,
        check_fraction,
        "step='auto': the largest share of the turn's locality prompts (or of the anchor "
        "prompts) whose greedy answer a larger step may change",
        cli={
            "type": cli_fraction,
            "help": "step auto: largest share of locality prompts whose answer may change (default 0.2)",
        },
    )
    max_step_scale: Optional[float] = _option(
        None,
        check_optional_scale,
        "step='auto': the largest scale of the published step tried (None: the preset's, "
        "ultraedit_fast.core.presets.MAX_STEP_SCALE, where it sets the layers and lr; else 64)",
        cli={
            "type": cli_positive_float,
            "help": "step auto: largest scale tried (default: the preset's, else 64)",
        },
    )
    first_step_scale: Optional[float] = _option(
        None,
        check_optional_scale,
        "step='auto': the largest scale tried on the editor's first turn, whose step has no "
        "earlier turns' to compound with (None: the preset's, "
        "ultraedit_fast.core.presets.FIRST_STEP_SCALE, where it sets the layers and lr; "
        "else max_step_scale)",
        cli={
            "type": cli_positive_float,
            "help": "step auto: largest scale tried on the first turn (default: the "
            "preset's, else --max-step-scale)",
        },
    )
    preserve_locality: bool = _option(
        True,
        check_bool,
        "step='auto': solve the turn with the locality set's keys as extra rows of value "
        "zero (the regularised least squares then also keeps the edited layers' outputs at "
        "those prompts), so that larger steps leave them alone; a departure from the paper, "
        "never made with step='paper'",
    )
    locality_check: str = _option(
        "decoded",
        check_locality_check,
        "step='auto': what a locality prompt must keep. 'decoded': the pre-turn model's "
        "greedy continuation (len(answer) + 3 tokens, decoded before the search, what the "
        "generated scores compare); 'answer': the tokens one full pass over the prompt and "
        "its given answer proves greedy decoding produces (the answer's tokens it predicts, "
        "to the first it does not, and that one; an anchor prompt: its next token), no "
        "decoding: about a third of the facts turn's time on a CPU, a weaker check",
        cli={
            "choices": LOCALITY_CHECKS,
            "help": "step auto: locality prompts keep their decoded continuation "
            "(decoded, default) or their verified answer tokens (answer: faster, weaker)",
        },
    )
    chat_template: bool = _option(
        False,
        check_bool,
        "wrap every prompt in the tokenizer's chat template (as a user "
        "turn, the assistant's answer to follow), for editing and for the step's checks",
        cli={
            "action": "store_true",
            "help": "wrap prompts in the tokenizer's chat template "
            "(instruct models), for editing and scoring",
        },
    )
    ridge: float = _option(
        1.0,
        check_weight,
        "stabiliser: the regulariser r of the solve, Delta = K^T (K K^T + r I)^-1 V (1: the "
        "paper's); larger keeps each turn's update smaller",
        cli={
            "type": cli_positive_float,
            "help": "stabiliser: the solve's regulariser (default 1, the paper's)",
        },
    )
    drift_budget: Optional[float] = _option(
        None,
        check_optional_fraction,
        "stabiliser, step='auto': the largest share of positions of a few windows of general "
        "text (preserve_text) whose most likely next token a larger step may change against "
        "the pre-turn model; None: not checked (only the locality prompts are)",
        cli={
            "type": cli_fraction,
            "help": "stabiliser, step auto: largest share of general "
            "text's next tokens a step may change (default: not checked)",
        },
    )
    drift_from: str = _option(
        "turn",
        check_drift_from,
        "stabiliser, step='auto': what drift_budget compares with: 'turn' (the pre-turn "
        "model: each turn's own damage) or 'unedited' (the model before the editor's first "
        "turn, captured then and kept in its state: the damage of all turns so far)",
        load=FIXED,
        cli={
            "choices": DRIFT_FROM,
            "help": "stabiliser: drift budget against the pre-turn "
            "model (turn, default) or the unedited one (all turns so far)",
        },
    )
    preserve_general: int = _option(
        0,
        check_count,
        "stabiliser: the number of keys from general text (preserve_text) that every turn's "
        "solve asks to leave alone, as rows of value zero (ultraedit_fast.core.preserve); "
        "0: none (the paper's solve)",
        cli={
            "type": cli_int_at_least(0, "an integer >= 0"),
            "help": "stabiliser: general-text keys preserved by every turn's solve (default 0)",
        },
    )
    preserve_weight: float = _option(
        1.0,
        check_weight,
        "stabiliser: the weight of a preserved key against an edit's in the solve",
        cli={
            "type": cli_positive_float,
            "help": "stabiliser: weight of the preserved keys (default 1)",
        },
    )
    preserve_text: Optional[str] = _option(
        None,
        check_text_path,
        "stabiliser: the general text (UTF-8 file) the preserved keys come from (None: the "
        "package's sample)",
        cli={"help": "stabiliser: UTF-8 file the preserved keys come from"},
    )
    preserve_edits: Union[float, str, None] = _option(
        "auto",
        check_auto_weight,
        "stabiliser: keep earlier turns' edits: every turn's solve asks the edited modules to "
        "leave the keys of all earlier turns alone, with this weight against its own edits "
        "(their Gram, d_in x d_in per module, kept in the lifelong state; AlphaEdit's term "
        "for past edits; ultraedit_fast.core.normalizer); None or 'off': the paper's solve; "
        "'auto': the preset's choice (ultraedit_fast.core.presets.PRESERVE_EDITS), off "
        "whenever lr is given",
        load=FIXED,
        cli={
            "type": cli_auto_weight,
            "help": "stabiliser: weight of earlier turns' keys in every solve, 'off', or "
            "'auto' (default: the preset's choice)",
        },
    )
    norm_anchor: bool = _option(
        False,
        check_bool,
        "stabiliser: rescale each value row so that the module's target output at its key is "
        "no longer than its output there now (norm anchoring in NAS's manner; "
        "ultraedit_fast.core.solve.norm_anchored); off: the paper's values",
        cli={"action": "store_true", "help": "stabiliser: targets never lengthen an output"},
    )
    whiten_values: Union[bool, str] = _option(
        "auto",
        check_auto_bool,
        "stabiliser: whiten the output gradients with their running covariance instead of "
        "dividing each coordinate by its standard deviation (StableEdit's lifelong "
        "normaliser; ultraedit_fast.core.whiten); False: the paper's normaliser; 'auto': "
        "the preset's choice (ultraedit_fast.core.presets.WHITEN_VALUES), off whenever lr "
        "is given",
        load=FIXED,
        cli={
            "type": cli_auto_bool,
            "help": "stabiliser: StableEdit's whitening normaliser: on, off or auto "
            "(default: the preset's choice)",
        },
    )
    null_space: Union[float, str, None] = _option(
        "auto",
        check_null_space,
        "stabiliser: solve every turn with its keys projected onto the null space of the "
        "edited modules' inputs on general text (preserve_text), measured before the first "
        "turn: the directions whose eigenvalue is at most this share of the largest "
        "(AlphaEdit's projection; ultraedit_fast.core.nullspace); None or 'off': the paper's "
        "solve; 'auto': the preset's choice (ultraedit_fast.core.presets.NULL_SPACE), off "
        "whenever lr is given",
        load=FIXED,
        cli={
            "type": cli_null_space,
            "help": "stabiliser: project updates onto the null space of general text's "
            "inputs (eigenvalues at most this share of the largest), 'off', or 'auto' "
            "(default: the preset's choice)",
        },
    )
    measure_memory: bool = _option(
        False,
        check_bool,
        "report each turn's peak memory (EditReport.peak_memory_bytes): resets the process's "
        "peak counters (torch.cuda.reset_peak_memory_stats, or the peak RSS through "
        "/proc/self/clear_refs) at the start of every turn, which changes what other readers "
        "of those counters see; off, the report's peak is None",
        reference=True,
    )

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        config: Optional["EditorConfig"],
        overrides: Mapping[str, Any],
        *,
        owner: str = "UltraEditor",
        reference: bool = False,
    ) -> "EditorConfig":
        """The configuration an editor's ``(config, **overrides)`` ask for: ``config`` (or
        the defaults) with ``overrides`` replaced, each checked; unknown options are
        refused, and so (with ``reference``) are options the reference editor does not
        take."""
        if config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(
                f"config: expected an EditorConfig or None, got "
                f"{type(config).__name__} (pass options as keywords, e.g. "
                f"modules=[...], lr=...)"
            )
        allowed = option_names(reference=reference)
        for k in overrides:
            if k not in allowed:
                raise TypeError(
                    f"{owner}() got an unexpected option {k!r}; its options are {list(allowed)}"
                )
        out = config.replace(**overrides) if overrides else config
        if reference:
            extra = sorted(set(out.options(only_set=True)) - set(allowed))
            if extra:
                raise TypeError(
                    f"config: {extra} are not options of the reference editor (it takes {list(allowed)})"
                )
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: tuples become lists."""
        d = asdict(self)
        if d["modules"] is not None:
            d["modules"] = list(d["modules"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EditorConfig":
        """The inverse of :meth:`to_dict`; unknown keys are ignored (a newer writer's)."""
        names = option_names()
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "EditorConfig":
        return replace(self, **changes)

    def options(self, *, reference: bool = False, only_set: bool = False) -> Dict[str, Any]:
        """The options as keywords for an editor (the reference's subset with ``reference``;
        with ``only_set``, only those that differ from their defaults)."""
        out = {}
        for f in fields(self):
            if reference and not f.metadata["reference"]:
                continue
            v = getattr(self, f.name)
            if only_set and v == default_of(f):
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def default_of(f) -> Any:
    if f.default is MISSING:  # pragma: no cover - every option has a default
        return None
    return f.metadata["check"](f.name, f.default)


def option_names(*, reference: bool = False, load: Optional[str] = None) -> Tuple[str, ...]:
    """Names of the options (those the reference takes; those with a given load rule)."""
    return tuple(
        f.name
        for f in fields(EditorConfig)
        if (not reference or f.metadata["reference"])
        and (load is None or f.metadata["load"] == load)
    )


def check_overrides(overrides: Mapping[str, Any], what: str = "load") -> None:
    """What ``UltraEditor.load`` (and ``configure``) may change: not the options the
    lifelong state depends on."""
    fixed, overridable = option_names(load=FIXED), option_names(load=OVERRIDABLE)
    for k in overrides:
        if k in fixed:
            raise ValueError(
                f"{k}: fixed by the checkpoint (its lifelong state depends on it) "
                f"and cannot be overridden on {what}"
            )
        if k not in overridable:
            raise TypeError(
                f"{what}() got an unexpected option {k!r}; options that may be "
                f"overridden: {list(overridable)}"
            )
