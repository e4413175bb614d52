"""Tensor-parallel editing: 2 ranks under torchrun (gloo, CPU) load a tiny Llama or Qwen2
saved to disk with ``tp_plan="auto"`` (column-parallel gate/up projections, row-parallel
down projection), edit 3 turns, and the gathered edited weights and normaliser states equal
a single-process edit of the same model. Checkpoints are per rank; step="auto" runs in
lockstep. Bad setups are refused."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ToyTokenizer, random_requests

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = [
    "model.layers.1.mlp.gate_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.2.mlp.down_proj",
]
LR = 1e-4

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not found",
)


def _save(arch, path):
    import transformers as T

    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[arch]
    cfg = cls(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def _torchrun(model_dir, out, mode):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TP_LR=str(LR))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(HERE, "tp_edit.py"),
            str(model_dir),
            str(out),
            ",".join(MODULES),
            mode,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f), torch.load(os.path.join(out, "weights.pt"))


def _single(model_dir, mode):
    from transformers import AutoModelForCausalLM
    from ultraedit_fast import UltraEditor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.eval()
        base = {n: model.get_submodule(n).weight.detach().clone() for n in MODULES}
        opts = dict(modules=MODULES, lr=LR, batch_size=4, undo=True, tokens_per_pass=0)
        if mode == "auto":
            opts["step"] = "auto"
        ed = UltraEditor(model, ToyTokenizer(), **opts)
        reports = [ed.edit(random_requests(10, seed=t)) for t in range(3)]
        if mode == "checkpoint":
            ed.rollback(1)
    finally:
        torch.set_num_threads(threads)
    return model, ed, base, reports


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    "arch,mode",
    [("llama", "paper"), ("qwen2", "paper"), ("llama", "checkpoint"), ("llama", "auto")],
)
def test_two_ranks_edit_as_one_process(tmp_path, arch, mode):
    model_dir = tmp_path / arch
    _save(arch, model_dir)
    res, weights = _torchrun(model_dir, tmp_path / "out", mode)
    model, ed, base, reports = _single(model_dir, mode)
    assert res["kinds"] == {MODULES[0]: "col", MODULES[1]: "col", MODULES[2]: "row"}
    assert res["turns"] == ed.turns
    for n in MODULES:
        w = model.get_submodule(n).weight.detach()
        assert _rel(w - base[n], base[n]) > 1e-4  # the edit moved the weight
        assert _rel(weights[n], w) < 1e-5, n
        assert _rel(weights[n] - base[n], w - base[n]) < 1e-2, n  # the shift itself
    assert set(res["states"]) == {str(k) for k in ed.normalizers}
    for key, state in ed.normalizers.items():
        got = res["states"][str(key)]
        assert got[3] == state.n
        for x, y in zip(got[:3], (state.mean, state.acc, state.std)):
            assert _rel(torch.tensor(x), y) < 1e-5, key
    # communication per turn: O(N^2) per row-parallel module and a few flags, never a weight
    n_rows = [r.n_tokens for r in reports]
    for sent, n in zip(res["comm_bytes"], n_rows):
        assert 0 < sent < 64 * (n + 100) ** 2
    if mode == "auto":
        assert res["step"] == [r.step_scale for r in reports]  # the same decisions


def test_unsupported_layouts_are_refused():
    from ultraedit_fast.parallel.distributed import tensor_parallel

    assert tensor_parallel("x", torch.zeros(2, 2), False) is None

    class FakeMesh:
        ndim = 2

    import ultraedit_fast.parallel.distributed as D

    orig = D.is_dtensor
    try:
        D.is_dtensor = lambda t: True
        w = torch.zeros(4, 4)
        w.device_mesh, w.placements = FakeMesh(), ("a", "b")
        with pytest.raises(ValueError, match="2-d device mesh"):
            tensor_parallel("model.x", w, False)
        with pytest.raises(ValueError, match="Conv1D"):
            w.device_mesh.ndim, w.placements = 1, ("a",)
            tensor_parallel("model.x", w, True)
    finally:
        D.is_dtensor = orig


def test_a_checkpoint_of_other_ranks_is_refused(tmp_path):
    from ultraedit_fast import UltraEditor
    from conftest import make_tiny

    model, modules = make_tiny("llama")
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR)
    ed.edit(random_requests(4))
    ed.save(tmp_path / "ck")
    m = tmp_path / "ck" / "manifest.json"
    from ultraedit_fast.storage import checkpoint
    import hashlib

    body = json.loads(m.read_text())
    body.pop("manifest_sha256")
    body["tensor_parallel"] = {"world": 2, "rank": 1}
    body["manifest_sha256"] = hashlib.sha256(checkpoint._canonical(body)).hexdigest()
    m.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="saved by rank .* of a tensor-parallel model"):
        UltraEditor.load(tmp_path / "ck", model, ToyTokenizer())


def test_cli_runs_under_torchrun(tmp_path, small_zsre, tiny_model_dir):
    """``torchrun -m ultraedit_fast run`` loads the model tensor-parallel by itself, edits
    and scores (teacher-forced and generated) like a single process (the fixture's prompts
    tokenise alike, so the scores barely move; the drift shows the edit), rank 0 alone writes the
    results, and --save-editor writes one checkpoint per rank."""
    from ultraedit_fast.cli import main

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [
        "run",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_zsre),
        "--turns",
        "2",
        "--edits-per-turn",
        "2",
        "--modules",
        "model.layers.1.mlp.up_proj,model.layers.2.mlp.up_proj,"  # column parallel
        "model.layers.1.mlp.down_proj,model.layers.2.mlp.down_proj",  # row parallel
        "--lr",
        "0.05",
        "--batch-size",
        "2",
        "--tokens-per-pass",
        "0",
        "--no-progress",
        "--no-plot",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "ultraedit_fast"]
        + args
        + ["--output-dir", str(tmp_path / "tp"), "--save-editor", str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("after:") == 1, r.stdout  # rank 0 reports, rank 1 is silent
    tp = json.loads((tmp_path / "tp" / "lifelong.json").read_text())
    assert tp["config"]["tensor_parallel"] == 2
    assert all(t["comm_bytes"] > 0 for t in tp["turns"])
    ck = sorted(os.listdir(tmp_path / "ck"))
    assert any("rank000-of-002" in f for f in ck) and any("rank001-of-002" in f for f in ck), ck

    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "lifelong.json").read_text())
    assert one["config"]["tensor_parallel"] == 1
    for k in ("ES", "GS", "LS", "LS_unedited", "ES_gen", "GS_gen", "LS_gen_unedited"):
        assert tp["metrics"][k] == pytest.approx(one["metrics"][k], abs=1e-9), k
    assert tp["metrics"]["drift_kl"] > 1e-3  # the edit moved the model
    assert tp["metrics"]["drift_kl"] == pytest.approx(
        one["metrics"]["drift_kl"], rel=1e-3, abs=1e-7
    )


def test_cli_refuses_what_tensor_parallel_cannot_write(tmp_path, small_zsre, monkeypatch, capsys):
    from ultraedit_fast.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc = main(
        [
            "run",
            "--model",
            "smollm2",
            "--data",
            str(small_zsre),
            "--turns",
            "1",
            "--edits-per-turn",
            "1",
            "--output-dir",
            str(tmp_path / "o"),
            "--export-lora",
            str(tmp_path / "l"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--export-lora: not under tensor parallelism" in err, err
    monkeypatch.setenv("WORLD_SIZE", "1")
    rc = main(["eval", "--data", str(small_zsre), "--tp-plan", "auto"])
    err = capsys.readouterr().err
    assert rc == 2 and "--tp-plan auto: needs several ranks" in err, err


def test_load_model_refuses_mixed_placements():
    from ultraedit_fast.model.loading import load_model

    with pytest.raises(ValueError, match="tp_plan and device_map"):
        load_model("smollm2", tp_plan="auto", device_map="auto")
    with pytest.raises(ValueError, match="GGUF file .* cannot be loaded tensor-parallel"):
        load_model("smollm2", tp_plan="auto")
