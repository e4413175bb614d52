"""The on-disk format of an editor's lifelong state (:meth:`UltraEditor.save` /
:meth:`UltraEditor.load`).

A checkpoint is a **directory** holding two files that matter:

``state-<first 16 hex digits of its sha256>.safetensors``
    every tensor: the lifelong normaliser states (``state.<j>.mean|acc|std``, fp32,
    ``d_in + d_out`` each) and, when the undo log is saved, the edited weights as
    they were before the first logged turn (``undo.base.<module>``, the weight's
    dtype and shape) and each logged turn's low-rank factors (``undo.<r>.a.<module>``,
    fp32 ``N x d_out`` or ``d_in x d_out``; ``undo.<r>.kk.<i>``, fp32 ``N x d_in``).
``manifest.json``
    written **last**: format name and version, package / torch / safetensors /
    Python versions, the turn count, the configuration (``modules``, ``lr``,
    ``batch_size``, ``tokens_per_pass``, ``share_normalizer``, ``backend`` as requested,
    ``transactional``, ``undo``), a fingerprint of the model (architecture class, ``model_type``, each
    edited module's kind, shape and dtype, every parameter's name and shape, and a
    sha256 of a strided sample of the edited weights), which state belongs to which
    normaliser key, the undo log's layout, and the name, size and sha256 of the
    tensor file. The manifest carries a sha256 of its own canonical JSON too, so a
    corrupted manifest is told apart from a valid one.

Nothing is pickled: loading parses JSON and safetensors only, and never runs code.

Atomicity. Every file is written to a temporary name in the same directory,
flushed and ``fsync``-ed, renamed into place with :func:`os.replace`, and the
directory is ``fsync``-ed. The tensor file is named after its content, so a new
save never overwrites a tensor file that the current manifest names; the manifest
is replaced only after the new tensor file is durable, and the old tensor file is
deleted only after the new manifest is durable. A crash or ``kill -9`` at any
moment therefore leaves either the previous checkpoint or the new one, both whole.
``load`` reads regular files only (a FIFO, a device or a directory in their place is
refused unread) and checks the tensor file's size and sha256 against the manifest before it
parses it. One writer per directory at a time: ``save`` holds an exclusive
``flock`` on ``<dir>/.lock`` (Linux/macOS) while it writes, and removes the
temporary files of writers that died (their pid is gone). A ``load`` that races a
``save`` and finds its tensor file already replaced reads the new manifest again.

The manifest's schema and its validation are in :mod:`.manifest`, the model's fingerprint
in :mod:`.fingerprint`, the directory's lock and clean-up in :mod:`.directory`; this module
writes and reads the two files and decodes a checkpoint for the editor that continues it.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..core.config import EditorConfig
from ..core.normalizer import NormalizerState
from ..utils.files import atomic_write_bytes, read_regular_file, unlink_quietly
from .directory import LOCKFILE, DirLock, as_path, checked_directory, remove_stale_tmp
from .fingerprint import fingerprint, fingerprint_diff, weights_digest
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TENSOR_FILE,
    canonical,
    decode_key,
    encode_key,
    manifest_body,
    parse_manifest,
    seal,
)
from .validation import MAX_MANIFEST_BYTES, bad

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LOCKFILE",
    "MANIFEST",
    "Checkpoint",
    "CheckpointWeightsWarning",
    "fingerprint",
    "fingerprint_diff",
    "load_checkpoint",
    "read_checkpoint",
    "weights_digest",
    "write_checkpoint",
]

_canonical = canonical  # the manifest's self-hash (tests sign forged manifests with it)
_RETRIES = 50  # a load that keeps racing saves tries this many times (a few seconds)


class CheckpointWeightsWarning(UserWarning):
    """The model's edited weights differ from those the checkpoint was saved with."""


