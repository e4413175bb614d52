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
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from .._log import log
from ..core.config import EditorConfig
from ..core.presets import choose_regime, regime_is_open
from ..core.report import PHASES
from ..editors import EditRefused, Editor, ReferenceEditor, UltraEditor
from ..model.forward import input_device
from ..model.requests import EditRequest, as_requests
from ..scoring.generation import spread
from ..scoring.metrics import capture_baseline, evaluate, mean, token_accuracy
from ..utils.checks import check_positive_int
from ..utils.display import pct
from ..utils.environment import environment, peak_rss
from ..utils.files import atomic_write_json, check_output_dir
from .plot import plot_results

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
            raise TypeError(
                f"examples_or_requests[{i}]: expected an Example, EditRequest or "
                f"dict, got {type(it).__name__}"
            )
    return as_requests(requests, "examples_or_requests"), extras


def score(
    model,
    tokenizer,
    requests,
    extras: Optional[Sequence[Mapping]] = None,
    *,
    base=None,
    generation: bool = True,
    batch_size: int = 32,
    chat_template: bool = False,
) -> Dict[str, Any]:
    """:func:`~ultraedit_fast.scoring.metrics` (teacher-forced and, with ``generation``,
    generation-based scores) plus the WikiBigEdit scores: ``personas``, ``n_personas``,
    ``mhop``, ``n_mhop`` (fractions, ``None`` when absent)."""
    requests = as_requests(requests)
    out = dict(
        evaluate(
            model,
            tokenizer,
            requests,
            base=base,
            generation=generation,
            batch_size=batch_size,
            chat_template=chat_template,
        )
    )
    extras = list(extras) if extras is not None else [{}] * len(requests)
    persona_pairs = [
        (p, r.target)
        for r, x in zip(requests, extras)
        for p in (x.get("personas") or [])
        if isinstance(p, str) and p.strip()
    ]
    mhop_pairs = [(x["mhop"], x["mhop_ans"]) for x in extras if x.get("mhop") and x.get("mhop_ans")]
    out["personas"] = mean(
        token_accuracy(model, tokenizer, persona_pairs, batch_size) if persona_pairs else []
    )
    out["n_personas"] = len(persona_pairs)
    out["mhop"] = mean(
        token_accuracy(model, tokenizer, mhop_pairs, batch_size) if mhop_pairs else []
    )
    out["n_mhop"] = len(mhop_pairs)
    return out


# ----------------------------------------------------------------------------- the run
def _model_label(model, config_extra: Mapping) -> str:
    if config_extra.get("model_name"):
        return str(config_extra["model_name"])
    cfg = getattr(model, "config", None)
    name = (
        getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or type(model).__name__
    )
    return os.path.basename(str(name).rstrip("/")) or str(name)


@dataclass
class _Outputs:
    """Where a run writes (each checked before the first turn)."""

    output_dir: Optional[str]
    plot: bool
    export_patch: Optional[str]
    export_lora: Optional[str]
    lora_rank: Optional[int]
    save_editor: Optional[str]


def _check_reference(cfg: EditorConfig, options: Mapping[str, Any], out: _Outputs) -> None:
    """What the reference editor cannot do, refused before anything runs."""
    if cfg.backend not in (None, "auto", "torch"):
        raise ValueError(f"backend: the reference editor has no backends, got {cfg.backend!r}")
    if options.get("tokens_per_pass"):
        raise ValueError(
            "tokens_per_pass: the reference editor runs padded mini-batches, "
            f"got {options['tokens_per_pass']!r}"
        )
    extra = set(cfg.options(only_set=True)) - set(cfg.options(reference=True))
    extra -= {"backend", "tokens_per_pass"}
    if extra:
        raise ValueError(
            f"{sorted(extra)[0]}: not an option of the reference editor "
            f"(it takes {sorted(cfg.options(reference=True))})"
        )
    if out.export_patch or out.export_lora:
        raise ValueError(
            "export_patch, export_lora: the reference editor has no exports; use editor='fast'"
        )
    if out.save_editor:
        raise ValueError("save_editor: the reference editor has no checkpoint; use editor='fast'")


