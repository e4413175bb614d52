"""The ``ultraedit-fast`` command.

    ultraedit-fast demo                       # 8 counterfactual edits on SmolLM2-135M-Instruct
    ultraedit-fast run --data zsre.json --turns 10 --edits-per-turn 100 --output-dir out/
    ultraedit-fast eval --data zsre.json --limit 200 [--output scores.json]
    ultraedit-fast bench ...                  # ultraedit_fast.bench

Mistakes a user can make (a missing file, an unknown format, a bad option or dtype,
malformed data) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import linecache
import os
import sys
import time
from typing import List, Optional

from ..core.cli_options import options_from_cli
from ..utils.files import atomic_write_json
from .common import (
    _check_output_file,
    _check_device,
    _load,
    _is_rank0,
    _world,
    _tp_plan,
    _check_tensor_parallel_outputs,
    _check_lengths,
    _model_name,
    _reader,
    _metrics_line,
)
from .parser import PROG, UsageError, _nonneg_int, _positive_int, build_parser  # noqa: F401

EXIT_USAGE = 2


# ----------------------------------------------------------------------------- commands
DEMO_NEW_TOKENS = 7


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def cmd_demo(args) -> int:
    """One turn of 8 counterfactual edits on SmolLM2-135M-Instruct."""
    from .. import UltraEditor, backend_info, capture_baseline, evaluate
    from ..data.demo import demo_requests
    from ..model.loading import generate_answer
    from ..model.targets import summarize_names

    t_start = time.perf_counter()
    device = _check_device(args.device)
    print(backend_info(str(device or "cpu")))
    model, tok = _load(args)
    reqs = demo_requests()
    editor = UltraEditor(model, tok, **options_from_cli(args, ["modules", "lr", "backend"]))

    def answers():
        return [
            [
                generate_answer(model, tok, p, DEMO_NEW_TOKENS)
                for p in (r.prompt, r.rephrase, r.locality_prompt)
            ]
            for r in reqs
        ]

    before = answers()
    base = capture_baseline(model, tok, reqs)
    m_before = evaluate(model, tok, reqs, base=base)
    report = editor.edit(reqs)  # the defaults: the preset's regime for a handful of facts
    print(
        f"edited {summarize_names(editor.module_names)} (preset {editor.preset}, lr "
        f"{editor.lr:g}, step {editor.config.step}"
        + (f", x{report.step_scale:.2f} on average" if report.step_scale else "")
        + f"): {len(reqs)} counterfactual edits in one turn\n"
    )
    after = answers()
    m_after = evaluate(model, tok, reqs, base=base)

    _print_demo(reqs, before, after, m_before, m_after)
    print(report)
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s")
    return 0


def _print_demo(reqs, before, after, m_before, m_after) -> None:
    """The demo's answers before and after each edit, and the scores."""
    for i, (r, b, a) in enumerate(zip(reqs, before, after), 1):
        print(f"[{i}/{len(reqs)}] {r.prompt} ... -> {r.target}")
        for label, prompt, x, y in (
            ("edit prompt", None, b[0], a[0]),
            ("paraphrase", r.rephrase, b[1], a[1]),
            ("unrelated", f"{r.locality_prompt} ... ({r.locality_answer})", b[2], a[2]),
        ):
            print(
                (
                    f"   {label:<11}  before: {_clip(x, 28):<28}  after: {_clip(y, 28):<28}"
                    + (f"  [{prompt}]" if prompt else "")
                ).rstrip()
            )
    print()
    print(f"scores before: {_metrics_line(m_before)}")
    print(f"scores after:  {_metrics_line(m_after)}")
    print(
        "(teacher-forced token accuracy of ES: the new answer after the edit prompt, GS: after "
        "the paraphrase; LS: the unrelated fact's answer; LS_unedited: agreement with the "
        "unedited model on the unrelated prompts; [gen ...]: the same judged on what the "
        "model generates by itself, greedy)"
    )


