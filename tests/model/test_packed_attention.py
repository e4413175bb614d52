"""model/packed_attention.py: a packed pass attends request by request and gives what the
masked pass gives (and each request alone), on every family whose attention is sdpa; it
changes nothing for other threads, other batches, or a sliding window it cannot honour."""

import threading

import pytest
import torch

from conftest import ARCHS, make_tiny, make_windowed_mistral
from ultraedit_fast.model import packed_attention as PA
from ultraedit_fast.model.forward import answer_logits, supports_packing

LENGTHS = (7, 1, 12, 5, 9)  # odd sizes, a one-token request among them


def _packed(vocab, seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, torch.cat(seqs)[None], pos


def _base(model):
    return getattr(model, model.base_model_prefix)


def _hidden(model, ids, pos=None):
    kw = {} if pos is None else {"position_ids": pos}
    return _base(model)(input_ids=ids, use_cache=False, **kw).last_hidden_state[0]


def test_segments_of_a_packed_row():
    seg = PA.Segments.of(torch.tensor([[0, 1, 2, 0, 0, 1]]))
    assert seg.n == 6 and seg.longest == 3
    assert seg.index.tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 4]]
    assert seg.valid.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_attention_gives_each_request_alone(arch):
    model, _ = make_tiny(arch, seed=1)
    seqs, ids, pos = _packed(model.config.vocab_size, seed=2)
    with torch.no_grad():
        apart = torch.cat([_hidden(model, s[None]) for s in seqs])
        masked = _hidden(model, ids, pos)  # transformers' block-diagonal mask
        PA.COUNTS.update(segments=0, fallback=0)
        with PA.packed_attention(model, pos):
            grouped = _hidden(model, ids, pos)
    calls = dict(PA.COUNTS)
    scale = apart.abs().max()
    if PA.applies(model):
        assert calls["segments"] > 0 and calls["fallback"] == 0, (arch, calls)
        assert float((grouped - apart).abs().max() / scale) < 1e-5, arch
    else:  # another attention: the context changes nothing
        assert calls == {"segments": 0, "fallback": 0}, arch
        assert torch.equal(grouped, masked), arch
    assert float((masked - apart).abs().max() / scale) < 1e-5, arch
    assert model.config._attn_implementation != PA.NAME


def test_most_families_take_the_grouped_path():
    taking = [a for a in ARCHS if PA.applies(make_tiny(a)[0])]
    assert {"llama", "mistral", "qwen2"} <= set(taking), taking


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_logits_and_gradients_equal_the_masked_pass(dtype, tol):
    model, modules = make_tiny("llama", seed=4, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    _, ids, pos = _packed(model.config.vocab_size, seed=5)
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(6)) < 0.5
    tap = model.get_submodule(modules[0])

    def run(grouped):
        box = {}

        def hook(m, a, out):
            out.requires_grad_(True)
            box["out"] = out

        h = tap.register_forward_hook(hook)
        try:
            if grouped:
                logits = answer_logits(model, ids, None, mask, pos)
            else:
                logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[mask]
        finally:
            h.remove()
        loss = logits.float().logsumexp(-1).sum()
        (grad,) = torch.autograd.grad(loss, box["out"])
        return logits.detach().float(), grad.float()

    PA.COUNTS.update(segments=0, fallback=0)
    got = run(True)
    assert PA.COUNTS["segments"] > 0
    want = run(False)
    for g, w in zip(got, want):
        assert float((g - w).abs().max() / w.abs().max()) < tol


def _falls_back(model, ids, pos):
    """The pass inside the context takes the masked path alone and equals it exactly."""
    with torch.no_grad():
        masked = _hidden(model, ids, pos)
        PA.COUNTS.update(segments=0, fallback=0)
        with PA.packed_attention(model, pos):
            got = _hidden(model, ids, pos)
    assert PA.COUNTS["segments"] == 0 and PA.COUNTS["fallback"] > 0
    assert torch.equal(got, masked)


def test_a_sliding_window_shorter_than_a_request_falls_back():
    model = make_windowed_mistral(4)
    if not PA.applies(model):
        pytest.skip("this transformers gives Mistral another attention")
    _, ids, pos = _packed(model.config.vocab_size, seed=7)
    _falls_back(model, ids, pos)


def test_other_threads_and_padded_batches_are_untouched():
    model, _ = make_tiny("llama", seed=8)
    _, ids, pos = _packed(model.config.vocab_size, seed=9)
    g = torch.Generator().manual_seed(10)
    batch = torch.randint(3, model.config.vocab_size, (2, 9), generator=g)
    att = torch.ones_like(batch)
    att[1, :4] = 0  # left padding on the second row
    with torch.no_grad():
        want = _base(model)(input_ids=batch, attention_mask=att).last_hidden_state
    inside, leave, got = threading.Event(), threading.Event(), {}

    def holder():
        with PA.packed_attention(model, pos):
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(30)
        assert model.config._attn_implementation == PA.NAME
        with torch.no_grad():  # this thread, while another is inside
            got["other"] = _base(model)(input_ids=batch, attention_mask=att).last_hidden_state
            with PA.packed_attention(model, pos, attention_mask=torch.ones_like(ids)):
                got["padded"] = _base(model)(input_ids=batch, attention_mask=att).last_hidden_state
    finally:
        leave.set()
        t.join()
    valid = att.bool()
    for v in got.values():
        assert float((v[valid] - want[valid]).abs().max()) < 1e-6
    assert model.config._attn_implementation == "sdpa"


def test_the_implementation_is_restored_after_an_error():
    model, _ = make_tiny("llama", seed=11)
    _, ids, pos = _packed(model.config.vocab_size, seed=12)
    with pytest.raises(RuntimeError, match="inside"):
        with PA.packed_attention(model, pos):
            with PA.packed_attention(model, pos[:, :5]):  # nested: the inner row holds
                assert PA._LOCAL.segments.n == 5
            assert PA._LOCAL.segments.n == ids.shape[1]
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    assert getattr(PA._LOCAL, "segments", None) is None
    assert supports_packing(model)


def test_sub_configs_keep_their_own_attention():
    from types import SimpleNamespace

    import transformers as T

    cfg = T.Gemma3Config()
    cfg.text_config._attn_implementation_internal = "sdpa"
    cfg.vision_config._attn_implementation_internal = "eager"
    cfg._attn_implementation_internal = "sdpa"
    tree = PA._tree(SimpleNamespace(config=cfg))
    assert {id(c) for c in tree} == {id(cfg), id(cfg.text_config), id(cfg.vision_config)}
    PA._enter(tree)
    PA._enter(tree)  # a second thread
    assert cfg._attn_implementation == cfg.text_config._attn_implementation == PA.NAME
    assert cfg.vision_config._attn_implementation == "eager"
    PA._leave(tree)
    assert cfg.text_config._attn_implementation == PA.NAME  # one thread is still inside
    PA._leave(tree)
    assert cfg._attn_implementation == cfg.text_config._attn_implementation == "sdpa"
    assert cfg.vision_config._attn_implementation == "eager"


def test_one_long_request_among_short_ones_keeps_the_masked_pass():
    model, _ = make_tiny("llama", seed=13)
    lengths = (60,) + (1,) * 40  # 41 x 60^2 scores padded, against 100^2 for the square
    seqs, ids, pos = _packed(model.config.vocab_size, seed=14, lengths=lengths)
    assert not PA.Segments.of(pos).cheaper and PA.Segments.of(_packed(101)[2]).cheaper
    _falls_back(model, ids, pos)
