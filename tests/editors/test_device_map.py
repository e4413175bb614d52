"""Models split over devices with ``device_map`` (pipeline style): each edited module's keys,
solve and update stay on its own device, a normaliser shared by modules on two devices lives
with the first of them, and the edit equals the one of the same model on one device.

On the CPU, ``load_model(..., device_map=...)`` goes through accelerate's dispatch (all on the
CPU); the split over a GPU and the CPU runs where a GPU is present (``benchmarks/run_gpu.sh``).
"""

import pytest
import torch

from conftest import ToyTokenizer, random_requests

MODULES = [
    "model.layers.1.mlp.up_proj",
    "model.layers.2.mlp.up_proj",  # one shared state
    "model.layers.1.mlp.down_proj",
    "model.layers.2.mlp.down_proj",
]


def _save(path):
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def _edit(model):
    from ultraedit_fast import UltraEditor

    base = {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in MODULES}
    ed = UltraEditor(
        model, ToyTokenizer(), modules=MODULES, lr=1e-3, batch_size=4, tokens_per_pass=0, undo=True
    )
    for t in range(2):
        ed.edit(random_requests(8, seed=t))
    after = {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in MODULES}
    ed.rollback(1)
    rolled = {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in MODULES}
    return base, after, rolled, ed


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(split_model, tmp_path):
    from transformers import AutoModelForCausalLM

    one = AutoModelForCausalLM.from_pretrained(tmp_path)
    one.eval()
    base, want, want_rolled, _ = _edit(one)
    base2, got, got_rolled, ed = _edit(split_model)
    for n in MODULES:
        assert torch.equal(base[n], base2[n])
        assert _rel(want[n] - base[n], base[n]) > 1e-5, n  # the edit moved it
        assert _rel(got[n] - base[n], want[n] - base[n]) < 1e-4, n
        assert _rel(got_rolled[n], want_rolled[n]) < 1e-5, n
    return ed


def test_device_map_load_edits_like_a_plain_load(tmp_path):
    """``device_map="auto"`` (accelerate's dispatch; everything lands on the CPU here)."""
    from ultraedit_fast.model.loading import load_model

    _save(tmp_path)
    with pytest.raises(ValueError, match="device: not with device_map"):
        load_model(str(tmp_path), device="cpu", device_map="auto")
    model = _load_split(tmp_path, "auto")
    _compare(model, tmp_path)


def _load_split(path, device_map):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map)
    model.eval()
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_over_gpu_and_cpu(tmp_path):
    """Layers 0-1 on the GPU, layers 2-3 and the head on the CPU: the shared ``up_proj``
    normaliser has one module on each device."""
    _save(tmp_path)
    dm = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": "cpu",
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    model = _load_split(tmp_path, dm)
    assert model.get_submodule(MODULES[0]).weight.device.type == "cuda"
    assert model.get_submodule(MODULES[1]).weight.device.type == "cpu"
    ed = _compare(model, tmp_path)
    devices = {str(s.mean.device) for s in ed.normalizers.values()}
    assert "cuda:0" in devices
