"""The null-space stabiliser (``null_space``): every turn's update leaves alone the inputs
the edited modules see on general text, in the manner of AlphaEdit (Fang et al., ICLR 2025).

Built once, on the model as it is before the editor's first turn: each edited module's
inputs ``K_0`` at :data:`NULL_SPACE_KEYS` positions of a general text (``preserve_text``, or
the package's sample), their second moment ``C = K_0^T K_0 / n`` and its eigenvectors. The
directions whose eigenvalue is at most ``null_space`` times the largest span the (near)
null space of those inputs; ``P`` projects onto it. A turn then solves with its keys
projected, ``K P`` in place of ``K``:

    Delta = (K P)^T (K P (K P)^T + r I)^-1 V,

whose rows lie in the null space, so ``Delta k_0 = Delta P k_0 ~ 0`` for every preserved
input (exactly 0 where ``C`` is singular). The values ``V`` are the paper's (from the
unprojected keys); only the solve sees ``P``. AlphaEdit also keeps the keys of earlier
edits in its system; UltraEdit keeps none (memory-free), and neither does this.

``P`` is held in the cheaper of two equal forms: an orthonormal basis ``U`` of the null
space (``P = U U^T``) or one of its complement ``Q`` (``P = I - Q Q^T``), so at most
``d_in / 2`` columns of ``d_in``: for a 14336-wide input, at most 14336 x 7168 fp32 =
411 MB per module, never the 822 MB of a ``d_in x d_in`` projector; modules with the same
inputs (a layer's gate and up projections) share one basis. It depends on the model it was
built on, so it is part of the editor's saved state
(:mod:`ultraedit_fast.storage.checkpoint`): a resumed run projects with the same ``P``.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .._log import log
from ..model.targets import EditTarget
from .preserve import DRIFT_WINDOWS, GeneralKeys

NULL_SPACE_KEYS = 8192  # positions of general text whose inputs the projection preserves
_KINDS = ("null", "range")  # U: P = U U^T; Q: P = I - Q Q^T


class NullSpace:
    """Per edited module, the projection onto the null space of its general-text inputs."""

    def __init__(self, bases: Mapping[str, Tuple[str, torch.Tensor]], threshold: float):
        self.bases = dict(bases)
        self.threshold = threshold

    @classmethod
    def build(
        cls,
        model,
        tokenizer,
        targets: Sequence[EditTarget],
        threshold: float,
        path=None,
        reserve: int = 0,
    ) -> "NullSpace":
        """Measure the general text's inputs of ``targets`` on ``model`` as it is now
        (``reserve``: the text's last windows are the drift budget's, kept out)."""
        general = GeneralKeys(tokenizer, NULL_SPACE_KEYS, path, reserve, "null_space")
        keys = general.keys(model, targets)
        bases: Dict[str, Tuple[str, torch.Tensor]] = {}
        for i, t in enumerate(targets):
            same = next((u for u in targets[:i] if torch.equal(keys[u.name], keys[t.name])), None)
            if same is not None:  # the same inputs (a layer's gate and up projections):
                bases[t.name] = bases[same.name]  # one basis, held once
                continue
            k = keys[t.name].double()
            evals, evecs = torch.linalg.eigh(k.t() @ k / k.shape[0])
            null = evals <= threshold * evals[-1].clamp_min(0)
            n_null = int(null.sum())
            if 2 * n_null <= k.shape[1]:
                bases[t.name] = ("null", evecs[:, null].float().contiguous())
            else:
                bases[t.name] = ("range", evecs[:, ~null].float().contiguous())
        return cls(bases, threshold)

    @classmethod
    def of(cls, model, tokenizer, setup) -> "NullSpace":
        """:meth:`build` for an editor's resolved ``setup`` (its config and targets)."""
        cfg = setup.config
        reserve = DRIFT_WINDOWS if cfg.drift_budget is not None else 0
        null = cls.build(
            model, tokenizer, setup.targets, cfg.null_space, cfg.preserve_text, reserve
        )
        log.info("ultraedit_fast: null_space: room per module %s", null.dims())
        return null

    def dims(self) -> Dict[str, int]:
        """Each module's null-space dimension (the room the updates have)."""
        out = {}
        for name, (kind, b) in self.bases.items():
            out[name] = b.shape[1] if kind == "null" else b.shape[0] - b.shape[1]
        return out

    def nbytes(self) -> int:
        """Bytes held (a basis shared by modules with the same inputs counted once)."""
        held = {id(b): b for _, b in self.bases.values()}
        return sum(b.numel() * b.element_size() for b in held.values())

    def projector(self, name: str, device) -> "Projection":
        kind, b = self.bases[name]
        return Projection(kind, b.to(device))

    # ---------------------------------------------------------------- checkpoints
    def tensors(self) -> Dict[str, torch.Tensor]:
        """The bases by checkpoint tensor name (``nullspace.<kind>.<module>``)."""
        # a basis two modules share is written twice (a file holds no aliases)
        return {f"nullspace.{kind}.{name}": b.clone() for name, (kind, b) in self.bases.items()}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], targets: Sequence[EditTarget], threshold
    ) -> Optional["NullSpace"]:
        """The projection a checkpoint saved (``None`` when it saved none); ``ValueError``
        when it does not cover the edited modules with bases of their input width."""
        if not any(n.startswith("nullspace.") for n in tensors):
            return None
        bases: Dict[str, Tuple[str, torch.Tensor]] = {}
        for t in targets:
            found = [k for k in _KINDS if f"nullspace.{k}.{t.name}" in tensors]
            if len(found) != 1:
                raise ValueError(f"null_space: the checkpoint has no basis for module {t.name!r}")
            b = tensors[f"nullspace.{found[0]}.{t.name}"]
            d_in = t.local_shape[0]
            if b.dim() != 2 or b.shape[0] != d_in or b.dtype != torch.float32:
                raise ValueError(
                    f"null_space: the checkpoint's basis for module {t.name!r} has shape "
                    f"{tuple(b.shape)} ({b.dtype}), expected {d_in} x r fp32"
                )
            held = next(
                (x for x in bases.values() if x[0] == found[0] and torch.equal(x[1], b)), None
            )
            bases[t.name] = held if held is not None else (found[0], b)
        return cls(bases, threshold)


class Projection:
    """``k -> k P`` for one module (rows of ``k`` are inputs)."""

    def __init__(self, kind: str, basis: torch.Tensor):
        self.kind, self.basis = kind, basis

    def __call__(self, k: torch.Tensor) -> torch.Tensor:
        kb = (k @ self.basis) @ self.basis.t()
        return kb if self.kind == "null" else k - kb
