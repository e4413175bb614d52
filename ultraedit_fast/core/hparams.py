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
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple

from .._log import log

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
            raise ValueError(f"hparams: {name}: expected a number, got {v!r}") from None
    return v


def to_options(source) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(editor options, easyedit settings)`` from EasyEdit UltraEdit hparams. The editor
    options go to :class:`~ultraedit_fast.UltraEditor`; the settings are
    ``{"edits_per_turn": batch_size}`` for ``batch_edit``."""
    hp = read_hparams(source)
    unknown = sorted(set(hp) - set(KNOWN))
    if unknown:
        raise ValueError(
            f"hparams: unknown fields {unknown}; the fields of EasyEdit's "
            f"UltraEdit hparams are {sorted(KNOWN)}"
        )
    alg = hp.get("alg_name")
    if not isinstance(alg, str) or alg.upper() != "ULTRAEDIT":
        raise ValueError(f"hparams: alg_name: expected 'ULTRAEDIT', got {alg!r}")
    token = hp.get("token", "ans")
    if token != "ans":
        raise ValueError(
            f"hparams: token: {token!r} is not supported; ultraedit_fast takes "
            "keys and value gradients at the answer tokens only (token: ans, "
            "the paper's protocol)"
        )
    options: Dict[str, Any] = {}
    params = hp.get("inner_params")
    if params is not None:
        if isinstance(params, str) or not all(isinstance(p, str) for p in params):
            raise ValueError(
                f"hparams: inner_params: expected a list of weight names, got {params!r}"
            )
        options["modules"] = [p[: -len(".weight")] if p.endswith(".weight") else p for p in params]
    if "lr" in hp:
        options["lr"] = _number("lr", hp["lr"])
    if "batch_size_once" in hp:
        options["batch_size"] = hp["batch_size_once"]
    settings = {"edits_per_turn": hp.get("batch_size")}
    if hp.get("half"):
        log.warning(
            "hparams: half: true is not applied; the model is edited in the dtype it "
            "was loaded in (load it in float16 to match)"
        )
    return options, settings
