"""LocFT-BF: localised fine-tuning, breadth first (Yang et al., "Fine-tuning Done Right in
Model Editing", ICLR 2026, arXiv 2509.22072), as a lifelong editor of this package.

The method, as the authors' code runs it (``fine-tune.py``, ``hparams/*.yaml``):

- one weight is trained, the down-projection of one decoder block's MLP; every other
  parameter is frozen (no bias, no other module);
- every target is the answer followed by the end-of-sequence token, so that the edited
  model stops after the answer;
- the loss is the cross-entropy of the answer tokens (and the EOS) given the prompt,
  averaged over each request's tokens and then over the requests of the mini-batch; the
  prompt and the padding carry no loss;
- **breadth first**: epochs over all the edits in shuffled mini-batches, one Adam step per
  mini-batch (not one request trained to convergence after another);
- a mini-batch whose loss is already below ``1e-2`` takes no step, and training stops after
  the first epoch whose mean loss (over its requests, measured before each step) is below
  ``1e-2``;
- Adam, weight decay 0, no gradient clipping, no scheduler, the model in eval mode.

**Lifelong.** The published method sees all the edits at once. Here each :meth:`edit` call
is one turn of a lifelong stream: it runs the breadth-first epochs over that turn's requests
only, starting from the weight the earlier turns left. Adam starts afresh every turn by
default, as every run of the published code does (``keep_optimizer=False``): moments
carried over would push the first steps of a turn along the previous turn's gradients.
``keep_optimizer=True`` keeps them (the step counter too).

**Hyper-parameters.** The published values are for 7-8B models and one run of 3000 edits:

=================  =========================  ===========================================
option             published                  here (defaults)
=================  =========================  ===========================================
``epochs``         25                         25: kept
stop loss          1e-2                       1e-2: kept (``stop_loss``)
weight decay       0                          0: kept
``lr``             5e-4 (Llama-3-8B,          scaled by the module's fan-in:
                   Qwen2.5-7B)                ``5e-4 x 14336 / d_in``; 4.7e-3 on SmolLM2
``batch_size``     100 (30 steps an epoch)    8 (13 steps an epoch on a 100-edit turn)
layer              22 of 32 (Llama-3-8B),     the same relative depth: 22/32 (Llama and
                   6 of 28 (Qwen2.5-7B),      the others), 6/28 (Qwen2), 23/32 (Mistral):
                   23 of 32 (Mistral-7B)      layer 21 of SmolLM2-135M's 30
=================  =========================  ===========================================

``lr``: Adam moves every entry of the weight by about ``lr`` a step whatever the gradient's
scale, so the change a step makes to the module's output grows with its fan-in ``d_in``
(the MLP's intermediate width: 14336 in Llama-3-8B, 1536 in SmolLM2-135M). The default
keeps the published step's effect on the output: ``5e-4`` at Llama-3-8B's fan-in, scaled
by ``14336 / d_in`` (Qwen2.5-7B's 18944 would give 3.8e-4 against its published 5e-4).
Measured on SmolLM2-135M, CPU, the first 8 edits of zsRE's training split in one mini-batch
of 8, 25 epochs: at the unscaled 5e-4 the loss went from 8.66 to 3.27 and never reached
the stop loss (teacher-forced answer-token accuracy 0.24 -> 0.47, rephrases 0.15 -> 0.38);
at 5e-3 it stopped after 18 epochs (17 steps) with accuracy 1.0 (rephrases 0.96).
Mistral's published run trains a whole block at 5e-5; here it is that block's
down-projection at the scaled rate.

``batch_size`` sets the number of Adam steps a turn can take (``epochs x ceil(n /
batch_size)``). The published run has 30 mini-batches an epoch; a lifelong turn of the
package's default size (100 edits) in mini-batches of 100 would get one step an epoch.
Mini-batches of 8 keep the published order of magnitude of steps per epoch on such turns.

The layer follows the authors' choice per family as a relative depth,
``depth x layers`` rounded to the nearest (halves up): 22/32 gives layer 22 of Llama-3-8B and layer 21 of SmolLM2-135M
(a Llama); other families take Llama-3's depth.

Other differences: the answer is tokenised as the package scores it, ``" " + target``
(the authors add the space only when the target lacks one); mini-batches are right-padded
by the package (the authors left-pad; with the attention mask and rotary positions the
loss is the same up to rounding); the per-epoch shuffle draws
from a generator seeded by ``seed`` and the turn, so a run is reproducible; the weight is
trained through an fp32 master copy, so a bf16/fp16 model takes Adam's small steps (on an
fp32 model this is exactly training the weight itself).

A turn is all or nothing: if its loss or gradient is not finite it is refused with
:class:`~ultraedit_fast.editors.EditRefused`, and if anything raises midway the weight (and
the kept Adam state) is restored from a copy taken before the first step.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..editors import EditRefused
from ..core.report import EditReport
from ..model.forward import answer_logits, input_device, preserved_model_state
from ..model.requests import (
    IGNORE,
    TokenizedRequest,
    as_requests,
    check_fits,
    context_length,
    pad_batch,
    tokenize_pair,
)
from ..model.targets import editable_modules, resolve_target, summarize_names
from ..parallel.concurrency import model_locks
from ..utils.checks import check_bool, check_positive_float, check_positive_int
from ..utils.environment import PeakMemory

__all__ = ["LocFTConfig", "LocFTEditor", "default_module", "default_lr", "PUBLISHED_DEPTH"]

#: model_type -> the relative depth of the published layer (layer / number of layers)
PUBLISHED_DEPTH = {"llama": 22 / 32, "qwen2": 6 / 28, "mistral": 23 / 32}
#: the relative depth for other families: Llama-3-8B's
DEFAULT_DEPTH = PUBLISHED_DEPTH["llama"]
#: the published Adam rate, and the fan-in of the down-projection it was set for (Llama-3-8B)
PUBLISHED_LR, PUBLISHED_FAN_IN = 5e-4, 14336
_DOWN_PROJECTIONS = ("down_proj", "fc_out", "c_proj", "fc2", "dense_4h_to_h")


def _blocks(model):
    """``(name, ModuleList)`` of the decoder blocks: the first ``layers`` or ``h`` list."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h"):
            if len(m) > 0:
                return name, m
    return None, None


