"""Interrupted runs: what a run leaves when it is stopped (Ctrl-C), and how it goes on.

A run stopped while it edits or scores writes, atomically, before it stops:

- ``lifelong.json`` with the turns done, their timings, the scores so far and an
  ``interrupted`` entry (``turns_done``, ``resume``);
- with the fast editor, ``resume/editor/`` (the editor's lifelong state,
  :meth:`~ultraedit_fast.UltraEditor.save`) and ``resume/patch/`` (the edited modules'
  weights, :meth:`~ultraedit_fast.UltraEditor.export_patch`).

``run_lifelong(..., resume=DIR)`` (``ultraedit-fast run --resume DIR``) takes the same
unedited model and the same requests, captures the unedited model's answers again, writes
the patch into the model, loads the editor's state and goes on from the next turn; the
turns and checkpoints already done are kept as they were.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from ..storage.export import apply_patch
from ..utils.files import read_regular_file

RESUME_DIR = "resume"


class RunInterrupted(KeyboardInterrupt):
    """A run was interrupted; ``results_path`` holds what it finished (``None``: nothing
    could be written) and ``resume_dir`` its resumable state (``None``: not resumable)."""

    def __init__(self, results_path: Optional[str], resume_dir: Optional[str], turns_done: int):
        super().__init__(f"interrupted after {turns_done} turns")
        self.results_path, self.resume_dir, self.turns_done = results_path, resume_dir, turns_done


def reconcile_rows(rows, editor_turns: Optional[int], n_prior_made: int = 0) -> None:
    """A turn whose editor call returned just before the interrupt, before its row was
    recorded: add its row (timings unknown), so the record matches the editor's state."""
    made = sum(1 for r in rows if r["refused"] is None)
    if editor_turns is not None and editor_turns == made + 1:
        rows.append(
            {
                "turn": len(rows) + 1,
                "n_requests": None,
                "seconds": {},
                "total_seconds": None,
                "peak_memory_bytes": None,
                "refused": None,
                "wall_seconds": None,
                "note": "finished as the run was interrupted; its timings were not recorded",
            }
        )


def save_interrupted(results: Dict[str, Any], ed, output_dir: Optional[str], turns_done: int):
    """Write the partial results and (fast editor) the resumable state; returns
    ``(results path, resume dir)`` (``None`` for what could not be written)."""
    from .runner import RESULTS_JSON, write_json

    if output_dir is None:
        return None, None
    resume_dir = None
    if hasattr(ed, "save") and hasattr(ed, "export_patch"):
        resume_dir = os.path.join(output_dir, RESUME_DIR)
        ed.save(os.path.join(resume_dir, "editor"))
        if ed.turns:
            ed.export_patch(os.path.join(resume_dir, "patch"))
    results["interrupted"] = {"turns_done": turns_done, "resume": resume_dir}
    path = os.path.join(output_dir, RESULTS_JSON)
    write_json(results, path)
    return path, resume_dir


def _read_results(directory: str):
    """``(path, results)`` of the run in ``directory``; clear errors for anything else."""
    from .runner import RESULTS_JSON

    path = os.path.join(os.fspath(directory), RESULTS_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: {path!r} does not exist (no interrupted run there)")
    try:
        results = json.loads(read_regular_file(path, "resume").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"resume: {path!r} is not a results file: {e}") from None
    if not isinstance(results, dict):
        raise ValueError(f"resume: {path!r} is not a results file (not a JSON object)")
    return path, results


def read_interrupted(resume: str, turns: int, edits_per_turn: int, editor: str) -> Dict[str, Any]:
    """The results of the interrupted run in directory ``resume``, checked against this
    run's shape; ``ValueError`` naming what differs."""
    path, prior = _read_results(resume)
    info = prior.get("interrupted")
    if not isinstance(info, dict):
        raise ValueError(
            f"resume: {path!r} is the record of a finished run, not an interrupted one"
        )
    cfg = prior.get("config", {})
    for key, want in (("turns", turns), ("edits_per_turn", edits_per_turn), ("editor", editor)):
        if cfg.get(key) != want:
            raise ValueError(
                f"resume: the interrupted run had {key}={cfg.get(key)!r}, this "
                f"one asks for {want!r}"
            )
    if not info.get("resume"):
        raise ValueError(
            f"resume: the interrupted run in {resume!r} left no editor state "
            "(only the fast editor's runs can be resumed)"
        )
    prior["_resume_dir"] = os.path.join(os.fspath(resume), RESUME_DIR)
    return prior


def restore_editor(model, tokenizer, prior: Dict[str, Any], measure_memory: bool = True):
    """The interrupted run's editor on ``model`` (the unedited model: its edited modules
    are written from the saved patch first)."""
    from ..editors import UltraEditor

    state = prior["_resume_dir"]
    patch = os.path.join(state, "patch")
    if os.path.isdir(patch):
        apply_patch(model, patch)
    return UltraEditor.load(
        os.path.join(state, "editor"), model, tokenizer, measure_memory=measure_memory
    )


def read_saved_argv(directory: str) -> list:
    """The command line of the interrupted run in ``directory`` (``run --resume``)."""
    path, prior = _read_results(directory)
    argv = (prior.get("config") or {}).get("argv")
    if not isinstance(argv, list) or not argv or argv[0] != "run":
        raise ValueError(
            f"resume: {path!r} does not record the run's command line; give its "
            "arguments again beside --resume"
        )
    return [str(a) for a in argv]
