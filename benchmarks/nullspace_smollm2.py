"""Is there a null space to project edits into? The spectrum of general-text keys at the
modules SmolLM2's presets edit.

    python benchmarks/nullspace_smollm2.py [--output benchmarks/results/nullspace-smollm2-cpu.json]

AlphaEdit projects each update onto the null space of preserved keys: the eigenvectors of
their (uncentred) second moment whose eigenvalues fall below a threshold (2e-2 in its code,
for LLaMA-3-8B's down_proj inputs, 14336 wide). An update confined there leaves those keys'
outputs unchanged. This script takes 4096 keys of held-out general text (the Lee news
corpus, ``../shared/data/general``) at each module of SmolLM2's facts and stream presets and
at the down_proj of the same layers, and counts the eigenvalues of ``K^T K / n`` below
AlphaEdit's absolute threshold and below 1e-4 / 1e-3 of the largest: the room a projection
would leave.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from ultraedit_fast.core.presets import resolve_edit_config  # noqa: E402
from ultraedit_fast.core.preserve import GeneralKeys  # noqa: E402
from ultraedit_fast.model.loading import load_model  # noqa: E402
from ultraedit_fast.model.targets import resolve_targets  # noqa: E402
from ultraedit_fast.utils.environment import environment  # noqa: E402
from ultraedit_fast.utils.files import atomic_write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GENERAL = os.path.join(HERE, "..", "..", "shared", "data", "general", "lee_background.txt")


def spectrum(k: torch.Tensor) -> dict:
    mom2 = (k.double().t() @ k.double()) / k.shape[0]
    ev = torch.linalg.eigvalsh(mom2).clamp_min(0)
    top = float(ev.max())
    return {
        "d_in": k.shape[1],
        "largest": top,
        "below_2e-2": int((ev < 2e-2).sum()),
        "below_1e-3_of_largest": int((ev < 1e-3 * top).sum()),
        "below_1e-4_of_largest": int((ev < 1e-4 * top).sum()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--output", default=os.path.join(HERE, "results", "nullspace-smollm2-cpu.json"))
    args = p.parse_args(argv)
    if not os.path.exists(GENERAL):
        raise SystemExit(f"{GENERAL} is absent (../shared/data): nothing to measure")
    model, tok = load_model("smollm2")
    names = []
    for regime in ("facts", "stream"):
        names += resolve_edit_config(model, None, None, regime).modules
    names += sorted({n.rsplit(".", 1)[0] + ".down_proj" for n in names if "mlp" in n})
    names = list(dict.fromkeys(names))
    keys = GeneralKeys(tok, args.rows, GENERAL).keys(model, resolve_targets(model, names))
    doc = {
        "schema": "ultraedit_fast.nullspace/1",
        "environment": environment("cpu"),
        "general_text": "../shared/data/general/lee_background.txt",
        "rows": args.rows,
        "modules": {n: spectrum(keys[n]) for n in names},
    }
    atomic_write_json(args.output, doc)
    for n, s in doc["modules"].items():
        print(n, s)


if __name__ == "__main__":
    main()
