"""The chart of a benchmark run: one panel per case present."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..utils.display import GIB, fmt_ratio, fmt_seconds, pyplot, save_figure, wrap
from .report import headline
from .settings import MEMORY_TARGET_BYTES
from .steps import median_s


C_FAST, C_REF, C_FLOOR = "#1f77b4", "#d62728", "#7f7f7f"
TURN_PHASES = ("capture", "statistics", "solve", "apply")
TURN_PHASE_COLORS = ("#1f77b4", "#17becf", "#2ca02c", "#9467bd")
PANEL_HEIGHTS = {"turn": 4.2, "lifelong": 3.8, "memory": 3.8}  # "steps": by its row count


@dataclass
class Panels:
    """The rows of each case that can be drawn (skipped and failed ones left out)."""

    steps: List[Dict[str, Any]]
    turns: List[Dict[str, Any]]
    lifelong: Optional[Dict[str, Any]]
    memory: List[Dict[str, Any]]

    @classmethod
    def of(cls, doc: Dict[str, Any]) -> "Panels":
        cases = doc.get("cases", {})
        lf = cases.get("lifelong")
        return cls(
            steps=[r for r in cases.get("steps", []) or [] if "op" in r],
            turns=[r for r in cases.get("turn", []) or [] if "fast" in r],
            lifelong=lf if lf and "fast" in lf else None,
            memory=[r for r in cases.get("memory", []) or [] if "fast_peak_bytes" in r],
        )

    def names(self) -> List[str]:
        present = {
            "steps": self.steps,
            "turn": self.turns,
            "lifelong": self.lifelong,
            "memory": self.memory,
        }
        return [name for name, rows in present.items() if rows]

    def height(self, name: str) -> float:
        if name == "steps":
            return max(4.0, 0.32 * len(self.steps) + 1.2)
        return PANEL_HEIGHTS[name]


def plot_steps(ax, steps: List[Dict[str, Any]]) -> None:
    labels = [f"{r['label']}  {r['op']}" for r in steps]
    y = list(range(len(steps)))[::-1]
    f = [median_s(r["fast"]) or float("nan") for r in steps]
    rf = [median_s(r["reference"]) or float("nan") for r in steps]
    ax.barh([v + 0.2 for v in y], f, height=0.4, color=C_FAST, label="fast")
    ax.barh([v - 0.2 for v in y], rf, height=0.4, color=C_REF, label="reference")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (median, log scale)")
    for yi, fi, ri, r in zip(y, f, rf, steps):
        if r.get("speedup"):
            ax.text(max(fi, ri) * 1.15, yi, f"x{fmt_ratio(r['speedup'])}", va="center", fontsize=7)
    ax.set_title(
        f"Per step at real shapes (N = {steps[0]['n_tokens']} rows, {steps[0]['dtype']})",
        fontsize=10,
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3, which="both")


def _turn_bars(ax, i: int, r: Dict[str, Any]) -> None:
    """Model ``i``'s bars: floor | fast by phase | reference, each over the reference's
    time (every model on its own scale)."""
    ref_t = median_s(r["reference"]) or median_s(r["fast"])
    bottom = 0.0
    for ph, c in zip(TURN_PHASES, TURN_PHASE_COLORS):
        v = r["fast_phases_median_s"].get(ph, 0.0) / ref_t
        ax.bar(i, v, 0.25, bottom=bottom, color=c, label=f"fast: {ph}" if i == 0 else None)
        bottom += v
    ax.text(i, bottom, f"{fmt_seconds(median_s(r['fast']))}", ha="center", va="bottom", fontsize=8)
    if median_s(r["reference"]):
        ax.bar(i + 0.27, 1.0, 0.25, color=C_REF, label="reference" if i == 0 else None)
        ax.text(
            i + 0.27,
            1.0,
            f"{fmt_seconds(median_s(r['reference']))}\nx{fmt_ratio(r.get('speedup'))}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if "floor" in r and median_s(r["floor"]):
        v = median_s(r["floor"]) / ref_t
        ax.bar(
            i - 0.27,
            v,
            0.25,
            color=C_FLOOR,
            label="floor (fwd+bwd to lowest edited layer)" if i == 0 else None,
        )
        ax.text(
            i - 0.27, v, fmt_seconds(median_s(r["floor"])), ha="center", va="bottom", fontsize=8
        )


def plot_turns(ax, turns: List[Dict[str, Any]]) -> None:
    for i, r in enumerate(turns):
        _turn_bars(ax, i, r)
    ax.set_xticks(list(range(len(turns))))
    ax.set_xticklabels(
        [f"{r['model']}\n({r['n_tokens']} answer tokens)" for r in turns], fontsize=8
    )
    ax.set_ylabel("time / reference's time")
    tops = [
        sum(r["fast_phases_median_s"].values()) / (median_s(r["reference"]) or median_s(r["fast"]))
        for r in turns
    ]
    ax.set_ylim(0, max([1.35] + [t * 1.25 for t in tops]))
    ax.set_xlim(-0.7, len(turns) - 0.3)
    ax.set_title(
        "One turn of 100 edits: floor | fast (by phase) | reference (medians; labels: seconds)",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)


def plot_lifelong(ax, lf: Dict[str, Any]) -> None:
    per = [e for e in lf["fast"]["per_turn"] if "seconds" in e]
    ax.plot(
        [e["turn"] for e in per],
        [e["seconds"] for e in per],
        "-o",
        ms=3,
        color=C_FAST,
        label="fast: turn",
    )
    ax.plot(
        [e["turn"] for e in per],
        [e["phases"].get("capture", 0) for e in per],
        "--",
        color="#17becf",
        label="fast: capture phase",
    )
    rt = lf.get("reference", {}).get("per_turn_seconds", [])
    if rt:
        ax.plot(
            list(range(1, len(rt) + 1)), rt, "s", color=C_REF, label=f"reference ({len(rt)} turns)"
        )
    top = max([e["seconds"] for e in per] + list(rt) + [1e-9])
    ax.set_ylim(0, top * 1.2)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("turn")
    ax.set_ylabel("seconds")
    d = lf["fast"].get("drift", {})
    ax.set_title(
        f"Lifelong: {lf['model']}, {len(per)} turns x {lf['edits_per_turn']} "
        f"edits (slope over the run: "
        f"{(d.get('relative_change_over_run') or 0) * 100:+.0f}%)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _memory_weights(ax, mems: List[Dict[str, Any]], div: float, unit: str, dev: str) -> None:
    """Hatch the weights' share of each bar, draw the 20 GiB target, name the y axis: for
    peaks that include the weights (CUDA's peak allocated, or the CPU's stand-in)."""
    x = list(range(len(mems)))
    w = [r["weights_bytes"] / div for r in mems]
    ax.bar(
        [i - 0.2 for i in x],
        w,
        0.4,
        color="none",
        hatch="//",
        edgecolor="k",
        label="of which weights",
    )
    ax.bar([i + 0.2 for i in x], w, 0.4, color="none", hatch="//", edgecolor="k")
    ax.axhline(
        MEMORY_TARGET_BYTES / GIB, color="k", ls="--", lw=1, label="20 GiB target (24 GB card)"
    )
    ax.set_ylabel(
        f"peak allocated, {unit}" if dev == "cuda" else f"weights + peak CPU allocations, {unit}"
    )


def plot_memory(ax, mems: List[Dict[str, Any]], dev: str) -> None:
    x = list(range(len(mems)))
    big = (
        max(
            [r["fast_peak_bytes"] or 0 for r in mems]
            + [r["reference_peak_bytes"] or 0 for r in mems]
        )
        >= GIB / 2
    )
    unit, div = ("GiB", GIB) if big or dev == "cuda" else ("MiB", 2**20)
    fpk = [(r["fast_peak_bytes"] or 0) / div for r in mems]
    rpk = [(r["reference_peak_bytes"] or 0) / div for r in mems]
    ax.bar([i - 0.2 for i in x], fpk, 0.4, color=C_FAST, label="fast")
    ax.bar([i + 0.2 for i in x], rpk, 0.4, color=C_REF, label="reference")
    accounted = dev == "cuda" or all("fast_turn_alloc_peak_bytes" in r for r in mems)
    if accounted:
        _memory_weights(ax, mems, div, unit, dev)
    else:
        ax.set_ylabel(f"peak RSS above pre-turn RSS, {unit}")
    for i in x:
        for dx, v in ((-0.2, fpk[i]), (0.2, rpk[i])):
            ax.text(i + dx, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xlim(-0.7, len(mems) - 0.3)
    ax.set_xticks(x)
    ax.set_xticklabels([r["model"] for r in mems], fontsize=8)
    ax.set_title("Peak memory of one turn", fontsize=10)
    top = max(fpk + rpk + ([MEMORY_TARGET_BYTES / div] if accounted else []))
    if top > 0:
        ax.set_ylim(0, 1.35 * top)  # room for the legend
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    ax.grid(axis="y", alpha=0.3)


def plot(doc: Dict[str, Any], path: str) -> Optional[str]:
    """A PNG with one panel per case present. Returns the path, or None without matplotlib."""
    plt = pyplot(f"the chart {path}")
    if plt is None:
        return None
    dev = doc.get("env", {}).get("device_type", "cpu")
    panels = Panels.of(doc)
    names = panels.names()
    if not names:
        return None
    heights = [panels.height(p) for p in names]
    fig, axes = plt.subplots(
        len(names),
        1,
        figsize=(12, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    draw = {
        "steps": lambda ax: plot_steps(ax, panels.steps),
        "turn": lambda ax: plot_turns(ax, panels.turns),
        "lifelong": lambda ax: plot_lifelong(ax, panels.lifelong),
        "memory": lambda ax: plot_memory(ax, panels.memory, dev),
    }
    for ax, p in zip(axes[:, 0], names):
        draw[p](ax)
    fig.suptitle(wrap(headline(doc), first="ultraedit_fast bench:"), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_size_inches()[1]))
    return save_figure(plt, fig, path)
