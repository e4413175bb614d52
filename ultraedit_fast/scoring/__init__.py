"""How an edited model is scored: the field's teacher-forced metrics (ES, GS, LS,
LS_unedited) and the unedited model's baseline they compare with (:mod:`.metrics`), and the
generation-based ones beside them, greedy decoding, drift and fluency
(:mod:`.generation`); scoring the same requests again after more edits, from the lowest
edited block up (:class:`ResumedPasses`, :mod:`.resumed`)."""

from .metrics import Baseline, capture_baseline, evaluate, token_accuracy
from .resumed import ResumedPasses

__all__ = ["Baseline", "ResumedPasses", "capture_baseline", "evaluate", "token_accuracy"]
