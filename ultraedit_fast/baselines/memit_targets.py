"""MEMIT-style targets: for each request, the output of the last edited block at the key
token that makes the model predict the target.

Following the published ``compute_z`` (MEMIT, reused by AlphaEdit), for each request a
vector ``delta`` is added to the residual stream output of block ``z_layer`` (the last
edited layer) at the key token, and optimised with Adam so that:

- the target's mean token NLL is low, averaged over the prompt alone and the prompt after
  each of a few short texts the model generated itself (the random-prefix contexts);
- the next-token distribution at the key token of an "essence" prompt
  (``"<subject> is a"``) stays where it was: ``kl_factor * KL(now || before)``;
- ``v_weight_decay * |delta| / |z0|^2`` (as published: the norm, not its square);

with ``|delta|`` clamped to ``clamp_norm_factor * |z0|`` after every step, and a request's
optimisation stopping once its loss is under :data:`STOP_LOSS` (or at the last step, where
the loss is computed and no step taken). The target is ``z = z0 + delta``, ``z0`` being the
block's output at the key token of the bare prompt.

**Batched.** All the requests of a chunk of ``batch_size`` are optimised in one batch: one
``[N, d]`` parameter, one forward and backward per step over every request's rows, the sum
of the requests' losses. The requests' rows never meet (each row is its own sequence, and a
delta is added to its own request's rows alone), Adam acts element-wise and a request that
stopped is held where it stopped, so each request follows the trajectory it would follow
alone, up to the rounding of batched arithmetic.

**Key token.** The last token of the subject in the prompt when the caller names the
subject (CounterFact's records carry it; ``fact_token="subject_last"`` as published), found
as published by tokenising the text up to the subject's end; otherwise the last token of the
prompt, the whole prompt then standing for the subject (the essence prompt is then
``"<prompt> is a"``): the subject-free variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..model.forward import answer_logits, input_device, preserved_model_state
from ..model.requests import IGNORE, EditRequest
from ..parallel.concurrency import ThreadOwned
from .memit_keys import _output, _replace_output

STOP_LOSS = 5e-2  # the published early stop of the target optimisation
TOP_K = 5  # the published sampling of the random-prefix contexts


def context_texts(model, tokenizer, prefixes: Sequence[str], n_tokens: int, seed: int) -> List[str]:
    """The random-prefix contexts: for each of ``prefixes``, a continuation the model
    samples (top-5, seeded) up to ``n_tokens`` tokens in all, with ``{``/``}`` and line
    breaks turned into spaces, followed by ``". "`` (published: ``generate_fast`` of 5
    prefixes to 10 tokens, then ``f + ". {}"``)."""
    device = input_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    with preserved_model_state(model), torch.no_grad():
        model.eval()
        for prefix in prefixes:
            ids = list(tokenizer(prefix, add_special_tokens=True)["input_ids"])
            start = len(ids)
            while len(ids) < max(n_tokens, start + 1):
                x = torch.tensor([ids], device=device)
                logits = model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
                top = torch.topk(logits, min(TOP_K, logits.shape[-1]))
                pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
                ids.append(int(top.indices[pick]))
            text = tokenizer.decode(ids, skip_special_tokens=True)
            for ch in "{}\n\r\t":
                text = text.replace(ch, " ")
            out.append(" ".join(text.split()) + ". ")
    return out


@dataclass
class TargetRows:
    """One chunk's rows, right-padded: for request ``r`` of the chunk's ``N``, row ``r`` is
    the bare prompt, rows ``N + r * C + c`` the prompt after context ``c`` (``C`` contexts),
    the last ``N`` rows the essence prompts. ``labels`` hold the target tokens of the
    rewriting rows (the logits at position ``t`` predict ``labels[t]``), ``lookup`` every
    row's key token, ``request`` every row's request, ``target_len`` every request's target
    tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lookup: torch.Tensor
    request: torch.Tensor
    target_len: torch.Tensor
    n: int
    n_contexts: int

    @property
    def n_rewrite(self) -> int:
        return self.n * (1 + self.n_contexts)

    @property
    def n_tokens(self) -> int:
        return int(self.target_len.sum())


