"""What a turn reports.

The "step" family, named apart: ``lr`` is the learning rate, the published step size of the
solve (``V = lr * ...``); the option ``step`` is the rule that sets the size a turn writes
(``"paper"``: ``lr`` as published; ``"auto"``: ``lr`` times a scale the step search chooses);
``step_scale`` is that chosen scale; ``step_search`` is the search's record (its trials);
the phase ``"step"`` of ``seconds`` is the time the search took.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

PHASES = ("capture", "statistics", "solve", "step", "apply")


@dataclass
class EditReport:
    """The outcome of one turn.

    ``seconds`` holds the time of each phase (``capture``: forward/backward with hooks;
    ``statistics``: normaliser update; ``solve``: shift values and the N x N solve;
    ``step``: the search of ``step="auto"``, 0 with ``step="paper"``; ``apply``: the rank-N
    weight update), ``total_seconds`` the whole turn (their sum). ``step_scale``: the
    scale of the published step the turn wrote (``None`` with ``step="paper"``),
    ``step_search``: the search's record (its trials). ``stabilisers``: the stabilisers
    that acted in the turn (``preserve_general``, ...; empty for the paper's turn).
    ``peak_memory_bytes`` is CUDA peak allocated on a GPU, peak RSS of the process
    during the turn on the CPU (``peak_memory_kind`` says which), when the editor was
    built with ``measure_memory=True``; ``None`` otherwise.
    """

    n_requests: int
    n_tokens: int
    turn: int
    backend: str
    device: str
    seconds: Dict[str, float]
    total_seconds: float
    peak_memory_bytes: Optional[int]
    peak_memory_kind: str
    modules: List[str] = field(default_factory=list)
    step_scale: Optional[float] = None
    step_search: Optional[dict] = None
    comm_bytes: Optional[int] = None  # a tensor-parallel turn: bytes this rank all-reduced
    stabilisers: List[str] = field(default_factory=list)  # the stabilisers that acted

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        phases = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.seconds.items() if k != "total")
        peak = (
            ""
            if self.peak_memory_bytes is None
            else f"peak {self.peak_memory_kind} {self.peak_memory_bytes / 2**20:.0f} MiB; "
        )
        scale = "" if self.step_scale is None else f"step x{self.step_scale:g}; "
        return (
            f"turn {self.turn}: {self.n_requests} requests, {self.n_tokens} answer tokens, "
            f"{len(self.modules)} modules in {self.total_seconds:.3f} s ({phases}); "
            f"{scale}{peak}backend {self.backend} on {self.device}"
        )
