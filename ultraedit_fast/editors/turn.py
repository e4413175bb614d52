"""One turn of :class:`~ultraedit_fast.editors.ultraedit.UltraEditor`, phase by phase.

Each phase is a method of :class:`Turn` that takes what the previous one returned:

1. :meth:`Turn.capture` - per pass, one forward with hooks on the edited modules and
   ``torch.autograd.grad`` of the loss with respect to their outputs only
   (:mod:`ultraedit_fast.core.capture`) -> :class:`Captured`.
2. :meth:`Turn.statistics` - the lifelong normaliser merges every (mini-batch, module) block
   in the reference's order, on copies of the committed states -> new states.
3. :meth:`Turn.solve` - shift values and the regularised solve in fp32 -> :class:`Plan`.
4. :meth:`Turn.prepare_step` / :meth:`Turn.search_step` - ``step="auto"``: the checks,
   prepared on the pre-turn model, and the search for the turn's scale.
5. :meth:`Turn.apply` - the low-rank updates ``W += a^T kk`` in place, restored from a
   snapshot if anything fails while they are written.

Nothing here commits editor state: the editor commits the new states, the resolved
configuration and the turn count once :meth:`Turn.apply` has returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..core.capture import Capture, capture_passes
from ..core.config import EditorConfig
from ..core.normalizer import NormalizerState
from ..core.nullspace import NullSpace
from ..core.preserve import GeneralDrift, GeneralKeys
from ..core.report import PHASES
from ..core.solve import ShiftSolver, SolveError, norm_anchored
from ..core.step_search import StepResult, StepSearch
from ..core.whiten import value_transform
from ..kernels import Backend
from ..model.forward import input_device, preserved_model_state, rows_only_modules, supports_packing
from ..model.requests import MiniBatch, context_length, pack_minibatches
from ..model.targets import EditTarget
from ..parallel.distributed import TensorParallel, all_true, row_shift_values


class EditRefused(ValueError):
    """The turn was refused and the model and editor state are unchanged."""


@dataclass
class Setup:
    """What an editor's configuration resolves to on its model: the resolved config, the
    preset it came from, the edited modules, their tensor-parallel group and the kernels
    of each device."""

    config: EditorConfig
    preset: str
    targets: List[EditTarget]
    tp: Optional[TensorParallel]
    backends: Dict[torch.device, Backend] = field(default_factory=dict)
    general: Optional[GeneralKeys] = None  # preserve_general: the general-text keys
    drift_windows: Optional[torch.Tensor] = None  # drift_budget: its windows of general text
    null: Optional[NullSpace] = None  # null_space: the projection (built before turn 1)
    drift_reference: Optional[torch.Tensor] = None  # drift_from="unedited": turn 1's argmax

    def normalizer_key(self, target: EditTarget):
        return target.shape if self.config.share_normalizer else target.name


@dataclass
class Captured:
    """The turn's keys and output gradients, per module, one tensor per mini-batch."""

    keys: Dict[str, List[torch.Tensor]]
    grads: Dict[str, List[torch.Tensor]]
    n_tokens: int


# (module, a, kk): the module's update is ``W += a^T kk`` (transposed for Conv1D)
Update = Tuple[EditTarget, torch.Tensor, torch.Tensor]


@dataclass
class Plan:
    """The turn's updates, and (for the step search) each module's solver and values."""

    updates: List[Update]
    values: List[Tuple[ShiftSolver, torch.Tensor]]


