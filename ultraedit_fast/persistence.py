"""The editor's state that outlives a turn: checkpoints on disk and the undo log.

Checkpoint format (:meth:`UltraEditor.save` / :meth:`UltraEditor.load`)
------------------------------------------------------------------------
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
``load`` checks the tensor file's size and sha256 against the manifest before it
parses it. One writer per directory at a time: ``save`` holds an exclusive
``flock`` on ``<dir>/.lock`` (Linux/macOS) while it writes, and removes the
temporary files of writers that died (their pid is gone). A ``load`` that races a
``save`` and finds its tensor file already replaced reads the new manifest again.

Undo log (``UltraEditor(..., undo=...)``, :meth:`UltraEditor.rollback`)
-----------------------------------------------------------------------
The log keeps, on the host,

* each edited weight as it was before the first logged turn, once (the *base*),
* each logged turn's factors ``(a, kk)`` with ``Delta W = a^T kk``, fp32, with ``kk``
  stored once per distinct key matrix (``gate_proj`` and ``up_proj`` of one layer
  share theirs) and not at all when it is the identity (the primal solve),
* each logged turn's normaliser states before the turn (references: the editor
  never changes a committed state in place, so these cost nothing extra but the
  ``3 (d_in + d_out)`` floats per key and turn that the next turn would free).

``rollback(k)`` copies the base back into the edited weights and replays the
kept turns' factors with the same ``rank_update_`` kernel that applied them: on
the CPU, and on a GPU whose kernels are deterministic, the weights come back bit
for bit. When the log holds more than ``max_turns`` turns the oldest is folded
into the base (the same kernel, on the weight's device).

Memory: the base is the edited weights once (``sum d_out x d_in x itemsize``); a
turn of ``N`` answer tokens costs ``sum over modules of N x d_out x 4`` bytes for
``a`` plus ``sum over distinct key matrices of N x d_in x 4`` for ``kk`` (primal
turns, ``N > d_in``: ``d_in x d_out x 4`` per module and no ``kk``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

FORMAT = "ultraedit_fast.editor-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCKFILE = ".lock"
_TENSOR_FILE = re.compile(r"^state-[0-9a-f]{16}\.safetensors$")
_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")
_MAX_MANIFEST_BYTES = 256 << 20
_SAMPLE = 4096  # elements of each edited weight hashed into the fingerprint
# Options that a checkpoint fixes: the lifelong state depends on them.
_FIXED = ("modules", "share_normalizer")
# Options that ``load`` may override.
_OVERRIDABLE = ("lr", "batch_size", "tokens_per_pass", "backend", "transactional", "undo")


class CheckpointWeightsWarning(UserWarning):
    """The model's edited weights differ from those the checkpoint was saved with."""


# ============================================================================ undo log
@dataclass
class _Turn:
    """One logged turn: the normaliser states before it and its factors."""

    states: Dict[object, object]  # key -> NormalizerState before the turn
    a: Dict[str, torch.Tensor]  # module -> a (fp32, host)
    kk: Dict[str, Optional[int]]  # module -> index into ``keys``; None: identity
    keys: List[torch.Tensor] = field(default_factory=list)  # fp32, host

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.a.values()) + self.keys)


def _host(t: torch.Tensor) -> torch.Tensor:
    """A host fp32 tensor with the same values, not aliasing anything the turn may reuse."""
    t = t.detach()
    if t.device.type == "cpu" and t.dtype == torch.float32:
        return t  # fresh outputs of the solve; nothing writes into them later
    return t.to("cpu", torch.float32, copy=True)


def _is_identity(kk: torch.Tensor) -> bool:
    if kk.dim() != 2 or kk.shape[0] != kk.shape[1]:
        return False
    return bool(torch.equal(kk, torch.eye(kk.shape[0], dtype=kk.dtype, device=kk.device)))