def default_module(model) -> str:
    """The down-projection of the MLP of the block at the published relative depth of the
    model's family (:data:`PUBLISHED_DEPTH`, else :data:`DEFAULT_DEPTH`)."""
    prefix, blocks = _blocks(model)
    if blocks is None:
        raise ValueError(
            "module: no default for this model (no decoder blocks found); pass module= "
            f"one of {summarize_names(editable_modules(model))}"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    depth = PUBLISHED_DEPTH.get(model_type, DEFAULT_DEPTH)
    layer = min(len(blocks) - 1, int(depth * len(blocks) + 0.5))  # halves round up
    mlp = getattr(blocks[layer], "mlp", None)
    for down in _DOWN_PROJECTIONS:
        if isinstance(getattr(mlp, down, None), torch.nn.Module):
            return f"{prefix}.{layer}.mlp.{down}"
    raise ValueError(
        f"module: no MLP down-projection found in block {layer}; pass module= one of "
        f"{summarize_names(editable_modules(model))}"
    )


def default_lr(target) -> float:
    """The published rate at Llama-3-8B's fan-in, scaled to ``target``'s:
    ``5e-4 x 14336 / d_in`` (the module's docstring says why)."""
    d_in = target.shape[0]
    return PUBLISHED_LR * PUBLISHED_FAN_IN / d_in


def _non_negative(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a finite float >= 0, got {type(v).__name__}")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: expected a finite float >= 0, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class LocFTConfig:
    """The options of :class:`LocFTEditor`, checked and resolved (``module`` filled in)."""

    module: str
    lr: float
    epochs: int = 25
    batch_size: int = 8
    stop_loss: float = 1e-2
    weight_decay: float = 0.0
    keep_optimizer: bool = False
    eos: bool = True
    seed: int = 0
    chat_template: bool = False
    measure_memory: bool = False

    def __post_init__(self):
        if not isinstance(self.module, str) or not self.module:
            raise TypeError(f"module: expected a module name (str), got {self.module!r}")
        object.__setattr__(self, "lr", check_positive_float("lr", self.lr))
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        object.__setattr__(self, "stop_loss", _non_negative("stop_loss", self.stop_loss))
        object.__setattr__(self, "weight_decay", _non_negative("weight_decay", self.weight_decay))
        for name in ("keep_optimizer", "eos", "chat_template", "measure_memory"):
            check_bool(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed: expected an int, got {type(self.seed).__name__}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class LocFTEditor:
    """Lifelong LocFT-BF: each :meth:`edit` fine-tunes one MLP down-projection with Adam,
    breadth first, on that turn's requests (the module's docstring: method, defaults and
    what was scaled).

    ``LocFTEditor(model, tokenizer, module=None, lr=None, epochs=25, batch_size=8,
    stop_loss=1e-2, weight_decay=0.0, keep_optimizer=False, eos=True, seed=0,
    chat_template=False, measure_memory=False)``

    Args:
        module: the ``nn.Linear`` (or GPT-2 ``Conv1D``) to train; ``None``: the MLP
            down-projection at the published relative depth (:func:`default_module`).
        lr: Adam's rate; ``None``: the published rate scaled to the module's fan-in
            (:func:`default_lr`).
        weight_decay: Adam's.
        epochs: at most this many epochs over a turn's requests.
        batch_size: requests per mini-batch (one Adam step each).
        stop_loss: a mini-batch whose loss is below it takes no step; the turn stops after
            the first epoch whose mean loss is below it (``0``: every epoch runs).
        keep_optimizer: keep Adam's moments across turns (default: a fresh Adam per turn).
        eos: append the tokenizer's EOS token to every target (the published method does).
        seed: seeds the per-epoch shuffles (with the turn number).
        chat_template: feed prompts in the tokenizer's chat template.
        measure_memory: record the turn's peak memory in its report.

    After a turn, ``last_turn`` holds its training record: ``epoch_losses`` (mean loss of
    each epoch run), ``epochs`` (how many ran), ``steps`` (Adam steps taken), ``stopped``
    (whether the stop loss ended it before ``epochs``).
    """

    name = "locft-bf"

    def __init__(
        self,
        model,
        tokenizer,
        module: Optional[str] = None,
        *,
        lr: Optional[float] = None,
        epochs: int = 25,
        batch_size: int = 8,
        stop_loss: float = 1e-2,
        weight_decay: float = 0.0,
        keep_optimizer: bool = False,
        eos: bool = True,
        seed: int = 0,
        chat_template: bool = False,
        measure_memory: bool = False,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(
                "tokenizer: expected a Hugging Face tokenizer (callable), "
                f"got {type(tokenizer).__name__}"
            )
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module: expected a module name (str), got {module!r}")
        self.target = _resolve(model, default_module(model) if module is None else module)
        self._config = LocFTConfig(
            module=self.target.name,
            lr=default_lr(self.target) if lr is None else lr,
            epochs=epochs,
            batch_size=batch_size,
            stop_loss=stop_loss,
            weight_decay=weight_decay,
            keep_optimizer=keep_optimizer,
            eos=eos,
            seed=seed,
            chat_template=chat_template,
            measure_memory=measure_memory,
        )
        self.eos_id = _eos_id(tokenizer) if self._config.eos else None
        self.model = model
        self.tokenizer = tokenizer
        self.turns = 0
        self.last_turn: Optional[Dict[str, Any]] = None
        self._master: Optional[torch.Tensor] = None  # fp32 copy of the weight Adam trains
        self._optimizer: Optional[torch.optim.Adam] = None
        self._locks = model_locks(model)

    @property
    def config(self) -> LocFTConfig:
        """The resolved configuration (frozen)."""
        return self._config

    @property
    def module_name(self) -> str:
        return self._config.module

    def describe(self) -> Dict[str, Any]:
        """What a results file records of this editor."""
        c = self._config
        return {
            "editor": self.name,
            "modules": [c.module],
            "lr": c.lr,
            "preset": None,
            "batch_size": c.batch_size,
            "backend": "torch",
            "epochs": c.epochs,
            "stop_loss": c.stop_loss,
            "weight_decay": c.weight_decay,
            "keep_optimizer": c.keep_optimizer,
            "eos": c.eos,
            "seed": c.seed,
        }

    # ------------------------------------------------------------------ the turn
    def edit(self, requests) -> EditReport:
        """One turn: the breadth-first epochs over ``requests`` (``EditRequest`` objects or
        dicts), from the current weight. All or nothing: if it raises, the model and the
        editor are as they were."""
        requests = as_requests(requests)
        t0 = time.perf_counter()
        items = self._tokenize(requests)
        n_tokens = sum(sum(1 for x in t.labels if x != IGNORE) for t in items)
        device = input_device(self.model)
        self._locks.weights.refuse_writer_inside_reading("edit")
        with self._locks.edit, self._locks.weights.writing():
            peak = PeakMemory(device, self._config.measure_memory)
            t1 = time.perf_counter()
            record = self._transaction(items, device)
            t2 = time.perf_counter()
            self.turns += 1
            self.last_turn = record
        return EditReport(
            n_requests=len(requests),
            n_tokens=n_tokens,
            turn=self.turns,
            backend="torch",
            device=str(device),
            seconds={"tokenize": t1 - t0, "train": t2 - t1},
            total_seconds=t2 - t0,
            peak_memory_bytes=peak.read(),
            peak_memory_kind=peak.kind,
            modules=[self._config.module],
        )

    def _tokenize(self, requests) -> List[TokenizedRequest]:
        """Each request as ``input_ids``/``labels`` (labels aligned with the positions that
        predict them), the EOS appended to the answer; ``ValueError`` naming
        ``requests[i]`` for a request that does not tokenise or fit the context."""
        c, tok = self._config, self.tokenizer
        max_length = context_length(self.model)
        items = []
        for i, r in enumerate(requests):
            where = f"requests[{i}]"
            t = tokenize_pair(tok, r.prompt, r.target, None, where, c.chat_template)
            if self.eos_id is not None:  # the last answer token is fed, the EOS predicted
                t = TokenizedRequest(t.input_ids + [t.labels[-1]], t.labels + [self.eos_id])
            if max_length is not None and len(t.input_ids) > max_length:
                raise ValueError(
                    f"{where}: {len(t.input_ids)} tokens (prompt, target"
                    f"{' and EOS' if self.eos_id is not None else ''}) exceed the model's "
                    f"context of {max_length} tokens; shorten the prompt or target"
                )
            items.append(t)
        check_fits(tok, requests, max_length, c.chat_template)
        return items

    def _transaction(self, items, device) -> Dict[str, Any]:
        """Train on ``items``; on any exception restore the weight and Adam's state."""
        w = self.target.module.weight
        with torch.no_grad():
            saved_weight = w.detach().clone()
        kept = self._optimizer if self._config.keep_optimizer else None
        saved_optimizer = None if kept is None else copy.deepcopy(kept.state_dict())
        try:
            with preserved_model_state(self.model), torch.enable_grad():
                record = self._train(items, device)
            if not bool(torch.isfinite(w).all()):
                raise EditRefused(f"{self.name}: the trained weight is not finite; no edit")
            if not self._config.keep_optimizer:
                self._optimizer = None  # its moments are not needed again: free them
            return record
        except BaseException:
            with torch.no_grad():
                w.copy_(saved_weight)
                w.grad = None
            if saved_optimizer is None:
                self._optimizer = None
            else:
                self._optimizer.load_state_dict(saved_optimizer)
            raise

    def _adam(self, w: torch.Tensor) -> torch.optim.Adam:
        """Adam over the fp32 master copy, synced to the weight as it is now."""
        c = self._config
        if self._master is None or self._master.shape != w.shape:
            self._master = torch.empty(w.shape, dtype=torch.float32, device=w.device)
            self._optimizer = None
        with torch.no_grad():
            self._master.copy_(w.detach())
        if self._optimizer is None or not c.keep_optimizer:
            self._optimizer = torch.optim.Adam([self._master], lr=c.lr, weight_decay=c.weight_decay)
        return self._optimizer

    def _train(self, items: List[TokenizedRequest], device) -> Dict[str, Any]:
        """The breadth-first epochs with the published skip and stop rules."""
        c, model = self._config, self.model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        w = self.target.module.weight
        w.requires_grad_(True)
        opt = self._adam(w)
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + self.turns)
        losses: List[float] = []
        steps = 0
        for _ in range(c.epochs):
            order = torch.randperm(len(items), generator=gen).tolist()
            total = 0.0
            for s in range(0, len(order), c.batch_size):
                idx = order[s : s + c.batch_size]
                batch = pad_batch([items[i] for i in idx], idx).to(device)
                loss = self._loss(batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise EditRefused(f"{self.name}: the loss is not finite ({value}); no edit")
                total += value * len(idx)
                if value >= c.stop_loss:
                    self._step(loss, w, opt)
                    steps += 1
            losses.append(total / len(items))
            if losses[-1] < c.stop_loss:
                break
        w.grad = None
        return {
            "epoch_losses": losses,
            "epochs": len(losses),
            "steps": steps,
            "stopped": losses[-1] < c.stop_loss,
        }

    def _loss(self, batch) -> torch.Tensor:
        """Mean over the requests of each request's mean answer-token cross-entropy."""
        mask = batch.labels != IGNORE
        logits = answer_logits(self.model, batch.input_ids, batch.attention_mask, mask)
        labels = batch.labels[mask].to(logits.device)
        per_token = F.cross_entropy(logits.float(), labels, reduction="none")
        rows = mask.nonzero()[:, 0].to(logits.device)
        counts = mask.sum(dim=1).to(logits.device, torch.float32)
        per_request = torch.zeros_like(counts).index_add_(0, rows, per_token) / counts
        return per_request.mean()

    def _step(self, loss: torch.Tensor, w: torch.Tensor, opt: torch.optim.Adam) -> None:
        """One Adam step on the master copy, written back into the weight."""
        w.grad = None
        loss.backward()
        grad = w.grad
        if grad is None or not bool(torch.isfinite(grad).all()):
            raise EditRefused(f"{self.name}: the gradient of {self.module_name} is not finite")
        master = self._master
        master.grad = grad.detach().to(master.dtype)
        opt.step()
        master.grad = None
        w.grad = None
        with torch.no_grad():
            w.copy_(master)


def _resolve(model, name: str):
    """The module to train; ``ValueError`` naming ``module`` when it cannot be."""
    try:
        target = resolve_target(model, name)
    except (TypeError, ValueError) as e:
        raise ValueError(f"module: {str(e).removeprefix('modules: ')}") from None
    if target.tp is not None:
        raise ValueError(f"module: {name!r} is sharded tensor-parallel; LocFT trains whole weights")
    if target.module.weight.is_meta:
        raise ValueError(f"module: {name!r} is on the meta device; load the weights first")
    return target


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if isinstance(eos, bool) or not isinstance(eos, int):
        raise ValueError(
            "eos: the tokenizer has no eos_token_id to append to the targets; "
            "give it one, or pass eos=False"
        )
    return eos
