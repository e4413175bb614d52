"""The fast lifelong editor.

One turn (:meth:`UltraEditor.edit`):

1. **capture** (:mod:`ultraedit_fast.core.capture`) - per pass, one forward with hooks on the
   edited modules and ``torch.autograd.grad`` of the loss with respect to their outputs
   only: no weight gradient. The output layer and the last block's MLP run on answer rows
   only (:mod:`ultraedit_fast.model.forward`).
2. **statistics** (:mod:`ultraedit_fast.core.normalizer`) - the lifelong normaliser merges every
   (mini-batch, module) block in the reference's order, on a copy of its state.
3. **solve** (:mod:`ultraedit_fast.core.solve`) - shift values and a Cholesky solve in fp32 on
   the smaller side: the dual ``N x N`` system, or the primal ``d_in x d_in`` one when
   ``N > d_in``.
4. **apply** - the low-rank update ``W += a^T kk`` in place, fp32 accumulation, one
   rounding into ``W``.

A turn is atomic: everything that can fail on the turn's data happens before the first
weight is written; if a shift is not finite the turn is refused with no change; if anything
raises while weights are written, the weights already written are restored from a snapshot
(``transactional=True``) and the normaliser keeps its pre-turn state.

Beyond a turn: :meth:`UltraEditor.rollback` undoes turns from an undo log
(:mod:`ultraedit_fast.core.undo`), :meth:`UltraEditor.save` / :meth:`UltraEditor.load` checkpoint
the lifelong state atomically (:mod:`ultraedit_fast.storage.checkpoint`).
"""
from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from ..storage import checkpoint as ckpt
from ..core.capture import Capture, capture_passes
from ..parallel.concurrency import model_locks, serving
from ..core.config import EditorConfig, check_overrides, options_doc
from .._log import log
from ..utils.environment import PeakMemory
from ..model.forward import preserved_model_state, rows_only_modules, supports_packing
from ..parallel.distributed import COUNTER, all_true, row_shift_values
from ..storage.export import delta_factors, exact_factors, weight_sha256, write_lora, write_patch
from ..core.hparams import to_options
from ..kernels import Backend, resolve_backend
from ..core.normalizer import NormalizerState
from ..core.presets import FACTS_TURN_MAX, resolve_edit_config
from ..core.report import PHASES, EditReport
from ..model.requests import as_requests, context_length, make_minibatches, pack_minibatches
from ..core.solve import ShiftSolver, SolveError
from ..core.step import StepSearch
from ..model.targets import EditTarget, resolve_target, resolve_targets, summarize_names
from ..core.undo import UndoLog

CheckpointWeightsWarning = ckpt.CheckpointWeightsWarning


class EditRefused(ValueError):
    """The turn was refused and the model and editor state are unchanged."""


class SharedModelWarning(UserWarning):
    """A second live :class:`UltraEditor` was created on a model that already has one."""


_LIVE_EDITORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _option_attribute(name: str, settable: bool = True):
    """``editor.<name>``: the option's value in ``editor.config``; setting it (between
    turns) checks the new value as the constructor would."""
    def get(self):
        return getattr(self.config, name)

    def set_(self, value):
        with self._lock:
            self.config = self.config.replace(**{name: value})

    return property(get, set_ if settable else None,
                    doc=f"The ``{name}`` option (:class:`~ultraedit_fast.core.config.EditorConfig`)"
                        + ("; settable between turns." if settable else "."))


