"""A checkpoint's ``manifest.json``: its schema (:func:`manifest_body` builds it, signed with
a sha256 of its canonical JSON), and the reader's side, the JSON parsed and every field the
reader uses validated (:func:`parse_manifest`: one ``ValueError`` naming the file and the
field) with the checks every artefact's reader shares (:mod:`.validation`)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from typing import Any, List, Mapping, Optional

import torch

from .._version import __version__
from .validation import (
    MAX_COUNT,
    bad,
    check_fields,
    check_format,
    count,
    field_error,
    fingerprint_field,
    is_list,
    is_object,
    parse_json,
    sha256,
    sha256_map,
)

FORMAT = "ultraedit_fast.editors.ultraedit-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSOR_FILE = re.compile(r"^state-[0-9a-f]{16}\.safetensors$")


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
    body = parse_json(mpath, raw, "manifest")
    check_format(mpath, body, FORMAT, FORMAT_VERSION, "checkpoint manifest")
    claimed = body.pop("manifest_sha256", None)
    if claimed != hashlib.sha256(canonical(body)).hexdigest():
        raise bad(mpath, "hash mismatch: the manifest was modified or is corrupt")
    validate(mpath, body)
    return body


def validate(mpath: str, body: dict) -> None:
    """Check every field of a (signed, parsed) manifest that the reader uses, in the order
    the reader meets them; ``ValueError`` naming the first bad one."""
    check_fields(mpath, body, _FIELDS)
    turns = body["turns"]
    n_states = _check_states(mpath, body["states"], turns)
    sha256_map(mpath, "base_weights_sha256", body.get("base_weights_sha256", {}))
    _check_tensor_parallel(mpath, body.get("tensor_parallel"))
    normalizers = _check_entries(mpath, "normalizers", body["normalizers"], n_states)
    if turns and not normalizers:
        raise bad(mpath, f"field 'normalizers': empty after {turns} turns")
    _check_undo_log(mpath, body.get("undo_log"), turns, n_states)


def _key_ok(k) -> bool:
    return isinstance(k, str) or (
        isinstance(k, list)
        and len(k) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_COUNT for x in k)
    )


def _check_tensor_file(mpath: str, name: str, info) -> None:
    if not isinstance(info, dict):
        raise field_error(mpath, name, "an object naming the tensor file", info)
    fname = info.get("file")
    if not isinstance(fname, str) or not TENSOR_FILE.match(fname):
        raise bad(mpath, f"names an invalid tensor file {fname!r}")
    sha256(mpath, f"{name}.sha256", info.get("sha256"))
    count(mpath, f"{name}.bytes", info.get("bytes"))


# the fields every checkpoint manifest has, and their types (the reader checks the rest)
_FIELDS = {
    "tensors": _check_tensor_file,
    "turns": count,
    "config": is_object,
    "fingerprint": fingerprint_field,
    "weights_sample_sha256": sha256,
    "states": is_list,
    "normalizers": is_list,
}


def _check_states(mpath: str, states: list, turns: int) -> int:
    """The normaliser states' shapes and row counts; returns how many there are."""
    for j, m in enumerate(states):
        if not isinstance(m, dict):
            raise field_error(mpath, f"states[{j}]", "an object", m)
        count(mpath, f"states[{j}].d_in", m.get("d_in"), 1)
        count(mpath, f"states[{j}].d_out", m.get("d_out"), 1)
        n = count(mpath, f"states[{j}].n", m.get("n"))
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
        raise field_error(mpath, name, "a list", value)
    for i, e in enumerate(value):
        if not isinstance(e, dict) or not _key_ok(e.get("key")):
            raise field_error(
                mpath,
                f"{name}[{i}]",
                "an object with a normaliser key (a module name or [d_in, d_out])",
                e,
            )
        st = e.get("state")
        if isinstance(st, bool) or not isinstance(st, int) or not 0 <= st < n_states:
            raise field_error(
                mpath, f"{name}[{i}].state", f"an index into 'states' (0..{n_states - 1})", st
            )
    return value


def _check_tensor_parallel(mpath: str, tp) -> None:
    if tp is not None and not (
        isinstance(tp, dict)
        and set(tp) == {"world", "rank"}
        and all(isinstance(tp[k], int) and not isinstance(tp[k], bool) for k in tp)
        and 0 <= tp["rank"] < tp["world"]
    ):
        raise field_error(mpath, "tensor_parallel", "null or {world, rank}", tp)


def _check_undo_log(mpath: str, log, turns: int, n_states: int) -> None:
    if log is None:
        return
    if (
        not isinstance(log, dict)
        or not isinstance(log.get("base"), list)
        or not isinstance(log.get("turns"), list)
    ):
        raise field_error(mpath, "undo_log", "null or an object with 'base' and 'turns'", log)
    if len(log["turns"]) > turns:
        raise bad(
            mpath, f"the undo log holds {len(log['turns'])} turns, more than the {turns} turns made"
        )
    for r, rec in enumerate(log["turns"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("kk"), dict):
            raise field_error(mpath, f"undo_log.turns[{r}]", "an object", rec)
        count(mpath, f"undo_log.turns[{r}].n_keys", rec.get("n_keys"))
        _check_entries(mpath, f"undo_log.turns[{r}].normalizers", rec.get("normalizers"), n_states)
