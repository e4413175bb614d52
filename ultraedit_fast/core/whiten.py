"""``whiten_values``: the lifelong normaliser of StableEdit (ICML 2026) for the value side.

UltraEdit normalises each coordinate of a row ``[k, g]`` by its running standard deviation
(``docs/algorithm.md`` section 3). StableEdit, its follow-up, whitens the output gradient
``g`` instead: ``g_hat = (g - mean_g) C^-1/2`` with ``C`` the running covariance of all the
``g`` rows seen (its estimate ``S / (n - d_out - 1)`` from the scatter matrix ``S``), so
that correlated directions of the gradient no longer add up in the values; keys keep the
per-coordinate normalisation. Until more than ``d_out + 1`` rows were seen the covariance
is singular and the per-coordinate normalisation is used, as StableEdit does.

Here the whitened values come from the paper's: with ``V`` the values of
:func:`ultraedit_fast.kernels.formulas.shift_values` (``g`` divided by ``std_g + eps``),
``V_w = V diag(std_g + eps) C^-1/2``: one ``d_out x d_out`` product after the fused kernel.

The scatter matrix is merged with Chan's formula once per turn (all the turn's rows as
one block, which gives the same matrix as merging them block by block): ``d_out^2`` fp32
more state per normaliser (1.3 MiB at ``d_out`` 576, 64 MiB at 4096) and one symmetric
eigendecomposition of ``d_out x d_out`` per normaliser and turn.

StableEdit clamps the covariance's eigenvalues at ``1e-6``, an absolute floor that depends
on the scale of the gradients; here the floor is ``EIG_FLOOR`` times the largest
eigenvalue, which does not.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels.formulas import EPS

EIG_FLOOR = 1e-6


def scatter_merged(
    scatter: torch.Tensor, n: int, mean_g: torch.Tensor, gs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """A new scatter matrix: ``scatter`` (of ``n`` rows about ``mean_g``) with the rows of
    the blocks ``gs`` (each ``m_i x d_out``) merged (Chan et al.'s pairwise update)."""
    g = torch.cat([x.to(scatter.device, torch.float32) for x in gs])
    m = g.shape[0]
    if m == 0:
        return scatter.clone()
    block_mean = g.mean(dim=0)
    centred = g - block_mean
    delta = block_mean - mean_g
    out = scatter + centred.t() @ centred
    out.add_(torch.outer(delta, delta), alpha=n * m / (n + m))
    return out


def value_transform(state) -> Optional[torch.Tensor]:
    """``diag(std_g + eps) C^-1/2`` (``d_out x d_out``) for a
    :class:`~ultraedit_fast.core.normalizer.NormalizerState` with a scatter matrix: the
    paper's values times it are the whitened values. ``None`` while the covariance is
    singular (at most ``d_out + 1`` rows seen) or the state keeps no scatter matrix."""
    s, d_out = state.scatter, state.d_out
    if s is None or state.n <= d_out + 1:
        return None
    cov = s.double() / (state.n - d_out - 1)
    cov = (cov + cov.t()) / 2
    evals, evecs = torch.linalg.eigh(cov)
    floor = max(float(evals[-1]) * EIG_FLOOR, torch.finfo(torch.float64).tiny)
    inv_sqrt = (evecs * evals.clamp_min(floor).rsqrt()) @ evecs.t()
    std_g = state.std[state.d_in :].double() + EPS
    return (std_g[:, None] * inv_sqrt).to(torch.float32)
