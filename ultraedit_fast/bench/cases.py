"""The ``turn``, ``memory`` and ``lifelong`` cases: whole turns of the fast editor beside the
reference and beside the turn's forward-and-backward floor."""
from __future__ import annotations

import gc
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..utils.display import GIB, fmt_ratio, fmt_seconds
from ..editors.ultraedit import EditRefused, UltraEditor
from ..model.forward import preserved_model_state, supports_packing
from ..editors.reference import ReferenceEditor
from ..model.requests import IGNORE, context_length, make_minibatches
from .instrument import Impl, is_oom, measure, quantile, run_interleaved, sync, times_summary
from .settings import CARD_USABLE_BYTES, MEMORY_TARGET_BYTES, Settings
from .steps import median_s, peak_of, speedup
from .workloads import PAPER_LABELS, ModelCase, ModelPool


# =============================================================================== the floor
def floor_pass(model, tokenizer, requests, modules: Sequence[str], batch_size: int = 10
               ) -> Dict[str, Any]:
    """One forward and backward per mini-batch of the turn, the backward stopping at the
    output of the lowest edited module: that output is made a leaf that requires grad and
    ``torch.autograd.grad`` of the loss (the editors' loss) is taken with respect to it. No
    parameter requires grad. Returns the seconds of the passes (tokenisation excluded, as
    in ``EditReport.total_seconds``) and the answer-token count."""
    device = model.get_input_embeddings().weight.device
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
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               use_cache=False).logits
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


