"""A model that keeps serving while it is edited.

- The editor's hooks act for the editing thread only: another thread's forward pass during a
  turn's capture gets exactly the unhooked model's logits, and does not break the turn.
- Forward passes inside ``serving(model)`` see every turn whole or not at all: each output
  equals the unedited or the fully edited model's, never a mix.
- ``evaluate`` in another thread runs beside an edit.
"""

import threading
import time

import pytest
import torch

from conftest import ToyTokenizer, clone_model, make_tiny, random_requests
from ultraedit_fast import UltraEditor, serving
from ultraedit_fast import evaluate
from ultraedit_fast.parallel.concurrency import ReadWriteLock

LR = 1e-3


def _ids(n=6, length=23, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


def _forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_another_threads_forward_during_capture_is_untouched(monkeypatch):
    """A forward pass in a second thread, run while the editor's hooks are in place (from
    inside the capture loop), gets the unhooked model's logits bit for bit."""
    import ultraedit_fast.core.capture as C
    import ultraedit_fast.model.forward as F
    from ultraedit_fast.model.prefix import supports_split

    model, modules = make_tiny("llama")
    ids = _ids()
    expected = _forward(model, ids)
    assert supports_split(model)  # probed now, not inside the capture
    seen = {}
    real = F.answer_logits

    def answer_logits(*a, **k):
        if "logits" not in seen:  # the hooks are registered now: serve from another thread
            t = threading.Thread(target=lambda: seen.setdefault("logits", _forward(model, ids)))
            t.start()
            t.join()
        return real(*a, **k)

    # the whole pass calls it from the capture, a split pass for its answer rows
    monkeypatch.setattr(C, "answer_logits", answer_logits)
    monkeypatch.setattr(F, "answer_logits", answer_logits)
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, batch_size=4)
    ed.edit(random_requests(12, seed=1))  # must not fail ("ran twice")
    assert torch.equal(seen["logits"], expected)


def _serve_during_edits(model, ed, ids, before, after, turns):
    """A thread that serves in a loop (inside serving()) while ``turns`` turns run; returns
    its outputs."""
    outs, stop, errors = [], threading.Event(), []

    def server():
        try:
            while not stop.is_set():
                with serving(model):
                    outs.append(_forward(model, ids))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=server)
    t.start()
    try:
        for reqs in turns:
            ed.edit(reqs)
        time.sleep(0.05)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not t.is_alive(), "the serving thread deadlocked"
    assert not errors, errors
    return outs


def _classify(out, refs, tol):
    d = [float((out - r).abs().max()) for r in refs]
    return min(range(len(refs)), key=lambda i: d[i]) if min(d) <= tol else None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_serving_sees_a_turn_whole_or_not_at_all(arch):
    model, modules = make_tiny(arch)
    twin = clone_model(model)
    reqs = random_requests(30, seed=3)
    ids = _ids()
    before = _forward(model, ids)
    UltraEditor(twin, ToyTokenizer(), modules=modules, lr=LR, batch_size=4).edit(reqs)
    after = _forward(twin, ids)
    gap = float((after - before).abs().max())
    assert gap > 1e-3  # the edit moves the served logits
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, batch_size=4)
    outs = _serve_during_edits(model, ed, ids, before, after, [reqs])
    assert len(outs) > 3
    kinds = [_classify(o, [before, after], tol=1e-5 * gap + 1e-6) for o in outs]
    assert None not in kinds, "a served output matched neither the unedited nor the edited model"
    assert kinds == sorted(kinds)  # before ... before, after ... after
    assert torch.allclose(_forward(model, ids), after, atol=1e-5 * gap + 1e-6)


def test_serving_while_smollm2_is_edited(fresh_smollm2):
    model, tok = fresh_smollm2
    from ultraedit_fast.data.demo import demo_requests

    reqs = demo_requests()
    ids = tok(
        ["The capital of France is", "Water boils at a temperature of"],
        return_tensors="pt",
        padding=True,
    )["input_ids"]
    before = _forward(model, ids)
    mods = ["model.layers.26.mlp.down_proj", "model.layers.27.mlp.down_proj"]
    ed = UltraEditor(model, tok, modules=mods, lr=3e-3, undo=True)
    outs = _serve_during_edits(model, ed, ids, before, None, [reqs])
    after = _forward(model, ids)
    gap = float((after - before).abs().max())
    assert gap > 1e-2
    kinds = [_classify(o, [before, after], tol=1e-4 * gap) for o in outs]
    assert outs and None not in kinds and kinds == sorted(kinds)
    ed.rollback()  # the session's model is shared: put it back exactly (the fixture does too)


def test_evaluate_in_another_thread_beside_an_edit():
    model, modules = make_tiny("llama")
    twin = clone_model(model)
    reqs = random_requests(20, seed=5)
    scores_before = evaluate(model, ToyTokenizer(), reqs)
    UltraEditor(twin, ToyTokenizer(), modules=modules, lr=LR, batch_size=4).edit(reqs)
    scores_after = evaluate(twin, ToyTokenizer(), reqs)
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, batch_size=4)
    results, stop, errors = [], threading.Event(), []

    def scorer():
        try:
            while not stop.is_set():
                results.append(evaluate(model, ToyTokenizer(), reqs[:4], batch_size=2))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=scorer)
    t.start()
    try:
        report = ed.edit(reqs)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not errors and results and report.n_requests == 20
    assert evaluate(model, ToyTokenizer(), reqs) == scores_after
    assert scores_after != scores_before


def test_the_read_write_lock():
    lock = ReadWriteLock()
    with lock.reading():
        with lock.reading():  # reentrant
            pass
        with pytest.raises(RuntimeError, match="inside serving"):
            with lock.writing():
                pass
    with lock.writing():
        with lock.writing(), lock.reading():  # the writer may read and write again
            pass
    order = []
    entered = threading.Event()

    def reader():
        with lock.reading():
            entered.set()
            time.sleep(0.2)
            order.append("read done")

    t = threading.Thread(target=reader)
    t.start()
    entered.wait()
    with lock.writing():  # waits for the reader
        order.append("write")
    t.join()
    assert order == ["read done", "write"]
