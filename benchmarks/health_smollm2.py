"""A model that stays healthy over many edits: the stabilisers side by side on SmolLM2.

    python benchmarks/health_smollm2.py [--scenarios daily,stream] [--configs NAME,...]
        [--output benchmarks/results/health-smollm2-cpu.json]

Scenarios (records no tuning saw: CounterFact's held-out split below, counterfactual
targets, and the WikiBigEdit sample; nothing in the package was tuned on them):

- ``daily``: 30 turns x 10 facts, records 5000-5299 (the facts regime's defaults);
- ``stream``: 10 turns x 100 facts, records 6000-6999 (the stream preset);
- ``wiki-daily`` / ``wiki-stream``: the same on the WikiBigEdit sample
  (``../shared/data/wikibigedit``, real Wikidata updates), records 0-299 / 1000-1999;
- ``daily-tune`` / ``stream-tune``: the same on CounterFact's tuning split, records 0-299 /
  1000-1999, where a default is chosen before the held-out scenarios confirm it.

Each configuration edits a fresh copy of the unedited model and is scored once, after the
last turn, on every edit of the run against the unedited model's baseline (captured once
per scenario): ES_gen (the target generated after the edit prompt), LS_gen_unedited (the
edited records' locality prompts keep their unedited greedy answer), and the health figures
(:mod:`ultraedit_fast.scoring.health`): unrelated prompts' greedy answers kept, perplexity
ratio and next-token agreement on held-out general text (``../shared/data/general``, the
Lee news corpus; the preserved keys come from the package's own sample, a different text).

Configurations (``--configs``, see :func:`options`; each with ``null_space``,
``whiten_values`` and ``preserve_edits`` off and ``max_step_scale`` 64 unless it names them, so ``defaults`` is the
defaults before these became a preset's, ``whiten+null0.01`` today's stream defaults and
``null0.01+max8+first64`` today's facts defaults): ``defaults`` (no option), ``paper``
(``step="paper"``), ``auto`` (``step="auto"``: the step search, in the stream too), ``preserve<N>`` (``preserve_general=N``), ``keep<W>``
(``preserve_edits=W``: earlier turns' keys kept in every solve), ``w<W>`` (``preserve_weight``),
``ridge<R>`` (the solve's regulariser), ``lb<X>`` (the step search's locality budget),
``max<S>`` (its largest scale; with ``first<S>``, on the editor's first turn), ``drift<X>`` (its budget of general text's next tokens
changed per turn), ``null<X>`` (``null_space``: the updates projected onto the null space
of general text's inputs, eigenvalues under ``X`` of the largest), ``unedited``
(``drift_from="unedited"``: the drift budget counts all turns so far), ``anchor``
(``norm_anchor``: no target lengthens an output), ``whiten`` (``whiten_values``:
StableEdit's normaliser), ``answer`` (``locality_check="answer"``), ``preheat<N>`` (StableEdit's preheat: the normaliser's statistics
warmed on N records of the scenario's data that no scenario edits, ``PREHEAT``, before the
first turn), joined with ``+`` on top of the defaults.
Results: one JSON (appended per configuration, so a stopped run keeps what it measured)
and a PNG of ES_gen against each health figure, one point per configuration.
"""