def cmd_run(args) -> int:
    from ..lifelong.runner import run_lifelong

    reader, examples = _run_inputs(args)
    model, tok = _load(args)
    _check_lengths(args, model, tok, examples)
    name = _model_name(args.model, model)
    t0 = time.perf_counter()
    progress = not args.no_progress and _is_rank0()
    if progress:
        print(
            f"scoring the unedited model on the {len(examples)} requests to edit ...",
            file=sys.stderr,
            flush=True,
        )
    res = run_lifelong(
        model,
        tok,
        examples,
        turns=args.turns,
        edits_per_turn=args.edits_per_turn,
        editor=args.editor,
        eval_every=args.eval_every,
        eval_sample=args.eval_sample,
        eval_batch_size=args.eval_batch_size,
        generation=not args.no_generation,
        eval_resumed=not args.full_passes,
        progress=progress,
        output_dir=args.output_dir if _is_rank0() else None,
        plot=not args.no_plot,
        config_extra={
            "model_name": name,
            "model": args.model,
            "dataset": os.path.basename(args.data),
            "data": os.path.abspath(args.data),
            "format": reader.stats.format,
            "target": args.target,
            "offset": args.offset,
            "skipped_records": reader.stats.skipped,
            "dtype": args.dtype or "float32",
            "tensor_parallel": _world() if _tp_plan(args) else 1,
            "device_map": args.device_map,
            "argv": _without_resume(getattr(args, "argv", [])),
        },
        export_patch=args.export_patch,
        export_lora=args.export_lora,
        lora_rank=args.lora_rank,
        save_editor=args.save_editor,
        resume=args.resume,
        health=False if args.no_health else (args.health_text or True),
        preheat=args.preheat,
        **options_from_cli(args),
    )
    _report_run(args, res, name, reader, t0)
    if args.save_model:
        model.save_pretrained(args.save_model)
        tok.save_pretrained(args.save_model)
        print(f"edited model saved to {args.save_model}")
    return 0


def _run_inputs(args):
    """Check every cheap argument, output path and the data before the slow model load;
    ``(reader, the run's examples)``."""
    from ..utils.files import check_output_dir

    _check_device(args.device)
    n = args.turns * args.edits_per_turn + args.preheat  # the preheat's records follow
    reader = _reader(args, n)  # checks file/format first
    # every output path is checked before the first turn, not found unusable after the last
    check_output_dir(args.output_dir, "--output-dir")
    _check_tensor_parallel_outputs(args)
    for flag in ("save_model", "save_editor", "export_patch", "export_lora"):
        if getattr(args, flag):
            check_output_dir(getattr(args, flag), "--" + flag.replace("_", "-"))
    examples = list(reader.examples())  # malformed data fails here, before the slow load
    if len(examples) < n:
        more = f" and --preheat {args.preheat}" if args.preheat else ""
        raise ValueError(
            f"data: {args.turns} turns x {args.edits_per_turn} edits{more} need {n} "
            f"records, {args.data} has {len(examples)} from offset {args.offset}"
            + (f" ({reader.stats.skipped} malformed skipped)" if reader.stats.skipped else "")
        )
    return reader, examples[:n]


def _report_run(args, res, name: str, reader, t0: float) -> None:
    from ..model.targets import summarize_names

    cfg, tim = res["config"], res["timing"]
    print(
        f"{cfg['n_edits']} edits ({args.turns} turns x {args.edits_per_turn}) on {name}: "
        f"{summarize_names(cfg['modules'])}, lr {cfg['lr']:g}, {cfg['editor']} editor, "
        f"backend {cfg['backend']}"
    )
    if reader.stats.skipped:
        print(f"skipped {reader.stats.skipped} malformed records", file=sys.stderr)
    if res["metrics_before"]:
        print(f"before: {_metrics_line(res['metrics_before'])}")
    print(f"after:  {_metrics_line(res['metrics'])}")
    print(
        f"editing {tim['edit_seconds']:.1f} s ({tim['edits_per_second']:.1f} edits/s, "
        f"{tim['mean_turn_seconds']:.2f} s per turn), scoring {tim['eval_seconds']:.1f} s, "
        f"total {time.perf_counter() - t0:.1f} s"
    )
    if res["refused_turns"]:
        print(f"refused turns (model unchanged by them): {res['refused_turns']}")
    for k, v in res["files"].items():
        print(f"{k}: {v}")