class UltraEditor:
    """Lifelong UltraEdit editor for a Hugging Face causal LM.

    ``UltraEditor(model, tokenizer, modules=None, lr=None, batch_size=10, **options)``

    Args:
        model: the model to edit in place (any device and dtype: fp32, bf16, fp16).
        tokenizer: its tokenizer.
        modules, lr, batch_size and the other options: :class:`~ultraedit_fast.core.config.EditorConfig`
            (listed below). ``modules=None``/``lr=None`` take the model's preset
            (:mod:`ultraedit_fast.core.presets`).

    Costs of the options, in memory:

    - ``tokens_per_pass``: each pass holds the activations of the layers above the lowest
      edited module for its backward; larger passes are fewer, larger matrix products
      (measurements: ``benchmarks/README.md``). Packing applies where
      :func:`~ultraedit_fast.model.forward.supports_packing` holds (checked once per model);
      elsewhere, and with ``0``, one padded mini-batch per pass, as the reference runs them.
    - ``transactional``: one host buffer the size of the edited weights, allocated at the
      first turn and kept (pinned for CUDA weights), and one copy into it per turn. Shifts
      are always checked for finiteness before any weight is written, whatever this flag.
    - ``undo``: host memory for the edited weights as they were before the first logged
      turn, once, plus per turn ``sum over modules of N x d_out x 4`` bytes and ``sum over
      distinct inputs of N x d_in x 4`` bytes (``N``: the turn's answer tokens). A bounded
      log folds its oldest turn into the base copy (one extra rank update per turn).

    Requests are validated before anything runs: an empty or whitespace-only prompt or
    target, a target that tokenises to no tokens, and a request longer than the model's
    context (``max_position_embeddings``) are refused with a ``ValueError`` naming
    ``requests[i]``; nothing is truncated. The package pads mini-batches itself (right
    padding, ids 0, labels -100), so the tokenizer's pad token and padding side do not
    matter.

    A turn that cannot be made (non-finite keys, gradients, shifts or shifted weights,
    a singular system) raises :class:`EditRefused` (a ``ValueError``) and leaves the
    model and the editor's state as they were, byte for byte.

    Concurrency: one editor per model is the intended use. Creating a second
    ``UltraEditor`` on a model that still has a live one warns
    (:class:`SharedModelWarning`): each keeps its own lifelong normaliser, so their
    edits do not compose as one lifelong run. All editors of one model share one
    lock: concurrent :meth:`edit`, :meth:`rollback` and :meth:`save` calls, from any
    thread and any editor of that model, run one after another, never interleaved.
    The model can keep serving in other threads while it is edited: the editor's hooks
    act for its own thread only, and forward passes run inside :meth:`serving` (or
    :func:`ultraedit_fast.serving`) see every turn whole or not at all
    (:mod:`ultraedit_fast.parallel.concurrency`).

    Persistence: :meth:`save` writes the lifelong state (and the undo log) to a
    directory, atomically; :meth:`load` restores it onto the same model. The model's
    own weights are the user's to save (``safetensors.torch.save_model``).

    Options:
    """

    def __init__(self, model, tokenizer, *args, **options):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError("tokenizer: expected a Hugging Face tokenizer (callable), got "
                            f"{type(tokenizer).__name__}")
        cfg = EditorConfig.from_call(args, options)
        self.model = model
        self.tokenizer = tokenizer
        # the preset's regime is left to the first turn's size when nothing fixes it
        self._regime_open = cfg.modules is None and cfg.lr is None and cfg.regime is None
        self._requested = cfg
        self._resolve(cfg.regime or "stream")
        if getattr(model, "hf_device_map", None) is None:  # accelerate offload uses meta
            meta = [n for n, p in model.named_parameters() if p.is_meta]
            if meta:
                raise ValueError(f"model: {len(meta)} parameters are on the meta device (e.g. "
                                 f"{meta[0]!r}); load the model's weights before editing")
        self.normalizers: Dict[object, NormalizerState] = {}
        self.turns = 0
        self._base_sha: Dict[str, str] = {}  # the original edited weights' sha256 (patches)
        self._snapshot_buffers: Dict[str, torch.Tensor] = {}  # transactional: host copies
        self._undo: Optional[UndoLog] = None
        if self.undo:
            self._undo = UndoLog(None if self.undo is True else int(self.undo))
        with _REGISTRY_LOCK:
            other = _LIVE_EDITORS.get(model)
            if other is not None and other() is not None:
                warnings.warn(
                    "model: it already has a live UltraEditor; each editor keeps its own "
                    "lifelong normaliser, so edits through both do not compose as one "
                    "lifelong run (their edits are serialised, never interleaved)",
                    SharedModelWarning, stacklevel=2)
            _LIVE_EDITORS[model] = weakref.ref(self)
        locks = model_locks(model)
        self._lock = locks.edit  # editors of one model: one after another
        self._weights_lock = locks.weights  # writers of its weights vs. serving()

    def _settle_regime(self, first_turn_size: int) -> None:
        """The first turn decides the preset's regime (when nothing else fixed it); a caller
        that knows the turn size ahead (a lifelong run) may settle it before."""
        if self._regime_open:
            if not self.turns and first_turn_size <= FACTS_TURN_MAX:
                self._resolve("facts")
            self._regime_open = False

    def _resolve(self, regime: str) -> None:
        """Modules, lr, step and targets from the requested options and the preset's
        ``regime``; checks that the backend of every module's device is there."""
        cfg = self._requested
        resolved = resolve_edit_config(self.model, cfg.modules, cfg.lr, regime)
        # step None: the search in the facts regime with the preset's lr, else the paper's
        step = cfg.step or ("auto" if cfg.lr is None and resolved.regime == "facts"
                            else "paper")
        self.config = cfg.replace(modules=tuple(resolved.modules), lr=resolved.lr, step=step,
                                  regime=resolved.regime if cfg.lr is None or
                                  cfg.modules is None else cfg.regime)
        self.preset = resolved.preset
        if resolved.preset != "user" or cfg.lr is None:
            log.info("ultraedit_fast: preset %r: %s, lr %g, step %s", resolved.preset,
                     summarize_names(resolved.modules), resolved.lr, step)
        self.targets = resolve_targets(self.model, self.module_names)
        self._tp = _tensor_parallel_of(self.targets)
        self.backends = {}
        for t in self.targets:  # fail now, not mid-turn, on a missing backend
            self._backend(t.weight.device)

    # ------------------------------------------------------------------ options
    @property
    def module_names(self) -> List[str]:
        return list(self.config.modules)

    @property
    def backend_request(self) -> Optional[str]:
        return self.config.backend

    lr = _option_attribute("lr")
    batch_size = _option_attribute("batch_size")
    tokens_per_pass = _option_attribute("tokens_per_pass")
    measure_memory = _option_attribute("measure_memory")
    transactional = _option_attribute("transactional")
    share_normalizer = _option_attribute("share_normalizer", settable=False)
    undo = _option_attribute("undo", settable=False)

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

    def _rank_update(self, w, a, kk, transposed) -> None:
        """The rank update of the weight's device: what applied a turn, for the undo log."""
        self._backend(w.device).rank_update_(w, a, kk, transposed)

    def normalizer_key(self, target: EditTarget):
        return target.shape if self.share_normalizer else target.name

    def _state(self, target: EditTarget) -> NormalizerState:
        # A new key's zero state is committed with the turn, not before: a refused
        # turn leaves ``normalizers`` exactly as it was.
        state = self.normalizers.get(self.normalizer_key(target))
        if state is None:
            state = NormalizerState.zeros(*target.local_shape, target.weight.device)
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
        self._settle_regime(len(requests))
        if not self.turns and not self._base_sha:  # what a patch will name as its base
            with torch.no_grad():
                self._base_sha = {t.name: weight_sha256(t.weight) for t in self.targets}
        model = self.model
        pre_states = dict(self.normalizers)  # committed states are never changed in place
        device = model.get_input_embeddings().weight.device
        batches = make_minibatches(self.tokenizer, requests, self.batch_size,
                                   context_length(model), self.config.chat_template)
        seconds = dict.fromkeys(PHASES, 0.0)
        peak = PeakMemory(device, self.config.measure_memory)
        sent0 = COUNTER.bytes
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
            with Capture(self.targets, rows_only_modules(model)) as cap:
                n_tokens = capture_passes(model, passes, cap, device, keys, grads)
        self._sync(device)
        t1 = time.perf_counter()
        seconds["capture"] = t1 - t_start

        # 2. statistics, on copies of the lifelong states ----------------------------
        groups: Dict[object, List[EditTarget]] = {}
        for t in self.targets:
            groups.setdefault(self.normalizer_key(t), []).append(t)
        new_states: Dict[object, NormalizerState] = {}
        for key, members in groups.items():
            state = self._state(members[0])
            home = state.mean.device  # a shared state lives with its first module; under
            ks, gs = [], []           # a device_map its other modules may sit elsewhere
            for b in range(len(batches)):  # reference order: mini-batch, then module
                for t in members:
                    ks.append(keys[t.name][b].to(home, non_blocking=True))
                    gs.append(grads[t.name][b].to(home, non_blocking=True))
            new_states[key] = state.merged(
                ks, gs, self._backend(state.mean.device).normalizer_update_)
        self._sync(device)
        t2 = time.perf_counter()
        seconds["statistics"] = t2 - t1

        # 3. solve --------------------------------------------------------------------
        search_step = self.config.step == "auto"
        plan, values = [], []  # values: (solver, V) per target, kept for a rescaled step only
        solvers: Dict[Tuple[int, ...], ShiftSolver] = {}
        for t in self.targets:
            shared = tuple(id(k) for k in keys[t.name])  # same input tensors, same factor
            row = t.tp is not None and t.tp.kind == "row"  # keys split over the ranks
            if shared not in solvers:
                try:
                    solvers[shared] = ShiftSolver(torch.cat(keys[t.name]).to(torch.float32),
                                                  reduce=t.tp.all_reduce_ if row else None)
                except SolveError as e:
                    raise EditRefused(f"{e} for module {t.name!r}; the model and the editor "
                                      "state are unchanged") from None
            solver = solvers[shared]
            state = new_states[self.normalizer_key(t)]
            mean = state.mean.to(t.weight.device, non_blocking=True)
            std = state.std.to(t.weight.device, non_blocking=True)
            if row:
                v = row_shift_values(solver.k, torch.cat(grads[t.name]), mean, std, self.lr,
                                     t.tp)
            else:
                v = self._backend(t.weight.device).shift_values(
                    solver.k, torch.cat(grads[t.name]), mean, std, self.lr)
            plan.append((t, *solver.factors(v)))
            if search_step:  # step="paper" frees each V here, as before the search existed
                values.append((solver, v))
        finite = torch.stack([torch.isfinite(a).all().to(device) for _, a, _ in plan]
                             + [torch.isfinite(s.std).all().to(device)
                                for s in new_states.values()])
        if not all_true(bool(finite.all()), self._tp, device):  # refused on every rank
            bad = [t.name for t, a, _ in plan if not bool(torch.isfinite(a).all())]
            raise EditRefused(f"the turn was refused: non-finite shift for modules {bad} "
                              "(non-finite activations or gradients, or lr too large); "
                              "the model and the editor state are unchanged")
        self._sync(device)
        t3 = time.perf_counter()
        seconds["solve"] = t3 - t2

        # 4. step: the checks of step="auto", prepared on the pre-turn model -------------
        search = None
        if search_step:
            rows = _request_of_rows(batches)
            search = StepSearch(model, self.tokenizer, requests, batch_size=16,
                                chat_template=self.config.chat_template,
                                max_length=context_length(model))
            if self.config.preserve_locality:
                plan, values, n_loc = self._preserving(plan, values, keys,
                                                       search.locality_keys(self.targets))
                rows = torch.cat([rows, torch.zeros(n_loc, dtype=torch.long)])
        step = None
        prepared = time.perf_counter() - t3
        # 5. apply: all shifts were computed from the pre-turn model ------------------
        with self._weights_lock.writing():  # serving() sees the turn whole or not at all
            t4 = time.perf_counter()  # waiting for readers is not the turn's time
            if search is not None:
                step = self._search_step(plan, values, rows, search)
                if step.scales is not None:
                    plan = _rescaled(plan, values, rows, step.scales)
            self._sync(device)
            t5 = time.perf_counter()
            seconds["step"] = prepared + (t5 - t4) if search is not None else 0.0
            undo_entry = None if self._undo is None else self._undo.prepare(plan, pre_states)
            self._apply(plan)
            self._sync(device)
            for key, state in new_states.items():  # commit
                self.normalizers[key] = state
            self.turns += 1
        t6 = time.perf_counter()
        seconds["apply"] = t6 - t5
        if undo_entry is not None:
            self._undo.push(undo_entry, self.targets, self._rank_update)
        return EditReport(n_requests=len(requests), n_tokens=n_tokens, turn=self.turns,
                          backend=self.backend, device=str(device), seconds=seconds,
                          total_seconds=sum(seconds.values()), peak_memory_bytes=peak.read(),
                          peak_memory_kind=peak.kind, modules=list(self.module_names),
                          step_scale=None if step is None else step.scale,
                          step=None if step is None else step.to_dict(),
                          comm_bytes=None if self._tp is None else COUNTER.bytes - sent0)

    def _preserving(self, plan, values, keys, loc_keys):
        """The turn solved again with the locality set's keys as rows of value zero:
        ``Delta = K'^T (K' K'^T + I)^-1 [V; 0]`` with ``K' = [K; K_loc]``, the regularised
        least squares that also asks the edited layers to leave those keys' outputs alone.
        Returns ``(plan, values, rows added)``."""
        if not loc_keys:
            return plan, values, 0
        solvers: Dict[Tuple[int, ...], ShiftSolver] = {}
        new_plan, new_values, n_loc = [], [], 0
        for (t, _, _), (solver, v) in zip(plan, values):
            shared = tuple(id(k) for k in keys[t.name])
            if shared not in solvers:
                kl = loc_keys[t.name].to(solver.k.device, torch.float32)
                try:
                    solvers[shared] = ShiftSolver(torch.cat([solver.k, kl]), solver.reduce)
                except SolveError as e:
                    raise EditRefused(f"{e} for module {t.name!r} with its locality keys; the "
                                      "model and the editor state are unchanged") from None
            aug = solvers[shared]
            n_loc = aug.k.shape[0] - v.shape[0]
            v2 = torch.cat([v, v.new_zeros(n_loc, v.shape[1])])
            a, kk = aug.factors(v2)
            if not all_true(bool(torch.isfinite(a).all()), self._tp, a.device):
                raise EditRefused(f"the turn was refused: non-finite shift for module {t.name!r} "
                                  "with its locality keys; the model and the editor state are "
                                  "unchanged")
            new_plan.append((t, a, kk))
            new_values.append((aug, v2))
        return new_plan, new_values, n_loc

    def _search_step(self, plan, values, rows, search: StepSearch):
        """step="auto": try per-request scales of the turn's update on the pre-turn weights
        (which the host snapshot puts back after each try); see :mod:`ultraedit_fast.core.step`."""
        with torch.no_grad():
            saved = [(t.weight, self._snapshot(t)) for t, _, _ in plan]

            def write(scales):
                for t, a, kk in _rescaled(plan, values, rows, scales):
                    self._backend(t.weight.device).rank_update_(t.weight.data, a, kk,
                                                                t.transposed)

            def restore():
                for w, buf in saved:
                    w.data.copy_(buf)

            return search.run(write, restore, target=self.config.step_target,
                              budget=self.config.locality_budget,
                              max_scale=self.config.max_step_scale)

    def _snapshot(self, t: EditTarget) -> torch.Tensor:
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
                    if not all_true(not bad, self._tp, plan[0][0].weight.device):
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
            with self._weights_lock.writing():
                self.normalizers = self._undo.rollback(self.targets, turns, self._rank_update)
                self.turns -= turns

    # ------------------------------------------------------------------ persistence
    def save(self, path, *, undo_log: bool = True) -> str:
        """Save the lifelong state (normaliser states, turn count, configuration, model
        fingerprint and, with ``undo_log``, the undo log) to the directory ``path``,
        atomically: a crash at any moment leaves the previous checkpoint loadable.
        Returns the manifest's path. The model's weights are not saved: save them too
        (``safetensors.torch.save_model(model, ...)``). Format:
        :mod:`ultraedit_fast.storage.checkpoint`."""
        with self._lock:
            return ckpt.write_checkpoint(
                _rank_path(path, self._tp), config=self.config.to_dict(), preset=self.preset,
                turns=self.turns, tensor_parallel=_tp_record(self._tp),
                normalizers=self.normalizers,
                fingerprint=ckpt.fingerprint(self.model, self.targets),
                weights_sample_sha256=ckpt.weights_digest(self.targets),
                undo=self._undo.export() if undo_log and self._undo is not None else None,
                base_sha256=self._base_sha)

    @classmethod
    def load(cls, path, model, tokenizer, **overrides) -> "UltraEditor":
        """An editor that continues the lifelong state saved at ``path`` on ``model``
        (whose weights should be those saved with it: a mismatch warns with
        :class:`~ultraedit_fast.storage.checkpoint.CheckpointWeightsWarning`). ``overrides`` may
        change the options that do not shape the lifelong state (``lr``, ``batch_size``,
        ``backend``, ``transactional``, ``undo``, ...); ``modules`` and
        ``share_normalizer`` are fixed by the checkpoint. Continuing with the saved
        settings gives bit for bit the turns an uninterrupted editor would.

        Raises ``ValueError`` naming the difference when ``model`` is not the model the
        checkpoint was saved from (architecture, edited modules' shapes and dtypes,
        parameter names and shapes), and naming the file when the checkpoint is
        truncated, tampered with or not one; ``FileNotFoundError`` when ``path`` does
        not exist. Reads JSON and safetensors only: loading never runs code."""
        check_overrides(overrides)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        tp = _model_tensor_parallel(model)
        saved = ckpt.load_checkpoint(_rank_path(path, tp))
        if saved.tensor_parallel != _tp_record(tp):
            raise ValueError(f"model: the checkpoint {saved.manifest_path} was saved by rank "
                             f"{saved.tensor_parallel} of a tensor-parallel model, this is "
                             f"{_tp_record(tp)}: load it with the same ranks and layout")
        # the model must be the checkpoint's: compare before building anything on it
        current = []
        for name in saved.config.modules:
            try:
                current.append(resolve_target(model, name))
            except (ValueError, TypeError):
                pass  # reported by the fingerprint diff
        diffs = ckpt.fingerprint_diff(saved.fingerprint, ckpt.fingerprint(model, current))
        if diffs:
            raise ValueError(f"model: it is not the model the checkpoint "
                             f"{saved.manifest_path} was saved from: " + "; ".join(diffs))
        editor = cls(model, tokenizer, **saved.config.replace(**overrides).options())
        if saved.preset is not None:
            editor.preset = saved.preset
        if saved.weights_sample_sha256 != ckpt.weights_digest(editor.targets):
            warnings.warn(
                f"model: the weights of the edited modules differ from those the checkpoint "
                f"{saved.manifest_path} was saved with; load the edited model's weights before "
                "the editor (the lifelong statistics continue from the saved model)",
                CheckpointWeightsWarning, stacklevel=2)
        devices = {editor.normalizer_key(t): t.weight.device for t in reversed(editor.targets)}
        shapes = {editor.normalizer_key(t): t.local_shape for t in editor.targets}
        normalizers = saved.normalizers(shapes, devices)
        undo = None if editor._undo is None else saved.undo(editor.targets, shapes, devices)
        with editor._lock, editor._weights_lock.writing():
            editor.normalizers = normalizers
            editor.turns = saved.turns
            editor._base_sha = dict(saved.base_sha256)
            if editor._undo is not None:
                editor._undo.restore(undo, editor.targets, editor._rank_update)
        return editor

    # ------------------------------------------------------------------ export
    def _no_tp(self, what: str) -> None:
        if self._tp is not None:
            raise ValueError(f"{what}: the model is tensor parallel; export from a model "
                             "gathered into one process (its edited weights whole)")

    def export_patch(self, path) -> str:
        """Write the edited modules' weights and a manifest naming their base model to the
        directory ``path`` (:mod:`ultraedit_fast.storage.export`); :func:`ultraedit_fast.storage.apply_patch`
        writes them into a fresh copy of the base model, bit for bit. Returns the manifest's
        path."""
        with self._lock:
            self._no_tp("export_patch")
            if not self.turns:
                raise ValueError("export_patch: no turn was made; there is nothing to export")
            return write_patch(path, self.model, self.targets, self._base_sha,
                               config=self.config.to_dict(), turns=self.turns)

    def export_lora(self, path, rank: Optional[int] = None, *, base=None) -> dict:
        """Write a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``)
        whose ``lora_B @ lora_A`` is each edited module's accumulated shift to the directory
        ``path``. ``rank=None``: exact, from the undo log's factors when it holds every turn
        (``undo=True``), else from ``W_now - W_original`` with ``base`` (the unedited model, or
        its state dict); ``rank=r``: the best rank-``r`` approximation. Returns
        ``{"rank", "relative_error", "bytes", "files"}`` (per-module ranks and errors)."""
        with self._lock:
            self._no_tp("export_lora")
            if not self.turns:
                raise ValueError("export_lora: no turn was made; there is nothing to export")
            log_data = self._undo.export() if self._undo is not None else None
            if log_data and len(log_data["turns"]) == self.turns and all(
                    weight_sha256(log_data["base"][t.name]) == self._base_sha.get(t.name)
                    for t in self.targets):
                factors = {t.name: exact_factors(t, log_data["turns"]) for t in self.targets}
            elif base is not None:
                factors = {}
                for t in self.targets:
                    orig = _original_weight(base, t.name)
                    known = self._base_sha.get(t.name)
                    if known is not None and weight_sha256(orig) != known:
                        raise ValueError(f"base: its {t.name!r} is not the weight this editor "
                                         "started from")
                    factors[t.name] = delta_factors(t, orig)
            else:
                raise ValueError("export_lora: the accumulated shift is unknown: build the "
                                 "editor with undo=True (it keeps every turn's factors), or "
                                 "pass base=<the unedited model or its state dict>")
            return write_lora(path, self.model, self.targets, factors, rank=rank,
                              base_sha256=self._base_sha)

    @classmethod
    def from_hparams(cls, hparams, model, tokenizer, **options) -> "UltraEditor":
        """An editor from EasyEdit's UltraEdit hparams (a YAML path or a dict; what maps:
        :mod:`ultraedit_fast.core.hparams`); ``options`` override them."""
        mapped, _ = to_options(hparams)
        return cls(model, tokenizer, **{**mapped, **options})

    def serving(self):
        """``with editor.serving(): ...``: hold the model's weights for reading (see
        :func:`ultraedit_fast.serving`): forward passes inside see no turn half-applied."""
        return serving(self.model)


