"""Every option of an editor, declared once.

:class:`EditorConfig` holds the options of an :class:`~ultraedit_fast.UltraEditor` (and the
subset a :class:`~ultraedit_fast.ReferenceEditor` takes). Each field declares its default, its
check (which raises ``TypeError``/``ValueError`` naming the option), what a checkpoint does
with it on load (``fixed``: the lifelong state depends on it; ``overridable``), whether the
reference editor takes it, and its command-line flag. The editor, the checkpoint format,
lifelong runs, the benchmarks and the CLI all read these declarations; a new option is one
field here plus its use.

``modules`` and ``lr`` may be ``None``: the model's preset fills them
(:mod:`ultraedit_fast.core.presets`); an editor's ``config`` holds the resolved values.
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypedDict,
    Union,
)

from ..kernels import BACKENDS
from ..utils.checks import check_bool, check_positive_float, check_positive_int

DEFAULT_TOKENS_PER_PASS = 512

FIXED = "fixed"
OVERRIDABLE = "overridable"


# ----------------------------------------------------------------------------- checks
def _check_modules(name: str, v):
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    try:
        v = list(v)
    except TypeError:
        raise TypeError(
            f"{name}: expected a list of module names, got {type(v).__name__}"
        ) from None
    if not v:
        raise ValueError(f"{name}: expected at least one module name, got an empty list")
    for m in v:
        if not isinstance(m, str):
            raise TypeError(f"{name}: expected module names (str), got {type(m).__name__}")
    if len(set(v)) != len(v):
        raise ValueError(f"{name}: duplicate names in {v}")
    return tuple(v)


def check_lr(name: str, v):
    return None if v is None else check_positive_float(name, v)


def _check_positive_int(name: str, v):
    return check_positive_int(name, v)


def _check_backend(name: str, v):
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in BACKENDS:
        raise ValueError(f"{name}: expected one of {list(BACKENDS)}, got {v!r}")
    return v.lower()


STEPS = ("auto", "paper")
REGIMES = ("stream", "facts")


def _check_regime(name: str, v):
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in REGIMES:
        raise ValueError(f"{name}: expected one of {list(REGIMES)} or None, got {v!r}")
    return v.lower()


def _check_step(name: str, v):
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in STEPS:
        raise ValueError(f"{name}: expected one of {list(STEPS)} or None, got {v!r}")
    return v.lower()


def _check_fraction(name: str, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
    return float(v)


def _check_scale(name: str, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
        raise ValueError(f"{name}: expected a finite number >= 1, got {v!r}")
    return float(v)


def _cli_fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def _check_undo(name: str, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"{name}: expected True, False or a number of turns >= 0, got {v}")
        return v if v > 0 else False
    raise TypeError(
        f"{name}: expected True, False or an int number of turns, got {type(v).__name__}"
    )


def _check_tokens_per_pass(name: str, v):
    if v is None:
        return DEFAULT_TOKENS_PER_PASS
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name}: expected an int >= 0 (0: no packing), got {v!r}")
    return v


# ----------------------------------------------------------------------------- CLI parsers
def _cli_modules(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names")
    return names


def cli_positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def cli_int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


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
        _check_modules,
        "names of the nn.Linear / GPT-2 Conv1D modules to edit (None: the model's preset)",
        load=FIXED,
        reference=True,
        cli={
            "type": _cli_modules,
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
        _check_positive_int,
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
        _check_backend,
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
        _check_undo,
        "keep an undo log for rollback(): False (none), True (every turn) or k (the last k turns)",
    )
    tokens_per_pass: int = _option(
        None,
        _check_tokens_per_pass,
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
        _check_regime,
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
        _check_step,
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
        _check_fraction,
        "step='auto': the share of a turn's edits that must take",
        cli={
            "type": _cli_fraction,
            "help": "step auto: share of a turn's edits that must take (default 0.9)",
        },
    )
    locality_budget: float = _option(
        0.2,
        _check_fraction,
        "step='auto': the largest share of the turn's locality prompts (or of the anchor "
        "prompts) whose greedy answer a larger step may change",
        cli={
            "type": _cli_fraction,
            "help": "step auto: largest share of locality prompts whose answer may change (default 0.2)",
        },
    )
    max_step_scale: float = _option(
        64.0,
        _check_scale,
        "step='auto': the largest scale of the published step tried",
        cli={"type": cli_positive_float, "help": "step auto: largest scale tried (default 64)"},
    )
    preserve_locality: bool = _option(
        True,
        check_bool,
        "step='auto': solve the turn with the locality set's keys as extra rows of value "
        "zero (the regularised least squares then also keeps the edited layers' outputs at "
        "those prompts), so that larger steps leave them alone; a departure from the paper, "
        "never made with step='paper'",
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
            if only_set and v == _default_of(f):
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _default_of(f) -> Any:
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


def options_doc(*, reference: bool = False) -> str:
    """One line per option, for docstrings and help texts."""
    lines = []
    for f in fields(EditorConfig):
        if reference and not f.metadata["reference"]:
            continue
        lines.append(f"    {f.name} (default {_default_of(f)!r}): {f.metadata['doc']}")
    return "\n".join(lines)


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


# ----------------------------------------------------------------------------- the CLI
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_cli_options(
    parser: argparse.ArgumentParser,
    names: Optional[Iterable[str]] = None,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> List[str]:
    """Add a ``--flag`` for each option that declares one (``names``: a subset;
    ``overrides``: per-option argparse keywords, a command's own help, say). Every flag
    defaults to ``None`` (the editor's default). Returns the options added."""
    added = []
    wanted = None if names is None else set(names)
    for f in fields(EditorConfig):
        cli = f.metadata["cli"]
        if cli is None or (wanted is not None and f.name not in wanted):
            continue
        kw = {"default": None, **cli, **dict((overrides or {}).get(f.name, {}))}
        parser.add_argument(_flag(f.name), dest=f.name, **kw)
        added.append(f.name)
    return added


def cli_option_names() -> Tuple[str, ...]:
    """The options that declare a command-line flag."""
    return tuple(f.name for f in fields(EditorConfig) if f.metadata["cli"] is not None)


def options_from_cli(
    args: argparse.Namespace, names: Optional[Iterable[str]] = None
) -> Dict[str, Any]:
    """The options given on the command line (those left at ``None`` are omitted, so the
    editor's defaults apply)."""
    out = {}
    for f in fields(EditorConfig):
        if f.metadata["cli"] is None or (names is not None and f.name not in set(names)):
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            out[f.name] = v
    return out


# ----------------------------------------------------------------------------- signatures
class EditorOptions(TypedDict, total=False):
    """The options as keyword arguments (``**overrides`` of an editor), for type checkers;
    ``tests/core/test_config.py`` checks that it lists exactly :class:`EditorConfig`'s
    fields."""

    modules: Optional[Sequence[str]]
    lr: Optional[float]
    batch_size: int
    backend: Optional[str]
    share_normalizer: bool
    transactional: bool
    undo: Union[bool, int]
    tokens_per_pass: Optional[int]
    regime: Optional[str]
    step: Optional[str]
    step_target: float
    locality_budget: float
    max_step_scale: float
    preserve_locality: bool
    chat_template: bool
    measure_memory: bool


def editor_signature(*, reference: bool = False) -> inspect.Signature:
    """``(self, model, tokenizer, config=None, *, <every option with its default>)``: what
    ``help()`` and ``inspect.signature`` show for an editor's constructor."""
    P = inspect.Parameter
    params = [
        P("self", P.POSITIONAL_OR_KEYWORD),
        P("model", P.POSITIONAL_OR_KEYWORD),
        P("tokenizer", P.POSITIONAL_OR_KEYWORD),
        P("config", P.POSITIONAL_OR_KEYWORD, default=None, annotation="Optional[EditorConfig]"),
    ]
    for f in fields(EditorConfig):
        if reference and not f.metadata["reference"]:
            continue
        params.append(P(f.name, P.KEYWORD_ONLY, default=_default_of(f), annotation=f.type))
    return inspect.Signature(params)
