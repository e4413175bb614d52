"""The turns of a lifelong run: each turn through the editor, a refused one recorded and
skipped, the checkpoints' scores along the stream, and the run's timing summary."""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional

from ..core.report import PHASES
from ..editors import EditRefused, Editor
from ..scoring.generation import spread
from ..utils.display import pct
from ..utils.environment import peak_rss
from .scores import Scorer


class Stream:
    """The turns of a run, with its checkpoints' scores."""

    def __init__(
        self, ed: Editor, requests, turns, edits_per_turn, eval_every, eval_sample, scorer: Scorer
    ):
        self.ed, self.requests, self.scorer = ed, requests, scorer
        self.turns, self.per_turn = turns, edits_per_turn
        self.eval_every, self.eval_sample = eval_every, eval_sample
        self.retention_pool = spread(range(len(requests)), eval_sample) if eval_sample else []
        self.rows: List[Dict[str, Any]] = []
        self.history: List[Dict[str, Any]] = []
        self.eval_seconds = 0.0
        self.last_checkpoint = 0  # edits made at the previous checkpoint
        self.next_turn = 0  # turns 0 .. next_turn - 1 are done (made or refused)

    def resume(self, prior: Dict[str, Any]) -> None:
        """Go on from an interrupted run's results: its turns, checkpoints and timings."""
        self.rows = list(prior["turns"])
        self.history = list(prior.get("eval_history") or [])
        self.eval_seconds = float(prior["timing"].get("eval_seconds") or 0.0)
        self.next_turn = len(self.rows)
        self.last_checkpoint = self.history[-1]["n_edits"] if self.history else 0

    def run(self, progress: bool) -> None:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(self.requests),
                initial=self.next_turn * self.per_turn,
                unit="edit",
                desc="editing",
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.3,
                maxinterval=float("inf"),
            )
        try:
            self._checkpoint_left_undone(bar)
            for t in range(self.next_turn, self.turns):
                chunk = self.requests[t * self.per_turn : (t + 1) * self.per_turn]
                self.turn(t, chunk)
                if bar is not None:
                    bar.update(len(chunk))
                    bar.refresh()
                last = t + 1 == self.turns
                if last or (self.eval_every is not None and (t + 1) % self.eval_every == 0):
                    self.checkpoint(t + 1, last, bar)
        finally:
            if bar is not None:
                bar.close()

    def _checkpoint_left_undone(self, bar) -> None:
        """A resumed run interrupted while it scored a checkpoint scores it first."""
        t = self.next_turn
        due = t == self.turns or (self.eval_every is not None and t % self.eval_every == 0)
        if t and due and (not self.history or self.history[-1]["turn"] != t):
            self.checkpoint(t, t == self.turns, bar)

    def turn(self, t: int, chunk) -> None:
        """Turn ``t`` through the editor; its row is recorded as soon as the editor returns."""
        t0 = time.perf_counter()
        try:
            row = self.ed.edit(chunk).to_dict()
            row["refused"] = None
        except EditRefused as e:
            row = {
                "turn": t + 1,
                "n_requests": len(chunk),
                "seconds": {},
                "total_seconds": None,
                "peak_memory_bytes": None,
                "refused": str(e),
            }
        row["turn"] = t + 1  # the run's turn (the editor's count would skip refusals)
        row["wall_seconds"] = time.perf_counter() - t0
        row.pop("modules", None)  # in config
        self.rows.append(row)
        self.next_turn = t + 1

    def checkpoint(self, turn: int, last: bool, bar) -> None:
        n_done = turn * self.per_turn
        if bar is not None:
            bar.set_postfix_str(f"turn {turn}: scoring ...", refresh=True)
        t0 = time.perf_counter()
        entry: Dict[str, Any] = {"turn": turn, "n_edits": n_done}
        if last or not self.eval_sample:  # everything edited so far
            entry["metrics"] = m = self.scorer.at(range(n_done))
        else:
            recent = spread(range(self.last_checkpoint, n_done), self.eval_sample)
            older = [i for i in self.retention_pool if i < self.last_checkpoint]
            entry["recent"] = m = self.scorer.at(recent)
            entry["retention"] = self.scorer.at(older) if older else None
        entry["seconds"] = dt = time.perf_counter() - t0
        self.eval_seconds += dt
        self.history.append(entry)
        self.last_checkpoint = n_done
        if bar is not None:
            bar.unpause()  # the bar's rate counts editing time, not scoring time
            gen = f" ES_gen {pct(m.get('ES_gen'))}" if self.scorer.generation else ""
            bar.set_postfix_str(
                f"turn {turn}: ES {pct(m['ES'])} GS {pct(m['GS'])} LS {pct(m['LS'])}{gen}",
                refresh=True,
            )


def timing_summary(stream: Stream, timing: Dict[str, Any], editor: str) -> Dict[str, Any]:
    rows = stream.rows
    done = [r for r in rows if r["refused"] is None]
    edit_wall = sum(r["wall_seconds"] or 0.0 for r in rows)
    n_total = sum(r["n_requests"] for r in rows)
    peaks = [r["peak_memory_bytes"] for r in done if r["peak_memory_bytes"] is not None]
    return {
        "edit_seconds": edit_wall,
        "edits_per_second": n_total / edit_wall if edit_wall > 0 else None,
        "mean_turn_seconds": edit_wall / len(rows) if rows else None,
        "phase_seconds": {p: sum(r["seconds"].get(p, 0.0) for r in done) for p in PHASES}
        if editor == "fast"
        else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_kind": done[0]["peak_memory_kind"] if done else None,
        "process_peak_rss_bytes": peak_rss(),
        **timing,
        "eval_seconds": stream.eval_seconds,
        # flatness over the run (turn 1 carries one-time costs): least-squares slopes
        "turn_seconds_slope": _slope([(r["turn"], r["total_seconds"]) for r in done[1:]]),
        "peak_memory_slope_bytes": _slope(
            [
                (r["turn"], r["peak_memory_bytes"])
                for r in done[1:]
                if r["peak_memory_bytes"] is not None
            ]
        ),
    }


def _slope(points) -> Optional[float]:
    """Least-squares slope of ``[(x, y)]`` (``None`` with fewer than 3 points)."""
    if len(points) < 3:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
