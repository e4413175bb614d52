"""The modules an editor writes into: which modules can be edited, and each one's kind and
shape, computed in one place.

An edited module computes ``y = x W^T`` with ``W`` of shape ``(d_out, d_in)`` (``nn.Linear``)
or ``y = x W`` with ``W`` of shape ``(d_in, d_out)`` (GPT-2's ``Conv1D``: *transposed*).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..parallel.distributed import TensorParallel, local, tensor_parallel


def is_editable(m) -> bool:
    """``nn.Linear`` or GPT-2 ``Conv1D`` (matched by name: transformers' class moved)."""
    if isinstance(m, torch.nn.Linear):
        return True
    return (
        type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None
    )


def editable_modules(model) -> List[str]:
    """Names of all ``nn.Linear`` and GPT-2 ``Conv1D`` modules of ``model``."""
    return [n for n, m in model.named_modules() if is_editable(m)]


def summarize_names(names: Sequence[str], limit: int = 40) -> str:
    """Collapse layer indices: ``model.layers.{0..29}.mlp.up_proj``."""
    groups: Dict[str, List[int]] = {}
    plain: List[str] = []
    for n in names:
        m = re.match(r"^(.*?)\.(\d+)\.(.*)$", n)
        if m:
            groups.setdefault(f"{m.group(1)}.{{}}.{m.group(3)}", []).append(int(m.group(2)))
        else:
            plain.append(n)
    items = plain + [
        p.format(f"{min(ix)}..{max(ix)}" if len(ix) > 1 else ix[0]) for p, ix in groups.items()
    ]
    if len(items) > limit:
        items = items[:limit] + [f"... ({len(items) - limit} more)"]
    return ", ".join(items)


@dataclass
class EditTarget:
    """One edited module: its name, the module, whether its weight is stored
    ``d_in x d_out`` (``transposed``, GPT-2 ``Conv1D``), and how it is sharded in a
    tensor-parallel model (``tp``; ``None`` for a plain weight)."""

    name: str
    module: torch.nn.Module
    transposed: bool
    tp: Optional[TensorParallel] = None

    @property
    def weight(self) -> torch.Tensor:
        """The weight this process holds and writes: the local shard of a sharded one."""
        return local(self.module.weight)

    @property
    def shape(self) -> Tuple[int, int]:
        """``(d_in, d_out)`` of the whole weight, whatever its layout or sharding."""
        w = self.module.weight
        return (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])

    @property
    def local_shape(self) -> Tuple[int, int]:
        """``(d_in, d_out)`` of the part this process holds (its normaliser's widths)."""
        w = self.weight
        return (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])

    @property
    def kind(self) -> str:
        return "Conv1D" if self.transposed else "Linear"


def resolve_target(model, name: str) -> EditTarget:
    """The :class:`EditTarget` of module ``name``; ``ValueError``/``TypeError`` naming the
    module when it is not one or cannot be edited."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"modules: {name!r} is not a module of this model; editable modules "
            f"are {summarize_names(editable_modules(model))}"
        ) from None
    if isinstance(m, torch.nn.Linear):
        return EditTarget(name, m, False, tensor_parallel(name, m.weight, False))
    if is_editable(m):
        return EditTarget(name, m, True, tensor_parallel(name, m.weight, True))
    raise TypeError(f"modules: {name!r} is a {type(m).__name__}; expected nn.Linear or Conv1D")


def resolve_targets(model, names: Sequence[str]) -> List[EditTarget]:
    """The :class:`EditTarget` of every name; ``ValueError`` when two names reach the same
    module (``model.lm_head`` and an alias, say): it would be edited twice."""
    targets = [resolve_target(model, n) for n in names]
    seen: Dict[int, str] = {}
    for t in targets:
        first = seen.setdefault(id(t.module), t.name)
        if first != t.name:
            raise ValueError(
                f"modules: {first!r} and {t.name!r} are the same module (one "
                "module reachable under two names); name it once, or its shift "
                "would be applied twice"
            )
    return targets
