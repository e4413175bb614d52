"""``ultraedit-fast bench`` (also ``python -m ultraedit_fast.bench``): run the cases, print
the table, write ``<device>-<date>.json`` and ``.png``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..core.cli_options import add_cli_options, options_from_cli
from ..utils.environment import device_slug, environment, loadavg
from .cases import case_turn_and_memory
from .lifelong import case_lifelong
from .plot import plot
from .report import format_table, headline, merge_results, write_json
from .settings import CASES, EDITS_PER_TURN, SCHEMA, Settings
from .steps import STEP_SHAPES, TINY_SHAPES, case_steps
from .workloads import ModelPool

# the fast editor's options that the benchmark takes from the command line
EDITOR_FLAGS = ("backend", "tokens_per_pass", "step")

DEFAULT_MODELS = {
    "cpu": ["smollm2", "wide-shallow"],
    "cuda": ["llama-3-8b", "qwen2.5-7b", "gpt-j-6b", "mistral-7b"],
}


PROG = "ultraedit-fast bench"


class BenchUsageError(SystemExit):
    """A usage error found after the flags are parsed: exit status 2 (as the parser's own
    errors), its message the one line ``main`` prints on stderr (``str()`` of it)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _device_from_args(args) -> torch.device:
    """``--device``: ``auto`` is CUDA when torch has it; an explicit ``cuda`` must be there."""
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchUsageError(
            "--device cuda: CUDA is not available on this machine (torch "
            f"{torch.__version__} sees no CUDA device); use --device cpu or --device auto"
        )
    return device


def _cases_from_args(args) -> List[str]:
    """``--cases``, checked against :data:`CASES`."""
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise BenchUsageError(f"--cases: unknown {bad}; expected some of {list(CASES)}")
    return cases


class _ScaleDefaults(NamedTuple):
    """What a scale (``tiny``, ``quick``, ``full``) runs when the flags do not say."""

    models: List[str]
    lifelong_model: str
    memory_models: List[str]
    shapes: Sequence[Tuple[str, str, int, int]]
    repeats: int
    step_repeats: int
    lifelong_turns: int
    ref_turns: int


def _scale_defaults(scale: str, device: torch.device) -> _ScaleDefaults:
    cuda = device.type == "cuda"
    if scale == "tiny":
        return _ScaleDefaults(["tiny"], "tiny", ["tiny"], TINY_SHAPES, 2, 3, 4, 2)
    if scale == "quick":
        models = ["mistral-7b"] if cuda else ["smollm2"]
        return _ScaleDefaults(
            models,
            "mistral-7b" if cuda else "smollm2",
            ["mistral-7b", "llama-3-8b"] if cuda else models,
            [sh for sh in STEP_SHAPES if cuda or sh[2] <= 4096],
            2,
            10 if cuda else 3,
            20 if cuda else 5,
            2,
        )
    models = list(DEFAULT_MODELS[device.type])
    return _ScaleDefaults(
        models,
        "mistral-7b" if cuda else "smollm2",
        list(models),
        STEP_SHAPES,
        3,
        20 if cuda else 5,
        200 if cuda else 20,
        3,
    )


def settings_from_args(args) -> Settings:
    device = _device_from_args(args)
    cases = _cases_from_args(args)
    scale = "tiny" if args.tiny else ("quick" if args.quick else "full")
    cuda = device.type == "cuda"
    dflt = _scale_defaults(scale, device)
    models, life, memm = dflt.models, dflt.lifelong_model, dflt.memory_models
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        memm = list(models)
    if args.lifelong_model:
        life = args.lifelong_model
    if args.tie_below_edited and (cases != ["memory"] or cuda):
        raise BenchUsageError(
            "--tie-below-edited changes the models: it goes with "
            "--cases memory alone, on the CPU (CUDA's peak counts the weights "
            "actually held)"
        )
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    return Settings(
        device=device,
        cases=cases,
        scale=scale,
        repeats=args.repeats or dflt.repeats,
        step_repeats=args.repeats or dflt.step_repeats,
        lifelong_turns=args.lifelong_turns or dflt.lifelong_turns,
        ref_turns=args.ref_turns if args.ref_turns is not None else dflt.ref_turns,
        models=models,
        lifelong_model=life,
        memory_models=memm,
        step_shapes=list(dflt.shapes),
        seed=args.seed,
        edits=args.edits_per_turn,
        slow_s=args.slow_s,
        impl_budget_s=args.impl_budget,
        deadline=deadline,
        editor_options=options_from_cli(args, EDITOR_FLAGS),
        tie_below_edited=args.tie_below_edited,
        zsre_path=args.zsre,
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_scope_options(p: argparse.ArgumentParser) -> None:
    """Where to run, which cases at what scale (and where their results go), on which models."""
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to run (default: cuda when available)",
    )
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of {','.join(CASES)} (default: all)",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats, turns and shapes (a few minutes)"
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
    p.add_argument("--output-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument(
        "--models",
        default=None,
        help="models of the turn/memory cases (default: smollm2,wide-shallow on "
        "the CPU; llama-3-8b,qwen2.5-7b,gpt-j-6b,mistral-7b on CUDA)",
    )
    p.add_argument("--lifelong-model", default=None)
    p.add_argument(
        "--lifelong-turns",
        type=int,
        default=None,
        help="turns of the lifelong case (default: 20 on the CPU, 200 on CUDA)",
    )
    p.add_argument(
        "--ref-turns",
        type=int,
        default=None,
        help="reference turns of the lifelong case, for the extrapolation (3)",
    )


