"""What a benchmark run measures: its constants and :class:`Settings`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..utils.display import GIB

SCHEMA = "ultraedit_fast.bench/1"
CASES = ("steps", "turn", "lifelong", "memory")
MEMORY_TARGET_BYTES = 20 * GIB  # a 24 GB card, with room for the CUDA context
CARD_BYTES = 24 * GIB  # a "24 GB" card
CARD_USABLE_BYTES = CARD_BYTES - 1536 * 2**20  # less the CUDA context and driver reserve
EDITS_PER_TURN = 100
STEP_TOKENS = 400  # answer-token rows N of 100 edits (a round number above zsRE's)
STEP_BLOCKS = 10  # mini-batches of a turn: one normaliser update each


@dataclass
class Settings:
    device: torch.device
    cases: List[str]
    scale: str  # "full", "quick" or "tiny"
    repeats: int
    step_repeats: int
    lifelong_turns: int
    ref_turns: int
    models: List[str]
    lifelong_model: str
    memory_models: List[str]
    step_shapes: List[Tuple[str, str, int, int]]
    seed: int
    edits: int
    slow_s: float
    impl_budget_s: float
    deadline: Optional[float]
    editor_options: Dict[str, Any] = field(default_factory=dict)  # the fast editor's (CLI flags)
    tie_below_edited: bool = False  # tie_layers_below_edited on the 7B shapes (memory case)
    zsre_path: Optional[str] = None  # zsRE records for SmolLM2's turns; None: synthetic

    @property
    def backend(self) -> Optional[str]:
        return self.editor_options.get("backend")

    @property
    def dtype(self):
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def out_of_time(self, margin: float = 0.0) -> bool:
        return self.deadline is not None and time.monotonic() + margin > self.deadline