class Turn:
    """The phases of one turn over ``batches`` on ``setup``; ``seconds`` times each phase.

    ``backend(device)`` gives the kernels of a device; ``state(target)`` the committed
    normaliser state of a module (a zero state for a new key, committed with the turn)."""

    def __init__(
        self,
        model,
        tokenizer,
        requests,
        batches: List[MiniBatch],
        setup: Setup,
        backend: Callable[[torch.device], Backend],
        state: Callable[[EditTarget], NormalizerState],
    ):
        self.model, self.tokenizer, self.requests = model, tokenizer, requests
        self.batches, self.setup = batches, setup
        self.config = setup.config
        self.backend, self.state = backend, state
        self.device = input_device(model)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.extra_rows = 0  # value rows of zero added to the system (preserved keys)
        self.stabilisers: List[str] = []  # those that acted in this turn
        self.drift_reference: Optional[torch.Tensor] = None  # new state, taken this turn
        self._whitening: Dict[int, Optional[torch.Tensor]] = {}  # whiten_values, per state
        self.first = False  # the editor's first turn (step="auto": first_step_scale)
        self._t = time.perf_counter()

    def restart(self) -> None:
        """Start the next lap now (what came before it is no phase's time)."""
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Add the time since the last lap (after the device finished) to ``phase``."""
        sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now

    def begin(self, first: bool) -> None:
        """The turn's start, on the pre-turn model: whether it is the editor's ``first``
        (``step="auto"`` searches to ``first_step_scale`` then), and, with ``null_space``,
        the projection built where the editor has none yet, committed with the turn
        (:meth:`committed`)."""
        self.first = first
        if self.config.null_space is None or self.setup.null is not None:
            return
        self.setup = replace(self.setup, null=NullSpace.of(self.model, self.tokenizer, self.setup))
        self.lap("solve")

    # ------------------------------------------------------------------ 1. capture
    def capture(self) -> Captured:
        model, targets = self.model, self.setup.targets
        keys: Dict[str, List[torch.Tensor]] = {t.name: [] for t in targets}
        grads: Dict[str, List[torch.Tensor]] = {t.name: [] for t in targets}
        with preserved_model_state(model), torch.enable_grad():
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            passes = self.batches  # the probe runs once per model, before any hook is set
            if self.config.tokens_per_pass and supports_packing(model):
                passes = pack_minibatches(self.batches, self.config.tokens_per_pass)
            with Capture(targets, rows_only_modules(model)) as cap:
                n_tokens = capture_passes(model, passes, cap, self.device, keys, grads)
        self.lap("capture")
        return Captured(keys, grads, n_tokens)

    # ------------------------------------------------------------------ 2. statistics
    def statistics(self, cap: Captured, edits: bool = True) -> Dict[object, NormalizerState]:
        """The normaliser states after this turn's blocks, merged on copies (with
        ``preserve_edits``, the keys' Grams grown too, unless the blocks are no ``edits``:
        a preheat's)."""
        groups: Dict[object, List[EditTarget]] = {}
        for t in self.setup.targets:
            groups.setdefault(self.setup.normalizer_key(t), []).append(t)
        new_states: Dict[object, NormalizerState] = {}
        for key, members in groups.items():
            state = self.state(members[0])
            home = state.mean.device  # a shared state lives with its first module; under
            ks, gs = [], []  # a device_map its other modules may sit elsewhere
            for b in range(len(self.batches)):  # reference order: mini-batch, then module
                for t in members:
                    ks.append(cap.keys[t.name][b].to(home, non_blocking=True))
                    gs.append(cap.grads[t.name][b].to(home, non_blocking=True))
            new_states[key] = state.merged(ks, gs, self.backend(home).normalizer_update_)
            if edits and self.config.preserve_edits is not None:  # every turn's keys so far
                new_states[key].with_grams({t.name: cap.keys[t.name] for t in members})
        self.lap("statistics")
        return new_states

    # ------------------------------------------------------------------ 3. solve
    def solve(self, cap: Captured, states: Dict[object, NormalizerState]) -> Plan:
        # step="paper" without stabilisers frees each V at once
        keep_values = self.config.step == "auto" or self.setup.general is not None
        updates: List[Update] = []
        values: List[Tuple[ShiftSolver, torch.Tensor]] = []
        solvers: Dict[Tuple[int, ...], ShiftSolver] = {}
        for t in self.setup.targets:
            shared = tuple(id(k) for k in cap.keys[t.name])  # same inputs, same factor
            row = t.tp is not None and t.tp.kind == "row"  # keys split over the ranks
            if shared not in solvers:
                try:
                    solvers[shared] = ShiftSolver(
                        torch.cat(cap.keys[t.name]).to(torch.float32),
                        reduce=t.tp.all_reduce_ if row else None,
                        ridge=self.config.ridge,
                        project=self._projection(t),
                        extra=self._earlier_edits(t),
                    )
                except SolveError as e:
                    raise EditRefused(
                        f"{e} for module {t.name!r}; the model and the editor state are unchanged"
                    ) from None
            solver = solvers[shared]
            v = self._values(
                t, solver, torch.cat(cap.grads[t.name]), states[self.setup.normalizer_key(t)], row
            )
            if self.config.norm_anchor:
                v = self._anchored(t, solver.k, v)
            updates.append((t, *solver.factors(v)))
            if keep_values:
                values.append((solver, v))
        self._check_finite(updates, states)
        self.lap("solve")
        return Plan(updates, values)

    def _anchored(self, t: EditTarget, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``norm_anchor``: no value row lengthens the module's output at its key."""
        bias = getattr(t.module, "bias", None)
        v, n = norm_anchored(k, v, t.weight, bias, t.transposed)
        if n and "norm_anchor" not in self.stabilisers:
            self.stabilisers.append("norm_anchor")
        return v

    def _earlier_edits(self, t: EditTarget) -> Optional[torch.Tensor]:
        """``preserve_edits``: the weighted Gram of the keys of ``t``'s earlier turns, from
        the pre-turn state (``None``: the paper's solve, or no turn yet)."""
        w = self.config.preserve_edits
        grams = self.state(t).grams if w is not None else None
        if not grams or t.name not in grams:
            return None
        if "preserve_edits" not in self.stabilisers:
            self.stabilisers.append("preserve_edits")
        return grams[t.name] * w

    def _projection(self, t: EditTarget):
        """``null_space``: the projection of ``t``'s keys (``None``: the paper's solve)."""
        null = self.setup.null
        if null is None:
            return None
        if "null_space" not in self.stabilisers:
            self.stabilisers.append("null_space")
        return null.projector(t.name, t.weight.device)

    def _values(
        self,
        t: EditTarget,
        solver: ShiftSolver,
        grads: torch.Tensor,
        state: NormalizerState,
        row: bool,
    ) -> torch.Tensor:
        mean = state.mean.to(t.weight.device, non_blocking=True)
        std = state.std.to(t.weight.device, non_blocking=True)
        lr = self.config.lr
        if row:
            return row_shift_values(solver.k, grads, mean, std, lr, t.tp)
        v = self.backend(t.weight.device).shift_values(solver.k, grads, mean, std, lr)
        if state.scatter is None:
            return v
        if id(state) not in self._whitening:  # modules sharing a state share its transform
            self._whitening[id(state)] = value_transform(state)
        m = self._whitening[id(state)]
        if m is None:  # too few rows yet: the paper's normaliser
            return v
        if "whiten_values" not in self.stabilisers:
            self.stabilisers.append("whiten_values")
        return v @ m.to(v.device, non_blocking=True)

    def _check_finite(self, updates: List[Update], states: Dict[object, NormalizerState]):
        device = self.device
        finite = torch.stack(
            [torch.isfinite(a).all().to(device) for _, a, _ in updates]
            + [torch.isfinite(s.std).all().to(device) for s in states.values()]
        )
        if not all_true(bool(finite.all()), self.setup.tp, device):  # refused on every rank
            bad = [t.name for t, a, _ in updates if not bool(torch.isfinite(a).all())]
            raise EditRefused(
                f"the turn was refused: non-finite shift for modules {bad} "
                "(non-finite activations or gradients, or lr too large); "
                "the model and the editor state are unchanged"
            )

    def preserve_general(self, cap: Captured, plan: Plan) -> Plan:
        """``preserve_general``: the turn solved again with keys of general text, on the
        model as it is now, as rows of value zero (:mod:`ultraedit_fast.core.preserve`)."""
        general = self.setup.general
        if general is None:
            return plan
        scale = self.config.preserve_weight**0.5
        keys = {n: k * scale for n, k in general.keys(self.model, self.setup.targets).items()}
        plan, self.extra_rows = self._preserving(cap, plan, keys)
        self.stabilisers.append("preserve_general")
        self.lap("solve")
        return plan

    # ------------------------------------------------------------------ 4. step
    def prepare_step(
        self, cap: Captured, plan: Plan
    ) -> Tuple[Plan, Optional[StepSearch], Optional[torch.Tensor]]:
        """``step="auto"``: the search's checks on the pre-turn model and, with
        ``preserve_locality``, the turn solved again with the locality keys as rows of
        value zero. Returns ``(plan, search, request of each value row)``."""
        if self.config.step != "auto":
            return plan, None, None
        t0 = time.perf_counter()
        rows = request_of_rows(self.batches)
        rows = torch.cat([rows, torch.zeros(self.extra_rows, dtype=torch.long)])
        search = StepSearch(
            self.model,
            self.tokenizer,
            self.requests,
            chat_template=self.config.chat_template,
            max_length=context_length(self.model),
            drift=self._drift(),
            drift_budget=self.config.drift_budget,
            modules=[t.module for t in self.setup.targets],
            taps={t.name: t.module for t in self.setup.targets}
            if self.config.preserve_locality
            else None,
            locality_check=self.config.locality_check,
        )
        if self.setup.drift_windows is not None:
            self.stabilisers.append("drift_budget")
        if self.config.preserve_locality:
            plan, n_loc = self._preserving(cap, plan, search.locality_keys())
            rows = torch.cat([rows, torch.zeros(n_loc, dtype=torch.long)])
        self.seconds["step"] += time.perf_counter() - t0
        self._t = time.perf_counter()
        return plan, search, rows

    def committed(self) -> Setup:
        """The setup the editor keeps after this turn: with the state it took (the
        null-space projection, the drift reference)."""
        if self.drift_reference is None:
            return self.setup
        return replace(self.setup, drift_reference=self.drift_reference)

    def _drift(self) -> Optional[GeneralDrift]:
        """``drift_budget``'s check; with ``drift_from="unedited"``, against the reference
        of the editor's first turn (taken now on the first: ``drift_reference``)."""
        setup = self.setup
        if setup.drift_windows is None:
            return None
        unedited = self.config.drift_from == "unedited"
        drift = GeneralDrift(
            setup.drift_windows,
            self.model,
            [t.module for t in setup.targets],
            setup.drift_reference if unedited else None,
        )
        if unedited and setup.drift_reference is None:
            self.drift_reference = drift.reference  # the editor commits it with the turn
        return drift

    def _preserving(self, cap: Captured, plan: Plan, loc_keys) -> Tuple[Plan, int]:
        """The turn solved again with the locality set's keys as rows of value zero:
        ``Delta = K'^T (K' K'^T + I)^-1 [V; 0]`` with ``K' = [K; K_loc]``, the regularised
        least squares that also asks the edited layers to leave those keys' outputs alone.
        Returns ``(plan, rows added)``."""
        if not loc_keys:
            return plan, 0
        solvers: Dict[Tuple[int, ...], ShiftSolver] = {}
        out, n_loc = Plan([], []), 0
        for (t, _, _), (solver, v) in zip(plan.updates, plan.values):
            shared = tuple(id(k) for k in cap.keys[t.name])
            if shared not in solvers:
                kl = loc_keys[t.name].to(solver.k.device, torch.float32)
                try:
                    solvers[shared] = ShiftSolver(
                        torch.cat([solver.k, kl]),
                        solver.reduce,
                        solver.ridge,
                        solver.project,
                        solver.extra,
                    )
                except SolveError as e:
                    raise EditRefused(
                        f"{e} for module {t.name!r} with its locality keys; the "
                        "model and the editor state are unchanged"
                    ) from None
            aug = solvers[shared]
            n_loc = aug.k.shape[0] - v.shape[0]
            v2 = torch.cat([v, v.new_zeros(n_loc, v.shape[1])])
            a, kk = aug.factors(v2)
            if not all_true(bool(torch.isfinite(a).all()), self.setup.tp, a.device):
                raise EditRefused(
                    f"the turn was refused: non-finite shift for module {t.name!r} "
                    "with its locality keys; the model and the editor state are "
                    "unchanged"
                )
            out.updates.append((t, a, kk))
            out.values.append((aug, v2))
        return out, n_loc

    def search_step(
        self,
        plan: Plan,
        search: StepSearch,
        rows: torch.Tensor,
        snapshot: Callable[[EditTarget], torch.Tensor],
    ) -> Tuple[Plan, StepResult]:
        """Try per-request scales of the turn's update on the pre-turn weights (which the
        host ``snapshot`` puts back after each try); :mod:`ultraedit_fast.core.step_search`."""
        with torch.no_grad():
            saved = [(t.weight, snapshot(t)) for t, _, _ in plan.updates]

            def write(scales):
                for t, a, kk in rescaled(plan, rows, scales):
                    self.backend(t.weight.device).rank_update_(t.weight.data, a, kk, t.transposed)

            def restore():
                for w, buf in saved:
                    w.data.copy_(buf)

            step = search.run(
                write,
                restore,
                target=self.config.step_target,
                budget=self.config.locality_budget,
                max_scale=self.config.first_step_scale
                if self.first
                else self.config.max_step_scale,
            )
        if step.scales is not None:
            plan = Plan(rescaled(plan, rows, step.scales), plan.values)
        self.lap("step")
        return plan, step

    # ------------------------------------------------------------------ 5. apply
    def apply(
        self, updates: List[Update], snapshot: Optional[Callable[[EditTarget], torch.Tensor]]
    ) -> None:
        """Write every update; with a ``snapshot`` (transactional), restore the weights
        and raise if anything fails or a shifted weight is not finite."""
        saved: List[Tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            try:
                for t, a, kk in updates:
                    w = t.weight
                    if snapshot is not None:
                        saved.append((w, snapshot(t)))
                    self.backend(w.device).rank_update_(w.data, a, kk, t.transposed)
                if snapshot is not None:  # a finite shift can still overflow fp16/bf16
                    self._check_weights(updates)
            except BaseException:
                for w, buf in saved:
                    w.data.copy_(buf)
                raise
        self.lap("apply")

    def _check_weights(self, updates: List[Update]) -> None:
        ok = torch.stack(
            [
                self.backend(t.weight.device).all_finite(t.weight.detach()).to("cpu")
                for t, _, _ in updates
            ]
        )
        bad = [t.name for (t, _, _), f in zip(updates, ok.tolist()) if not f]
        if not all_true(not bad, self.setup.tp, updates[0][0].weight.device):
            raise EditRefused(
                f"the turn was refused: the shifted weights of modules {bad} are not finite "
                "(overflow of their dtype: lr too large); the model and the editor state are "
                "unchanged"
            )


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def request_of_rows(batches) -> torch.Tensor:
    """The request (index into the turn's list) of each row of a turn's keys: mini-batch by
    mini-batch, each request's answer tokens in order (the capture's row-major order)."""
    out: List[int] = []
    for b in batches:
        counts = (b.labels != -100).sum(dim=1).tolist()
        for i, c in zip(b.order, counts):
            out.extend([i] * int(c))
    return torch.tensor(out, dtype=torch.long)


def rescaled(plan: Plan, rows: torch.Tensor, scales) -> List[Update]:
    """The plan's updates with each request's value rows scaled by its scale: ``A`` is
    linear in ``V``, so this is the solve of the scaled values (no capture, no new
    factorisation)."""
    if all(float(s) == 1.0 for s in scales):
        return plan.updates
    out = []
    for (t, _, _), (solver, v) in zip(plan.updates, plan.values):
        row_scale = torch.as_tensor(scales, dtype=v.dtype)[rows].to(v.device)[:, None]
        a, kk2 = solver.factors(v * row_scale)
        out.append((t, a, kk2))
    return out