# ============================================================================ save
def write_checkpoint(
    path,
    *,
    config: Mapping[str, Any],
    preset: Optional[str],
    turns: int,
    normalizers: Mapping[object, NormalizerState],
    fingerprint: dict,
    weights_sample_sha256: str,
    undo: Optional[dict] = None,
    base_sha256: Optional[Mapping[str, str]] = None,
    tensor_parallel: Optional[Mapping[str, int]] = None,
    extra_tensors: Optional[Mapping[str, torch.Tensor]] = None,
) -> str:
    """Write a checkpoint to the directory ``path`` (created if missing), atomically.

    ``config``: the editor's options (:meth:`EditorConfig.to_dict`), ``normalizers``:
    normaliser key -> state, ``undo``: :meth:`UndoLog.export`'s data or ``None``,
    ``extra_tensors``: more state by name (a stabiliser's, e.g. ``nullspace.*``).
    Returns the path of the manifest. One writer per directory: the caller's process
    holds the directory's lock while this runs."""
    from safetensors.torch import save as to_bytes

    directory = checked_directory(path)
    tensors, states_meta, entries, log_meta = _pack_tensors(normalizers, undo)
    body = manifest_body(
        config=config,
        preset=preset,
        turns=turns,
        fingerprint=fingerprint,
        weights_sample_sha256=weights_sample_sha256,
        base_sha256=base_sha256,
        tensor_parallel=tensor_parallel,
        states=states_meta,
        normalizers=entries,
        undo_log=log_meta,
    )
    for name, t in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"extra_tensors: {name!r} is a name the checkpoint uses")
        tensors[name] = t.detach().to("cpu").contiguous()
    body["extra_tensors"] = sorted(extra_tensors or {})
    data = to_bytes(tensors, metadata={"format": FORMAT})
    tensors.clear()  # the bytes hold them now
    return _commit(directory, data, body)


def _pack_tensors(
    normalizers: Mapping[object, NormalizerState], undo: Optional[dict]
) -> Tuple[Dict[str, torch.Tensor], List[dict], List[dict], Optional[dict]]:
    """Every tensor of the checkpoint by its name in the tensor file, and the manifest's
    description of them: ``(tensors, states, normalizers, undo_log)``. A state shared by
    several keys (or kept by several undo turns) is stored once."""
    tensors: Dict[str, torch.Tensor] = {}
    pool: Dict[int, int] = {}
    states_meta: List[dict] = []

    def put_state(state) -> int:
        j = pool.get(id(state))
        if j is None:
            j = pool[id(state)] = len(states_meta)
            meta = {"d_in": state.d_in, "d_out": state.d_out, "n": int(state.n)}
            parts = ["mean", "acc", "std"]
            if state.scatter is not None:  # whiten_values
                meta["scatter"] = True
                parts.append("scatter")
            if state.grams is not None:  # preserve_edits (a shared Gram is written twice)
                meta["grams"] = sorted(state.grams)
            states_meta.append(meta)
            for part in parts:
                tensors[f"state.{j}.{part}"] = (
                    getattr(state, part).detach().to("cpu", torch.float32).contiguous()
                )
            for name, g in (state.grams or {}).items():
                tensors[f"state.{j}.gram.{name}"] = g.detach().to("cpu", torch.float32, copy=True)
        return j

    entries = [{"key": encode_key(k), "state": put_state(s)} for k, s in normalizers.items()]
    log_meta = None
    if undo:
        records = []
        for name, w in undo["base"].items():
            tensors[f"undo.base.{name}"] = w.detach().to("cpu").contiguous()
        for r, rec in enumerate(undo["turns"]):
            for name, a in rec["a"].items():
                tensors[f"undo.{r}.a.{name}"] = a.contiguous()
            for i, kk in enumerate(rec["keys"]):
                tensors[f"undo.{r}.kk.{i}"] = kk.contiguous()
            records.append(
                {
                    "normalizers": [
                        {"key": encode_key(k), "state": put_state(s)}
                        for k, s in rec["states"].items()
                    ],
                    "kk": dict(rec["kk"]),
                    "n_keys": len(rec["keys"]),
                }
            )
        log_meta = {"base": list(undo["base"]), "turns": records}
    return tensors, states_meta, entries, log_meta