UltraEditor.__doc__ += "\n" + options_doc() + "\n"


def _rank_path(path, tp):
    """A tensor-parallel editor's checkpoint: one directory per rank inside ``path`` (each
    rank writes its own shards of the normaliser and of the undo log, in parallel, and
    nothing is gathered); a plain editor's: ``path`` itself."""
    if tp is None:
        return path
    return os.path.join(os.fspath(path), f"rank{tp.rank:03d}-of-{tp.world:03d}")


def _tp_record(tp):
    return None if tp is None else {"world": tp.world, "rank": tp.rank}


def _model_tensor_parallel(model):
    """The tensor-parallel group of a model's sharded linear weights (``None``: none)."""
    from ..parallel.distributed import is_dtensor, tensor_parallel
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and is_dtensor(w):
            try:
                tp = tensor_parallel(name, w, False)
            except ValueError:
                continue
            if tp is not None and tp.world > 1:
                return tp
    return None


def _tensor_parallel_of(targets):
    """The tensor-parallel group the edited modules are sharded over (``None``: not
    sharded); ``ValueError`` when they are not all over one group of ranks."""
    groups = {(t.tp.world, id(t.tp.group)) for t in targets if t.tp is not None}
    if len(groups) > 1:
        raise ValueError("modules: the edited modules are sharded over different groups of "
                         "ranks; the editor supports one tensor-parallel group")
    if any(t.tp is None for t in targets) and groups:
        plain = [t.name for t in targets if t.tp is None]
        raise ValueError(f"modules: {plain} are plain tensors while the others are sharded "
                         "DTensors; edit the modules of one layout")
    tp = next((t.tp for t in targets if t.tp is not None), None)
    return tp if tp is not None and tp.world > 1 else None


