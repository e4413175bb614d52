"""A checkpoint's ``manifest.json``: its schema (:func:`manifest_body` builds it, signed with
a sha256 of its canonical JSON), and the reader's side, the JSON parsed and every field the
reader uses validated (:func:`parse_manifest`: one ``ValueError`` naming the file and the
field)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from typing import Any, List, Mapping, Optional

import torch

from .._version import __version__

FORMAT = "ultraedit_fast.editors.ultraedit-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSOR_FILE = re.compile(r"^state-[0-9a-f]{16}\.safetensors$")
MAX_MANIFEST_BYTES = 256 << 20
_MAX_COUNT = 2**53  # turns and rows: more than any run makes, exact in a float
_SHA256 = r"[0-9a-f]{64}"


def bad(path: str, why: str) -> ValueError:
    """The error for a checkpoint file that is not what it should be."""
    return ValueError(f"{path}: {why}")


def canonical(body: dict) -> bytes:
    """The JSON the manifest's own sha256 is taken over (sorted keys, no spaces)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode_key(key):
    """A normaliser key as JSON: a module name, or ``(d_in, d_out)`` as a list."""
    return list(key) if isinstance(key, tuple) else key


def decode_key(key):
    return tuple(int(x) for x in key) if isinstance(key, list) else key


# ============================================================================ writing
def manifest_body(
    *,
    config: Mapping[str, Any],
    preset: Optional[str],
    turns: int,
    fingerprint: dict,
    weights_sample_sha256: str,
    base_sha256: Optional[Mapping[str, str]],
    tensor_parallel: Optional[Mapping[str, int]],
    states: List[dict],
    normalizers: List[dict],
    undo_log: Optional[dict],
) -> dict:
    """The manifest, but for the tensor file's name and hash (:func:`seal` adds them)."""
    import safetensors

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "versions": {
            "ultraedit_fast": __version__,
            "torch": torch.__version__,
            "safetensors": getattr(safetensors, "__version__", None),
            "python": sys.version.split()[0],
        },
        "turns": int(turns),
        "config": {**dict(config), "preset": preset},
        "fingerprint": fingerprint,
        "weights_sample_sha256": weights_sample_sha256,
        "base_weights_sha256": dict(base_sha256 or {}),
        "tensor_parallel": dict(tensor_parallel) if tensor_parallel else None,
        "states": states,
        "normalizers": normalizers,
        "undo_log": undo_log,
    }


def seal(body: dict, tensor_file: str, digest: str, size: int) -> bytes:
    """Name the tensor file in ``body``, sign it, and return the manifest file's bytes."""
    body["tensors"] = {"file": tensor_file, "sha256": digest, "bytes": size}
    body["manifest_sha256"] = hashlib.sha256(canonical(body)).hexdigest()
    return json.dumps(body, indent=1, allow_nan=False).encode()


