"""The ``turn`` and ``memory`` cases: whole turns of the fast editor beside the reference and
beside the turn's forward-and-backward floor (and the editors and weight keeping that the
``lifelong`` case, :mod:`.lifelong`, shares)."""

from __future__ import annotations

import gc
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..utils.display import GIB, fmt_ratio, fmt_seconds
from ..editors.ultraedit import UltraEditor
from ..model.forward import input_device, preserved_model_state, supports_packing
from ..editors.reference import ReferenceEditor
from ..model.requests import IGNORE, context_length, make_minibatches
from .instrument import Impl, is_oom, measure, quantile, run_interleaved, sync
from .settings import CARD_USABLE_BYTES, MEMORY_TARGET_BYTES, Settings
from .steps import median_s, peak_of, speedup
from .workloads import PAPER_LABELS, ModelCase, ModelPool


# =============================================================================== the floor
def floor_pass(
    model, tokenizer, requests, modules: Sequence[str], batch_size: int = 10
) -> Dict[str, Any]:
    """One forward and backward per mini-batch of the turn, the backward stopping at the
    output of the lowest edited module: that output is made a leaf that requires grad and
    ``torch.autograd.grad`` of the loss (the editors' loss) is taken with respect to it. No
    parameter requires grad. Returns the seconds of the passes (tokenisation excluded, as
    in ``EditReport.total_seconds``) and the answer-token count."""
    device = input_device(model)
    batches = make_minibatches(tokenizer, requests, batch_size, context_length(model))
    state: Dict[str, Any] = {"leaf": None}

    def hook(module, args, output):
        if state["leaf"] is None:  # the first edited module to run is the lowest
            leaf = output.detach().requires_grad_(True)
            state["leaf"] = leaf
            return leaf
        return None

    handles = [model.get_submodule(n).register_forward_hook(hook) for n in modules]
    n_tokens = 0
    sync(device)
    t0 = time.perf_counter()
    try:
        with preserved_model_state(model), torch.enable_grad():
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for batch in batches:
                batch = batch.to(device)
                mask = batch.labels != IGNORE
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
                loss = F.cross_entropy(logits[mask].float(), batch.labels[mask])
                (g,) = torch.autograd.grad(loss, [state["leaf"]])
                n_tokens += int(mask.sum())
                state["leaf"] = None
                del logits, loss, g
        sync(device)
    finally:
        for h in handles:
            h.remove()
    return {"seconds": time.perf_counter() - t0, "n_tokens": n_tokens}


def make_editors(mc: ModelCase, **options):
    """The fast editor (with the run's ``options``; the published step unless they say
    otherwise, so that both editors do the same work) and the reference on ``mc``'s model,
    its modules and lr."""
    options.setdefault("step", "paper")
    gc.collect()  # the previous case's editors of this model, so that only one is live
    fast = UltraEditor(mc.model, mc.tokenizer, modules=mc.modules, lr=mc.lr, **options)
    ref = ReferenceEditor(mc.model, mc.tokenizer, modules=mc.modules, lr=mc.lr)
    return fast, ref


class WeightKeeper:
    """Host copies of the edited weights, to put them back between runs (host memory, so
    that GPU peaks are the editors' own)."""

    def __init__(self, model, modules: Sequence[str]):
        self.params = [model.get_submodule(n).weight for n in modules]
        self.saved = [p.detach().to("cpu", copy=True) for p in self.params]

    @torch.no_grad()
    def restore(self, *_):
        for p, s in zip(self.params, self.saved):
            p.copy_(s)  # host to device, no temporary on the device

    @torch.no_grad()
    def rel_shift(self) -> List[torch.Tensor]:
        return [p.detach().float().cpu() - s.float() for p, s in zip(self.params, self.saved)]


