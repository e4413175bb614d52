"""The arithmetic of a turn, written once: the default kernels and the reference editor
both call these (``docs/algorithm.md`` sections 3 and 4).

All state is float32; inputs of any floating dtype are cast to float32 first.
"""

from __future__ import annotations

import torch

EPS = float(torch.finfo(torch.float32).eps)


def normalizer_merge(
    mean: torch.Tensor, acc: torch.Tensor, std: torch.Tensor, n: int, x: torch.Tensor
) -> int:
    """Merge the rows ``x`` (``m x d``) into the state ``mean``/``acc``/``std`` (``d``, fp32)
    in place and return the new count (``docs/algorithm.md`` section 3).

    ``var_rows`` is the unbiased row variance; a single row has none, and it is taken
    as 0 (a lone sample adds only its distance to the running mean, as in the
    Chan/Welford merge).
    """
    x = x.float()
    m = x.shape[0]
    if m == 0:
        return n
    n_new = n + m
    block_mean = x.mean(dim=0)
    block_var = x.var(dim=0, unbiased=True) if m > 1 else torch.zeros_like(block_mean)
    delta = block_mean - mean
    mean.add_(delta * (m / n_new))
    acc.add_(m * block_var + delta.square() * (n * m / n_new))
    std.copy_(torch.sqrt(acc / (n_new - 1 + EPS)))
    return n_new


def shift_values(
    k: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, lr: float
) -> torch.Tensor:
    """``V = -lr * rowsum(k_hat^2) * g_hat`` (``N x d_out``, fp32) with ``[k_hat, g_hat]``
    the rows normalised by the lifelong statistics (``docs/algorithm.md`` section 4)."""
    d_in = k.shape[1]
    z = (torch.cat([k.float(), g.float()], dim=1) - mean) / (std + EPS)
    k_hat, g_hat = z[:, :d_in], z[:, d_in:]
    return -lr * (k_hat * k_hat).sum(dim=1, keepdim=True) * g_hat
