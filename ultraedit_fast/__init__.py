"""ultraedit_fast: fast lifelong model editing (UltraEdit, arXiv 2505.14679) for
Hugging Face causal language models.

    from ultraedit_fast import fast_edit, UltraEditor, EditRequest, evaluate
"""
from ._version import __version__
from .checkpoint import CheckpointWeightsWarning
from .concurrency import serving
from .config import EditorConfig
from .editor import EditRefused, SharedModelWarning, UltraEditor, fast_edit
from .evaluate import capture_predictions, evaluate, token_accuracy
from .kernels import EXTENSION_ERROR, available_backends, resolve_backend
from .normalizer import NormalizerState
from .reference import ReferenceEditor
from .report import EditReport
from .requests import EditRequest


def backend_info(device="cpu") -> str:
    """One line saying which backend ``auto`` takes on ``device`` and what is missing."""
    avail = available_backends(device)
    chosen = resolve_backend("auto", device).name
    missing = "; ".join(f"{k}: {v}" for k, v in avail.items() if v)
    return f"ultraedit_fast {__version__}: backend '{chosen}' on {device}" + (
        f" (unavailable: {missing})" if missing else "")


__all__ = ["EditRequest", "UltraEditor", "ReferenceEditor", "fast_edit", "evaluate",
           "capture_predictions", "token_accuracy", "EditReport", "EditRefused",
           "EditorConfig", "NormalizerState", "SharedModelWarning", "CheckpointWeightsWarning",
           "available_backends", "backend_info", "serving", "EXTENSION_ERROR", "__version__"]