class ShiftComparison:
    """The weight shift of each editor's first run (both start from the same weights), to
    check that the two make the same edit; then the weights are put back.

    Comparing the two editors' shifts holds two fp32 copies of every edited weight on the
    host: fine beside a GPU, too much beside a 7B model in a small machine's memory."""

    def __init__(self, s: Settings, keeper: WeightKeeper):
        self.keeper = keeper
        self.shifts: Dict[str, List[torch.Tensor]] = {}
        self.bytes = 2 * 4 * sum(p.numel() for p in keeper.params)
        self.enabled = s.device.type == "cuda" or self.bytes <= 2 * GIB

    def after(self, tag: str) -> Callable[[Any], None]:
        """The ``Impl.after`` of editor ``tag``: keep its first shift, restore the weights."""

        def f(_):
            if self.enabled and tag not in self.shifts:
                self.shifts[tag] = self.keeper.rel_shift()
            self.keeper.restore()

        return f

    def max_rel_diff(self) -> Optional[float]:
        """The largest relative difference of the two editors' shifts over the modules."""
        if "fast" not in self.shifts or "reference" not in self.shifts:
            return None
        rels = []
        for a, b in zip(self.shifts["fast"], self.shifts["reference"]):
            nb = b.norm().item()
            rels.append((a - b).norm().item() / nb if nb > 0 else float("nan"))
        return max(rels) if rels else None

    def skipped_note(self) -> Dict[str, str]:
        return (
            {}
            if self.enabled
            else {
                "shift_compare_skipped": f"two fp32 copies of the edited weights "
                f"({self.bytes / GIB:.1f} GiB) would not fit"
            }
        )


def turn_impls(
    mc: ModelCase, fast, ref, requests, shifts: ShiftComparison, with_floor: bool, track_alloc: bool
) -> Dict[str, Impl]:
    """What a turn case times: the floor (optional), the fast editor and the reference,
    each editor's turn scored by ``EditReport.total_seconds``."""
    modules = list(fast.module_names)
    total = lambda rep: rep.total_seconds  # noqa: E731
    impls: Dict[str, Impl] = {}
    if with_floor:
        impls["floor"] = Impl(
            lambda: floor_pass(mc.model, mc.tokenizer, requests, modules, fast.batch_size),
            seconds_of=lambda r: r["seconds"],
            keep=True,
        )
    impls["fast"] = Impl(
        lambda: fast.edit(requests),
        total,
        shifts.after("fast"),
        keep=True,
        always_warm_up=track_alloc,
    )
    impls["reference"] = Impl(
        lambda: ref.edit(requests), total, shifts.after("reference"), keep=True
    )
    return impls


def phase_medians(reports: List[Any]) -> Dict[str, float]:
    """The median seconds of each phase over the fast editor's ``EditReport``s."""
    if not reports:
        return {}
    return {ph: quantile([r.seconds[ph] for r in reports], 0.5) for ph in reports[0].seconds}


def turn_row(
    mc: ModelCase,
    fast,
    requests,
    n_tokens: Optional[int],
    summ: Dict[str, Dict[str, Any]],
    phases: Dict[str, float],
    shifts: ShiftComparison,
) -> Dict[str, Any]:
    """The turn case's row of one model, without the floor's ratios."""
    return {
        "model": mc.name,
        "description": mc.description,
        "data": mc.data,
        "modules": list(fast.module_names),
        "lr": fast.lr,
        "backend": fast.backend,
        "n_requests": len(requests),
        "n_tokens": n_tokens,
        "transactional": fast.transactional,
        "tokens_per_pass": fast.tokens_per_pass,
        "packed": bool(fast.tokens_per_pass) and supports_packing(mc.model),
        "dtype": str(next(mc.model.parameters()).dtype).replace("torch.", ""),
        "weights_bytes": mc.weights_bytes,
        **({"tied_layers": mc.tied_layers} if mc.tied_layers else {}),
        "fast": summ["fast"],
        "reference": summ["reference"],
        "fast_phases_median_s": phases,
        "speedup": speedup(median_s(summ["reference"]), median_s(summ["fast"])),
        "shift_rel_diff_fast_vs_reference": shifts.max_rel_diff(),
        **shifts.skipped_note(),
        "seconds_note": "seconds = EditReport.total_seconds (tokenisation excluded); wall_s includes it",
    }


def add_floor_ratios(row: Dict[str, Any], floor: Dict[str, Any]) -> None:
    """Each editor's time over the floor's, and the speedup of the time above the floor."""
    f_med, r_med = median_s(row["fast"]), median_s(row["reference"])
    fl_med = median_s(floor)
    row["floor"] = floor
    row["fast_over_floor"] = f_med / fl_med if f_med and fl_med else None
    row["reference_over_floor"] = r_med / fl_med if r_med and fl_med else None
    if f_med and r_med and fl_med and f_med > fl_med:
        row["overhead_speedup"] = (r_med - fl_med) / (f_med - fl_med)


