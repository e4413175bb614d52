"""The ``steps`` case: the four steps of one module's turn at the real shapes of the paper's
edited layers, fast beside reference."""
from __future__ import annotations

import gc
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..editors import reference
from ..utils.display import fmt_ratio, fmt_seconds
from ..kernels import resolve_backend
from ..core.solve import ShiftSolver
from .instrument import Impl, run_interleaved
from .settings import STEP_BLOCKS, STEP_TOKENS, Settings

STEP_SHAPES: List[Tuple[str, str, int, int]] = [
    # key, label, d_in, d_out
    ("mistral-7b.down_proj", "Mistral-7B down_proj", 14336, 4096),
    ("llama-3-8b.gate_up_proj", "LLaMA-3-8B gate/up_proj", 4096, 14336),
    ("qwen2.5-7b.gate_up_proj", "Qwen2.5-7B gate/up_proj", 3584, 18944),
    ("smollm2.up_proj", "SmolLM2 up_proj", 576, 1536),
]
TINY_SHAPES = [("tiny.up_proj", "tiny up_proj", 64, 160)]
STEP_OPS = ("normalizer", "shift_values", "solve", "weight_update")


def step_callables(d_in: int, d_out: int, device, dtype, n_tokens: int = STEP_TOKENS,
                   blocks: int = STEP_BLOCKS, backend: Optional[str] = None, seed: int = 0,
                   lr: float = 1e-6) -> Dict[str, Dict[str, Callable[[], Any]]]:
    """``{op: {"fast": fn, "reference": fn}}`` for the four steps of one module's turn at
    shape ``(d_in, d_out)`` with ``n_tokens`` rows in ``blocks`` mini-batch blocks. Each side
    gets its inputs as its editor holds them: the fast editor keeps keys and gradients in the
    model's ``dtype`` (fp32 keys for the solve), the reference casts them to fp32 at capture;
    ``W`` (``d_out x d_in``) is in ``dtype``."""
    device = torch.device(device)
    be = resolve_backend(backend, device)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, loc=0.0):
        return (torch.randn(*shape, generator=gen) * scale + loc).to(device)

    k32 = rand(n_tokens, d_in, loc=0.1)
    g32 = rand(n_tokens, d_out, scale=1e-3)
    k_lo, g_lo = k32.to(dtype), g32.to(dtype)
    edges = [round(i * n_tokens / blocks) for i in range(blocks + 1)]
    ks_lo = [k_lo[a:b] for a, b in zip(edges, edges[1:])]
    gs_lo = [g_lo[a:b] for a, b in zip(edges, edges[1:])]
    ks32 = [k32[a:b] for a, b in zip(edges, edges[1:])]
    gs32 = [g32[a:b] for a, b in zip(edges, edges[1:])]
    d = d_in + d_out
    # a lifelong state that has seen some turns already
    n0 = 10 * n_tokens
    mean0 = torch.cat([k32.mean(0), g32.mean(0)])
    acc0 = torch.cat([k32.var(0), g32.var(0)]) * n0
    std0 = torch.sqrt(acc0 / (n0 - 1))
    st_fast = [mean0.clone(), acc0.clone(), std0.clone()]
    st_ref = [mean0.clone(), acc0.clone(), std0.clone()]
    assert st_fast[0].shape == (d,)
    v = reference.shift_values(k32, g32, mean0, std0, lr)
    w_fast = rand(d_out, d_in, scale=0.02).to(dtype)
    w_ref = w_fast.clone()
    # the reference's Delta (d_in x d_out fp32) as its solve leaves it; its values do not
    # matter to the time of the add
    delta = rand(d_in, d_out, scale=1e-6)
    solver = ShiftSolver(k32)
    a, kk = solver.factors(v)

    def norm_fast():
        be.normalizer_update_(st_fast[0], st_fast[1], st_fast[2], ks_lo, gs_lo, n0)

    def norm_ref():
        n = n0
        for k, g in zip(ks32, gs32):
            n = reference.normalizer_merge(st_ref[0], st_ref[1], st_ref[2], n,
                                           torch.cat([k, g], dim=1))

    def shift_fast():
        return be.shift_values(k32, g_lo, mean0, std0, lr)

    def shift_ref():
        return reference.shift_values(k32, g32, mean0, std0, lr)

    def solve_fast():
        return ShiftSolver(k32).factors(v)

    def solve_ref():
        return reference.primal_shift(k32, v)

    def update_fast():
        be.rank_update_(w_fast, a, kk, False)

    def update_ref():
        w_ref.copy_((w_ref.float() + delta.t()).to(w_ref.dtype))

    return {"normalizer": {"fast": norm_fast, "reference": norm_ref},
            "shift_values": {"fast": shift_fast, "reference": shift_ref},
            "solve": {"fast": solve_fast, "reference": solve_ref},
            "weight_update": {"fast": update_fast, "reference": update_ref}}



def speedup(ref: Optional[float], fast: Optional[float]) -> Optional[float]:
    return ref / fast if ref and fast else None


def median_s(summary: Dict[str, Any]) -> Optional[float]:
    return summary.get("seconds", {}).get("median")


def peak_of(summary: Dict[str, Any], device) -> Optional[int]:
    """The peak memory of a summary: CUDA peak allocated, or the CPU's peak RSS increase."""
    if torch.device(device).type == "cuda":
        return summary.get("cuda_peak_allocated_bytes")
    return summary.get("peak_rss_increase_bytes")


def case_steps(s: Settings, log=print) -> List[Dict[str, Any]]:
    out = []
    for key, label, d_in, d_out in s.step_shapes:
        if s.out_of_time():
            out.append({"shape": key, "skipped": "time budget"})
            continue
        log(f"[steps] {label}: d_in {d_in}, d_out {d_out}, N {STEP_TOKENS}")
        try:
            calls = step_callables(d_in, d_out, s.device, s.dtype, backend=s.backend,
                                   seed=s.seed)
        except Exception as e:  # noqa: BLE001
            out.append({"shape": key, "label": label, "error": f"{type(e).__name__}: {e}"})
            continue
        for op in STEP_OPS:
            impls = {name: Impl(fn) for name, fn in calls[op].items()}
            res = run_interleaved(impls, s.device, repeats=s.step_repeats, slow_s=s.slow_s,
                                  impl_budget_s=s.impl_budget_s, nvml_sampling=False,
                                  deadline=s.deadline)
            fast, ref = res["fast"].summary(), res["reference"].summary()
            row = {"shape": key, "label": label, "d_in": d_in, "d_out": d_out,
                   "n_tokens": STEP_TOKENS, "op": op, "dtype": str(s.dtype).replace("torch.", ""),
                   "fast": fast, "reference": ref, "speedup": speedup(median_s(ref), median_s(fast))}
            out.append(row)
            log(f"    {op:14s} fast {fmt_seconds(median_s(fast))}  reference {fmt_seconds(median_s(ref))}  "
                f"x{fmt_ratio(row['speedup'])}")
        del calls
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    return out
