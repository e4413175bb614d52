"""The fast editor against the reference (the published algorithm), turn after turn."""

import pytest
import torch

from conftest import ARCHS, clone_model, make_tiny, random_requests
from ultraedit_fast import ReferenceEditor, UltraEditor
from ultraedit_fast.kernels import available_backends

LR = 1e-4  # moves the tiny models' edited weights by a few percent per turn


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run_both(
    arch,
    toy_tokenizer,
    turns=3,
    backend="torch",
    share=True,
    batch_size=4,
    seed=0,
    sizes=(11, 6, 17),
    modules=None,
):
    model, default_modules = make_tiny(arch, seed=seed)
    modules = modules or default_modules
    ref_model = clone_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = UltraEditor(
        model,
        toy_tokenizer,
        modules=modules,
        lr=LR,
        batch_size=batch_size,
        backend=backend,
        share_normalizer=share,
    )
    ref = ReferenceEditor(
        ref_model,
        toy_tokenizer,
        modules=modules,
        lr=LR,
        batch_size=batch_size,
        share_normalizer=share,
    )
    for t in range(turns):
        reqs = random_requests(sizes[t % len(sizes)], seed=100 * seed + t)
        fast.edit(reqs)
        ref.edit(reqs)
    return model, ref_model, before, modules, fast, ref