import argparse
import copy
import json
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from ultraedit_fast import UltraEditor, capture_baseline  # noqa: E402
from ultraedit_fast.data.datasets import load_requests  # noqa: E402
from ultraedit_fast.lifelong import run_lifelong  # noqa: E402
from ultraedit_fast.model.loading import load_model  # noqa: E402
from ultraedit_fast.scoring.health import read_health_text  # noqa: E402
from ultraedit_fast.utils.environment import environment  # noqa: E402
from ultraedit_fast.utils.files import atomic_write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
COUNTERFACT = os.path.join(DATA, "counterfact", "counterfact_easyedit_train-10k.json")
GENERAL = os.path.join(DATA, "general", "lee_background.txt")
WIKI = os.path.join(DATA, "wikibigedit", "wikibigedit_locft_first2000.json")
# name: (turns, edits per turn, first record, data file)
SCENARIOS = {
    "daily": (30, 10, 5000, COUNTERFACT),
    "stream": (10, 100, 6000, COUNTERFACT),
    "wiki-daily": (30, 10, 0, WIKI),
    "wiki-stream": (10, 100, 1000, WIKI),
    # the tuning split (CounterFact records 0-4999): where defaults are chosen
    "daily-tune": (30, 10, 0, COUNTERFACT),
    "stream-tune": (10, 100, 1000, COUNTERFACT),
}
# preheat<N>: records of each data file that no scenario edits (first record, how many)
PREHEAT = {COUNTERFACT: (2000, 2000), WIKI: (300, 700)}
KEYS = (
    "ES",
    "ES_gen",
    "GS_gen",
    "LS_gen_unedited",
    "health_unrelated_kept",
    "health_ppl_ratio",
    "health_top1",
    "drift_top1",
)


def options(name):
    """The editor options of a configuration name: ``defaults``, or ``+``-joined parts
    ``paper`` (step="paper"), ``preserve<N>`` (preserve_general), ``keep<W>``
    (preserve_edits), ``w<W>`` (its weight),
    ``ridge<R>`` (the solve's regulariser), ``lb<X>`` (step="auto"'s locality budget),
    ``max<S>`` (step="auto"'s largest scale), ``drift<X>`` (its drift budget on general
    text), ``null<X>`` (null_space), ``unedited`` (drift_from), ``anchor`` (norm_anchor),
    ``whiten`` (whiten_values), ``answer`` (locality_check); ``preheat<N>`` is not an option (:func:`preheat_of`).
    Every configuration has ``null_space``, ``whiten_values`` and ``preserve_edits`` off and
    ``max_step_scale`` 64 unless a part sets them: the names are options on top of the defaults as they were
    before these became a preset's (``whiten+null0.01`` is today's stream defaults,
    ``null0.01+max8+first64`` today's facts defaults)."""
    out = {
        "null_space": None,
        "max_step_scale": 64.0,
        "whiten_values": False,
        "preserve_edits": None,
    }
    if name == "defaults":
        return out
    for part in name.split("+"):
        m = re.fullmatch(
            r"(paper|auto|unedited|anchor|whiten|answer|preheat|preserve|keep|w|ridge|lb|max|first|drift|null)"
            r"([0-9.]*)",
            part,
        )
        bare = ("paper", "auto", "unedited", "anchor", "whiten", "answer")
        if not m or (m.group(1) not in bare) != bool(m.group(2)):
            raise SystemExit(f"--configs: unknown configuration part {part!r} in {name!r}")
        key, val = m.groups()
        if key in ("paper", "auto"):
            out["step"] = key
        elif key == "unedited":
            out["drift_from"] = "unedited"
        elif key == "anchor":
            out["norm_anchor"] = True
        elif key == "whiten":
            out["whiten_values"] = True
        elif key == "answer":
            out["locality_check"] = "answer"
        elif key == "preheat":
            continue
        elif key == "preserve":
            out["preserve_general"] = int(val)
        elif key == "keep":
            out["preserve_edits"] = float(val)
        elif key == "w":
            out["preserve_weight"] = float(val)
        elif key == "lb":
            out["locality_budget"] = float(val)
        elif key == "max":
            out["max_step_scale"] = float(val)
        elif key == "first":
            out["first_step_scale"] = float(val)
        elif key == "drift":
            out["drift_budget"] = float(val)
        elif key == "null":
            out["null_space"] = float(val)
        else:
            out["ridge"] = float(val)
    return out


def preheat_of(name):
    """The number of records a configuration preheats the normaliser with (0: none)."""
    m = re.search(r"(?:^|\+)preheat([0-9]+)(?:\+|$)", name)
    return int(m.group(1)) if m else 0


