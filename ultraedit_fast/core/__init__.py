"""The algorithm's parts, each usable on its own: the options of an editor
(:mod:`.config`) and the per-architecture presets that fill them (:mod:`.presets`), the
capture of keys and output gradients (:mod:`.capture`), the lifelong normaliser
(:mod:`.normalizer`), the regularised closed-form solve (:mod:`.solve`), the step search of
``step="auto"`` (:mod:`.step_search`), the undo log (:mod:`.undo`), a turn's report
(:mod:`.report`) and EasyEdit's hyper-parameter names (:mod:`.hparams`)."""

from .config import EditorConfig
from .normalizer import NormalizerState
from .report import EditReport

__all__ = ["EditReport", "EditorConfig", "NormalizerState"]
