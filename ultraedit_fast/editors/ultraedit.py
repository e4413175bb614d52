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

import threading
import warnings
import weakref
from dataclasses import replace
from typing import Dict, List, Optional

from typing_extensions import Unpack

import torch

from .._log import log
from ..core.config import (
    EditorConfig,
    EditorOptions,
    check_overrides,
)
from ..core.signature import editor_signature, options_doc
from ..core.hparams import to_options
from ..core.normalizer import NormalizerState
from ..core.presets import choose_regime, regime_is_open, resolve_config
from ..core.report import EditReport
from ..core.undo import UndoLog
from ..kernels import Backend, resolve_backend
from ..model.requests import as_requests, context_length, make_minibatches
from ..model.targets import EditTarget, resolve_targets, summarize_names
from ..parallel.concurrency import model_locks, serving
from ..parallel.distributed import COUNTER
from ..storage.export import weight_sha256
from ..utils.environment import PeakMemory
from .persistence import LifelongState
from ..core.preserve import stabiliser_inputs
from ..parallel.distributed import tensor_parallel_of
from .turn import EditRefused, Setup, Turn

__all__ = ["UltraEditor", "EditRefused", "SharedModelWarning", "fast_edit"]


class SharedModelWarning(UserWarning):
    """A second live :class:`UltraEditor` was created on a model that already has one."""


_LIVE_EDITORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _option(name: str):
    return property(
        lambda self: getattr(self.config, name),
        doc=f"The ``{name}`` option of ``config`` (read-only; see :meth:`UltraEditor.configure`).",
    )


