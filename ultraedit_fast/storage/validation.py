"""How every artefact the package reads back is validated, in one place: the checkpoint
(:mod:`.checkpoint`), the weight patch and the LoRA adapter (:mod:`.export`) alike.

- **regular files only** (:func:`read_artefact`): a FIFO, a device or a directory in place
  of a file is refused on the open descriptor, never read (it could block or never end);
- **a schema for each manifest** (:func:`parse_json`, :func:`check_format`,
  :func:`check_fields`): the format name, ``format_version`` an int (not a bool) from 1 to
  the version this package writes, and each required field present with the right type;
- **a sha256 of each tensor's bytes** (:func:`check_tensors`, with
  :func:`~.fingerprint.weight_sha256`: dtype and shape included), every recorded tensor
  present and no other.

Every refusal is a ``ValueError`` naming the file and the field, tensor or module; readers
check everything before they build or write anything."""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch

from ..utils.files import read_regular_file
from .fingerprint import weight_sha256

MAX_MANIFEST_BYTES = 256 << 20
MAX_COUNT = 2**53  # turns and rows: more than any run makes, exact in a float
SHA256 = re.compile(r"[0-9a-f]{64}")
Check = Callable[[str, str, Any], None]  # (file, field, value); ValueError when bad


def bad(path: str, why: str) -> ValueError:
    """The error for a file that is not what it should be."""
    return ValueError(f"{path}: {why}")


def field_error(path: str, name: str, expected: str, value) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return bad(path, f"field {name!r}: expected {expected}, got {shown}")


# ============================================================================ files
def read_artefact(path: str, what: str, limit: Optional[int] = None) -> bytes:
    """The bytes of ``path``, a regular file of the artefact ``what`` (a FIFO, a device or a
    directory is refused without being read); ``ValueError`` naming it otherwise."""
    try:
        return read_regular_file(path, what, limit)
    except (FileNotFoundError, NotADirectoryError):
        raise bad(path, f"missing; not a whole {what} written by ultraedit_fast") from None
    except PermissionError:
        raise bad(path, f"permission denied (cannot read the {what})") from None


def read_tensors(path: str, what: str) -> Dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (a regular file), on the CPU."""
    from safetensors.torch import load as from_bytes

    data = read_artefact(path, what)
    try:
        return from_bytes(data)
    except Exception as e:  # safetensors header / layout errors
        raise bad(path, f"not a valid safetensors file ({e})") from None


def check_tensors(
    path: str, tensors: Mapping[str, torch.Tensor], hashes: Mapping[str, str], finite=False
) -> None:
    """``tensors`` (read from ``path``) are those ``hashes`` records, no more and no fewer,
    each with the recorded :func:`weight_sha256` (and finite values, when ``finite``)."""
    extra = sorted(set(tensors) - set(hashes))
    if extra:
        raise bad(path, f"tensor {extra[0]!r} is not recorded by the manifest (an altered file)")
    for name, sha in hashes.items():
        t = tensors.get(name)
        if t is None:
            raise bad(path, f"tensor {name!r} is missing (a corrupt or altered file)")
        if weight_sha256(t) != sha:
            raise bad(
                path,
                f"tensor {name!r} does not match its recorded sha256 (dtype, shape and "
                "bytes): the file is corrupt or was altered",
            )
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad(path, f"tensor {name!r} holds values that are not finite (NaN or inf)")


# ============================================================================ manifests
def parse_json(path: str, raw: bytes, what: str):
    """The JSON document in ``raw`` (``ValueError`` naming ``path`` when it is not JSON)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(path, f"not valid JSON ({e}); the {what} is truncated or corrupt") from None
    except RecursionError:
        raise bad(path, f"not a {what}: its JSON is nested too deeply") from None


def check_format(path: str, body, fmt: str, version: int, what: str) -> dict:
    """``body`` as a JSON object of the format ``fmt``, its ``format_version`` an int (not a
    bool) from 1 to ``version``, the newest this package reads."""
    if not isinstance(body, dict) or body.get("format") != fmt:
        found = body.get("format") if isinstance(body, dict) else None
        raise bad(path, f"not an ultraedit_fast {what} (format {found!r})")
    v = body.get("format_version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise field_error(path, "format_version", f"an int from 1 to {version}", v)
    if v > version:
        raise bad(
            path,
            f"field 'format_version': {v}; this ultraedit_fast reads version {version} "
            "and older: upgrade the package",
        )
    return body


def check_fields(path: str, body: dict, schema: Mapping[str, Check]) -> dict:
    """Each field of ``schema`` (``"a.b"``: field ``b`` of the object ``a``) present in
    ``body`` and passing its check; ``ValueError`` naming the first that is not."""
    for name, check in schema.items():
        node = body
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise bad(path, f"field {name!r}: missing")
            node = node[part]
        check(path, name, node)
    return body


def read_manifest(
    path: str, what: str, fmt: str, version: int, schema: Mapping[str, Check]
) -> dict:
    """A JSON manifest read from a regular file, its format and schema checked."""
    body = parse_json(path, read_artefact(path, what, MAX_MANIFEST_BYTES), what)
    return check_fields(path, check_format(path, body, fmt, version, what), schema)


def check_names(path: str, name: str, found: Iterable[str], expected: Iterable[str]) -> None:
    """The keys of field ``name`` are the ``expected`` names, no more and no fewer."""
    found, expected = set(found), set(expected)
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        raise bad(path, f"field {name!r}: {missing[0]!r} is missing (an altered file)")
    if extra:
        raise bad(
            path, f"field {name!r}: {extra[0]!r} is not one of the artefact's (an altered file)"
        )


# ============================================================================ field checks
def is_object(path: str, name: str, v) -> None:
    if not isinstance(v, dict):
        raise field_error(path, name, "an object", v)


def is_list(path: str, name: str, v) -> None:
    if not isinstance(v, list):
        raise field_error(path, name, "a list", v)


def count(path: str, name: str, v, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= MAX_COUNT:
        raise field_error(path, name, f"an int in [{low}, 2**53]", v)
    return v


def sha256(path: str, name: str, v) -> None:
    if not isinstance(v, str) or not SHA256.fullmatch(v):
        raise field_error(path, name, "a sha256 (64 hex digits)", v)


def sha256_map(path: str, name: str, v) -> None:
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(h, str) and SHA256.fullmatch(h) for k, h in v.items()
    ):
        raise field_error(path, name, "an object of module -> sha256", v)


def fingerprint_field(path: str, name: str, fp) -> None:
    """A model fingerprint (:func:`~.fingerprint.fingerprint`): its modules and parameters."""
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
        raise field_error(path, name, "an object with 'modules' and 'parameters'", fp)
