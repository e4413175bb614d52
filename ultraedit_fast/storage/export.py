"""Edits that travel: the edited modules as a weight patch, or the accumulated shift as a PEFT
LoRA adapter that serving stacks load.

**Patch** (:func:`write_patch`, :func:`apply_patch`): ``patch.safetensors`` holds the edited
modules' weights as they are after the edits, ``patch.json`` the base model's fingerprint
(architecture, every parameter's name and shape, each edited module's kind, shape and dtype,
and the sha256 of each edited module's original weight), the editor's configuration, its turn
count and the package version. Applied to a fresh copy of the base model, the edited
weights are copied in: bit for bit the edited model. A model that is not that base (another
architecture or shape, or edited weights that differ from the originals) is refused, naming
the difference.

**LoRA** (:func:`write_lora`): ``adapter_config.json`` and ``adapter_model.safetensors`` in the
format ``peft.PeftModel.from_pretrained`` and vLLM's runtime LoRA loading read. Each edited
module ``W`` gets ``lora_B @ lora_A = Delta W`` (``lora_alpha = r``, so the scaling is 1):

- exact (``rank=None``): from the turns' factors (``Delta W^T = sum_t a_t^T kk_t``, kept by
  the undo log), or recovered from ``W_now - W_original`` with its numerical rank;
- truncated (``rank=r``): the best rank-``r`` approximation (SVD), with each module's relative
  error ``||Delta W - B A||_F / ||Delta W||_F`` reported.

A LoRA adapter is applied beside the base weights, in the adapter's precision: the served
logits equal the edited model's within float rounding, not bit for bit (a patch is exact).
A module whose weight is shared with another (tied input and output embeddings) cannot be a
LoRA target (the adapter would change one use and not the other): refused.

**Reading back** (:func:`read_patch`, :func:`read_adapter`) validates both as a checkpoint is
(:mod:`.validation`) before anything is built or written: regular files only, the manifest
(``patch.json``, or :data:`BASE_FILE` beside an adapter) against its schema, and every tensor
against the sha256 of its bytes, dtype and shape that the manifest records (an adapter's
tensors must be finite too). A patch is then written whole or not at all.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .._version import __version__
from ..model.targets import EditTarget, resolve_target
from ..parallel.concurrency import model_locks
from ..utils.files import atomic_write_json
from .fingerprint import fingerprint, fingerprint_diff, weight_sha256
from .validation import (
    MAX_MANIFEST_BYTES,
    bad,
    check_names,
    check_tensors,
    count,
    fingerprint_field,
    is_object,
    parse_json,
    read_artefact,
    read_manifest,
    read_tensors,
    sha256_map,
)

PATCH_FORMAT = "ultraedit_fast.patch"
PATCH_VERSION = 1
PATCH_TENSORS = "patch.safetensors"
PATCH_MANIFEST = "patch.json"
BASE_FILE = "ultraedit_fast_base.json"  # beside a LoRA adapter: the base it was made for
BASE_FORMAT = "ultraedit_fast.lora-base"
BASE_VERSION = 1
ADAPTER_TENSORS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# the manifests' fields and their types (:func:`.validation.check_fields`)
_PATCH_FIELDS = {
    "base": is_object,
    "base.fingerprint": fingerprint_field,
    "base.weights_sha256": sha256_map,
    "edited_weights_sha256": sha256_map,
    "config": is_object,
    "turns": count,
}
_BASE_FIELDS = {
    "fingerprint": fingerprint_field,
    "weights_sha256": sha256_map,
    "adapter_weights_sha256": sha256_map,
}


def _directory(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    d = os.fspath(path)
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"path: {d!r} exists and is not a directory")
    os.makedirs(d, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- the patch
def write_patch(
    path,
    model,
    targets: Sequence[EditTarget],
    base_sha256: Mapping[str, str],
    *,
    config: Mapping,
    turns: int,
) -> str:
    """Write the patch of ``targets`` (their current weights) to the directory ``path``;
    ``base_sha256``: each target's original weight's :func:`weight_sha256`. Returns the
    manifest's path."""
    from safetensors.torch import save_file

    missing = [t.name for t in targets if t.name not in base_sha256]
    if missing:
        raise ValueError(
            f"export_patch: the original weights of {missing} are unknown (an "
            "editor loaded from a checkpoint of an older version); a patch must "
            "name the base it applies to"
        )
    d = _directory(path)
    with model_locks(model).weights.reading():
        tensors = {t.name: t.weight.detach().to("cpu").contiguous().clone() for t in targets}
    save_file(tensors, os.path.join(d, PATCH_TENSORS), metadata={"format": PATCH_FORMAT})
    body = {
        "format": PATCH_FORMAT,
        "format_version": PATCH_VERSION,
        "created_unix": time.time(),
        "ultraedit_fast": __version__,
        "torch": torch.__version__,
        "base": {
            "fingerprint": fingerprint(model, targets),
            "weights_sha256": {t.name: base_sha256[t.name] for t in targets},
        },
        "edited_weights_sha256": {n: weight_sha256(w) for n, w in tensors.items()},
        "config": dict(config),
        "turns": int(turns),
    }
    mpath = os.path.join(d, PATCH_MANIFEST)
    atomic_write_json(mpath, body)
    return mpath


