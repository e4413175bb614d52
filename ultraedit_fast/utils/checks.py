"""Argument checks shared by the public entry points: each raises ``TypeError`` or
``ValueError`` naming the argument and what was expected."""

from __future__ import annotations

import math
from typing import Any, Optional


def check_positive_int(
    name: str, v: Any, *, allow_none: bool = False, minimum: int = 1
) -> Optional[int]:
    """``v`` as an int ``>= minimum`` (``None`` passes with ``allow_none``); bools and
    strings are refused."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {what}{' or None' if allow_none else ''}, got {v!r}")
    return v


def check_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected True or False, got {v!r} ({type(v).__name__})")
    return v


def check_positive_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a positive finite float, got {type(v).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a positive finite float, got {v!r}")
    return float(v)
