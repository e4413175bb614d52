"""The fast lifelong editor.

One turn (:meth:`UltraEditor.edit`):

1. **capture** - per mini-batch, one forward pass with hooks on the edited modules
   and ``torch.autograd.grad`` of the loss with respect to their outputs only.  No
   parameter requires grad during the pass, and the output of the lowest edited
   module is made a leaf, so backward stops there and no weight gradient exists.
   Keys and gradients are kept at answer tokens only, and the output layer and the
   last block's MLP run on answer rows only (:mod:`ultraedit_fast.forward`).
2. **statistics** - the lifelong normaliser merges every (mini-batch, module)
   block in the reference's order, on a copy of its state.
3. **solve** - shift values and a Cholesky solve in fp32 on the smaller side: the
   dual ``N x N`` system, or the primal ``d_in x d_in`` one when ``N > d_in``.
4. **apply** - the low-rank update ``W += a^T kk`` in place (rank N, or rank d_in when
   N > d_in: see :mod:`ultraedit_fast.solve`), fp32 accumulation, one rounding into ``W``.

A turn is atomic: everything that can fail on the turn's data happens before the
first weight is written; if a shift is not finite the turn is refused with no
change; if anything raises while weights are written, the weights already written
are restored from a snapshot (``transactional=True``) and the normaliser keeps its
pre-turn state.

Beyond a turn: :meth:`UltraEditor.rollback` undoes turns from an undo log
(``undo=``), :meth:`UltraEditor.save` / :meth:`UltraEditor.load` checkpoint the
lifelong state atomically (format and undo design: :mod:`ultraedit_fast.persistence`).
"""
from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .backends import Backend, resolve_backend
from .forward import answer_logits, on_device, rows_only_modules, supports_packing
from .presets import module_kind, resolve_edit_config
from .report import PHASES, EditReport, PeakMemory, preserved_model_state
from .requests import IGNORE, as_requests, context_length, make_minibatches, pack_minibatches
from .solve import ShiftSolver, SolveError
from . import persistence
from .persistence import UndoLog


class EditRefused(ValueError):
    """The turn was refused and the model and editor state are unchanged."""


class SharedModelWarning(UserWarning):
    """A second live :class:`UltraEditor` was created on a model that already has one."""


# One lock per model, shared by all its editors: edits of one model never interleave.
DEFAULT_TOKENS_PER_PASS = 512  # UltraEditor(tokens_per_pass=None)
_MODEL_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LIVE_EDITORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _check_undo(undo) -> Union[bool, int]:
    if isinstance(undo, bool):
        return undo
    if isinstance(undo, int):
        if undo < 0:
            raise ValueError(f"undo: expected True, False or a number of turns >= 0, got {undo}")
        return undo if undo > 0 else False
    raise TypeError(f"undo: expected True, False or an int number of turns, got "
                    f"{type(undo).__name__}")


@dataclass
class NormalizerState:
    """Lifelong statistics of ``[k, g]`` rows for one layer shape (or one module).

    ``mean``, ``acc``, ``std``: ``d_in + d_out`` fp32 on the module's device; ``n``: rows seen.
    """

    d_in: int
    d_out: int
    n: int
    mean: torch.Tensor
    acc: torch.Tensor
    std: torch.Tensor

    @classmethod
    def zeros(cls, d_in: int, d_out: int, device) -> "NormalizerState":
        z = lambda: torch.zeros(d_in + d_out, dtype=torch.float32, device=device)  # noqa: E731
        return cls(d_in, d_out, 0, z(), z(), z())

    def clone(self) -> "NormalizerState":
        return NormalizerState(self.d_in, self.d_out, self.n, self.mean.clone(),
                               self.acc.clone(), self.std.clone())


@dataclass
class _Target:
    name: str
    module: torch.nn.Module
    transposed: bool  # Conv1D: weight is d_in x d_out

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def shape(self) -> Tuple[int, int]:
        w = self.module.weight
        return (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])