class UndoLog:
    """Base copies of the edited weights plus per-turn factors; see the module docstring.

    ``max_turns``: ``None`` keeps every turn; an int keeps the last ``max_turns``.
    """

    def __init__(self, max_turns: Optional[int]):
        self.max_turns = max_turns
        self.base: Optional[Dict[str, torch.Tensor]] = None
        self.turns: List[_Turn] = []

    def __len__(self) -> int:
        return len(self.turns)

    # ---------------------------------------------------------------- recording
    def prepare(self, editor, plan, pre_states) -> Tuple[_Turn, Optional[Dict[str, torch.Tensor]]]:
        """Called after the finiteness check and before any weight is written: copies the
        factors to the host and, for the first logged turn, the weights. Nothing is
        committed until :meth:`push`."""
        base = None
        if self.base is None:
            base = {t.name: t.weight.detach().to("cpu", copy=True) for t, _, _ in plan}
        rec = _Turn(dict(pre_states), {}, {})
        seen: Dict[int, Optional[int]] = {}
        for t, a, kk in plan:
            rec.a[t.name] = _host(a)
            if id(kk) not in seen:
                if _is_identity(kk):
                    seen[id(kk)] = None
                else:
                    seen[id(kk)] = len(rec.keys)
                    rec.keys.append(_host(kk))
            rec.kk[t.name] = seen[id(kk)]
        return rec, base

    def push(self, editor, prepared) -> None:
        """Commit a turn that was applied; fold the oldest turns beyond ``max_turns``.
        The turn itself is committed already: a failure here (out of memory while
        folding) clears the log with a warning rather than failing the turn."""
        rec, base = prepared
        if self.base is None:
            self.base = base
        self.turns.append(rec)
        try:
            self.trim(editor)
        except Exception as e:  # pragma: no cover - needs an allocation failure
            self.base, self.turns = None, []
            warnings.warn(f"undo: the undo log was cleared, folding its oldest turn failed "
                          f"({e})", RuntimeWarning, stacklevel=3)

    def trim(self, editor, max_turns: Optional[int] = -1) -> None:
        limit = self.max_turns if max_turns == -1 else max_turns
        while limit is not None and len(self.turns) > limit:
            self._fold_oldest(editor)

    def _factors(self, rec: _Turn, target, device):
        a = rec.a[target.name].to(device)
        i = rec.kk[target.name]
        if i is None:
            d_in = target.shape[0]
            kk = torch.eye(d_in, dtype=torch.float32, device=device)
        else:
            kk = rec.keys[i].to(device)
        return a, kk

    def _fold_oldest(self, editor) -> None:
        """base += the oldest turn's update, computed on the weight's device with the
        weight's strides and the same kernel as the live update (so the result is the
        live weight after that turn, bit for bit); all-or-nothing."""
        rec = self.turns[0]
        new: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for t in editor.targets:
                w = t.weight
                tmp = torch.empty_strided(w.size(), w.stride(), dtype=w.dtype, device=w.device)
                tmp.copy_(self.base[t.name])
                editor._backend(w.device).rank_update_(tmp, *self._factors(rec, t, w.device),
                                                       t.transposed)
                new[t.name] = tmp.to("cpu")
        self.base = new
        self.turns.pop(0)
        if not self.turns:
            self.base = None

    # ---------------------------------------------------------------- rollback
    def rollback(self, editor, turns: int) -> None:
        n = len(self.turns)
        keep = self.turns[: n - turns]
        with torch.no_grad():
            for t in editor.targets:
                w = t.weight
                w.data.copy_(self.base[t.name])
                for rec in keep:
                    editor._backend(w.device).rank_update_(
                        w.data, *self._factors(rec, t, w.device), t.transposed)
        editor.normalizers = dict(self.turns[n - turns].states)
        editor.turns -= turns
        self.turns = keep
        if not keep:
            self.base = None

    # ---------------------------------------------------------------- accounting
    def memory_bytes(self) -> Dict[str, object]:
        base = 0 if self.base is None else sum(
            t.numel() * t.element_size() for t in self.base.values())
        per_turn = [r.nbytes() for r in self.turns]
        return {"base": base, "turns": per_turn, "total": base + sum(per_turn)}


