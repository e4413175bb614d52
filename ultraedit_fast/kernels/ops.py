"""The hot steps of a turn as ``torch.library`` ops in the ``ultraedit_fast`` namespace.

Schemas are defined here, once, so the package works without its compiled
extension.  Each op has a pure-PyTorch default kernel (registered under
``CompositeExplicitAutograd``; it is the oracle of the kernel tests); the C++
extension (``ultraedit_fast._C``) adds ``CPU`` and ``CUDA`` kernels with
``TORCH_LIBRARY_IMPL``, which the dispatcher prefers for tensors on those
devices.  Triton kernels live in :mod:`ultraedit_fast.kernels.triton_kernels`.  Which one
a turn uses is decided in one place: :mod:`ultraedit_fast.kernels.backends`.

Ops (all state in float32):

``normalizer_update_(mean, acc, std, ks, gs, n)``
    Merge the row blocks ``[ks[i], gs[i]]`` (each ``m_i x d_in`` / ``m_i x d_out``,
    fp32/bf16/fp16) one after another into the normaliser state ``mean``, ``acc``,
    ``std`` (each ``d_in + d_out``, fp32) whose row count before the call is ``n``
    (``docs/algorithm.md`` section 3).  A block of one row has no unbiased variance; it is
    merged with ``var_rows = 0`` (the Welford/Chan update of a single sample).
``shift_values(k, g, mean, std, lr) -> V``
    ``V = -lr * rowsum(k_hat**2)[:, None] * g_hat`` (``N x d_out`` fp32), with
    ``[k_hat, g_hat] = ([k, g] - mean) / (std + eps)``.
``rank_update_(w, a, k, transposed)``
    ``w += a.T @ k`` (``w``: ``d_out x d_in``) or, with ``transposed``, ``w += k.T @ a``
    (GPT-2 ``Conv1D``, ``w``: ``d_in x d_out``); ``a``: ``N x d_out`` fp32, ``k``:
    ``N x d_in`` fp32.  Accumulates in fp32 and rounds once into ``w``'s dtype,
    tile by tile: no temporary of ``w``'s size.
``all_finite(w) -> Tensor``
    A 0-dim bool tensor on ``w``'s device: whether every element of ``w`` is finite
    (the check of shifted fp16/bf16 weights in a transactional turn). The CPU kernel
    reads ``w`` once and allocates nothing of its size; elsewhere the default,
    ``torch.isfinite(w).all()``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import formulas
from .formulas import EPS  # noqa: F401 - the ops share the formulas' epsilon

NAMESPACE = "ultraedit_fast"
# Rows of ``w`` handled per step by the default rank update: bounds the fp32
# temporary to TILE x d_in elements whatever the size of ``w``.
_TILE = 256

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(
    "normalizer_update_(Tensor(a!) mean, Tensor(b!) acc, Tensor(c!) std, "
    "Tensor[] ks, Tensor[] gs, int n) -> ()"
)
_lib.define("shift_values(Tensor k, Tensor g, Tensor mean, Tensor std, float lr) -> Tensor")
_lib.define("rank_update_(Tensor(a!) w, Tensor a, Tensor k, bool transposed) -> ()")
_lib.define("all_finite(Tensor w) -> Tensor")


# --------------------------------------------------------------------------- default kernels
def normalizer_update_default(
    mean: torch.Tensor,
    acc: torch.Tensor,
    std: torch.Tensor,
    ks: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    n: int,
) -> None:
    for k, g in zip(ks, gs):
        n = formulas.normalizer_merge(mean, acc, std, n, torch.cat([k.float(), g.float()], 1))


def shift_values_default(
    k: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, lr: float
) -> torch.Tensor:
    return formulas.shift_values(k, g, mean, std, lr)


def shares_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the address ranges of ``x`` and ``y`` intersect (conservative: two
    interleaved views that touch no common element count as sharing)."""
    if x.device != y.device or x.numel() == 0 or y.numel() == 0:
        return False

    def span(t):
        lo = t.data_ptr()
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return lo, lo + (last + 1) * t.element_size()

    (x0, x1), (y0, y1) = span(x), span(y)
    return x0 < y1 and y0 < x1


def check_no_alias(op: str, w: torch.Tensor, a: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("a", a), ("k", k)):
        if shares_memory(w, t):
            raise ValueError(
                f"{op}: w shares memory with {name}; the update would read what it writes"
            )


def rank_update_default(
    w: torch.Tensor, a: torch.Tensor, k: torch.Tensor, transposed: bool
) -> None:
    check_no_alias("rank_update_", w, a, k)
    a = a.float()
    k = k.float()
    if w.dtype == torch.float32 and w.is_contiguous():
        if transposed:
            w.addmm_(k.t(), a)
        else:
            w.addmm_(a.t(), k)
        return
    # Low precision: fp32 accumulation per row tile, one rounding into w.
    rows = w.shape[0]
    for s in range(0, rows, _TILE):
        e = min(s + _TILE, rows)
        if transposed:  # w[s:e] is d_in rows s..e: k[:, s:e].T @ a
            upd = torch.mm(k[:, s:e].t(), a)
        else:  # w[s:e] is d_out rows s..e: a[:, s:e].T @ k
            upd = torch.mm(a[:, s:e].t(), k)
        upd.add_(w[s:e].float())
        w[s:e].copy_(upd)


_lib.impl("normalizer_update_", normalizer_update_default, "CompositeExplicitAutograd")
_lib.impl("shift_values", shift_values_default, "CompositeExplicitAutograd")
_lib.impl("rank_update_", rank_update_default, "CompositeExplicitAutograd")


def all_finite_default(w: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(w).all()


_lib.impl("all_finite", all_finite_default, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::normalizer_update_")
def _(mean, acc, std, ks, gs, n):
    return None


@torch.library.register_fake(f"{NAMESPACE}::shift_values")
def _(k, g, mean, std, lr):
    return g.new_empty(g.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::rank_update_")
def _(w, a, k, transposed):
    return None


@torch.library.register_fake(f"{NAMESPACE}::all_finite")
def _(w):
    return w.new_empty((), dtype=torch.bool)


# --------------------------------------------------------------------------- extension
def extension_error() -> Optional[str]:
    """``None`` when the compiled kernels are loaded, else why not (loads them on first call:
    :mod:`ultraedit_fast.kernels.extension`)."""
    from . import extension

    return extension.ensure()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether a compiled kernel for ``ultraedit_fast::op`` is registered for a device key
    (loading the compiled kernels first, once)."""
    extension_error()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", dispatch_key)


OP_NAMES: List[str] = ["normalizer_update_", "shift_values", "rank_update_"]