def _check_outputs(out: _Outputs) -> None:
    for what, d in (
        ("export_patch", out.export_patch),
        ("export_lora", out.export_lora),
        ("save_editor", out.save_editor),
    ):
        if d is not None:
            check_output_dir(d, what)
    if out.output_dir is not None:
        check_output_dir(out.output_dir)  # before the first turn, not after the last


def _take(examples_or_requests, turns: int, edits_per_turn: int):
    """``(requests, extras, seconds)``: the stream's first ``turns * edits_per_turn`` items."""
    n_total = turns * edits_per_turn
    t0 = time.perf_counter()
    items = list(itertools.islice(iter(examples_or_requests), n_total))
    if len(items) < n_total:
        raise ValueError(
            f"examples_or_requests: {turns} turns x {edits_per_turn} edits need "
            f"{n_total} requests, the data gave {len(items)}"
        )
    requests, extras = _split(items)
    return requests, extras, time.perf_counter() - t0


def _make_editor(model, tokenizer, editor: str, cfg: EditorConfig, edits_per_turn: int) -> Editor:
    """The run's editor; the preset's regime, when left open, is chosen from the turn size
    the run will use (as the first turn would choose it)."""
    if editor == "reference":
        return ReferenceEditor(model, tokenizer, cfg.replace(backend=None, tokens_per_pass=None))
    if regime_is_open(cfg):
        cfg = cfg.replace(regime=choose_regime(cfg, edits_per_turn))
    return UltraEditor(model, tokenizer, cfg)


def _run_config(
    model,
    ed: Editor,
    turns,
    edits_per_turn,
    settings: Mapping[str, Any],
    config_extra: Mapping[str, Any],
) -> Dict[str, Any]:
    d = ed.describe()
    return {
        "turns": turns,
        "edits_per_turn": edits_per_turn,
        "n_edits": turns * edits_per_turn,
        "editor": d["editor"],
        "modules": d["modules"],
        "lr": d["lr"],
        "preset": d["preset"],
        "batch_size": d["batch_size"],
        "backend": d["backend"],
        "tokens_per_pass": d["tokens_per_pass"],
        **settings,
        "model_name": _model_label(model, config_extra),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        **{k: v for k, v in config_extra.items() if k != "model_name"},
    }


def run_lifelong(
    model,
    tokenizer,
    examples_or_requests: Iterable[Any],
    *,
    turns: int,
    edits_per_turn: int,
    editor: str = "fast",
    eval_every: Optional[int] = None,
    eval_sample: Optional[int] = None,
    eval_batch_size: int = 32,
    generation: bool = True,
    eval_before: bool = True,
    base=None,
    progress: bool = True,
    output_dir: Optional[str] = None,
    plot: bool = True,
    config_extra: Optional[Mapping[str, Any]] = None,
    export_patch: Optional[str] = None,
    export_lora: Optional[str] = None,
    lora_rank: Optional[int] = None,
    save_editor: Optional[str] = None,
    **options,
) -> Dict[str, Any]:
    """Edit ``model`` in ``turns`` turns of ``edits_per_turn`` requests and score it.

    Returns the results dict (the JSON's content); ``results["files"]`` has the paths written.
    """
    _check_run(turns, edits_per_turn, eval_every, eval_sample, eval_batch_size, editor)
    options.setdefault("measure_memory", True)  # a run reports each turn's peak memory
    cfg = EditorConfig.build(None, options, owner="run_lifelong")
    out = _Outputs(output_dir, plot, export_patch, export_lora, lora_rank, save_editor)
    if editor == "reference":
        _check_reference(cfg, options, out)
    _check_outputs(out)
    requests, extras, seconds_load = _take(examples_or_requests, turns, edits_per_turn)
    ed = _make_editor(model, tokenizer, editor, cfg, edits_per_turn)
    originals = None
    if export_lora is not None:  # the base of the LoRA's shift: host copies, before any turn
        originals = {f"{t.name}.weight": t.weight.detach().to("cpu", copy=True) for t in ed.targets}
    settings = {
        "eval_every": eval_every,
        "eval_sample": eval_sample,
        "eval_batch_size": eval_batch_size,
        "generation": generation,
    }
    results = _header(model, ed, turns, edits_per_turn, settings, dict(config_extra or {}))
    scorer = _Scorer(
        model, tokenizer, requests, extras, generation, eval_batch_size, cfg.chat_template
    )
    timing = {"load_seconds": seconds_load, "base_predictions_seconds": scorer.capture_base(base)}
    metrics_before, timing["eval_before_seconds"] = None, 0.0
    if eval_before:
        t0 = time.perf_counter()
        metrics_before = scorer.at(range(len(requests)))
        timing["eval_before_seconds"] = time.perf_counter() - t0
    stream = _Stream(ed, requests, turns, edits_per_turn, eval_every, eval_sample, scorer)
    stream.run(progress)
    results.update(
        metrics=stream.history[-1]["metrics"],
        metrics_before=metrics_before,
        eval_history=stream.history,
        turns=stream.rows,
        timing=_timing(stream, timing, editor),
        refused_turns=[r["turn"] for r in stream.rows if r["refused"] is not None],
    )
    _write_outputs(results, ed, out, originals)
    return results


