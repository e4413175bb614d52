"""Edits that ship, measured on SmolLM2-135M-Instruct: the sizes of a weight patch, an exact
LoRA adapter and rank-limited ones after a lifelong run, and what each rank keeps of the edit.

    python benchmarks/export_smollm2.py [--turns 10] [--sample 200]
        [--output benchmarks/results/export-smollm2-cpu.json]

The run: ``--turns`` turns of 100 zsRE edits (``../shared/data/zsre/zsre_mend_train-1k.json``)
with the editor's defaults (a 100-request first turn takes the lifelong-stream preset: the
paper's fixed step on ``layers.18..22.mlp.up_proj``). Then ``export_patch`` and
``export_lora`` at rank None (exact) and 16, 64, 256; each adapter is loaded with PEFT onto
the unedited model and scored (teacher-forced and generation-based) on a fixed sample of the
edited requests, beside the edited model itself.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from ultraedit_fast import UltraEditor, capture_baseline, evaluate  # noqa: E402
from ultraedit_fast.data.datasets import load_requests  # noqa: E402
from ultraedit_fast.utils.environment import environment  # noqa: E402
from ultraedit_fast.storage.export import load_lora  # noqa: E402
from ultraedit_fast.scoring.generation import spread  # noqa: E402
from ultraedit_fast.model.loading import load_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ZSRE = os.path.join(HERE, "..", "..", "shared", "data", "zsre", "zsre_mend_train-1k.json")
KEYS = ("ES", "GS", "LS_unedited", "ES_gen", "GS_gen", "LS_gen_unedited", "drift_kl", "drift_top1")


def _size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--sample", type=int, default=200)
    p.add_argument("--ranks", default="16,64,256")
    p.add_argument("--output", default=os.path.join(HERE, "results", "export-smollm2-cpu.json"))
    args = p.parse_args(argv)
    if not os.path.exists(ZSRE):
        sys.exit(f"export_smollm2.py: {ZSRE} is absent")
    reqs = list(load_requests(ZSRE))[: 100 * args.turns]
    sample = spread(reqs, args.sample)
    model, tok = load_model("smollm2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = capture_baseline(model, tok, sample)
    ed = UltraEditor(model, tok)
    t0 = time.perf_counter()
    for t in range(args.turns):
        ed.edit(reqs[100 * t : 100 * (t + 1)])
    edit_s = time.perf_counter() - t0
    m = evaluate(model, tok, sample, base=base)
    rows = [{"what": "edited model", "metrics": {k: m[k] for k in KEYS}}]
    print(f"edited: {rows[0]['metrics']}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        ed.export_patch(os.path.join(d, "patch"))
        patch_bytes = _size(os.path.join(d, "patch"))
        edited = {k: v.clone() for k, v in model.state_dict().items()}
        ranks = [None] + [int(r) for r in args.ranks.split(",")]
        for r in ranks:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(edited[k])
            out = os.path.join(d, f"lora-{r}")
            t0 = time.perf_counter()
            rep = ed.export_lora(out, r, base=original)
            export_s = time.perf_counter() - t0
            with torch.no_grad():  # the unedited model, then the adapter on it
                for k, v in model.state_dict().items():
                    v.copy_(original[k])
            peft_model = load_lora(model, out)
            m = evaluate(peft_model, tok, sample, base=base)
            model = peft_model.unload()
            row = {
                "what": f"LoRA rank {r or 'exact'}",
                "rank": rep["rank"],
                "relative_error": rep["relative_error"],
                "bytes": _size(out),
                "export_seconds": export_s,
                "metrics": {k: m[k] for k in KEYS},
            }
            rows.append(row)
            print(
                f"{row['what']}: {row['bytes'] / 2**20:.1f} MiB, max rel. error "
                f"{max(rep['relative_error'].values()):.3g}: {row['metrics']}",
                flush=True,
            )
    res = {
        "schema": "ultraedit_fast.storage.export-bench/1",
        "environment": environment(torch.device("cpu")),
        "turns": args.turns,
        "edits": 100 * args.turns,
        "sample": len(sample),
        "modules": ed.module_names,
        "lr": ed.lr,
        "edit_seconds": edit_s,
        "patch_bytes": patch_bytes,
        "edited_weights_bytes": sum(
            model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size()
            for n in ed.module_names
        ),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"patch {patch_bytes / 2**20:.1f} MiB; json: {args.output}")


if __name__ == "__main__":
    main()
