"""The plot of a lifelong run's results: scores over turns (teacher-forced and generated
beside each other), per-turn time by phase and peak memory, drawn from the results JSON
alone (so a committed run can be redrawn)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..core.report import PHASES
from ..model.targets import summarize_names
from ..utils.display import PHASE_COLOURS, fmt_bytes, pyplot, save_figure

# ----------------------------------------------------------------------------- the plot
_METRIC_STYLE = {
    "ES": ("#1f77b4", "o", "ES - efficacy (edit prompt)"),
    "GS": ("#ff7f0e", "s", "GS - generalisation (paraphrase)"),
    "LS": ("#2ca02c", "^", "LS - locality vs dataset answer"),
    "LS_unedited": ("#7f7f7f", "D", "LS_unedited - locality vs unedited model"),
    "personas": ("#9467bd", "v", "personas"),
    "mhop": ("#8c564b", "P", "multi-hop"),
}
_GEN_STYLE = {
    "ES_gen": ("#1f77b4", "o", "ES_gen - target generated after the edit prompt"),
    "GS_gen": ("#ff7f0e", "s", "GS_gen - ... after the paraphrase"),
    "LS_gen": ("#2ca02c", "^", "LS_gen - locality answer generated"),
    "LS_gen_unedited": ("#7f7f7f", "D", "LS_gen_unedited - same text as unedited"),
    "drift_top1": ("#9467bd", "v", "drift_top1 - unrelated next token unchanged"),
    "health_ppl_ratio": ("#8c564b", "P", "health: unedited / edited perplexity of general text"),
    "health_top1": ("#17becf", "X", "health: general text's next token unchanged"),
    "health_unrelated_kept": ("#bcbd22", "*", "health: unrelated prompts' greedy answer kept"),
}
# 1.0 for the unedited model
_SELF = (
    "LS_unedited",
    "LS_gen_unedited",
    "drift_top1",
    "health_ppl_ratio",
    "health_top1",
    "health_unrelated_kept",
)


def _value(m, key):
    """The plotted value of ``key`` in scores ``m`` (a perplexity ratio as its inverse, so
    that every curve reads 'higher is better, 1 is the unedited model')."""
    v = (m or {}).get(key)
    if key == "health_ppl_ratio" and v:
        return 1.0 / v
    return v


def _end_labels(ax, ends, turns: int) -> None:
    """Each curve's final value beside its end, spread so that the labels do not overlap."""
    ends.sort()  # final values, spread so that their labels do not overlap
    for i in range(1, len(ends)):
        ends[i][1] = max(ends[i][1], ends[i - 1][1] + 4.5)
    for y, y_label, x_end, colour in ends:
        ax.annotate(
            f"{y:.1f}",
            (x_end, y),
            xytext=(x_end + 0.03 * turns + 0.1, y_label),
            textcoords="data",
            va="center",
            fontsize=9,
            color=colour,
            fontweight="bold",
        )


def _score_panel(ax, results, style, title):
    """One panel of scores over turns: at each checkpoint the requests it scored (all edited
    so far, or those since the previous checkpoint: solid) and the retention sample
    (dashed, hollow); turn 0 is the unedited model."""
    cfg = results["config"]
    hist = list(results.get("eval_history", []))
    before = results.get("metrics_before")
    ends, drew_retention = [], False
    for key, (colour, marker, label) in style.items():
        main = [(h["turn"], _value(h.get("metrics") or h.get("recent"), key)) for h in hist]
        main = [(x, y) for x, y in main if y is not None]
        if not main:
            continue
        if key in _SELF:
            main = [(0, 1.0)] + main
        elif before is not None and before.get(key) is not None:
            main = [(0, before[key])] + main
        xs, ys = zip(*main)
        ax.plot(
            xs,
            [100 * y for y in ys],
            marker=marker,
            color=colour,
            label=label,
            linewidth=2,
            markersize=5,
        )
        ret = [(h["turn"], _value(h["retention"], key)) for h in hist if h.get("retention")]
        ret = [(x, y) for x, y in ret if y is not None]
        if ret:
            drew_retention = True
            rx, ry = zip(*ret)
            ax.plot(
                rx,
                [100 * y for y in ry],
                marker=marker,
                color=colour,
                linestyle="--",
                markerfacecolor="none",
                linewidth=1.3,
                markersize=5,
            )
        ends.append([100 * ys[-1], 100 * ys[-1], xs[-1], colour])
    _end_labels(ax, ends, cfg["turns"])
    ax.set_xlim(-0.03 * cfg["turns"] - 0.2, cfg["turns"] * 1.13 + 0.6)
    ax.set_ylim(-3, 105)
    ax.set_xlabel("turn (0 = unedited model)")
    ax.set_ylabel("score (%)")
    sub = (
        "edited since the last checkpoint (solid), a retention\nsample (dashed); last point: all edits"
        if drew_retention
        else "on all requests edited so far"
    )
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, fontsize=8.5, frameon=False)
    if cfg["turns"] <= 20:
        ax.set_xticks(range(0, cfg["turns"] + 1))


