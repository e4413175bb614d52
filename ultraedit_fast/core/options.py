"""The values of the editor's options: the check of each (which raises ``TypeError``/
``ValueError`` naming the option and returns the value normalised) and the parser of its
command-line flag (which raises ``argparse.ArgumentTypeError``). The declarations in
:mod:`ultraedit_fast.core.config` name these; the checks hold no state and know nothing of
:class:`~ultraedit_fast.core.config.EditorConfig`."""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, List

from ..kernels import BACKENDS
from ..utils.checks import check_positive_float, check_positive_int

DEFAULT_TOKENS_PER_PASS = 512


# ----------------------------------------------------------------------------- checks
def check_modules(name: str, v):
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


def check_positive_count(name: str, v):
    """An int >= 1 (:func:`~ultraedit_fast.utils.checks.check_positive_int` as a field check)."""
    return check_positive_int(name, v)


def check_backend(name: str, v):
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in BACKENDS:
        raise ValueError(f"{name}: expected one of {list(BACKENDS)}, got {v!r}")
    return v.lower()


STEPS = ("auto", "paper")
REGIMES = ("stream", "facts")
DRIFT_FROM = ("turn", "unedited")
LOCALITY_CHECKS = ("decoded", "answer")


def _one_of(choices):
    def check(name: str, v):
        if not isinstance(v, str) or v.lower() not in choices:
            raise ValueError(f"{name}: expected one of {list(choices)}, got {v!r}")
        return v.lower()

    return check


check_drift_from = _one_of(DRIFT_FROM)
check_locality_check = _one_of(LOCALITY_CHECKS)


def check_regime(name: str, v):
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in REGIMES:
        raise ValueError(f"{name}: expected one of {list(REGIMES)} or None, got {v!r}")
    return v.lower()


def check_step(name: str, v):
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in STEPS:
        raise ValueError(f"{name}: expected one of {list(STEPS)} or None, got {v!r}")
    return v.lower()


def check_fraction(name: str, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
    return float(v)


def check_scale(name: str, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
        raise ValueError(f"{name}: expected a finite number >= 1, got {v!r}")
    return float(v)


def check_optional_scale(name: str, v):
    return None if v is None else check_scale(name, v)


def cli_fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def check_undo(name: str, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"{name}: expected True, False or a number of turns >= 0, got {v}")
        return v if v > 0 else False
    raise TypeError(
        f"{name}: expected True, False or an int number of turns, got {type(v).__name__}"
    )


def check_tokens_per_pass(name: str, v):
    if v is None:
        return DEFAULT_TOKENS_PER_PASS
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name}: expected an int >= 0 (0: no packing), got {v!r}")
    return v


def check_optional_fraction(name: str, v):
    return None if v is None else check_fraction(name, v)


def _auto_off_or(name: str, v, check, what: str, errors=(ValueError,)):
    """``"auto"`` (the preset's choice), ``None`` or ``"off"`` (``None``), or what
    ``check`` accepts; its ``errors`` become one ``ValueError`` naming all three."""
    if isinstance(v, str) and v.lower() in ("auto", "off"):
        return "auto" if v.lower() == "auto" else None
    if v is None:
        return None
    try:
        return check(name, v)
    except errors:
        raise ValueError(
            f"{name}: expected 'auto', 'off' (or None), or {what}, got {v!r}"
        ) from None


def _cli_auto_off_or(parse):
    """``auto``, ``off`` (kept as given: the option's check maps ``off`` to ``None``), or
    what ``parse`` accepts."""

    def cli(text: str):
        return text.lower() if text.lower() in ("auto", "off") else parse(text)

    return cli


def check_null_space(name: str, v):
    """``"auto"``, ``None`` or ``"off"``, or a share in [0, 1]."""
    return _auto_off_or(name, v, check_fraction, "a number in [0, 1]")


def check_auto_bool(name: str, v):
    """``"auto"`` (the preset's choice), or ``True``/``False`` (also ``"on"``/``"off"``)."""
    if isinstance(v, str) and v.lower() in ("auto", "on", "off"):
        return {"auto": "auto", "on": True, "off": False}[v.lower()]
    if not isinstance(v, bool):
        raise ValueError(f"{name}: expected 'auto', True or False ('on', 'off'), got {v!r}")
    return v


def cli_auto_bool(text: str) -> str:
    if text.lower() not in ("auto", "on", "off"):
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return text.lower()


def check_count(name: str, v):
    """An int >= 0 (0: off)."""
    return check_positive_int(name, v, minimum=0)


def check_weight(name: str, v):
    return check_positive_float(name, v)


def check_auto_weight(name: str, v):
    """``"auto"``, ``None`` or ``"off"``, or a positive weight."""
    return _auto_off_or(
        name, v, check_positive_float, "a positive number", errors=(TypeError, ValueError)
    )


def check_text_path(name: str, v):
    """``None`` (the package's general-text sample) or the path of a text file (read, and
    checked, when the editor is built)."""
    if v is None:
        return None
    try:
        return os.fsdecode(os.fspath(v))
    except TypeError:
        raise TypeError(f"{name}: expected a path or None, got {type(v).__name__}") from None


# ----------------------------------------------------------------------------- CLI parsers
def cli_modules(text: str) -> List[str]:
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


cli_null_space = _cli_auto_off_or(cli_fraction)  # auto, off, or a share in [0, 1]
cli_auto_weight = _cli_auto_off_or(cli_positive_float)  # auto, off, or a positive number
