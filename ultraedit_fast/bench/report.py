"""The results of a benchmark run as text: the summary table (fast beside reference) and
its headline, and merging a run into an earlier results file."""

from __future__ import annotations

import copy
from typing import Any, Dict, List

from ..utils.display import fmt_bytes, fmt_ratio, fmt_seconds
from ..utils.files import atomic_write_json
from .steps import median_s, peak_of


def _row(case, what, fast, ref, speed, fpk=None, rpk=None, note="") -> Dict[str, str]:
    return {
        "case": case,
        "what": what,
        "fast": fast,
        "reference": ref,
        "speedup": speed,
        "fast_peak": fpk,
        "reference_peak": rpk,
        "note": note,
    }


def _step_rows(steps: List[Dict[str, Any]], dev: str) -> List[Dict[str, str]]:
    rows = []
    for r in steps:
        if "op" not in r:
            rows.append(
                _row(
                    "steps",
                    r.get("label", r.get("shape")),
                    "-",
                    "-",
                    "-",
                    note=r.get("skipped") or r.get("error", ""),
                )
            )
            continue
        f, rf = r["fast"], r["reference"]
        note = f"N={r['n_tokens']}, {r['dtype']}"
        fr, rr = f.get("seconds", {}).get("runs", 0), rf.get("seconds", {}).get("runs", 0)
        if rr < fr:
            note += f"; reference {rr} run{'s' if rr != 1 else ''}"
        if "error" in rf:
            note += f"; reference: {rf['error'].splitlines()[0][:60]}"
        rows.append(
            _row(
                "steps",
                f"{r['label']} {r['op']}",
                fmt_seconds(median_s(f)),
                fmt_seconds(median_s(rf)),
                fmt_ratio(r.get("speedup")),
                fmt_bytes(peak_of(f, dev)),
                fmt_bytes(peak_of(rf, dev)),
                note,
            )
        )
    return rows


def _turn_rows(turns: List[Dict[str, Any]], dev: str) -> List[Dict[str, str]]:
    rows = []
    for r in turns:
        if "fast" not in r:
            why = r.get("skipped") or r.get("error")
            rows.append(
                _row(
                    "turn",
                    r.get("model"),
                    "-",
                    "-",
                    "-",
                    note=why.splitlines()[0][:80] if why else "",
                )
            )
            continue
        fl = median_s(r.get("floor", {}))
        note = f"{r['n_tokens']} tok; floor {fmt_seconds(fl)}; fast/floor {fmt_ratio(r.get('fast_over_floor'))}"
        if r.get("overhead_speedup"):
            note += f"; overhead x{fmt_ratio(r['overhead_speedup'])}"
        if "error" in r["reference"]:
            note += f"; reference: {r['reference']['error'].splitlines()[0][:50]}"
        rows.append(
            _row(
                "turn",
                r["model"],
                fmt_seconds(median_s(r["fast"])),
                fmt_seconds(median_s(r["reference"])),
                fmt_ratio(r.get("speedup")),
                fmt_bytes(peak_of(r["fast"], dev)),
                fmt_bytes(peak_of(r["reference"], dev)),
                note,
            )
        )
    return rows


def _lifelong_rows(lf: Dict[str, Any]) -> List[Dict[str, str]]:
    if not lf:
        return []
    if "fast" not in lf:
        return [_row("lifelong", lf.get("model"), "-", "-", "-", note=lf.get("skipped", ""))]
    f, rf = lf["fast"], lf.get("reference", {})
    d = f.get("drift", {})
    note = (
        f"{f['turns_done']} turns; slope {d.get('relative_change_over_run', 0) * 100:+.0f}% over the run"
        if d.get("relative_change_over_run") is not None
        else f"{f['turns_done']} turns"
    )
    if d.get("last5_over_turns2to6"):
        note += f"; last5/turns2-6 {d['last5_over_turns2to6']:.2f}"
    note += (
        f"; total {fmt_seconds(f.get('total_seconds'))} vs ref "
        f"~{fmt_seconds(rf.get('extrapolated_total_seconds'))} "
        f"(extrapolated from {rf.get('turns_done', 0)} turns)"
    )
    # turn 1 carries one-time allocations: the peak shown is over the later turns
    peaks = [e.get("peak_bytes") for e in f["per_turn"] if e.get("peak_bytes") is not None]
    peak = max(peaks[1:]) if len(peaks) > 1 else (peaks[0] if peaks else None)
    if len(peaks) > 1:
        note += "; fast peak: max over turns 2.."
    return [
        _row(
            "lifelong",
            f"{lf['model']} per turn",
            fmt_seconds(f.get("mean_seconds_per_turn")),
            fmt_seconds(rf.get("mean_seconds_per_turn")),
            fmt_ratio(lf.get("speedup_per_turn")),
            fmt_bytes(peak),
            fmt_bytes(rf.get("peak_bytes")),
            note,
        )
    ]


