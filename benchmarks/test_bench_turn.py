"""pytest-benchmark suite: the cases of ``ultraedit-fast bench`` (``ultraedit_fast.bench``),
timed by pytest-benchmark, which reports the median and the quartiles (IQR) of each; the
20/80% quantiles, peak memory and CPU time go into each benchmark's ``extra_info``.

    python -m pytest benchmarks/ --benchmark-only [--bench-device cuda] [--bench-scale quick]
    python -m pytest benchmarks/ --benchmark-only -k "turn or memory" \\
        --benchmark-columns=median,iqr,min,max,rounds --benchmark-json=results.json

Cases: ``test_step`` (normaliser update, shift values, solve, weight update at the real
shapes, fast and reference), ``test_turn`` (one turn of 100 edits: floor, fast, reference),
``test_lifelong`` (per-turn time over many turns), ``test_memory`` (peak memory of one turn).
"""

import itertools

import pytest
import torch

from ultraedit_fast import bench

_STEPS = {}
_EDITORS = {}


def _q(benchmark):
    """20/80% quantiles of the rounds pytest-benchmark timed."""
    data = list(benchmark.stats.stats.data)
    return {
        "q20_s": bench.quantile(data, 0.2),
        "q80_s": bench.quantile(data, 0.8),
        "median_s": bench.quantile(data, 0.5),
    }


def _synced(fn, device):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        bench.sync(device)
        return out

    return run


def _expensive(s: bench.Settings, op: str, impl: str, d_in: int) -> bool:
    """The reference's primal solve at a 14336-wide input on the CPU takes minutes."""
    return s.device.type == "cpu" and impl == "reference" and op == "solve" and d_in > 8192


