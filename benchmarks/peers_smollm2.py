"""UltraEdit beside the editors users would pick instead, on one stream, in one process.

    python benchmarks/peers_smollm2.py [--turns 10] [--edits 100] [--methods NAME,...]
        [--output benchmarks/results/peers-smollm2-cpu.json]

Every method edits a fresh copy of SmolLM2-135M-Instruct (CPU, fp32) with the same
CounterFact stream (records 7000 on, counterfactual targets: no tuning of the package or of
the baselines saw them), through the same lifelong runner
(:func:`ultraedit_fast.lifelong.run_lifelong`), and is scored once after its last turn on
every edit against the unedited model's baseline, captured once: teacher-forced ES/GS/LS,
generated ES_gen/GS_gen/LS_gen_unedited, and the health figures (unrelated prompts' greedy
answers kept, perplexity ratio and next-token agreement on the Lee news text of
``../shared/data/general``). Time per edit is the runner's editing wall time over the
edits; peak memory is the process's peak RSS during the turns (the CPU's figure).

Methods (``--methods``): ``ultraedit`` (the package's defaults), ``ultraedit-paper``
(the published algorithm: ``step="paper"``, no stabiliser), ``locft-bf`` (:class:`~ultraedit_fast.baselines.LocFTEditor`, fine-tuned
turn by turn), ``alphaedit`` and ``memit`` (:mod:`ultraedit_fast.baselines.alphaedit`, the
requests' CounterFact subjects given). Results: one JSON (rewritten after each method, so a
stopped run keeps what it measured; a stream's methods not run again keep their results and
dates), a Markdown table and a PNG beside it.
"""

import argparse
import copy
import itertools
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from ultraedit_fast import capture_baseline  # noqa: E402
from ultraedit_fast.data.datasets import iter_examples  # noqa: E402
from ultraedit_fast.lifelong import run_lifelong  # noqa: E402
from ultraedit_fast.model.loading import load_model  # noqa: E402
from ultraedit_fast.utils.environment import environment  # noqa: E402
from ultraedit_fast.utils.files import atomic_write_json, atomic_write_bytes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from health_smollm2 import COUNTERFACT, GENERAL, HERE  # noqa: E402  (one place for the data)

OFFSET = 7000
KEYS = (
    "ES",
    "GS",
    "LS_unedited",
    "ES_gen",
    "GS_gen",
    "LS_gen_unedited",
    "health_unrelated_kept",
    "health_ppl_ratio",
    "health_top1",
    "fluency",
)


def _baseline(name, model, tok, subjects):
    """A baseline editor built on ``model`` (imported here: a missing one fails its row)."""
    from ultraedit_fast import baselines as B

    if name == "locft-bf":
        return B.LocFTEditor(model, tok, measure_memory=True)
    cls = {"alphaedit": B.AlphaEditEditor, "memit": B.MEMITEditor}[name]
    return cls(model, tok, subjects=subjects, general_text=GENERAL)


