"""What :class:`~ultraedit_fast.editors.ultraedit.UltraEditor` writes to disk and reads back:
its lifelong state (``save``/``load``, :mod:`ultraedit_fast.storage.checkpoint`) and its
edits as a weight patch or a LoRA adapter (:mod:`ultraedit_fast.storage.export`), and the
state's warm start (``preheat``). The editor's methods hold its lock and call these."""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from typing import Optional

import torch

from ..core.config import check_overrides
from ..core.nullspace import NullSpace
from ..model.requests import as_requests
from ..model.targets import resolve_target
from ..parallel.concurrency import model_locks
from ..storage import checkpoint as ckpt
from ..storage.export import delta_factors, exact_factors, weight_sha256, write_lora, write_patch


DRIFT_REFERENCE = "drift.reference"  # drift_from="unedited": the first turn's argmax


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


def _save(editor, path, undo_log: bool) -> str:
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
        extra_tensors=_stabiliser_tensors(editor._setup),
    )


def _stabiliser_tensors(setup) -> dict:
    """The stabilisers' state the editor took on its first turn, by tensor name."""
    out = {} if setup.null is None else setup.null.tensors()
    if setup.drift_reference is not None:
        out[DRIFT_REFERENCE] = setup.drift_reference
    return out


def _restored_setup(setup, saved):
    """``setup`` (resolved on the model: the stabilisers' inputs) with the checkpoint's
    preset and the stabilisers' saved state; ``ValueError`` naming the checkpoint when a
    state its options need is missing or malformed."""
    cfg, where = setup.config, saved.manifest_path
    if saved.preset is not None:
        setup = replace(setup, preset=saved.preset)
    tensors = saved.extra_tensors()
    try:
        null = NullSpace.from_tensors(tensors, setup.targets, cfg.null_space)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    ref = tensors.get(DRIFT_REFERENCE)
    unedited = cfg.drift_from == "unedited" and cfg.drift_budget is not None
    for name, on, have in (
        ("null_space", cfg.null_space is not None, null),
        ("drift_from='unedited'", unedited, ref),
    ):
        if on and have is None and saved.turns:
            raise ValueError(f"{where}: {name} is set but the checkpoint holds no state for it")
    if ref is not None and ref.dtype != torch.long:  # its shape: checked by GeneralDrift
        raise ValueError(f"{where}: {DRIFT_REFERENCE!r} is not an int64 tensor")
    return replace(
        setup,
        null=null if cfg.null_space is not None else None,
        drift_reference=ref if unedited else None,
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


def _load(cls, path, model, tokenizer, overrides):
    check_overrides(overrides)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model_locks(model).weights.refuse_writer_inside_reading("load")
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


def _export_patch(editor, path) -> str:
    _exportable(editor, "export_patch")
    return write_patch(
        path,
        editor.model,
        editor.targets,
        editor._base_sha,
        config=editor.config.to_dict(),
        turns=editor.turns,
    )


def _export_lora(editor, path, rank: Optional[int], base) -> dict:
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


class LifelongState:
    """The persistence and export methods of
    :class:`~ultraedit_fast.editors.ultraedit.UltraEditor` (a base class of it): each
    holds the lock its kind needs (:mod:`ultraedit_fast.parallel.concurrency`: ``save`` and
    the exports only read, under the model's read lock) and calls the functions above."""

    def save(self, path, *, undo_log: bool = True) -> str:
        """Save the lifelong state (normaliser states, turn count, configuration, model
        fingerprint and, with ``undo_log``, the undo log) to the directory ``path``,
        atomically: a crash at any moment leaves the previous checkpoint loadable.
        Returns the manifest's path. The model's weights are not saved: save them too
        (``safetensors.torch.save_model(model, ...)``). Format:
        :mod:`ultraedit_fast.storage.checkpoint`."""
        with self._weights_lock.reading():  # the state changes only under the write lock
            return _save(self, path, undo_log)

    @classmethod
    def load(cls, path, model, tokenizer, **overrides):
        """An editor that continues the lifelong state saved at ``path`` on ``model``
        (whose weights should be those saved with it: a mismatch warns with
        :class:`~ultraedit_fast.storage.CheckpointWeightsWarning`). ``overrides`` may
        change the options that do not shape the lifelong state (``lr``, ``batch_size``,
        ``backend``, ``transactional``, ``undo``, ...); ``modules`` and
        ``share_normalizer`` are fixed by the checkpoint. Continuing with the saved
        settings gives bit for bit the turns an uninterrupted editor would.

        Raises ``ValueError`` naming the difference when ``model`` is not the model the
        checkpoint was saved from (architecture, edited modules' shapes and dtypes,
        parameter names and shapes), and naming the file when the checkpoint is
        truncated, tampered with or not one; ``FileNotFoundError`` when ``path`` does
        not exist. Reads JSON and safetensors only: loading never runs code."""
        return _load(cls, path, model, tokenizer, overrides)

    def preheat(self, requests) -> int:
        """Warm the lifelong normaliser before the edits it should normalise (StableEdit's
        preheat): the keys and output gradients of ``requests`` at their answer tokens,
        captured on the model as it is, merged into the statistics as a turn's would be,
        and nothing written into the model (StableEdit also edits the preheat requests in;
        here they only shape the statistics). Returns the rows merged per module.

        The editor's regime must be fixed (``regime``, ``modules`` and ``lr`` or a first
        turn), since it decides which modules' statistics are warmed."""
        requests = as_requests(requests)
        self._weights_lock.refuse_writer_inside_reading("preheat")
        with self._lock:
            if self._regime_open and not self.turns:
                raise ValueError(
                    "preheat: the editor's regime follows its first turn's size; pass "
                    "regime='stream' or 'facts' (or modules and lr) to the editor first"
                )
            turn = self._turn(requests, self._setup)
            with self._weights_lock.writing():  # its hooks must not meet a serving forward
                cap = turn.capture()
                self.normalizers.update(turn.statistics(cap, edits=False))
            return cap.n_tokens

    def _restore(self, saved) -> None:
        """Take the lifelong state of a loaded checkpoint (``load``'s last step)."""
        setup = _restored_setup(self._setup, saved)
        devices = {self.normalizer_key(t): t.weight.device for t in reversed(self.targets)}
        shapes = {self.normalizer_key(t): t.local_shape for t in self.targets}
        normalizers = saved.normalizers(shapes, devices)
        whiten = self._setup.config.whiten_values
        if any((s.scatter is not None) != whiten for s in normalizers.values()):
            raise ValueError(
                f"{saved.manifest_path}: whiten_values is {whiten} but the checkpoint's "
                "normaliser states were written with it "
                f"{'off' if whiten else 'on'} (their scatter matrices)"
            )
        _check_grams(saved, self._setup.config.preserve_edits, normalizers, self)
        undo = None if self._undo is None else saved.undo(self.targets, shapes, devices)
        with self._lock, self._weights_lock.writing():
            self._setup = setup
            self.normalizers = normalizers
            self.turns = saved.turns
            self._base_sha = dict(saved.base_sha256)
            self._regime_open = False
            if self._undo is not None:
                self._undo.restore(undo, self.targets, self._rank_update)

    # ------------------------------------------------------------------ export
    def export_patch(self, path) -> str:
        """Write the edited modules' weights and a manifest naming their base model to the
        directory ``path`` (:mod:`ultraedit_fast.storage.export`);
        :func:`ultraedit_fast.storage.apply_patch` writes them into a fresh copy of the base
        model, bit for bit. Returns the manifest's path."""
        with self._weights_lock.reading():
            return _export_patch(self, path)

    def export_lora(self, path, rank: Optional[int] = None, *, base=None) -> dict:
        """Write a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``)
        whose ``lora_B @ lora_A`` is each edited module's accumulated shift to the directory
        ``path``. ``rank=None``: exact, from the undo log's factors when it holds every turn
        (``undo=True``), else from ``W_now - W_original`` with ``base`` (the unedited model, or
        its state dict); ``rank=r``: the best rank-``r`` approximation. Returns
        ``{"rank", "relative_error", "bytes", "files"}`` (per-module ranks and errors)."""
        with self._weights_lock.reading():
            return _export_lora(self, path, rank, base)


def _check_grams(saved, preserve_edits, normalizers, editor) -> None:
    """``preserve_edits``: after a turn, every loaded state keeps the Gram of each of its
    modules when the option is on (a preheat alone grows none), none when it is off, and
    none of a module that is not its own."""
    members: dict = {}
    for t in editor.targets:
        members.setdefault(editor.normalizer_key(t), set()).add(t.name)
    for key, state in normalizers.items():
        stray = sorted(set(state.grams or ()) - members.get(key, set()))
        if stray:
            raise ValueError(
                f"{saved.manifest_path}: the normaliser state {key!r} has Grams of modules "
                f"{stray} that it does not normalise"
            )
    for t in editor.targets:
        state = normalizers.get(editor.normalizer_key(t))
        if state is None:
            continue
        has = state.grams is not None and t.name in state.grams
        on = preserve_edits is not None
        if (has and not on) or (on and not has and saved.turns):
            raise ValueError(
                f"{saved.manifest_path}: preserve_edits is {preserve_edits} but the "
                f"checkpoint's normaliser state for module {t.name!r} "
                f"{'has' if has else 'lacks'} its keys' Gram"
            )
