"""Editing a tensor-parallel model (``from_pretrained(..., tp_plan="auto")`` under
``torchrun``), where each edited weight is a ``DTensor`` sharded over the ranks.

The dual form needs almost no communication (``docs/algorithm.md`` section 8):

- a **column-parallel** module (``gate_proj``/``up_proj``: weight ``Shard(0)``, its output
  split): every rank sees the whole key ``k`` and its slice of the gradient ``g``; the
  normaliser's key part is replicated and its gradient part sharded; the solve's factor is
  the same on every rank, and each rank updates its rows. No communication.
- a **row-parallel** module (``down_proj``: weight ``Shard(1)``, its input split): each rank
  holds a slice of every key; ``K K^T`` is the sum of the ranks' ``K_r K_r^T`` (one all-reduce
  of ``N x N``) and ``|k_hat|^2`` the sum of per-rank sums (one all-reduce of ``N``); the
  normaliser's key part is sharded with the weight, and each rank adds ``A^T K_r`` to its
  shard.

Besides, every decision that could differ between ranks (refusing a turn on a non-finite
value) is taken together (an all-reduce of one flag), so a turn is applied on every rank or
on none. Bytes communicated are counted (:data:`COUNTER`). Only these two layouts, on a
one-dimensional device mesh, on ``nn.Linear`` weights, are supported; any other is refused
at construction, naming the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

EPS = float(torch.finfo(torch.float32).eps)


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without the public DTensor module
        from torch.distributed._tensor import DTensor, Replicate, Shard
    return DTensor, Replicate, Shard


def is_dtensor(t) -> bool:
    try:
        DTensor, _, _ = _dtensor_types()
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


@dataclass(frozen=True)
class TensorParallel:
    """How one edited weight is sharded: ``kind`` is ``"col"`` (output split) or ``"row"``
    (input split), over ``world`` ranks of ``group``."""

    kind: str
    world: int
    rank: int
    group: object

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (counted in :data:`COUNTER`)."""
        import torch.distributed as dist

        COUNTER.add(t)
        dist.all_reduce(t, group=self.group)
        return t


class _Counter:
    """Bytes this process sent into all-reduces for editing (each rank counts its own)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def add(self, t: torch.Tensor) -> None:
        self.bytes += t.numel() * t.element_size()
        self.calls += 1

    def reset(self) -> None:
        self.bytes = self.calls = 0


COUNTER = _Counter()


def tensor_parallel(name: str, weight, transposed: bool) -> Optional[TensorParallel]:
    """The sharding of module ``name``'s weight, ``None`` for a plain tensor; ``ValueError``
    naming the module for a layout the editor does not support."""
    if not is_dtensor(weight):
        return None
    DTensor, Replicate, Shard = _dtensor_types()
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            f"modules: {name!r} is sharded over a {mesh.ndim}-d device mesh "
            f"({placements}); the editor supports one tensor-parallel dimension"
        )
    if transposed:
        raise ValueError(
            f"modules: {name!r} is a GPT-2 Conv1D sharded as a DTensor; the "
            "editor supports tensor-parallel nn.Linear weights only"
        )
    p = placements[0]
    group = mesh.get_group()
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if isinstance(p, Replicate):
        return TensorParallel("replicated", world, rank, group)
    if isinstance(p, Shard) and p.dim in (0, 1):
        shape = tuple(weight.shape)
        if shape[p.dim] % world:
            raise ValueError(
                f"modules: {name!r} has {shape[p.dim]} {'rows' if p.dim == 0 else 'columns'}"
                f", not a multiple of the {world} ranks it is sharded over"
            )
        return TensorParallel("col" if p.dim == 0 else "row", world, rank, group)
    raise ValueError(
        f"modules: {name!r} has the placement {p} (expected Shard(0): column "
        "parallel, Shard(1): row parallel, or Replicate)"
    )


def local(t):
    """The local shard of a DTensor, a plain tensor as is (in-place updates of the shard
    update the DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def row_shift_values(
    k: torch.Tensor,
    g: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    lr: float,
    tp: TensorParallel,
) -> torch.Tensor:
    """``V = -lr * |k_hat|^2 * g_hat`` for a row-parallel module: ``k`` is this rank's slice
    of the keys (and the state's first part is its slice of the key statistics), so
    ``|k_hat|^2`` is summed over the ranks."""
    d = k.shape[1]
    zk = (k.float() - mean[:d]) / (std[:d] + EPS)
    s = (zk * zk).sum(dim=1)
    tp.all_reduce_(s)
    zg = (g.float() - mean[d:]) / (std[d:] + EPS)
    return -lr * s[:, None] * zg


def all_true(flag: bool, tp: Optional[TensorParallel], device="cpu") -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce of one number)."""
    if tp is None or tp.world == 1:
        return bool(flag)
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    tp.all_reduce_(t)
    return bool(t.item() == 0.0)


def launched_ranks() -> "tuple[int, int]":
    """``(rank, world size)`` as ``torchrun`` announces them in the environment (``(0, 1)``
    outside it); read before ``torch.distributed`` is initialised."""
    import os

    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(
            "RANK / WORLD_SIZE: expected integers in the environment (as "
            "torchrun sets them), got "
            f"{os.environ.get('RANK')!r} / {os.environ.get('WORLD_SIZE')!r}"
        ) from None


def tensor_parallel_of(targets):
    """The tensor-parallel group the edited modules are sharded over (``None``: not
    sharded); ``ValueError`` when they are not all over one group of ranks."""
    groups = {(t.tp.world, id(t.tp.group)) for t in targets if t.tp is not None}
    if len(groups) > 1:
        raise ValueError(
            "modules: the edited modules are sharded over different groups of "
            "ranks; the editor supports one tensor-parallel group"
        )
    if any(t.tp is None for t in targets) and groups:
        plain = [t.name for t in targets if t.tp is None]
        raise ValueError(
            f"modules: {plain} are plain tensors while the others are sharded "
            "DTensors; edit the modules of one layout"
        )
    tp = next((t.tp for t in targets if t.tp is not None), None)
    return tp if tp is not None and tp.world > 1 else None
