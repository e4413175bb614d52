"""What identifies the model a checkpoint, a patch or an adapter was made for: its
architecture, every parameter's name and shape, each edited module's kind, shape and dtype
(:func:`fingerprint`), a cheap hash of the edited weights (:func:`weights_digest`), the
differences between two fingerprints, one line each (:func:`fingerprint_diff`), and the sha256
of one weight's bytes with its dtype and shape (:func:`weight_sha256`: patches and adapters
record it for every tensor they hold)."""

from __future__ import annotations

import hashlib
from typing import List

import torch

_SAMPLE = 4096  # elements of each edited weight hashed into the fingerprint


def weight_sha256(w: torch.Tensor) -> str:
    """sha256 of a weight's bytes in its own dtype, with its shape and dtype."""
    t = w.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
        "modules": {
            t.name: {
                "kind": t.kind,
                "shape": list(t.weight.shape),
                "dtype": str(t.weight.dtype).replace("torch.", ""),
            }
            for t in targets
        },
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
    for what, items in (
        ("parameters missing from the model", missing),
        ("parameters not in the checkpoint's model", extra),
        ("parameter shapes differ", shapes),
    ):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            diffs.append(f"{what}: {', '.join(items[:5])}{more}")
    return diffs
