"""The one place that chooses which kernels a turn runs.

Backends: ``torch`` (the pure-PyTorch default kernels), ``cpp`` (compiled CPU
kernels), ``cuda`` (compiled CUDA kernels), ``triton`` (Triton kernels; on the
CPU only under ``TRITON_INTERPRET=1``, for testing).  ``auto`` picks the fastest
available for the device.  The choice comes from the ``backend=`` argument or,
when that is ``None``, the environment variable ``ULTRAEDIT_FAST_BACKEND``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import ops

from .._log import log

BACKENDS = ("auto", "cuda", "triton", "cpp", "torch")
ENV_VAR = "ULTRAEDIT_FAST_BACKEND"


@dataclass(frozen=True)
class Backend:
    """Kernels for the three hot steps, and the finiteness check of shifted weights;
    signatures as in :mod:`ultraedit_fast.kernels.ops`."""

    name: str
    normalizer_update_: Callable
    shift_values: Callable
    rank_update_: Callable
    all_finite: Callable


def _torch_backend() -> Backend:
    return Backend(
        "torch",
        ops.normalizer_update_default,
        ops.shift_values_default,
        ops.rank_update_default,
        ops.all_finite_default,
    )


def _compiled_backend(name: str) -> Backend:
    t = torch.ops.ultraedit_fast
    return Backend(
        name,
        t.normalizer_update_.default,
        t.shift_values.default,
        t.rank_update_.default,
        t.all_finite.default,
    )


def _triton_available(device: torch.device) -> Optional[str]:
    """None when Triton kernels can run on ``device``, else the reason they cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to interpret them on {device.type})"


def _triton_backend() -> Backend:
    from . import triton_kernels as tk

    # the finiteness check: torch's on CUDA (one fused reduction; bandwidth-bound)
    return Backend(
        "triton", tk.normalizer_update_, tk.shift_values, tk.rank_update_, ops.all_finite_default
    )


def _missing(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else what is missing and how to get it."""
    if name == "torch":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the 'cpp' backend runs on the CPU, not on {device.type}"
        if not all(ops.has_kernel(o, "CPU") for o in ops.OP_NAMES):
            return f"the compiled CPU kernels are missing ({ops.extension_error()})"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA devices, not on {device.type}"
        if not all(ops.has_kernel(o, "CUDA") for o in ops.OP_NAMES):
            why = ops.extension_error() or "the kernels were compiled without CUDA"
            return (
                f"the CUDA kernels are not available ({why}); they need a CUDA build of "
                "torch and nvcc (and no ULTRAEDIT_FAST_SKIP_CUDA=1)"
            )
        return None
    if name == "triton":
        reason = _triton_available(device)
        if reason is None:
            try:
                from . import triton_kernels  # noqa: F401
            except ImportError as e:
                reason = f"the Triton kernels failed to import: {e}"
        return reason
    raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {name!r}")


# Preference of ``auto`` per device type, fastest first.  CPU: ``cpp`` beats the
# default kernels (benchmarks/bench_ops.py, 2-core CPU).  CUDA: the order
# ``cuda`` then ``triton`` is UNMEASURED (no GPU was available when the kernels
# were written); run benchmarks/bench_ops.py on a GPU and reorder if needed.
_AUTO_ORDER: Dict[str, List[str]] = {"cuda": ["cuda", "triton", "torch"], "cpu": ["cpp", "torch"]}


def requested_backend(backend: Optional[str]) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        src = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{src}: expected one of {list(BACKENDS)}, got {name!r}")
    return name.lower()


def resolve_backend(backend: Optional[str], device) -> Backend:
    """The kernels to use on ``device`` for ``backend`` (``None``: the environment variable,
    else ``auto``).  An explicitly requested backend that cannot run raises ``ValueError``
    saying what is missing."""
    device = torch.device(device)
    name = requested_backend(backend)
    if name == "auto":
        skipped = []
        for cand in _AUTO_ORDER.get(device.type, ["torch"]):
            reason = _missing(cand, device)
            if reason is None:
                name = cand
                break
            skipped.append(f"{cand}: {reason}")
        else:
            name = "torch"
        _log_choice(device, name, skipped)
    else:
        reason = _missing(name, device)
        if reason is not None:
            raise ValueError(f"backend={name!r} is not available: {reason}")
    if name == "torch":
        return _torch_backend()
    if name == "triton":
        return _triton_backend()
    return _compiled_backend(name)


_LOGGED = set()


def _log_choice(device, name: str, skipped: List[str]) -> None:
    key = (str(device), name)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    log.info(
        "ultraedit_fast: backend %r on %s%s",
        name,
        device,
        f" (not taken: {'; '.join(skipped)})" if skipped else "",
    )


def available_backends(device="cpu") -> Dict[str, Optional[str]]:
    """``{backend: None if available else the reason it is not}`` for ``device``."""
    device = torch.device(device)
    return {b: _missing(b, device) for b in BACKENDS if b != "auto"}