def turn_one_model(s: Settings, mc: ModelCase, repeats: int, with_floor: bool, log=print,
                    track_alloc: bool = False) -> Dict[str, Any]:
    fast, ref = make_editors(mc, **s.editor_options)
    modules = list(fast.module_names)
    keeper = WeightKeeper(mc.model, modules)
    requests = mc.requests(0, n=s.edits, seed=s.seed)
    shifts: Dict[str, List[torch.Tensor]] = {}
    # Comparing the two editors' shifts holds two fp32 copies of every edited weight on the
    # host: fine beside a GPU, too much beside a 7B model in a small machine's memory.
    shift_bytes = 2 * 4 * sum(p.numel() for p in keeper.params)
    compare_shifts = s.device.type == "cuda" or shift_bytes <= 2 * GIB

    def after(tag):
        def f(_):
            if compare_shifts and tag not in shifts:  # the first run of each editor
                shifts[tag] = keeper.rel_shift()      # starts from the same model
            keeper.restore()
        return f

    total = lambda rep: rep.total_seconds  # noqa: E731
    impls: Dict[str, Impl] = {}
    if with_floor:
        impls["floor"] = Impl(lambda: floor_pass(mc.model, mc.tokenizer, requests, modules,
                                                 fast.batch_size),
                              seconds_of=lambda r: r["seconds"], keep=True)
    impls["fast"] = Impl(lambda: fast.edit(requests), total, after("fast"), keep=True,
                         always_warm_up=track_alloc)
    impls["reference"] = Impl(lambda: ref.edit(requests), total, after("reference"), keep=True)
    res = run_interleaved(impls, s.device, repeats=repeats, slow_s=s.slow_s,
                          impl_budget_s=s.impl_budget_s, deadline=s.deadline,
                          track_alloc=track_alloc)
    summ = {k: v.summary() for k, v in res.items()}
    fast_reports = res["fast"].values
    phases = {}
    if fast_reports:
        for ph in fast_reports[0].seconds:
            phases[ph] = quantile([r.seconds[ph] for r in fast_reports], 0.5)
    n_tokens = fast_reports[0].n_tokens if fast_reports else None
    agree = None
    if "fast" in shifts and "reference" in shifts:
        rels = []
        for a, b in zip(shifts["fast"], shifts["reference"]):
            nb = b.norm().item()
            rels.append((a - b).norm().item() / nb if nb > 0 else float("nan"))
        agree = max(rels) if rels else None
    f_med, r_med = median_s(summ["fast"]), median_s(summ["reference"])
    fl_med = median_s(summ["floor"]) if "floor" in summ else None
    row = {
        "model": mc.name, "description": mc.description, "data": mc.data,
        "modules": modules, "lr": fast.lr, "backend": fast.backend,
        "n_requests": len(requests), "n_tokens": n_tokens,
        "transactional": fast.transactional,
        "tokens_per_pass": fast.tokens_per_pass,
        "packed": bool(fast.tokens_per_pass) and supports_packing(mc.model),
        "dtype": str(next(mc.model.parameters()).dtype).replace("torch.", ""),
        "weights_bytes": mc.weights_bytes,
        **({"tied_layers": mc.tied_layers} if mc.tied_layers else {}),
        "fast": summ["fast"], "reference": summ["reference"],
        "fast_phases_median_s": phases,
        "speedup": speedup(r_med, f_med),
        "shift_rel_diff_fast_vs_reference": agree,
        **({} if compare_shifts else {"shift_compare_skipped":
                                      f"two fp32 copies of the edited weights "
                                      f"({shift_bytes / GIB:.1f} GiB) would not fit"}),
        "seconds_note": "seconds = EditReport.total_seconds (tokenisation excluded); wall_s "
                        "includes it",
    }
    if "floor" in summ:
        row["floor"] = summ["floor"]
        row["fast_over_floor"] = f_med / fl_med if f_med and fl_med else None
        row["reference_over_floor"] = r_med / fl_med if r_med and fl_med else None
        if f_med and r_med and fl_med and f_med > fl_med:
            row["overhead_speedup"] = (r_med - fl_med) / (f_med - fl_med)
    if s.device.type == "cuda" and mc.name in PAPER_LABELS:
        row["fast_on_24gb_card"] = fits_card(s, fast, requests, keeper)
    log(f"[turn] {mc.name}: {n_tokens} answer tokens; floor {fmt_seconds(fl_med)}, fast "
        f"{fmt_seconds(f_med)} ({', '.join(f'{k} {fmt_seconds(v)}' for k, v in phases.items())}), "
        f"reference {fmt_seconds(r_med)}, x{fmt_ratio(row['speedup'])}")
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
        out.update(ok=True, seconds=rep.total_seconds,
                   peak_allocated_bytes=m["cuda_peak_allocated_bytes"],
                   peak_reserved_bytes=m["cuda_peak_reserved_bytes"])
    except Exception as e:  # noqa: BLE001
        out.update(ok=False, error=(f"out of memory: {str(e)[:300]}" if is_oom(e)
                                    else f"{type(e).__name__}: {str(e)[:300]}"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        keeper.restore()
        gc.collect()
        torch.cuda.empty_cache()
    return out


def memory_row(s: Settings, turn_row: Dict[str, Any], source: str) -> Dict[str, Any]:
    cuda = s.device.type == "cuda"
    f, r = turn_row["fast"], turn_row["reference"]
    row = {"model": turn_row["model"], "description": turn_row["description"],
           "dtype": turn_row["dtype"], "weights_bytes": turn_row["weights_bytes"],
           "modules": turn_row["modules"], "source": source,
           **({"tied_layers": turn_row["tied_layers"]} if "tied_layers" in turn_row else {}),
           "kind": "cuda_peak_allocated (weights included)" if cuda
           else "peak RSS increase over the RSS before the turn"}
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
            row["kind"] = ("weights + peak of the turn's live torch CPU allocations "
                           "(profiler accounting; stands in for cuda_peak_allocated)")
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


def case_turn_and_memory(s: Settings, pool: ModelPool, log=print,
                         on_model: Optional[Callable[[List[Dict], List[Dict]], None]] = None
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
                {"model": name, "skipped": "time budget"})
            continue
        mc = None  # let the pool free the previous model before it builds this one
        try:
            mc = pool.get(name, keep_others=[s.lifelong_model] if "lifelong" in s.cases
                          and s.device.type == "cpu" else [])
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
                row = turn_one_model(s, mc, 1, False, log,
                                      track_alloc=s.device.type == "cpu")
                mems.append(memory_row(s, row, "one turn of each editor"))
        except Exception as e:  # noqa: BLE001
            log(f"[turn] {name}: failed: {type(e).__name__}: {e}")
            turns.append({"model": name, "error": traceback.format_exc(limit=8)})
        if on_model is not None:
            on_model(turns, mems)
    return turns, mems


def drift(times: List[float]) -> Dict[str, Any]:
    """Flatness of per-turn times: least-squares slope (s/turn and relative to the mean over
    the whole run) and the mean of the last 5 turns over the mean of turns 2..6."""
    out: Dict[str, Any] = {}
    xs = list(range(1, len(times) + 1))
    if len(times) >= 3:
        body = times[1:]  # turn 1 carries one-time costs
        xb = xs[1:]
        mx, my = sum(xb) / len(xb), sum(body) / len(body)
        sxx = sum((x - mx) ** 2 for x in xb)
        slope = sum((x - mx) * (y - my) for x, y in zip(xb, body)) / sxx if sxx else 0.0
        out["slope_s_per_turn"] = slope
        out["relative_change_over_run"] = slope * (len(times) - 1) / my if my else None
    if len(times) >= 11:
        first = times[1:6]
        last = times[-5:]
        out["last5_over_turns2to6"] = (sum(last) / 5) / (sum(first) / 5)
    return out


def case_lifelong(s: Settings, pool: ModelPool, log=print) -> Dict[str, Any]:
    try:
        mc = pool.get(s.lifelong_model)
    except Exception as e:  # noqa: BLE001
        return {"model": s.lifelong_model, "skipped": f"{type(e).__name__}: {e}"}
    fast, ref = make_editors(mc, **s.editor_options)
    keeper = WeightKeeper(mc.model, fast.module_names)
    res: Dict[str, Any] = {"model": mc.name, "description": mc.description, "data": mc.data,
                           "modules": list(fast.module_names), "lr": fast.lr,
                           "backend": fast.backend, "turns_planned": s.lifelong_turns,
                           "edits_per_turn": s.edits}
    if mc.requests_pool:
        res["data_note"] = (f"turn t edits zsRE records 100t..100t+99 modulo "
                            f"{len(mc.requests_pool)}: turns past the file's end re-edit "
                            "earlier records")
    per_turn: List[Dict[str, Any]] = []
    stopped = None
    for t in range(s.lifelong_turns):
        if s.out_of_time(margin=5):
            stopped = f"time budget: stopped after {t} turns"
            break
        reqs = mc.requests(t, n=s.edits, seed=s.seed)
        try:
            rep, m = measure(lambda: fast.edit(reqs), s.device)
        except EditRefused as e:
            per_turn.append({"turn": t + 1, "refused": str(e)})
            continue
        entry = {"turn": t + 1, "seconds": rep.total_seconds, "wall_s": m["wall_s"],
                 "phases": dict(rep.seconds), "n_tokens": rep.n_tokens,
                 "peak_bytes": peak_of({"cuda_peak_allocated_bytes":
                                      m.get("cuda_peak_allocated_bytes"),
                                      "peak_rss_increase_bytes":
                                      m.get("peak_rss_increase_bytes")}, s.device),
                 "cpu_s": m["cpu_s"]}
        if "nvml" in m:
            entry["nvml"] = m["nvml"]
        per_turn.append(entry)
        if (t + 1) % max(1, s.lifelong_turns // 10) == 0:
            log(f"[lifelong] {mc.name}: turn {t + 1}/{s.lifelong_turns}: "
                f"{fmt_seconds(rep.total_seconds)}")
    keeper.restore()
    times = [e["seconds"] for e in per_turn if "seconds" in e]
    peaks = [e["peak_bytes"] for e in per_turn if e.get("peak_bytes") is not None]
    res["fast_peak_bytes_max"] = max(peaks) if peaks else None
    # turn 1 carries one-time allocations (allocator growth, first use of the kernels)
    res["fast_peak_bytes_max_after_turn1"] = max(peaks[1:]) if len(peaks) > 1 else None
    res["fast"] = {"per_turn": per_turn, "turns_done": len(times),
                   "seconds": times_summary(times) if times else None,
                   "total_seconds": sum(times), "drift": drift(times)}
    if stopped:
        res["fast"]["stopped"] = stopped
    # the reference: a few turns of the same sequence, from the same starting weights
    ref_times, ref_peaks = [], []
    ref_err = None
    for t in range(s.ref_turns):
        if s.out_of_time(margin=5):
            break
        reqs = mc.requests(t, n=s.edits, seed=s.seed)
        try:
            rep, m = measure(lambda: ref.edit(reqs), s.device)
        except Exception as e:  # noqa: BLE001
            ref_err = (f"out of memory: {e}" if is_oom(e) else f"{type(e).__name__}: {e}")
            break
        ref_times.append(rep.total_seconds)
        ref_peaks.append(peak_of({"cuda_peak_allocated_bytes": m.get("cuda_peak_allocated_bytes"),
                                "peak_rss_increase_bytes": m.get("peak_rss_increase_bytes")},
                               s.device))
    keeper.restore()
    res["reference"] = {"turns_done": len(ref_times), "per_turn_seconds": ref_times,
                        "peak_bytes": max([p for p in ref_peaks if p is not None], default=None)}
    if ref_err:
        res["reference"]["error"] = ref_err
    if ref_times:
        # turn 1 carries one-time costs: extrapolate from the later turns when there are some
        basis = ref_times[1:] if len(ref_times) > 1 else ref_times
        per = sum(basis) / len(basis)
        res["reference"]["mean_seconds_per_turn"] = per
        res["reference"]["extrapolated_total_seconds"] = per * s.lifelong_turns
        res["reference"]["extrapolation"] = (
            f"{len(ref_times)} reference turns measured; total for {s.lifelong_turns} turns = "
            f"{s.lifelong_turns} x mean of turns {2 if len(ref_times) > 1 else 1}.."
            f"{len(ref_times)} (the reference's turn cost does not grow with turns either: "
            "its state is the same fixed-size normaliser)")
    if times:
        fast_per = (sum(times[1:]) / (len(times) - 1)) if len(times) > 1 else times[0]
        res["fast"]["mean_seconds_per_turn"] = fast_per
        res["fast"]["projected_total_seconds"] = fast_per * s.lifelong_turns
        if ref_times:
            res["speedup_per_turn"] = res["reference"]["mean_seconds_per_turn"] / fast_per
    log(f"[lifelong] {mc.name}: {len(times)} fast turns, mean "
        f"{fmt_seconds(res['fast'].get('mean_seconds_per_turn'))}/turn, drift "
        f"{res['fast']['drift']}; reference {len(ref_times)} turns, "
        f"{fmt_seconds(res['reference'].get('mean_seconds_per_turn'))}/turn")
    return res