# ============================================================================ reading
def parse_manifest(mpath: str, raw: bytes) -> dict:
    """The manifest's JSON, its format, version and self-hash checked, and every field the
    reader uses validated (one ``ValueError`` naming the file and the field)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(mpath, f"not valid JSON ({e}); the manifest is truncated or corrupt") from None
    except RecursionError:
        raise bad(mpath, "not a manifest: its JSON is nested too deeply") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise bad(
            mpath,
            f"not an ultraedit_fast checkpoint manifest (format "
            f"{body.get('format') if isinstance(body, dict) else None!r})",
        )
    version = body.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise bad(
            mpath,
            f"format version {version!r}; this ultraedit_fast reads version "
            f"{FORMAT_VERSION} and older: upgrade the package",
        )
    claimed = body.pop("manifest_sha256", None)
    if claimed != hashlib.sha256(canonical(body)).hexdigest():
        raise bad(mpath, "hash mismatch: the manifest was modified or is corrupt")
    validate(mpath, body)
    return body


def validate(mpath: str, body: dict) -> None:
    """Check every field of a (signed, parsed) manifest that the reader uses, in the order
    the reader meets them; ``ValueError`` naming the first bad one."""
    _check_tensor_file(mpath, body.get("tensors"))
    turns = _count(mpath, "turns", body.get("turns"))
    cfg = body.get("config")
    if not isinstance(cfg, dict):
        raise _field_error(mpath, "config", "an object", cfg)
    _check_fingerprint(mpath, body.get("fingerprint"))
    n_states = _check_states(mpath, body.get("states"), turns)
    _check_base_weights(mpath, body.get("base_weights_sha256", {}))
    _check_tensor_parallel(mpath, body.get("tensor_parallel"))
    normalizers = _check_entries(mpath, "normalizers", body.get("normalizers"), n_states)
    if turns and not normalizers:
        raise bad(mpath, f"field 'normalizers': empty after {turns} turns")
    _check_undo_log(mpath, body.get("undo_log"), turns, n_states)


def _field_error(mpath, name, expected, value) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return bad(mpath, f"field {name!r}: expected {expected}, got {shown}")


def _count(mpath, name, v, low=0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= _MAX_COUNT:
        raise _field_error(mpath, name, f"an int in [{low}, 2**53]", v)
    return v


def _key_ok(k) -> bool:
    return isinstance(k, str) or (
        isinstance(k, list)
        and len(k) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= _MAX_COUNT for x in k)
    )


def _check_tensor_file(mpath: str, info) -> None:
    if not isinstance(info, dict):
        raise _field_error(mpath, "tensors", "an object naming the tensor file", info)
    fname = info.get("file")
    if not isinstance(fname, str) or not TENSOR_FILE.match(fname):
        raise bad(mpath, f"names an invalid tensor file {fname!r}")
    if not isinstance(info.get("sha256"), str) or not re.fullmatch(_SHA256, info["sha256"]):
        raise _field_error(mpath, "tensors.sha256", "64 hex digits", info.get("sha256"))
    _count(mpath, "tensors.bytes", info.get("bytes"))


def _check_fingerprint(mpath: str, fp) -> None:
    if (
        not isinstance(fp, dict)
        or not isinstance(fp.get("modules"), dict)
        or not isinstance(fp.get("parameters"), list)
        or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list)
            for p in fp["parameters"]
        )
        or not all(isinstance(m, dict) for m in fp["modules"].values())
    ):
        raise _field_error(mpath, "fingerprint", "an object with 'modules' and 'parameters'", fp)


def _check_states(mpath: str, states, turns: int) -> int:
    """The normaliser states' shapes and row counts; returns how many there are."""
    if not isinstance(states, list):
        raise _field_error(mpath, "states", "a list", states)
    for j, m in enumerate(states):
        if not isinstance(m, dict):
            raise _field_error(mpath, f"states[{j}]", "an object", m)
        _count(mpath, f"states[{j}].d_in", m.get("d_in"), 1)
        _count(mpath, f"states[{j}].d_out", m.get("d_out"), 1)
        n = _count(mpath, f"states[{j}].n", m.get("n"))
        if turns and n < 1:
            raise bad(
                mpath,
                f"field 'states[{j}].n': {n} rows after {turns} turns (every "
                "turn adds rows to every normaliser)",
            )
    return len(states)


def _check_entries(mpath: str, name: str, value, n_states: int) -> list:
    """A list of ``{"key": normaliser key, "state": index into 'states'}``."""
    if not isinstance(value, list):
        raise _field_error(mpath, name, "a list", value)
    for i, e in enumerate(value):
        if not isinstance(e, dict) or not _key_ok(e.get("key")):
            raise _field_error(
                mpath,
                f"{name}[{i}]",
                "an object with a normaliser key (a module name or [d_in, d_out])",
                e,
            )
        st = e.get("state")
        if isinstance(st, bool) or not isinstance(st, int) or not 0 <= st < n_states:
            raise _field_error(
                mpath, f"{name}[{i}].state", f"an index into 'states' (0..{n_states - 1})", st
            )
    return value


def _check_base_weights(mpath: str, base) -> None:
    if not isinstance(base, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(_SHA256, v)
        for k, v in base.items()
    ):
        raise _field_error(mpath, "base_weights_sha256", "an object of module -> sha256", base)


def _check_tensor_parallel(mpath: str, tp) -> None:
    if tp is not None and not (
        isinstance(tp, dict)
        and set(tp) == {"world", "rank"}
        and all(isinstance(tp[k], int) and not isinstance(tp[k], bool) for k in tp)
        and 0 <= tp["rank"] < tp["world"]
    ):
        raise _field_error(mpath, "tensor_parallel", "null or {world, rank}", tp)


def _check_undo_log(mpath: str, log, turns: int, n_states: int) -> None:
    if log is None:
        return
    if (
        not isinstance(log, dict)
        or not isinstance(log.get("base"), list)
        or not isinstance(log.get("turns"), list)
    ):
        raise _field_error(mpath, "undo_log", "null or an object with 'base' and 'turns'", log)
    if len(log["turns"]) > turns:
        raise bad(
            mpath, f"the undo log holds {len(log['turns'])} turns, more than the {turns} turns made"
        )
    for r, rec in enumerate(log["turns"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("kk"), dict):
            raise _field_error(mpath, f"undo_log.turns[{r}]", "an object", rec)
        _count(mpath, f"undo_log.turns[{r}].n_keys", rec.get("n_keys"))
        _check_entries(mpath, f"undo_log.turns[{r}].normalizers", rec.get("normalizers"), n_states)