def _add_timing_options(p: argparse.ArgumentParser) -> None:
    """How many runs to measure and how long to spend."""
    p.add_argument("--repeats", type=int, default=None, help="measured runs per case")
    p.add_argument(
        "--slow-s",
        type=float,
        default=10.0,
        help="a first run longer than this is kept as the measurement (10)",
    )
    p.add_argument(
        "--impl-budget",
        type=float,
        default=150.0,
        help="stop repeating one implementation after this many seconds (150)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole benchmark; later cases are cut short",
    )


def _add_workload_options(p: argparse.ArgumentParser) -> None:
    """The editor's options, the seed, and the requests and models the turns edit."""
    add_cli_options(p, EDITOR_FLAGS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--zsre",
        default=os.environ.get("ULTRAEDIT_FAST_ZSRE"),
        metavar="JSON",
        help="zsRE records (MEND format) for SmolLM2's turns (default: "
        "$ULTRAEDIT_FAST_ZSRE; without one, synthetic requests)",
    )
    p.add_argument(
        "--tie-below-edited",
        action="store_true",
        help="memory case on a host too small for a 7B model: the decoder layers "
        "below the lowest edited one share one set of weights (the turn runs "
        "them without autograd, so its allocations are unchanged; the weights "
        "are counted untied)",
    )
    p.add_argument("--edits-per-turn", type=int, default=EDITS_PER_TURN, help=argparse.SUPPRESS)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """The process (threads) and the results files: their names, merging, the chart."""
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge into an existing results file of the same name: this run's "
        "rows replace the rows of the same model/shape, the others stay",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--replot",
        default=None,
        metavar="JSON",
        help="redraw the chart and reprint the table of a results file, then exit",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Benchmark the fast editor against the reference: per-step kernels at "
        "real shapes, one turn beside its forward/backward floor, lifelong turns, "
        "and peak memory. Prints a table and writes <device>-<date>.json and .png.",
    )
    _add_scope_options(p)
    _add_timing_options(p)
    _add_workload_options(p)
    _add_output_options(p)
    return p


NOTES = (
    "fast and reference run in the same process, alternating run by run",
    "seconds are medians of the measured runs; q20/q80 and all runs are in the JSON",
    "a first run longer than slow_s is kept as the only/first measurement",
    "CPU timings on a machine shared with other work are noisy: see loadavg",
)


def log(msg: str) -> None:
    print(msg, flush=True)


def replot(path: str) -> int:
    """``--replot``: redraw the chart of a results file and reprint its table."""
    with open(path) as f:
        doc = json.load(f)
    png = plot(doc, os.path.splitext(path)[0] + ".png")
    print(headline(doc))
    print(format_table(doc))
    print(f"chart: {png}" if png else "chart: matplotlib unavailable")
    return 0


def output_stem(env: Dict[str, Any], s: Settings, tag: Optional[str]) -> str:
    """``<device>-<date>[-<scale>][-<tag>]``, the name of the results files."""
    stem = f"{device_slug(env)}-{env['date']}"
    if s.scale != "full":
        stem += f"-{s.scale}"
    if tag:
        stem += f"-{tag}"
    return stem