def _commit(directory: str, data: bytes, body: dict) -> str:
    """Under the directory's lock: the tensor file (named after its content) made durable,
    then the manifest that names it, then the tensor files no manifest names removed.
    Returns the manifest's path."""
    digest, size = hashlib.sha256(data).hexdigest(), len(data)
    with DirLock(directory):
        remove_stale_tmp(directory)
        name = f"state-{digest[:16]}.safetensors"
        # our own temporary name (the writer's pid in it, so a dead writer's is cleaned):
        # the file gets the umask's mode, and a kill leaves nothing we cannot find
        atomic_write_bytes(os.path.join(directory, name), data)
        del data
        atomic_write_bytes(os.path.join(directory, MANIFEST), seal(body, name, digest, size))
        # the new checkpoint is durable: drop tensor files no manifest names
        for f in os.listdir(directory):
            if TENSOR_FILE.match(f) and f != name:
                unlink_quietly(os.path.join(directory, f))
    return os.path.join(directory, MANIFEST)


# ============================================================================ load
def _read_bytes(path: str, limit: Optional[int] = None, what: str = "checkpoint") -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes (a FIFO, a device or
    a directory is refused without being read: ``ValueError`` naming it)."""
    return read_regular_file(path, what, limit)


def read_checkpoint(path) -> Tuple[dict, Dict[str, torch.Tensor], str]:
    """Parse and verify a checkpoint: ``(manifest, tensors on the CPU, directory)``.
    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` naming
    the file when it is not a whole, untampered checkpoint.

    A save may replace the checkpoint while this reads it. The manifest is read whole, then
    the tensor file it names is opened and read whole from that one open file, so its bytes
    are checked and parsed as they were hashed; if the file is gone (the save that replaced
    it deleted it), or does not match because a newer manifest is in place, the read starts
    again with the new manifest."""
    from safetensors.torch import load as from_bytes

    directory = _checkpoint_directory(path)
    mpath = os.path.join(directory, MANIFEST)
    last_error: Optional[ValueError] = None
    for attempt in range(_RETRIES):
        if attempt:
            time.sleep(min(0.2, 0.005 * 2 ** min(attempt, 6)))
        raw = _read_manifest(mpath)
        body = parse_manifest(mpath, raw)
        tpath = os.path.join(directory, body["tensors"]["file"])
        data, last_error = _read_tensor_file(tpath, body["tensors"])
        if last_error is None:
            try:
                tensors = from_bytes(data)
            except Exception as e:  # safetensors header / layout errors
                raise bad(tpath, f"not a valid safetensors file ({e})") from None
            return body, tensors, directory
        if not _changed(mpath, raw):  # else a new checkpoint replaced this one: read it
            raise last_error
    raise last_error if last_error is not None else bad(mpath, "kept changing while read")


def _checkpoint_directory(path) -> str:
    """The checkpoint directory ``path`` names (itself, or its manifest's directory);
    ``FileNotFoundError`` when it does not exist, ``ValueError`` when it cannot be read or
    is not a directory."""
    directory = as_path(path)
    if os.path.isfile(directory) and os.path.basename(directory) == MANIFEST:
        directory = os.path.dirname(directory) or "."
    try:
        os.stat(directory)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no checkpoint at {directory!r}") from None
    except PermissionError:
        raise ValueError(f"path: {directory!r}: permission denied (cannot read it)") from None
    if not os.path.isdir(directory):
        raise ValueError(
            f"path: {directory!r} is not a checkpoint directory written by UltraEditor.save"
        )
    return directory


def _read_manifest(mpath: str) -> bytes:
    """The manifest file's bytes, read whole (``ValueError`` naming it when it cannot be)."""
    try:
        return _read_bytes(mpath, MAX_MANIFEST_BYTES, "checkpoint manifest")
    except FileNotFoundError:
        raise bad(
            mpath,
            "missing; not a checkpoint written by UltraEditor.save (or its first save never completed)",
        ) from None
    except PermissionError:
        raise bad(mpath, "permission denied (cannot read the manifest)") from None


def _read_tensor_file(tpath: str, info: dict) -> Tuple[Optional[bytes], Optional[ValueError]]:
    """``(bytes, None)`` of the tensor file when its size and sha256 are the manifest's
    ``info``; ``(None, error)`` when it is missing or differs (a save may have replaced it:
    the caller decides). A file that cannot be read raises."""
    try:
        data = _read_bytes(tpath, None, "checkpoint tensor file")
    except FileNotFoundError:
        return None, bad(tpath, "missing; the checkpoint is incomplete")
    except PermissionError:
        raise bad(tpath, "permission denied (cannot read the tensor file)") from None
    if len(data) != info["bytes"]:
        return None, bad(
            tpath,
            f"{len(data)} bytes, the manifest says {info['bytes']}: the file is truncated or was modified",
        )
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        return None, bad(
            tpath, "sha256 hash mismatch with the manifest: the file was modified or is corrupt"
        )
    return data, None


def _changed(mpath: str, raw: bytes) -> bool:
    try:
        return _read_bytes(mpath, MAX_MANIFEST_BYTES, "checkpoint manifest") != raw
    except (OSError, ValueError):
        return True


@dataclass
class Checkpoint:
    """A verified checkpoint, read by :func:`load_checkpoint`; its states and undo log are
    decoded against the editor that continues it (:meth:`normalizers`, :meth:`undo`)."""

    manifest_path: str
    config: EditorConfig  # the editor's options as saved (modules and lr resolved)
    preset: Optional[str]
    turns: int
    fingerprint: dict
    weights_sample_sha256: Optional[str]
    base_sha256: Dict[str, str]  # the edited modules' original weights (patches name them)
    tensor_parallel: Optional[Dict[str, int]]  # {"world", "rank"} of a sharded editor
    _body: dict
    _tensors: Dict[str, torch.Tensor]

    def __post_init__(self):
        self._pool: Dict[int, NormalizerState] = {}

    def _tensor(self, name, shape, dtype=torch.float32):
        t = self._tensors.get(name)
        if t is None:
            raise bad(
                self.manifest_path,
                f"tensor {name!r} is missing from {self._body['tensors']['file']}",
            )
        if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
            raise bad(
                self.manifest_path,
                f"tensor {name!r} has shape {tuple(t.shape)} and "
                f"dtype {t.dtype}, expected {tuple(shape)} and {dtype}",
            )
        return t

    def extra_tensors(self) -> Dict[str, torch.Tensor]:
        """The ``extra_tensors`` it was written with (none in an older checkpoint)."""
        names = self._body.get("extra_tensors") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad(self.manifest_path, "field 'extra_tensors': expected a list of names")
        missing = [n for n in names if n not in self._tensors]
        if missing:
            raise bad(self.manifest_path, f"tensor {missing[0]!r} is missing")
        return {n: self._tensors[n] for n in names}

    def _state(self, j, key, shapes, devices) -> NormalizerState:
        states_meta = self._body["states"]
        if key not in shapes:
            raise bad(
                self.manifest_path,
                f"normaliser key {key!r} is not one of this editor's {sorted(map(str, shapes))}",
            )
        if not isinstance(j, int) or not 0 <= j < len(states_meta):
            raise bad(self.manifest_path, f"state index {j!r} out of range")
        if j not in self._pool:
            m = states_meta[j]
            d_in, d_out, n = int(m["d_in"]), int(m["d_out"]), int(m["n"])
            if (d_in, d_out) != tuple(shapes[key]) or n < 0:
                raise bad(
                    self.manifest_path,
                    f"state {j} has shape {(d_in, d_out)} and "
                    f"n={n}, expected {tuple(shapes[key])} for key {key!r}",
                )
            parts = [
                self._tensor(f"state.{j}.{p}", (d_in + d_out,)).to(devices[key], copy=True)
                for p in ("mean", "acc", "std")
            ]
            if m.get("scatter"):  # whiten_values
                s = self._tensor(f"state.{j}.scatter", (d_out, d_out))
                parts.append(s.to(devices[key], copy=True))
            else:
                parts.append(None)
            grams = m.get("grams")
            if grams is not None:  # preserve_edits
                if not isinstance(grams, list) or not all(isinstance(g, str) for g in grams):
                    raise bad(self.manifest_path, f"state {j}: field 'grams': expected names")
                grams = {
                    g: self._tensor(f"state.{j}.gram.{g}", (d_in, d_in)).to(devices[key], copy=True)
                    for g in grams
                }
            self._pool[j] = NormalizerState(d_in, d_out, n, *parts, grams)
        return self._pool[j]

    def _states(self, entries, shapes, devices) -> Dict[object, NormalizerState]:
        return {
            decode_key(e["key"]): self._state(e["state"], decode_key(e["key"]), shapes, devices)
            for e in entries
        }

    def normalizers(
        self, shapes: Mapping[object, Tuple[int, int]], devices: Mapping[object, torch.device]
    ) -> Dict[object, NormalizerState]:
        """The lifelong states, keyed as the editor keys them; ``shapes``/``devices``: per
        normaliser key, the ``(d_in, d_out)`` it must have and the device it goes to."""
        try:
            states = self._states(self._body["normalizers"], shapes, devices)
        except (KeyError, TypeError) as e:
            raise bad(self.manifest_path, f"inconsistent manifest ({e!r})") from None
        if self.turns and set(states) != set(shapes):
            missing = sorted(map(str, set(shapes) - set(states)))
            raise bad(
                self.manifest_path,
                f"field 'normalizers': no state for {missing} after {self.turns} turns",
            )
        return states

    def undo(self, targets, shapes, devices) -> Optional[dict]:
        """The undo log as :meth:`UndoLog.export` shaped it (``None`` when none was saved),
        checked against ``targets``, the editor's modules."""
        log_meta = self._body.get("undo_log")
        if not log_meta:
            return None
        try:
            by_name = {t.name: t for t in targets}
            if sorted(log_meta["base"]) != sorted(by_name):
                raise bad(self.manifest_path, "the undo log does not cover the edited modules")
            base = {
                name: self._tensor(f"undo.base.{name}", t.weight.shape, t.weight.dtype)
                for name, t in by_name.items()
            }
            turns = []
            for r, rm in enumerate(log_meta["turns"]):
                n_keys = int(rm["n_keys"])
                keys = [self._tensors[f"undo.{r}.kk.{i}"] for i in range(n_keys)]
                rec = {
                    "states": self._states(rm["normalizers"], shapes, devices),
                    "a": {},
                    "kk": {},
                    "keys": keys,
                }
                for name, t in by_name.items():
                    i = rm["kk"][name]
                    if i is not None and not (isinstance(i, int) and 0 <= i < n_keys):
                        raise bad(self.manifest_path, f"undo turn {r}: bad key index {i!r}")
                    d_in, d_out = t.local_shape
                    rows = d_in if i is None else keys[i].shape[0]
                    rec["a"][name] = self._tensor(f"undo.{r}.a.{name}", (rows, d_out))
                    if i is not None:
                        self._tensor(f"undo.{r}.kk.{i}", (rows, d_in))
                    rec["kk"][name] = i
                turns.append(rec)
        except (KeyError, TypeError) as e:
            raise bad(self.manifest_path, f"inconsistent manifest ({e!r})") from None
        if len(turns) > self.turns:
            raise bad(
                self.manifest_path,
                f"the undo log holds {len(turns)} turns, more than the {self.turns} turns made",
            )
        return {"base": base, "turns": turns}


def load_checkpoint(path) -> Checkpoint:
    """Read and verify the checkpoint at ``path`` (see :func:`read_checkpoint`)."""
    body, tensors, directory = read_checkpoint(path)
    mpath = os.path.join(directory, MANIFEST)
    cfg = dict(body["config"])
    preset = cfg.pop("preset", None)
    turns, saved_fp = body["turns"], body["fingerprint"]
    for k in ("modules", "lr", "batch_size", "share_normalizer"):
        if k not in cfg:
            raise bad(mpath, f"field 'config.{k}': missing")
    try:
        config = EditorConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise bad(mpath, f"field 'config.{str(e).split(':')[0]}': {e}") from None
    if config.modules is None or config.lr is None:
        raise bad(mpath, "field 'config': 'modules' and 'lr' must be set")
    return Checkpoint(
        mpath,
        config,
        preset if isinstance(preset, str) else None,
        turns,
        saved_fp,
        body.get("weights_sample_sha256"),
        dict(body.get("base_weights_sha256") or {}),
        body.get("tensor_parallel"),
        body,
        tensors,
    )