def _key_index(tokenizer, text: str, end: int, n_ids: int) -> int:
    k = len(tokenizer(text[:end], add_special_tokens=True)["input_ids"]) - 1
    return min(max(k, 0), n_ids - 1)


def build_rows(
    tokenizer,
    requests: Sequence[EditRequest],
    subjects: Sequence[Optional[str]],
    contexts: Sequence[str],
    max_length: Optional[int],
    first: int = 0,
) -> TargetRows:
    """The rows of ``requests`` (the turn's requests ``first``, ``first + 1``, ...; their
    index names a request in errors)."""
    n, c = len(requests), len(contexts)
    rows: List[List[int]] = [[] for _ in range(n * (2 + c))]
    labels: List[List[int]] = [[] for _ in range(len(rows))]
    lookup = [0] * len(rows)
    request = [0] * len(rows)
    target_len = []
    for r, (req, subject) in enumerate(zip(requests, subjects)):
        where = f"requests[{first + r}]"
        answer = list(tokenizer(" " + req.target, add_special_tokens=False)["input_ids"])
        if not answer:
            raise ValueError(f"{where}: the target {req.target!r} tokenises to no tokens")
        target_len.append(len(answer))
        start = req.prompt.index(subject) if subject else 0
        end = start + len(subject) if subject else len(req.prompt)
        for ci, ctx in enumerate([""] + list(contexts)):
            row = r if ci == 0 else n + r * c + ci - 1
            text = ctx + req.prompt
            p = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            if not p:
                raise ValueError(f"{where}: the prompt {req.prompt!r} tokenises to no tokens")
            rows[row] = p + answer[:-1]
            labels[row] = [IGNORE] * (len(p) - 1) + answer
            lookup[row] = _key_index(tokenizer, text, len(ctx) + end, len(p))
            request[row] = r
        essence = subject if subject else req.prompt
        row = n * (1 + c) + r
        rows[row] = list(tokenizer(essence + " is a", add_special_tokens=True)["input_ids"])
        labels[row] = [IGNORE] * len(rows[row])
        lookup[row] = _key_index(tokenizer, essence, len(essence), len(rows[row]))
        request[row] = r
        mine = [r, row] + [n + r * c + k for k in range(c)]
        longest = max(len(rows[k]) for k in mine)
        if max_length is not None and longest > max_length:
            raise ValueError(
                f"{where}: {longest} tokens (a context, the prompt and the target) exceed "
                f"the model's context of {max_length} tokens; shorten the prompt or target"
            )
    return _pad(rows, labels, lookup, request, target_len, n, c)


