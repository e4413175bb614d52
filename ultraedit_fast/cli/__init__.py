"""The ``ultraedit-fast`` command line (also ``python -m ultraedit_fast``): ``demo``,
``run`` (a lifelong run over a dataset), ``eval``, ``edit``, ``bench`` and ``info``. Its
editor flags come from :class:`~ultraedit_fast.core.config.EditorConfig`'s declarations."""

from .commands import main

__all__ = ["main"]
