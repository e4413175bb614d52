"""Checkpoints (UltraEditor.save / UltraEditor.load) and the undo log (rollback)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_model

from conftest import ToyTokenizer, make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.storage import checkpoint
from ultraedit_fast.storage.checkpoint import CheckpointWeightsWarning

LR = 1e-4
TESTS = Path(__file__).resolve().parents[1]  # the tests root (conftest.py)
ROOT = TESTS.parent


pytestmark = pytest.mark.usefixtures("one_thread", "quiet_checkpoints")


def bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights(model, expected):
    sd = model.state_dict()
    assert sd.keys() == expected.keys()
    for k in sd:
        assert same(sd[k], expected[k]), k


def assert_states(a, b):
    assert set(a) == set(b)
    for key in a:
        x, y = a[key], b[key]
        assert (x.d_in, x.d_out, x.n) == (y.d_in, y.d_out, y.n), key
        for part in ("mean", "acc", "std"):
            assert same(getattr(x, part), getattr(y, part)), (key, part)


def turn_requests(i):
    return random_requests(5 + (3 * i) % 7, seed=1000 + i)


def editor(model, modules, **kw):
    kw.setdefault("lr", LR)
    kw.setdefault("batch_size", 4)
    return UltraEditor(model, ToyTokenizer(), modules=modules, **kw)


def run_turns(arch, n, **kw):
    model, modules = make_tiny(arch)
    ed = editor(model, modules, **kw)
    for i in range(n):
        ed.edit(turn_requests(i))
    return model, ed


def child_env():
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)  # this module, which the children import
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), here, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_round_trip(arch, tmp_path):
    model, ed = run_turns(arch, 2, undo=True, tokens_per_pass=512)
    path = ed.save(tmp_path / "ckpt")
    assert os.path.basename(path) == "manifest.json"
    files = sorted(f for f in os.listdir(tmp_path / "ckpt") if not f.startswith("."))
    assert len(files) == 2 and files[0] == "manifest.json" and files[1].startswith("state-")
    body = json.loads(Path(path).read_text())
    assert body["turns"] == 2 and body["config"]["lr"] == LR
    assert body["config"]["modules"] == ed.module_names
    assert body["fingerprint"]["class"] == type(model).__name__
    assert body["versions"]["torch"] == torch.__version__

    ed2 = UltraEditor.load(tmp_path / "ckpt", model, ToyTokenizer())
    assert ed2.turns == 2 and ed2.lr == ed.lr and ed2.batch_size == ed.batch_size
    assert ed2.tokens_per_pass == ed.tokens_per_pass == 512
    assert ed2.module_names == ed.module_names and ed2.undo is True
    assert_states(ed2.normalizers, ed.normalizers)
    assert ed2.undo_turns == 2
    # the reloaded log undoes exactly like the original
    expected = weights(model)
    ed.rollback(1)
    after_one = weights(model)
    states_one = dict(ed.normalizers)
    for k, v in expected.items():
        model.state_dict()[k].copy_(v)
    ed2.rollback(1)
    assert_weights(model, after_one)
    assert_states(ed2.normalizers, states_one)


def test_save_overwrites_and_keeps_one_tensor_file(tmp_path):
    model, ed = run_turns("llama", 1)
    ed.save(tmp_path)
    ed.save(tmp_path)  # same content, same tensor file name
    ed.edit(turn_requests(1))
    ed.save(tmp_path)
    names = [f for f in os.listdir(tmp_path) if f.startswith("state-")]
    assert len(names) == 1
    assert UltraEditor.load(tmp_path, model, ToyTokenizer()).turns == 2


_RESUME = r"""
import sys, torch
from safetensors.torch import load_model, save_model
from conftest import ToyTokenizer, make_tiny
from test_persistence import turn_requests
from ultraedit_fast import UltraEditor
ckpt, weights_in, out_ckpt, weights_out = sys.argv[1:5]
torch.set_num_threads(1)
model, modules = make_tiny("llama", seed=123)   # other init: the saved weights replace it
load_model(model, weights_in)
ed = UltraEditor.load(ckpt, model, ToyTokenizer())
assert ed.turns == 2, ed.turns
ed.edit(turn_requests(2))
ed.save(out_ckpt)
save_model(model, weights_out)
"""


def test_resume_in_a_new_process_is_bit_exact(tmp_path):
    """2 turns, save, load in a new process, 1 more turn == 3 uninterrupted turns."""
    model, ed = run_turns("llama", 2, undo=True)
    ed.save(tmp_path / "ckpt2")
    save_model(model, str(tmp_path / "w2.safetensors"))
    script = tmp_path / "resume.py"
    script.write_text(_RESUME)
    res = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "ckpt2"),
            str(tmp_path / "w2.safetensors"),
            str(tmp_path / "ckpt3"),
            str(tmp_path / "w3.safetensors"),
        ],
        env=child_env(),
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]

    ref_model, ref = run_turns("llama", 3, undo=True)
    model3, _ = make_tiny("llama", seed=7)
    load_model(model3, str(tmp_path / "w3.safetensors"))
    assert_weights(model3, weights(ref_model))
    resumed = UltraEditor.load(tmp_path / "ckpt3", model3, ToyTokenizer())
    assert resumed.turns == 3
    assert_states(resumed.normalizers, ref.normalizers)
    # the undo log crossed both processes: all three turns come off, exactly
    original, _ = make_tiny("llama")
    resumed.rollback(3)
    assert_weights(model3, weights(original))
    assert resumed.normalizers == {} and resumed.turns == 0


# ----------------------------------------------------------------------------- atomicity
# The kill test's child imports neither transformers nor conftest (which imports it): it
# starts in about a second. Parent and child build everything from this one source.
_TINY_SRC = r"""
import random
from types import SimpleNamespace
import torch
from ultraedit_fast import EditRequest, UltraEditor


