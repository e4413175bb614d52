"""EasyEdit's UltraEdit hyper-parameters (``hparams/ULTRAEDIT/<model>.yaml``), read into this
package's options.

What maps (EasyEdit's field -> ours):

=================  ========================================================================
``alg_name``       must be ``ULTRAEDIT`` (any case)
``inner_params``   ``modules``: each weight name without its ``.weight`` suffix
                   (``model.layers.29.mlp.down_proj.weight`` -> ``model.layers.29.mlp.down_proj``)
``lr``             ``lr``
``batch_size_once``  ``batch_size`` (requests per forward/backward mini-batch)
``batch_size``     the edits per turn of :mod:`ultraedit_fast.integrations.easyedit`'s ``batch_edit``
                   (EasyEdit cuts a request list into chunks of it)
``token``          ``ans`` (keys and gradients at the answer tokens: the paper's protocol) is
                   the only value taken; any other (``mask``, ...) is refused: this package
                   captures at the answer tokens only
``half``           not applied: the model is edited in the dtype it was loaded in (load it
                   in float16 to match ``half: true``); a warning says so
=================  ========================================================================

Read and ignored (EasyEdit's bookkeeping, or settings without a counterpart here: a model is
never truncated, moved or parallelised by the editor): ``model_name``, ``model_class``,
``tokenizer_class``, ``tokenizer_name``, ``device``, ``alg``, ``dropout``, ``no_grad_layers``,
``editor_batch_size``, ``silent``, ``max_length``, ``model_parallel``, ``results_dir``,
``archive``. Unknown fields are refused, naming them.

Every value is checked before anything is built (:func:`checked_hparams`), a bad one refused
with a ``ValueError``/``TypeError`` naming the field and what was expected: counts
(``batch_size``, ``batch_size_once``, ``editor_batch_size``, ``max_length``) are positive
integers, not bools, floats or strings (``"10"``); switches (``half``, ``silent``,
``model_parallel``) are YAML booleans (``no`` unquoted is ``False``; the string ``"no"`` is
refused); ``lr`` is a positive finite number; names are strings.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Tuple

from .._log import log
from ..utils.checks import check_positive_float

IGNORED = (
    "model_name",
    "model_class",
    "tokenizer_class",
    "tokenizer_name",
    "device",
    "alg",
    "dropout",
    "no_grad_layers",
    "editor_batch_size",
    "silent",
    "max_length",
    "model_parallel",
    "results_dir",
    "archive",
    "half",
)
KNOWN = ("alg_name", "inner_params", "lr", "batch_size", "batch_size_once", "token") + IGNORED


def read_hparams(source) -> Dict[str, Any]:
    """The hparams as a dict, from a mapping or a YAML file (``.yaml`` added when missing,
    as EasyEdit does)."""
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"hparams: expected a path to a YAML file or a dict, got {type(source).__name__}"
        )
    path = os.fspath(source)
    if not os.path.exists(path) and not path.endswith(".yaml"):
        path += ".yaml"
    if not os.path.exists(path):
        raise FileNotFoundError(f"hparams: {path!r} does not exist")
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"hparams: {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"hparams: {path}: expected a mapping of fields, got {type(data).__name__}"
        )
    return data


def _number(name, v):
    if isinstance(v, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {v!r}") from None
    return v


def _kind(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def _positive_int(name: str, v, allow_none: bool = False):
    """An int >= 1 (YAML ``4``): not a bool, a string or a float."""
    if v is None and allow_none:
        return None
    what = "a positive integer" + (" or null" if allow_none else "")
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected {what}, got {_kind(v)}")
    if v < 1:
        raise ValueError(f"{name}: expected {what}, got {v!r}")
    return v


def _flag(name: str, v):
    """A real bool (YAML ``true``/``false``/``yes``/``no`` unquoted), not ``"no"`` or ``0``."""
    if not isinstance(v, bool):
        raise TypeError(
            f"{name}: expected a boolean (true or false, unquoted in YAML), got {_kind(v)}"
        )
    return v


def _text(name: str, v):
    if v is not None and not isinstance(v, str):
        raise TypeError(f"{name}: expected a string or null, got {_kind(v)}")
    return v


def _device(name: str, v):
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError(
            f"{name}: expected a device index (an integer >= 0), a device name or null, "
            f"got {_kind(v)}"
        )
    return v


def _dropout(name: str, v):
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1] or null, got {_kind(v)}")
    return v


def _layers(name: str, v):
    if v is None or isinstance(v, list):
        return v
    raise TypeError(f"{name}: expected a list of layers or null, got {_kind(v)}")


def _inner_params(name: str, v):
    if v is None:
        return None
    what = f"{name}: expected a non-empty list of weight names (strings)"
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{what}, got {_kind(v)}")
    if not v or not all(isinstance(p, str) and p.strip() for p in v):
        raise ValueError(f"{what}, got {v!r}")
    return [p[: -len(".weight")] if p.endswith(".weight") else p for p in v]


def _alg_name(name: str, v):
    if not isinstance(v, str) or v.upper() != "ULTRAEDIT":
        raise ValueError(f"{name}: expected 'ULTRAEDIT', got {v!r}")
    return v


def _token(name: str, v):
    if v != "ans" or not isinstance(v, str):
        raise ValueError(
            f"{name}: {v!r} is not supported; expected 'ans': ultraedit_fast takes "
            "keys and value gradients at the answer tokens only (token: ans, the paper's "
            "protocol)"
        )
    return v


def _lr(name: str, v):
    return check_positive_float(name, _number(name, v))


# every field's check (``name`` is ``"hparams: <field>"``); absent fields are not checked
CHECKS: Dict[str, Callable[[str, Any], Any]] = {
    "alg_name": _alg_name,
    "inner_params": _inner_params,
    "lr": _lr,
    "batch_size": lambda n, v: _positive_int(n, v, allow_none=True),
    "batch_size_once": _positive_int,
    "token": _token,
    "device": _device,
    "dropout": _dropout,
    "no_grad_layers": _layers,
    "editor_batch_size": lambda n, v: _positive_int(n, v, allow_none=True),
    "max_length": lambda n, v: _positive_int(n, v, allow_none=True),
    **{f: _flag for f in ("silent", "half", "model_parallel")},
    **{
        f: _text
        for f in (
            "model_name",
            "model_class",
            "tokenizer_class",
            "tokenizer_name",
            "alg",
            "results_dir",
            "archive",
        )
    },
}
assert set(CHECKS) == set(KNOWN)


def checked_hparams(source) -> Dict[str, Any]:
    """The hparams read (:func:`read_hparams`) with every value checked: a ``ValueError`` or
    ``TypeError`` names the first bad field and what was expected. Returns the checked
    values (``inner_params`` as module names)."""
    hp = read_hparams(source)
    unknown = sorted(set(hp) - set(KNOWN), key=str)
    if unknown:
        raise ValueError(
            f"hparams: unknown fields {unknown}; the fields of EasyEdit's "
            f"UltraEdit hparams are {sorted(KNOWN)}"
        )
    if "alg_name" not in hp:
        _alg_name("hparams: alg_name", None)
    return {k: CHECKS[k](f"hparams: {k}", hp[k]) for k in KNOWN if k in hp}


def to_options(source) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(editor options, easyedit settings)`` from EasyEdit UltraEdit hparams, every value
    checked first (:func:`checked_hparams`). The editor options go to
    :class:`~ultraedit_fast.UltraEditor`; the settings are ``{"edits_per_turn":
    batch_size}`` for ``batch_edit`` (``None``: all requests in one turn)."""
    hp = checked_hparams(source)
    options: Dict[str, Any] = {}
    if hp.get("inner_params") is not None:
        options["modules"] = hp["inner_params"]
    if "lr" in hp:
        options["lr"] = hp["lr"]
    if "batch_size_once" in hp:
        options["batch_size"] = hp["batch_size_once"]
    settings = {"edits_per_turn": hp.get("batch_size")}
    if hp.get("half"):
        log.warning(
            "hparams: half: true is not applied; the model is edited in the dtype it "
            "was loaded in (load it in float16 to match)"
        )
    return options, settings
