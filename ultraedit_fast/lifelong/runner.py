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
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from .._log import log
from ..core.config import EditorConfig
from ..core.presets import choose_regime, regime_is_open
from ..editors import Editor, ReferenceEditor, UltraEditor
from ..model.forward import input_device
from ..utils.checks import check_positive_int
from ..utils.environment import environment
from ..utils.files import atomic_write_json, check_output_dir
from ..scoring.health import read_health_text
from .plot import plot_results
from .resume import (
    RunInterrupted,
    read_interrupted,
    reconcile_rows,
    restore_editor,
    save_interrupted,
)
from .scores import Scorer, _split, score
from .stream import Stream, timing_summary

__all__ = ["run_lifelong", "score", "plot_results", "RESULTS_JSON", "RESULTS_PNG", "SCHEMA"]

SCHEMA = "ultraedit_fast.lifelong/1"
RESULTS_JSON = "lifelong.json"
RESULTS_PNG = "lifelong.png"
EDITORS = ("fast", "reference")
METRICS = ("ES", "GS", "LS", "LS_unedited", "personas", "mhop")


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


def _check_built(editor, options: Mapping[str, Any], out: _Outputs) -> None:
    """An editor given built (a baseline, ...): it carries its own options, and the run
    can neither save nor export what it does not know how to."""
    if not isinstance(editor, Editor):
        raise ValueError(
            f"editor: expected 'fast', 'reference' or an Editor (editors.protocol), "
            f"got {type(editor).__name__}"
        )
    if options:
        raise ValueError(
            f"{sorted(options)[0]}: an editor given built takes its options at construction"
        )
    if out.export_patch or out.export_lora or out.save_editor:
        raise ValueError(
            "export_patch, export_lora, save_editor: only with editor='fast' "
            f"(got the built editor {editor.name!r})"
        )


def _label_and_chat(model, editor, cfg: Optional[EditorConfig], resume) -> Tuple[str, bool]:
    """The editor's name in the results, and whether its prompts take the chat template."""
    if isinstance(editor, str):
        return editor, bool(cfg is not None and cfg.chat_template)
    if resume or editor.model is not model:
        raise ValueError(
            f"resume: only a run of editor='fast' can be resumed, got {editor.name!r}"
            if resume
            else f"editor: {editor.name!r} was built on another model than `model`"
        )
    return editor.name, bool(getattr(editor.config, "chat_template", False))


def _check_health_and_preheat(health, preheat, editor) -> None:
    """A bad health text, or a preheat the editor cannot do, refused before any work."""
    if health is not False:
        read_health_text(None if health is True else health)
    if preheat and editor == "reference":
        raise ValueError("preheat: the reference editor has no preheat; use editor='fast'")
    if preheat and not isinstance(editor, str) and not hasattr(editor, "preheat"):
        raise ValueError(f"preheat: the built editor {editor.name!r} has no preheat")


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


def _take(examples_or_requests, turns: int, edits_per_turn: int, preheat: int = 0):
    """``(requests, extras, preheat requests, seconds)``: the stream's first
    ``turns * edits_per_turn`` items, then ``preheat`` more."""
    check_positive_int("preheat", preheat, minimum=0)
    n_total = turns * edits_per_turn
    t0 = time.perf_counter()
    items = list(itertools.islice(iter(examples_or_requests), n_total + preheat))
    if len(items) < n_total + preheat:
        more = f" and preheat {preheat} more" if preheat else ""
        raise ValueError(
            f"examples_or_requests: {turns} turns x {edits_per_turn} edits{more} need "
            f"{n_total + preheat} requests, the data gave {len(items)}"
        )
    requests, extras = _split(items[:n_total])
    warm = _split(items[n_total:])[0] if preheat else []
    return requests, extras, warm, time.perf_counter() - t0