def run_method(name, model0, tok, examples, base, turns, per_turn):
    model = copy.deepcopy(model0)
    reqs = [e.request for e in examples]
    subjects = {e.request.prompt: e.extras["subject"] for e in examples if "subject" in e.extras}
    kw = dict(turns=turns, edits_per_turn=per_turn, eval_before=False, base=base)
    kw.update(progress=False, plot=False, eval_batch_size=64, health=GENERAL)
    t0 = time.perf_counter()
    if name.startswith("ultraedit"):
        # ultraedit-paper: the published algorithm (no stabiliser of the presets)
        paper = {
            "step": "paper",
            "null_space": None,
            "whiten_values": False,
            "preserve_edits": None,
        }
        opts = paper if name == "ultraedit-paper" else {}
        res = run_lifelong(model, tok, reqs, **kw, **opts)
    else:
        res = run_lifelong(model, tok, reqs, editor=_baseline(name, model, tok, subjects), **kw)
    n = turns * per_turn
    timing = res["timing"]
    return {
        "metrics": {k: res["metrics"].get(k) for k in KEYS},
        "config": res["config"],
        "refused_turns": res["refused_turns"],
        "edit_seconds": timing["edit_seconds"],
        "seconds_per_edit": timing["edit_seconds"] / n,
        "turn_seconds": [r["total_seconds"] for r in res["turns"]],
        "peak_memory_bytes": timing["peak_memory_bytes"],
        "peak_memory_kind": timing["peak_memory_kind"],
        "process_peak_rss_bytes": timing["process_peak_rss_bytes"],
        "scoring_seconds": timing["eval_seconds"],
        "wall_seconds": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def table(doc) -> str:
    """The Markdown table; "x ultraedit": the method's time per edit over the defaults'
    in the same run (``-`` where the defaults did not run with it)."""
    cols = ["stream", "method", "s / edit", "x ultraedit"] + list(KEYS) + ["peak RSS MiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, stream in doc["streams"].items():
        for name, r in stream["methods"].items():
            lines.append(_row(key, name, r, r.get("ultraedit_seconds_per_edit_same_run")))
    return "\n".join(lines) + "\n"


def _row(key, name, r, ref) -> str:
    m = r["metrics"]
    cells = [key, name, f"{r['seconds_per_edit']:.4f}"]
    cells.append(f"{r['seconds_per_edit'] / ref:.1f}" if ref else "-")
    cells += ["-" if m.get(k) is None else f"{m[k]:.3f}" for k in KEYS]
    rss = r.get("peak_memory_bytes") or r.get("process_peak_rss_bytes")
    cells.append(f"{rss / 2**20:.0f}" if rss else "-")
    return "| " + " | ".join(cells) + " |"


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("seconds_per_edit", "seconds per edit (log)"),
        ("health_ppl_ratio", "perplexity ratio, general text"),
        ("health_top1", "next token unchanged, general text"),
        ("LS_gen_unedited", "locality prompts kept"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4))
    for ax, (key, title) in zip(axes, panels):
        for skey, stream in doc["streams"].items():
            for name, r in stream["methods"].items():
                x = r[key] if key == "seconds_per_edit" else r["metrics"].get(key)
                y = r["metrics"].get("ES_gen")
                if x is None or y is None:
                    continue
                ax.scatter([x], [y])
                label = f"{name} ({skey})"
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "seconds_per_edit":
            ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("ES_gen over all edits")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "SmolLM2-135M-Instruct, CounterFact: "
        f"editors side by side ({doc['environment'].get('device_name', 'CPU')})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--methods", default="ultraedit,ultraedit-paper,locft-bf,alphaedit,memit")
    p.add_argument("--output", default=os.path.join(HERE, "results", "peers-smollm2-cpu.json"))
    args = p.parse_args(argv)
    for path in (COUNTERFACT, GENERAL):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is absent (../shared/data): nothing to measure")
    model0, tok = load_model("smollm2")
    n = args.turns * args.edits
    examples = list(itertools.islice(iter_examples(COUNTERFACT, offset=OFFSET), n))
    t0 = time.perf_counter()
    reqs = [e.request for e in examples]
    base = capture_baseline(model0, tok, reqs, batch_size=64, health=GENERAL)
    doc = {"schema": "ultraedit_fast.peers/1", "environment": environment("cpu"), "streams": {}}
    if os.path.exists(args.output):  # one file, a stream per run of the script
        doc = json.load(open(args.output))
    kept = doc["streams"].get(f"{args.turns}x{args.edits}", {}).get("methods", {})
    stream = doc["streams"][f"{args.turns}x{args.edits}"] = {
        "command": "python benchmarks/peers_smollm2.py " + " ".join(sys.argv[1:]),
        "records": f"counterfact_easyedit_train-10k.json[{OFFSET}:{OFFSET + n}]",
        "turns": args.turns,
        "edits_per_turn": args.edits,
        "baseline_seconds": time.perf_counter() - t0,
        # methods not run this time keep their results (each says its date)
        "methods": {k: v for k, v in kept.items() if k not in args.methods.split(",")},
    }
    names = args.methods.split(",")
    if "ultraedit" in names:  # first: the other methods' speed ratios are to this run's
        names = ["ultraedit"] + [n for n in names if n != "ultraedit"]
    ref = None
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        r = run_method(name, model0, tok, examples, base, args.turns, args.edits)
        ref = r["seconds_per_edit"] if name == "ultraedit" else ref
        # the defaults' time per edit measured in the same run (None: not run with it)
        r["ultraedit_seconds_per_edit_same_run"] = ref
        r["run_command"] = stream["command"]
        stream["methods"][name] = r
        print(f"  {r['seconds_per_edit']:.4f} s/edit {json.dumps(r['metrics'])}", flush=True)
        atomic_write_json(args.output, doc)
    md = args.output.replace(".json", ".md")
    atomic_write_bytes(md, table(doc).encode())
    plot(doc, args.output.replace(".json", ".png"))
    print(table(doc))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
