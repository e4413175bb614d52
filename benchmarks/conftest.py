"""Options and fixtures of the pytest-benchmark suite (``benchmarks/test_bench_turn.py``).

    python -m pytest benchmarks/ --benchmark-only                       # CPU, full cases
    python -m pytest benchmarks/ --benchmark-only --bench-scale quick
    python -m pytest benchmarks/ --benchmark-only --bench-device cuda \\
        --benchmark-columns=median,iqr,min,max,rounds --benchmark-json=$OUT/pytest-bench.json

The cases, shapes, models and settings are ``ultraedit_fast.bench``'s (the same ones as
``ultraedit-fast bench``), so the two cannot drift apart. Not part of the CI suite
(``testpaths = ["tests"]``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from ultraedit_fast import bench  # noqa: E402

# the data beside this checkout (../shared/data), when present
SHARED_ZSRE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.pardir,
    "shared",
    "data",
    "zsre",
    "zsre_mend_train-1k.json",
)


def pytest_addoption(parser):
    g = parser.getgroup("ultraedit_fast benchmarks")
    g.addoption(
        "--bench-device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="device of the benchmarks (default: cuda when available)",
    )
    g.addoption(
        "--bench-scale",
        default="full",
        choices=["tiny", "quick", "full"],
        help="the bench CLI's scale: tiny (seconds), quick, full",
    )
    g.addoption(
        "--bench-models",
        default=None,
        help="comma-separated models of the turn/memory cases (bench --models)",
    )
    g.addoption(
        "--bench-lifelong-turns",
        type=int,
        default=None,
        help="turns of the lifelong benchmark (bench --lifelong-turns)",
    )
    g.addoption(
        "--bench-zsre",
        default=SHARED_ZSRE,
        help="zsRE records for SmolLM2's turns (bench --zsre; default: the shared "
        "data beside this checkout, when present)",
    )


def _settings(config) -> bench.Settings:
    argv = ["--device", config.getoption("--bench-device")]
    scale = config.getoption("--bench-scale")
    if scale != "full":
        argv.append(f"--{scale}")
    if config.getoption("--bench-models"):
        argv += ["--models", config.getoption("--bench-models")]
    if config.getoption("--bench-lifelong-turns"):
        argv += ["--lifelong-turns", str(config.getoption("--bench-lifelong-turns"))]
    if config.getoption("--bench-zsre") and os.path.exists(config.getoption("--bench-zsre")):
        argv += ["--zsre", config.getoption("--bench-zsre")]
    return bench.settings_from_args(bench.build_parser().parse_args(argv))


def pytest_generate_tests(metafunc):
    s = _settings(metafunc.config)
    if "step_case" in metafunc.fixturenames:
        params = [
            (key, label, d_in, d_out, op, impl)
            for key, label, d_in, d_out in s.step_shapes
            for op in bench.STEP_OPS
            for impl in ("fast", "reference")
        ]
        metafunc.parametrize("step_case", params, ids=[f"{p[0]}-{p[4]}-{p[5]}" for p in params])
    if "turn_case" in metafunc.fixturenames:
        params = [(m, impl) for m in s.models for impl in ("floor", "fast", "reference")]
        metafunc.parametrize("turn_case", params, ids=[f"{m}-{i}" for m, i in params])
    if "memory_case" in metafunc.fixturenames:
        params = [(m, impl) for m in s.memory_models for impl in ("fast", "reference")]
        metafunc.parametrize("memory_case", params, ids=[f"{m}-{i}" for m, i in params])
    if "lifelong_model" in metafunc.fixturenames:
        metafunc.parametrize("lifelong_model", [s.lifelong_model])


@pytest.fixture(scope="session")
def bench_settings(request) -> bench.Settings:
    return _settings(request.config)


@pytest.fixture(scope="session")
def model_pool(bench_settings):
    pool = bench.ModelPool(bench_settings.device, bench_settings.seed)
    yield pool
    for name in list(pool.cases):
        pool.drop(name)


@pytest.fixture(scope="session")
def bench_env(bench_settings):
    return bench.environment(bench_settings.device)


@pytest.fixture(autouse=True)
def _name_the_machine(request, bench_env):
    """Every benchmark's extra_info names the device, versions and date."""
    yield
    bm = request.node.funcargs.get("benchmark")
    if bm is not None and hasattr(bm, "extra_info"):
        bm.extra_info.setdefault(
            "device", bench_env.get("gpu", {}).get("name") or bench_env["cpu"]["model"]
        )
        bm.extra_info.setdefault("driver", bench_env.get("driver"))
        bm.extra_info.setdefault("versions", bench_env["versions"])
        bm.extra_info.setdefault("date", bench_env["date"])
        bm.extra_info.setdefault("backend", bench_env.get("backend"))
        bm.extra_info.setdefault("loadavg", bench.loadavg())


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-device") == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="--bench-device cuda but CUDA is not available")
        for item in items:
            item.add_marker(skip)