run_lifelong.__doc__ = (
    (run_lifelong.__doc__ or "")
    + """
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
            (:func:`~ultraedit_fast.capture_baseline`), if already captured.
        progress: show a tqdm bar (edits/s) on stderr.
        output_dir: write ``lifelong.json`` (and, with ``plot``, ``lifelong.png``) there;
            checked writable before the first turn.
        config_extra: more entries for ``config`` in the results (``model_name`` and
            ``dataset`` are used in the plot's title).
        export_patch, export_lora: directories to write the edits to after the last turn, as
            a weight patch and as a PEFT LoRA adapter (``lora_rank``: its rank; ``None``:
            exact); :mod:`ultraedit_fast.storage.export`. ``save_editor``: a directory to save the
            editor's lifelong state to (:meth:`UltraEditor.save`).
"""
)


def _check_run(turns, edits_per_turn, eval_every, eval_sample, eval_batch_size, editor):
    for name, v in (
        ("turns", turns),
        ("edits_per_turn", edits_per_turn),
        ("eval_batch_size", eval_batch_size),
    ):
        check_positive_int(name, v)
    check_positive_int("eval_every", eval_every, allow_none=True)
    check_positive_int("eval_sample", eval_sample, allow_none=True)
    if editor not in EDITORS:
        raise ValueError(f"editor: expected one of {EDITORS}, got {editor!r}")


def _header(model, ed, turns, edits_per_turn, settings, config_extra) -> Dict[str, Any]:
    """The results' schema, date, configuration and machine."""
    device = input_device(model)
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "config": _run_config(model, ed, turns, edits_per_turn, settings, config_extra),
        "environment": environment(device),
    }


class _Scorer:
    """Scores subsets of the run's requests against the unedited model's baseline."""

    def __init__(self, model, tokenizer, requests, extras, generation, batch_size, chat):
        self.model, self.tokenizer = model, tokenizer
        self.requests, self.extras = requests, extras
        self.generation, self.batch_size, self.chat = generation, batch_size, chat
        self.base = None

    def capture_base(self, base) -> float:
        """The unedited model's answers on every request (given, or captured now)."""
        n = len(self.requests)
        log.info("scoring the unedited model on the %d requests to edit ...", n)
        t0 = time.perf_counter()
        if base is None:
            base = capture_baseline(
                self.model,
                self.tokenizer,
                self.requests,
                generation=self.generation,
                batch_size=self.batch_size,
                chat_template=self.chat,
            )
        if len(base) != n:
            raise ValueError(f"base: expected {n} entries, got {len(base)}")
        self.base = base
        return time.perf_counter() - t0

    def at(self, idx) -> Dict[str, Any]:
        idx = list(idx)
        return score(
            self.model,
            self.tokenizer,
            [self.requests[i] for i in idx],
            [self.extras[i] for i in idx],
            base=self.base.subset(idx),
            generation=self.generation,
            batch_size=self.batch_size,
            chat_template=self.chat,
        )


