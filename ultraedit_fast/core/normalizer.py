"""The lifelong normaliser's state (``docs/algorithm.md`` section 3).

One state per layer shape ``(d_in, d_out)`` (or per module): the running count, mean and
accumulated squared deviations of every ``[k, g]`` row seen over all turns, and the standard
deviation derived from them. A committed state is never changed in place: a turn merges its
blocks into a copy (:meth:`NormalizerState.merged`) and the editor swaps the copy in when the
turn is applied, so a refused turn leaves the state as it was and the undo log can keep
references to older states for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .whiten import scatter_merged


@dataclass
class NormalizerState:
    """Lifelong statistics of ``[k, g]`` rows for one layer shape (or one module).

    ``mean``, ``acc``, ``std``: ``d_in + d_out`` fp32 on the module's device; ``n``: rows seen.
    ``scatter`` (``whiten_values`` only): the ``d_out x d_out`` scatter matrix of the ``g``
    part about its running mean (:mod:`ultraedit_fast.core.whiten`); ``None`` otherwise.
    """

    d_in: int
    d_out: int
    n: int
    mean: torch.Tensor
    acc: torch.Tensor
    std: torch.Tensor
    scatter: Optional[torch.Tensor] = None

    @classmethod
    def zeros(cls, d_in: int, d_out: int, device, scatter: bool = False) -> "NormalizerState":
        z = lambda: torch.zeros(d_in + d_out, dtype=torch.float32, device=device)  # noqa: E731
        s = torch.zeros(d_out, d_out, dtype=torch.float32, device=device) if scatter else None
        return cls(d_in, d_out, 0, z(), z(), z(), s)

    def clone(self) -> "NormalizerState":
        s = None if self.scatter is None else self.scatter.clone()
        return NormalizerState(
            self.d_in, self.d_out, self.n, self.mean.clone(), self.acc.clone(), self.std.clone(), s
        )

    def merged(
        self, ks: Sequence[torch.Tensor], gs: Sequence[torch.Tensor], kernel: Callable
    ) -> "NormalizerState":
        """A new state: this one with the row blocks ``[ks[i], gs[i]]`` merged one after
        another, by ``kernel`` (a backend's ``normalizer_update_``)."""
        out = self.clone()
        kernel(out.mean, out.acc, out.std, list(ks), list(gs), out.n)
        out.n += sum(k.shape[0] for k in ks)
        if self.scatter is not None:
            out.scatter = scatter_merged(self.scatter, self.n, self.mean[self.d_in :], gs)
        return out
