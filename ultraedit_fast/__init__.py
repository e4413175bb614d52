"""ultraedit_fast: fast lifelong model editing (UltraEdit, arXiv 2505.14679) for
Hugging Face causal language models.

    from ultraedit_fast import EditRequest, UltraEditor, fast_edit, evaluate

The top level holds what a user of the editor needs; everything else lives in the
sub-packages, by concern: :mod:`.editors`, :mod:`.core`, :mod:`.scoring`, :mod:`.data`,
:mod:`.model`, :mod:`.storage`, :mod:`.parallel`, :mod:`.lifelong`, :mod:`.kernels`.
"""

from ._version import __version__
from .core.config import EditorConfig
from .core.report import EditReport
from .editors import Editor, EditRefused, ReferenceEditor, UltraEditor, fast_edit
from .kernels import available_backends, resolve_backend
from .model.requests import EditRequest
from .parallel.concurrency import serving
from .scoring.metrics import capture_baseline, evaluate


def backend_info(device="cpu") -> str:
    """One line saying which backend ``auto`` takes on ``device`` and what is missing."""
    avail = available_backends(device)
    chosen = resolve_backend("auto", device).name
    missing = "; ".join(f"{k}: {v}" for k, v in avail.items() if v)
    return f"ultraedit_fast {__version__}: backend '{chosen}' on {device}" + (
        f" (unavailable: {missing})" if missing else ""
    )


__all__ = [
    "EditRequest",
    "EditorConfig",
    "Editor",
    "UltraEditor",
    "ReferenceEditor",
    "fast_edit",
    "EditReport",
    "EditRefused",
    "evaluate",
    "capture_baseline",
    "serving",
    "backend_info",
]