def cmd_eval(args) -> int:
    from ..utils.environment import environment
    from ..lifelong.runner import score

    reader = _reader(args, args.limit)
    _check_device(args.device)
    if args.output:  # before hours of scoring, not after
        _check_output_file(args.output, "--output")
    examples = list(reader.examples())  # malformed data fails here, before the slow load
    if not examples:
        raise ValueError(
            f"data: no records to score in {args.data} (offset {args.offset}, limit {args.limit})"
        )
    health = _eval_health_baseline(args)
    model, tok = _load(args)
    _check_lengths(args, model, tok, examples)
    t0 = time.perf_counter()
    m = score(
        model,
        tok,
        [e.request for e in examples],
        [e.extras for e in examples],
        batch_size=args.eval_batch_size,
        generation=not args.no_generation,
        chat_template=bool(args.chat_template),
    )
    dt = time.perf_counter() - t0
    for k in ("LS_unedited", "LS_gen_unedited", "drift_kl", "drift_top1"):
        m.pop(k, None)  # no edited model here: they would compare the model to itself
    if health is not None:  # against the unedited model given as --base-model
        from ..scoring.health import measure_health

        m.update(measure_health(model, tok, health))
    line = _metrics_line(m)
    print(
        f"{_model_name(args.model, model)} on {os.path.basename(args.data)} "
        f"[{args.offset}:{args.offset + len(examples)}]: {line}; {dt:.1f} s"
    )
    if reader.stats.skipped:
        print(f"skipped {reader.stats.skipped} malformed records", file=sys.stderr)
    if args.output and _is_rank0():
        out = {
            "model": args.model,
            "data": os.path.abspath(args.data),
            "format": reader.stats.format,
            "target": args.target,
            "offset": args.offset,
            "limit": args.limit,
            "skipped_records": reader.stats.skipped,
            "metrics": m,
            "seconds": dt,
            "environment": environment(next(model.parameters()).device),
        }
        atomic_write_json(args.output, out)
        print(f"json: {args.output}")
    return 0


def _eval_health_baseline(args):
    """eval --base-model: the unedited model's side of the health figures (captured, then
    that model is freed before the model to score is loaded)."""
    from ..scoring.health import capture_health, read_health_text

    if args.base_model is None:
        if args.health_text is not None:
            raise ValueError(
                "--health-text: the health is measured against the unedited "
                "model; give it as --base-model"
            )
        return None
    read_health_text(args.health_text)  # a bad file fails before any model is loaded
    base_args = argparse.Namespace(**{**vars(args), "model": args.base_model})
    base, tok = _load(base_args)
    health = capture_health(base, tok, args.health_text)
    del base
    return health


def cmd_export(args) -> int:
    from .. import UltraEditor
    from ..utils.files import check_output_dir

    if not args.patch and not args.lora:
        raise UsageError(f"{PROG} export: error: nothing to do: give --patch DIR and/or --lora DIR")
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint: {args.checkpoint!r} is not a directory")
    for flag in ("patch", "lora"):
        if getattr(args, flag):
            check_output_dir(getattr(args, flag), "--" + flag)
    model, tok = _load(args)
    import warnings
    from ..storage.checkpoint import CheckpointWeightsWarning

    with warnings.catch_warnings():  # the edited model, or the export names the wrong weights
        warnings.simplefilter("error", category=CheckpointWeightsWarning)
        try:
            editor = UltraEditor.load(args.checkpoint, model, tok)
        except CheckpointWeightsWarning as w:
            raise ValueError(f"--model: {w}") from None
    if args.patch:
        print(f"patch: {editor.export_patch(args.patch)}")
    if args.lora:
        base = None
        if args.base_model:
            from ..model.loading import load_model, parse_dtype

            base, _ = load_model(args.base_model, dtype=parse_dtype(args.dtype))
        rep = editor.export_lora(args.lora, args.rank, base=base)
        worst = max(rep["relative_error"].values())
        print(
            f"lora: {args.lora} (rank {sorted(set(rep['rank'].values()))}, "
            f"{rep['bytes'] / 2**20:.1f} MiB, largest relative error {worst:.2e})"
        )
    return 0


