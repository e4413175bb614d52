"""The model's health: what the edits did to everything they were not about, measured
against the unedited model.

- ``health_ppl_ratio``: the perplexity of general text (a text file the user names, or the
  package's own sample, ``health_text.txt``) under the edited model over the unedited one's,
  on a fixed set of windows of :data:`WINDOW` tokens (1.0: unchanged; above: worse);
- ``health_top1``: the share of those text positions whose most likely next token is the
  unedited model's;
- ``health_unrelated_kept``: the share of unrelated prompts (:data:`UNRELATED_PROMPTS`,
  general knowledge and everyday language, none of them an edited record's) whose greedy
  continuation of :data:`RETENTION_TOKENS` tokens is the unedited model's, normalised as
  the generated scores are.

The unedited side is captured once (:func:`capture_health`, a :class:`HealthBaseline`);
each measurement (:func:`measure_health`) is one forward pass over the windows and one short
greedy decode of the prompts: a small fraction of scoring the edits themselves.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..model.forward import input_device, preserved_model_state
from ..model.requests import prompt_ids
from ..parallel.concurrency import model_locks
from ..utils.files import read_regular_file
from . import shortcuts as S
from .resumed import active_for
from .generation import _eos_ids, greedy_decode, normalize_text, spread

WINDOW = 128  # tokens per window of general text
MAX_WINDOWS = 16  # windows measured, spread over the text
RETENTION_TOKENS = 8  # tokens of each unrelated prompt's greedy continuation compared
BUILTIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "health_text.txt")
BUILTIN_NAME = (
    "the package's built-in general-English sample (ultraedit_fast/scoring/health_text.txt)"
)

UNRELATED_PROMPTS = (
    "The capital city of Japan is",
    "The chemical symbol for gold is",
    "Leonardo da Vinci painted the",
    "The tallest mountain in the world is Mount",
    "The planet closest to the sun is",
    "In a leap year, February has",
    "The author of Romeo and Juliet is",
    "The freezing point of water in Fahrenheit is",
    "Honey is made by",
    "The Amazon rainforest is located in",
    "A baby cat is called a",
    "The longest river in Africa is the",
    "Paper is made from",
    "The instrument with black and white keys is the",
    "The currency of the United Kingdom is the",
    "Photosynthesis takes place in the",
    "The main language spoken in Brazil is",
    "An octopus has eight",
    "The Great Wall is in",
    "Steam is water in the form of a",
    "The first man to walk on the moon was",
    "A group of lions is called a",
    "The Eiffel Tower is in the city of",
    "Penguins live mostly in the",
    "The hardest natural substance is",
    "She opened the umbrella because it was",
    "After dinner, we usually wash the",
    "The train was late, so I decided to",
    "My favourite season of the year is",
    "He put the milk back in the",
    "To send a letter, you need an envelope and a",
    "The children played football in the",
    "On weekends, many people like to",
    "The doctor told him to drink more",
    "When the alarm rang, she",
    "The library was quiet except for the",
    "We bought fresh vegetables at the",
    "The old bridge crosses the",
    "Before the exam, the students",
    "The cake needs to bake for about",
)


@dataclass
class HealthBaseline:
    """The unedited model's side of the health figures (:func:`capture_health`)."""

    source: str  # the text file's path, or BUILTIN_NAME
    windows: torch.Tensor  # [W, WINDOW] token ids
    nll: torch.Tensor  # [W] summed next-token NLL per window (float64)
    argmax: torch.Tensor  # [W, WINDOW - 1] the unedited most likely next tokens
    prompts: List[str]
    continuations: List[str]  # normalised greedy continuations
    # their token ids (None in a baseline from before they were kept: decode in full)
    continuation_ids: Optional[List[List[int]]] = None


