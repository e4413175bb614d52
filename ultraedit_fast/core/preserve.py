"""Preserved keys: inputs of the edited modules on general text, which a turn's solve asks to
leave alone.

With ``preserve_general=P`` the editor reads a general text once (a file, ``preserve_text``,
or the package's sample), and at every turn runs the current model over a fixed set of its
windows, keeping each edited module's input at ``P`` fixed positions. These rows join the
turn's system with value zero: with ``K' = [K; s K_p]`` and ``V' = [V; 0]``,

    Delta = K'^T (K' K'^T + I)^-1 V',

the regularised least squares that also asks the module's output at those keys to stay as
it is (``s^2 = preserve_weight`` weighs them against the edits). Taken from the current
model each turn, the keys are no state: a checkpoint needs nothing more, and a resumed run
takes the turns an uninterrupted one would.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .._log import log
from ..model.forward import forward_until, input_device, preserved_model_state
from ..model.partial import ResumedForward, lowest_block
from ..model.requests import TokenizedRequest
from ..model.targets import EditTarget
from ..parallel.concurrency import ThreadOwned
from ..scoring.generation import spread
from ..scoring.health import text_windows

PRESERVE_WINDOW = 64  # tokens per window of the preserved text
DRIFT_WINDOWS = 4  # windows of general text the drift budget checks


class GeneralKeys:
    """The fixed token positions of a general text whose keys a turn preserves."""

    def __init__(
        self,
        tokenizer,
        rows: int,
        path: Optional[str] = None,
        reserve: int = 0,
        what: str = "preserve_general",
    ):
        wins, self.source = text_windows(tokenizer, path, PRESERVE_WINDOW, "preserve_text")
        # the last ``reserve`` windows are the drift budget's: a check on text whose keys
        # are preserved would be blind
        n = len(wins) - reserve
        if n < 1:
            raise ValueError(
                f"preserve_text: {self.source!r} has {len(wins)} windows of {PRESERVE_WINDOW} "
                f"tokens; {reserve} go to the drift budget and none is left to preserve"
            )
        # enough windows for ``rows`` positions (the first token of a window has no context)
        need = -(-rows // (PRESERVE_WINDOW - 1))
        self.windows = torch.tensor(spread(wins[:n], max(need, 1)), dtype=torch.long)
        positions = [(w, p) for w in range(len(self.windows)) for p in range(1, PRESERVE_WINDOW)]
        self.positions = spread(positions, rows)
        self.rows = len(self.positions)
        if self.rows < rows:
            log.warning(
                "ultraedit_fast: %s: %d keys asked for, but %s has room for %d (%d windows); "
                "using %d",
                what,
                rows,
                self.source,
                self.rows,
                n,
                self.rows,
            )

    def keys(self, model, targets: Sequence[EditTarget]) -> Dict[str, torch.Tensor]:
        """Each target's input (fp32, ``rows x d_in``) at the fixed positions, on the model
        as it is now."""
        seen: Dict[str, List[torch.Tensor]] = {t.name: [] for t in targets}
        thread = ThreadOwned()

        def hook(name):
            def keep(module, args, *rest):
                if thread.owns():
                    seen[name].append(args[0].detach().float())

            return keep

        handles = [t.module.register_forward_hook(hook(t.name)) for t in targets]
        try:
            with preserved_model_state(model), torch.no_grad():
                model.eval()
                # the blocks above the highest edited module do not change the keys
                forward_until(
                    model,
                    [t.module for t in targets],
                    input_ids=self.windows.to(input_device(model)),
                )
        finally:
            for h in handles:
                h.remove()
        w = torch.tensor([w for w, _ in self.positions])
        p = torch.tensor([p for _, p in self.positions])
        out = {}
        for t in targets:
            x = seen[t.name][0]
            out[t.name] = x[w.to(x.device), p.to(x.device)]
        return out


def general_keys_for(tokenizer, config, targets) -> Optional[GeneralKeys]:
    """``preserve_general``'s keys, refused (naming the module) where they cannot apply."""
    if not config.preserve_general:
        return None
    for t in targets:
        if t.tp is not None:
            raise ValueError(
                f"preserve_general: module {t.name!r} is tensor-parallel; the "
                "preserved keys support unsharded modules only"
            )
    reserve = DRIFT_WINDOWS if config.drift_budget is not None else 0
    return GeneralKeys(tokenizer, config.preserve_general, config.preserve_text, reserve)


class GeneralDrift:
    """``drift_budget``: the share of positions of the last windows of a general text whose
    most likely next token a candidate step changes, against the pre-turn model (captured
    when the turn's step search is prepared) or, with ``drift_from="unedited"``, against
    the model before the editor's first turn (its argmax captured then, a ``reference``
    kept in the editor's state). With ``preserve_general`` too, those windows are kept out
    of the preserved keys."""

    def __init__(
        self,
        windows: torch.Tensor,
        model,
        modules: Sequence[torch.nn.Module] = (),
        reference: Optional[torch.Tensor] = None,
    ):
        self.windows = windows
        # every position labelled (with itself: only the positions matter); each try
        # changes only ``modules``, so the checks run from the lowest block holding one
        toks = [TokenizedRequest(w.tolist(), w.tolist()) for w in windows]
        self.checks = ResumedForward(model, toks, lowest_block(model, modules), DRIFT_WINDOWS)
        # ``reference``: the argmax of an earlier model (drift_from="unedited"), else now
        now = self._argmax()
        if reference is not None and reference.shape != now.shape:
            raise ValueError(
                f"drift_from: the saved reference covers {reference.numel()} positions, the "
                f"drift windows of preserve_text have {now.numel()} (another text?)"
            )
        self.reference = now if reference is None else reference

    @classmethod
    def windows_of(cls, tokenizer, path: Optional[str] = None) -> torch.Tensor:
        """The last :data:`DRIFT_WINDOWS` windows of the general text at ``path``."""
        wins, _ = text_windows(tokenizer, path, PRESERVE_WINDOW, "preserve_text")
        return torch.tensor(wins[-DRIFT_WINDOWS:], dtype=torch.long)

    def _argmax(self) -> torch.Tensor:
        return torch.tensor([p for p, _ in self.checks.predictions()])

    def changed(self, model) -> float:
        """The share of positions whose most likely next token differs from the reference,
        on ``model`` (the model the drift was built on) as it is now."""
        if model is not self.checks.model:
            raise ValueError("model: the drift budget was measured on another model")
        return float((self._argmax() != self.reference).double().mean())


def stabiliser_inputs(tokenizer, config, targets) -> Dict[str, object]:
    """What the stabilisers of ``config`` read before any turn (the preserved keys' text
    positions, the drift windows), as :class:`~ultraedit_fast.editors.turn.Setup` fields;
    ``ValueError`` naming the module where one cannot apply."""
    for name, on in (
        ("null_space", config.null_space is not None),
        ("norm_anchor", config.norm_anchor),
        ("whiten_values", config.whiten_values),
        ("preserve_edits", config.preserve_edits is not None),
    ):
        for t in targets:
            if on and t.tp is not None:
                raise ValueError(
                    f"{name}: module {t.name!r} is tensor-parallel; this stabiliser "
                    "supports unsharded modules only"
                )
    return {
        "general": general_keys_for(tokenizer, config, targets),
        "drift_windows": None
        if config.drift_budget is None
        else GeneralDrift.windows_of(tokenizer, config.preserve_text),
    }
