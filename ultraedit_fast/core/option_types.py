"""The editor's options as keyword arguments, for type checkers (``**overrides``)."""

from __future__ import annotations

from typing import Optional, Sequence, TypedDict, Union


class EditorOptions(TypedDict, total=False):
    """The options as keyword arguments (``**overrides`` of an editor), for type checkers;
    ``tests/core/test_config.py`` checks that it lists exactly :class:`EditorConfig`'s
    fields."""

    modules: Optional[Sequence[str]]
    lr: Optional[float]
    batch_size: int
    backend: Optional[str]
    share_normalizer: bool
    transactional: bool
    undo: Union[bool, int]
    tokens_per_pass: Optional[int]
    regime: Optional[str]
    step: Optional[str]
    step_target: float
    locality_budget: float
    max_step_scale: Optional[float]
    first_step_scale: Optional[float]
    preserve_locality: bool
    locality_check: str
    chat_template: bool
    ridge: float
    drift_budget: Optional[float]
    drift_from: str
    preserve_general: int
    preserve_weight: float
    preserve_text: Optional[str]
    preserve_edits: Union[float, str, None]
    norm_anchor: bool
    whiten_values: Union[bool, str]
    null_space: Union[float, str, None]
    measure_memory: bool
