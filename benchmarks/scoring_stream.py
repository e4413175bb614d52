"""Scoring against editing, in one run: the 10 x 100 CounterFact stream on SmolLM2 (CPU).

    python benchmarks/scoring_stream.py [--exact] [--eval-every 5]
        [--output benchmarks/results/scoring-stream-cpu.json]

One :func:`~ultraedit_fast.lifelong.run_lifelong` run with its defaults (the stream preset
for 100 edits a turn), generation on and the health figures on general text
(``../shared/data/general``): the unedited model's baseline is captured, every edit of the
stream is scored before the first turn, along the stream (``--eval-every`` turns: the edits
so far) and after the last, each time with the teacher-forced and generated scores, the
drift, the fluency and the health figures. The JSON gives each part's wall time and the
ratio of all scoring (baseline, before, along, after) to the editing time of the same run.

The floor beside it: one teacher-forced pass over each of the three prompt sets (edit
prompts, paraphrases, locality prompts) of all the run's requests, timed on the edited
model after the run. Every evaluation of every request needs those three passes (the
teacher-forced scores are defined by them), so ``evaluations x passes`` is what no exact
scoring can go below, whatever its generated scores cost.

``--exact`` routes the generated scores through full greedy decoding of every continuation
(the way they were computed before :mod:`ultraedit_fast.scoring.shortcuts`), for the
comparison; the scores are the same either way (``tests/scoring/test_fast_scoring.py``).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from ultraedit_fast.data.datasets import load_requests  # noqa: E402
from ultraedit_fast.lifelong import run_lifelong  # noqa: E402
from ultraedit_fast.model.loading import load_model  # noqa: E402
from ultraedit_fast.scoring import shortcuts  # noqa: E402
from ultraedit_fast.scoring.resumed import ResumedPasses  # noqa: E402
from ultraedit_fast.scoring.teacher import argmax_with_next  # noqa: E402
from ultraedit_fast.utils.environment import environment  # noqa: E402
from ultraedit_fast.utils.files import atomic_write_json  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from health_smollm2 import COUNTERFACT, GENERAL, HERE  # noqa: E402

TURNS, PER_TURN, OFFSET = 10, 100, 6000
SCORES = ("ES", "ES_gen", "GS_gen", "LS_gen_unedited", "health_unrelated_kept", "fluency")


def teacher_forced_passes(model, tok, reqs):
    """Seconds of one teacher-forced pass over each prompt set (argmax at the answers)."""
    sets = {
        "edit_prompts": [(r.prompt, r.target) for r in reqs],
        "paraphrases": [(r.rephrase, r.target) for r in reqs if r.rephrase],
        "locality_prompts": [
            (r.locality_prompt, r.locality_answer) for r in reqs if r.locality_prompt
        ],
    }
    out = {}
    for name, pairs in sets.items():
        t0 = time.perf_counter()
        argmax_with_next(model, tok, pairs, 64)
        out[name] = time.perf_counter() - t0
    return out


def resumed_floor(model, tok, reqs, start, modules):
    """Seconds of the same passes from block ``start`` up, once a first pass has kept the
    state there (:class:`~ultraedit_fast.scoring.resumed.ResumedPasses`), on a model whose
    edited ``modules`` changed in between (as after a turn: unchanged, the kept answers
    would be given again with no model work)."""
    passes = ResumedPasses(model, start)
    with passes.active():
        teacher_forced_passes(model, tok, reqs)
    weights = [model.get_submodule(n).weight for n in modules]
    kept = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.mul_(1.001)
    try:
        with passes.active():
            return teacher_forced_passes(model, tok, reqs)
    finally:
        with torch.no_grad():
            for w, k in zip(weights, kept):
                w.copy_(k)


def measure(model, tok, reqs, eval_every, turns, per_turn, resumed=True):
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    res = run_lifelong(
        model,
        tok,
        reqs,
        turns=turns,
        edits_per_turn=per_turn,
        eval_every=eval_every,
        generation=True,
        health=GENERAL,
        progress=False,
        plot=False,
        eval_batch_size=64,
        eval_resumed=resumed,
    )
    t = res["timing"]
    scoring = {
        "baseline": t["base_predictions_seconds"],
        "before": t["eval_before_seconds"],
        "along_and_after": t["eval_seconds"],
    }
    along = [e for e in res.get("eval_history") or [] if e.get("seconds") is not None]
    total = sum(scoring.values())
    passes = teacher_forced_passes(model, tok, reqs)
    n_evals = 1 + len(along)  # before, along, after
    floor = n_evals * sum(passes.values())
    start = (res.get("eval_passes") or {}).get("start_block")
    modules = res["config"]["modules"]
    later = resumed_floor(model, tok, reqs, start, modules) if start else None
    return {
        "eval_resumed": resumed,
        "eval_passes": res.get("eval_passes"),
        "teacher_forced_pass_seconds": passes,
        "teacher_forced_floor_seconds": floor,
        "teacher_forced_floor_over_editing": floor / t["edit_seconds"],
        "resumed_pass_seconds": later,
        "teacher_forced_floor_resumed_seconds": (
            sum(passes.values()) + (n_evals - 1) * sum(later.values()) if later else None
        ),
        "scoring_seconds": scoring,
        "evaluations_along_and_after": [
            {"after_turn": e["turn"], "edits": e["n_edits"], "seconds": e["seconds"]} for e in along
        ],
        "scoring_total_seconds": total,
        "edit_seconds": t["edit_seconds"],
        "scoring_over_editing": total / t["edit_seconds"],
        "load_seconds": t.get("load_seconds"),
        "run_wall_seconds": time.perf_counter() - t0,
        "run_cpu_seconds": time.process_time() - cpu0,
        "metrics_before": {k: (res.get("metrics_before") or {}).get(k) for k in SCORES},
        "metrics_after": {k: res["metrics"].get(k) for k in SCORES},
        "config": {k: res["config"].get(k) for k in ("preset", "modules", "lr")},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exact", action="store_true", help="full greedy decoding (the old way)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 turns x 5: a smoke test")
    p.add_argument(
        "--full-passes",
        action="store_true",
        help="every teacher-forced pass from the bottom (eval_resumed=False): the comparison",
    )
    p.add_argument("--output", default=os.path.join(HERE, "results", "scoring-stream-cpu.json"))
    args = p.parse_args(argv)
    for path in (COUNTERFACT, GENERAL):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is absent (../shared/data): nothing to measure")
    turns, per_turn = (2, 5) if args.quick else (TURNS, PER_TURN)
    shortcuts._EXACT_DECODE = args.exact
    model, tok = load_model("smollm2")
    reqs = list(load_requests(COUNTERFACT, "auto", offset=OFFSET, limit=turns * per_turn))
    doc = json.load(open(args.output)) if os.path.exists(args.output) else {}
    doc.update(
        schema="ultraedit_fast.scoring_stream/1",
        environment=environment("cpu"),
        stream=f"CounterFact counterfact_easyedit_train-10k.json[{OFFSET}:{OFFSET + turns * per_turn}]"
        f", {turns} turns x {per_turn}, defaults, eval_every={args.eval_every}",
        torch_threads=torch.get_num_threads(),
    )
    key = "full_decoding" if args.exact else "shortcuts"
    key += "_full_passes" if args.full_passes else ""
    doc.setdefault("runs", {})[key] = r = measure(
        model, tok, reqs, args.eval_every, turns, per_turn, not args.full_passes
    )
    print(json.dumps(r, indent=1), file=sys.stderr)
    if not args.quick:
        atomic_write_json(args.output, doc)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
