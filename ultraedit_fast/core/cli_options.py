"""The editor's options on a command line: one ``--flag`` for each option of
:class:`~ultraedit_fast.core.config.EditorConfig` that declares one (its ``cli`` argparse
keywords), and the options a parsed command line gives."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .config import EditorConfig


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
