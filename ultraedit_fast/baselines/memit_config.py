"""The options of the MEMIT-family baselines (:mod:`.alphaedit`): their published values,
what is kept or scaled for a small model, and the checks at the boundary."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

PUBLISHED_DEPTH = (4, 32)  # Llama-3-8B: layers 4..8 of 32
PUBLISHED_LAYERS = 5


def default_layers(n_layers: int) -> Tuple[int, ...]:
    """The published span at the published relative depth: 5 consecutive blocks from
    ``round(4 / 32 x n_layers)`` (layers 4..8 of SmolLM2-135M's 30, as of Llama-3-8B's 32),
    fewer when the model has fewer blocks."""
    count = min(PUBLISHED_LAYERS, n_layers)
    start = min(round(PUBLISHED_DEPTH[0] / PUBLISHED_DEPTH[1] * n_layers), n_layers - count)
    return tuple(range(start, start + count))


_PUBLISHED_FIELDS = (
    "v_num_grad_steps",
    "v_lr",
    "v_weight_decay",
    "clamp_norm_factor",
    "kl_factor",
    "context_prefixes",
    "context_tokens",
    "mom2_update_weight",
    "nullspace_threshold",
    "l2",
)


@dataclass(frozen=True)
class MEMITConfig:
    """MEMIT's options. Published values (``hparams/MEMIT/Llama3-8B.json`` of AlphaEdit's
    code) and what is kept here for SmolLM2-135M (a Llama, 30 blocks):

    ========================  ====================  ==========================================
    option                    published (Llama-3)   here
    ========================  ====================  ==========================================
    ``layers``                4..8 of 32            4..8 of 30: the same relative depth and
                                                    span (:func:`default_layers`)
    ``v_num_grad_steps``      25                    25: kept
    ``v_lr``                  0.1                   0.1: kept
    ``v_weight_decay``        0.5                   0.5: kept
    ``clamp_norm_factor``     0.75                  0.75: kept
    ``kl_factor``             0.0625                0.0625: kept
    ``v_loss_layer``          31 (the last)         the last: the model's own logits
    contexts                  5 sampled, 10 tokens  kept (``context_prefixes``,
                                                    ``context_tokens``, seeded by ``seed``)
    ``mom2_update_weight``    15000                 15000: kept; ``C0`` is a per-token mean as
                                                    published, so it needs no scaling to the
                                                    sample's size (on SmolLM2-135M each layer
                                                    then writes 40-50% of its residual at the
                                                    edit keys, and the edits land)
    ``mom2_n_samples``        100,000 texts         every whole window of ``general_text``
    ========================  ====================  ==========================================

    ``batch_size``: requests optimised together (and rows of a key pass: ``batch_size``
    requests' rows; windows of general text per pass); it changes no result, only memory.
    """

    layers: Optional[Tuple[int, ...]] = None
    v_num_grad_steps: int = 25
    v_lr: float = 0.1
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    context_prefixes: Tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_tokens: int = 10
    general_text: Optional[str] = None
    cov_window: int = 128
    cov_max_windows: Optional[int] = None
    batch_size: int = 16
    seed: int = 0
    measure_memory: bool = False
    mom2_update_weight: float = 15000.0

    def __post_init__(self):
        _check_config(self)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


@dataclass(frozen=True)
class AlphaEditConfig(MEMITConfig):
    """AlphaEdit's options: MEMIT's (``hparams/AlphaEdit/Llama3-8B.json`` has the same
    values; ``mom2_update_weight`` is unused by AlphaEdit's solve) and:

    =======================  =========  ==============================================
    option                   published  here
    =======================  =========  ==============================================
    ``nullspace_threshold``  2e-2       2e-2: kept (an absolute eigenvalue of ``C0``; on
                                        SmolLM2-135M's ``down_proj`` at layers 4..8 it
                                        leaves 992-1,175 of 1,536 directions null with
                                        5,160 keys of the Lee corpus, 1,117-1,231 with the
                                        package's sample, whose ``C0`` is singular)
    ``l2``                   10         10: kept
    =======================  =========  ==============================================
    """

    nullspace_threshold: float = 2e-2
    l2: float = 10.0


def _check_config(cfg) -> None:
    """``ValueError``/``TypeError`` naming the first bad option."""
    for name in ("v_num_grad_steps", "context_tokens", "cov_window", "batch_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    v = cfg.cov_max_windows
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"cov_max_windows: expected a positive int or None, got {v!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed: expected an int, got {cfg.seed!r}")
    for name in ("v_lr", "clamp_norm_factor", "mom2_update_weight", "nullspace_threshold", "l2"):
        _check_float(cfg, name, positive=True)
    for name in ("v_weight_decay", "kl_factor"):
        _check_float(cfg, name, positive=False)
    if not isinstance(cfg.measure_memory, bool):
        raise TypeError(f"measure_memory: expected True or False, got {cfg.measure_memory!r}")
    prefixes = cfg.context_prefixes
    if isinstance(prefixes, str) or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"context_prefixes: expected non-empty strings, got {prefixes!r}")
    object.__setattr__(cfg, "context_prefixes", tuple(prefixes))
    if cfg.general_text is not None:
        if not isinstance(cfg.general_text, (str, os.PathLike)):
            raise TypeError(f"general_text: expected a path or None, got {cfg.general_text!r}")
        object.__setattr__(cfg, "general_text", os.fspath(cfg.general_text))
    if cfg.layers is not None:
        layers = cfg.layers
        if isinstance(layers, (str, bytes)) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in layers
        ):
            raise ValueError(f"layers: expected a sequence of block indices, got {layers!r}")
        layers = tuple(layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"layers: expected increasing distinct block indices, got {layers!r}")
        object.__setattr__(cfg, "layers", layers)


def _check_float(cfg, name: str, positive: bool) -> None:
    v = getattr(cfg, name, None)
    if v is None:  # a field of the other method
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        what = "positive" if positive else "non-negative"
        raise ValueError(f"{name}: expected a {what} finite float, got {v!r}")
    object.__setattr__(cfg, name, float(v))


def check_subjects(subjects) -> Dict[str, str]:
    """``subjects`` (prompt -> subject, or ``None``) checked: each subject is in its prompt."""
    if subjects is None:
        return {}
    if not isinstance(subjects, Mapping):
        raise TypeError(
            f"subjects: expected a mapping prompt -> subject, got {type(subjects).__name__}"
        )
    out = {}
    for prompt, subject in subjects.items():
        if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
            raise ValueError(
                f"subjects: expected non-empty str -> str entries, got {prompt!r}: {subject!r}"
            )
        if subject not in prompt:
            raise ValueError(f"subjects[{prompt!r}]: the subject {subject!r} is not in the prompt")
        out[prompt] = subject
    return out


def changed_from_published(cfg) -> bool:
    """Whether any published hyper-parameter of ``cfg`` differs from its default."""
    base = type(cfg)()
    return any(getattr(cfg, f, None) != getattr(base, f, None) for f in _PUBLISHED_FIELDS)