def settings_record(s: Settings, args, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The run's settings as the results file records them."""
    return {
        "cases": s.cases,
        "scale": s.scale,
        "repeats": s.repeats,
        "step_repeats": s.step_repeats,
        "lifelong_turns": s.lifelong_turns,
        "ref_turns": s.ref_turns,
        "models": s.models,
        "lifelong_model": s.lifelong_model,
        "memory_models": s.memory_models,
        "backend": s.backend or "auto",
        "seed": s.seed,
        "slow_s": s.slow_s,
        "tokens_per_pass": s.editor_options.get("tokens_per_pass"),
        "editor_options": dict(s.editor_options),
        "zsre": s.zsre_path,
        "tie_below_edited": s.tie_below_edited,
        "edits_per_turn": s.edits,
        "threads": torch.get_num_threads(),
        "impl_budget_s": s.impl_budget_s,
        "time_budget_s": args.time_budget,
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }


def new_document(env: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """A results document with no case run yet."""
    return {
        "schema": SCHEMA,
        "env": env,
        "settings": settings,
        "notes": list(NOTES),
        "cases": {},
        "loadavg_per_case": {},
        "seconds_per_case": {},
    }


@dataclass
class BenchRun:
    """A run under way: its results document, where it goes, and the earlier results file
    it merges into (``--merge``)."""

    doc: Dict[str, Any]
    json_path: str
    png_path: str
    prev: Optional[Dict[str, Any]]
    pool: ModelPool
    t_start: float

    def save(self) -> None:
        """Write the document so far (merged into ``prev``, if any)."""
        doc = self.doc
        doc["elapsed_s"] = time.perf_counter() - self.t_start
        doc["env"]["loadavg_at_end"] = loadavg()
        doc["model_build_seconds"] = dict(self.pool.build_seconds)
        write_json(merge_results(self.prev, doc) if self.prev else doc, self.json_path)

    def guarded(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or ``{"error": traceback}`` when it fails; its load and seconds are
        recorded under ``name``."""
        la0, t0 = loadavg(), time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one case failing must not lose the others
            log(f"[{name}] failed: {type(e).__name__}: {e}")
            return {"error": traceback.format_exc(limit=10)}
        finally:
            self.doc["loadavg_per_case"][name] = {"start": la0, "end": loadavg()}
            self.doc["seconds_per_case"][name] = time.perf_counter() - t0


def start_run(s: Settings, args, argv: Optional[Sequence[str]]) -> BenchRun:
    """Describe the environment, name the output files, read the file to merge into."""
    env = environment(s.device)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = output_stem(env, s, args.tag)
    json_path = os.path.join(args.output_dir, stem + ".json")
    png_path = os.path.join(args.output_dir, stem + ".png")
    doc = new_document(env, settings_record(s, args, argv))
    prev = None
    if args.merge and os.path.exists(json_path):
        with open(json_path) as f:
            prev = json.load(f)
        log(f"bench: merging into {json_path} (its cases of other models/shapes are kept)")
    log(f"bench: {headline(doc)}")
    log(f"bench: writing {json_path}")
    pool = ModelPool(s.device, s.seed, s.tie_below_edited, s.zsre_path)
    return BenchRun(doc, json_path, png_path, prev, pool, time.perf_counter())


def run_turn_and_memory(run: BenchRun, s: Settings) -> None:
    cases = run.doc["cases"]

    def keep(turns, mems):  # the rows so far reach the file after every model
        if "turn" in s.cases:
            cases["turn"] = turns
        if "memory" in s.cases:
            cases["memory"] = mems
        run.save()

    res = run.guarded("turn", lambda: case_turn_and_memory(s, run.pool, log, keep))
    if isinstance(res, dict):
        cases["turn"] = [res]
    else:
        keep(*res)
    run.save()


def run_cases(run: BenchRun, s: Settings) -> None:
    """The cases asked for, in order, the file saved after each."""
    cases = run.doc["cases"]
    if "steps" in s.cases:
        cases["steps"] = run.guarded("steps", lambda: case_steps(s, log))
        run.save()
    if "turn" in s.cases or "memory" in s.cases:
        run_turn_and_memory(run, s)
    if "lifelong" in s.cases:
        cases["lifelong"] = run.guarded("lifelong", lambda: case_lifelong(s, run.pool, log))
        run.save()
    for k in ("steps", "turn", "memory"):  # a case that failed as a whole
        if isinstance(cases.get(k), dict):
            cases[k] = [cases[k]]
    run.save()


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replot:
        return replot(args.replot)
    try:
        s = settings_from_args(args)
    except BenchUsageError as e:  # one line, as the parser's errors; exit status 2
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise
    run = start_run(s, args, argv)
    run_cases(run, s)
    if run.prev:
        run.doc = merge_results(run.prev, run.doc)
    doc = run.doc
    png = None if args.no_plot else run.guarded("plot", lambda: plot(doc, run.png_path))
    print()
    print(headline(doc))
    print(format_table(doc))
    print(f"\nresults: {run.json_path}" + (f"\nchart:   {png}" if isinstance(png, str) else ""))
    return 0
