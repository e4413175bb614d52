"""Edit requests and their tokenisation (``docs/algorithm.md`` section 1).

A request is a prompt and a target answer.  ``tokenize_request`` turns it into
``input_ids`` / ``labels`` aligned so that the logits at position ``t`` predict
``labels[t]`` (no shift), and ``make_minibatches`` sorts and pads a turn's
requests exactly as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

import torch

IGNORE = -100


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit.

    ``prompt`` is the text the model sees, ``target`` the answer it should give.
    ``rephrase`` (a paraphrase of the prompt) and ``locality_prompt`` /
    ``locality_answer`` (an unrelated fact that must not change) are only used
    for evaluation.
    """

    prompt: str
    target: str
    rephrase: Optional[str] = None
    locality_prompt: Optional[str] = None
    locality_answer: Optional[str] = None

    def __post_init__(self):
        check_request(self)


def _has_lone_surrogate(text: str) -> bool:
    # str.encode refuses lone surrogates (U+D800..U+DFFF), which no tokenizer can take
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_request(r) -> None:
    """Check the fields of a request (``TypeError``/``ValueError`` naming the field). Run on
    every request at the boundary, whatever built it: a subclass that skips
    ``__post_init__``, or a frozen instance changed with ``object.__setattr__``, is caught."""
    for name in _FIELD_NAMES:
        if not hasattr(r, name):
            raise TypeError(f"EditRequest.{name}: missing")
    for name in ("prompt", "target"):
        value = getattr(r, name)
        if not isinstance(value, str):
            raise TypeError(f"EditRequest.{name}: expected str, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"EditRequest.{name}: expected a non-empty string, got {value!r}")
    for name in ("rephrase", "locality_prompt", "locality_answer"):
        value = getattr(r, name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"EditRequest.{name}: expected str or None, got {type(value).__name__}")
    for name in _FIELD_NAMES:
        value = getattr(r, name)
        if isinstance(value, str) and _has_lone_surrogate(value):
            raise ValueError(
                f"EditRequest.{name}: contains a lone surrogate code point "
                "(U+D800..U+DFFF), which is not text a tokenizer can read: "
                f"{value!r}"
            )
    if (r.locality_prompt is None) != (r.locality_answer is None):
        raise ValueError("EditRequest: locality_prompt and locality_answer must be given together")


_FIELD_NAMES = ("prompt", "target", "rephrase", "locality_prompt", "locality_answer")
_FIELDS = tuple(f.name for f in fields(EditRequest))
RequestLike = Union[EditRequest, Mapping[str, Any]]


def as_requests(requests: Any, argument: str = "requests") -> List[EditRequest]:
    """Validate and convert ``requests`` (EditRequests or dicts with the same keys).

    Raises ``TypeError`` / ``ValueError`` naming ``argument`` and the offending index.
    """
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise TypeError(
            f"{argument}: expected a list of EditRequest or dicts, got {type(requests).__name__}"
        )
    out: List[EditRequest] = []
    for i, r in enumerate(requests):
        if isinstance(r, EditRequest):
            try:
                check_request(r)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{argument}[{i}]: {e}") from None
            if type(r) is not EditRequest:  # a subclass: keep only the fields, checked
                r = EditRequest(**{k: getattr(r, k) for k in _FIELD_NAMES})
            out.append(r)
        elif isinstance(r, Mapping):
            unknown = set(r) - set(_FIELDS)
            if unknown:
                raise ValueError(
                    f"{argument}[{i}]: unknown keys {sorted(unknown)}; expected keys from {list(_FIELDS)}"
                )
            missing = [k for k in ("prompt", "target") if k not in r]
            if missing:
                raise ValueError(f"{argument}[{i}]: missing keys {missing}")
            try:
                out.append(EditRequest(**r))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{argument}[{i}]: {e}") from None
        else:
            raise TypeError(
                f"{argument}[{i}]: expected EditRequest or dict, got {type(r).__name__}"
            )
    if not out:
        raise ValueError(f"{argument}: expected at least one request, got an empty list")
    return out


@dataclass
class TokenizedRequest:
    input_ids: List[int]
    labels: List[int]


def prompt_ids(tokenizer, prompt: str, chat_template: bool = False) -> List[int]:
    """The token ids of a prompt: ``tok(prompt)`` with special tokens or, with
    ``chat_template``, the prompt as a user turn in the tokenizer's chat template, followed
    by the start of the assistant's turn (what an instruct model answers after)."""
    if not chat_template:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None or not hasattr(
        tokenizer, "apply_chat_template"
    ):
        raise ValueError("chat_template: the tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in newer versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def tokenize_pair(
    tokenizer,
    prompt: str,
    answer: str,
    max_length: Optional[int] = None,
    where: str = "request",
    chat_template: bool = False,
) -> TokenizedRequest:
    """``P = tok(prompt)`` with special tokens (or the prompt in the chat template, see
    :func:`prompt_ids`), ``A = tok(" " + answer)`` without;
    ``input_ids = P ++ A[:-1]``, ``labels = [-100] * (len(P) - 1) ++ A``."""
    p = prompt_ids(tokenizer, prompt, chat_template)
    a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if len(a) == 0:
        raise ValueError(
            f"{where}: the target {answer!r} tokenises to no tokens; expected a target of at least one token"
        )
    if len(p) == 0:
        raise ValueError(
            f"{where}: the prompt {prompt!r} tokenises to no tokens; expected a prompt of at least one token"
        )
    ids = list(p) + list(a[:-1])
    labels = [IGNORE] * (len(p) - 1) + list(a)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"{where}: {len(ids)} tokens exceed the model's context of {max_length} tokens; "
            "shorten the prompt or target"
        )
    return TokenizedRequest(ids, labels)


