"""How an edited model is scored: the field's teacher-forced metrics (ES, GS, LS,
LS_unedited) and the unedited model's baseline they compare with (:mod:`.metrics`), and the
generation-based ones beside them, greedy decoding, drift and fluency
(:mod:`.generation`)."""

from .metrics import Baseline, capture_baseline, evaluate, token_accuracy

__all__ = ["Baseline", "capture_baseline", "evaluate", "token_accuracy"]