def _make_editor(model, tokenizer, editor, cfg: Optional[EditorConfig], edits_per_turn: int):
    """The run's editor; the preset's regime, when left open, is chosen from the turn size
    the run will use (as the first turn would choose it). An editor given built is used."""
    if cfg is None:
        return editor
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
        "tokens_per_pass": d.get("tokens_per_pass"),  # the package's editors only
        # a built editor's own description (its options), beside the common fields
        **({} if d["editor"] in EDITORS else {"editor_options": d}),
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
    editor: Union[str, Editor] = "fast",
    eval_every: Optional[int] = None,
    eval_sample: Optional[int] = None,
    eval_batch_size: int = 32,
    generation: bool = True,
    eval_before: bool = True,
    eval_resumed: bool = True,
    base=None,
    progress: bool = True,
    output_dir: Optional[str] = None,
    plot: bool = True,
    config_extra: Optional[Mapping[str, Any]] = None,
    export_patch: Optional[str] = None,
    export_lora: Optional[str] = None,
    lora_rank: Optional[int] = None,
    save_editor: Optional[str] = None,
    resume: Optional[str] = None,
    health: Union[bool, str] = True,
    preheat: int = 0,
    **options,
) -> Dict[str, Any]:
    """Edit ``model`` in ``turns`` turns of ``edits_per_turn`` requests and score it; returns
    the results dict (the JSON's content; ``results["files"]``: the paths written)."""
    out = _Outputs(output_dir, plot, export_patch, export_lora, lora_rank, save_editor)
    cfg = _check_run(
        turns, edits_per_turn, eval_every, eval_sample, eval_batch_size, editor, options, out
    )
    label, chat = _label_and_chat(model, editor, cfg, resume)
    _check_health_and_preheat(health, preheat, editor)
    requests, extras, warm, t_load = _take(examples_or_requests, turns, edits_per_turn, preheat)
    prior = read_interrupted(resume, turns, edits_per_turn, label) if resume else None
    settings = {"eval_every": eval_every, "eval_sample": eval_sample, "preheat": preheat}
    settings.update(eval_batch_size=eval_batch_size, generation=generation)
    settings["eval_resumed"] = eval_resumed
    scorer = Scorer.for_run(model, tokenizer, requests, extras, chat, health, settings)
    timing = {"load_seconds": t_load}
    ed, originals = _editor_and_base(
        model, tokenizer, (editor, cfg, edits_per_turn, warm), prior, out, scorer, timing, base
    )
    results = _header(model, ed, turns, edits_per_turn, settings, dict(config_extra or {}))
    metrics_before = _score_before(scorer, eval_before, prior, timing)
    stream = Stream(ed, requests, turns, edits_per_turn, eval_every, eval_sample, scorer)
    if prior is not None:
        stream.resume(prior)
        results["resumed_at_turn"] = stream.next_turn
    try:
        stream.run(progress)
    except KeyboardInterrupt:
        _stop(results, stream, ed, out, timing, metrics_before, label)
    _finish(results, stream, timing, metrics_before, label)
    _write_outputs(results, ed, out, originals)
    return results


def _editor_and_base(model, tokenizer, spec, prior, out, scorer, timing, base):
    """The run's editor and the unedited model's answers (captured before any edit is
    written: a resumed run writes its saved patch only after that); with ``export_lora``,
    host copies of the edited weights before any turn; with ``warm`` requests, the new
    editor's statistics preheated on them (a resumed editor's state holds its preheat)."""
    editor, cfg, edits_per_turn, warm = spec
    if prior is None:  # built first: a bad option fails before the baseline's scoring
        ed = _make_editor(model, tokenizer, editor, cfg, edits_per_turn)
        scorer.resume_below(ed)
    timing["base_predictions_seconds"] = scorer.capture_base(base)
    if prior is not None:
        names = prior["config"]["modules"]
        originals = (
            {
                f"{n}.weight": model.get_submodule(n).weight.detach().to("cpu", copy=True)
                for n in names
            }
            if out.export_lora is not None
            else None
        )
        ed = restore_editor(model, tokenizer, prior)
        scorer.resume_below(ed)  # from now on
        return ed, originals
    if warm:
        t0 = time.perf_counter()
        ed.preheat(warm)
        timing["preheat_seconds"] = time.perf_counter() - t0
    return ed, (_originals(ed) if out.export_lora is not None else None)


def _score_before(scorer: Scorer, eval_before: bool, prior, timing) -> Optional[Dict[str, Any]]:
    if prior is not None:  # scored before the interruption
        timing["eval_before_seconds"] = prior["timing"].get("eval_before_seconds", 0.0)
        return prior.get("metrics_before")
    timing["eval_before_seconds"] = 0.0
    if not eval_before:
        return None
    t0 = time.perf_counter()
    metrics = scorer.at(range(len(scorer.requests)))
    timing["eval_before_seconds"] = time.perf_counter() - t0
    return metrics