def plot_results(results: Mapping[str, Any], path: str) -> Optional[str]:
    """Draw ``results`` (from :func:`~ultraedit_fast.lifelong.run_lifelong`) into a PNG at
    ``path``: per-turn edit time stacked by phase, and the scores over turns. ``None``
    (with a warning) without matplotlib."""
    plt = pyplot(f"the plot {path}")
    if plt is None:
        return None
    generated = any(
        {"ES_gen", "health_top1"} & set(h.get("metrics") or h.get("recent") or {})
        for h in results.get("eval_history", [])
    )
    if generated:
        fig, (ax_t, ax_m, ax_g) = plt.subplots(
            1, 3, figsize=(19, 6.8), gridspec_kw={"width_ratios": [1.15, 1, 1]}
        )
    else:
        fig, (ax_t, ax_m) = plt.subplots(
            1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1.15, 1]}
        )
        ax_g = None
    _time_panel(ax_t, results)
    _score_panel(ax_m, results, _METRIC_STYLE, "Teacher-forced token accuracy")
    if ax_g is not None:
        _score_panel(ax_g, results, _GEN_STYLE, "Generated (greedy decoding) and health")
    _titles(fig, results)
    return save_figure(plt, fig, path)


def _time_bars(ax, rows) -> tuple:
    """Per-turn time stacked by phase (refused turns hatched); ``(tops, phases, refused)``."""
    x = [r["turn"] for r in rows]
    width = 0.8 if len(x) <= 60 else 1.0
    done = [r for r in rows if r["refused"] is None]
    phases = [p for p in PHASES if any(p in r["seconds"] for r in done)] or (
        ["total"] if done else []
    )
    bottom = [0.0] * len(rows)
    per_phase = {
        p: [
            r["seconds"].get(p, r["wall_seconds"] if p == "total" else 0.0)
            if r["refused"] is None
            else 0.0
            for r in rows
        ]
        for p in phases
    }
    grand = sum(sum(v) for v in per_phase.values()) or 1.0
    for p in phases:
        vals = per_phase[p]
        share = 100 * sum(vals) / grand
        label = p if p == "total" else f"{p} ({share:.1f} %)" if share >= 0.1 else f"{p} (<0.1 %)"
        ax.bar(
            x,
            vals,
            width,
            bottom=bottom,
            label=label,
            color=PHASE_COLOURS[p],
            edgecolor="white" if len(x) <= 60 else "none",
            linewidth=0.5,
        )
        bottom = [b + v for b, v in zip(bottom, vals)]
    refused = [r for r in rows if r["refused"] is not None]
    if refused:
        vals = [r["wall_seconds"] for r in refused]
        ax.bar(
            [r["turn"] for r in refused],
            vals,
            width,
            color="#cccccc",
            hatch="//",
            edgecolor="#888888",
            linewidth=0.5,
            label="refused turn (no change)",
        )
        bottom = bottom + vals
    return bottom, phases, refused


def _time_panel(ax_t, results) -> None:
    cfg, rows, timing = results["config"], results["turns"], results["timing"]
    bottom, phases, refused = _time_bars(ax_t, rows)
    ax_t.set_xlabel("turn")
    ax_t.set_ylabel("edit time per turn (s)")
    eps = timing.get("edits_per_second")
    peak = timing.get("peak_memory_bytes")
    kind = (
        (timing.get("peak_memory_kind") or "")
        .replace("cpu_peak_rss", "CPU peak RSS")
        .replace("cuda_peak_allocated", "CUDA peak allocated")
        .replace("_", " ")
    )
    ax_t.set_title(
        f"Edit time per turn ({cfg['edits_per_turn']} edits each)\n"
        f"mean {timing['mean_turn_seconds']:.2f} s/turn"
        + (f", {eps:.0f} edits/s" if eps else "")
        + (f"; peak memory {fmt_bytes(peak)} ({kind})" if peak else ""),
        fontsize=11,
    )
    ax_t.set_ylim(0, max(bottom + [1e-9]) * 1.08)
    ax_t.grid(axis="y", alpha=0.3)
    ax_t.set_axisbelow(True)
    ax_t.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        ncol=max(1, len(phases) + bool(refused)),
        fontsize=9,
        frameon=False,
    )
    if len(rows) <= 20:
        ax_t.set_xticks([r["turn"] for r in rows])


def _titles(fig, results) -> None:
    cfg, env = results["config"], results.get("environment", {})
    dataset = cfg.get("dataset") or "requests"
    fig.suptitle(
        f"UltraEdit lifelong editing: {cfg.get('model_name', 'model')} on {dataset}, "
        f"{cfg['turns']} turns x {cfg['edits_per_turn']} edits",
        fontsize=13,
        fontweight="bold",
    )
    parts = [
        f"{cfg['editor']} editor, backend {cfg['backend']}, lr {cfg['lr']:g}, "
        f"{summarize_names(cfg['modules'])}"
    ]
    if env.get("device_name"):
        parts.append(env["device_name"])
    if env.get("ultraedit_fast"):
        parts.append(f"ultraedit_fast {env['ultraedit_fast']}, torch {env.get('torch', '?')}")
    if results.get("date"):
        parts.append(str(results["date"])[:10])
    fig.text(0.5, 0.925, " | ".join(parts), ha="center", fontsize=8.5, color="#555")
    fig.tight_layout(rect=(0, 0, 1, 0.925))
