"""Host-side plumbing of the Triton launchers in :mod:`ultraedit_fast.kernels.triton_kernels`:
whether Triton interprets, the device checks, making a tensor's device current for a launch,
stacking blocks of rows without a copy, and spotting overlapping memory. Plain PyTorch: it
imports no ``triton``."""

from __future__ import annotations

import os
from typing import Sequence

import torch


def interpreting() -> bool:
    """Whether Triton interprets the kernels (``TRITON_INTERPRET=1``: on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(op: str, *tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
            f"set before triton is imported), got tensors on {dev}"
        )
    return dev


class on_device:
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def stacked_rows(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The blocks as one contiguous (sum of rows) x width tensor, without a copy when they
    already are consecutive row ranges of one buffer (as a capture usually produces)."""
    first = blocks[0]
    base = first.untyped_storage().data_ptr()
    # Same storage too: separate allocations can be adjacent (CUDA caching allocator),
    # and a view may not reach past its own storage.
    same = all(
        b.dtype == first.dtype and b.is_contiguous() and b.untyped_storage().data_ptr() == base
        for b in blocks
    )
    if same:
        item = first.element_size()
        ptr = first.data_ptr()
        for b in blocks:
            if b.data_ptr() != ptr:
                same = False
                break
            ptr += b.numel() * item
    if same:
        rows = sum(b.shape[0] for b in blocks)
        return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))
    return torch.cat([b.contiguous() for b in blocks], dim=0)


def has_overlap(w: torch.Tensor) -> bool:
    """True when two elements of w share memory (an expanded view): no in-place update then."""
    if w.is_contiguous():
        return False
    dims = sorted((s, n) for s, n in zip(w.stride(), w.shape) if n > 1)
    span = 1
    for s, n in dims:
        if s < span:
            return True
        span = s * n
    return False
