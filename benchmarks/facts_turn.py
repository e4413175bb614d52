"""A facts-regime turn against a paper-step turn of the same requests, on SmolLM2-135M.

    python benchmarks/facts_turn.py [--repeats 5] [--output benchmarks/results/facts-turn-cpu.json]

For each fact set of ``benchmarks/facts.py`` (held-out, then tuning), from the unedited model
each time:

- ``paper``: ``UltraEditor(model, tok, regime="facts", step="paper")`` (the facts regime's
  layers and lr, the published fixed step: no search);
- ``auto``: the defaults (``UltraEditor(model, tok)``: the facts regime, ``step="auto"``);
- ``auto, decoded`` / ``auto, answer``: the same with ``locality_check`` set either way.

Each way's editor (``undo=True``) makes one turn first, timed on its own (``first_seconds``:
it builds the editor's one-off state, the null-space projection of the facts preset), and
rolls it back; then the same first turn is timed ``--repeats`` times, rolled back after each
(median of wall and of process CPU seconds, one torch thread by default so that CPU time
measures the work on a shared machine), its phases from the turn's report; ES_gen and
LS_gen_unedited scored on the last repeat's edit against the unedited model.
The bar (issue 25): an ``auto`` turn at most 5x a ``paper`` turn, with ES_gen and locality
no worse than before.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from facts import HELD_OUT_FACTS, TUNING_FACTS, requests  # noqa: E402
from ultraedit_fast import UltraEditor, capture_baseline, evaluate  # noqa: E402
from ultraedit_fast.model.loading import load_model  # noqa: E402
from ultraedit_fast.utils.environment import environment  # noqa: E402

WAYS = {
    "paper": dict(regime="facts", step="paper"),
    "auto": {},
    "auto, decoded": dict(locality_check="decoded"),
    "auto, answer": dict(locality_check="answer"),
}


def _way(model, tok, reqs, way, repeats):
    """``(first_seconds, wall seconds, CPU seconds, last report)``: the editor's first turn,
    then ``repeats`` timed turns of the same requests, each rolled back but the last."""
    ed = UltraEditor(model, tok, undo=True, **WAYS[way])
    t0 = time.perf_counter()
    ed.edit(reqs)
    first = time.perf_counter() - t0
    ed.rollback()
    times, cpu, rep = [], [], None
    for r in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        rep = ed.edit(reqs)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if r < repeats - 1:
            ed.rollback()
    return ed, first, times, cpu, rep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # 1: CPU time is the turn's work on a shared machine
    model, tok = load_model("smollm2")
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def reset():
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(original[k])

    rows = []
    for sname, facts in (("held_out", HELD_OUT_FACTS), ("tuning", TUNING_FACTS)):
        reqs = requests(facts)
        base = capture_baseline(model, tok, reqs)
        for way in WAYS:
            reset()  # (the rollbacks restore the weights exactly; this is belt and braces)
            ed, first, times, cpu, rep = _way(model, tok, reqs, way, args.repeats)
            m = evaluate(model, tok, reqs, base=base)  # the last repeat's edit
            ed.rollback()
            del ed
            gc.collect()
            row = {
                "facts": sname,
                "n": len(reqs),
                "way": way,
                "first_seconds": first,
                "seconds": times,
                "median_seconds": statistics.median(times),
                "cpu_seconds": cpu,
                "median_cpu_seconds": statistics.median(cpu),
                "phases": rep.seconds,
                "step_scale": rep.step_scale,
                "trials": len(rep.step_search["trials"]) if rep.step_search else 0,
                "ES_gen": m["ES_gen"],
                "GS_gen": m["GS_gen"],
                "LS_gen_unedited": m["LS_gen_unedited"],
            }
            rows.append(row)
            print(
                f"{sname:8s} {way:18s} median {row['median_seconds']:.3f} s "
                f"(trials {row['trials']}) ES_gen {m['ES_gen']:.2f} "
                f"LS_gen_unedited {m['LS_gen_unedited']:.2f}",
                flush=True,
            )
        paper = next(r for r in rows if r["facts"] == sname and r["way"] == "paper")
        for r in rows:
            if r["facts"] == sname:
                r["x_paper"] = r["median_seconds"] / paper["median_seconds"]
                r["x_paper_cpu"] = r["median_cpu_seconds"] / paper["median_cpu_seconds"]
        print(
            "  x paper: "
            + ", ".join(
                f"{r['way']} {r['x_paper']:.2f} (cpu {r['x_paper_cpu']:.2f})"
                for r in rows
                if r["facts"] == sname
            )
        )
    reset()
    doc = {
        "schema": "ultraedit_fast.facts_turn/1",
        "command": "python benchmarks/facts_turn.py " + " ".join(argv or sys.argv[1:]),
        "environment": environment("cpu"),
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"json: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
