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
``load`` checks the tensor file's size and sha256 against the manifest before it
parses it. One writer per directory at a time: ``save`` holds an exclusive
``flock`` on ``<dir>/.lock`` (Linux/macOS) while it writes, and removes the
temporary files of writers that died (their pid is gone). A ``load`` that races a
``save`` and finds its tensor file already replaced reads the new manifest again.

"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .._version import __version__
from ..core.config import EditorConfig
from ..core.normalizer import NormalizerState

FORMAT = "ultraedit_fast.editors.ultraedit-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCKFILE = ".lock"
_TENSOR_FILE = re.compile(r"^state-[0-9a-f]{16}\.safetensors$")
_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")
_FOREIGN_TMP_FILE = re.compile(r"^\.tmp[A-Za-z0-9_]{6,}$")
_MAX_MANIFEST_BYTES = 256 << 20
_SAMPLE = 4096  # elements of each edited weight hashed into the fingerprint


class CheckpointWeightsWarning(UserWarning):
    """The model's edited weights differ from those the checkpoint was saved with."""


# ============================================================================ fingerprint
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
    """Architecture class and ``model_type``, each edited module's kind, shape and dtype,
    and every parameter's name and shape: what must match for a checkpoint to apply."""
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "modules": {t.name: {"kind": t.kind, "shape": list(t.weight.shape),
                             "dtype": str(t.weight.dtype).replace("torch.", "")}
                    for t in targets},
        "parameters": [[n, list(p.shape)] for n, p in model.named_parameters()],
    }


def fingerprint_diff(saved: dict, current: dict) -> List[str]:
    """What differs between two fingerprints, one line per difference."""
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
def write_checkpoint(path, *, config: Mapping[str, Any], preset: Optional[str], turns: int,
                     normalizers: Mapping[object, NormalizerState], fingerprint: dict,
                     weights_sample_sha256: str, undo: Optional[dict] = None,
                     base_sha256: Optional[Mapping[str, str]] = None,
                     tensor_parallel: Optional[Mapping[str, int]] = None) -> str:
    """Write a checkpoint to the directory ``path`` (created if missing), atomically.

    ``config``: the editor's options (:meth:`EditorConfig.to_dict`), ``normalizers``:
    normaliser key -> state, ``undo``: :meth:`UndoLog.export`'s data or ``None``.
    Returns the path of the manifest. One writer per directory: the caller's process
    holds the directory's lock while this runs."""
    import safetensors
    from safetensors.torch import save as to_bytes

    directory = _checked_directory(path)

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

    entries = [{"key": _encode_key(k), "state": put_state(s)} for k, s in normalizers.items()]
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
            records.append({
                "normalizers": [{"key": _encode_key(k), "state": put_state(s)}
                                for k, s in rec["states"].items()],
                "kk": dict(rec["kk"]), "n_keys": len(rec["keys"])})
        log_meta = {"base": list(undo["base"]), "turns": records}

    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "versions": {"ultraedit_fast": __version__, "torch": torch.__version__,
                     "safetensors": getattr(safetensors, "__version__", None),
                     "python": sys.version.split()[0]},
        "turns": int(turns),
        "config": {**dict(config), "preset": preset},
        "fingerprint": fingerprint,
        "weights_sample_sha256": weights_sample_sha256,
        "base_weights_sha256": dict(base_sha256 or {}),
        "tensor_parallel": dict(tensor_parallel) if tensor_parallel else None,
        "states": states_meta,
        "normalizers": entries,
        "undo_log": log_meta,
    }

    data = to_bytes(tensors, metadata={"format": FORMAT})
    digest, size = hashlib.sha256(data).hexdigest(), len(data)
    tensors.clear()  # the bytes hold them now
    with _DirLock(directory):
        _remove_stale_tmp(directory)
        name = f"state-{digest[:16]}.safetensors"
        # our own temporary name (the writer's pid in it, so a dead writer's is cleaned):
        # the file gets the umask's mode, and a kill leaves nothing we cannot find
        _write_bytes_atomic(directory, name, data)
        del data
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
    """Temporary files of writers that died (``kill -9``) mid-save: ours (their pid is gone)
    and those safetensors' own writer left in versions that let it write the tensor file
    (``.tmpXXXXXX``, older than a minute: the directory lock keeps writers out)."""
    now = time.time()
    for f in os.listdir(directory):
        full = os.path.join(directory, f)
        m = _TMP_FILE.match(f)
        if m and not _pid_alive(int(m.group(1))):
            _unlink(full)
        elif _FOREIGN_TMP_FILE.match(f):
            try:
                if now - os.stat(full).st_mtime > 60:
                    _unlink(full)
            except OSError:
                pass