@dataclass
class MiniBatch:
    """A right-padded mini-batch. ``input_ids``/``attention_mask``/``labels``: [B, T] int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    order: List[int]  # indices into the turn's request list

    # what a PackedPass sets; a mini-batch run alone has none of them:
    position_ids = None  # the model's own positions
    token_weights = None  # the loss is the plain mean over the answer tokens
    counts = None  # one block of answer tokens

    @property
    def answer_mask(self) -> torch.Tensor:
        return self.labels != IGNORE

    @property
    def n_tokens(self) -> int:
        return int(self.answer_mask.sum())

    def to(self, device) -> "MiniBatch":
        return MiniBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.order,
        )


def pad_batch(items: Sequence[TokenizedRequest], order: List[int]) -> MiniBatch:
    T = max(len(t.input_ids) for t in items)
    B = len(items)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(t.labels)
    return MiniBatch(ids, mask, labels, order)


@dataclass
class PackedPass:
    """Consecutive mini-batches run as one packed sequence: ``input_ids``,
    ``position_ids`` and ``labels`` are ``[1, L]`` with every request's tokens one after
    another (no padding) and positions restarting at 0 for each request.

    The loss of a pass is ``sum(token_weights * cross_entropy)`` over its answer tokens,
    where a token's weight is 1 / (answer tokens of its mini-batch): each mini-batch's
    mean, as if it ran alone (``docs/algorithm.md`` section 2). ``counts[b]`` is the number of
    answer tokens of the pass's ``b``-th mini-batch, whose rows come ``b``-th in
    row-major order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    token_weights: torch.Tensor  # [answer tokens], float32
    counts: List[int]

    attention_mask = None  # packed sequences are told apart by their positions

    def to(self, device) -> "PackedPass":
        return PackedPass(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.labels.to(device),
            self.token_weights.to(device),
            self.counts,
        )


def _pack(batches: Sequence[MiniBatch]) -> PackedPass:
    ids, pos, labels, weights, counts = [], [], [], [], []
    for b in batches:
        lengths = b.attention_mask.sum(dim=1).tolist()  # right-padded
        n = b.n_tokens
        counts.append(n)
        weights.append(torch.full((n,), 1.0 / n, dtype=torch.float32))
        for i, m in enumerate(lengths):
            ids.append(b.input_ids[i, :m])
            labels.append(b.labels[i, :m])
            pos.append(torch.arange(m, dtype=torch.long))
    return PackedPass(
        torch.cat(ids)[None],
        torch.cat(pos)[None],
        torch.cat(labels)[None],
        torch.cat(weights),
        counts,
    )


def pack_minibatches(batches: Sequence[MiniBatch], tokens_per_pass: int) -> List[PackedPass]:
    """Group consecutive mini-batches (in order) into packed passes of at most
    ``tokens_per_pass`` tokens; a mini-batch longer than that gets a pass of its own."""
    passes, group, size = [], [], 0
    for b in batches:
        n = int(b.attention_mask.sum())
        if group and size + n > tokens_per_pass:
            passes.append(_pack(group))
            group, size = [], 0
        group.append(b)
        size += n
    if group:
        passes.append(_pack(group))
    return passes


def context_length(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_fits(
    tokenizer,
    requests: Sequence[EditRequest],
    max_length: Optional[int],
    chat_template: bool = False,
    argument: str = "requests",
) -> None:
    """Every request's other texts fit the model's context of ``max_length`` tokens as they
    will be fed when scored and checked: the ``rephrase`` with the target, the
    ``locality_prompt`` with its ``locality_answer``. A ``ValueError`` names
    ``requests[i] (field)`` otherwise (the prompt with its target: :func:`tokenize_pair`)."""
    if max_length is None:
        return
    for i, r in enumerate(requests):
        for field, prompt, answer in (
            ("rephrase", r.rephrase, r.target),
            ("locality_prompt", r.locality_prompt, r.locality_answer),
        ):
            if prompt is None or answer is None:
                continue
            p = prompt_ids(tokenizer, prompt, chat_template)
            a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            n = len(p) + max(len(a), 1) - 1
            if n > max_length:
                raise ValueError(
                    f"{argument}[{i}] ({field}): {n} tokens exceed the model's context of "
                    f"{max_length} tokens; shorten the {field}"
                    + (" or the target" if field == "rephrase" else " or the locality_answer")
                )


def make_minibatches(
    tokenizer,
    requests: Sequence[EditRequest],
    batch_size: int,
    max_length: Optional[int] = None,
    chat_template: bool = False,
) -> List[MiniBatch]:
    """Tokenise the edit prompts/targets, sort longest first (stable) and cut into
    right-padded mini-batches of ``batch_size`` (``docs/algorithm.md`` section 1). Every
    text of every request must fit ``max_length`` (:func:`check_fits`): what scores and
    checks a turn never meets one longer than the context."""
    toks = [
        tokenize_pair(
            tokenizer,
            r.prompt,
            r.target,
            max_length,
            where=f"requests[{i}]",
            chat_template=chat_template,
        )
        for i, r in enumerate(requests)
    ]
    check_fits(tokenizer, requests, max_length, chat_template)
    order = sorted(range(len(toks)), key=lambda i: -len(toks[i].input_ids))  # stable
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batches.append(pad_batch([toks[i] for i in idx], idx))
    return batches
