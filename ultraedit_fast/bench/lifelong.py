"""The ``lifelong`` case: ``T`` turns of the fast editor one after the other on the same model
(per-turn time must stay flat), beside a few turns of the reference, whose ``T``-turn time
is extrapolated from them."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..editors.ultraedit import EditRefused
from ..utils.display import fmt_seconds
from .cases import WeightKeeper, make_editors
from .instrument import is_oom, measure, times_summary
from .settings import Settings
from .steps import peak_of
from .workloads import ModelCase, ModelPool


def drift(times: List[float]) -> Dict[str, Any]:
    """Flatness of per-turn times: least-squares slope (s/turn and relative to the mean over
    the whole run) and the mean of the last 5 turns over the mean of turns 2..6."""
    out: Dict[str, Any] = {}
    xs = list(range(1, len(times) + 1))
    if len(times) >= 3:
        body = times[1:]  # turn 1 carries one-time costs
        xb = xs[1:]
        mx, my = sum(xb) / len(xb), sum(body) / len(body)
        sxx = sum((x - mx) ** 2 for x in xb)
        slope = sum((x - mx) * (y - my) for x, y in zip(xb, body)) / sxx if sxx else 0.0
        out["slope_s_per_turn"] = slope
        out["relative_change_over_run"] = slope * (len(times) - 1) / my if my else None
    if len(times) >= 11:
        first = times[1:6]
        last = times[-5:]
        out["last5_over_turns2to6"] = (sum(last) / 5) / (sum(first) / 5)
    return out


def measured_peak(m: Dict[str, Any], device) -> Optional[int]:
    """:func:`peak_of` the metrics of one :func:`measure`d call."""
    return peak_of(
        {
            "cuda_peak_allocated_bytes": m.get("cuda_peak_allocated_bytes"),
            "peak_rss_increase_bytes": m.get("peak_rss_increase_bytes"),
        },
        device,
    )


def lifelong_header(s: Settings, mc: ModelCase, fast) -> Dict[str, Any]:
    """What the lifelong case runs: the model, its modules and data, the turns planned."""
    res: Dict[str, Any] = {
        "model": mc.name,
        "description": mc.description,
        "data": mc.data,
        "modules": list(fast.module_names),
        "lr": fast.lr,
        "backend": fast.backend,
        "turns_planned": s.lifelong_turns,
        "edits_per_turn": s.edits,
    }
    if mc.requests_pool:
        res["data_note"] = (
            f"turn t edits zsRE records 100t..100t+99 modulo "
            f"{len(mc.requests_pool)}: turns past the file's end re-edit "
            "earlier records"
        )
    return res


def fast_turn_entry(t: int, rep, m: Dict[str, Any], device) -> Dict[str, Any]:
    entry = {
        "turn": t + 1,
        "seconds": rep.total_seconds,
        "wall_s": m["wall_s"],
        "phases": dict(rep.seconds),
        "n_tokens": rep.n_tokens,
        "peak_bytes": measured_peak(m, device),
        "cpu_s": m["cpu_s"],
    }
    if "nvml" in m:
        entry["nvml"] = m["nvml"]
    return entry


def run_fast_turns(
    s: Settings, mc: ModelCase, fast, log=print
) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Up to ``s.lifelong_turns`` turns of the fast editor, one after the other on the same
    model: an entry per turn (a refused turn recorded as such) and why it stopped early,
    if it did."""
    per_turn: List[Dict[str, Any]] = []
    for t in range(s.lifelong_turns):
        if s.out_of_time(margin=5):
            return per_turn, f"time budget: stopped after {t} turns"
        reqs = mc.requests(t, n=s.edits, seed=s.seed)
        try:
            rep, m = measure(lambda: fast.edit(reqs), s.device)
        except EditRefused as e:
            per_turn.append({"turn": t + 1, "refused": str(e)})
            continue
        per_turn.append(fast_turn_entry(t, rep, m, s.device))
        if (t + 1) % max(1, s.lifelong_turns // 10) == 0:
            log(
                f"[lifelong] {mc.name}: turn {t + 1}/{s.lifelong_turns}: {fmt_seconds(rep.total_seconds)}"
            )
    return per_turn, None


def add_fast_results(
    res: Dict[str, Any], per_turn: List[Dict[str, Any]], stopped: Optional[str]
) -> List[float]:
    """The fast editor's peaks and per-turn times into ``res``; returns the times."""
    times = [e["seconds"] for e in per_turn if "seconds" in e]
    peaks = [e["peak_bytes"] for e in per_turn if e.get("peak_bytes") is not None]
    res["fast_peak_bytes_max"] = max(peaks) if peaks else None
    # turn 1 carries one-time allocations (allocator growth, first use of the kernels)
    res["fast_peak_bytes_max_after_turn1"] = max(peaks[1:]) if len(peaks) > 1 else None
    res["fast"] = {
        "per_turn": per_turn,
        "turns_done": len(times),
        "seconds": times_summary(times) if times else None,
        "total_seconds": sum(times),
        "drift": drift(times),
    }
    if stopped:
        res["fast"]["stopped"] = stopped
    return times


def run_reference_turns(s: Settings, mc: ModelCase, ref) -> Dict[str, Any]:
    """The reference: a few turns of the same sequence, from the same starting weights,
    until ``s.ref_turns``, the time budget or an error."""
    ref_times, ref_peaks = [], []
    ref_err = None
    for t in range(s.ref_turns):
        if s.out_of_time(margin=5):
            break
        reqs = mc.requests(t, n=s.edits, seed=s.seed)
        try:
            rep, m = measure(lambda: ref.edit(reqs), s.device)
        except Exception as e:  # noqa: BLE001
            ref_err = f"out of memory: {e}" if is_oom(e) else f"{type(e).__name__}: {e}"
            break
        ref_times.append(rep.total_seconds)
        ref_peaks.append(measured_peak(m, s.device))
    out = {
        "turns_done": len(ref_times),
        "per_turn_seconds": ref_times,
        "peak_bytes": max([p for p in ref_peaks if p is not None], default=None),
    }
    if ref_err:
        out["error"] = ref_err
    return out


def extrapolate_reference(ref_res: Dict[str, Any], turns: int) -> None:
    """The reference's mean turn and its total for ``turns`` turns, from the turns run."""
    ref_times = ref_res["per_turn_seconds"]
    if not ref_times:
        return
    # turn 1 carries one-time costs: extrapolate from the later turns when there are some
    basis = ref_times[1:] if len(ref_times) > 1 else ref_times
    per = sum(basis) / len(basis)
    ref_res["mean_seconds_per_turn"] = per
    ref_res["extrapolated_total_seconds"] = per * turns
    ref_res["extrapolation"] = (
        f"{len(ref_times)} reference turns measured; total for {turns} turns = "
        f"{turns} x mean of turns {2 if len(ref_times) > 1 else 1}.."
        f"{len(ref_times)} (the reference's turn cost does not grow with turns either: "
        "its state is the same fixed-size normaliser)"
    )


def add_fast_per_turn(res: Dict[str, Any], times: List[float], turns: int) -> None:
    """The fast editor's mean turn (turn 1 left out when there are others), its projected
    total for ``turns`` turns, and the speedup per turn over the reference."""
    if not times:
        return
    fast_per = (sum(times[1:]) / (len(times) - 1)) if len(times) > 1 else times[0]
    res["fast"]["mean_seconds_per_turn"] = fast_per
    res["fast"]["projected_total_seconds"] = fast_per * turns
    if res["reference"]["per_turn_seconds"]:
        res["speedup_per_turn"] = res["reference"]["mean_seconds_per_turn"] / fast_per


def case_lifelong(s: Settings, pool: ModelPool, log=print) -> Dict[str, Any]:
    try:
        mc = pool.get(s.lifelong_model)
    except Exception as e:  # noqa: BLE001
        return {"model": s.lifelong_model, "skipped": f"{type(e).__name__}: {e}"}
    fast, ref = make_editors(mc, **s.editor_options)
    keeper = WeightKeeper(mc.model, fast.module_names)
    res = lifelong_header(s, mc, fast)
    per_turn, stopped = run_fast_turns(s, mc, fast, log)
    keeper.restore()
    times = add_fast_results(res, per_turn, stopped)
    res["reference"] = run_reference_turns(s, mc, ref)
    keeper.restore()
    extrapolate_reference(res["reference"], s.lifelong_turns)
    add_fast_per_turn(res, times, s.lifelong_turns)
    log(
        f"[lifelong] {mc.name}: {len(times)} fast turns, mean "
        f"{fmt_seconds(res['fast'].get('mean_seconds_per_turn'))}/turn, drift "
        f"{res['fast']['drift']}; reference {res['reference']['turns_done']} turns, "
        f"{fmt_seconds(res['reference'].get('mean_seconds_per_turn'))}/turn"
    )
    return res
