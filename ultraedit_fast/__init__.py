"""ultraedit_fast: fast lifelong model editing (UltraEdit, arXiv 2505.14679) for
Hugging Face causal language models.

    from ultraedit_fast import fast_edit, UltraEditor, EditRequest, evaluate
"""
from ._version import __version__
from .checkpoint import CheckpointWeightsWarning
from .concurrency import serving
from .config import EditorConfig
from .editor import EditRefused, SharedModelWarning, UltraEditor, fast_edit
from .export import apply_patch, load_lora
from .evaluate import Baseline, capture_baseline, capture_predictions, evaluate, token_accuracy
from .kernels import available_backends, extension_error, resolve_backend
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
           "capture_predictions", "capture_baseline", "Baseline", "token_accuracy", "EditReport", "EditRefused",
           "EditorConfig", "NormalizerState", "SharedModelWarning", "CheckpointWeightsWarning",
           "available_backends", "backend_info", "serving", "apply_patch", "load_lora", "extension_error",
           "__version__"]