def _original_weight(base, name: str) -> torch.Tensor:
    """Module ``name``'s weight in ``base``: a model or a state dict."""
    if isinstance(base, torch.nn.Module):
        return base.get_submodule(name).weight.detach()
    if isinstance(base, dict):
        w = base.get(f"{name}.weight")
        if w is None:
            raise ValueError(f"base: the state dict has no {name + '.weight'!r}")
        return w
    raise TypeError(f"base: expected the unedited model or its state dict, got "
                    f"{type(base).__name__}")


def _request_of_rows(batches) -> torch.Tensor:
    """The request (index into the turn's list) of each row of a turn's keys: mini-batch by
    mini-batch, each request's answer tokens in order (the capture's row-major order)."""
    out: List[int] = []
    for b in batches:
        counts = (b.labels != -100).sum(dim=1).tolist()
        for i, c in zip(b.order, counts):
            out.extend([i] * int(c))
    return torch.tensor(out, dtype=torch.long)


def _rescaled(plan, values, rows, scales):
    """The turn's plan with each request's value rows scaled by its scale: ``A`` is linear
    in ``V``, so this is the solve of the scaled values (no capture, no new factorisation)."""
    if all(float(s) == 1.0 for s in scales):
        return plan
    out = []
    for (t, _, kk), (solver, v) in zip(plan, values):
        row_scale = torch.as_tensor(scales, dtype=v.dtype)[rows].to(v.device)[:, None]
        a, kk2 = solver.factors(v * row_scale)
        out.append((t, a, kk2))
    return out


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