# ============================================================================ fingerprint
def _kind(target) -> str:
    return "Conv1D" if target.transposed else "Linear"


def weights_digest(targets) -> str:
    """sha256 of a strided sample of each edited weight (fp32 values): cheap, and the same
    on any device."""
    h = hashlib.sha256()
    for t in targets:
        flat = t.weight.detach().reshape(-1)
        n = flat.numel()
        k = min(n, _SAMPLE)
        idx = torch.arange(k, device=flat.device) * (n // k)
        h.update(t.name.encode())
        h.update(flat[idx].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(model, targets) -> dict:
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "modules": {t.name: {"kind": _kind(t), "shape": list(t.weight.shape),
                             "dtype": str(t.weight.dtype).replace("torch.", "")}
                    for t in targets},
        "parameters": [[n, list(p.shape)] for n, p in model.named_parameters()],
    }


def _fingerprint_diff(saved: dict, current: dict) -> List[str]:
    diffs = []
    for k in ("class", "model_type"):
        if saved.get(k) != current.get(k):
            diffs.append(f"{k}: checkpoint {saved.get(k)!r}, model {current.get(k)!r}")
    sm, cm = saved.get("modules", {}), current.get("modules", {})
    for name, s in sm.items():
        c = cm.get(name)
        if c is None:
            diffs.append(f"module {name!r}: in the checkpoint, not an editable module of the model")
            continue
        for k in ("kind", "shape", "dtype"):
            if s.get(k) != c.get(k):
                diffs.append(f"module {name!r} {k}: checkpoint {s.get(k)}, model {c.get(k)}")
    sp = {n: s for n, s in saved.get("parameters", [])}
    cp = {n: s for n, s in current.get("parameters", [])}
    missing = [n for n in sp if n not in cp]
    extra = [n for n in cp if n not in sp]
    shapes = [f"{n} {sp[n]} -> {cp[n]}" for n in sp if n in cp and sp[n] != cp[n]]
    for what, items in (("parameters missing from the model", missing),
                        ("parameters not in the checkpoint's model", extra),
                        ("parameter shapes differ", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            diffs.append(f"{what}: {', '.join(items[:5])}{more}")
    return diffs


# ============================================================================ files
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms that cannot open a directory (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _sha256_file(path: str, fsync: bool = False) -> Tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb+" if fsync else "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return h.hexdigest(), size


def _write_bytes_atomic(directory: str, name: str, data: bytes) -> None:
    tmp = _tmp_name(directory, name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(directory)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class _DirLock:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCKFILE)
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process lock
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _encode_key(key):
    return list(key) if isinstance(key, tuple) else key


def _decode_key(key):
    return tuple(int(x) for x in key) if isinstance(key, list) else key


def _path(path, argument: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument}: expected a str or os.PathLike directory, got "
                        f"{type(path).__name__}")
    return os.fspath(path)


# ============================================================================ save
def save_editor(editor, path, undo_log: bool = True) -> str:
    """Write ``editor``'s lifelong state to the directory ``path`` (created if missing).
    Returns the path of the manifest. The caller holds the editor's lock."""
    from safetensors.torch import save_file
    import safetensors

    from . import __version__

    directory = _path(path)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"path: {directory!r} exists and is not a directory; a checkpoint is "
                         "a directory")
    os.makedirs(directory, exist_ok=True)

    tensors: Dict[str, torch.Tensor] = {}
    pool: Dict[int, int] = {}
    states_meta: List[dict] = []

    def put_state(state) -> int:
        j = pool.get(id(state))
        if j is None:
            j = pool[id(state)] = len(states_meta)
            states_meta.append({"d_in": state.d_in, "d_out": state.d_out, "n": int(state.n)})
            for part in ("mean", "acc", "std"):
                tensors[f"state.{j}.{part}"] = getattr(state, part).detach().to(
                    "cpu", torch.float32).contiguous()
        return j

    normalizers = [{"key": _encode_key(k), "state": put_state(s)}
                   for k, s in editor.normalizers.items()]
    log_meta = None
    log = editor._undo
    if undo_log and log is not None and len(log):
        records = []
        for name, w in log.base.items():
            tensors[f"undo.base.{name}"] = w.detach().to("cpu").contiguous()
        for r, rec in enumerate(log.turns):
            for name, a in rec.a.items():
                tensors[f"undo.{r}.a.{name}"] = a.contiguous()
            for i, kk in enumerate(rec.keys):
                tensors[f"undo.{r}.kk.{i}"] = kk.contiguous()
            records.append({
                "normalizers": [{"key": _encode_key(k), "state": put_state(s)}
                                for k, s in rec.states.items()],
                "kk": dict(rec.kk), "n_keys": len(rec.keys)})
        log_meta = {"base": list(log.base), "turns": records}

    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "versions": {"ultraedit_fast": __version__, "torch": torch.__version__,
                     "safetensors": getattr(safetensors, "__version__", None),
                     "python": sys.version.split()[0]},
        "turns": int(editor.turns),
        "config": {"modules": list(editor.module_names), "lr": float(editor.lr),
                   "batch_size": int(editor.batch_size),
                   "tokens_per_pass": int(editor.tokens_per_pass),
                   "share_normalizer": bool(editor.share_normalizer),
                   "backend": editor.backend_request, "transactional": bool(editor.transactional),
                   "undo": editor.undo, "preset": editor.preset},
        "fingerprint": fingerprint(editor.model, editor.targets),
        "weights_sample_sha256": weights_digest(editor.targets),
        "states": states_meta,
        "normalizers": normalizers,
        "undo_log": log_meta,
    }

    with _DirLock(directory):
        _remove_stale_tmp(directory)
        tmp = _tmp_name(directory, "state.safetensors")
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT})
            digest, size = _sha256_file(tmp, fsync=True)
            name = f"state-{digest[:16]}.safetensors"
            os.replace(tmp, os.path.join(directory, name))
        except BaseException:
            _unlink(tmp)
            raise
        _fsync_dir(directory)
        body["tensors"] = {"file": name, "sha256": digest, "bytes": size}
        body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
        _write_bytes_atomic(directory, MANIFEST,
                            json.dumps(body, indent=1, allow_nan=False).encode())
        # the new checkpoint is durable: drop tensor files no manifest names
        for f in os.listdir(directory):
            if _TENSOR_FILE.match(f) and f != name:
                _unlink(os.path.join(directory, f))
    return os.path.join(directory, MANIFEST)