class UltraEditor(LifelongState):
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

    name = "ultraedit"

    def __init__(
        self,
        model,
        tokenizer,
        config: Optional[EditorConfig] = None,
        **overrides: Unpack[EditorOptions],
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(
                f"tokenizer: expected a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}"
            )
        self.requested = EditorConfig.build(config, overrides)
        self.model = model
        self.tokenizer = tokenizer
        # the preset's regime is left to the first turn's size when nothing fixes it
        self._regime_open = regime_is_open(self.requested)
        self._setup = self._resolve(choose_regime(self.requested))
        if getattr(model, "hf_device_map", None) is None:  # accelerate offload uses meta
            meta = [n for n, p in model.named_parameters() if p.is_meta]
            if meta:
                raise ValueError(
                    f"model: {len(meta)} parameters are on the meta device (e.g. "
                    f"{meta[0]!r}); load the model's weights before editing"
                )
        self.normalizers: Dict[object, NormalizerState] = {}
        self.turns = 0
        self._base_sha: Dict[str, str] = {}  # the original edited weights' sha256 (patches)
        self._snapshot_buffers: Dict[str, torch.Tensor] = {}  # transactional: host copies
        self._undo: Optional[UndoLog] = None
        if self.undo:
            self._undo = UndoLog(None if self.undo is True else int(self.undo))
        self._register()
        locks = model_locks(model)
        self._lock = locks.edit  # editors of one model: one after another
        self._weights_lock = locks.weights  # writers of its weights vs. serving()

    def _register(self) -> None:
        with _REGISTRY_LOCK:
            other = _LIVE_EDITORS.get(self.model)
            if other is not None and other() is not None:
                warnings.warn(
                    "model: it already has a live UltraEditor; each editor keeps its own "
                    "lifelong normaliser, so edits through both do not compose as one "
                    "lifelong run (their edits are serialised, never interleaved)",
                    SharedModelWarning,
                    stacklevel=3,
                )
            _LIVE_EDITORS[self.model] = weakref.ref(self)

    def _resolve(self, regime: str) -> Setup:
        """The requested options resolved on the model for ``regime``: modules, lr, step,
        the edited modules and the kernels of their devices (checked now, not mid-turn).
        Changes nothing: the caller commits the result."""
        config, preset = resolve_config(self.model, self.requested, regime)
        if preset != "user" or self.requested.lr is None:
            log.info(
                "ultraedit_fast: preset %r: %s, lr %g, step %s",
                preset,
                summarize_names(config.modules),
                config.lr,
                config.step,
            )
        targets = resolve_targets(self.model, list(config.modules))
        tp = tensor_parallel_of(targets)
        setup = Setup(
            config, preset, targets, tp, **stabiliser_inputs(self.tokenizer, config, targets)
        )
        for t in targets:
            _backend_of(setup, t.weight.device)
        return setup

    def _setup_for(self, n_requests: int) -> Setup:
        """The setup of the next turn: the committed one, or (first turn, regime left to
        its size) the one its size chooses."""
        if self._regime_open and not self.turns:
            regime = choose_regime(self.requested, n_requests)
            if regime != self._setup.config.regime:
                return self._resolve(regime)
        return self._setup

    # ------------------------------------------------------------------ options
    @property
    def config(self) -> EditorConfig:
        """The resolved configuration (frozen). Before the first turn of an editor whose
        regime is left to that turn's size (no ``modules``, ``lr`` or ``regime`` given),
        it is the stream regime's; the first turn settles it, and it changes only through
        :meth:`configure`."""
        return self._setup.config

    @property
    def preset(self) -> str:
        return self._setup.preset

    @property
    def targets(self) -> List[EditTarget]:
        return self._setup.targets

    @property
    def _tp(self):
        return self._setup.tp

    @property
    def backends(self) -> Dict[torch.device, Backend]:
        return self._setup.backends

    @property
    def module_names(self) -> List[str]:
        return list(self.config.modules)

    lr = _option("lr")
    batch_size = _option("batch_size")
    tokens_per_pass = _option("tokens_per_pass")
    measure_memory = _option("measure_memory")
    transactional = _option("transactional")
    share_normalizer = _option("share_normalizer")
    undo = _option("undo")

    def configure(self, **changes) -> EditorConfig:
        """Change options between turns: only those that do not shape the lifelong state
        (the ones :meth:`load` may override: ``lr``, ``batch_size``, ``transactional``,
        ``measure_memory``, ...), checked as the constructor checks them. Returns the new
        configuration."""
        check_overrides(changes, what="configure")
        if "undo" in changes:
            raise ValueError("undo: fixed at construction (the undo log starts with the editor)")
        self._weights_lock.refuse_writer_inside_reading("configure")
        with self._lock:
            config = self.config.replace(**changes)
            if config.drift_from == "unedited" and config.drift_budget is not None:
                if self.turns and self._setup.drift_reference is None:
                    raise ValueError(
                        "drift_budget: with drift_from='unedited' it must be set before "
                        "the first turn (its reference is the unedited model's)"
                    )
            inputs = stabiliser_inputs(self.tokenizer, config, self.targets)
            setup = replace(self._setup, config=config, backends={}, **inputs)
            for t in setup.targets:
                _backend_of(setup, t.weight.device)
            self._setup = setup
            self.requested = self.requested.replace(**changes)
            return config

    def describe(self) -> Dict[str, object]:
        """What a results file records of this editor."""
        return {
            "editor": "fast",
            "modules": list(self.module_names),
            "lr": float(self.lr),
            "preset": self.preset,
            "batch_size": self.batch_size,
            "backend": self.backend,
            "tokens_per_pass": self.tokens_per_pass,
            "step": self.config.step,
            "regime": self.config.regime,
        }

    # ------------------------------------------------------------------ helpers
    @property
    def backend(self) -> str:
        """Name of the backend of the edited modules' device(s)."""
        return ",".join(sorted({b.name for b in self.backends.values()}))

    def _backend(self, device) -> Backend:
        return _backend_of(self._setup, device)

    def _rank_update(self, w, a, kk, transposed) -> None:
        """The rank update of the weight's device: what applied a turn, for the undo log."""
        self._backend(w.device).rank_update_(w, a, kk, transposed)

    def normalizer_key(self, target: EditTarget):
        return self._setup.normalizer_key(target)

    def _state(self, target: EditTarget, setup: Setup) -> NormalizerState:
        # A new key's zero state is committed with the turn, not before: a refused
        # turn leaves ``normalizers`` exactly as it was.
        state = self.normalizers.get(setup.normalizer_key(target))
        if state is None:
            state = NormalizerState.zeros(
                *target.local_shape, target.weight.device, scatter=setup.config.whiten_values
            )
        return state

    # ------------------------------------------------------------------ the turn
    def edit(self, requests) -> EditReport:
        """Run one turn over ``requests`` (``EditRequest``s or dicts with the same keys),
        in mini-batches of ``batch_size``. Returns an :class:`EditReport`. The turn is a
        transaction: if it raises, the model, the editor's state and its configuration
        are as they were."""
        requests = as_requests(requests)
        self._weights_lock.refuse_writer_inside_reading("edit")  # lock order: see concurrency
        with self._lock:
            return self._edit(requests)

    def _turn(self, requests, setup: Setup) -> Turn:
        """A turn over ``requests`` on ``setup``, its mini-batches made."""
        cfg = setup.config
        batches = make_minibatches(
            self.tokenizer, requests, cfg.batch_size, context_length(self.model), cfg.chat_template
        )
        backend, state = (lambda d: _backend_of(setup, d)), (lambda t: self._state(t, setup))
        return Turn(self.model, self.tokenizer, requests, batches, setup, backend, state)

    def _edit(self, requests) -> EditReport:
        setup = self._setup_for(len(requests))
        cfg = setup.config
        base_sha = self._base_sha
        if not self.turns and not base_sha:  # what a patch will name as its base
            with torch.no_grad():
                base_sha = {t.name: weight_sha256(t.weight) for t in setup.targets}
        pre_states = dict(self.normalizers)  # committed states are never changed in place
        turn = self._turn(requests, setup)
        peak = PeakMemory(turn.device, cfg.measure_memory)
        sent0 = COUNTER.bytes
        turn.begin(first=not self.turns)  # the null space: built before turn 1
        cap = turn.capture()
        n_tokens = cap.n_tokens
        new_states = turn.statistics(cap)
        plan = turn.solve(cap, new_states)
        plan = turn.preserve_general(cap, plan)
        plan, search, rows = turn.prepare_step(cap, plan)
        del cap
        step = None
        with self._weights_lock.writing():  # serving() sees the turn whole or not at all
            turn.restart()  # waiting for readers is not the turn's time
            if search is not None:
                plan, step = turn.search_step(plan, search, rows, self._snapshot)
            undo_entry = (
                None if self._undo is None else self._undo.prepare(plan.updates, pre_states)
            )
            turn.apply(plan.updates, self._snapshot if cfg.transactional else None)
            self.normalizers.update(new_states)  # commit
            self._setup, self._base_sha, self._regime_open = turn.committed(), base_sha, False
            self.turns += 1
            if undo_entry is not None:  # readers (save, exports) see the log with its turn
                self._undo.push(undo_entry, self.targets, self._rank_update)
        return EditReport(
            n_requests=len(requests),
            n_tokens=n_tokens,
            turn=self.turns,
            backend=self.backend,
            device=str(turn.device),
            seconds=turn.seconds,
            total_seconds=sum(turn.seconds.values()),
            peak_memory_bytes=peak.read(),
            peak_memory_kind=peak.kind,
            modules=list(self.module_names),
            step_scale=None if step is None else step.scale,
            step_search=None if step is None else step.to_dict(),
            comm_bytes=None if self._tp is None else COUNTER.bytes - sent0,
            stabilisers=list(turn.stabilisers),
        )

    def _snapshot(self, t: EditTarget) -> torch.Tensor:
        """Copy ``t``'s weight into its host buffer, allocated once and reused every turn
        (pinned for CUDA weights, so the copy runs at full bus speed)."""
        w = t.weight.detach()
        buf = self._snapshot_buffers.get(t.name)
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
            buf = torch.empty(
                w.shape, dtype=w.dtype, device="cpu", pin_memory=w.device.type == "cuda"
            )
            self._snapshot_buffers[t.name] = buf
        buf.copy_(w)
        return buf

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
        self._weights_lock.refuse_writer_inside_reading("rollback")
        with self._lock:
            if self._undo is None:
                raise ValueError(
                    "rollback: this editor keeps no undo log; build it with "
                    "UltraEditor(..., undo=True) or undo=<number of turns>"
                )
            available = len(self._undo)
            if turns > available:
                raise ValueError(
                    f"turns: {turns} turns to undo, but only {available} can be "
                    f"(undo={self.undo!r}, {self.turns} turns made)"
                )
            with self._weights_lock.writing():
                self.normalizers = self._undo.rollback(self.targets, turns, self._rank_update)
                self.turns -= turns

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
UltraEditor.__init__.__signature__ = editor_signature()  # type: ignore[attr-defined]


def _backend_of(setup: Setup, device) -> Backend:
    """The kernels of ``device`` for ``setup`` (resolved once per device)."""
    device = torch.device(device)
    if device not in setup.backends:
        setup.backends[device] = resolve_backend(setup.config.backend, device)
    return setup.backends[device]


def fast_edit(
    model, tokenizer, requests, *, editor: Optional[UltraEditor] = None, **options
) -> EditReport:
    """Edit ``model`` with ``requests`` in one call.

    ``options`` are :class:`UltraEditor`'s (``modules``, ``lr``, ``batch_size``,
    ``backend``, ...). Pass ``editor=`` to continue an existing editor's lifelong state
    (then ``options`` must be empty and ``model`` must be the editor's model).
    """
    if editor is not None:
        if not isinstance(editor, UltraEditor):
            raise TypeError(f"editor: expected an UltraEditor, got {type(editor).__name__}")
        if options:
            raise ValueError(
                f"editor: options {sorted(options)} cannot be combined with an "
                "existing editor; its configuration is fixed"
            )
        if editor.model is not model:
            raise ValueError("editor: it edits a different model than `model`")
        return editor.edit(requests)
    return UltraEditor(model, tokenizer, **options).edit(requests)