class _Stream:
    """The turns of a run, with its checkpoints' scores."""

    def __init__(
        self, ed: Editor, requests, turns, edits_per_turn, eval_every, eval_sample, scorer: _Scorer
    ):
        self.ed, self.requests, self.scorer = ed, requests, scorer
        self.turns, self.per_turn = turns, edits_per_turn
        self.eval_every, self.eval_sample = eval_every, eval_sample
        self.retention_pool = spread(range(len(requests)), eval_sample) if eval_sample else []
        self.rows: List[Dict[str, Any]] = []
        self.history: List[Dict[str, Any]] = []
        self.eval_seconds = 0.0
        self.last_checkpoint = 0  # edits made at the previous checkpoint

    def run(self, progress: bool) -> None:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(self.requests),
                unit="edit",
                desc="editing",
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.3,
                maxinterval=float("inf"),
            )
        try:
            for t in range(self.turns):
                chunk = self.requests[t * self.per_turn : (t + 1) * self.per_turn]
                self.rows.append(self.turn(t, chunk))
                if bar is not None:
                    bar.update(len(chunk))
                    bar.refresh()
                last = t + 1 == self.turns
                if last or (self.eval_every is not None and (t + 1) % self.eval_every == 0):
                    self.checkpoint(t + 1, last, bar)
        finally:
            if bar is not None:
                bar.close()

    def turn(self, t: int, chunk) -> Dict[str, Any]:
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
        return row

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


def _timing(stream: _Stream, timing: Dict[str, Any], editor: str) -> Dict[str, Any]:
    rows = stream.rows
    done = [r for r in rows if r["refused"] is None]
    edit_wall = sum(r["wall_seconds"] for r in rows)
    n_total = len(stream.requests)
    peaks = [r["peak_memory_bytes"] for r in done if r["peak_memory_bytes"] is not None]
    return {
        "edit_seconds": edit_wall,
        "edits_per_second": n_total / edit_wall if edit_wall > 0 else None,
        "mean_turn_seconds": edit_wall / stream.turns,
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


def _write_outputs(results: Dict[str, Any], ed, out: _Outputs, originals) -> None:
    results["files"] = files = {}
    if out.save_editor is not None:
        files["editor"] = ed.save(out.save_editor)
    if out.export_patch is not None:
        files["patch"] = ed.export_patch(out.export_patch)
    if out.export_lora is not None:
        lora = ed.export_lora(out.export_lora, out.lora_rank, base=originals)
        results["lora"] = {k: v for k, v in lora.items() if k != "files"}
        files["lora"] = out.export_lora
    if out.output_dir is None:
        return
    json_path = os.path.join(out.output_dir, RESULTS_JSON)
    files["json"] = json_path
    write_json(results, json_path)  # the results first: a failing plot loses nothing
    if out.plot:
        png_path = os.path.join(out.output_dir, RESULTS_PNG)
        try:
            drawn = plot_results(results, png_path)
        except Exception as e:  # noqa: BLE001 - the JSON is written; say why, go on
            log.warning("the plot %s was not drawn: %s: %s", png_path, type(e).__name__, e)
            drawn = None
        if drawn:
            files["plot"] = png_path
            write_json(results, json_path)


def _slope(points) -> Optional[float]:
    """Least-squares slope of ``[(x, y)]`` (``None`` with fewer than 3 points)."""
    if len(points) < 3:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def write_json(doc: Mapping[str, Any], path: str) -> None:
    """Write ``doc`` to ``path`` atomically (:func:`~ultraedit_fast.utils.files.atomic_write_json`)."""
    atomic_write_json(path, doc, default=_json_default)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
