"""The forward pass of a turn, computing only what the loss needs.

A turn (and a score) needs the model's output at the answer positions alone, a few
hundred of the thousands of positions in a batch. For the model families whose
``ForCausalLM.forward`` is exactly "decoder -> last hidden state -> lm_head
(-> optional final logit soft-capping)" (checked against transformers' sources):

- the output layer is applied to the answer rows only: with a 32K-128K vocabulary
  that is a large share of a forward and backward pass and of its memory;
- the last decoder block's MLP runs on the answer rows only. After the last
  attention every operation is per position, so the MLP output at any other
  position reaches nothing the loss reads. Its rows at those positions are set to
  zero (finite, so the per-row norms after it stay finite, and their gradient is
  zero). The keys and gradients of modules inside that MLP are then the rows of a
  ``[1, n, d]`` tensor, in the same row-major order as ``x[mask]``:
  :func:`rows_only_modules` names them.

Any other model goes through its own full ``forward``.

A turn's mini-batches can also run several at a time as *packed* sequences (no
padding, one row, positions restarting per request) where :func:`supports_packing`
has checked that the model keeps the requests apart.
"""

from __future__ import annotations

import contextlib
import weakref
from contextlib import contextmanager
from typing import Optional, Set

import torch

from ..parallel.concurrency import ThreadOwned
from .packed_attention import packed_attention

# model_type -> the ForCausalLM forward is decoder + lm_head (+ softcap), and the last
# decoder block ends "... + mlp(norm(h))" (GPT-J: attention and MLP in parallel) with only
# per-position operations after its MLP; checked against transformers' sources. The
# parity tests against the reference (full forward) cover every family listed.
_HEAD_ON_ROWS = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gptj",
    "gpt2",
}


def input_device(model) -> torch.device:
    """The device of the model's input embeddings: where its inputs go (the first device
    of a model split over several)."""
    return model.get_input_embeddings().weight.device


def _split(model):
    if callable(getattr(type(model), "get_base_model", None)):  # a peft.PeftModel: its model
        model = model.get_base_model()  # (adapters injected in it)
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _HEAD_ON_ROWS:
        return None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None or base is model:
        return None
    return base, head, getattr(cfg, "final_logit_softcapping", None)