def turn_one_model(
    s: Settings, mc: ModelCase, repeats: int, with_floor: bool, log=print, track_alloc: bool = False
) -> Dict[str, Any]:
    fast, ref = make_editors(mc, **s.editor_options)
    keeper = WeightKeeper(mc.model, list(fast.module_names))
    requests = mc.requests(0, n=s.edits, seed=s.seed)
    shifts = ShiftComparison(s, keeper)
    impls = turn_impls(mc, fast, ref, requests, shifts, with_floor, track_alloc)
    res = run_interleaved(
        impls,
        s.device,
        repeats=repeats,
        slow_s=s.slow_s,
        impl_budget_s=s.impl_budget_s,
        deadline=s.deadline,
        track_alloc=track_alloc,
    )
    summ = {k: v.summary() for k, v in res.items()}
    fast_reports = res["fast"].values
    phases = phase_medians(fast_reports)
    n_tokens = fast_reports[0].n_tokens if fast_reports else None
    row = turn_row(mc, fast, requests, n_tokens, summ, phases, shifts)
    if "floor" in summ:
        add_floor_ratios(row, summ["floor"])
    if s.device.type == "cuda" and mc.name in PAPER_LABELS:
        row["fast_on_24gb_card"] = fits_card(s, fast, requests, keeper)
    fl_med = median_s(summ["floor"]) if "floor" in summ else None
    log(
        f"[turn] {mc.name}: {n_tokens} answer tokens; floor {fmt_seconds(fl_med)}, fast "
        f"{fmt_seconds(median_s(summ['fast']))} "
        f"({', '.join(f'{k} {fmt_seconds(v)}' for k, v in phases.items())}), "
        f"reference {fmt_seconds(median_s(summ['reference']))}, x{fmt_ratio(row['speedup'])}"
    )
    keeper.restore()
    return row


