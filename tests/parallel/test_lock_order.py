"""One lock order for every entry point (ultraedit_fast.parallel.concurrency): a thread inside
serving() never waits for the editor's lock, a reader cannot become a writer, and a waiting
writer does not hold back forever a reader that another reader waits for.

Each scenario runs in daemon threads under a timeout, so a deadlock fails the test instead
of hanging the suite."""

import random
import threading
import time
import warnings

import pytest
import torch

from conftest import ToyTokenizer, make_tiny, random_requests
from ultraedit_fast import UltraEditor, serving
from ultraedit_fast.editors.ultraedit import SharedModelWarning
from ultraedit_fast.parallel.concurrency import model_locks

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT = 60.0


def editor(model, modules, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SharedModelWarning)
        return UltraEditor(model, ToyTokenizer(), modules=modules, lr=1e-4, batch_size=4, **kw)


def start(fn, errors):
    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_for_a_waiting_writer(model):
    lock = model_locks(model).weights
    deadline = time.monotonic() + TIMEOUT
    while not lock._waiting_writers:
        assert time.monotonic() < deadline, "the edit never reached its apply phase"
        time.sleep(0.001)


def joined(*threads):
    for t in threads:
        t.join(TIMEOUT)
    return not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("call", ["save", "export_patch", "export_lora"])
def test_a_server_reads_the_editor_while_an_edit_waits_to_apply(tmp_path, call):
    model, modules = make_tiny("llama")
    ed = editor(model, modules, undo=True)
    ed.edit(random_requests(4, seed=1))
    errors, inside, done = [], threading.Event(), threading.Event()
    out = {}

    def server():
        with serving(model):
            inside.set()
            wait_for_a_waiting_writer(model)
            if call == "save":
                out["r"] = ed.save(tmp_path / "ckpt")
            elif call == "export_patch":
                out["r"] = ed.export_patch(tmp_path / "patch")
            else:
                out["r"] = ed.export_lora(tmp_path / "lora")
            done.set()

    s = start(server, errors)
    inside.wait(TIMEOUT)
    e = start(lambda: ed.edit(random_requests(4, seed=2)), errors)
    assert joined(s, e), f"{call} inside serving() deadlocked with a pending edit"
    assert not errors, errors
    assert done.is_set() and out["r"] and ed.turns == 2


@pytest.mark.parametrize("call", ["edit", "rollback", "configure"])
def test_a_writer_inside_serving_is_refused_at_once(call):
    model, modules = make_tiny("llama")
    ed = editor(model, modules, undo=True)
    ed.edit(random_requests(4, seed=1))
    errors, inside = [], threading.Event()
    refused = []

    def server():
        with serving(model):
            inside.set()
            wait_for_a_waiting_writer(model)
            try:
                if call == "edit":
                    ed.edit(random_requests(4, seed=3))
                elif call == "rollback":
                    ed.rollback(1)
                else:
                    ed.configure(lr=2e-4)
            except RuntimeError as e:
                refused.append(str(e))

    s = start(server, errors)
    inside.wait(TIMEOUT)
    e = start(lambda: ed.edit(random_requests(4, seed=2)), errors)
    assert joined(s, e), f"{call} inside serving() deadlocked with a pending edit"
    assert not errors, errors
    assert refused and "inside serving()" in refused[0] and refused[0].startswith(call)


def test_a_server_waiting_for_a_worker_that_serves_does_not_stall():
    """The server holds the read lock and joins a worker that enters serving() while an
    edit waits to apply: the writer's patience lets the worker in."""
    model, modules = make_tiny("llama")
    ed = editor(model, modules)
    ids = torch.tensor([[5, 6, 7]])
    errors, inside = [], threading.Event()

    def worker():
        with serving(model), torch.no_grad():
            model(ids)

    def server():
        with serving(model):
            inside.set()
            wait_for_a_waiting_writer(model)
            w = start(worker, errors)
            w.join(TIMEOUT)
            assert not w.is_alive(), "the worker never got the read lock"

    s = start(server, errors)
    inside.wait(TIMEOUT)
    e = start(lambda: ed.edit(random_requests(4, seed=2)), errors)
    assert joined(s, e)
    assert not errors, errors
    assert ed.turns == 1


def test_random_interleavings_of_every_entry_point(tmp_path):
    """Servers, editors, rollbacks, saves and exports from many threads in random order:
    everything finishes, nothing fails but the documented refusals, and the model stays
    finite."""
    model, modules = make_tiny("llama")
    ed = editor(model, modules, undo=True)
    ed.edit(random_requests(4, seed=0))
    ids = torch.tensor([[5, 6, 7, 8]])
    errors = []
    stop = time.monotonic() + 8.0

    def actor(k):
        rng = random.Random(k)
        i = 0
        while time.monotonic() < stop:
            i += 1
            what = rng.choice(
                ["serve", "serve_save", "serve_export", "edit", "rollback", "save", "serve_edit"]
            )
            try:
                if what.startswith("serve"):
                    with serving(model), torch.no_grad():
                        model(ids)
                        if what == "serve_save":
                            ed.save(tmp_path / f"c{k}")
                        elif what == "serve_export":
                            try:
                                ed.export_patch(tmp_path / f"p{k}")
                            except ValueError as e:  # rolled back to the unedited model
                                assert "no turn was made" in str(e) and ed.turns == 0
                        elif what == "serve_edit":
                            try:
                                ed.edit(random_requests(2, seed=k * 1000 + i))
                            except RuntimeError as e:
                                assert "inside serving()" in str(e)
                elif what == "edit":
                    ed.edit(random_requests(3, seed=k * 1000 + i))
                elif what == "rollback":
                    if ed.undo_turns > 1:
                        try:
                            ed.rollback(1)
                        except ValueError:
                            pass  # another thread rolled back first
                else:
                    ed.save(tmp_path / f"s{k}")
            except BaseException as e:  # noqa: BLE001
                errors.append((what, e))
                return

    threads = [start(lambda k=k: actor(k), errors) for k in range(6)]
    assert joined(*threads), "a thread was still waiting long after the run ended"
    assert not errors, errors
    assert all(torch.isfinite(p).all() for p in model.parameters())