def read_patch(path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """The patch at ``path`` (``FileNotFoundError`` when there is none), every part of it
    checked before it is used (``ValueError`` naming the file and the field or module): the
    manifest's schema; each module of the base's fingerprint recorded in both hash maps; its
    tensor present, with the module's shape and dtype and the recorded sha256; no other
    tensor; regular files only."""
    d = os.fspath(path)
    mpath = os.path.join(d, PATCH_MANIFEST)
    if not os.path.lexists(mpath):
        raise FileNotFoundError(f"path: no patch at {d!r} ({PATCH_MANIFEST} missing)")
    body = read_manifest(mpath, "patch", PATCH_FORMAT, PATCH_VERSION, _PATCH_FIELDS)
    modules = body["base"]["fingerprint"]["modules"]
    check_names(mpath, "base.weights_sha256", body["base"]["weights_sha256"], modules)
    check_names(mpath, "edited_weights_sha256", body["edited_weights_sha256"], modules)
    tpath = os.path.join(d, PATCH_TENSORS)
    tensors = read_tensors(tpath, "patch")
    check_tensors(tpath, tensors, body["edited_weights_sha256"])
    for name, m in modules.items():
        t = tensors[name]
        shape, dtype = list(t.shape), str(t.dtype).replace("torch.", "")
        if shape != m.get("shape") or dtype != m.get("dtype"):
            raise bad(
                tpath,
                f"tensor {name!r} has shape {shape} and dtype {dtype}; the module's weight "
                f"has {m.get('shape')} and {m.get('dtype')} (an altered patch)",
            )
    return body, tensors


def apply_patch(model, path) -> List[str]:
    """Write the patch at ``path`` into ``model``, which must be the patch's base model
    (unedited): ``ValueError`` naming the difference otherwise, and the model unchanged.
    Returns the names of the patched modules."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    body, tensors = read_patch(path)
    base = body["base"]
    names = list(base["weights_sha256"])
    targets = []
    for n in names:
        try:
            targets.append(resolve_target(model, n))
        except (ValueError, TypeError):
            pass  # the fingerprint names it
    diffs = fingerprint_diff(base["fingerprint"], fingerprint(model, targets))
    if diffs:
        raise ValueError(
            f"model: it is not the base model of the patch {path}: " + "; ".join(diffs)
        )
    changed = [t.name for t in targets if weight_sha256(t.weight) != base["weights_sha256"][t.name]]
    if changed:
        raise ValueError(
            f"model: the weights of {changed} are not the base model's (already "
            "edited, or another checkpoint of the architecture); a patch applies "
            "to the unedited base model"
        )
    # every check passed: the patch is written whole (each tensor on its module's device first)
    staged = [(t, tensors[t.name].to(t.weight.device)) for t in targets]
    with torch.no_grad(), model_locks(model).weights.writing():
        for t, w in staged:
            t.weight.data.copy_(w)
    return names


# ----------------------------------------------------------------------------- LoRA
def _factorise(delta_t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = delta_t`` (``d_out x d_in``) at its numerical rank."""
    u, s, vh = torch.linalg.svd(delta_t.double(), full_matrices=False)
    keep = (
        int((s > s[0] * max(delta_t.shape) * torch.finfo(torch.float32).eps).sum())
        if s.numel() and s[0] > 0
        else 0
    )
    keep = max(1, keep)
    return (u[:, :keep] * s[:keep]).float(), vh[:keep].float()


def _truncate(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` approximation of ``b @ a`` (kept factored: QR of both sides,
    then the SVD of the small core), and its relative Frobenius error."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    r = min(rank, s.numel())
    total = float(s.square().sum())
    err = (float(s[r:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    bb = (qb @ u[:, :r]) * s[:r]
    aa = vh[:r] @ qa.t()
    return bb.float(), aa.float(), err


def write_lora(
    path,
    model,
    targets: Sequence[EditTarget],
    factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    *,
    rank: Optional[int] = None,
    base_model_name_or_path: Optional[str] = None,
    base_sha256: Optional[Mapping[str, str]] = None,
) -> dict:
    """Write a PEFT LoRA adapter whose ``lora_B @ lora_A`` is each target's shift.
    ``factors[name] = (B, A)`` with ``B @ A = Delta W`` in the ``d_out x d_in`` layout.
    Returns ``{"rank": {module: r}, "relative_error": {module: e}, "bytes": n, "files": [...]}``."""
    _check_lora_request(model, targets, rank)
    d = _directory(path)
    tensors, ranks, errors = _lora_tensors(targets, factors, rank)
    config = _adapter_config(model, targets, ranks, base_model_name_or_path)
    if len({t.transposed for t in targets}) > 1:
        raise ValueError(
            "export_lora: the edited modules mix nn.Linear and Conv1D layouts; "
            "one adapter has one fan_in_fan_out"
        )
    files = _write_adapter(d, model, targets, tensors, config, base_sha256, errors)
    n = sum(v.numel() * v.element_size() for v in tensors.values())
    return {"rank": ranks, "relative_error": errors, "bytes": n, "files": files}


def _check_lora_request(model, targets: Sequence[EditTarget], rank: Optional[int]) -> None:
    """Refuse a ``rank`` that is not ``None`` or a positive int, and targets whose weight is
    shared with another module (tied embeddings)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank: expected None (exact) or a positive int, got {rank!r}")
    shared = _shared_weights(model)
    tied = [t.name for t in targets if id(t.weight) in shared]
    if tied:
        raise ValueError(
            f"export_lora: {tied} share their weight with another module (tied "
            "embeddings); a LoRA on one of them would not change the other as the "
            "edit did: export a patch instead"
        )


def _lora_tensors(
    targets: Sequence[EditTarget],
    factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    rank: Optional[int],
) -> Tuple[Dict[str, torch.Tensor], Dict[str, int], Dict[str, float]]:
    """The adapter's ``lora_A``/``lora_B`` tensors under PEFT's names, each target's rank
    and each one's relative error (truncated to ``rank``; exact ones at most their full
    rank)."""
    tensors, ranks, errors = {}, {}, {}
    for t in targets:
        b, a = factors[t.name]
        err = 0.0
        if rank is not None and rank < b.shape[1]:
            b, a, err = _truncate(b, a, rank)
        elif rank is None and b.shape[1] > min(b.shape[0], a.shape[1]):
            # more turns' rows than the shift can have rank: the same product, at its rank
            b, a, _ = _truncate(b, a, min(b.shape[0], a.shape[1]))
        ranks[t.name], errors[t.name] = int(b.shape[1]), err
        tensors[f"base_model.model.{t.name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{t.name}.lora_B.weight"] = b.contiguous()
    return tensors, ranks, errors


def _adapter_config(
    model,
    targets: Sequence[EditTarget],
    ranks: Mapping[str, int],
    base_model_name_or_path: Optional[str],
) -> dict:
    """``adapter_config.json``: the largest rank as ``r`` (and ``lora_alpha``, so the scaling
    is 1), the others in ``rank_pattern``/``alpha_pattern``."""
    r0 = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": r0,
        "lora_alpha": r0,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [t.name for t in targets],
        "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != r0},
        "fan_in_fan_out": any(t.transposed for t in targets),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def _write_adapter(
    d: str,
    model,
    targets: Sequence[EditTarget],
    tensors: Dict[str, torch.Tensor],
    config: dict,
    base_sha256: Optional[Mapping[str, str]],
    errors: Mapping[str, float],
) -> List[str]:
    """Write the adapter's tensors, its config and (:data:`BASE_FILE`) the base it was made
    for into the directory ``d``; returns the three files' paths."""
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(d, ADAPTER_TENSORS), metadata={"format": "pt"})
    atomic_write_json(os.path.join(d, ADAPTER_CONFIG), config)
    atomic_write_json(
        os.path.join(d, BASE_FILE),
        {
            "format": BASE_FORMAT,
            "format_version": BASE_VERSION,
            "ultraedit_fast": __version__,
            "fingerprint": fingerprint(model, targets),
            "weights_sha256": dict(base_sha256 or {}),
            "adapter_weights_sha256": {n: weight_sha256(w) for n, w in tensors.items()},
            "relative_error": errors,
        },
    )
    return [os.path.join(d, f) for f in (ADAPTER_CONFIG, ADAPTER_TENSORS, BASE_FILE)]


def read_adapter(path) -> dict:
    """The base file (:data:`BASE_FILE`) of the adapter at ``path`` (``FileNotFoundError``
    when there is none), after every file of the adapter was checked (``ValueError`` naming
    the file and the field or tensor): regular files only, the base file's schema, the
    config a JSON object, and each tensor recorded for the base's modules present, finite,
    with the sha256 of its bytes, dtype and shape that the base file records; no other."""
    d = os.fspath(path)
    if not os.path.exists(d):
        raise FileNotFoundError(f"path: no LoRA adapter at {d!r}")
    bpath = os.path.join(d, BASE_FILE)
    base = read_manifest(bpath, "LoRA adapter", BASE_FORMAT, BASE_VERSION, _BASE_FIELDS)
    hashes = base["adapter_weights_sha256"]
    expected = [
        f"base_model.model.{n}.lora_{ab}.weight"
        for n in base["fingerprint"]["modules"]
        for ab in "AB"
    ]
    check_names(bpath, "adapter_weights_sha256", hashes, expected)
    cpath = os.path.join(d, ADAPTER_CONFIG)
    config = parse_json(cpath, read_artefact(cpath, "LoRA adapter", MAX_MANIFEST_BYTES), "config")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise bad(cpath, "not the config of a PEFT LoRA adapter")
    tpath = os.path.join(d, ADAPTER_TENSORS)
    check_tensors(tpath, read_tensors(tpath, "LoRA adapter"), hashes, finite=True)
    return base


def load_lora(model, path):
    """``peft.PeftModel.from_pretrained(model, path)`` after checking the adapter's files
    (:func:`read_adapter`) and that ``model`` is the adapter's base (the fingerprint and
    original weights recorded beside it): ``ValueError`` naming the difference otherwise,
    and nothing built. (PEFT itself loads an adapter onto any model whose module names
    match.)"""
    base = read_adapter(path)
    names = list(base["fingerprint"]["modules"])
    targets = []
    for n in names:
        try:
            targets.append(resolve_target(model, n))
        except (ValueError, TypeError):
            pass
    diffs = fingerprint_diff(base["fingerprint"], fingerprint(model, targets))
    if diffs:
        raise ValueError(
            f"model: it is not the base model of the adapter {path}: " + "; ".join(diffs)
        )
    changed = [
        t.name
        for t in targets
        if base["weights_sha256"].get(t.name) not in (None, weight_sha256(t.weight))
    ]
    if changed:
        raise ValueError(f"model: the weights of {changed} are not the adapter's base model's")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, os.fspath(path))


def _shared_weights(model) -> set:
    """ids of parameters reachable under more than one module."""
    seen: Dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def exact_factors(target: EditTarget, turns: Sequence[dict]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = Delta W`` from the undo log's turns (``{"a", "kk", "keys"}``
    as :meth:`UndoLog.export` gives them), concatenated: rank = the turns' rows (or ``d_in``
    for a primal turn)."""
    bs, as_ = [], []
    d_in = target.shape[0]
    for rec in turns:
        a = rec["a"][target.name].float()  # rows x d_out
        i = rec["kk"][target.name]
        kk = torch.eye(d_in) if i is None else rec["keys"][i].float()  # rows x d_in
        bs.append(a.t())
        as_.append(kk)
    return torch.cat(bs, 1), torch.cat(as_, 0)


def delta_factors(target: EditTarget, original: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of ``W_now - W_original`` at its numerical rank (``d_out x d_in`` layout)."""
    delta = target.weight.detach().to("cpu", torch.float32) - original.to("cpu", torch.float32)
    if target.transposed:
        delta = delta.t()
    return _factorise(delta)
