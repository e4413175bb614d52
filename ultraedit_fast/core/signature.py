"""What an editor's constructor shows of its options: the signature (``help()``,
``inspect.signature``) and one docstring line per option, both from
:class:`~ultraedit_fast.core.config.EditorConfig`'s declarations."""

from __future__ import annotations

import inspect
from dataclasses import fields

from .config import EditorConfig, default_of


def options_doc(*, reference: bool = False) -> str:
    """One line per option, for docstrings and help texts."""
    lines = []
    for f in fields(EditorConfig):
        if reference and not f.metadata["reference"]:
            continue
        lines.append(f"    {f.name} (default {default_of(f)!r}): {f.metadata['doc']}")
    return "\n".join(lines)


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
        params.append(P(f.name, P.KEYWORD_ONLY, default=default_of(f), annotation=f.type))
    return inspect.Signature(params)