def _finish(results, stream: Stream, timing, metrics_before, editor: str) -> None:
    last = stream.history[-1] if stream.history else {}
    results.update(
        metrics=last.get("metrics"),
        metrics_before=metrics_before,
        eval_history=stream.history,
        turns=stream.rows,
        timing=timing_summary(stream, timing, editor),
        refused_turns=[r["turn"] for r in stream.rows if r["refused"] is not None],
    )
    passes = stream.scorer.passes
    if passes is not None:  # sequences scored in full / from what was kept
        results["eval_passes"] = dict(passes.counts, start_block=passes.start)


def _stop(results, stream: Stream, ed, out: _Outputs, timing, metrics_before, editor: str):
    """Ctrl-C: record what the run finished, and its resumable state, then stop."""
    reconcile_rows(stream.rows, getattr(ed, "turns", None))
    stream.next_turn = len(stream.rows)
    _finish(results, stream, timing, metrics_before, editor)
    path, state = save_interrupted(results, ed, out.output_dir, stream.next_turn)
    raise RunInterrupted(path, state, stream.next_turn) from None


run_lifelong.__doc__ = (
    (run_lifelong.__doc__ or "")
    + """
    Args:
        examples_or_requests: an iterable (a stream is fine) of
            :class:`~ultraedit_fast.data.datasets.Example`, ``EditRequest`` or dicts; its first
            ``turns * edits_per_turn`` items are used (``ValueError`` if it has fewer).
        editor: ``"fast"`` (:class:`UltraEditor`), ``"reference"`` (:class:`ReferenceEditor`,
            which has no ``backend`` and reports no per-phase times), or an editor already
            built on ``model`` (any :class:`~ultraedit_fast.editors.protocol.Editor`, e.g. a
            baseline of :mod:`ultraedit_fast.baselines`; it takes no ``options``, no
            exports and no ``resume``).
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
        eval_resumed: run every teacher-forced pass over a sequence scored before from the
            lowest edited block up (:mod:`ultraedit_fast.scoring.resumed`; the same scores up
            to rounding).
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
        health: measure the model's health against the unedited model at every checkpoint
            (:mod:`ultraedit_fast.scoring.health`): ``True`` on the package's general-text
            sample, a path on that text file, ``False`` not at all.
        preheat: warm the lifelong normaliser's statistics on the ``preheat`` items of
            ``examples_or_requests`` that follow the run's (never edited) before the first
            turn (:meth:`UltraEditor.preheat`, StableEdit's preheat).
        resume: the output directory of an interrupted run of the same shape
            (:mod:`ultraedit_fast.lifelong.resume`): it goes on from the next turn; an
            interrupted run (KeyboardInterrupt) writes its partial results there and raises
            :class:`~ultraedit_fast.lifelong.resume.RunInterrupted`.
"""
)


def _originals(ed) -> Dict[str, Any]:
    """The edited weights before any turn, as host copies: the base of a LoRA's shift."""
    return {f"{t.name}.weight": t.weight.detach().to("cpu", copy=True) for t in ed.targets}


def _check_run(
    turns,
    edits_per_turn,
    eval_every,
    eval_sample,
    eval_batch_size,
    editor,
    options,
    out: "_Outputs",
) -> EditorConfig:
    """Every argument of a run checked, and the outputs writable, before any work; the
    editor's configuration."""
    for name, v in (
        ("turns", turns),
        ("edits_per_turn", edits_per_turn),
        ("eval_batch_size", eval_batch_size),
    ):
        check_positive_int(name, v)
    check_positive_int("eval_every", eval_every, allow_none=True)
    check_positive_int("eval_sample", eval_sample, allow_none=True)
    if not isinstance(editor, str):
        _check_built(editor, options, out)
        _check_outputs(out)
        return None
    if editor not in EDITORS:
        raise ValueError(f"editor: expected one of {EDITORS}, got {editor!r}")
    options.setdefault("measure_memory", True)  # a run reports each turn's peak memory
    cfg = EditorConfig.build(None, options, owner="run_lifelong")
    if editor == "reference":
        _check_reference(cfg, options, out)
    _check_outputs(out)
    return cfg


def _header(model, ed, turns, edits_per_turn, settings, config_extra) -> Dict[str, Any]:
    """The results' schema, date, configuration and machine."""
    device = input_device(model)
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "config": _run_config(model, ed, turns, edits_per_turn, settings, config_extra),
        "environment": environment(device),
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


def write_json(doc: Mapping[str, Any], path: str) -> None:
    """Write ``doc`` to ``path`` atomically (:func:`~ultraedit_fast.utils.files.atomic_write_json`)."""
    atomic_write_json(path, doc, default=_json_default)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