class TinyLM(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(101, 24)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"up": torch.nn.Linear(24, 48), "down": torch.nn.Linear(48, 24)})
            for _ in range(2))
        self.head = torch.nn.Linear(24, 101)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](h)))
        return SimpleNamespace(logits=self.head(h))


class Tok:
    def __call__(self, text, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [3 + ord(c) % 98 for c in text]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def tiny_requests(i):
    rng = random.Random(i)
    word = lambda: "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 12)))
    return [EditRequest(word() + "?", word().strip() or "x") for _ in range(4)]


def tiny_editor(undo=2):
    model = TinyLM()
    return model, UltraEditor(model, Tok(), modules=["blocks.0.up", "blocks.1.up",
                                                     "blocks.1.down"],
                              lr=1e-3, batch_size=3, undo=undo)
"""

_KILLED = (
    _TINY_SRC
    + r"""
import sys
ckpt, progress = sys.argv[1:3]
torch.set_num_threads(1)
model, ed = tiny_editor()
i = 0
while True:
    ed.edit(tiny_requests(i))
    i += 1
    for _ in range(2):   # the second save rewrites the same content
        ed.save(ckpt)
    with open(progress, "a") as f:
        f.write(f"{i}\n")
"""
)
TINY = {}
exec(compile(_TINY_SRC, "<tiny>", "exec"), TINY)


def _reference_states(n):
    """Normaliser states and weights after each of n turns of the child's run."""
    model, ed = TINY["tiny_editor"]()
    out = []
    for i in range(n):
        ed.edit(TINY["tiny_requests"](i))
        out.append((dict(ed.normalizers), weights(model)))
    return out


def _check_consistent(ckpt, reference, lo):
    model = TINY["TinyLM"]()
    ed = UltraEditor.load(ckpt, model, TINY["Tok"]())
    t = ed.turns
    assert lo <= t <= lo + 1, (t, lo)
    states, w = reference[t - 1]
    assert_states(ed.normalizers, states)
    # the undo log in the file is the log of the same turn: rolling it back replays
    # base + factors, whose result must be the reference weights t - 1 turns in
    for k, v in w.items():
        model.state_dict()[k].copy_(v)
    ed.rollback(1)
    if t >= 2:
        assert_states(ed.normalizers, reference[t - 2][0])
        assert_weights(model, reference[t - 2][1])
    return t


def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "saver.py"
    script.write_text(_KILLED)
    rng = random.Random(0)
    reference = _reference_states(60)
    seen = []
    for rnd in range(3):
        progress = tmp_path / f"progress{rnd}"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(ckpt), str(progress)],
            env=child_env(),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        want = rng.randint(3, 8)
        deadline = time.time() + 240
        done = 0
        try:
            while done < want:
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.time() < deadline, "the saver made no progress"
                time.sleep(0.01)
                if progress.exists():
                    done = len(progress.read_text().split())
            time.sleep(rng.uniform(0, 0.05))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        done = len(progress.read_text().split())
        assert done < len(reference)
        seen.append(_check_consistent(ckpt, reference, done))
    assert all(t >= 3 for t in seen)


class _Crash(BaseException):
    """Stands in for the process dying at one point of a save."""


