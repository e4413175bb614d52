"""Lifelong editing runs: ``T`` turns of ``M`` edits, scored at the end (and optionally
every ``k`` turns), written to one JSON file and one PNG plot.

    from ultraedit_fast.lifelong.runner import run_lifelong
    from ultraedit_fast.data.datasets import iter_examples
    results = run_lifelong(model, tok, iter_examples("zsre.json"), turns=10,
                           edits_per_turn=100, output_dir="out/")

What a run does:

1. takes the first ``turns * edits_per_turn`` items of ``examples_or_requests``
   (:class:`~ultraedit_fast.data.datasets.Example`, :class:`~ultraedit_fast.EditRequest` or dicts);
2. captures the *unedited* model's predictions at the locality answer tokens of all of
   them (for ``LS_unedited``) and, unless ``eval_before=False``, scores the unedited model
   on them (the baseline: ``metrics_before``);
3. edits them turn by turn with :class:`~ultraedit_fast.UltraEditor` (``editor="fast"``)
   or :class:`~ultraedit_fast.ReferenceEditor` (``editor="reference"``);
4. every ``eval_every`` turns scores the model on everything edited so far, and after the
   last turn on everything edited: ``ES``, ``GS``, ``LS``, ``LS_unedited`` (``docs/algorithm.md``
   section 7) and, where ``Example.extras`` carry them (WikiBigEdit), ``personas`` (token
   accuracy of the edit target after each persona prompt, averaged over all
   (request, persona) pairs) and ``mhop`` (token accuracy of ``mhop_ans`` after ``mhop``).

All scores are fractions in [0, 1] (``None`` where no request has the field).  A turn that
the editor refuses (:class:`~ultraedit_fast.EditRefused`: non-finite shift) leaves the
model unchanged; the run records it under ``refused`` in that turn's entry and goes on.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from ..core.config import EditorConfig
from ..utils.display import PHASE_COLOURS, fmt_bytes, pct, pyplot, save_figure
from .._log import log
from ..editors.ultraedit import EditRefused, UltraEditor
from ..utils.environment import environment, peak_rss
from ..scoring.metrics import capture_baseline, evaluate, mean, token_accuracy
from ..scoring.generation import spread
from ..editors.reference import ReferenceEditor
from ..core.report import PHASES
from ..model.requests import EditRequest, as_requests
from ..model.targets import summarize_names

__all__ = ["run_lifelong", "score", "plot_results", "RESULTS_JSON", "RESULTS_PNG", "SCHEMA"]

SCHEMA = "ultraedit_fast.lifelong.runner/1"
RESULTS_JSON = "lifelong.json"
RESULTS_PNG = "lifelong.png"
EDITORS = ("fast", "reference")
METRICS = ("ES", "GS", "LS", "LS_unedited", "personas", "mhop")


# ----------------------------------------------------------------------------- scoring
def _split(items: Sequence[Any]):
    """``(requests, extras)`` from Examples, EditRequests or dicts."""
    requests: List[Any] = []
    extras: List[Dict[str, Any]] = []
    for i, it in enumerate(items):
        if hasattr(it, "request") and hasattr(it, "extras"):  # data.Example
            requests.append(it.request)
            extras.append(dict(it.extras or {}))
        elif isinstance(it, (EditRequest, Mapping)):
            requests.append(it)
            extras.append({})
        else:
            raise TypeError(f"examples_or_requests[{i}]: expected an Example, EditRequest or "
                            f"dict, got {type(it).__name__}")
    return as_requests(requests, "examples_or_requests"), extras


def score(model, tokenizer, requests, extras: Optional[Sequence[Mapping]] = None, *,
          base=None, base_predictions=None, generation: bool = True, batch_size: int = 32,
          chat_template: bool = False) -> Dict[str, Any]:
    """:func:`~ultraedit_fast.scoring.metrics` (teacher-forced and, with ``generation``,
    generation-based scores) plus the WikiBigEdit scores: ``personas``, ``n_personas``,
    ``mhop``, ``n_mhop`` (fractions, ``None`` when absent)."""
    requests = as_requests(requests)
    out = dict(evaluate(model, tokenizer, requests, base=base, base_predictions=base_predictions,
                        generation=generation, batch_size=batch_size,
                        chat_template=chat_template))
    extras = list(extras) if extras is not None else [{}] * len(requests)
    persona_pairs = [(p, r.target) for r, x in zip(requests, extras)
                     for p in (x.get("personas") or []) if isinstance(p, str) and p.strip()]
    mhop_pairs = [(x["mhop"], x["mhop_ans"]) for x in extras
                  if x.get("mhop") and x.get("mhop_ans")]
    out["personas"] = mean(token_accuracy(model, tokenizer, persona_pairs, batch_size)
                            if persona_pairs else [])
    out["n_personas"] = len(persona_pairs)
    out["mhop"] = mean(token_accuracy(model, tokenizer, mhop_pairs, batch_size)
                        if mhop_pairs else [])
    out["n_mhop"] = len(mhop_pairs)
    return out


# ----------------------------------------------------------------------------- the run
def _check_pos_int(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, "
                         f"got {v!r}")


def _model_label(model, config_extra: Mapping) -> str:
    if config_extra.get("model_name"):
        return str(config_extra["model_name"])
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or \
        type(model).__name__
    return os.path.basename(str(name).rstrip("/")) or str(name)


def run_lifelong(model, tokenizer, examples_or_requests: Iterable[Any], *, turns: int,
                 edits_per_turn: int, editor: str = "fast",
                 eval_every: Optional[int] = None, eval_sample: Optional[int] = None,
                 eval_batch_size: int = 32, generation: bool = True,
                 eval_before: bool = True, base=None, base_predictions=None,
                 progress: bool = True, output_dir: Optional[str] = None, plot: bool = True,
                 config_extra: Optional[Mapping[str, Any]] = None,
                 export_patch: Optional[str] = None, export_lora: Optional[str] = None,
                 lora_rank: Optional[int] = None, save_editor: Optional[str] = None,
                 **options) -> Dict[str, Any]:
    """Edit ``model`` in ``turns`` turns of ``edits_per_turn`` requests and score it.

    Args:
        examples_or_requests: an iterable (a stream is fine) of
            :class:`~ultraedit_fast.data.datasets.Example`, ``EditRequest`` or dicts; its first
            ``turns * edits_per_turn`` items are used (``ValueError`` if it has fewer).
        editor: ``"fast"`` (:class:`UltraEditor`) or ``"reference"`` (:class:`ReferenceEditor`,
            which has no ``backend`` and reports no per-phase times).
        options: the editor's (:class:`~ultraedit_fast.core.config.EditorConfig`: ``modules``,
            ``lr``, ``batch_size``, ...; the reference editor takes a subset).
        eval_every: also score every this many turns (checkpoints).
        eval_sample: ``None``: a checkpoint scores everything edited so far; ``S``: it scores
            the requests edited since the previous checkpoint (``recent``, at most ``S``,
            spread evenly) and a fixed sample of ``S`` requests drawn once from the whole
            stream, those of it edited before them (``retention``). The final score always
            covers every edit.
        eval_batch_size: sequences per forward pass when scoring.
        generation: the generation-based scores beside the teacher-forced ones.
        eval_before: score the unedited model on all the requests first (``metrics_before``).
        base: the unedited model's answers on these requests
            (:func:`~ultraedit_fast.capture_baseline`), if already captured;
            ``base_predictions``: its teacher-forced part alone (older callers).
        progress: show a tqdm bar (edits/s) on stderr.
        output_dir: write ``lifelong.json`` (and, with ``plot``, ``lifelong.png``) there;
            checked writable before the first turn.
        config_extra: more entries for ``config`` in the results (``model_name`` and
            ``dataset`` are used in the plot's title).
        export_patch, export_lora: directories to write the edits to after the last turn, as
            a weight patch and as a PEFT LoRA adapter (``lora_rank``: its rank; ``None``:
            exact); :mod:`ultraedit_fast.storage.export`. ``save_editor``: a directory to save the
            editor's lifelong state to (:meth:`UltraEditor.save`).

    Returns the results dict (the JSON's content); ``results["files"]`` has the paths written.
    """
    _check_pos_int("turns", turns)
    _check_pos_int("edits_per_turn", edits_per_turn)
    _check_pos_int("eval_every", eval_every, allow_none=True)
    _check_pos_int("eval_sample", eval_sample, allow_none=True)
    _check_pos_int("eval_batch_size", eval_batch_size)
    if editor not in EDITORS:
        raise ValueError(f"editor: expected one of {EDITORS}, got {editor!r}")
    options.setdefault("measure_memory", True)  # a run reports each turn's peak memory
    cfg = EditorConfig.from_call((), options, owner="run_lifelong")
    if editor == "reference":
        if cfg.backend not in (None, "auto", "torch"):
            raise ValueError(f"backend: the reference editor has no backends, got "
                             f"{cfg.backend!r}")
        if options.get("tokens_per_pass"):
            raise ValueError("tokens_per_pass: the reference editor runs padded mini-batches, "
                             f"got {options['tokens_per_pass']!r}")
        extra = set(cfg.options(only_set=True)) - set(cfg.options(reference=True))
        extra -= {"backend", "tokens_per_pass"}
        if extra:
            raise ValueError(f"{sorted(extra)[0]}: not an option of the reference editor "
                             f"(it takes {sorted(cfg.options(reference=True))})")
    config_extra = dict(config_extra or {})
    n_total = turns * edits_per_turn
    if editor == "reference" and (export_patch or export_lora):
        raise ValueError("export_patch, export_lora: the reference editor has no exports; "
                         "use editor='fast'")
    if editor == "reference" and save_editor:
        raise ValueError("save_editor: the reference editor has no checkpoint; use editor='fast'")
    for what, d in (("export_patch", export_patch), ("export_lora", export_lora),
                    ("save_editor", save_editor)):
        if d is not None:
            check_output_dir(d, what)
    if output_dir is not None:
        check_output_dir(output_dir)  # before the first turn, not after the last

    t_load = time.perf_counter()
    items = list(itertools.islice(iter(examples_or_requests), n_total))
    if len(items) < n_total:
        raise ValueError(f"examples_or_requests: {turns} turns x {edits_per_turn} edits need "
                         f"{n_total} requests, the data gave {len(items)}")
    requests, extras = _split(items)
    del items
    seconds_load = time.perf_counter() - t_load

    if editor == "fast":
        ed = UltraEditor(model, tokenizer, **cfg.options())
        backend_name = ed.backend
    else:
        ed = ReferenceEditor(model, tokenizer, **cfg.options(reference=True))
        backend_name = "reference"
    preset = ed.preset
    originals = None
    if export_lora is not None:  # the base of the LoRA's shift: host copies, before any turn
        ed._settle_regime(edits_per_turn)  # the modules the turns will edit
        originals = {f"{t.name}.weight": t.weight.detach().to("cpu", copy=True)
                     for t in ed.targets}
    device = model.get_input_embeddings().weight.device

    config = {
        "turns": turns, "edits_per_turn": edits_per_turn, "n_edits": n_total,
        "editor": editor, "modules": list(ed.module_names), "lr": float(ed.lr),
        "preset": preset, "batch_size": ed.batch_size, "backend": backend_name,
        "tokens_per_pass": getattr(ed, "tokens_per_pass", 0),
        "eval_every": eval_every, "eval_sample": eval_sample,
        "eval_batch_size": eval_batch_size, "generation": generation,
        "model_name": _model_label(model, config_extra),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        **{k: v for k, v in config_extra.items() if k != "model_name"},
    }
    results: Dict[str, Any] = {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "config": config,
        "environment": environment(device),
    }

    # the unedited model: locality predictions (and the baseline scores) -------------------
    if progress:
        print(f"scoring the unedited model on the {n_total} requests to edit ...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    chat = cfg.chat_template
    if base_predictions is not None and len(base_predictions) != n_total:
        raise ValueError(f"base_predictions: expected {n_total} entries, got "
                         f"{len(base_predictions)}")
    if base is None:
        base = capture_baseline(model, tokenizer, requests, generation=generation,
                                batch_size=eval_batch_size, chat_template=chat)
        if base_predictions is not None:  # the caller's teacher-forced part
            base.predictions = list(base_predictions)
    if len(base) != n_total:
        raise ValueError(f"base: expected {n_total} entries, got {len(base)}")
    seconds_base = time.perf_counter() - t0

    def score_at(idx):
        return score(model, tokenizer, [requests[i] for i in idx], [extras[i] for i in idx],
                     base=base.subset(idx), generation=generation,
                     batch_size=eval_batch_size, chat_template=chat)

    metrics_before = None
    seconds_eval_before = 0.0
    if eval_before:
        t0 = time.perf_counter()
        metrics_before = score_at(range(n_total))
        seconds_eval_before = time.perf_counter() - t0
    retention_pool = spread(range(n_total), eval_sample) if eval_sample else []

    # the turns ---------------------------------------------------------------------------
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_total, unit="edit", desc="editing", file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.3, maxinterval=float("inf"))
    turn_rows: List[Dict[str, Any]] = []
    history: List[Dict[str, Any]] = []
    seconds_eval = 0.0
    last_checkpoint = 0  # edits made at the previous checkpoint
    try:
        for t in range(turns):
            chunk = requests[t * edits_per_turn:(t + 1) * edits_per_turn]
            t0 = time.perf_counter()
            try:
                report = ed.edit(chunk)
                row = report.to_dict()
                row["refused"] = None
            except EditRefused as e:
                row = {"turn": t + 1, "n_requests": len(chunk), "seconds": {},
                       "total_seconds": None, "peak_memory_bytes": None, "refused": str(e)}
            row["turn"] = t + 1  # the run's turn (the editor's count would skip refusals)
            row["wall_seconds"] = time.perf_counter() - t0
            row.pop("modules", None)  # in config
            turn_rows.append(row)
            if bar is not None:
                bar.update(len(chunk))
                bar.refresh()
            last = t + 1 == turns
            if last or (eval_every is not None and (t + 1) % eval_every == 0):
                n_done = (t + 1) * edits_per_turn
                if bar is not None:
                    bar.set_postfix_str(f"turn {t + 1}: scoring ...", refresh=True)
                t0 = time.perf_counter()
                entry: Dict[str, Any] = {"turn": t + 1, "n_edits": n_done}
                if last or not eval_sample:  # everything edited so far
                    entry["metrics"] = m = score_at(range(n_done))
                else:
                    recent = spread(range(last_checkpoint, n_done), eval_sample)
                    older = [i for i in retention_pool if i < last_checkpoint]
                    entry["recent"] = m = score_at(recent)
                    entry["retention"] = score_at(older) if older else None
                entry["seconds"] = dt = time.perf_counter() - t0
                seconds_eval += dt
                history.append(entry)
                last_checkpoint = n_done
                if bar is not None:
                    bar.unpause()  # the bar's rate counts editing time, not scoring time
                    gen = f" ES_gen {pct(m.get('ES_gen'))}" if generation else ""
                    bar.set_postfix_str(f"turn {t + 1}: ES {pct(m['ES'])} GS {pct(m['GS'])} "
                                        f"LS {pct(m['LS'])}{gen}", refresh=True)
    finally:
        if bar is not None:
            bar.close()

    # summary -----------------------------------------------------------------------------
    done = [r for r in turn_rows if r["refused"] is None]
    edit_wall = sum(r["wall_seconds"] for r in turn_rows)
    phase_totals = {p: sum(r["seconds"].get(p, 0.0) for r in done) for p in PHASES}
    peaks = [r["peak_memory_bytes"] for r in done if r["peak_memory_bytes"] is not None]
    results["metrics"] = history[-1]["metrics"]
    results["metrics_before"] = metrics_before
    results["eval_history"] = history
    results["turns"] = turn_rows
    results["timing"] = {
        "edit_seconds": edit_wall,
        "edits_per_second": n_total / edit_wall if edit_wall > 0 else None,
        "mean_turn_seconds": edit_wall / turns,
        "phase_seconds": phase_totals if editor == "fast" else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_kind": done[0]["peak_memory_kind"] if done else None,
        "process_peak_rss_bytes": peak_rss(),
        "load_seconds": seconds_load,
        "base_predictions_seconds": seconds_base,
        "eval_before_seconds": seconds_eval_before,
        "eval_seconds": seconds_eval,
        # flatness over the run (turn 1 carries one-time costs): least-squares slopes
        "turn_seconds_slope": _slope([(r["turn"], r["total_seconds"]) for r in done[1:]]),
        "peak_memory_slope_bytes": _slope([(r["turn"], r["peak_memory_bytes"])
                                           for r in done[1:]
                                           if r["peak_memory_bytes"] is not None]),
    }
    results["refused_turns"] = [r["turn"] for r in turn_rows if r["refused"] is not None]
    results["files"] = {}
    if save_editor is not None:
        results["files"]["editor"] = ed.save(save_editor)
    if export_patch is not None:
        results["files"]["patch"] = ed.export_patch(export_patch)
    if export_lora is not None:
        lora = ed.export_lora(export_lora, lora_rank, base=originals)
        results["lora"] = {k: v for k, v in lora.items() if k != "files"}
        results["files"]["lora"] = export_lora
    if output_dir is not None:
        json_path = os.path.join(output_dir, RESULTS_JSON)
        results["files"]["json"] = json_path
        write_json(results, json_path)  # the results first: a failing plot loses nothing
        if plot:
            png_path = os.path.join(output_dir, RESULTS_PNG)
            try:
                drawn = plot_results(results, png_path)
            except Exception as e:  # noqa: BLE001 - the JSON is written; say why, go on
                log.warning("the plot %s was not drawn: %s: %s", png_path, type(e).__name__, e)
                drawn = None
            if drawn:
                results["files"]["plot"] = png_path
                write_json(results, json_path)
    return results


def _slope(points) -> Optional[float]:
    """Least-squares slope of ``[(x, y)]`` (``None`` with fewer than 3 points)."""
    if len(points) < 3:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def check_output_dir(path: str, what: str = "output_dir") -> str:
    """Create ``path`` if needed and check that files can be written there, before any
    work is done; ``ValueError`` naming ``what`` otherwise."""
    if os.path.lexists(path) and not os.path.exists(path):
        raise ValueError(f"{what}: {path!r} is a symbolic link that leads nowhere")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}: {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {path!r}: {e.strerror or e}") from None
    return path


def write_json(doc: Mapping[str, Any], path: str) -> None:
    """Write ``doc`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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
}
_SELF = ("LS_unedited", "LS_gen_unedited", "drift_top1")  # 1.0 for the unedited model


def _score_panel(ax, results, style, title):
    """One panel of scores over turns: at each checkpoint the requests it scored (all edited
    so far, or those since the previous checkpoint: solid) and the retention sample
    (dashed, hollow); turn 0 is the unedited model."""
    cfg = results["config"]
    hist = list(results.get("eval_history", []))
    before = results.get("metrics_before")
    ends, drew_retention = [], False
    for key, (colour, marker, label) in style.items():
        main = [(h["turn"], (h.get("metrics") or h.get("recent") or {}).get(key)) for h in hist]
        main = [(x, y) for x, y in main if y is not None]
        if not main:
            continue
        if key in _SELF:
            main = [(0, 1.0)] + main
        elif before is not None and before.get(key) is not None:
            main = [(0, before[key])] + main
        xs, ys = zip(*main)
        ax.plot(xs, [100 * y for y in ys], marker=marker, color=colour, label=label,
                linewidth=2, markersize=5)
        ret = [(h["turn"], h["retention"].get(key)) for h in hist if h.get("retention")]
        ret = [(x, y) for x, y in ret if y is not None]
        if ret:
            drew_retention = True
            rx, ry = zip(*ret)
            ax.plot(rx, [100 * y for y in ry], marker=marker, color=colour, linestyle="--",
                    markerfacecolor="none", linewidth=1.3, markersize=5)
        ends.append([100 * ys[-1], 100 * ys[-1], xs[-1], colour])
    ends.sort()  # final values, spread so that their labels do not overlap
    for i in range(1, len(ends)):
        ends[i][1] = max(ends[i][1], ends[i - 1][1] + 4.5)
    for y, y_label, x_end, colour in ends:
        ax.annotate(f"{y:.1f}", (x_end, y), xytext=(x_end + 0.03 * cfg["turns"] + 0.1, y_label),
                    textcoords="data", va="center", fontsize=9, color=colour,
                    fontweight="bold")
    ax.set_xlim(-0.03 * cfg["turns"] - 0.2, cfg["turns"] * 1.13 + 0.6)
    ax.set_ylim(-3, 105)
    ax.set_xlabel("turn (0 = unedited model)")
    ax.set_ylabel("score (%)")
    sub = ("edited since the last checkpoint (solid), a retention\nsample (dashed); "
           "last point: all edits" if drew_retention else "on all requests edited so far")
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, fontsize=8.5,
              frameon=False)
    if cfg["turns"] <= 20:
        ax.set_xticks(range(0, cfg["turns"] + 1))


def plot_results(results: Mapping[str, Any], path: str) -> Optional[str]:
    """Draw ``results`` (from :func:`run_lifelong`) into a PNG at ``path``: per-turn
    edit time stacked by phase, and the scores over turns. ``None`` (with a warning)
    without matplotlib."""
    plt = pyplot(f"the plot {path}")
    if plt is None:
        return None

    cfg = results["config"]
    env = results.get("environment", {})
    rows = results["turns"]
    timing = results["timing"]
    generated = any("ES_gen" in (h.get("metrics") or h.get("recent") or {})
                    for h in results.get("eval_history", []))
    if generated:
        fig, (ax_t, ax_m, ax_g) = plt.subplots(1, 3, figsize=(19, 6.8),
                                               gridspec_kw={"width_ratios": [1.15, 1, 1]})
    else:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 6.2),
                                         gridspec_kw={"width_ratios": [1.15, 1]})
        ax_g = None

    # per-turn time, stacked by phase -----------------------------------------------------
    x = [r["turn"] for r in rows]
    width = 0.8 if len(x) <= 60 else 1.0
    done = [r for r in rows if r["refused"] is None]
    phases = [p for p in PHASES if any(p in r["seconds"] for r in done)] or (
        ["total"] if done else [])
    bottom = [0.0] * len(rows)
    per_phase = {p: [r["seconds"].get(p, r["wall_seconds"] if p == "total" else 0.0)
                     if r["refused"] is None else 0.0 for r in rows] for p in phases}
    grand = sum(sum(v) for v in per_phase.values()) or 1.0
    for p in phases:
        vals = per_phase[p]
        share = 100 * sum(vals) / grand
        label = p if p == "total" else f"{p} ({share:.1f} %)" if share >= 0.1 else f"{p} (<0.1 %)"
        ax_t.bar(x, vals, width, bottom=bottom, label=label, color=PHASE_COLOURS[p],
                 edgecolor="white" if len(x) <= 60 else "none", linewidth=0.5)
        bottom = [b + v for b, v in zip(bottom, vals)]
    refused = [r for r in rows if r["refused"] is not None]
    if refused:
        vals = [r["wall_seconds"] for r in refused]
        ax_t.bar([r["turn"] for r in refused], vals, width, color="#cccccc", hatch="//",
                 edgecolor="#888888", linewidth=0.5, label="refused turn (no change)")
        bottom = bottom + vals
    ax_t.set_xlabel("turn")
    ax_t.set_ylabel("edit time per turn (s)")
    eps = timing.get("edits_per_second")
    peak = timing.get("peak_memory_bytes")
    kind = (timing.get("peak_memory_kind") or "").replace("cpu_peak_rss", "CPU peak RSS") \
        .replace("cuda_peak_allocated", "CUDA peak allocated").replace("_", " ")
    ax_t.set_title(f"Edit time per turn ({cfg['edits_per_turn']} edits each)\n"
                   f"mean {timing['mean_turn_seconds']:.2f} s/turn"
                   + (f", {eps:.0f} edits/s" if eps else "")
                   + (f"; peak memory {fmt_bytes(peak)} ({kind})" if peak else ""),
                   fontsize=11)
    ax_t.set_ylim(0, max(bottom + [1e-9]) * 1.08)
    ax_t.grid(axis="y", alpha=0.3)
    ax_t.set_axisbelow(True)
    ax_t.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13),
                ncol=max(1, len(phases) + bool(refused)), fontsize=9, frameon=False)
    if len(x) <= 20:
        ax_t.set_xticks(x)

    # scores over turns --------------------------------------------------------------------
    _score_panel(ax_m, results, _METRIC_STYLE, "Teacher-forced token accuracy")
    if ax_g is not None:
        _score_panel(ax_g, results, _GEN_STYLE, "Generation-based (greedy decoding)")

    dataset = cfg.get("dataset") or "requests"
    fig.suptitle(f"UltraEdit lifelong editing: {cfg.get('model_name', 'model')} on {dataset}, "
                 f"{cfg['turns']} turns x {cfg['edits_per_turn']} edits", fontsize=13,
                 fontweight="bold")
    parts = [f"{cfg['editor']} editor, backend {cfg['backend']}, lr {cfg['lr']:g}, "
             f"{summarize_names(cfg['modules'])}"]
    if env.get("device_name"):
        parts.append(env["device_name"])
    if env.get("ultraedit_fast"):
        parts.append(f"ultraedit_fast {env['ultraedit_fast']}, torch {env.get('torch', '?')}")
    if results.get("date"):
        parts.append(str(results["date"])[:10])
    fig.text(0.5, 0.925, " | ".join(parts), ha="center", fontsize=8.5, color="#555")
    fig.tight_layout(rect=(0, 0, 1, 0.925))
    return save_figure(plt, fig, path)
