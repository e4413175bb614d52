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
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from .whiten import scatter_merged


@dataclass
class NormalizerState:
    """Lifelong statistics of ``[k, g]`` rows for one layer shape (or one module).

    ``mean``, ``acc``, ``std``: ``d_in + d_out`` fp32 on the module's device; ``n``: rows seen.
    ``scatter`` (``whiten_values`` only): the ``d_out x d_out`` scatter matrix of the ``g``
    part about its running mean (:mod:`ultraedit_fast.core.whiten`); ``None`` otherwise.
    ``grams`` (``preserve_edits`` only): per edited module sharing the state, the ``d_in x
    d_in`` fp32 Gram ``sum k^T k`` of the keys of every turn so far (see
    :meth:`with_grams`); ``None`` otherwise. A state is never changed in place: its tensors
    are shared by the states made from it.
    """

    d_in: int
    d_out: int
    n: int
    mean: torch.Tensor
    acc: torch.Tensor
    std: torch.Tensor
    scatter: Optional[torch.Tensor] = None
    grams: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def zeros(cls, d_in: int, d_out: int, device, scatter: bool = False) -> "NormalizerState":
        z = lambda: torch.zeros(d_in + d_out, dtype=torch.float32, device=device)  # noqa: E731
        s = torch.zeros(d_out, d_out, dtype=torch.float32, device=device) if scatter else None
        return cls(d_in, d_out, 0, z(), z(), z(), s)

    def clone(self) -> "NormalizerState":
        s = None if self.scatter is None else self.scatter.clone()
        g = None if self.grams is None else dict(self.grams)  # (never changed in place)
        return NormalizerState(
            self.d_in,
            self.d_out,
            self.n,
            self.mean.clone(),
            self.acc.clone(),
            self.std.clone(),
            s,
            g,
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

    def with_grams(self, keys: Mapping[str, Sequence[torch.Tensor]]) -> "NormalizerState":
        """``preserve_edits``: this state (a new one, made by :meth:`merged`) with each
        module's Gram grown by its turn's key blocks ``keys[name]`` (new tensors; modules
        given the same key blocks, which share their input, share one Gram)."""
        grams = dict(self.grams or {})
        done: Dict[tuple, torch.Tensor] = {}
        for name, blocks in keys.items():
            same = tuple(id(b) for b in blocks)
            if same not in done:
                old = grams.get(name)
                dev = blocks[0].device
                g = (
                    torch.zeros(self.d_in, self.d_in, device=dev)
                    if old is None
                    else old.to(dev, copy=True)  # a new tensor: the old state keeps its own
                )
                for b in blocks:  # block by block: no concatenated copy of the turn's keys
                    b = b.to(torch.float32)
                    g.addmm_(b.t(), b)
                done[same] = g
            grams[name] = done[same]
        self.grams = grams
        return self
