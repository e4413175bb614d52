"""One rank of a tensor-parallel edit (run by tests/parallel/test_tp.py under torchrun): load the model
saved at argv[1] with tp_plan="auto", edit it 3 turns, and write the gathered edited weights,
the gathered normaliser states and what each turn communicated to argv[2] (rank 0)."""

import json
import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # conftest.py

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from conftest import ToyTokenizer, random_requests  # noqa: E402
from ultraedit_fast import UltraEditor  # noqa: E402

path, out, modules, mode = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
model.eval()
rank, world = dist.get_rank(), dist.get_world_size()
options = dict(
    modules=modules,
    lr=float(os.environ.get("TP_LR", "1e-3")),
    batch_size=4,
    undo=True,
    tokens_per_pass=0,
)
if mode == "auto":  # the facts regime's machinery: step search and preserved locality keys
    options.update(step="auto")
ed = UltraEditor(model, ToyTokenizer(), **options)
reports = []
for t in range(3):
    reports.append(ed.edit(random_requests(10, seed=t)))
if mode == "checkpoint":  # save per rank, load into a fresh editor, roll back one turn
    ed.save(os.path.join(out, "ckpt"))
    ed = UltraEditor.load(os.path.join(out, "ckpt"), model, ToyTokenizer())
    ed.rollback(1)


def gather_state(state, target):
    """The whole normaliser vector: [k part, g part], each gathered where it is sharded."""
    d_in, d_out = target.local_shape
    parts = [state.mean, state.acc, state.std]
    out = []
    for v in parts:
        k, g = v[:d_in], v[d_in:]
        if target.tp.kind == "row":
            ks = [torch.empty_like(k) for _ in range(world)]
            dist.all_gather(ks, k.contiguous())
            k = torch.cat(ks)
        if target.tp.kind == "col":
            gs = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(gs, g.contiguous())
            g = torch.cat(gs)
        out.append(torch.cat([k, g]))
    return out


weights = {n: model.get_submodule(n).weight.full_tensor() for n in modules}
states = {}
for key, state in ed.normalizers.items():
    t = next(t for t in ed.targets if ed.normalizer_key(t) == key)
    states[str(key)] = [x.tolist() for x in gather_state(state, t)] + [state.n]
if rank == 0:
    torch.save(weights, os.path.join(out, "weights.pt"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(
            {
                "states": states,
                "turns": ed.turns,
                "comm_bytes": [r.comm_bytes for r in reports],
                "seconds": [r.total_seconds for r in reports],
                "step": [r.step_scale for r in reports],
                "kinds": {t.name: t.tp.kind for t in ed.targets},
            },
            f,
        )
dist.barrier()
dist.destroy_process_group()
# Leave without the interpreter's teardown: once in a while a gloo thread still joinable
# there aborts the process ("terminate called without an active exception") after every
# result above was written and the group destroyed.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
