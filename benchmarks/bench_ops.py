"""Timings of the three hot steps per backend, at the widths that matter.

    python -m pytest benchmarks/bench_ops.py --benchmark-columns=median,iqr,min,rounds
    python -m pytest benchmarks/bench_ops.py -k "smollm2 and bf16"          # a subset
    python -m pytest benchmarks/bench_ops.py --benchmark-json=out.json      # medians as JSON

Backends: the plain-PyTorch default kernel (``torch``) against the compiled CPU
kernels (``cpp``) on the CPU, and against ``cuda`` and ``triton`` on a GPU.  A
backend that is not available is skipped with the reason.

Shapes (rows of a turn: 100 edits, ~5 answer tokens each, mini-batches of 10):
  smollm2-down  SmolLM2-135M mlp.down_proj: d_in 1536 -> d_out 576
  smollm2-up    SmolLM2-135M mlp.up_proj:   d_in 576  -> d_out 1536
  mistral-down  Mistral-7B  mlp.down_proj:  d_in 14336 -> d_out 4096
  normaliser: 10 blocks x 50 rows; shift: N = 500 rows; rank update: N = 512.

Each result's ``extra_info`` holds the bytes the op must move and the flops it
must do, and the floor time they imply at the peaks given by
``UEF_BENCH_PEAK_GBS`` / ``UEF_BENCH_PEAK_GFLOPS`` / ``UEF_BENCH_PEAK_TF32_GFLOPS``
(defaults: an H100 SXM's datasheet, 3350 GB/s, 67000 GFLOP/s float32 without
tensor cores, 494000 GFLOP/s dense TF32: the rank update of a 16-bit w runs on
the TF32 tensor cores on the GPU), so a GPU run reads as a fraction of the
achievable.  The reported time is the median over rounds; pytest-benchmark also
reports the IQR.  ``UEF_BENCH_THREADS=N`` sets torch's CPU thread count (the C++
kernels use the same OpenMP pool).

The rank update against torch (GPU only), measured ceilings and floors included:

    python benchmarks/bench_ops.py --json $OUT/rank_vs_addmm.json     # a table, and JSON
    python -m pytest -s benchmarks/bench_ops.py -k vs_addmm             # the same, as a test

It times the Mistral-7B down_proj update in bf16 (w 4096 x 14336 bf16, a 512 x
4096 and k 512 x 14336 float32) by ``w.addmm_(a.t().bfloat16(), k.bfloat16())``
(the issue's yardstick: bf16 operands, cuBLAS), by the ``cuda`` and ``triton``
backends, and by the Triton kernel at each of its candidate launch
configurations; it reports each one's median time, its ratio to addmm_ (the
target is <= 1.25), the rise of the peak allocated memory during the call, the
error of the update against float64, and the per-op floors: bytes over the
measured copy bandwidth, flops over the measured bf16 / TF32 matmul rates.
"""

from __future__ import annotations

import os

import pytest
import torch

from ultraedit_fast.kernels import backends

if os.environ.get("UEF_BENCH_THREADS"):
    # e.g. 1: on a small shared machine one thread is far less disturbed by other
    # processes than an OpenMP team, which waits for its slowest member.
    torch.set_num_threads(int(os.environ["UEF_BENCH_THREADS"]))

PEAK_GBS = float(os.environ.get("UEF_BENCH_PEAK_GBS", 3350))
PEAK_GFLOPS = float(os.environ.get("UEF_BENCH_PEAK_GFLOPS", 67000))
PEAK_TF32_GFLOPS = float(os.environ.get("UEF_BENCH_PEAK_TF32_GFLOPS", 494000))

SHAPES = {"smollm2-down": (1536, 576), "smollm2-up": (576, 1536), "mistral-down": (14336, 4096)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCKS, BLOCK_ROWS, SHIFT_ROWS, RANK_ROWS = 10, 50, 500, 512

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    (b, d)
    for d in DEVICES
    for b in (("torch", "cpp") if d == "cpu" else ("torch", "cuda", "triton"))
]


def _kernels(name, device):
    reason = backends.available_backends(device).get(name)
    if reason is not None:
        pytest.skip(f"{name} on {device}: {reason}")
    return backends.resolve_backend(name, device)