def _check(model, ref_model, before, modules, fast, ref, tol=1e-4):
    sd, rsd = model.state_dict(), ref_model.state_dict()
    for name in modules:
        key = name + ".weight"
        assert _rel(sd[key], rsd[key]) < tol, name
        # the shifts themselves, a stricter check than the weights
        shift, ref_shift = sd[key] - before[key], rsd[key] - before[key]
        assert ref_shift.norm() > 1e-3 * before[key].norm(), "the reference did not edit"
        assert _rel(shift, ref_shift) < 10 * tol, name
    for key in sd:
        if key[: -len(".weight")] not in modules:
            assert torch.equal(sd[key], before[key]), f"{key} changed but is not edited"
    assert set(fast.normalizers) == set(ref.normalizers)
    for key, state in fast.normalizers.items():
        r = ref.normalizers[key]
        assert state.n == r.n
        torch.testing.assert_close(state.mean, r.mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(state.std, r.std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(state.acc, r.acc, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_matches_reference_three_turns(arch, toy_tokenizer):
    _check(*_run_both(arch, toy_tokenizer))


# Modules of the last decoder block's MLP, which the fast forward runs on answer rows only
# (forward.rows_only_modules), with one module of a lower block.
_LAST_BLOCK = {
    "llama": [
        "model.layers.1.mlp.up_proj",
        "model.layers.3.mlp.up_proj",
        "model.layers.3.mlp.down_proj",
    ],
    "mistral": ["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.down_proj"],
    "qwen2": [
        "model.layers.2.mlp.down_proj",
        "model.layers.3.mlp.gate_proj",
        "model.layers.3.mlp.up_proj",
    ],
    "gemma": ["model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj"],
    "phi3": [
        "model.layers.1.mlp.down_proj",
        "model.layers.3.mlp.gate_up_proj",
        "model.layers.3.mlp.down_proj",
    ],
    "gptj": [
        "transformer.h.2.mlp.fc_out",
        "transformer.h.3.mlp.fc_in",
        "transformer.h.3.mlp.fc_out",
    ],
    "gpt2": ["transformer.h.3.mlp.c_fc", "transformer.h.3.mlp.c_proj"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_matches_reference_editing_the_last_block(arch, toy_tokenizer):
    from ultraedit_fast.model.forward import rows_only_modules

    model, _ = make_tiny(arch)
    rows_only = rows_only_modules(model)
    inside = [n for n in _LAST_BLOCK[arch] if model.get_submodule(n) in rows_only]
    assert inside and len(inside) >= len(_LAST_BLOCK[arch]) - 1  # the path under test runs
    _check(*_run_both(arch, toy_tokenizer, modules=_LAST_BLOCK[arch]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_matches_reference_per_module_normalizers(arch, toy_tokenizer):
    *res, fast, ref = _run_both(arch, toy_tokenizer, share=False)
    assert set(fast.normalizers) == set(res[3])  # one per module
    _check(*res, fast, ref)


def test_fast_matches_reference_batch_of_one_row_blocks(toy_tokenizer):
    """Mini-batches of one request with one-token answers give one-row normaliser blocks
    (var_rows undefined; both take 0)."""
    model, modules = make_tiny("llama", seed=3)
    ref_model = clone_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from ultraedit_fast import EditRequest

    reqs = [
        EditRequest("the capital of x is", "y"),
        EditRequest("alpha beta", "z"),
        EditRequest("über", "q"),
    ]
    fast = UltraEditor(model, toy_tokenizer, modules=modules, lr=LR, batch_size=1)
    ref = ReferenceEditor(ref_model, toy_tokenizer, modules=modules, lr=LR, batch_size=1)
    for _ in range(2):
        fast.edit(reqs)
        ref.edit(reqs)
    _check(model, ref_model, before, modules, fast, ref)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fast_matches_reference_with_each_backend(backend, toy_tokenizer):
    reason = available_backends("cpu")[backend]
    if reason is not None:
        pytest.skip(reason)
    _check(*_run_both("llama", toy_tokenizer, backend=backend))
    _check(*_run_both("gpt2", toy_tokenizer, backend=backend))


def test_large_turn_uses_primal_side_and_matches(toy_tokenizer):
    """N > d_in (many answer tokens, tiny hidden size) takes the primal solve."""
    *res, fast, ref = _run_both("llama", toy_tokenizer, turns=1, sizes=(60,), batch_size=10)
    _check(*res, fast, ref)


def test_dual_solve_is_exact_against_float64():
    """N < d_in: the dual solve against a float64 primal solve, as docs/algorithm.md says."""
    from ultraedit_fast.editors.reference import primal_shift
    from ultraedit_fast.core.solve import ShiftSolver

    torch.manual_seed(0)
    k = torch.randn(97, 700)
    v = torch.randn(97, 33)
    exact = torch.linalg.solve(
        k.double().t() @ k.double() + torch.eye(700, dtype=torch.float64),
        k.double().t() @ v.double(),
    )
    solver = ShiftSolver(k)
    assert solver.dual
    a, kk = solver.factors(v)
    dual = kk.t().double() @ a.double()
    primal = primal_shift(k, v).double()
    err_dual = _rel(dual, exact)
    err_primal = _rel(primal, exact)
    assert err_dual < 1e-5
    assert err_dual <= err_primal * 1.5 + 1e-7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens_per_pass", [0, 512], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_on_cuda_matches_reference_on_cpu(arch, backend, tokens_per_pass, toy_tokenizer):
    """The whole turn on the GPU (hooks, packed passes, the GPU kernels) against the
    reference on the CPU."""
    if backend != "auto" and available_backends("cuda")[backend] is not None:
        pytest.skip(available_backends("cuda")[backend])
    model, modules = make_tiny(arch)
    ref_model = clone_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.cuda()
    fast = UltraEditor(
        model,
        toy_tokenizer,
        modules=modules,
        lr=LR,
        batch_size=4,
        backend=backend,
        tokens_per_pass=tokens_per_pass,
    )
    ref = ReferenceEditor(ref_model, toy_tokenizer, modules=modules, lr=LR, batch_size=4)
    for t, n in enumerate((11, 6, 17)):
        reqs = random_requests(n, seed=t)
        fast.edit(reqs)
        ref.edit(reqs)
    model.cpu()
    sd, rsd = model.state_dict(), ref_model.state_dict()
    for name in modules:
        key = name + ".weight"
        shift, ref_shift = sd[key] - before[key], rsd[key] - before[key]
        assert ref_shift.norm() > 1e-3 * before[key].norm()
        assert _rel(shift, ref_shift) < 1e-3, name
    for key, state in fast.normalizers.items():
        r = ref.normalizers[key]
        assert state.n == r.n
        for part in ("mean", "acc", "std"):
            torch.testing.assert_close(
                getattr(state, part).cpu(), getattr(r, part), rtol=1e-4, atol=1e-6
            )