class _Capture:
    """Hooks that keep, per edited module and mini-batch, the input rows at answer
    tokens and the output tensor (whose gradient is taken after the forward)."""

    def __init__(self, targets: Sequence[_Target], rows_only=frozenset()):
        self.targets = targets
        # modules that the forward runs on answer rows only (forward.rows_only_modules):
        # their inputs and outputs are [1, n, d], every row an answer token's
        self.rows_only = rows_only
        self.mask: Optional[torch.Tensor] = None
        self.n_rows = 0  # mask.sum(), read once per pass
        self.keys: Dict[str, torch.Tensor] = {}
        self.outputs: Dict[str, torch.Tensor] = {}
        self._by_input: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self):
        for t in self.targets:
            self._handles.append(
                t.module.register_forward_hook(self._hook(t.name), with_kwargs=True))
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
            return x[on_device(self.mask, x)]
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] != self.n_rows:
            raise RuntimeError(f"expected {self.n_rows} answer rows, got {tuple(x.shape)}")
        return rows

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            if name in self.outputs:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass; "
                                   "UltraEdit edits modules that run once per token")
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


class UltraEditor:
    """Lifelong UltraEdit editor for a Hugging Face causal LM.

    Args:
        model: the model to edit in place (any device and dtype: fp32, bf16, fp16).
        tokenizer: its tokenizer.
        modules: names of the ``nn.Linear``/``Conv1D`` modules to edit; ``None`` takes
            the model's preset (:mod:`ultraedit_fast.presets`).
        lr: the step; ``None`` takes the preset's.
        batch_size: requests per forward/backward mini-batch (10 in the paper). It sets
            the loss of each token (its mini-batch's mean) and the normaliser's blocks.
        tokens_per_pass: run consecutive mini-batches together, packed (no padding; each
            request in its own positions, none attending to another), in forward/backward
            passes of at most this many tokens (``None``: ``DEFAULT_TOKENS_PER_PASS``, 512); each mini-batch keeps its own mean loss
            and normaliser block, so the turn is the same up to float rounding (ALGORITHM.md
            section 2). Fewer, larger matrix products and no padding: on the benchmarks'
            7B-wide model (2-core CPU, 1 thread) a 100-edit turn's capture took 13.9 s at
            512 against 16.9 s at ``0``; 1024 gave 13.2-13.4 s. Each pass holds the
            activations of the layers above the lowest edited module for its backward:
            at 512, a LLaMA-3-8B-shaped bf16 model's turn (preset layers, a backward over
            21 layers) peaked at 1.79 GiB beside 14.96 GiB of weights, counted on the CPU
            (``benchmarks/README.md``; not yet measured on a GPU). Applies where
            :func:`~ultraedit_fast.forward.supports_packing` holds (checked once per
            model); elsewhere, and with ``0``, one padded mini-batch per pass, as the
            reference runs them.
        share_normalizer: one lifelong normaliser per layer shape (the published
            behaviour) rather than one per module.
        transactional: snapshot each weight before writing it so that a failure while
            writing restores the pre-turn model. Costs one host buffer the size of the
            edited weights, allocated at the first turn and kept (pinned for CUDA
            weights), and one copy into it per turn. Shifts are always checked for
            finiteness before any weight is written, whatever this flag; with it, the
            shifted weights are checked too (an overflow of fp16 refuses the turn).
        undo: keep an undo log for :meth:`rollback`: ``False`` (the default: no log, no
            cost), ``True`` (every turn) or ``k`` (the last ``k`` turns). The log holds,
            in host memory, the edited weights as they were before the first logged
            turn, once, plus per turn ``sum over modules of N x d_out x 4`` bytes and
            ``sum over distinct inputs of N x d_in x 4`` bytes (``N``: the turn's answer
            tokens). SmolLM2-135M's preset (five ``up_proj``, 1536 x 576 fp32) at
            ``N = 400``: 17.7 MB once and 16.9 MB per turn; LLaMA-3-8B's (12 gate/up
            projections, 14336 x 4096 bf16): 1.41 GB once and 353 MB per turn. A bounded
            log folds its oldest turn into the base copy (one extra rank update of the
            edited weights per turn). See :mod:`ultraedit_fast.persistence`.

    Requests are validated before anything runs: an empty or whitespace-only prompt or
    target, a target that tokenises to no tokens, and a request longer than the model's
    context (``max_position_embeddings``) are refused with a ``ValueError`` naming
    ``requests[i]``; nothing is truncated. The package pads mini-batches itself (right
    padding, ids 0, labels -100), so the tokenizer's pad token and padding side do not
    matter: a tokenizer without a pad token or with left padding edits identically.

    A turn that cannot be made (non-finite keys, gradients, shifts or shifted weights,
    a singular system) raises :class:`EditRefused` (a ``ValueError``) and leaves the
    model and the editor's state as they were, byte for byte.

    Concurrency: one editor per model is the intended use. Creating a second
    ``UltraEditor`` on a model that still has a live one warns
    (:class:`SharedModelWarning`): each keeps its own lifelong normaliser, so their
    edits do not compose as one lifelong run. All editors of one model share one
    lock: concurrent :meth:`edit`, :meth:`rollback` and :meth:`save` calls, from any
    thread and any editor of that model, run one after another, never interleaved.

    Persistence: :meth:`save` writes the lifelong state (and the undo log) to a
    directory, atomically; :meth:`load` restores it onto the same model. The model's
    own weights are the user's to save (``safetensors.torch.save_model``).
    """

    def __init__(self, model, tokenizer, modules: Optional[Sequence[str]] = None,
                 lr: Optional[float] = None, batch_size: int = 10, *,
                 backend: Optional[str] = None, share_normalizer: bool = True,
                 transactional: bool = True, undo: Union[bool, int] = False,
                 tokens_per_pass: Optional[int] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError("tokenizer: expected a Hugging Face tokenizer (callable), got "
                            f"{type(tokenizer).__name__}")
        cfg = resolve_edit_config(model, modules, lr, batch_size)
        undo = _check_undo(undo)
        if getattr(model, "hf_device_map", None) is None:  # accelerate offload uses meta
            meta = [n for n, p in model.named_parameters() if p.is_meta]
            if meta:
                raise ValueError(f"model: {len(meta)} parameters are on the meta device (e.g. "
                                 f"{meta[0]!r}); load the model's weights before editing")
        self.model = model
        self.tokenizer = tokenizer
        self.module_names: List[str] = cfg.modules
        self.lr: float = cfg.lr
        self.preset: str = cfg.preset
        self.batch_size = batch_size
        if tokens_per_pass is None:
            tokens_per_pass = DEFAULT_TOKENS_PER_PASS
        if isinstance(tokens_per_pass, bool) or not isinstance(tokens_per_pass, int) \
                or tokens_per_pass < 0:
            raise ValueError("tokens_per_pass: expected an int >= 0 (0: no packing), got "
                             f"{tokens_per_pass!r}")
        self.tokens_per_pass = tokens_per_pass
        self.share_normalizer = bool(share_normalizer)
        self.transactional = bool(transactional)
        self.targets = [_Target(n, *module_kind(model, n)) for n in self.module_names]
        self.backend_request = backend
        self.backends: Dict[torch.device, Backend] = {}
        for t in self.targets:  # fail now, not mid-turn, on a missing backend
            self._backend(t.weight.device)
        self.normalizers: Dict[object, NormalizerState] = {}
        self.turns = 0
        self._snapshot_buffers: Dict[str, torch.Tensor] = {}  # transactional: host copies
        self.undo: Union[bool, int] = undo
        self._undo: Optional[UndoLog] = None
        if undo:
            self._undo = UndoLog(None if undo is True else int(undo))
        with _REGISTRY_LOCK:
            other = _LIVE_EDITORS.get(model)
            if other is not None and other() is not None:
                warnings.warn(
                    "model: it already has a live UltraEditor; each editor keeps its own "
                    "lifelong normaliser, so edits through both do not compose as one "
                    "lifelong run (their edits are serialised, never interleaved)",
                    SharedModelWarning, stacklevel=2)
            _LIVE_EDITORS[model] = weakref.ref(self)
            self._lock = _MODEL_LOCKS.get(model)
            if self._lock is None:
                self._lock = _MODEL_LOCKS[model] = threading.RLock()

    # ------------------------------------------------------------------ helpers
    @property
    def backend(self) -> str:
        """Name of the backend of the edited modules' device(s)."""
        return ",".join(sorted({b.name for b in self.backends.values()}))

    def _backend(self, device) -> Backend:
        device = torch.device(device)
        if device not in self.backends:
            self.backends[device] = resolve_backend(self.backend_request, device)
        return self.backends[device]

    def normalizer_key(self, target: _Target):
        return target.shape if self.share_normalizer else target.name

    def _state(self, target: _Target) -> NormalizerState:
        # A new key's zero state is committed with the turn, not before: a refused
        # turn leaves ``normalizers`` exactly as it was.
        state = self.normalizers.get(self.normalizer_key(target))
        if state is None:
            state = NormalizerState.zeros(*target.shape, target.weight.device)
        return state

    @staticmethod
    def _sync(device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # ------------------------------------------------------------------ the turn
    def edit(self, requests) -> EditReport:
        """Run one turn over ``requests`` (``EditRequest``s or dicts with the same keys),
        in mini-batches of ``batch_size``. Returns an :class:`EditReport`."""
        requests = as_requests(requests)
        with self._lock:
            return self._edit(requests)

    def _edit(self, requests) -> EditReport:
        model = self.model
        pre_states = dict(self.normalizers)  # committed states are never changed in place
        device = model.get_input_embeddings().weight.device
        batches = make_minibatches(self.tokenizer, requests, self.batch_size,
                                   context_length(model))
        seconds = dict.fromkeys(PHASES, 0.0)
        peak = PeakMemory(device)
        t_start = time.perf_counter()

        # 1. capture ------------------------------------------------------------
        keys: Dict[str, List[torch.Tensor]] = {t.name: [] for t in self.targets}
        grads: Dict[str, List[torch.Tensor]] = {t.name: [] for t in self.targets}
        with preserved_model_state(model), torch.enable_grad():
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            passes = batches  # the probe runs once per model, before any hook is in place
            if self.tokens_per_pass and supports_packing(model):
                passes = pack_minibatches(batches, self.tokens_per_pass)
            with _Capture(self.targets, rows_only_modules(model)) as cap:
                n_tokens = self._capture(passes, cap, device, keys, grads)
        self._sync(device)
        t1 = time.perf_counter()
        seconds["capture"] = t1 - t_start

        # 2. statistics, on copies of the lifelong states ----------------------------
        groups: Dict[object, List[_Target]] = {}
        for t in self.targets:
            groups.setdefault(self.normalizer_key(t), []).append(t)
        new_states: Dict[object, NormalizerState] = {}
        for key, members in groups.items():
            state = self._state(members[0]).clone()
            ks, gs = [], []
            for b in range(len(batches)):  # reference order: mini-batch, then module
                for t in members:
                    ks.append(keys[t.name][b])
                    gs.append(grads[t.name][b])
            self._backend(state.mean.device).normalizer_update_(
                state.mean, state.acc, state.std, ks, gs, state.n)
            state.n += sum(k.shape[0] for k in ks)
            new_states[key] = state
        self._sync(device)
        t2 = time.perf_counter()
        seconds["statistics"] = t2 - t1

        # 3. solve --------------------------------------------------------------------
        plan = []
        solvers: Dict[Tuple[int, ...], ShiftSolver] = {}
        for t in self.targets:
            shared = tuple(id(k) for k in keys[t.name])  # same input tensors, same factor
            if shared not in solvers:
                try:
                    solvers[shared] = ShiftSolver(torch.cat(keys[t.name]).to(torch.float32))
                except SolveError as e:
                    raise EditRefused(f"{e} for module {t.name!r}; the model and the editor "
                                      "state are unchanged") from None
            solver = solvers[shared]
            state = new_states[self.normalizer_key(t)]
            v = self._backend(t.weight.device).shift_values(
                solver.k, torch.cat(grads[t.name]), state.mean, state.std, self.lr)
            plan.append((t, *solver.factors(v)))
        finite = torch.stack([torch.isfinite(a).all() for _, a, _ in plan]
                             + [torch.isfinite(s.std).all() for s in new_states.values()])
        if not bool(finite.all()):
            bad = [t.name for t, a, _ in plan if not bool(torch.isfinite(a).all())]
            raise EditRefused(f"the turn was refused: non-finite shift for modules {bad} "
                              "(non-finite activations or gradients, or lr too large); "
                              "the model and the editor state are unchanged")
        self._sync(device)
        t3 = time.perf_counter()
        seconds["solve"] = t3 - t2

        # 4. apply: all shifts were computed from the pre-turn model ------------------
        undo_entry = None if self._undo is None else self._undo.prepare(self, plan, pre_states)
        self._apply(plan)
        self._sync(device)
        t4 = time.perf_counter()
        seconds["apply"] = t4 - t3

        for key, state in new_states.items():  # commit
            self.normalizers[key] = state
        self.turns += 1
        if undo_entry is not None:
            self._undo.push(self, undo_entry)
        return EditReport(n_requests=len(requests), n_tokens=n_tokens, turn=self.turns,
                          backend=self.backend, device=str(device), seconds=seconds,
                          total_seconds=t4 - t_start, peak_memory_bytes=peak.read(),
                          peak_memory_kind=peak.kind, modules=list(self.module_names))

    def _capture(self, passes, cap: _Capture, device, keys, grads) -> int:
        """Forward and backward of each pass (a padded mini-batch or a packed run of
        them); appends one key and one gradient block per (mini-batch, module) to
        ``keys``/``grads``. Returns the number of answer tokens."""
        model, n_tokens = self.model, 0
        for batch in passes:
            counts = batch.counts or [batch.n_tokens]  # answer tokens per mini-batch, counted
            batch = batch.to(device)                   # on the host: no device sync per pass
            mask = batch.labels != IGNORE
            cap.mask, cap.n_rows = mask, sum(counts)
            logits = answer_logits(model, batch.input_ids, batch.attention_mask, mask,
                                   batch.position_ids)
            labels = batch.labels[mask].to(logits.device)
            if batch.token_weights is None:  # one mini-batch: its mean
                loss = F.cross_entropy(logits.float(), labels)
            else:  # packed: each mini-batch's mean, summed (ALGORITHM.md section 2)
                loss = (F.cross_entropy(logits.float(), labels, reduction="none")
                        * batch.token_weights.to(logits.device)).sum()
            missing = [t.name for t in self.targets if t.name not in cap.outputs]
            if missing:
                raise RuntimeError(f"modules {missing} did not run in the forward pass")
            gouts = torch.autograd.grad(loss, [cap.outputs[t.name] for t in self.targets])
            split: Dict[int, Tuple[torch.Tensor, ...]] = {}
            for t, g in zip(self.targets, gouts):
                k = cap.keys[t.name]  # one tensor for modules fed the same input
                if id(k) not in split:
                    split[id(k)] = k.split(counts)
                keys[t.name].extend(split[id(k)])  # one block per mini-batch
                grads[t.name].extend(cap.rows(t.module, g).split(counts))
            n_tokens += cap.n_rows
            del logits, loss, gouts, split
            cap.reset()
        return n_tokens

    def _snapshot(self, t: _Target) -> torch.Tensor:
        """Copy ``t``'s weight into its host buffer, allocated once and reused every turn
        (pinned for CUDA weights, so the copy runs at full bus speed)."""
        w = t.weight.detach()
        buf = self._snapshot_buffers.get(t.name)
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
            buf = torch.empty(w.shape, dtype=w.dtype, device="cpu",
                              pin_memory=w.device.type == "cuda")
            self._snapshot_buffers[t.name] = buf
        buf.copy_(w)
        return buf

    def _apply(self, plan) -> None:
        snapshots: List[Tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            try:
                for t, a, kk in plan:
                    w = t.weight
                    if self.transactional:
                        snapshots.append((w, self._snapshot(t)))
                    self._backend(w.device).rank_update_(w.data, a, kk, t.transposed)
                if self.transactional:  # a finite shift can still overflow fp16/bf16
                    ok = torch.stack([self._backend(t.weight.device).all_finite(
                        t.weight.detach()).to("cpu") for t, _, _ in plan])
                    bad = [t.name for (t, _, _), f in zip(plan, ok.tolist()) if not f]
                    if bad:
                        raise EditRefused(
                            f"the turn was refused: the shifted weights of modules {bad} are "
                            "not finite (overflow of their dtype: lr too large); the model and "
                            "the editor state are unchanged")
            except BaseException:
                for w, saved in snapshots:
                    w.data.copy_(saved)
                raise

    # ------------------------------------------------------------------ undo
    @property
    def undo_turns(self) -> int:
        """How many turns :meth:`rollback` can undo now."""
        return 0 if self._undo is None else len(self._undo)

    def undo_memory(self) -> Dict[str, object]:
        """Host bytes held by the undo log: ``{"base": ..., "turns": [per turn], "total": ...}``."""
        if self._undo is None:
            return {"base": 0, "turns": [], "total": 0}
        return self._undo.memory_bytes()

    def rollback(self, turns: int = 1) -> None:
        """Undo the last ``turns`` turns: the edited weights, the lifelong normaliser
        states and the turn count return exactly to what they were before those turns
        (bit for bit on the CPU: the base copy is restored and the kept turns' factors
        are replayed with the kernel that applied them). Needs ``undo=`` at construction;
        raises ``ValueError`` when fewer than ``turns`` turns are logged. If it raises
        midway (out of memory), the log is intact and calling it again completes it.

        The log assumes the edited weights change only through this editor: weights
        written from outside between turns are overwritten by a rollback."""
        if isinstance(turns, bool) or not isinstance(turns, int):
            raise TypeError(f"turns: expected an int, got {type(turns).__name__}")
        if turns < 1:
            raise ValueError(f"turns: expected a number of turns >= 1, got {turns}")
        with self._lock:
            if self._undo is None:
                raise ValueError("rollback: this editor keeps no undo log; build it with "
                                 "UltraEditor(..., undo=True) or undo=<number of turns>")
            available = len(self._undo)
            if turns > available:
                raise ValueError(f"turns: {turns} turns to undo, but only {available} can be "
                                 f"(undo={self.undo!r}, {self.turns} turns made)")
            self._undo.rollback(self, turns)

    # ------------------------------------------------------------------ persistence
    def save(self, path, *, undo_log: bool = True) -> str:
        """Save the lifelong state (normaliser states, turn count, configuration, model
        fingerprint and, with ``undo_log``, the undo log) to the directory ``path``,
        atomically: a crash at any moment leaves the previous checkpoint loadable.
        Returns the manifest's path. The model's weights are not saved: save them too
        (``safetensors.torch.save_model(model, ...)``). Format:
        :mod:`ultraedit_fast.persistence`."""
        with self._lock:
            return persistence.save_editor(self, path, undo_log=undo_log)

    @classmethod
    def load(cls, path, model, tokenizer, **overrides) -> "UltraEditor":
        """An editor that continues the lifelong state saved at ``path`` on ``model``
        (whose weights should be those saved with it: a mismatch warns with
        :class:`~ultraedit_fast.persistence.CheckpointWeightsWarning`). ``overrides``
        may change ``lr``, ``batch_size``, ``backend``, ``transactional`` and ``undo``;
        ``modules`` and ``share_normalizer`` are fixed by the checkpoint. Continuing with
        the saved settings gives bit for bit the turns an uninterrupted editor would.

        Raises ``ValueError`` naming the difference when ``model`` is not the model the
        checkpoint was saved from (architecture, edited modules' shapes and dtypes,
        parameter names and shapes), and naming the file when the checkpoint is
        truncated, tampered with or not one; ``FileNotFoundError`` when ``path`` does
        not exist. Reads JSON and safetensors only: loading never runs code."""
        return persistence.load_editor(cls, path, model, tokenizer, overrides)


def fast_edit(model, tokenizer, requests, *, editor: Optional[UltraEditor] = None,
              **options) -> EditReport:
    """Edit ``model`` with ``requests`` in one call.

    ``options`` are :class:`UltraEditor`'s (``modules``, ``lr``, ``batch_size``,
    ``backend``, ...). Pass ``editor=`` to continue an existing editor's lifelong state
    (then ``options`` must be empty and ``model`` must be the editor's model).
    """
    if editor is not None:
        if not isinstance(editor, UltraEditor):
            raise TypeError(f"editor: expected an UltraEditor, got {type(editor).__name__}")
        if options:
            raise ValueError(f"editor: options {sorted(options)} cannot be combined with an "
                             "existing editor; its configuration is fixed")
        if editor.model is not model:
            raise ValueError("editor: it edits a different model than `model`")
        return editor.edit(requests)
    return UltraEditor(model, tokenizer, **options).edit(requests)