def run_config(model0, tok, reqs, base, turns, per_turn, name, data):
    model = copy.deepcopy(model0)
    t0 = time.perf_counter()
    editor, preheat = "fast", {}
    n_pre = preheat_of(name)
    if n_pre:  # the regime must be fixed before the first turn: the one its size picks
        first, most = PREHEAT[data]
        pre = list(load_requests(data, "auto", offset=first, limit=min(n_pre, most)))
        regime = "facts" if per_turn <= 32 else "stream"
        editor = UltraEditor(model, tok, regime=regime, **options(name))
        t1 = time.perf_counter()
        rows = editor.preheat(pre)
        preheat = {"records": len(pre), "first": first, "rows": rows}
        preheat["seconds"] = time.perf_counter() - t1
    res = run_lifelong(
        model,
        tok,
        reqs,
        editor=editor,
        turns=turns,
        edits_per_turn=per_turn,
        eval_before=False,
        base=base,
        progress=False,
        plot=False,
        eval_batch_size=64,
        **({} if n_pre else options(name)),
    )
    m = res["metrics"]
    rows = [r for r in res["turns"] if r["refused"] is None]
    acted = sorted({s for r in rows for s in r.get("stabilisers") or []})
    return {
        "options": options(name),
        "preheat": preheat or None,
        "metrics": {k: m.get(k) for k in KEYS},
        "stabilisers_acted": acted,
        "refused_turns": res["refused_turns"],
        "mean_turn_seconds": res["timing"]["mean_turn_seconds"],
        "edit_seconds": res["timing"]["edit_seconds"],
        "scoring_seconds": res["timing"]["eval_seconds"],
        "wall_seconds": time.perf_counter() - t0,
        "config": {k: res["config"][k] for k in ("modules", "lr", "preset")},
        # the package's general-text sample (preserved keys, null space, drift windows)
        "package_sample_chars": len(read_health_text(None)[0]),
    }


PPL_CLIP = 2.0  # perplexity ratios beyond this are drawn at it (a wrecked model: 6,560x)
# the frontier of each mechanism: (label, scenario, configurations along its knob)
SWEEPS = (
    (
        "step cap 4/8/16x (daily-tune)",
        "daily-tune",
        ("null0.01+max4", "null0.01+max8", "null0.01+max16"),
    ),
    (
        "step cap 4/6/8x, earlier keys kept (daily-tune)",
        "daily-tune",
        (
            "null0.01+max4+first64+keep1",
            "null0.01+max6+first64+keep0.1",
            "null0.01+max8+first64+keep0.1",
        ),
    ),
    (
        "drift budget 0.05/0.1/none, keys kept (daily-tune)",
        "daily-tune",
        (
            "null0.01+max8+first64+keep0.1+drift0.05+unedited",
            "null0.01+max8+first64+keep0.1+drift0.1+unedited",
            "null0.01+max8+first64+keep0.1",
        ),
    ),
    ("drift budget 0.005/0.02/none (daily)", "daily", ("drift0.005", "drift0.02", "defaults")),
    ("null space 0.001/0.01/0.05 (stream)", "stream", ("null0.001", "null0.01", "null0.05")),
    (
        "earlier keys' weight 0/0.01/0.1/1 (stream-tune)",
        "stream-tune",
        (
            "whiten+null0.01",
            "whiten+null0.01+keep0.01",
            "whiten+null0.01+keep0.1",
            "whiten+null0.01+keep1",
        ),
    ),
    (
        "preserved general keys 0/512/1024, w10 (stream)",
        "stream",
        ("defaults", "preserve512+w10", "preserve1024+w10"),
    ),
)


