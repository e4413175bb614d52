"""The benchmark instrumentation (``ultraedit_fast.bench``) on the CPU: fast checks that a
tiny case runs end to end and that the results carry what they must. The benchmarks
themselves live in ``benchmarks/`` and are not part of this suite."""

import json
import os
import re

import pytest
import torch

from ultraedit_fast import UltraEditor, bench

HAS_CUDA = torch.cuda.is_available()


def test_measure_cpu_reports_time_cpu_and_peak_rss():
    def work():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(x.sum())

    value, m = bench.measure(work, "cpu")
    assert value == 64 * 2**20 // 4
    assert m["wall_s"] > 0 and m["cpu_s"] >= 0
    assert m["peak_rss_bytes"] >= m["rss_before_bytes"]
    if m["peak_rss_reset"]:  # /proc/self/clear_refs works: the peak is this call's
        assert m["peak_rss_increase_bytes"] >= 48 * 2**20
    assert "cuda_peak_allocated_bytes" not in m and "nvml" not in m


def test_cpu_alloc_peak_counts_the_calls_live_tensors():
    MB = 10**6
    kept, peak = bench.cpu_alloc_peak(lambda: torch.empty(10 * MB // 4))  # 10 MB, kept alive
    assert peak == 10 * MB

    def two_then_free():
        a = torch.empty(8 * MB // 4)
        b = torch.empty(4 * MB // 4)  # peak: 12 MB live
        del a, b
        return torch.empty(2 * MB // 4)

    # the 10 MB still held from the first call must not count in this one
    out, peak = bench.cpu_alloc_peak(two_then_free)
    assert peak == 12 * MB and out.numel() == 2 * MB // 4
    del kept  # freed outside any tracked call: the profiler never sees it
    _, peak = bench.cpu_alloc_peak(lambda: torch.empty(3 * MB // 4).sum())
    assert 3 * MB <= peak < 3 * MB + 4096  # the sum's scalar on top
    assert bench.cpu_alloc_peak(lambda: 7) == (7, None)
    _, m = bench.measure(lambda: torch.empty(5 * MB // 4), "cpu", track_alloc=True)
    assert m["cpu_peak_alloc_increase_bytes"] == 5 * MB


def test_nvml_sampler_degrades_without_nvml_or_gpu():
    sampler = bench.NvmlSampler(0, interval=0.001).start()
    out = sampler.stop()
    if sampler.available:
        assert out["samples"] >= 2 and "mem_used_bytes_max" in out
    else:
        assert isinstance(out["nvml"], str) and out["nvml"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_measure_cuda_peak_and_nvml():
    def work():
        x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda").fill_(1)
        return int(x[:10].sum())

    _, m = bench.measure(work, "cuda")
    assert m["cuda_peak_allocated_bytes"] - m["cuda_allocated_before_bytes"] >= 256 * 2**20
    nv = m["nvml"]
    if "samples" in nv:
        assert nv["mem_used_bytes_max"] > 0
    env = bench.environment("cuda")
    assert env["gpu"]["name"] and env["versions"]["torch"]


def test_quantiles_and_summary():
    assert bench.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert bench.quantile([1.0, 2.0], 0.2) == pytest.approx(1.2)
    runs = [
        {"wall_s": w, "cpu_s": w, "cpu_util": 1.0, "peak_rss_increase_bytes": p}
        for w, p in [(1.0, 10), (3.0, 30), (2.0, 20)]
    ]
    s = bench.summarize(runs)
    assert s["seconds"]["median"] == 2.0 and s["seconds"]["runs"] == 3
    assert s["peak_rss_increase_bytes"] == 30


def test_run_interleaved_warmup_slow_runs_and_errors():
    calls = []

    def boom():
        raise RuntimeError("kaput")

    res = bench.run_interleaved(
        {"a": bench.Impl(lambda: calls.append("a")), "b": bench.Impl(boom)},
        "cpu",
        repeats=3,
        nvml_sampling=False,
    )
    assert calls == ["a"] * 4  # one warm-up, discarded, then three measured
    assert len(res["a"].runs) == 3 and not res["a"].error
    assert "kaput" in res["b"].error and res["b"].summary()["runs"] == 0
    # a first run slower than slow_s is kept: two runs in all, not three
    res = bench.run_interleaved(
        {"a": bench.Impl(lambda: calls.append("s"))},
        "cpu",
        repeats=2,
        slow_s=0.0,
        nvml_sampling=False,
    )
    assert calls.count("s") == 2 and len(res["a"].runs) == 2 and res["a"].notes
    # ... unless it is marked as allocating what later runs reuse: then it is a warm-up
    res = bench.run_interleaved(
        {"a": bench.Impl(lambda: calls.append("w"), always_warm_up=True)},
        "cpu",
        repeats=2,
        slow_s=0.0,
        nvml_sampling=False,
    )
    assert calls.count("w") == 3 and len(res["a"].runs) == 2 and not res["a"].notes


def test_synthetic_requests_follow_the_zsre_profile():
    tok = bench.SyntheticTokenizer(1000)
    reqs = bench.synthetic_requests(100, seed=3)
    assert reqs == bench.synthetic_requests(100, seed=3)
    answer = sum(len(tok(" " + r.target, add_special_tokens=False)["input_ids"]) for r in reqs)
    prompt = sum(len(tok(r.prompt)["input_ids"]) for r in reqs) / 100
    assert 230 <= answer <= 450  # zsRE: about 330 answer tokens per 100 edits
    assert 9 <= prompt <= 15
    assert all(0 <= i < 1000 for r in reqs for i in tok(r.prompt)["input_ids"])


def test_floor_pass_stops_at_the_lowest_edited_module():
    mc = bench.build_model("tiny", "cpu")
    before = {k: v.clone() for k, v in mc.model.state_dict().items()}
    flags = [p.requires_grad for p in mc.model.parameters()]
    reqs = bench.synthetic_requests(12, seed=1)
    out = bench.floor_pass(mc.model, mc.tokenizer, reqs, mc.modules, batch_size=5)
    rep = UltraEditor(mc.model, mc.tokenizer, modules=mc.modules, lr=1e-3, batch_size=5).edit(reqs)
    assert out["n_tokens"] == rep.n_tokens and out["seconds"] > 0
    assert [p.requires_grad for p in mc.model.parameters()] == flags  # restored as found
    changed = [k for k in before if not torch.equal(before[k], mc.model.state_dict()[k])]
    assert sorted(changed) == sorted(m + ".weight" for m in mc.modules)  # the editor's doing


def test_paper_configs_match_presets_and_shapes():
    """The GPU memory case's models, built on the meta device: the presets match, and the
    edited modules and weight sizes are the paper models'."""
    from transformers import AutoModelForCausalLM

    from ultraedit_fast.core.presets import _expand, find_preset

    expected = {
        "mistral-7b": ("Mistral-7B-v0.3", 2, (4096, 14336), 7.25e9),
        "llama-3-8b": ("LLaMA-3-8B-Instruct", 12, (14336, 4096), 8.03e9),
        "qwen2.5-7b": ("Qwen2.5-7B-Instruct", 18, (18944, 3584), 7.62e9),
        "gpt-j-6b": ("GPT-J-6B", 9, (4096, 16384), 6.05e9),
    }
    for name, cfg in bench.paper_configs().items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        preset, n_mod, shape, params = expected[name]
        found = find_preset(model)
        assert found.name == preset and found.lr == 1e-6
        mods = _expand(model, found.layers)
        assert len(mods) == n_mod
        assert tuple(model.get_submodule(mods[0]).weight.shape) == shape
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - params) / params < 0.01, (name, n)
        assert 2 * n < bench.MEMORY_TARGET_BYTES  # bf16 weights leave room under 20 GiB


def _deep_tiny_case(seed=0):
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = bench.random_model(cfg, "cpu", torch.float32, seed)
    return bench.ModelCase(
        "deep-tiny",
        model,
        bench.SyntheticTokenizer(211),
        ["model.layers.3.mlp.up_proj", "model.layers.4.mlp.down_proj"],
        1e-3,
        "synthetic",
        "5-layer tiny Llama",
    )


def test_tying_layers_below_the_edited_ones_leaves_the_turns_allocations_unchanged():
    """The memory case's stand-in for 7B models on a small host: layers 1..2 share layer
    0's weights, the weights are still counted untied, and a turn allocates exactly what
    it allocates on the untied model (those layers run without autograd)."""
    reqs = bench.synthetic_requests(30, seed=3)
    peaks = []
    for tie in (False, True):
        mc = _deep_tiny_case()
        full = mc.weights_bytes
        layers = mc.model.model.layers
        if tie:
            assert bench.tie_layers_below_edited(mc) == 2
            assert layers[2].mlp.down_proj.weight is layers[0].mlp.down_proj.weight
            assert layers[1].self_attn.q_proj.weight is layers[0].self_attn.q_proj.weight
            assert layers[3].mlp.up_proj.weight is not layers[0].mlp.up_proj.weight
            distinct = {id(p): p.numel() * 4 for p in mc.model.parameters()}
            per_layer = sum(p.numel() * 4 for p in layers[0].parameters())
            assert sum(distinct.values()) == full - 2 * per_layer
            assert mc.weights_bytes == full and mc.tied_layers == 2
        ed = UltraEditor(mc.model, mc.tokenizer, modules=mc.modules, lr=mc.lr)
        ed.edit(reqs)  # warm-up: the packing probe, the normaliser's state
        peaks.append(bench.cpu_alloc_peak(lambda: ed.edit(reqs))[1])  # noqa: F821 (deleted after the call)
        del ed
    assert peaks[0] > 100_000 and peaks[0] == peaks[1]


def test_memory_case_frees_each_model_before_building_the_next(monkeypatch):
    """Two 7B models do not fit a host that holds one: the case's own variables must not
    keep the previous model alive while the pool builds the next."""
    import weakref

    built, alive_at_build = [], []
    real = bench.build_model

    def build(name, device, seed=0, zsre_path=None):
        alive_at_build.append([w() is not None for w in built])
        mc = real("tiny", device, seed)
        mc.name = name
        built.append(weakref.ref(mc.model))
        return mc

    monkeypatch.setattr(bench.workloads, "build_model", build)
    s = bench.settings_from_args(
        bench.build_parser().parse_args(
            ["--device", "cpu", "--tiny", "--cases", "memory", "--edits-per-turn", "12"]
        )
    )
    s.memory_models = ["a", "b", "c"]
    pool = bench.ModelPool(s.device, s.seed)
    turns, mems = bench.case_turn_and_memory(s, pool, log=lambda *a: None)
    assert [m["model"] for m in mems] == ["a", "b", "c"] and not turns
    assert all(m["fast_turn_alloc_peak_bytes"] > 0 for m in mems)
    assert alive_at_build == [[], [False], [False, False]]


def test_bench_main_tiny_writes_json_table_and_chart(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = bench.main(
            [
                "--device",
                "cpu",
                "--tiny",
                "--output-dir",
                str(tmp_path),
                "--cases",
                "steps,turn,lifelong,memory",
                "--repeats",
                "1",
                "--lifelong-turns",
                "2",
                "--ref-turns",
                "1",
                "--edits-per-turn",
                "20",
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    js = [f for f in files if f.endswith(".json")]
    assert len(js) == 1 and re.fullmatch(r"cpu-\d+core-\d{4}-\d\d-\d\d-tiny\.json", js[0])
    doc = json.loads((tmp_path / js[0]).read_text())
    env = doc["env"]
    assert doc["settings"]["threads"] == 1
    assert doc["schema"] == bench.SCHEMA and env["device_type"] == "cpu" and env["date"]
    for k in ("torch", "triton", "transformers", "ultraedit_fast"):
        assert k in env["versions"]
    assert env["cpu"]["model"] and env["backend"]
    steps = doc["cases"]["steps"]
    assert {r["op"] for r in steps} == set(bench.STEP_OPS)
    for r in steps:
        assert r["fast"]["seconds"]["median"] > 0 and r["reference"]["seconds"]["median"] > 0
        assert r["speedup"] > 0 and "q20" in r["fast"]["seconds"]
    (turn,) = doc["cases"]["turn"]
    assert set(turn["fast_phases_median_s"]) == {"capture", "statistics", "solve", "step", "apply"}
    assert turn["floor"]["seconds"]["median"] > 0 and turn["n_tokens"] > 20
    assert turn["reference"]["seconds"]["median"] > 0 and turn["speedup"] > 0
    assert turn["shift_rel_diff_fast_vs_reference"] < 1e-3  # the same edit, both ways
    lf = doc["cases"]["lifelong"]
    assert lf["fast"]["turns_done"] == 2 and lf["reference"]["turns_done"] == 1
    assert lf["reference"]["extrapolated_total_seconds"] > 0
    (mem,) = doc["cases"]["memory"]
    assert mem["fast_peak_bytes"] is not None and mem["reference_peak_bytes"] is not None
    out = capsys.readouterr().out
    assert "speedup" in out and "turn" in out and "lifelong" in out
    pytest.importorskip("matplotlib")
    png = tmp_path / js[0].replace(".json", ".png")
    assert png.exists() and png.stat().st_size > 10_000
    # the chart and table can be redrawn from the JSON alone
    png.unlink()
    assert bench.main(["--replot", str(tmp_path / js[0])]) == 0
    assert png.exists()


def test_table_survives_skipped_and_failed_cases():
    doc = {
        "env": {"device_type": "cpu"},
        "cases": {
            "turn": [
                {"model": "smollm2", "skipped": "not installed"},
                {"model": "x", "error": "Traceback\nboom"},
            ],
            "lifelong": {"model": "smollm2", "skipped": "not installed"},
            "memory": [{"model": "y", "skipped": "time budget"}],
            "steps": [{"shape": "s", "skipped": "time budget"}],
        },
    }
    text = bench.format_table(doc)
    assert "not installed" in text and "time budget" in text
    assert bench.format_table(doc, markdown=True).startswith("| case")


def test_bad_arguments_are_reported():
    with pytest.raises(SystemExit):
        bench.main(["--cases", "nonsense", "--device", "cpu"])
    if not HAS_CUDA:
        with pytest.raises(SystemExit, match="CUDA"):
            bench.main(["--device", "cuda"])
    with pytest.raises(SystemExit, match="memory alone"):
        bench.main(["--device", "cpu", "--cases", "turn,memory", "--tie-below-edited"])
    with pytest.raises(SystemExit, match="memory alone, on the CPU"):
        bench.main(
            ["--device", "cuda" if HAS_CUDA else "cpu", "--cases", "turn", "--tie-below-edited"]
        )