def fits_card(s: Settings, fast, requests, keeper: "WeightKeeper") -> Dict[str, Any]:
    """One more fast turn with this process's CUDA allocator capped
    (``torch.cuda.set_per_process_memory_fraction``) to what a 24 GB card leaves after
    the CUDA context: does the turn run there, weights included?"""
    dev = s.device
    total = torch.cuda.get_device_properties(dev).total_memory
    gc.collect()
    torch.cuda.empty_cache()
    frac = min(1.0, CARD_USABLE_BYTES / total)
    out: Dict[str, Any] = {"cap_bytes": int(frac * total), "cap_fraction": frac}
    torch.cuda.set_per_process_memory_fraction(frac, dev)
    try:
        rep, m = measure(lambda: fast.edit(requests), dev, nvml_sampling=False)
        out.update(
            ok=True,
            seconds=rep.total_seconds,
            peak_allocated_bytes=m["cuda_peak_allocated_bytes"],
            peak_reserved_bytes=m["cuda_peak_reserved_bytes"],
        )
    except Exception as e:  # noqa: BLE001
        out.update(
            ok=False,
            error=(
                f"out of memory: {str(e)[:300]}"
                if is_oom(e)
                else f"{type(e).__name__}: {str(e)[:300]}"
            ),
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        keeper.restore()
        gc.collect()
        torch.cuda.empty_cache()
    return out


def memory_row(s: Settings, turn_row: Dict[str, Any], source: str) -> Dict[str, Any]:
    cuda = s.device.type == "cuda"
    f, r = turn_row["fast"], turn_row["reference"]
    row = {
        "model": turn_row["model"],
        "description": turn_row["description"],
        "dtype": turn_row["dtype"],
        "weights_bytes": turn_row["weights_bytes"],
        "modules": turn_row["modules"],
        "source": source,
        **({"tied_layers": turn_row["tied_layers"]} if "tied_layers" in turn_row else {}),
        "kind": "cuda_peak_allocated (weights included)"
        if cuda
        else "peak RSS increase over the RSS before the turn",
    }
    row["fast_peak_bytes"] = peak_of(f, s.device)
    row["reference_peak_bytes"] = peak_of(r, s.device)
    if "error" in r:
        row["reference_error"] = r["error"].splitlines()[0]
    if "error" in f:
        row["fast_error"] = f["error"].splitlines()[0]
    if cuda:
        row["fast_peak_reserved_bytes"] = f.get("cuda_peak_reserved_bytes")
        row["reference_peak_reserved_bytes"] = r.get("cuda_peak_reserved_bytes")
        row["fast_nvml_mem_used_max_bytes"] = f.get("nvml", {}).get("mem_used_bytes_max")
        row["reference_nvml_mem_used_max_bytes"] = r.get("nvml", {}).get("mem_used_bytes_max")
        row["target_bytes"] = MEMORY_TARGET_BYTES
        row["fast_on_24gb_card"] = turn_row.get("fast_on_24gb_card")
        if row["fast_peak_bytes"] is not None:
            row["fast_within_target"] = row["fast_peak_bytes"] <= MEMORY_TARGET_BYTES
        if row["reference_peak_bytes"] is not None:
            row["reference_within_target"] = row["reference_peak_bytes"] <= MEMORY_TARGET_BYTES
    else:
        row["fast_peak_rss_bytes"] = f.get("peak_rss_bytes")
        row["reference_peak_rss_bytes"] = r.get("peak_rss_bytes")
        fa, ra = f.get("cpu_peak_alloc_increase_bytes"), r.get("cpu_peak_alloc_increase_bytes")
        if fa is not None or ra is not None:
            # The CPU's stand-in for CUDA's peak allocated: weights plus the peak of what
            # the turn itself allocated through torch's allocator (cpu_alloc_peak).
            w = turn_row["weights_bytes"]
            row["kind"] = (
                "weights + peak of the turn's live torch CPU allocations "
                "(profiler accounting; stands in for cuda_peak_allocated)"
            )
            row["fast_peak_rss_increase_bytes"] = row["fast_peak_bytes"]
            row["reference_peak_rss_increase_bytes"] = row["reference_peak_bytes"]
            row["fast_peak_bytes"] = w + fa if fa is not None else None
            row["reference_peak_bytes"] = w + ra if ra is not None else None
            row["fast_turn_alloc_peak_bytes"], row["reference_turn_alloc_peak_bytes"] = fa, ra
            if turn_row["model"] in PAPER_LABELS:
                row["target_bytes"] = MEMORY_TARGET_BYTES
                for k in ("fast", "reference"):
                    if row[f"{k}_peak_bytes"] is not None:
                        row[f"{k}_within_target"] = row[f"{k}_peak_bytes"] <= MEMORY_TARGET_BYTES
    if row["fast_peak_bytes"] and row["reference_peak_bytes"]:
        row["reference_over_fast"] = row["reference_peak_bytes"] / row["fast_peak_bytes"]
    return row


def case_turn_and_memory(
    s: Settings,
    pool: ModelPool,
    log=print,
    on_model: Optional[Callable[[List[Dict], List[Dict]], None]] = None,
) -> Tuple[List[Dict], List[Dict]]:
    """The ``turn`` case (and ``memory``, from the same runs) per model; ``memory`` alone
    runs one turn of each editor per model. ``on_model(turns, mems)`` after each model
    (to save the rows so far)."""
    do_turn, do_mem = "turn" in s.cases, "memory" in s.cases
    names = s.models if do_turn else []
    names += [m for m in s.memory_models if do_mem and m not in names]
    turns, mems = [], []
    for name in names:
        if s.out_of_time(margin=30):
            (turns if name in s.models and do_turn else mems).append(
                {"model": name, "skipped": "time budget"}
            )
            continue
        mc = None  # let the pool free the previous model before it builds this one
        try:
            mc = pool.get(
                name,
                keep_others=[s.lifelong_model]
                if "lifelong" in s.cases and s.device.type == "cpu"
                else [],
            )
        except Exception as e:  # noqa: BLE001
            log(f"[turn] {name}: skipped: {e}")
            err = {"model": name, "skipped": f"{type(e).__name__}: {e}"}
            if do_turn and name in s.models:
                turns.append(err)
            if do_mem and name in s.memory_models:
                mems.append(dict(err))
            continue
        try:
            if do_turn and name in s.models:
                row = turn_one_model(s, mc, s.repeats, True, log)
                row["build_seconds"] = pool.build_seconds.get(name)
                turns.append(row)
                if do_mem and name in s.memory_models:
                    mems.append(memory_row(s, row, "the turn case's runs"))
            else:  # memory only: one run of each, after a warm-up
                row = turn_one_model(s, mc, 1, False, log, track_alloc=s.device.type == "cpu")
                mems.append(memory_row(s, row, "one turn of each editor"))
        except Exception as e:  # noqa: BLE001
            log(f"[turn] {name}: failed: {type(e).__name__}: {e}")
            turns.append({"model": name, "error": traceback.format_exc(limit=8)})
        if on_model is not None:
            on_model(turns, mems)
    return turns, mems