def cmd_bench(argv: List[str]) -> int:
    if importlib.util.find_spec("ultraedit_fast.bench") is None:
        print(
            f"{PROG} bench: error: the benchmark module ultraedit_fast.bench is not part of "
            "this installation",
            file=sys.stderr,
        )
        return EXIT_USAGE
    bench = importlib.import_module("ultraedit_fast.bench")
    try:
        rc = bench.main(argv)
    except SystemExit as e:  # its parser's --help, or its one-line usage error
        rc = e.code
    return int(rc or 0)


# ----------------------------------------------------------------------------- entry point
def _one_line(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, OSError) and e.strerror and e.filename and e.strerror in text:
        text = e.strerror if str(e.filename) in e.strerror else f"{e.strerror}: {e.filename}"
    text = " ".join(text.split()) if text.count("\n") < 3 else text.strip().splitlines()[0]
    return text or type(e).__name__


def _is_user_error(e: BaseException) -> bool:
    """An error about the user's input, reported as one line: one that code raised on
    purpose (a check at a boundary, here or in a library it calls: the innermost frame is
    a ``raise`` statement), or an OS error naming a file. An error Python itself raised
    inside a computation (a wrong type, a bad index) is a bug and keeps its traceback."""
    from ..data.datasets import DataFormatError
    from ..editors import EditRefused

    if isinstance(e, (DataFormatError, EditRefused)):
        return True
    if isinstance(e, OSError) and (e.filename is not None or isinstance(e, FileNotFoundError)):
        return True
    tb = e.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
    return line.startswith("raise")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ..data.datasets import DataFormatError

    if not _is_rank0():  # under torchrun, rank 0 reports; the others work silently
        sys.stdout = open(os.devnull, "w")
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        argv = _resumed_argv(argv)
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
            args.argv = [a for a in argv]
        except SystemExit as e:  # --help / --version
            return int(e.code or 0)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        from ..utils.display import progress_bars

        with progress_bars(not getattr(args, "no_progress", False)):
            return {"demo": cmd_demo, "run": cmd_run, "eval": cmd_eval, "export": cmd_export}[
                args.command
            ](args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except (DataFormatError, ValueError, TypeError, FileNotFoundError, OSError) as e:
        if not _is_user_error(e):
            raise  # a bug, not a mistake in the input: the traceback says where
        cmd = f"{PROG} {argv[0]}" if argv and not argv[0].startswith("-") else PROG
        kind = "data error" if isinstance(e, DataFormatError) else "error"
        print(f"{cmd}: {kind}: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(_interrupted_line(e), file=sys.stderr)
        return 130


def _interrupted_line(e: KeyboardInterrupt) -> str:
    from ..lifelong.resume import RunInterrupted

    if not isinstance(e, RunInterrupted) or e.results_path is None:
        return f"{PROG}: interrupted"
    line = f"{PROG}: interrupted after {e.turns_done} turns; results so far: {e.results_path}"
    if e.resume_dir is not None:
        line += f"; go on with: {PROG} run --resume {os.path.dirname(e.results_path)}"
    return line


def _without_resume(argv: List[str]) -> List[str]:
    if "--resume" not in argv:
        return list(argv)
    i = argv.index("--resume")
    return argv[:i] + argv[i + 2 :]


def _resumed_argv(argv: List[str]) -> List[str]:
    """``run --resume DIR``: the interrupted run's own command line, with ``--resume DIR``
    (given alone, or beside the same arguments, which are then checked by the run)."""
    if not argv or argv[0] != "run" or "--resume" not in argv:
        return argv
    i = argv.index("--resume")
    if i + 1 >= len(argv):
        raise UsageError(f"{PROG} run: error: argument --resume: expected one argument")
    directory = argv[i + 1]
    rest = argv[1:i] + argv[i + 2 :]
    if rest:
        return argv
    from ..lifelong.resume import read_saved_argv

    return read_saved_argv(directory) + ["--resume", directory]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