def _remove_stale_tmp(directory: str) -> None:
    """Temporary files of writers that died (``kill -9``) mid-save."""
    for f in os.listdir(directory):
        m = _TMP_FILE.match(f)
        if m and not _pid_alive(int(m.group(1))):
            _unlink(os.path.join(directory, f))


# ============================================================================ load
def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: {why}")


def read_checkpoint(path) -> Tuple[dict, Dict[str, torch.Tensor], str]:
    """Parse and verify a checkpoint: ``(manifest, tensors on the CPU, directory)``.
    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` naming
    the file when it is not a whole, untampered checkpoint."""
    from safetensors.torch import load_file

    directory = _path(path)
    if os.path.isfile(directory) and os.path.basename(directory) == MANIFEST:
        directory = os.path.dirname(directory) or "."
    if not os.path.exists(directory):
        raise FileNotFoundError(f"path: no checkpoint at {directory!r}")
    if not os.path.isdir(directory):
        raise ValueError(f"path: {directory!r} is not a checkpoint directory written by "
                         "UltraEditor.save")
    mpath = os.path.join(directory, MANIFEST)
    if not os.path.isfile(mpath):
        raise _bad(mpath, "missing; not a checkpoint written by UltraEditor.save (or its "
                   "first save never completed)")
    if os.path.getsize(mpath) > _MAX_MANIFEST_BYTES:
        raise _bad(mpath, "too large to be a manifest")
    for attempt in range(3):  # a concurrent save may replace the manifest under us
        with open(mpath, "rb") as f:
            raw = f.read()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(mpath, f"not valid JSON ({e}); the manifest is truncated or "
                       "corrupt") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise _bad(mpath, f"not an ultraedit_fast checkpoint manifest (format "
                       f"{body.get('format') if isinstance(body, dict) else None!r})")
        version = body.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise _bad(mpath, f"format version {version!r}; this ultraedit_fast reads version "
                       f"{FORMAT_VERSION} and older: upgrade the package")
        claimed = body.pop("manifest_sha256", None)
        if claimed != hashlib.sha256(_canonical(body)).hexdigest():
            raise _bad(mpath, "hash mismatch: the manifest was modified or is corrupt")
        try:
            info = body["tensors"]
            fname, digest, size = info["file"], info["sha256"], info["bytes"]
        except (KeyError, TypeError):
            raise _bad(mpath, "names no tensor file") from None
        if not isinstance(fname, str) or not _TENSOR_FILE.match(fname):
            raise _bad(mpath, f"names an invalid tensor file {fname!r}")
        tpath = os.path.join(directory, fname)
        if not os.path.isfile(tpath):
            with open(mpath, "rb") as f:
                if f.read() != raw and attempt < 2:
                    continue  # a new checkpoint replaced this one while we read it
            raise _bad(tpath, "missing; the checkpoint is incomplete")
        actual = os.path.getsize(tpath)
        if actual != size:
            raise _bad(tpath, f"{actual} bytes, the manifest says {size}: the file is truncated "
                       "or was modified")
        if _sha256_file(tpath)[0] != digest:
            raise _bad(tpath, "sha256 hash mismatch with the manifest: the file was modified or "
                       "is corrupt")
        break
    try:
        tensors = load_file(tpath, device="cpu")
    except Exception as e:  # safetensors header / layout errors
        raise _bad(tpath, f"not a valid safetensors file ({e})") from None
    return body, tensors, directory