def _checked_directory(path) -> str:
    """``path`` as a checkpoint directory to write into, created if missing; ``ValueError``
    naming it when it cannot be one."""
    directory = _path(path)
    if os.path.lexists(directory) and not os.path.exists(directory):
        raise ValueError(f"path: {directory!r} is a symbolic link that leads nowhere (broken, "
                         "or a loop); a checkpoint is a directory")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"path: {directory!r} exists and is not a directory; a checkpoint is "
                         "a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"path: cannot create the checkpoint directory {directory!r}: "
                         f"{e.strerror or e}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"path: {directory!r}: permission denied (cannot write there)")
    return directory


# ============================================================================ load
def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: {why}")


def _read_bytes(path: str, limit: Optional[int] = None) -> bytes:
    with open(path, "rb") as f:
        return f.read() if limit is None else f.read(limit + 1)


_RETRIES = 50  # a load that keeps racing saves tries this many times (a few seconds)


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

    directory = _path(path)
    if os.path.isfile(directory) and os.path.basename(directory) == MANIFEST:
        directory = os.path.dirname(directory) or "."
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no checkpoint at {directory!r}") from None
    except PermissionError:
        raise ValueError(f"path: {directory!r}: permission denied (cannot read it)") from None
    if not os.path.isdir(directory):
        raise ValueError(f"path: {directory!r} is not a checkpoint directory written by "
                         "UltraEditor.save")
    del st
    mpath = os.path.join(directory, MANIFEST)
    last_error: Optional[ValueError] = None
    for attempt in range(_RETRIES):
        if attempt:
            time.sleep(min(0.2, 0.005 * 2 ** min(attempt, 6)))
        try:
            raw = _read_bytes(mpath, _MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise _bad(mpath, "missing; not a checkpoint written by UltraEditor.save (or its "
                       "first save never completed)") from None
        except PermissionError:
            raise _bad(mpath, "permission denied (cannot read the manifest)") from None
        except IsADirectoryError:
            raise _bad(mpath, "is a directory, not a manifest") from None
        if len(raw) > _MAX_MANIFEST_BYTES:
            raise _bad(mpath, "too large to be a manifest")
        body = _parse_manifest(mpath, raw)
        info = body["tensors"]
        fname, digest, size = info["file"], info["sha256"], info["bytes"]
        tpath = os.path.join(directory, fname)
        try:
            data = _read_bytes(tpath)
        except FileNotFoundError:
            last_error = _bad(tpath, "missing; the checkpoint is incomplete")
            if _changed(mpath, raw):
                continue  # a new checkpoint replaced this one while we read it
            raise last_error from None
        except PermissionError:
            raise _bad(tpath, "permission denied (cannot read the tensor file)") from None
        if len(data) != size:
            last_error = _bad(tpath, f"{len(data)} bytes, the manifest says {size}: the file is "
                              "truncated or was modified")
        elif hashlib.sha256(data).hexdigest() != digest:
            last_error = _bad(tpath, "sha256 hash mismatch with the manifest: the file was "
                              "modified or is corrupt")
        else:
            try:
                tensors = from_bytes(data)
            except Exception as e:  # safetensors header / layout errors
                raise _bad(tpath, f"not a valid safetensors file ({e})") from None
            return body, tensors, directory
        if not _changed(mpath, raw):
            raise last_error
    raise last_error if last_error is not None else _bad(mpath, "kept changing while read")


def _changed(mpath: str, raw: bytes) -> bool:
    try:
        return _read_bytes(mpath, _MAX_MANIFEST_BYTES) != raw
    except OSError:
        return True


def _parse_manifest(mpath: str, raw: bytes) -> dict:
    """The manifest's JSON, its format, version and self-hash checked, and every field the
    reader uses validated (one ``ValueError`` naming the file and the field)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(mpath, f"not valid JSON ({e}); the manifest is truncated or "
                   "corrupt") from None
    except RecursionError:
        raise _bad(mpath, "not a manifest: its JSON is nested too deeply") from None
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
    _validate(mpath, body)
    return body


_MAX_COUNT = 2 ** 53  # turns and rows: more than any run makes, exact in a float


def _field_error(mpath, name, expected, value) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return _bad(mpath, f"field {name!r}: expected {expected}, got {shown}")


def _count(mpath, name, v, low=0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= _MAX_COUNT:
        raise _field_error(mpath, name, f"an int in [{low}, 2**53]", v)
    return v


def _key_ok(k) -> bool:
    return isinstance(k, str) or (isinstance(k, list) and len(k) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 < x <= _MAX_COUNT for x in k))


def _validate(mpath: str, body: dict) -> None:
    info = body.get("tensors")
    if not isinstance(info, dict):
        raise _field_error(mpath, "tensors", "an object naming the tensor file", info)
    fname = info.get("file")
    if not isinstance(fname, str) or not _TENSOR_FILE.match(fname):
        raise _bad(mpath, f"names an invalid tensor file {fname!r}")
    if not isinstance(info.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}",
                                                                    info["sha256"]):
        raise _field_error(mpath, "tensors.sha256", "64 hex digits", info.get("sha256"))
    _count(mpath, "tensors.bytes", info.get("bytes"))
    turns = _count(mpath, "turns", body.get("turns"))
    cfg = body.get("config")
    if not isinstance(cfg, dict):
        raise _field_error(mpath, "config", "an object", cfg)
    fp = body.get("fingerprint")
    if not isinstance(fp, dict) or not isinstance(fp.get("modules"), dict) or \
            not isinstance(fp.get("parameters"), list) or \
            not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                    and isinstance(p[1], list) for p in fp["parameters"]) or \
            not all(isinstance(m, dict) for m in fp["modules"].values()):
        raise _field_error(mpath, "fingerprint", "an object with 'modules' and 'parameters'",
                           fp)
    states = body.get("states")
    if not isinstance(states, list):
        raise _field_error(mpath, "states", "a list", states)
    for j, m in enumerate(states):
        if not isinstance(m, dict):
            raise _field_error(mpath, f"states[{j}]", "an object", m)
        _count(mpath, f"states[{j}].d_in", m.get("d_in"), 1)
        _count(mpath, f"states[{j}].d_out", m.get("d_out"), 1)
        n = _count(mpath, f"states[{j}].n", m.get("n"))
        if turns and n < 1:
            raise _bad(mpath, f"field 'states[{j}].n': {n} rows after {turns} turns (every "
                       "turn adds rows to every normaliser)")

    def entries(name, value):
        if not isinstance(value, list):
            raise _field_error(mpath, name, "a list", value)
        for i, e in enumerate(value):
            if not isinstance(e, dict) or not _key_ok(e.get("key")):
                raise _field_error(mpath, f"{name}[{i}]", "an object with a normaliser key "
                                   "(a module name or [d_in, d_out])", e)
            st = e.get("state")
            if isinstance(st, bool) or not isinstance(st, int) or not 0 <= st < len(states):
                raise _field_error(mpath, f"{name}[{i}].state",
                                   f"an index into 'states' (0..{len(states) - 1})", st)
        return value

    base = body.get("base_weights_sha256", {})
    if not isinstance(base, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
            for k, v in base.items()):
        raise _field_error(mpath, "base_weights_sha256", "an object of module -> sha256", base)
    tp = body.get("tensor_parallel")
    if tp is not None and not (isinstance(tp, dict) and set(tp) == {"world", "rank"} and all(
            isinstance(tp[k], int) and not isinstance(tp[k], bool) for k in tp)
            and 0 <= tp["rank"] < tp["world"]):
        raise _field_error(mpath, "tensor_parallel", "null or {world, rank}", tp)
    normalizers = entries("normalizers", body.get("normalizers"))
    if turns and not normalizers:
        raise _bad(mpath, f"field 'normalizers': empty after {turns} turns")
    log = body.get("undo_log")
    if log is not None:
        if not isinstance(log, dict) or not isinstance(log.get("base"), list) or \
                not isinstance(log.get("turns"), list):
            raise _field_error(mpath, "undo_log", "null or an object with 'base' and 'turns'",
                               log)
        if len(log["turns"]) > turns:
            raise _bad(mpath, f"the undo log holds {len(log['turns'])} turns, more than the "
                       f"{turns} turns made")
        for r, rec in enumerate(log["turns"]):
            if not isinstance(rec, dict) or not isinstance(rec.get("kk"), dict):
                raise _field_error(mpath, f"undo_log.turns[{r}]", "an object", rec)
            _count(mpath, f"undo_log.turns[{r}].n_keys", rec.get("n_keys"))
            entries(f"undo_log.turns[{r}].normalizers", rec.get("normalizers"))


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
            raise _bad(self.manifest_path, f"tensor {name!r} is missing from "
                       f"{self._body['tensors']['file']}")
        if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
            raise _bad(self.manifest_path, f"tensor {name!r} has shape {tuple(t.shape)} and "
                       f"dtype {t.dtype}, expected {tuple(shape)} and {dtype}")
        return t

    def _state(self, j, key, shapes, devices) -> NormalizerState:
        states_meta = self._body["states"]
        if key not in shapes:
            raise _bad(self.manifest_path, f"normaliser key {key!r} is not one of this "
                       f"editor's {sorted(map(str, shapes))}")
        if not isinstance(j, int) or not 0 <= j < len(states_meta):
            raise _bad(self.manifest_path, f"state index {j!r} out of range")
        if j not in self._pool:
            m = states_meta[j]
            d_in, d_out, n = int(m["d_in"]), int(m["d_out"]), int(m["n"])
            if (d_in, d_out) != tuple(shapes[key]) or n < 0:
                raise _bad(self.manifest_path, f"state {j} has shape {(d_in, d_out)} and "
                           f"n={n}, expected {tuple(shapes[key])} for key {key!r}")
            parts = [self._tensor(f"state.{j}.{p}", (d_in + d_out,)).to(devices[key], copy=True)
                     for p in ("mean", "acc", "std")]
            self._pool[j] = NormalizerState(d_in, d_out, n, *parts)
        return self._pool[j]

    def _states(self, entries, shapes, devices) -> Dict[object, NormalizerState]:
        return {_decode_key(e["key"]): self._state(e["state"], _decode_key(e["key"]), shapes,
                                                   devices) for e in entries}

    def normalizers(self, shapes: Mapping[object, Tuple[int, int]],
                    devices: Mapping[object, torch.device]) -> Dict[object, NormalizerState]:
        """The lifelong states, keyed as the editor keys them; ``shapes``/``devices``: per
        normaliser key, the ``(d_in, d_out)`` it must have and the device it goes to."""
        try:
            states = self._states(self._body["normalizers"], shapes, devices)
        except (KeyError, TypeError) as e:
            raise _bad(self.manifest_path, f"inconsistent manifest ({e!r})") from None
        if self.turns and set(states) != set(shapes):
            missing = sorted(map(str, set(shapes) - set(states)))
            raise _bad(self.manifest_path, f"field 'normalizers': no state for {missing} "
                       f"after {self.turns} turns")
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
                raise _bad(self.manifest_path, "the undo log does not cover the edited modules")
            base = {name: self._tensor(f"undo.base.{name}", t.weight.shape, t.weight.dtype)
                    for name, t in by_name.items()}
            turns = []
            for r, rm in enumerate(log_meta["turns"]):
                n_keys = int(rm["n_keys"])
                keys = [self._tensors[f"undo.{r}.kk.{i}"] for i in range(n_keys)]
                rec = {"states": self._states(rm["normalizers"], shapes, devices), "a": {},
                       "kk": {}, "keys": keys}
                for name, t in by_name.items():
                    i = rm["kk"][name]
                    if i is not None and not (isinstance(i, int) and 0 <= i < n_keys):
                        raise _bad(self.manifest_path, f"undo turn {r}: bad key index {i!r}")
                    d_in, d_out = t.local_shape
                    rows = d_in if i is None else keys[i].shape[0]
                    rec["a"][name] = self._tensor(f"undo.{r}.a.{name}", (rows, d_out))
                    if i is not None:
                        self._tensor(f"undo.{r}.kk.{i}", (rows, d_in))
                    rec["kk"][name] = i
                turns.append(rec)
        except (KeyError, TypeError) as e:
            raise _bad(self.manifest_path, f"inconsistent manifest ({e!r})") from None
        if len(turns) > self.turns:
            raise _bad(self.manifest_path, f"the undo log holds {len(turns)} turns, more than "
                       f"the {self.turns} turns made")
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
            raise _bad(mpath, f"field 'config.{k}': missing")
    try:
        config = EditorConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise _bad(mpath, f"field 'config.{str(e).split(':')[0]}': {e}") from None
    if config.modules is None or config.lr is None:
        raise _bad(mpath, "field 'config': 'modules' and 'lr' must be set")
    return Checkpoint(mpath, config, preset if isinstance(preset, str) else None, turns,
                      saved_fp, body.get("weights_sample_sha256"),
                      dict(body.get("base_weights_sha256") or {}),
                      body.get("tensor_parallel"), body, tensors)
