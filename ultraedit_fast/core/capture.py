"""Step 1 of a turn: the keys and value gradients of the edited modules at answer tokens.

Per pass (a padded mini-batch or a packed run of them, :mod:`ultraedit_fast.model.requests`): one
forward with hooks on the edited modules (:class:`Capture`), then ``torch.autograd.grad`` of
the loss with respect to their outputs only. No parameter requires grad during the pass, and
the output of the lowest edited module is made a leaf, so backward stops there and no weight
gradient exists. Keys and gradients are kept at answer tokens only (``docs/algorithm.md``
section 2), one block per (mini-batch, module). A packed pass runs split at the answers
where the model allows (:mod:`ultraedit_fast.model.prefix`): the prompts first, without a
graph and with the hooks paused, then the answer rows on their cached keys and values.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..parallel.concurrency import ThreadOwned
from ..model.forward import answer_logits, on_device
from ..model.prefix import split_for
from ..model.requests import IGNORE
from ..model.targets import EditTarget


# packed passes run split at the answers where the model allows (model/prefix.py); False:
# the whole pass (for measurements)
SPLIT = True


class Capture:
    """Hooks that keep, per edited module and pass, the input rows at answer tokens and
    the output tensor (whose gradient is taken after the forward). They act only for the
    thread that entered the capture: other threads' forward passes through the same
    modules (a model that keeps serving) run as if no hook were there."""

    def __init__(self, targets: Sequence[EditTarget], rows_only=frozenset()):
        self.targets = targets
        # modules that the forward runs on answer rows only (forward.rows_only_modules):
        # their inputs and outputs are [1, n, d], every row an answer token's
        self.rows_only = rows_only
        self.mask: Optional[torch.Tensor] = None
        self.n_rows = 0  # answer rows of the pass, counted on the host
        self.keys: Dict[str, torch.Tensor] = {}
        self.outputs: Dict[str, torch.Tensor] = {}
        self._by_input: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: List[Any] = []
        self._paused = False

    @contextmanager
    def paused(self):
        """Inside, the hooks let passes through untouched (a split pass's prompts, a probe)."""
        outer, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = outer

    def __enter__(self):
        self._thread = ThreadOwned()
        for t in self.targets:
            self._handles.append(
                t.module.register_forward_hook(self._hook(t.name), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def reset(self):
        self.keys.clear()
        self.outputs.clear()
        self._by_input.clear()

    def rows(self, module, x: torch.Tensor) -> torch.Tensor:
        """``x``'s rows at answer tokens, row-major (batch, then position)."""
        if module not in self.rows_only:
            assert self.mask is not None, "rows() is called inside a pass"
            return x[on_device(self.mask, x)]
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] != self.n_rows:
            raise RuntimeError(f"expected {self.n_rows} answer rows, got {tuple(x.shape)}")
        return rows

    def _hook(self, name: str):
        def hook(module, args, *rest):
            # (kwargs, output); another thread may see the hook without its kwargs flag
            # while it is being removed, so only the owner thread reads ``rest``
            if self._paused or not self._thread.owns():
                return None
            kwargs, output = rest
            if name in self.outputs:
                raise RuntimeError(
                    f"module {name!r} ran twice in one forward pass; "
                    "UltraEdit edits modules that run once per token"
                )
            x = args[0] if args else next(iter(kwargs.values()))
            # Modules fed the same tensor (gate_proj and up_proj of one layer) share
            # one copy of the keys, and later one Cholesky factor.
            seen = self._by_input.get(id(x))
            if seen is None or seen[0] is not x:
                seen = (x, self.rows(module, x.detach()))
                self._by_input[id(x)] = seen
            self.keys[name] = seen[1]
            if not output.requires_grad:  # lowest edited module: backward stops here
                output = output.detach().requires_grad_(True)
                self.outputs[name] = output
                return output
            self.outputs[name] = output
            return None

        return hook


def capture_passes(
    model,
    passes,
    cap: Capture,
    device,
    keys: Dict[str, List[torch.Tensor]],
    grads: Dict[str, List[torch.Tensor]],
) -> int:
    """Forward and backward of each pass; appends one key and one gradient block per
    (mini-batch, module) to ``keys``/``grads`` (fp32 or the model's dtype, ``m x d_in`` /
    ``m x d_out``). Returns the number of answer tokens. The caller has put the model in
    eval mode with no parameter requiring grad, and entered ``cap``."""
    n_tokens = 0
    for batch in passes:
        counts = batch.counts or [batch.n_tokens]  # answer tokens per mini-batch, counted
        batch = batch.to(device)  # on the host: no device sync per pass
        mask = batch.labels != IGNORE
        with cap.paused():  # split_for may probe the model once
            halves = split_for(model, batch.input_ids, batch.position_ids, mask) if SPLIT else None
        cap.n_rows = sum(counts)
        if halves is None:
            cap.mask = mask
            logits = answer_logits(
                model, batch.input_ids, batch.attention_mask, mask, batch.position_ids
            )
        else:  # the prompts without a graph, then the answer rows (model/prefix.py)
            cap.mask = halves.suffix_mask
            logits = halves.logits(model, quiet=cap.paused())
        labels = batch.labels[mask].to(logits.device)
        if batch.token_weights is None:  # one mini-batch: its mean
            loss = F.cross_entropy(logits.float(), labels)
        else:  # packed: each mini-batch's mean, summed (docs/algorithm.md section 2)
            loss = (
                F.cross_entropy(logits.float(), labels, reduction="none")
                * batch.token_weights.to(logits.device)
            ).sum()
        missing = [t.name for t in cap.targets if t.name not in cap.outputs]
        if missing:
            raise RuntimeError(f"modules {missing} did not run in the forward pass")
        gouts = torch.autograd.grad(loss, [cap.outputs[t.name] for t in cap.targets])
        split: Dict[int, Tuple[torch.Tensor, ...]] = {}
        for t, g in zip(cap.targets, gouts):
            k = cap.keys[t.name]  # one tensor for modules fed the same input
            if id(k) not in split:
                split[id(k)] = k.split(counts)
            keys[t.name].extend(split[id(k)])  # one block per mini-batch
            grads[t.name].extend(cap.rows(t.module, g).split(counts))
        n_tokens += cap.n_rows
        del logits, loss, gouts, split
        cap.reset()
    return n_tokens