def _run(benchmark, fn, device, big, info, peak_gflops=PEAK_GFLOPS):
    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    floor_s = max(info["bytes"] / (PEAK_GBS * 1e9), info["flops"] / (peak_gflops * 1e9))
    benchmark.extra_info.update(
        info, floor_us=round(floor_s * 1e6, 2), threads=torch.get_num_threads(), device=device
    )
    # The 7B rank update takes about a second on two CPU cores: fewer rounds there.
    rounds = 3 if (big and device == "cpu") else (10 if device == "cpu" else 50)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def _ids(cases):
    return [f"{b}-{d}" for b, d in cases]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,device", CASES, ids=_ids(CASES))
def test_normalizer_update(benchmark, backend, device, shape, dtype):
    be = _kernels(backend, device)
    d_in, d_out = SHAPES[shape]
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    ks = [
        (torch.randn(BLOCK_ROWS, d_in, generator=g) * 0.5 + 3).to(device, dt) for _ in range(BLOCKS)
    ]
    gs = [
        (torch.randn(BLOCK_ROWS, d_out, generator=g) * 1e-3).to(device, dt) for _ in range(BLOCKS)
    ]
    state = [torch.zeros(d_in + d_out, device=device) for _ in range(3)]
    rows = BLOCKS * BLOCK_ROWS
    info = {"bytes": rows * (d_in + d_out) * dt.itemsize + 5 * 4 * (d_in + d_out), "flops": 0}
    _run(
        benchmark,
        lambda: be.normalizer_update_(*state, ks, gs, 1000),
        device,
        shape.startswith("mistral"),
        info,
    )


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,device", CASES, ids=_ids(CASES))
def test_shift_values(benchmark, backend, device, shape, dtype):
    be = _kernels(backend, device)
    d_in, d_out = SHAPES[shape]
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(SHIFT_ROWS, d_in, generator=g) + 3).to(device, dt)
    gr = (torch.randn(SHIFT_ROWS, d_out, generator=g) * 1e-3).to(device, dt)
    mean = torch.full((d_in + d_out,), 3.0, device=device)
    std = torch.ones(d_in + d_out, device=device)
    info = {
        "bytes": SHIFT_ROWS * ((d_in + d_out) * dt.itemsize + d_out * 4) + 2 * 4 * (d_in + d_out),
        "flops": 0,
    }
    _run(
        benchmark,
        lambda: be.shift_values(k, gr, mean, std, 1e-6),
        device,
        shape.startswith("mistral"),
        info,
    )


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,device", CASES, ids=_ids(CASES))
def test_rank_update(benchmark, backend, device, shape, dtype):
    be = _kernels(backend, device)
    d_in, d_out = SHAPES[shape]
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(d_out, d_in, generator=g) * 0.02).to(device, dt)
    a = (torch.randn(RANK_ROWS, d_out, generator=g) * 1e-4).to(device)
    k = torch.randn(RANK_ROWS, d_in, generator=g).to(device)
    info = {
        "bytes": 2 * w.numel() * dt.itemsize + 4 * RANK_ROWS * (d_in + d_out),
        "flops": 2 * RANK_ROWS * d_in * d_out,
    }
    tensor_cores = device == "cuda" and backend in ("cuda", "triton") and dt != torch.float32
    _run(
        benchmark,
        lambda: be.rank_update_(w, a, k, False),
        device,
        shape.startswith("mistral"),
        info,
        peak_gflops=PEAK_TF32_GFLOPS if tensor_cores else PEAK_GFLOPS,
    )


# --------------------------------------------------------------------------- rank update vs addmm_
MISTRAL_DOWN = (4096, 14336, 512)  # d_out, d_in, N


