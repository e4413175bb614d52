"""What a user sees editing a handful of facts with the defaults, on SmolLM2-135M-Instruct.

    python benchmarks/defaults_smollm2.py [--output benchmarks/results/defaults-smollm2-cpu.json]

For each fact set (benchmarks/facts.py: the held-out set, which nothing was tuned on, then the
tuning set and the demo's facts), from the unedited model:

- ``fast_edit(model, tok, requests)`` with no option: one turn;
- the README's example: ``UltraEditor(model, tok, undo=True).edit(requests)``;
- the published fixed step on the same layers (``step="paper"``, no null space: the
  published algorithm), for comparison;

and scores each with ``evaluate`` against the unedited model's baseline: teacher-forced and
generation-based, among them ES_gen (the target generated after the edit prompt) and
LS_gen_unedited (the requests' unrelated prompts keep their unedited greedy answer). The bar:
ES_gen >= 0.8 with LS_gen_unedited >= 0.8 on the held-out facts.

The editor sees the requests' locality prompts (step="auto" checks and protects them), so
``unseen_kept`` also counts, on unrelated prompts the editor never saw (the other sets'
locality prompts and the step's anchor prompts), the share whose greedy continuation (6
tokens) is the unedited model's.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from facts import HELD_OUT_FACTS, TUNING_FACTS, requests  # noqa: E402
from ultraedit_fast import UltraEditor, capture_baseline, evaluate, fast_edit  # noqa: E402
from ultraedit_fast.scoring import generation as G  # noqa: E402
from ultraedit_fast.core.step_search import ANCHOR_PROMPTS  # noqa: E402
from ultraedit_fast.data.demo import demo_requests  # noqa: E402
from ultraedit_fast.utils.environment import environment  # noqa: E402
from ultraedit_fast.model.loading import load_model  # noqa: E402

KEYS = (
    "ES",
    "GS",
    "LS_unedited",
    "ES_gen",
    "GS_gen",
    "LS_gen_unedited",
    "drift_kl",
    "drift_top1",
    "fluency",
    "unseen_kept",
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    model, tok = load_model("smollm2")
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def reset():
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(original[k])

    sets = {
        "held_out": requests(HELD_OUT_FACTS),
        "tuning": requests(TUNING_FACTS),
        "demo": demo_requests(),
    }
    ways = {
        "fast_edit()": lambda r: fast_edit(model, tok, r),
        "README: UltraEditor(undo=True)": lambda r: UltraEditor(model, tok, undo=True).edit(r),
        # the published algorithm: its fixed step, no stabiliser
        "same layers, step='paper'": lambda r: UltraEditor(
            model, tok, regime="facts", step="paper", null_space=None
        ).edit(r),
    }
    rows = []
    for sname, reqs in sets.items():
        base = capture_baseline(model, tok, reqs)
        before = evaluate(model, tok, reqs, base=base)
        unseen = [
            r.locality_prompt for other, rs in sets.items() if other != sname for r in rs
        ] + list(ANCHOR_PROMPTS)
        unseen_base = G.continuations(model, tok, unseen, ["x x x"] * len(unseen))
        for wname, way in ways.items():
            reset()
            t0 = time.perf_counter()
            rep = way(reqs)
            edit_s = time.perf_counter() - t0
            m = evaluate(model, tok, reqs, base=base)
            now = G.continuations(model, tok, unseen, ["x x x"] * len(unseen))
            m["unseen_kept"] = sum(a == b for a, b in zip(now, unseen_base)) / len(unseen)
            rows.append(
                {
                    "facts": sname,
                    "n": len(reqs),
                    "way": wname,
                    "modules": rep.modules,
                    "step_scale": rep.step_scale,
                    "edit_seconds": edit_s,
                    "before": {k: before.get(k) for k in KEYS},
                    "after": {k: m.get(k) for k in KEYS},
                }
            )
            a = rows[-1]["after"]
            print(
                f"{sname:8s} {wname:32s} ES {a['ES']:.2f} GS {a['GS']:.2f} | ES_gen "
                f"{a['ES_gen']:.2f} GS_gen {a['GS_gen']:.2f} LS_gen_unedited "
                f"{a['LS_gen_unedited']:.2f} unseen_kept {a['unseen_kept']:.2f} "
                f"drift_top1 {a['drift_top1']:.2f} fluency "
                f"{a['fluency']:.2f} (mean step x{rep.step_scale or 1:.2f}, {edit_s:.1f} s)",
                flush=True,
            )
    reset()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {
                    "schema": "ultraedit_fast.defaults/1",
                    "environment": environment("cpu"),
                    "rows": rows,
                    "unseen_prompts": "other sets' locality prompts + "
                    "ultraedit_fast.core.step_search.ANCHOR_PROMPTS",
                },
                f,
                indent=1,
            )
            f.write("\n")
        print(f"json: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