def test_crash_at_every_step_of_save_leaves_old_or_new(tmp_path, monkeypatch):
    """Each file operation of a save (fsync, rename, delete) is made to 'crash' in turn;
    the directory then loads as the old checkpoint or the new one, never anything else."""
    import shutil

    model, ed = run_turns("llama", 1, undo=True)
    old_states = dict(ed.normalizers)
    ed.save(tmp_path / "old")
    ed.edit(turn_requests(1))
    new_states = dict(ed.normalizers)

    real = {"replace": os.replace, "fsync": os.fsync, "unlink": os.unlink}
    state = {"armed": False, "calls": 0, "crash_at": 0}

    def hook(name):
        def f(*a, **k):
            if state["armed"]:
                state["calls"] += 1
                if state["calls"] == state["crash_at"]:
                    state["armed"] = False
                    raise _Crash(name)
            return real[name](*a, **k)

        return f

    for name in real:
        monkeypatch.setattr(os, name, hook(name))

    def save_into(d, crash_at):
        shutil.copytree(tmp_path / "old", d)
        state.update(armed=True, calls=0, crash_at=crash_at)
        try:
            ed.save(d)
        except _Crash:
            pass
        finally:
            state["armed"] = False
        return state["calls"]

    steps = save_into(tmp_path / "probe", 0)  # how many operations a save makes
    assert steps >= 6
    outcomes = []
    for k in range(1, steps + 1):
        d = tmp_path / f"crash{k}"
        save_into(d, k)
        loaded = UltraEditor.load(d, model, ToyTokenizer())
        assert loaded.turns in (1, 2), k
        assert_states(loaded.normalizers, old_states if loaded.turns == 1 else new_states)
        outcomes.append(loaded.turns)
    # early crashes keep the old checkpoint, late ones (after the manifest) the new one
    assert outcomes[0] == 1 and outcomes[-1] == 2
    assert outcomes == sorted(outcomes)


# ----------------------------------------------------------------------------- bad checkpoints
def _tensor_file(path):
    return next(p for p in Path(path).iterdir() if p.name.startswith("state-"))


@pytest.fixture
def saved(tmp_path):
    model, ed = run_turns("llama", 1, undo=True)
    ed.save(tmp_path / "c")
    return model, tmp_path / "c"


def test_truncated_tensor_file_is_refused(saved):
    model, path = saved
    f = _tensor_file(path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{f.name}.*truncated"):
        UltraEditor.load(path, model, ToyTokenizer())


def test_tampered_tensor_file_is_refused(saved):
    model, path = saved
    f = _tensor_file(path)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{f.name}.*hash mismatch"):
        UltraEditor.load(path, model, ToyTokenizer())


def test_tampered_manifest_is_refused(saved):
    model, path = saved
    m = path / "manifest.json"
    body = json.loads(m.read_text())
    body["turns"] = 7
    m.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="manifest.json.*hash mismatch"):
        UltraEditor.load(path, model, ToyTokenizer())


def test_truncated_manifest_is_refused(saved):
    model, path = saved
    m = path / "manifest.json"
    m.write_bytes(m.read_bytes()[:100])
    with pytest.raises(ValueError, match="manifest.json.*not valid JSON"):
        UltraEditor.load(path, model, ToyTokenizer())


def test_invalid_safetensors_with_matching_hash_is_refused(saved):
    """A consistent manifest naming a file that is not safetensors: the header error is
    a ValueError naming the file."""
    import hashlib

    model, path = saved
    f = _tensor_file(path)
    garbage = b"\xff" * 64
    f.write_bytes(garbage)
    m = path / "manifest.json"
    body = json.loads(m.read_text())
    body.pop("manifest_sha256")
    body["tensors"]["sha256"] = hashlib.sha256(garbage).hexdigest()
    body["tensors"]["bytes"] = len(garbage)
    body["manifest_sha256"] = hashlib.sha256(checkpoint._canonical(body)).hexdigest()
    m.write_text(json.dumps(body))
    with pytest.raises(ValueError, match=f"{f.name}.*not a valid safetensors"):
        UltraEditor.load(path, model, ToyTokenizer())


def test_missing_and_foreign_paths(tmp_path, saved):
    model, path = saved
    with pytest.raises(FileNotFoundError, match="nothing"):
        UltraEditor.load(tmp_path / "nothing", model, ToyTokenizer())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest.json.*missing"):
        UltraEditor.load(tmp_path / "empty", model, ToyTokenizer())
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        UltraEditor.load(tmp_path / "file.txt", model, ToyTokenizer())
    _tensor_file(path).unlink()
    with pytest.raises(ValueError, match="missing; the checkpoint is incomplete"):
        UltraEditor.load(path, model, ToyTokenizer())
    with pytest.raises(TypeError, match="path"):
        UltraEditor.load(42, model, ToyTokenizer())
    with pytest.raises(ValueError, match="not a directory"):
        run_turns("llama", 0)[1].save(tmp_path / "file.txt")