def _last_mlp(base) -> Optional[torch.nn.Module]:
    """The MLP of the last decoder block (``layers[-1].mlp`` or ``h[-1].mlp``)."""
    for name in ("layers", "h"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            mlp = getattr(blocks[-1], "mlp", None)
            return mlp if isinstance(mlp, torch.nn.Module) else None
    return None


def rows_only_modules(model) -> Set[torch.nn.Module]:
    """The modules that :func:`answer_logits` runs on answer rows only (their inputs and
    outputs are ``[1, n, d]`` or ``[n, d]``, every row an answer token's): those of the last
    decoder block's MLP, and the output layer. Empty for other models."""
    split = _split(model)
    if split is None:
        return set()
    mlp = _last_mlp(split[0])
    return (set(mlp.modules()) if mlp is not None else set()) | {split[1]}


@contextlib.contextmanager
def preserved_model_state(model):
    """Restore every parameter's ``requires_grad`` and every module's training mode on
    exit, whatever happens inside."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


def on_device(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` on ``x``'s device (a model split over devices runs its layers on several)."""
    return mask if mask.device == x.device else mask.to(x.device)


@contextmanager
def _mlp_on_rows(mlp: Optional[torch.nn.Module], mask: torch.Tensor):
    if mlp is None:
        yield
        return

    thread = ThreadOwned()

    def pre(module, args, *rest):  # rest: (kwargs,); other threads pass through
        if not thread.owns():
            return None
        kwargs = rest[0] if rest else {}
        x = args[0]
        if x.shape[:-1] != mask.shape:
            raise RuntimeError(
                f"the last block's MLP got input {tuple(x.shape)}, expected "
                f"[{mask.shape[0]}, {mask.shape[1]}, hidden]"
            )
        return (x[on_device(mask, x)].unsqueeze(0), *args[1:]), kwargs

    def post(module, args, *rest):  # rest: (kwargs, out)
        if not thread.owns():
            return None
        out = rest[-1]
        full = out.new_zeros(*mask.shape, out.shape[-1])
        return full.index_put((on_device(mask, out),), out[0])  # out: [1, n, d]

    handles = [
        mlp.register_forward_pre_hook(pre, with_kwargs=True),
        mlp.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_PACKING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PROBE_LENGTHS = (5, 3)


def supports_packing(model) -> bool:
    """Whether ``model`` runs packed sequences (several requests one after another in one
    row, positions restarting at 0, no attention mask) exactly as it runs them apart.

    Tested, not assumed: transformers builds a block-diagonal causal mask from such
    positions since its ``masking_utils`` rewrite, older versions or other attention
    paths may let one request attend to another. The probe runs two short requests
    apart and packed (three small forward passes, once per model and dtype) and
    compares their last hidden states; a model that fails it runs padded mini-batches.
    """
    split = _split(model)
    if split is None:
        return False
    base = split[0]
    emb = model.get_input_embeddings().weight
    key = (str(emb.dtype), str(emb.device), getattr(model.config, "_attn_implementation", None))
    cached = _PACKING.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    vocab = emb.shape[0]
    seqs = [
        torch.tensor([(7 * i + 3 * j + 1) % vocab for j in range(n)], device=emb.device)
        for i, n in enumerate(_PROBE_LENGTHS)
    ]
    try:
        with torch.no_grad():
            apart = [base(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in seqs]
            pos = torch.cat([torch.arange(n, device=emb.device) for n in _PROBE_LENGTHS])
            with packed_attention(model, pos[None]):  # the way packed passes run
                packed = base(
                    input_ids=torch.cat(seqs)[None], position_ids=pos[None], use_cache=False
                ).last_hidden_state[0]
        apart = torch.cat(apart).float()
        err = (packed.float() - apart).abs().max() / apart.abs().max().clamp_min(1e-30)
        tol = 1e-3 if emb.dtype == torch.float32 else 5e-2
        ok = bool(torch.isfinite(err)) and float(err) <= tol
    except Exception:  # an attention path that rejects the inputs: run padded
        ok = False
    _PACKING[model] = (key, ok)
    return ok


def answer_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    mask: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits at the positions where ``mask`` (``[B, T]`` bool) is set, row-major:
    ``[mask.sum(), vocab]`` in the model's dtype. ``position_ids`` (with
    ``attention_mask=None``): a packed pass (:class:`~ultraedit_fast.model.requests.PackedPass`),
    for models where :func:`supports_packing` holds."""
    split = _split(model)
    kw = {} if position_ids is None else {"position_ids": position_ids}
    packed = packed_attention(model, position_ids, attention_mask)
    if split is None:
        with packed:
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw
            ).logits
        return logits[on_device(mask, logits)]
    base, head, softcap = split
    with packed, _mlp_on_rows(_last_mlp(base), mask):
        hidden = base(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw
        ).last_hidden_state
    logits = head(hidden[on_device(mask, hidden)])
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class _Reached(Exception):
    """Raised inside a forward pass once every module asked for has run."""


def forward_until(model, modules, **inputs) -> bool:
    """Run ``model(**inputs, use_cache=False)`` only as far as it takes for every module of
    ``modules`` to have run once (their forward hooks, registered by the caller before, see
    their inputs as in a whole pass): the blocks above the highest of them and the output
    layer are skipped. Returns whether it stopped early (``False``: the whole pass ran, e.g.
    a module the pass does not reach)."""
    waiting = {id(m) for m in modules}
    thread = ThreadOwned()

    def seen(module, args, out):
        if thread.owns():
            waiting.discard(id(module))
            if not waiting:
                raise _Reached

    handles = [m.register_forward_hook(seen) for m in {id(m): m for m in modules}.values()]
    packed = packed_attention(model, inputs.get("position_ids"), inputs.get("attention_mask"))
    try:
        with packed:
            model(**inputs, use_cache=False)
    except _Reached:
        return True
    finally:
        for h in handles:
            h.remove()
    return False
