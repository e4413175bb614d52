"""The UltraEdit solve on the smaller side (``docs/algorithm.md`` section 4).

``Delta = (K^T K + I)^-1 K^T V = K^T (K K^T + I)^-1 V``. The weight update
``Delta^T`` is written as a low-rank product ``a^T kk`` that
:func:`ultraedit_fast.kernels.ops` ``rank_update_`` adds into the weight in place:

* ``N <= d_in`` (the usual case: a few hundred answer tokens, thousands of input
  features): the dual ``N x N`` Cholesky solve, ``a = (K K^T + I)^-1 V`` and
  ``kk = K``, a rank-N update.
* ``N > d_in`` (small models, big turns): the primal ``d_in x d_in`` Cholesky solve,
  ``a = Delta`` and ``kk = I``, a rank-``d_in`` update. Here the primal system is
  the better conditioned one: ``K K^T + I`` has ``N - d_in`` eigenvalues equal to 1
  next to ones of order ``|K|^2``, and the solve is cheaper too.

Both solves are fp32 Cholesky on torch (cuBLAS/cuSOLVER on a GPU, LAPACK on the CPU):
at a few hundred rows they are a small part of a turn, and no fused kernel here
beats them.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


class SolveError(ValueError):
    """The turn's system could not be solved (non-finite or degenerate keys)."""


def _cholesky_plus_identity(gram: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    gram.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool(info.ne(0).any()):
        raise SolveError(
            "the regularised system K K^T + I is not positive definite "
            "(non-finite keys?); the turn was refused"
        )
    return factor


class ShiftSolver:
    """Factorises once per key matrix ``k`` (``N x d_in`` fp32); :meth:`factors` then
    gives, for each value matrix ``v`` (``N x d_out`` fp32), ``(a, kk)`` with
    ``Delta^T = a^T kk``.

    ``reduce``: for keys split by columns over the ranks of a tensor-parallel model (each
    rank holds ``K_r``), the in-place sum over the ranks; ``K K^T`` is then the sum of the
    ranks' ``K_r K_r^T``, and only the dual system is used (the primal one would be split).

    ``ridge``: the regulariser ``r`` of ``K K^T + r I`` (1: the paper's).

    ``project``: ``K -> K P`` (``null_space``, :mod:`ultraedit_fast.core.nullspace`): the
    system is solved with the projected keys, so every update's rows lie in the range of
    ``P``; ``k`` stays the keys as captured (the shift values are computed from them).

    ``extra``: a ``d_in x d_in`` Gram ``G = K_p^T K_p`` of keys whose outputs should stay
    as they are (``preserve_edits``: earlier turns' keys, weighted), as if ``K_p`` had
    joined ``k`` with values zero: ``Delta = (K^T K + G + r I)^-1 K^T V`` (projected: ``G``
    as ``P G P``). With ``N <= d_in`` it keeps the update of rank ``N`` by Woodbury's
    identity: with ``A = G + r I``, ``Delta = A^-1 K^T (I + K A^-1 K^T)^-1 V``, so
    ``a = (I + K A^-1 K^T)^-1 V`` and ``kk = K A^-1`` (``A`` is factorised once); else the
    primal system."""

    def __init__(
        self,
        k: torch.Tensor,
        reduce: Optional[Callable] = None,
        ridge: float = 1.0,
        project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        extra: Optional[torch.Tensor] = None,
    ):
        if extra is not None and reduce is not None:
            raise ValueError("extra: a preserved Gram needs unsharded keys")
        self.k = k
        self.reduce = reduce
        self.ridge = ridge
        self.project = project
        self.extra = extra
        self.kp = k if project is None else project(k)
        n, d_in = k.shape
        self.dual = n <= d_in or reduce is not None
        kp = self.kp
        self.kk = kp  # the update's right factor in the dual form
        g = None
        if extra is not None:
            g = extra.to(kp.device, kp.dtype)
            g = g if project is None else project(project(g).t())
        if g is not None and self.dual:  # Woodbury: rank N, with A = G + r I inside
            a_factor = _cholesky_plus_identity(g.clone() if g is extra else g, ridge)
            self.kk = torch.cholesky_solve(kp.t(), a_factor).t()  # K A^-1 (A symmetric)
            self.factor = _cholesky_plus_identity(kp @ self.kk.t(), 1.0)
        else:
            gram = kp @ kp.t() if self.dual else kp.t() @ kp
            if g is not None:
                gram += g
            if reduce is not None:
                reduce(gram)
            self.factor = _cholesky_plus_identity(gram, ridge)
        self._eye: Optional[torch.Tensor] = None

    def factors(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.dual:
            return torch.cholesky_solve(v, self.factor), self.kk
        delta = torch.cholesky_solve(self.kp.t() @ v, self.factor)  # d_in x d_out
        if self._eye is None:
            self._eye = torch.eye(self.k.shape[1], dtype=self.k.dtype, device=self.k.device)
        return delta, self._eye


def norm_anchored(
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    transposed: bool = False,
) -> Tuple[torch.Tensor, int]:
    """``norm_anchor``: each value row rescaled so that the module's target output
    ``o + v`` at its key is no longer than the output ``o`` the module gives there now
    (NAS, arXiv 2602.02543, anchors each edit's target to the unedited model's norms; here
    the anchor is each row's own output): ``v' = s (o + v) - o`` with
    ``s = |o| / |o + v|`` where that is below 1, ``v`` elsewhere. An edit may turn an
    output, not lengthen it. Returns ``(v', rows rescaled)``; ``k`` ``N x d_in``, ``v``
    ``N x d_out`` fp32, ``weight`` ``d_out x d_in`` (``d_in x d_out`` when
    ``transposed``)."""
    w = weight.detach().to(torch.float32)
    o = k @ (w if transposed else w.t())
    if bias is not None:
        o = o + bias.detach().to(torch.float32)
    # |o + v|^2 - |o|^2 = 2 o.v + v.v, without the cancellation of the difference of norms
    grow = 2 * (o * v).sum(dim=1, keepdim=True) + (v * v).sum(dim=1, keepdim=True)
    n_t = (o + v).norm(dim=1, keepdim=True)
    n_o = o.norm(dim=1, keepdim=True)
    longer = grow > 0
    shrink = torch.where(longer, grow / ((n_t + n_o) * n_t).clamp_min(1e-30), 0.0)  # 1 - s
    return v * (1 - shrink) - shrink * o, int(longer.sum())