def test_manifest_path_is_accepted(saved):
    model, path = saved
    assert UltraEditor.load(path / "manifest.json", model, ToyTokenizer()).turns == 1


def _llama(**over):
    import transformers as T
    from transformers import AutoModelForCausalLM

    cfg = dict(
        vocab_size=101,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg.update(over)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(T.LlamaConfig(**cfg)).eval()


def test_checkpoint_of_another_model_is_refused(saved):
    _, path = saved
    with pytest.raises(
        ValueError,
        match=r"mlp\.up_proj' shape: checkpoint \[72, 40\], "
        r"model \[80, 40\]",
    ):
        UltraEditor.load(path, _llama(intermediate_size=80), ToyTokenizer())
    with pytest.raises(
        ValueError,
        match=r"module 'model\.layers\.2\.mlp\.up_proj': in the "
        r"checkpoint, not an editable module",
    ):
        UltraEditor.load(path, _llama(num_hidden_layers=2), ToyTokenizer())
    with pytest.raises(ValueError, match=r"dtype: checkpoint float32, model bfloat16"):
        UltraEditor.load(path, _llama().to(torch.bfloat16), ToyTokenizer())
    with pytest.raises(ValueError, match=r"parameter shapes differ: model\.embed_tokens"):
        UltraEditor.load(path, _llama(vocab_size=120), ToyTokenizer())
    gpt2, _ = make_tiny("gpt2")
    with pytest.raises(
        ValueError,
        match=r"class: checkpoint 'LlamaForCausalLM', model "
        r"'GPT2LMHeadModel'",
    ):
        UltraEditor.load(path, gpt2, ToyTokenizer())


def test_load_overrides(saved):
    model, path = saved
    ed = UltraEditor.load(
        path,
        model,
        ToyTokenizer(),
        lr=3e-4,
        batch_size=2,
        undo=False,
        backend="torch",
        transactional=False,
        tokens_per_pass=0,
    )
    assert (ed.lr, ed.batch_size, ed.undo, ed.backend, ed.transactional, ed.tokens_per_pass) == (
        3e-4,
        2,
        False,
        "torch",
        False,
        0,
    )
    assert ed.undo_turns == 0
    with pytest.raises(ValueError, match="modules: fixed by the checkpoint"):
        UltraEditor.load(path, model, ToyTokenizer(), modules=["model.layers.1.mlp.up_proj"])
    with pytest.raises(ValueError, match="share_normalizer: fixed"):
        UltraEditor.load(path, model, ToyTokenizer(), share_normalizer=False)
    with pytest.raises(TypeError, match="unexpected option 'colour'"):
        UltraEditor.load(path, model, ToyTokenizer(), colour=1)
    with pytest.raises(ValueError, match="lr"):
        UltraEditor.load(path, model, ToyTokenizer(), lr=float("nan"))


def test_weights_other_than_saved_warn(saved):
    _, path = saved
    fresh, _ = make_tiny("llama")  # the unedited weights
    with pytest.warns(CheckpointWeightsWarning, match="load the edited model's weights"):
        UltraEditor.load(path, fresh, ToyTokenizer())


def test_save_without_undo_log(tmp_path):
    model, ed = run_turns("llama", 2, undo=True)
    ed.save(tmp_path, undo_log=False)
    loaded = UltraEditor.load(tmp_path, model, ToyTokenizer())
    assert loaded.turns == 2 and loaded.undo_turns == 0


# ----------------------------------------------------------------------------- undo
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rollback_is_exact(arch):
    model, modules = make_tiny(arch)
    ed = editor(model, modules, undo=True)
    history = [(weights(model), dict(ed.normalizers))]
    for i in range(4):
        ed.edit(turn_requests(i))
        history.append((weights(model), dict(ed.normalizers)))
    assert ed.undo_turns == 4
    ed.rollback()
    assert ed.turns == 3 and ed.undo_turns == 3
    assert_weights(model, history[3][0])
    assert_states(ed.normalizers, history[3][1])
    ed.rollback(2)
    assert ed.turns == 1
    assert_weights(model, history[1][0])
    assert_states(ed.normalizers, history[1][1])
    # editing on after a rollback is the run that never had the undone turns
    ed.edit(turn_requests(9))
    other, other_ed = run_turns(arch, 1, undo=False)
    other_ed.edit(turn_requests(9))
    assert_weights(model, weights(other))
    assert_states(ed.normalizers, other_ed.normalizers)
    ed.rollback(2)
    assert_weights(model, history[0][0])
    assert ed.normalizers == {} and ed.turns == 0 and ed.undo_turns == 0
    with pytest.raises(ValueError, match="turns: 1 turns to undo, but only 0"):
        ed.rollback()


def test_bounded_undo_folds_old_turns_exactly():
    model, modules = make_tiny("llama")
    ed = editor(model, modules, undo=2)
    history = [weights(model)]
    for i in range(5):
        ed.edit(turn_requests(i))
        history.append(weights(model))
        assert ed.undo_turns == min(i + 1, 2)
    with pytest.raises(ValueError, match="turns: 3 turns to undo, but only 2 can be"):
        ed.rollback(3)
    ed.rollback(2)
    assert ed.turns == 3
    assert_weights(model, history[3])


def test_rollback_of_a_primal_turn():
    """N > d_in: the factors are (Delta, I) and the identity is not stored."""
    model, modules = make_tiny("llama")
    before = weights(model)
    ed = editor(model, modules, undo=True, batch_size=10)
    ed.edit(random_requests(60, seed=5))
    rec = ed._undo.turns[0]
    assert all(i is None for i in rec.kk.values()) and rec.keys == []
    ed.rollback()
    assert_weights(model, before)


def test_undo_memory_matches_the_formula():
    model, modules = make_tiny("llama")
    ed = editor(model, modules, undo=True)
    report = ed.edit(random_requests(3, seed=1))
    n = report.n_tokens
    assert n <= 40  # the dual side for every module (d_in >= 40)
    shapes = {t.name: t.shape for t in ed.targets}  # (d_in, d_out)
    # gate_proj and up_proj of layer 1 read the same input: 3 distinct key matrices
    distinct_inputs = {
        "model.layers.1.mlp.up_proj",
        "model.layers.2.mlp.up_proj",
        "model.layers.2.mlp.down_proj",
    }
    per_turn = sum(n * d_out * 4 for _, d_out in shapes.values()) + sum(
        n * shapes[m][0] * 4 for m in distinct_inputs
    )
    base = sum(d_in * d_out * 4 for d_in, d_out in shapes.values())
    assert ed.undo_memory() == {"base": base, "turns": [per_turn], "total": base + per_turn}
    assert run_turns("llama", 1)[1].undo_memory()["total"] == 0


def test_rollback_arguments():
    model, ed = run_turns("llama", 1, undo=False)
    with pytest.raises(ValueError, match="keeps no undo log"):
        ed.rollback()
    model, ed = run_turns("llama", 1, undo=True)
    with pytest.raises(ValueError, match="turns: expected a number of turns >= 1"):
        ed.rollback(0)
    with pytest.raises(TypeError, match="turns: expected an int"):
        ed.rollback("1")
    with pytest.raises(TypeError, match="undo"):
        editor(model, ["model.layers.1.mlp.up_proj"], undo="yes")
    with pytest.raises(ValueError, match="undo"):
        editor(model, ["model.layers.1.mlp.up_proj"], undo=-1)


def test_refused_turn_is_not_logged():
    model, ed = run_turns("llama", 1, undo=True)
    before = weights(model)
    ed.configure(lr=1e38)  # the shifts overflow: the turn is refused
    from ultraedit_fast import EditRefused

    with pytest.raises(EditRefused):
        ed.edit(turn_requests(1))
    assert ed.undo_turns == 1 and ed.turns == 1
    assert_weights(model, before)


def test_load_with_a_shorter_undo_log_folds_exactly(tmp_path):
    model, modules = make_tiny("llama")
    ed = editor(model, modules, undo=True)
    history = [weights(model)]
    for i in range(3):
        ed.edit(turn_requests(i))
        history.append(weights(model))
    ed.save(tmp_path)
    loaded = UltraEditor.load(tmp_path, model, ToyTokenizer(), undo=1)
    assert loaded.undo == 1 and loaded.undo_turns == 1
    loaded.rollback(1)
    assert_weights(model, history[2])
    with pytest.raises(ValueError, match="turns: 1 turns to undo, but only 0"):
        loaded.rollback(1)


def test_save_removes_temporary_files_of_dead_writers(tmp_path):
    model, ed = run_turns("llama", 1)
    ed.save(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".state.safetensors.tmp-{dead.pid}-abcd1234"
    live = tmp_path / f".manifest.json.tmp-{os.getppid()}-abcd1234"  # a live writer's
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    ed.save(tmp_path)
    assert not stale.exists() and live.exists()
    live.unlink()
    assert UltraEditor.load(tmp_path, model, ToyTokenizer()).turns == 1