def _median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median of ``reps`` timings of ``fn(i)`` by CUDA events (i: the repetition, for
    rotating inputs), after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def _ceilings(reps: int = 20) -> dict:
    """Measured ceilings of this GPU: copy bandwidth (a 1 GiB device-to-device copy,
    bytes read + written) and the bf16 and TF32 matmul rates (8192^3 through cuBLAS)."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = _median_ms(lambda i: y.copy_(x), reps)  # noqa: F821 (deleted after the call)
    out = {"copy_GBs": 2 * x.numel() * 4 / (ms * 1e-3) / 1e9}
    del x, y
    n = 8192
    for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True)):
        a = torch.randn(n, n, device="cuda").to(dt)
        b = torch.randn(n, n, device="cuda").to(dt)
        c = torch.empty(n, n, device="cuda", dtype=dt)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ms = _median_ms(lambda i: torch.mm(a, b, out=c), reps)  # noqa: F821 (deleted after the call)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out[f"mm_{name}_TFLOPs"] = 2 * n**3 / (ms * 1e-3) / 1e12
        del a, b, c
    torch.cuda.empty_cache()
    return out


def rank_update_vs_addmm(
    reps: int = 30, configs: bool = True, shape=MISTRAL_DOWN, dev: str = "cuda"
) -> dict:
    """The Mistral-7B down_proj update in bf16: torch's addmm_ against our kernels.

    Inputs are random (never zeros), the (a, k) pair rotates among 3 sets (3 x 38 MB,
    more than an H100's 50 MB L2) and w (117 MB) is updated in place, as in a turn.
    Returns {"ceilings": ..., "floors_us": ..., "rows": [...]} and prints a table."""
    from ultraedit_fast.kernels import triton_kernels as tk

    d_out, d_in, N = shape
    ceil = _ceilings()
    w_bytes = d_out * d_in * 2
    io_bytes = 2 * w_bytes + 4 * N * (d_in + d_out)  # w read + written, a and k read once
    flops = 2 * N * d_in * d_out
    floors = {
        "bytes_us": io_bytes / (ceil["copy_GBs"] * 1e9) * 1e6,
        "flops_bf16_us": flops / (ceil["mm_bf16_TFLOPs"] * 1e12) * 1e6,
        "flops_tf32_us": flops / (ceil["mm_tf32_TFLOPs"] * 1e12) * 1e6,
    }
    floors["floor_bf16_us"] = max(floors["bytes_us"], floors["flops_bf16_us"])
    floors["floor_tf32_us"] = max(floors["bytes_us"], floors["flops_tf32_us"])

    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(d_out, d_in, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    sets = [
        (
            (torch.randn(N, d_out, device=dev, generator=g) * 1e-3),
            torch.randn(N, d_in, device=dev, generator=g),
        )
        for _ in range(3)
    ]
    w_init = w.clone()  # the accuracy checks start from it (the timings update w in place)

    variants = [
        (
            "torch addmm_ (bf16 operands)",
            lambda ww, a, k: ww.addmm_(a.t().bfloat16(), k.bfloat16()),
            "bf16",
        )
    ]
    if backends.available_backends(dev)["cuda"] is None:
        cu = torch.ops.ultraedit_fast.rank_update_.default
        variants.append(("ours: cuda (TF32 WMMA)", lambda ww, a, k: cu(ww, a, k, False), "tf32"))
    else:
        print(f"cuda backend unavailable: {backends.available_backends(dev)['cuda']}")
    if backends.available_backends(dev)["triton"] is None:
        variants.append(
            (
                "ours: triton (TF32, default config)",
                lambda ww, a, k: tk.rank_update_(ww, a, k, False),
                "tf32",
            )
        )
        if configs:
            for cfg in tk.RANK_CONFIGS_TO_TRY:
                variants.append(
                    (
                        f"  triton config {cfg}",
                        (
                            lambda c: (
                                lambda ww, a, k: tk._launch_rank_update(
                                    ww, a, k, torch.device(dev), c
                                )
                            )
                        )(cfg),
                        "tf32",
                    )
                )

    # Accuracy: one call on a fresh copy of w against float64 (sampled rows).
    rows_idx = torch.arange(0, d_out, 37, device=dev)
    a0, k0 = sets[0]
    exact = w_init[rows_idx].double() + a0.double().t()[rows_idx] @ k0.double()
    upd_norm = (exact - w_init[rows_idx].double()).norm().item()
    exact_w = exact.to(torch.bfloat16)
    # The error of the exactly rounded w: what any variant's error is measured against.
    rounding_err = (exact_w.double() - exact).norm().item() / upd_norm

    rows = []
    for name, fn, prec in variants:
        row = {"variant": name, "operands": prec}
        try:
            wc = w_init.clone()
            fn(wc, a0, k0)
            torch.cuda.synchronize()
            got = wc[rows_idx]
            row["update_rel_err"] = (got.double() - exact).norm().item() / upd_norm
            row["err_over_rounding"] = row["update_rel_err"] / rounding_err
            row["frac_not_exactly_rounded"] = (got != exact_w).double().mean().item()
            del wc
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(w, a0, k0)
            torch.cuda.synchronize()
            row["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["peak_extra_frac_of_w"] = row["peak_extra_MiB"] * 2**20 / w_bytes
            row["median_us"] = 1e3 * _median_ms(lambda i: fn(w, *sets[i % 3]), reps)
        except Exception as e:  # a config that does not compile, say: report it, go on
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    ref_us = rows[0].get("median_us")
    for row in rows:
        if "median_us" in row and ref_us:
            row["ratio_to_addmm"] = row["median_us"] / ref_us
            floor = floors["floor_bf16_us" if row["operands"] == "bf16" else "floor_tf32_us"]
            row["floor_us"] = floor
            row["time_over_floor"] = row["median_us"] / floor

    print(
        f"\nGPU: {torch.cuda.get_device_name()}  ceilings: copy {ceil['copy_GBs']:.0f} GB/s, "
        f"bf16 mm {ceil['mm_bf16_TFLOPs']:.0f} TFLOP/s, tf32 mm {ceil['mm_tf32_TFLOPs']:.0f} "
        f"TFLOP/s"
    )
    print(
        f"Mistral-7B down_proj w {d_out}x{d_in} bf16, N={N}: {io_bytes / 1e6:.0f} MB "
        f"-> {floors['bytes_us']:.0f} us; {flops / 1e9:.1f} GFLOP -> bf16 "
        f"{floors['flops_bf16_us']:.0f} us, tf32 {floors['flops_tf32_us']:.0f} us"
    )
    print(
        f"errors: ||w - exact|| / ||update|| over every 37th row, relative to the exactly "
        f"rounded w's ({rounding_err:.2e}); flips: elements not exactly rounded"
    )
    hdr = f"{'variant':44s} {'us':>8s} {'/addmm':>7s} {'/floor':>7s} {'+MiB':>7s} {'err/rnd':>8s} {'flips':>7s}"
    print(hdr)

    def fmt(row, key, spec, scale=1.0):
        v = row.get(key)
        return format(v * scale, spec) if v is not None else format("-", spec[:-3] + "s")

    for row in rows:
        if "error" in row:
            print(f"{row['variant']:44s} ERROR {row['error']}")
            continue
        print(
            f"{row['variant']:44s} {fmt(row, 'median_us', '8.1f')} "
            f"{fmt(row, 'ratio_to_addmm', '7.2f')} {fmt(row, 'time_over_floor', '7.2f')} "
            f"{fmt(row, 'peak_extra_MiB', '7.1f')} {fmt(row, 'err_over_rounding', '8.3f')} "
            f"{fmt(row, 'frac_not_exactly_rounded', '6.2f', 100)}%"
        )
    return {
        "device": torch.cuda.get_device_name(),
        "shape": shape,
        "ceilings": ceil,
        "bytes": io_bytes,
        "flops": flops,
        "floors_us": floors,
        "rounding_rel_err": rounding_err,
        "rows": rows,
    }


@pytest.mark.gpu
def test_rank_update_vs_addmm():
    """Not a pytest-benchmark case: prints the table (run with -s) and checks what the
    numbers must satisfy whatever the speed: no w-sized temporary, and an error within
    25 % of the exactly rounded w's (TF32 operands add little to w's own rounding
    here; bf16 operands would add about half of it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    res = rank_update_vs_addmm(reps=20, configs=False)
    for row in res["rows"][1:]:
        assert "error" not in row, row
        assert row["peak_extra_frac_of_w"] < 0.15, row
        assert row["err_over_rounding"] < 1.25, row


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="rank update vs torch addmm_ (GPU)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument(
        "--no-configs", action="store_true", help="skip the Triton launch-configuration sweep"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    result = rank_update_vs_addmm(reps=args.reps, configs=not args.no_configs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