def plot(doc, path):
    """ES_gen against each health figure, one point per scenario and configuration (the
    held-out CounterFact scenarios' points named: the others are many and crowd it), and
    one curve per mechanism through the configurations along its knob (:data:`SWEEPS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (
            "health_ppl_ratio",
            f"perplexity ratio, general text (lower is better; > {PPL_CLIP} drawn at it)",
        ),
        ("health_top1", "next token unchanged, general text"),
        ("health_unrelated_kept", "unrelated prompts: greedy answer kept"),
        ("LS_gen_unedited", "edited records' locality prompts kept"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    markers = {
        "daily": "o",
        "stream": "s",
        "wiki-daily": "^",
        "wiki-stream": "v",
        "daily-tune": "<",
        "stream-tune": ">",
    }
    for ax, (key, title) in zip(axes.flat, panels):
        for scen, marker in markers.items():
            xs, ys = [], []
            for name, r in doc["scenarios"].get(scen, {}).get("configs", {}).items():
                x, y = r["metrics"].get(key), r["metrics"].get("ES_gen")
                if x is None or y is None:
                    continue
                x = min(x, PPL_CLIP) if key == "health_ppl_ratio" else x
                xs.append(x)
                ys.append(y)
                if scen in ("daily", "stream"):
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
            ax.scatter(xs, ys, marker=marker, label=scen, alpha=0.6)
        for label, scen, names in SWEEPS:  # one curve per mechanism, along its knob
            configs = doc["scenarios"].get(scen, {}).get("configs", {})
            pts = [
                (configs[n]["metrics"].get(key), configs[n]["metrics"].get("ES_gen"))
                for n in names
                if n in configs
            ]
            pts = [(min(x, PPL_CLIP) if key == "health_ppl_ratio" else x, y) for x, y in pts]
            if len(pts) > 1:
                ax.plot([x for x, _ in pts], [y for _, y in pts], "-", lw=1.2, label=label)
        ax.set_xlabel(title)
        ax.set_ylabel("ES_gen over all edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "SmolLM2-135M-Instruct, CounterFact (held-out, tuning) and WikiBigEdit: ES_gen against "
        f"health ({doc['environment'].get('device_name', 'CPU')})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", default="daily,stream")
    p.add_argument("--configs", default="defaults,paper,preserve256,preserve1024")
    p.add_argument("--output", default=os.path.join(HERE, "results", "health-smollm2-cpu.json"))
    p.add_argument("--quick", action="store_true", help="2 turns x 5 facts: a smoke test")
    args = p.parse_args(argv)
    for path in (COUNTERFACT, GENERAL):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is absent (../shared/data): nothing to measure")
    model0, tok = load_model("smollm2")
    doc = {
        "schema": "ultraedit_fast.health/1",
        "environment": environment("cpu"),
        "general_text": os.path.relpath(GENERAL, os.path.join(HERE, "..")),
        "scenarios": {},
    }
    if os.path.exists(args.output):
        doc = json.load(open(args.output))
    for scen in args.scenarios.split(","):
        turns, per_turn, offset, data = SCENARIOS[scen]
        if not os.path.exists(data):
            raise SystemExit(f"{data} is absent (../shared/data): nothing to measure")
        if args.quick:  # a check that the script runs, not a measurement
            turns, per_turn = 2, 5
        reqs = list(load_requests(data, "auto", offset=offset, limit=turns * per_turn))
        t0 = time.perf_counter()
        base = capture_baseline(model0, tok, reqs, batch_size=64, health=GENERAL)
        entry = doc["scenarios"].setdefault(scen, {"configs": {}})
        entry.update(
            turns=turns,
            edits_per_turn=per_turn,
            records=f"{os.path.basename(data)}[{offset}:{offset + turns * per_turn}]",
            baseline_seconds=time.perf_counter() - t0,
        )
        for name in args.configs.split(","):
            print(f"{scen}: {name} ...", file=sys.stderr, flush=True)
            entry["configs"][name] = run_config(
                model0, tok, reqs, base, turns, per_turn, name, data
            )
            print(json.dumps(entry["configs"][name]["metrics"]), file=sys.stderr, flush=True)
            atomic_write_json(args.output, doc)
    plot(doc, args.output.replace(".json", ".png"))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
