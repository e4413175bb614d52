"""One editor per model; concurrent calls are serialised, never interleaved.

Decisions under test (documented in UltraEditor's docstring):
* a second live UltraEditor on a model warns (SharedModelWarning), it does not fail;
* all editors of one model share one lock: edit, rollback and save from any thread run
  one after another, and the outcome is that of some sequential order.
"""

import gc
import threading
import time
import warnings

import pytest
import torch

from conftest import ToyTokenizer, make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.editors.ultraedit import SharedModelWarning

LR = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def make_editor(model, modules, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SharedModelWarning)
        return UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, batch_size=4, **kw)


def in_thread(fn):
    """Run fn in a fresh thread (as the workers do) and return its result."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    t.join()
    return out["r"]


def record_calls(ed, log, pause=0.0):
    """Wrap ed._edit (which runs under the lock) to log when each turn starts and ends."""
    inner = ed._edit

    def wrapped(requests):
        start = time.perf_counter()
        time.sleep(pause)  # widen the window in which an unserialised call would overlap
        try:
            return inner(requests)
        finally:
            log.append((start, time.perf_counter()))

    ed._edit = wrapped


def assert_no_overlap(intervals):
    intervals = sorted(intervals)
    for (s1, e1), (s2, e2) in zip(intervals, intervals[1:]):
        assert e1 <= s2, "two turns ran at the same time"


def test_concurrent_edits_equal_a_sequential_run():
    model, modules = make_tiny("llama")
    ed = make_editor(model, modules)
    intervals = []
    record_calls(ed, intervals, pause=0.005)
    jobs = {seed: random_requests(4 + seed % 5, seed=seed) for seed in range(8)}
    done = {}
    errors = []
    barrier = threading.Barrier(4)

    def worker(seeds):
        try:
            barrier.wait()
            for s in seeds:
                done[s] = ed.edit(jobs[s]).turn
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=([k, k + 4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(done.values()) == list(range(1, 9)) and ed.turns == 8
    assert_no_overlap(intervals)

    # the same turns, one after another, in the order the lock let them through
    order = sorted(done, key=done.get)
    ref_model, _ = make_tiny("llama")
    ref = make_editor(ref_model, modules)

    def sequential():
        for s in order:
            ref.edit(jobs[s])

    in_thread(sequential)
    for k, v in model.state_dict().items():
        assert torch.equal(bits(v), bits(ref_model.state_dict()[k])), k
    assert set(ed.normalizers) == set(ref.normalizers)
    for key, s in ed.normalizers.items():
        r = ref.normalizers[key]
        assert s.n == r.n and all(
            torch.equal(bits(getattr(s, p)), bits(getattr(r, p))) for p in ("mean", "acc", "std")
        )


def test_second_live_editor_on_a_model_warns_and_shares_the_lock():
    model, modules = make_tiny("llama")
    first = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR)
    with pytest.warns(SharedModelWarning, match="model: it already has a live UltraEditor"):
        second = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR)
    assert first._lock is second._lock
    other, _ = make_tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SharedModelWarning)
        third = UltraEditor(other, ToyTokenizer(), modules=modules, lr=LR)  # another model
        assert third._lock is not first._lock
        del first, second
        gc.collect()
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR)  # no live editor: silent


def test_two_editors_of_one_model_never_interleave():
    model, modules = make_tiny("llama")
    eds = [make_editor(model, modules), make_editor(model, modules)]
    intervals, errors = [], []
    for ed in eds:
        record_calls(ed, intervals, pause=0.01)

    def worker(ed, seed):
        try:
            for i in range(3):
                ed.edit(random_requests(5, seed=10 * seed + i))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ed, i)) for i, ed in enumerate(eds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(intervals) == 6
    assert_no_overlap(intervals)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_save_and_rollback_while_editing(tmp_path):
    """Checkpoints taken while another thread edits are each a consistent turn; rollback
    from a third thread waits for the turn in progress."""
    model, modules = make_tiny("llama")
    ed = make_editor(model, modules, undo=True)
    states = {0: {}}
    snapshots = {}
    errors = []
    stop = threading.Event()

    def editor_thread():
        try:
            for i in range(6):
                ed.edit(random_requests(5, seed=i))
                states[ed.turns] = dict(ed.normalizers)  # only this thread edits
                snapshots[ed.turns] = [bits(v).clone() for v in model.state_dict().values()]
        except BaseException as e:  # pragma: no cover
            errors.append(e)
        finally:
            stop.set()

    saved = []

    def saver_thread():
        try:
            k = 0
            while not stop.is_set():
                d = tmp_path / f"c{k}"
                ed.save(d)
                saved.append(d)
                k += 1
                time.sleep(0.002)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=editor_thread), threading.Thread(target=saver_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert saved
    for d in saved:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loaded = UltraEditor.load(d, make_tiny("llama")[0], ToyTokenizer())
        expected = states[loaded.turns]
        assert set(loaded.normalizers) == set(expected)
        for key, s in loaded.normalizers.items():
            assert s.n == expected[key].n and torch.equal(bits(s.mean), bits(expected[key].mean))
        assert loaded.undo_turns == loaded.turns

    # rollback racing an edit: both run, one after the other, in either order
    def weights_are(turn):
        return all(
            torch.equal(bits(v), w) for v, w in zip(model.state_dict().values(), snapshots[turn])
        )

    t = threading.Thread(target=lambda: ed.edit(random_requests(5, seed=99)))
    t.start()
    ed.rollback(1)
    t.join()
    assert ed.turns == 6
    if not weights_are(6):  # the rollback went first: turn 6 was replaced by the new one
        ed.rollback(1)
        assert weights_are(5)