def read_health_text(path: Optional[str]) -> tuple:
    """``(text, source)`` of the health text: the file at ``path`` (``None``: the package's
    sample). A file that is missing, empty, not a regular file or not UTF-8 is a
    ``ValueError`` (``FileNotFoundError``) naming it."""
    if path is None:
        path, source = BUILTIN, BUILTIN_NAME
    else:
        source = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"health text: {source!r} does not exist")
    data = read_regular_file(path, f"health text {source!r}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"health text: {source!r} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    if not text.strip():
        raise ValueError(f"health text: {source!r} is empty")
    return text, source


def text_windows(
    tokenizer, path: Optional[str], window: int, what: str
) -> Tuple[List[List[int]], str]:
    """``(windows, source)``: the general text at ``path`` (:func:`read_health_text`) cut
    into every whole window of ``window`` tokens, in order; a text shorter than one window is
    a ``ValueError`` naming ``what`` and the file."""
    text, source = read_health_text(path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // window
    if n < 1:
        raise ValueError(
            f"{what}: {source!r} is too short for one context window: "
            f"{len(ids)} tokens, {window} needed"
        )
    return [ids[k * window : (k + 1) * window] for k in range(n)], source


def _window_stats(model, windows: torch.Tensor, batch_size: int):
    """``(summed NLL per window, argmax per position)`` of ``model`` on ``windows``."""
    passes = active_for(model)
    if passes is not None:  # the same model as last time: the same answer
        key = ("health_windows", tuple(map(tuple, windows.tolist())))
        return passes.again(key, lambda: _stats(model, windows, batch_size))
    return _stats(model, windows, batch_size)


def _stats(model, windows: torch.Tensor, batch_size: int):
    device = input_device(model)
    nll, top = [], []
    with preserved_model_state(model), torch.no_grad():
        model.eval()
        for s in range(0, len(windows), batch_size):
            x = windows[s : s + batch_size].to(device)
            with model_locks(model).weights.reading():
                logits = model(input_ids=x).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1)
            tok = x[:, 1:]
            nll.append(-lp.gather(-1, tok[..., None])[..., 0].double().sum(-1).cpu())
            top.append(lp.argmax(-1).cpu())
    return torch.cat(nll), torch.cat(top)


def _continuation_ids(model, tokenizer, prompts: Sequence[str], batch_size: int) -> List[List[int]]:
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    return greedy_decode(model, tokenizer, ids, [RETENTION_TOKENS] * len(ids), batch_size)


def _texts(tokenizer, conts: Sequence[List[int]]) -> List[str]:
    return [normalize_text(tokenizer.decode(g, skip_special_tokens=True)) for g in conts]


def _kept(model, tokenizer, base: "HealthBaseline", batch_size: int) -> List[bool]:
    """Per unrelated prompt, whether the greedy continuation is the unedited model's
    (normalised): where the stored token ids are reproduced token for token (one
    teacher-forced pass over prompt ++ ids, :mod:`.shortcuts`), with no decoding; the others
    decode until their text leaves the unedited one, or ends."""
    if S._EXACT_DECODE or base.continuation_ids is None:
        conts = _continuation_ids(model, tokenizer, base.prompts, batch_size)
        return [a == b for a, b in zip(_texts(tokenizer, conts), base.continuations)]
    eos = _eos_ids(tokenizer, model)
    rows = []
    for p, ref in zip(base.prompts, base.continuations):
        ids = prompt_ids(tokenizer, p)
        rows.append(S.Pending(ids, S.budget(model, ids, RETENTION_TOKENS), [("same", ref)]))
        rows[-1].start([], rows[-1].budget == 0)
    S.known_from(model, rows, base.continuation_ids, eos, batch_size)
    S.settle(model, tokenizer, rows, batch_size)
    return [r.answers[0] == 1.0 for r in rows]


def capture_health(
    model,
    tokenizer,
    path: Optional[str] = None,
    *,
    window: int = WINDOW,
    max_windows: int = MAX_WINDOWS,
    prompts: Sequence[str] = UNRELATED_PROMPTS,
    batch_size: int = 8,
) -> HealthBaseline:
    """The unedited model's side of the health figures; call before editing. ``path``: a
    general-text file (``None``: the package's sample); errors name the file."""
    wins, source = text_windows(tokenizer, path, window, "health text")
    windows = torch.tensor(spread(wins, max_windows), dtype=torch.long)
    nll, top = _window_stats(model, windows, batch_size)
    ids = _continuation_ids(model, tokenizer, prompts, 2 * batch_size)
    texts = _texts(tokenizer, ids)
    return HealthBaseline(source, windows, nll, top, list(prompts), texts, ids)


def measure_health(
    model, tokenizer, base: HealthBaseline, batch_size: int = 8
) -> Dict[str, object]:
    """``health_ppl_ratio``, ``health_top1``, ``health_unrelated_kept`` of ``model`` against
    the unedited model's ``base``, and ``health_text`` (where the text came from)."""
    nll, top = _window_stats(model, base.windows, batch_size)
    n_tok = base.argmax.numel()
    ratio = math.exp(float(nll.sum() - base.nll.sum()) / n_tok)
    kept = _kept(model, tokenizer, base, 2 * batch_size)
    return {
        "health_ppl_ratio": ratio,
        "health_top1": float((top == base.argmax).double().mean()),
        "health_unrelated_kept": sum(kept) / len(kept) if kept else None,
        "health_text": base.source,
    }
