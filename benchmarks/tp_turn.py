"""Time and communication of a tensor-parallel edit turn on the CPU: one process against two
ranks under torchrun (gloo), the same randomly initialised Llama loaded from disk.

    python benchmarks/tp_turn.py [--output benchmarks/results/tp-turn-cpu.json]

The model has SmolLM2's widths (hidden 576, MLP 1536) but 8 heads (SmolLM2's 9 do not split over
2 ranks), 12 layers and a 16K vocabulary; the editor edits the column-parallel gate/up
projections and the row-parallel down projection of layers 9 and 10, four turns of 100
synthetic requests (zsRE's token-length profile), the paper's fixed step. Measured: each
turn's wall time (the first is a warm-up and is left out of the median) and the bytes each
rank sent into all-reduces. One process runs with 1 and with 2 threads; each rank of the
torchrun job with 1 thread (so both use the machine's 2 cores).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

LAYERS = (9, 10)
MODULES = [
    f"model.layers.{i}.mlp.{p}" for i in LAYERS for p in ("gate_proj", "up_proj", "down_proj")
]
TURNS, PER_TURN = 4, 100


def _save(path):
    import transformers as T
    from ultraedit_fast.bench.workloads import init_random_

    cfg = T.LlamaConfig(
        vocab_size=16384,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    init_random_(model, seed=0)
    model.save_pretrained(path)


def _turns(model):
    """Edit TURNS turns; per turn (seconds, bytes sent, answer tokens)."""
    from ultraedit_fast import UltraEditor
    from ultraedit_fast.bench.workloads import SyntheticTokenizer, synthetic_requests

    tok = SyntheticTokenizer(model.config.vocab_size)
    ed = UltraEditor(model, tok, modules=MODULES, lr=1e-4, batch_size=10, step="paper")
    rows = []
    for t in range(TURNS):
        reqs = synthetic_requests(PER_TURN, seed=100 + t)
        t0 = time.perf_counter()
        r = ed.edit(reqs)
        rows.append(
            {
                "seconds": time.perf_counter() - t0,
                "comm_bytes": r.comm_bytes,
                "n_tokens": r.n_tokens,
                "phases": r.seconds,
            }
        )
    return rows, ed


def worker(path, out):
    """One rank under torchrun."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    model.eval()
    rows, ed = _turns(model)
    kinds = {t.name: t.tp.kind for t in ed.targets}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"turns": rows, "kinds": kinds, "world": dist.get_world_size()}, f)
    dist.barrier()
    dist.destroy_process_group()


def single(path, threads):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    rows, _ = _turns(model)
    return rows


def _summary(rows):
    later = rows[1:]
    return {
        "median_turn_seconds": statistics.median(r["seconds"] for r in later),
        "comm_bytes_per_turn": [r["comm_bytes"] for r in rows],
        "n_tokens": [r["n_tokens"] for r in rows],
        "turns": rows,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--output",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "tp-turn-cpu.json"
        ),
    )
    p.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)
    from ultraedit_fast.utils.environment import environment

    with tempfile.TemporaryDirectory() as d:
        _save(d)
        res = {
            "what": __doc__.strip().splitlines()[0],
            "modules": MODULES,
            "turns": TURNS,
            "requests_per_turn": PER_TURN,
            "environment": environment(torch.device("cpu")),
            "date": time.strftime("%Y-%m-%d"),
        }
        for threads in (1, 2):
            res[f"one_process_{threads}_threads"] = _summary(single(d, threads))
            print(
                f"1 process, {threads} thread(s): "
                f"{res[f'one_process_{threads}_threads']['median_turn_seconds']:.2f} s/turn",
                flush=True,
            )
        out = os.path.join(d, "tp.json")
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node",
                "2",
                os.path.abspath(__file__),
                "--worker",
                d,
                out,
            ],
            check=True,
            env=env,
        )
        with open(out) as f:
            tp = json.load(f)
        res["two_ranks_1_thread_each"] = dict(_summary(tp["turns"]), kinds=tp["kinds"])
        print(
            f"2 ranks x 1 thread: "
            f"{res['two_ranks_1_thread_each']['median_turn_seconds']:.2f} s/turn, "
            f"{res['two_ranks_1_thread_each']['comm_bytes_per_turn']} bytes sent per rank",
            flush=True,
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"json: {args.output}")


if __name__ == "__main__":
    main()