def _pad(rows, labels, lookup, request, target_len, n, c) -> TargetRows:
    width = max(len(x) for x in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(zip(rows, labels)):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        lab[i, : len(y)] = torch.tensor(y)
    return TargetRows(
        ids,
        mask,
        lab,
        torch.tensor(lookup),
        torch.tensor(request),
        torch.tensor(target_len),
        n,
        c,
    )


class _DeltaAtKeys:
    """The hook on block ``z_layer``: records ``z0`` (the bare rows' output at their key
    token, before any delta) and adds each request's delta at its rows' key tokens."""

    def __init__(self, rows: TargetRows, delta: torch.Tensor):
        self.rows, self.delta, self.z0 = rows, delta, None
        self.owner = ThreadOwned()

    def __call__(self, module, args, out):
        if not self.owner.owns():
            return None
        h = _output(out)
        rows = self.rows
        i = torch.arange(len(rows.lookup), device=h.device)
        j = rows.lookup.to(h.device)
        if self.z0 is None:
            self.z0 = h[i[: rows.n], j[: rows.n]].detach().float()
        values = self.delta[rows.request.to(self.delta.device)].to(device=h.device, dtype=h.dtype)
        return _replace_output(out, torch.index_put(h, (i, j), values, accumulate=True))


def _losses(logits, rows: TargetRows, mask, kl_mask):
    """``(per-request NLL, per-request KL log-probs)`` from the logits at ``mask``."""
    n, b = rows.n, len(rows.lookup)
    row_of = torch.arange(b)[:, None].expand_as(mask)[mask].to(logits.device)
    lab = rows.labels[mask].to(logits.device)
    is_label = lab != IGNORE
    lp = torch.log_softmax(logits.float(), -1)
    tok = lp[is_label].gather(1, lab[is_label, None])[:, 0]
    per_row = torch.zeros(b, device=lp.device).index_add(0, row_of[is_label], tok)
    req = rows.request[: rows.n_rewrite].to(lp.device)
    per_row = -per_row[: rows.n_rewrite] / rows.target_len.to(lp.device)[req]
    nll = torch.zeros(n, device=lp.device).index_add(0, req, per_row) / (1 + rows.n_contexts)
    return nll, lp[kl_mask[mask].to(lp.device)]


def _masks(rows: TargetRows):
    """``(mask, kl_mask)``: the positions whose logits a step reads (the target tokens, the
    essence prompts' key tokens, and every row's key token: that block's output must be
    computed whole when the last edited block is the model's last) and the essence ones."""
    b = torch.arange(len(rows.lookup))
    keys = torch.zeros_like(rows.labels, dtype=torch.bool)
    keys[b, rows.lookup] = True
    kl_mask = keys.clone()
    kl_mask[: rows.n_rewrite] = False
    return (rows.labels != IGNORE) | keys, kl_mask


def optimise_targets(model, block: torch.nn.Module, rows: TargetRows, cfg) -> torch.Tensor:
    """``z`` (``[N, d]`` float32): the targets of one chunk's requests at the output of
    ``block`` (``cfg``: ``v_num_grad_steps``, ``v_lr``, ``v_weight_decay``,
    ``clamp_norm_factor``, ``kl_factor``)."""
    device = input_device(model)
    d = model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(rows.n, d, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    mask, kl_mask = _masks(rows)
    hook = _DeltaAtKeys(rows, delta)
    active = torch.ones(rows.n, dtype=torch.bool, device=device)
    kl_init = None
    ids, att = rows.input_ids.to(device), rows.attention_mask.to(device)
    handle = block.register_forward_hook(hook)
    try:
        with preserved_model_state(model), torch.enable_grad():
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for it in range(cfg.v_num_grad_steps):
                opt.zero_grad()
                logits = answer_logits(model, ids, att, mask)
                nll, kl_lp = _losses(logits, rows, mask, kl_mask)
                if kl_init is None:
                    kl_init = kl_lp.detach()
                kl = cfg.kl_factor * (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
                z0 = hook.z0.to(device)
                decay = cfg.v_weight_decay * delta.norm(dim=1) / z0.norm(dim=1).pow(2)
                loss = nll.to(device) + kl.to(device) + decay
                active &= loss.detach() >= STOP_LOSS
                if it == cfg.v_num_grad_steps - 1 or not bool(active.any()):
                    break
                (loss * active).sum().backward()
                _step(opt, delta, active, cfg.clamp_norm_factor * z0.norm(dim=1))
    finally:
        handle.remove()
    return (hook.z0.to(device) + delta.detach()).float()


def _step(opt, delta: torch.Tensor, active: torch.Tensor, max_norm: torch.Tensor) -> None:
    """One Adam step for the requests still optimised, then the norm clamp."""
    held = delta.detach().clone()
    opt.step()
    with torch.no_grad():
        delta[~active] = held[~active]
        norm = delta.norm(dim=1)
        scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-30), 1.0)
        delta.mul_(scale[:, None])