def test_step(benchmark, bench_settings, step_case):
    s = bench_settings
    key, label, d_in, d_out, op, impl = step_case
    if key not in _STEPS:
        _STEPS.clear()  # one shape's tensors at a time
        _STEPS[key] = bench.step_callables(
            d_in, d_out, s.device, s.dtype, backend=s.backend, seed=s.seed
        )
    fn = _synced(_STEPS[key][op][impl], s.device)
    if _expensive(s, op, impl, d_in):
        metrics = []

        def measured():
            metrics.append(bench.measure(fn, s.device, nvml_sampling=False)[1])

        benchmark.pedantic(measured, rounds=1, warmup_rounds=0, iterations=1)
        m = metrics[0]
    else:
        _, m = bench.measure(fn, s.device, nvml_sampling=False)  # warm-up, and the peaks
        benchmark.pedantic(fn, rounds=s.step_repeats, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(
        {
            "shape": label,
            "d_in": d_in,
            "d_out": d_out,
            "n_tokens": bench.STEP_TOKENS,
            "op": op,
            "impl": impl,
            "dtype": str(s.dtype),
            **_q(benchmark),
            "peak_bytes": bench.peak_of(m, s.device),
            "cpu_s": m["cpu_s"],
        }
    )


def _editors(pool, s, name):
    mc = pool.get(name)
    if _EDITORS.get("name") != name:
        fast, ref = bench.make_editors(mc, **s.editor_options)
        _EDITORS.clear()
        _EDITORS.update(
            name=name, fast=fast, ref=ref, keeper=bench.WeightKeeper(mc.model, fast.module_names)
        )
    return mc, _EDITORS


def test_turn(benchmark, bench_settings, model_pool, turn_case):
    s = bench_settings
    name, impl = turn_case
    try:
        mc, ed = _editors(model_pool, s, name)
    except RuntimeError as e:  # smollm2 not installed, say
        pytest.skip(str(e))
    reqs = mc.requests(0, n=s.edits, seed=s.seed)
    metrics, values = [], []
    if impl == "floor":

        def work():
            return bench.floor_pass(
                mc.model, mc.tokenizer, reqs, ed["fast"].module_names, ed["fast"].batch_size
            )
    else:
        editor = ed["fast"] if impl == "fast" else ed["ref"]

        def work():
            return editor.edit(reqs)

    def measured():
        v, m = bench.measure(work, s.device)
        metrics.append(m)
        values.append(v)

    # the reference on a wide model takes minutes on the CPU: no separate warm-up there
    slow = s.device.type == "cpu" and impl == "reference" and name != "smollm2"
    benchmark.pedantic(
        measured,
        setup=ed["keeper"].restore,
        rounds=max(1, s.repeats - slow),
        warmup_rounds=0 if slow else 1,
        iterations=1,
    )
    ed["keeper"].restore()
    summ = bench.summarize(metrics)
    info = {
        "model": name,
        "impl": impl,
        "data": mc.data,
        "modules": ed["fast"].module_names,
        **_q(benchmark),
        "peak_bytes": bench.peak_of(summ, s.device),
        "cpu_s_median": summ["cpu_s_median"],
        "nvml": summ.get("nvml"),
    }
    if impl == "floor":
        info["floor_seconds"] = [v["seconds"] for v in values]
        info["n_tokens"] = values[0]["n_tokens"]
    else:
        info["n_tokens"] = values[0].n_tokens
        info["report_total_seconds"] = [v.total_seconds for v in values]
        if impl == "fast":
            info["phases_median_s"] = {
                ph: bench.quantile([v.seconds[ph] for v in values], 0.5) for ph in values[0].seconds
            }
    benchmark.extra_info.update(info)


def test_lifelong(benchmark, bench_settings, model_pool, lifelong_model):
    s = bench_settings
    try:
        mc = model_pool.get(lifelong_model)
    except RuntimeError as e:
        pytest.skip(str(e))
    _EDITORS.clear()  # one live fast editor per model
    fast, _ = bench.make_editors(mc, **s.editor_options)
    keeper = bench.WeightKeeper(mc.model, fast.module_names)
    turn = itertools.count()
    reports = []

    def setup():
        return (mc.requests(next(turn), n=s.edits, seed=s.seed),), {}

    def one_turn(reqs):
        reports.append(fast.edit(reqs))
        bench.sync(s.device)

    benchmark.pedantic(
        one_turn, setup=setup, rounds=s.lifelong_turns, warmup_rounds=0, iterations=1
    )
    keeper.restore()
    times = [r.total_seconds for r in reports]
    drift = bench.drift(times)
    benchmark.extra_info.update(
        {
            "model": lifelong_model,
            "turns": len(times),
            "per_turn_seconds": times,
            "drift": drift,
            **_q(benchmark),
        }
    )
    if len(times) >= 11:  # must stay flat (loose: a shared CPU is noisy)
        assert drift["last5_over_turns2to6"] < 2.0, drift


def test_memory(benchmark, bench_settings, model_pool, memory_case):
    s = bench_settings
    name, impl = memory_case
    try:
        mc, ed = _editors(model_pool, s, name)
    except RuntimeError as e:
        pytest.skip(str(e))
    editor = ed["fast"] if impl == "fast" else ed["ref"]
    reqs = mc.requests(0, n=s.edits, seed=s.seed)
    metrics = []

    def measured():
        metrics.append(bench.measure(lambda: editor.edit(reqs), s.device)[1])

    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    benchmark.pedantic(
        measured, setup=ed["keeper"].restore, rounds=1, warmup_rounds=0, iterations=1
    )
    ed["keeper"].restore()
    peak = bench.peak_of(metrics[0], s.device)
    benchmark.extra_info.update(
        {
            "model": name,
            "impl": impl,
            "peak_bytes": peak,
            "peak_kind": "cuda_peak_allocated (weights included)"
            if s.device.type == "cuda"
            else "peak RSS increase",
            "weights_bytes": mc.weights_bytes,
            "nvml": metrics[0].get("nvml"),
        }
    )
    if s.device.type == "cuda" and impl == "fast" and name in bench.paper_configs():
        assert peak <= bench.MEMORY_TARGET_BYTES, f"{name}: {peak / bench.GIB:.2f} GiB > 20 GiB"
