"""How results are shown: number formats for lines and tables, and what the plots share
(matplotlib set up off-screen, the phase colours, saving)."""

from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from .._log import log

GIB = 2**30
MIB = 2**20

PHASE_COLOURS = {
    "capture": "#4C72B0",
    "statistics": "#DD8452",
    "solve": "#55A868",
    "step": "#937860",
    "apply": "#C44E52",
    "total": "#8172B3",
}


def pct(x: Optional[float], width: int = 0) -> str:
    """A fraction as a percentage with one decimal (``-`` for ``None``)."""
    return "-".rjust(width) if x is None else f"{100 * x:{width}.1f}"


def fmt_seconds(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def fmt_bytes(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= GIB:
        return f"{x / GIB:.2f} GiB"
    return f"{x / MIB:.0f} MiB"


def pyplot(what: str = "the plot"):
    """``matplotlib.pyplot`` on the off-screen Agg backend, or ``None`` with a one-line
    warning when matplotlib is not installed (the results are kept without the picture)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: %s is skipped (pip install matplotlib)", what)
        return None
    return plt


def wrap(text: str, width: int = 130, first: str = "") -> str:
    """``first`` then ``text``, wrapped at spaces into lines of about ``width`` characters."""
    lines, line = [], first
    for w in text.split(" "):
        if line and len(line) + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return "\n".join(lines + [line])


def save_figure(plt, fig, path: str, dpi: int = 110) -> str:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- progress bars
_PROGRESS = contextvars.ContextVar("ultraedit_fast_progress", default=False)


@contextmanager
def progress_bars(on: bool = True) -> Iterator[None]:
    """Inside this block, long loops of the package (scoring, decoding) show tqdm bars on
    stderr; outside it they are silent (the library default)."""
    token = _PROGRESS.set(bool(on))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str):
    """A progress bar of ``total`` items when bars are on (:func:`progress_bars`), else a
    do-nothing stand-in; close it when done."""
    if not _PROGRESS.get() or total <= 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="seq", file=sys.stderr, leave=False, dynamic_ncols=True
    )
