"""What :class:`~ultraedit_fast.editors.ultraedit.UltraEditor` writes to disk and reads back:
its lifelong state (``save``/``load``, :mod:`ultraedit_fast.storage.checkpoint`) and its
edits as a weight patch or a LoRA adapter (:mod:`ultraedit_fast.storage.export`). The
editor's methods hold its lock and call these."""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from ..core.config import check_overrides
from ..model.targets import resolve_target
from ..storage import checkpoint as ckpt
from ..storage.export import delta_factors, exact_factors, weight_sha256, write_lora, write_patch


def rank_path(path, tp):
    """A tensor-parallel editor's checkpoint: one directory per rank inside ``path`` (each
    rank writes its own shards of the normaliser and of the undo log, in parallel, and
    nothing is gathered); a plain editor's: ``path`` itself."""
    if tp is None:
        return path
    return os.path.join(os.fspath(path), f"rank{tp.rank:03d}-of-{tp.world:03d}")


def tp_record(tp):
    return None if tp is None else {"world": tp.world, "rank": tp.rank}


def model_tensor_parallel(model):
    """The tensor-parallel group of a model's sharded linear weights (``None``: none)."""
    from ..parallel.distributed import is_dtensor, tensor_parallel

    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and is_dtensor(w):
            try:
                tp = tensor_parallel(name, w, False)
            except ValueError:
                continue
            if tp is not None and tp.world > 1:
                return tp
    return None


def save(editor, path, undo_log: bool) -> str:
    undo = editor._undo
    return ckpt.write_checkpoint(
        rank_path(path, editor._tp),
        config=editor.config.to_dict(),
        preset=editor.preset,
        turns=editor.turns,
        tensor_parallel=tp_record(editor._tp),
        normalizers=editor.normalizers,
        fingerprint=ckpt.fingerprint(editor.model, editor.targets),
        weights_sample_sha256=ckpt.weights_digest(editor.targets),
        undo=undo.export() if undo_log and undo is not None else None,
        base_sha256=editor._base_sha,
    )


def _check_model(saved, model) -> None:
    """``ValueError`` naming the difference when ``model`` is not the checkpoint's."""
    current = []
    for name in saved.config.modules:
        try:
            current.append(resolve_target(model, name))
        except (ValueError, TypeError):
            pass  # reported by the fingerprint diff
    diffs = ckpt.fingerprint_diff(saved.fingerprint, ckpt.fingerprint(model, current))
    if diffs:
        raise ValueError(
            f"model: it is not the model the checkpoint "
            f"{saved.manifest_path} was saved from: " + "; ".join(diffs)
        )


def load(cls, path, model, tokenizer, overrides):
    check_overrides(overrides)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    tp = model_tensor_parallel(model)
    saved = ckpt.load_checkpoint(rank_path(path, tp))
    if saved.tensor_parallel != tp_record(tp):
        raise ValueError(
            f"model: the checkpoint {saved.manifest_path} was saved by rank "
            f"{saved.tensor_parallel} of a tensor-parallel model, this is "
            f"{tp_record(tp)}: load it with the same ranks and layout"
        )
    _check_model(saved, model)  # before building anything on it
    editor = cls(model, tokenizer, saved.config.replace(**overrides))
    if saved.weights_sample_sha256 != ckpt.weights_digest(editor.targets):
        warnings.warn(
            f"model: the weights of the edited modules differ from those the checkpoint "
            f"{saved.manifest_path} was saved with; load the edited model's weights before "
            "the editor (the lifelong statistics continue from the saved model)",
            ckpt.CheckpointWeightsWarning,
            stacklevel=3,
        )
    editor._restore(saved)
    return editor


def _exportable(editor, what: str) -> None:
    if editor._tp is not None:
        raise ValueError(
            f"{what}: the model is tensor parallel; export from a model "
            "gathered into one process (its edited weights whole)"
        )
    if not editor.turns:
        raise ValueError(f"{what}: no turn was made; there is nothing to export")


def export_patch(editor, path) -> str:
    _exportable(editor, "export_patch")
    return write_patch(
        path,
        editor.model,
        editor.targets,
        editor._base_sha,
        config=editor.config.to_dict(),
        turns=editor.turns,
    )


def export_lora(editor, path, rank: Optional[int], base) -> dict:
    _exportable(editor, "export_lora")
    targets, base_sha = editor.targets, editor._base_sha
    log_data = editor._undo.export() if editor._undo is not None else None
    if (
        log_data
        and len(log_data["turns"]) == editor.turns
        and all(weight_sha256(log_data["base"][t.name]) == base_sha.get(t.name) for t in targets)
    ):
        factors = {t.name: exact_factors(t, log_data["turns"]) for t in targets}
    elif base is not None:
        factors = {}
        for t in targets:
            orig = original_weight(base, t.name)
            known = base_sha.get(t.name)
            if known is not None and weight_sha256(orig) != known:
                raise ValueError(f"base: its {t.name!r} is not the weight this editor started from")
            factors[t.name] = delta_factors(t, orig)
    else:
        raise ValueError(
            "export_lora: the accumulated shift is unknown: build the "
            "editor with undo=True (it keeps every turn's factors), or "
            "pass base=<the unedited model or its state dict>"
        )
    return write_lora(path, editor.model, targets, factors, rank=rank, base_sha256=base_sha)


def original_weight(base, name: str) -> torch.Tensor:
    """Module ``name``'s weight in ``base``: a model or a state dict."""
    if isinstance(base, torch.nn.Module):
        return base.get_submodule(name).weight.detach()
    if isinstance(base, dict):
        w = base.get(f"{name}.weight")
        if w is None:
            raise ValueError(f"base: the state dict has no {name + '.weight'!r}")
        return w
    raise TypeError(
        f"base: expected the unedited model or its state dict, got {type(base).__name__}"
    )
