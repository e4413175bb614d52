"""The ``steps`` case: the four steps of one module's turn at the real shapes of the paper's
edited layers, fast beside reference."""

from __future__ import annotations

import gc
from dataclasses import dataclass
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


Pair = Dict[str, Callable[[], Any]]  # {"fast": fn, "reference": fn}


@dataclass
class StepInputs:
    """What one module's turn feeds its four steps: keys and gradients (``N`` rows, fp32
    and in the model's dtype, whole and split into mini-batch blocks) and a lifelong
    normaliser state that has already seen ``n0`` rows."""

    k32: torch.Tensor  # N x d_in
    g32: torch.Tensor  # N x d_out
    g_lo: torch.Tensor  # g32 in the model's dtype
    ks_lo: List[torch.Tensor]  # per block, in the model's dtype
    gs_lo: List[torch.Tensor]
    ks32: List[torch.Tensor]  # per block, fp32
    gs32: List[torch.Tensor]
    n0: int
    mean0: torch.Tensor  # (d_in + d_out,)
    acc0: torch.Tensor
    std0: torch.Tensor


def _randn(gen: torch.Generator, device, *shape, scale=1.0, loc=0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale + loc).to(device)


def step_inputs(
    gen: torch.Generator, device, dtype, d_in: int, d_out: int, n_tokens: int, blocks: int
) -> StepInputs:
    k32 = _randn(gen, device, n_tokens, d_in, loc=0.1)
    g32 = _randn(gen, device, n_tokens, d_out, scale=1e-3)
    k_lo, g_lo = k32.to(dtype), g32.to(dtype)
    edges = [round(i * n_tokens / blocks) for i in range(blocks + 1)]
    split = lambda t: [t[a:b] for a, b in zip(edges, edges[1:])]  # noqa: E731
    # a lifelong state that has seen some turns already
    n0 = 10 * n_tokens
    mean0 = torch.cat([k32.mean(0), g32.mean(0)])
    acc0 = torch.cat([k32.var(0), g32.var(0)]) * n0
    std0 = torch.sqrt(acc0 / (n0 - 1))
    return StepInputs(
        k32=k32,
        g32=g32,
        g_lo=g_lo,
        ks_lo=split(k_lo),
        gs_lo=split(g_lo),
        ks32=split(k32),
        gs32=split(g32),
        n0=n0,
        mean0=mean0,
        acc0=acc0,
        std0=std0,
    )


def normalizer_pair(be, x: StepInputs) -> Pair:
    """The lifelong normaliser's update by the turn's blocks; each side on its own copy of
    the state."""
    st_fast = [x.mean0.clone(), x.acc0.clone(), x.std0.clone()]
    st_ref = [x.mean0.clone(), x.acc0.clone(), x.std0.clone()]
    assert st_fast[0].shape == (x.k32.shape[1] + x.g32.shape[1],)

    def norm_fast():
        be.normalizer_update_(st_fast[0], st_fast[1], st_fast[2], x.ks_lo, x.gs_lo, x.n0)

    def norm_ref():
        n = x.n0
        for k, g in zip(x.ks32, x.gs32):
            n = reference.normalizer_merge(
                st_ref[0], st_ref[1], st_ref[2], n, torch.cat([k, g], dim=1)
            )

    return {"fast": norm_fast, "reference": norm_ref}


def shift_values_pair(be, x: StepInputs, lr: float) -> Pair:
    return {
        "fast": lambda: be.shift_values(x.k32, x.g_lo, x.mean0, x.std0, lr),
        "reference": lambda: reference.shift_values(x.k32, x.g32, x.mean0, x.std0, lr),
    }


def solve_pair(k32: torch.Tensor, v: torch.Tensor) -> Pair:
    return {
        "fast": lambda: ShiftSolver(k32).factors(v),
        "reference": lambda: reference.primal_shift(k32, v),
    }


def weight_update_pair(
    be,
    gen: torch.Generator,
    device,
    dtype,
    d_in: int,
    d_out: int,
    k32: torch.Tensor,
    v: torch.Tensor,
) -> Pair:
    """Adding the turn's shift to ``W`` (``d_out x d_in``, in ``dtype``): the fast path's
    rank update from the solve's factors, the reference's materialised ``Delta``."""
    w_fast = _randn(gen, device, d_out, d_in, scale=0.02).to(dtype)
    w_ref = w_fast.clone()
    # the reference's Delta (d_in x d_out fp32) as its solve leaves it; its values do not
    # matter to the time of the add
    delta = _randn(gen, device, d_in, d_out, scale=1e-6)
    a, kk = ShiftSolver(k32).factors(v)

    def update_fast():
        be.rank_update_(w_fast, a, kk, False)

    def update_ref():
        w_ref.copy_((w_ref.float() + delta.t()).to(w_ref.dtype))

    return {"fast": update_fast, "reference": update_ref}


def step_callables(
    d_in: int,
    d_out: int,
    device,
    dtype,
    n_tokens: int = STEP_TOKENS,
    blocks: int = STEP_BLOCKS,
    backend: Optional[str] = None,
    seed: int = 0,
    lr: float = 1e-6,
) -> Dict[str, Pair]:
    """``{op: {"fast": fn, "reference": fn}}`` for the four steps of one module's turn at
    shape ``(d_in, d_out)`` with ``n_tokens`` rows in ``blocks`` mini-batch blocks. Each side
    gets its inputs as its editor holds them: the fast editor keeps keys and gradients in the
    model's ``dtype`` (fp32 keys for the solve), the reference casts them to fp32 at capture;
    ``W`` (``d_out x d_in``) is in ``dtype``."""
    device = torch.device(device)
    be = resolve_backend(backend, device)
    gen = torch.Generator().manual_seed(seed)
    x = step_inputs(gen, device, dtype, d_in, d_out, n_tokens, blocks)
    v = reference.shift_values(x.k32, x.g32, x.mean0, x.std0, lr)
    return {
        "normalizer": normalizer_pair(be, x),
        "shift_values": shift_values_pair(be, x, lr),
        "solve": solve_pair(x.k32, v),
        "weight_update": weight_update_pair(be, gen, device, dtype, d_in, d_out, x.k32, v),
    }


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
            calls = step_callables(d_in, d_out, s.device, s.dtype, backend=s.backend, seed=s.seed)
        except Exception as e:  # noqa: BLE001
            out.append({"shape": key, "label": label, "error": f"{type(e).__name__}: {e}"})
            continue
        for op in STEP_OPS:
            impls = {name: Impl(fn) for name, fn in calls[op].items()}
            res = run_interleaved(
                impls,
                s.device,
                repeats=s.step_repeats,
                slow_s=s.slow_s,
                impl_budget_s=s.impl_budget_s,
                nvml_sampling=False,
                deadline=s.deadline,
            )
            fast, ref = res["fast"].summary(), res["reference"].summary()
            row = {
                "shape": key,
                "label": label,
                "d_in": d_in,
                "d_out": d_out,
                "n_tokens": STEP_TOKENS,
                "op": op,
                "dtype": str(s.dtype).replace("torch.", ""),
                "fast": fast,
                "reference": ref,
                "speedup": speedup(median_s(ref), median_s(fast)),
            }
            out.append(row)
            log(
                f"    {op:14s} fast {fmt_seconds(median_s(fast))}  reference {fmt_seconds(median_s(ref))}  "
                f"x{fmt_ratio(row['speedup'])}"
            )
        del calls
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    return out
