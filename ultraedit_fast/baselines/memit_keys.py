"""What the MEMIT family reads from a model: its decoder blocks and their MLP
down-projections, keys (a down-projection's input at chosen positions), the hooks that
add a pending update to a down-projection's output, and the keys' second moment on
general text.

Every hook here acts for the thread that placed it alone
(:class:`~ultraedit_fast.parallel.concurrency.ThreadOwned`): a model that keeps serving
other threads meanwhile runs unhooked for them. A pending update ``Delta`` (``d_out x
d_in``) is applied as ``y + x Delta^T`` on the down-projection's output, so that a turn can
compute every layer's update on the edited model without writing a weight until all of
them are known (the turn is all-or-nothing).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..model.forward import input_device, preserved_model_state
from ..model.targets import EditTarget, resolve_target
from ..parallel.concurrency import ThreadOwned

#: the MLP output projections looked for in a decoder block, Llama-style first
DOWN_PROJ_NAMES = ("mlp.down_proj", "mlp.fc_out", "mlp.c_proj")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype keys, statistics and updates are held in: float32, or float64 for a
    float64 model."""
    return torch.promote_types(torch.float32, dtype)


class _Stop(Exception):
    """Raised by a hook once the deepest module a pass needs has run."""


def decoder_blocks(model) -> Tuple[str, torch.nn.ModuleList]:
    """``(name, blocks)``: the model's list of decoder blocks (``model.layers``,
    ``transformer.h``, ...); ``ValueError`` naming the model's class when there is none."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for name, m in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(m, torch.nn.ModuleList) and last in ("layers", "h") and len(m) > 0:
            if n is None or len(m) == n:
                return name, m
    raise ValueError(
        f"model: no list of decoder blocks (``layers`` or ``h``) found in a "
        f"{type(model).__name__}; the MEMIT-family baselines edit decoder-only "
        "transformers with an MLP per block"
    )


def down_projection(model, blocks_name: str, layer: int) -> EditTarget:
    """The MLP down-projection of block ``layer`` as an :class:`EditTarget`; a ``ValueError``
    naming the module when it is missing, not ``nn.Linear``/``Conv1D`` or sharded."""
    block = f"{blocks_name}.{layer}"
    for sub in DOWN_PROJ_NAMES:
        name = f"{block}.{sub}"
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        try:
            target = resolve_target(model, name)
        except TypeError as e:
            raise ValueError(
                f"layers: {name!r} cannot be edited by this baseline: {e}; it writes "
                "nn.Linear (Llama-style) or GPT-2 Conv1D down-projections"
            ) from None
        if target.tp is not None:
            raise ValueError(
                f"layers: {name!r} is sharded for tensor parallelism; this baseline edits "
                "whole weights on one process"
            )
        return target
    raise ValueError(
        f"layers: block {block!r} has no MLP down-projection (looked for "
        f"{', '.join(DOWN_PROJ_NAMES)})"
    )


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_output(out, hidden):
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


@contextmanager
def pending_updates(
    targets: Mapping[int, EditTarget], deltas: Mapping[int, torch.Tensor]
) -> Iterator[None]:
    """Add ``x Delta^T`` to the output of each down-projection in ``deltas`` (``layer ->
    Delta``, ``d_out x d_in`` float32 on the weight's device) while inside, for this thread."""
    owner = ThreadOwned()

    def hook_for(delta):
        def hook(module, args, out):
            if not owner.owns():
                return None
            x = args[0]
            return out + (x.to(delta.dtype) @ delta.t()).to(out.dtype)

        return hook

    handles = [
        targets[layer].module.register_forward_hook(hook_for(d)) for layer, d in deltas.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_keys(
    model,
    targets: Mapping[int, EditTarget],
    blocks: torch.nn.ModuleList,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    rows: torch.Tensor,
    positions: torch.Tensor,
    z_layer: Optional[int] = None,
    z_rows: Optional[torch.Tensor] = None,
) -> Tuple[Dict[int, torch.Tensor], Optional[torch.Tensor]]:
    """One forward pass (stopped after the deepest block needed): ``(keys, z)`` with
    ``keys[layer]`` the down-projection inputs at ``(rows, positions)`` as float32 (float64
    for a float64 model: :func:`work_dtype`)
    ``[len(rows), d_in]`` for every layer of ``targets``, and ``z`` the output of block
    ``z_layer`` at ``(z_rows, positions[z_rows])`` (``None`` without ``z_layer``)."""
    owner = ThreadOwned()
    keys: Dict[int, torch.Tensor] = {}
    found: List[torch.Tensor] = []
    last = max(list(targets) + ([z_layer] if z_layer is not None else []))

    def key_hook(layer):
        def hook(module, args):
            if owner.owns():
                x = args[0]
                k = x[rows.to(x.device), positions.to(x.device)].detach()
                keys[layer] = k.to(work_dtype(k.dtype))

        return hook

    def block_hook(module, args, out):
        if not owner.owns():
            return None
        if z_layer is not None and module is blocks[z_layer]:
            h = _output(out)
            pos = positions[z_rows]
            z = h[z_rows.to(h.device), pos.to(h.device)].detach()
            found.append(z.to(work_dtype(z.dtype)))
        if module is blocks[last]:
            raise _Stop
        return None

    handles = [t.module.register_forward_pre_hook(key_hook(n)) for n, t in targets.items()]
    handles.append(blocks[last].register_forward_hook(block_hook))
    if z_layer is not None and z_layer != last:
        handles.append(blocks[z_layer].register_forward_hook(block_hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return keys, (found[0] if found else None)


def special_prefix(tokenizer) -> List[int]:
    """The special tokens the tokenizer puts before a text (a BOS, or nothing)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    at = len(with_special) - len(bare)
    return with_special[:at] if at >= 0 and with_special[at:] == bare else []


def key_second_moments(
    model,
    targets: Mapping[int, EditTarget],
    blocks: torch.nn.ModuleList,
    windows: Sequence[Sequence[int]],
    prefix: Sequence[int],
    batch_size: int,
) -> Tuple[Dict[int, torch.Tensor], int]:
    """``(C0, n)``: for every layer of ``targets``, the mean of ``k k^T`` over every token
    position of the general-text ``windows`` (each preceded by ``prefix``), the
    down-projection's input ``k`` in float32, accumulated in float64 and returned as
    float32 (:func:`work_dtype`) ``d_in x d_in`` on the weight's device; ``n`` the number of keys. This is
    the published ``mom2`` statistic (an uncentred second moment, per token)."""
    device = input_device(model)
    sums: Dict[int, torch.Tensor] = {}
    n = 0
    ids = torch.tensor([list(prefix) + list(w) for w in windows], dtype=torch.long)
    width = ids.shape[1]
    with preserved_model_state(model):
        model.eval()
        for s in range(0, len(ids), batch_size):
            x = ids[s : s + batch_size].to(device)
            rows = torch.arange(len(x)).repeat_interleave(width)
            pos = torch.arange(width).repeat(len(x))
            keys, _ = capture_keys(model, targets, blocks, x, None, rows, pos)
            for layer, k in keys.items():
                kk = (k.t() @ k).double()
                sums[layer] = kk if layer not in sums else sums[layer] + kk
            n += len(rows)
    return {
        layer: (s / n).to(work_dtype(targets[layer].weight.dtype)) for layer, s in sums.items()
    }, n