def _memory_rows(mems: List[Dict[str, Any]], dev: str) -> List[Dict[str, str]]:
    rows = []
    for r in mems:
        if "fast_peak_bytes" not in r:
            rows.append(_row("memory", r.get("model"), "-", "-", "-", note=r.get("skipped", "")))
            continue
        note = f"weights {fmt_bytes(r['weights_bytes'])}"
        if "target_bytes" in r:
            note += (
                f"; fast {'<=' if r.get('fast_within_target') else '>'} 20 GiB target"
                f"; ref {'<=' if r.get('reference_within_target') else '>'} 20 GiB"
            )
            card = r.get("fast_on_24gb_card") or {}
            if "ok" in card:
                note += f"; fast turn under a 24 GB cap: {'ran' if card['ok'] else 'FAILED'}"
        if r.get("reference_error"):
            note += f"; reference: {r['reference_error'][:40]}"
        kind = (
            "peak allocated"
            if dev == "cuda"
            else "weights + peak CPU allocations"
            if "fast_turn_alloc_peak_bytes" in r
            else "peak RSS increase"
        )
        rows.append(
            _row(
                "memory",
                r["model"],
                fmt_bytes(r["fast_peak_bytes"]),
                fmt_bytes(r["reference_peak_bytes"]),
                f"{r['reference_over_fast']:.2f} (mem)" if r.get("reference_over_fast") else "-",
                note=note + "; " + kind,
            )
        )
    return rows


def table_rows(doc: Dict[str, Any]) -> List[Dict[str, str]]:
    """Rows of the summary table: fast beside reference, with the speedup and peak memory."""
    cases = doc.get("cases", {})
    dev = doc.get("env", {}).get("device_type", "cpu")
    return (
        _step_rows(cases.get("steps", []) or [], dev)
        + _turn_rows(cases.get("turn", []) or [], dev)
        + _lifelong_rows(cases.get("lifelong"))
        + _memory_rows(cases.get("memory", []) or [], dev)
    )


def format_table(doc: Dict[str, Any], markdown: bool = False) -> str:
    rows = table_rows(doc)
    cols = [
        ("case", "case"),
        ("what", "what"),
        ("fast", "fast"),
        ("reference", "reference"),
        ("speedup", "speedup"),
        ("fast_peak", "fast peak"),
        ("reference_peak", "ref peak"),
        ("note", "note"),
    ]
    cells = [[h for _, h in cols]] + [[str(r.get(k) or "-") for k, _ in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols) - 1)]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if j == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 4))
    return "\n".join(lines)


def headline(doc: Dict[str, Any]) -> str:
    env = doc.get("env", {})
    dev = (
        env.get("gpu", {}).get("name")
        if env.get("device_type") == "cuda"
        else f"CPU {env.get('cpu', {}).get('model')} ({env.get('cpu', {}).get('usable_cores')} cores)"
    )
    v = env.get("versions") or env
    return (
        f"{dev}; {env.get('datetime_utc')}; torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, triton {v.get('triton')}, ultraedit_fast "
        f"{v.get('ultraedit_fast')}; backend {env.get('backend')}"
        + (f"; driver {env.get('driver')}" if env.get("driver") else "")
        + (
            f"; {doc['settings']['threads']} torch thread(s)"
            if doc.get("settings", {}).get("threads")
            else ""
        )
        + f"; loadavg at start {env.get('cpu', {}).get('loadavg_at_start')}"
    )


def merge_results(prev: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """``prev`` with ``new``'s cases laid over it: a row of ``steps``/``turn``/``memory``
    replaces the row of the same model (or shape and op), ``lifelong`` is replaced whole.
    The first run's ``env`` stays on top; every later run's env, settings and load are
    listed under ``merged_runs``."""
    out = copy.deepcopy(prev)
    key = lambda r: (r.get("model"), r.get("shape"), r.get("op"))  # noqa: E731
    for case, val in new.get("cases", {}).items():
        old = out.setdefault("cases", {}).get(case)
        if isinstance(val, list) and isinstance(old, list):
            fresh = {key(r) for r in val}
            out["cases"][case] = [r for r in old if key(r) not in fresh] + list(val)
        else:
            out["cases"][case] = val
    out.setdefault("merged_runs", []).append(
        {
            k: new.get(k)
            for k in (
                "env",
                "settings",
                "loadavg_per_case",
                "seconds_per_case",
                "elapsed_s",
                "model_build_seconds",
            )
        }
        | {"cases": sorted(new.get("cases", {}))}
    )
    return out


def write_json(doc: Dict[str, Any], path: str) -> None:
    """Write a results document atomically (values JSON cannot hold as their ``str``)."""
    atomic_write_json(path, doc, indent=1, default=str)