def load_editor(cls, path, model, tokenizer, overrides: dict):
    from .editor import NormalizerState

    for k in overrides:
        if k in _FIXED:
            raise ValueError(f"{k}: fixed by the checkpoint (its lifelong state depends on it) "
                             "and cannot be overridden on load")
        if k not in _OVERRIDABLE:
            raise TypeError(f"load() got an unexpected option {k!r}; options that may be "
                            f"overridden: {list(_OVERRIDABLE)}")
    body, tensors, directory = read_checkpoint(path)
    mpath = os.path.join(directory, MANIFEST)
    try:
        cfg = body["config"]
        kwargs = {k: cfg[k] for k in ("modules", "lr", "batch_size", "share_normalizer",
                                      "backend", "transactional", "undo")}
        if "tokens_per_pass" in cfg:  # absent from checkpoints of 0.1.0 (no packing then)
            kwargs["tokens_per_pass"] = cfg["tokens_per_pass"]
        turns = int(body["turns"])
        saved_fp = body["fingerprint"]
        states_meta = body["states"]
        normalizers = body["normalizers"]
        log_meta = body.get("undo_log")
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(mpath, f"incomplete manifest ({e!r})") from None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")

    # the model must be the checkpoint's: compare before building anything on it
    from .presets import module_kind

    class _T:  # a light stand-in for editor targets, to fingerprint the model
        def __init__(self, name, module, transposed):
            self.name, self.module, self.transposed = name, module, transposed
            self.weight = module.weight

    current_targets = []
    for name in kwargs["modules"]:
        try:
            current_targets.append(_T(name, *module_kind(model, name)))
        except (ValueError, TypeError):
            pass  # reported by the fingerprint diff
    diffs = _fingerprint_diff(saved_fp, fingerprint(model, current_targets))
    if diffs:
        raise ValueError(f"model: it is not the model the checkpoint {mpath} was saved from: "
                         + "; ".join(diffs))

    kwargs.update(overrides)
    editor = cls(model, tokenizer, **kwargs)
    if isinstance(cfg.get("preset"), str):
        editor.preset = cfg["preset"]
    if body.get("weights_sample_sha256") != weights_digest(editor.targets):
        warnings.warn(
            f"model: the weights of the edited modules differ from those the checkpoint "
            f"{mpath} was saved with; load the edited model's weights before the editor "
            "(the lifelong statistics continue from the saved model)",
            CheckpointWeightsWarning, stacklevel=3)

    def tensor(name, shape, dtype=torch.float32):
        t = tensors.get(name)
        if t is None:
            raise _bad(mpath, f"tensor {name!r} is missing from {body['tensors']['file']}")
        if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
            raise _bad(mpath, f"tensor {name!r} has shape {tuple(t.shape)} and dtype {t.dtype}, "
                       f"expected {tuple(shape)} and {dtype}")
        return t

    devices = {editor.normalizer_key(t): t.weight.device for t in reversed(editor.targets)}
    shapes = {editor.normalizer_key(t): t.shape for t in editor.targets}
    pool: Dict[int, object] = {}

    def get_state(j, key):
        if key not in shapes:
            raise _bad(mpath, f"normaliser key {key!r} is not one of this editor's "
                       f"{sorted(map(str, shapes))}")
        if not isinstance(j, int) or not 0 <= j < len(states_meta):
            raise _bad(mpath, f"state index {j!r} out of range")
        if j not in pool:
            m = states_meta[j]
            d_in, d_out, n = int(m["d_in"]), int(m["d_out"]), int(m["n"])
            if (d_in, d_out) != tuple(shapes[key]) or n < 0:
                raise _bad(mpath, f"state {j} has shape {(d_in, d_out)} and n={n}, expected "
                           f"{tuple(shapes[key])} for key {key!r}")
            parts = [tensor(f"state.{j}.{p}", (d_in + d_out,)).to(devices[key], copy=True)
                     for p in ("mean", "acc", "std")]
            pool[j] = NormalizerState(d_in, d_out, n, *parts)
        return pool[j]

    try:
        editor.normalizers = {_decode_key(e["key"]): get_state(e["state"], _decode_key(e["key"]))
                              for e in normalizers}
        editor.turns = turns
        if log_meta and editor._undo is not None:
            log = editor._undo
            by_name = {t.name: t for t in editor.targets}
            if sorted(log_meta["base"]) != sorted(by_name):
                raise _bad(mpath, "the undo log does not cover the edited modules")
            log.base = {}
            for name, t in by_name.items():
                w = t.weight
                log.base[name] = tensor(f"undo.base.{name}", w.shape, w.dtype)
            for r, rm in enumerate(log_meta["turns"]):
                rec = _Turn({_decode_key(e["key"]): get_state(e["state"], _decode_key(e["key"]))
                             for e in rm["normalizers"]}, {}, {})
                n_keys = int(rm["n_keys"])
                rec.keys = [tensors[f"undo.{r}.kk.{i}"] for i in range(n_keys)]
                for name, t in by_name.items():
                    i = rm["kk"][name]
                    if i is not None and not (isinstance(i, int) and 0 <= i < n_keys):
                        raise _bad(mpath, f"undo turn {r}: bad key index {i!r}")
                    d_in, d_out = t.shape
                    rows = d_in if i is None else rec.keys[i].shape[0]
                    a = tensor(f"undo.{r}.a.{name}", (rows, d_out))
                    if i is not None:
                        tensor(f"undo.{r}.kk.{i}", (rows, d_in))
                    rec.a[name], rec.kk[name] = a, i
                log.turns.append(rec)
            if len(log.turns) > turns:
                raise _bad(mpath, f"the undo log holds {len(log.turns)} turns, more than the "
                           f"{turns} turns made")
            log.trim(editor)
    except (KeyError, TypeError) as e:
        raise _bad(mpath, f"inconsistent manifest ({e!r})") from None
    return editor
