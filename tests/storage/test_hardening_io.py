"""Holes a hostile user found in what touches the disk and the process: a load racing saves,
temporary files a kill leaves, manifest fields that pass the self-hash but are nonsense,
unreadable or looping paths, CLI output paths found unusable only at the end, a missing
plotting library, and peak-memory counters reset behind the user's back."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ToyTokenizer, make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.storage import checkpoint

TESTS = Path(__file__).resolve().parents[1]  # the tests root (conftest.py)
LR = 1e-4
pytestmark = pytest.mark.usefixtures("quiet_checkpoints")


def _editor(turns=1, **kw):
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, batch_size=4, **kw)
    for t in range(turns):
        ed.edit(random_requests(8, seed=t))
    return model, ed


def _rewrite(path, change):
    """Change the manifest with ``change(body)`` and re-sign it, as a careful forger would."""
    m = Path(path) / "manifest.json"
    body = json.loads(m.read_text())
    body.pop("manifest_sha256")
    change(body)
    body["manifest_sha256"] = hashlib.sha256(checkpoint._canonical(body)).hexdigest()
    m.write_text(json.dumps(body))


# ----------------------------------------------------------------------------- load vs save
_SAVER = textwrap.dedent("""
    import sys, time, warnings
    sys.path.insert(0, sys.argv[1])
    warnings.simplefilter("ignore")
    from conftest import ToyTokenizer, make_tiny, random_requests
    from ultraedit_fast import UltraEditor
    eds = []
    for turns in (1, 2):
        model, modules = make_tiny("llama")
        ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=1e-4, batch_size=4)
        for t in range(turns):
            ed.edit(random_requests(8, seed=t))
        eds.append(ed)
    print("ready", flush=True)
    end = time.monotonic() + float(sys.argv[3])
    i = 0
    while time.monotonic() < end:
        eds[i % 2].save(sys.argv[2])
        i += 1
    print(i, flush=True)
""")


def test_a_load_racing_saves_sees_one_whole_checkpoint(tmp_path):
    seconds = float(os.environ.get("UEF_RACE_SECONDS", "30"))
    path = tmp_path / "ckpt"
    _, ed1 = _editor(1)
    _, ed2 = _editor(2)
    expected = {
        1: {k: s.n for k, s in ed1.normalizers.items()},
        2: {k: s.n for k, s in ed2.normalizers.items()},
    }
    ed1.save(path)
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    saver = subprocess.Popen(
        [sys.executable, str(script), str(TESTS), str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert saver.stdout.readline().strip() == "ready"
    model, _ = make_tiny("llama")
    loads, failures = 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got = UltraEditor.load(path, model, ToyTokenizer())
        except Exception as e:  # noqa: BLE001 - every failure is counted
            failures.append(f"{type(e).__name__}: {e}")
            continue
        loads += 1
        assert {k: s.n for k, s in got.normalizers.items()} == expected[got.turns]
    saves = int(saver.communicate(timeout=120)[0].strip())
    assert saver.returncode == 0
    assert not failures, f"{len(failures)} of {loads + len(failures)} loads failed: {failures[:3]}"
    assert loads > 20 and saves > 20, (loads, saves)


# ----------------------------------------------------------------------------- temp files
def test_saves_leave_no_temporary_files_and_follow_the_umask(tmp_path):
    _, ed = _editor(1)
    path = tmp_path / "ckpt"
    path.mkdir()
    # what a writer killed mid-save left: one of ours (its pid is gone) and one of the
    # kind safetensors' own writer makes
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    ours = path / f".state.safetensors.tmp-{dead}-0123abcd"
    foreign = path / ".tmpAb3xYz"
    for f in (ours, foreign):
        f.write_bytes(b"x" * 1000)
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    old = os.umask(0o022)
    try:
        ed.save(path)
        ed.save(path)
    finally:
        os.umask(old)
    names = sorted(os.listdir(path))
    assert [n for n in names if not n.startswith("state-")] == [".lock", "manifest.json"]
    tensor = [n for n in names if n.startswith("state-")]
    assert len(tensor) == 1
    assert (os.stat(path / tensor[0]).st_mode & 0o777) == 0o644


# ----------------------------------------------------------------------------- manifest fields
@pytest.mark.parametrize(
    "field,change",
    [
        ("turns", lambda b: b.update(turns=-1)),
        ("turns", lambda b: b.update(turns=10**40)),
        ("turns", lambda b: b.update(turns="3")),
        ("normalizers", lambda b: b.update(normalizers=[])),
        ("states[0].n", lambda b: b["states"][0].update(n=10**40)),
        ("states[0].n", lambda b: b["states"][0].update(n=-5)),
        ("states[0].d_in", lambda b: b["states"][0].update(d_in=0)),
        ("fingerprint", lambda b: b.update(fingerprint="a model")),
        ("fingerprint", lambda b: b["fingerprint"].update(parameters={"x": 1})),
        ("normalizers[0].state", lambda b: b["normalizers"][0].update(state=99)),
        ("normalizers[0]", lambda b: b["normalizers"][0].update(key={"a": 1})),
        ("config", lambda b: b.update(config=[1, 2])),
        ("config.lr", lambda b: b["config"].update(lr="fast")),
        ("config.batch_size", lambda b: b["config"].update(batch_size=0)),
        ("config.modules", lambda b: b["config"].pop("modules")),
        ("undo_log", lambda b: b.update(undo_log=[1])),
        ("tensors.bytes", lambda b: b["tensors"].update(bytes=-1)),
    ],
)
def test_every_manifest_field_is_validated(tmp_path, field, change):
    model, ed = _editor(2)
    path = tmp_path / "ckpt"
    ed.save(path)
    _rewrite(path, change)
    with pytest.raises(ValueError) as info:
        UltraEditor.load(path, model, ToyTokenizer())
    msg = str(info.value)
    assert "manifest.json" in msg and f"'{field}'" in msg, msg


def test_manifest_with_a_missing_normaliser_after_turns(tmp_path):
    model, modules = make_tiny("llama")
    ed = UltraEditor(
        model, ToyTokenizer(), modules=modules, lr=LR, batch_size=4, share_normalizer=False
    )
    ed.edit(random_requests(8))
    path = tmp_path / "ckpt"
    ed.save(path)
    _rewrite(path, lambda b: b["normalizers"].pop())
    with pytest.raises(ValueError, match=r"manifest\.json: field 'normalizers': no state for"):
        UltraEditor.load(path, model, ToyTokenizer())


# ----------------------------------------------------------------------------- paths
def test_an_unreadable_checkpoint_says_so(tmp_path, monkeypatch):
    model, ed = _editor(1)
    path = tmp_path / "ckpt"
    ed.save(path)
    real = checkpoint._read_bytes

    def denied(p, *a):
        if os.path.dirname(p) == str(path):
            raise PermissionError(13, "Permission denied", p)
        return real(p, *a)

    monkeypatch.setattr(checkpoint, "_read_bytes", denied)
    with pytest.raises(ValueError, match="manifest.json: permission denied"):
        UltraEditor.load(path, model, ToyTokenizer())
    monkeypatch.setattr(checkpoint, "_read_bytes", real)
    monkeypatch.setattr(
        checkpoint.os,
        "stat",
        lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", p)),
    )
    with pytest.raises(ValueError, match="permission denied"):
        UltraEditor.load(path, model, ToyTokenizer())


def test_saving_into_a_symlink_loop_is_a_clear_error(tmp_path):
    _, ed = _editor(1)
    a, b = tmp_path / "a", tmp_path / "b"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(ValueError, match="symbolic link that leads nowhere"):
        ed.save(a)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(ValueError, match="symbolic link that leads nowhere"):
        ed.save(tmp_path / "dangling")


# ----------------------------------------------------------------------------- the CLI
def _zsre(tmp_path, n=4):
    recs = [
        {
            "subject": "s",
            "src": f"What is the capital of country {i}?",
            "pred": "x",
            "rephrase": f"Capital of country {i}?",
            "alt": "Rome",
            "answers": ["Paris"],
            "loc": "nq question: who wrote hamlet",
            "loc_ans": "Shakespeare",
            "cond": "c",
        }
        for i in range(n)
    ]
    p = tmp_path / "zsre.json"
    p.write_text(json.dumps(recs))
    return p


def test_cli_output_paths_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from ultraedit_fast.cli import commands as cli

    data = _zsre(tmp_path)
    loaded = []
    monkeypatch.setattr(
        cli,
        "_load",
        lambda args: (
            loaded.append(1) or (_ for _ in ()).throw(AssertionError("the model must not load"))
        ),
    )
    (tmp_path / "afile").write_text("x")
    for flag, bad in (
        ("--output-dir", tmp_path / "afile"),
        ("--output-dir", tmp_path / "afile" / "below"),
        ("--save-model", tmp_path / "afile"),
    ):
        argv = [
            "run",
            "--data",
            str(data),
            "--turns",
            "1",
            "--edits-per-turn",
            "2",
            "--output-dir",
            str(tmp_path / "out"),
        ]
        if flag == "--output-dir":
            argv[argv.index("--output-dir") + 1] = str(bad)
        else:
            argv += [flag, str(bad)]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], err
    assert not loaded


def test_results_survive_a_missing_plotting_library(tmp_path, monkeypatch, caplog):
    from ultraedit_fast.lifelong.runner import run_lifelong

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    model, modules = make_tiny("llama")
    res = run_lifelong(
        model,
        ToyTokenizer(),
        random_requests(8),
        turns=2,
        edits_per_turn=4,
        modules=modules,
        lr=LR,
        batch_size=4,
        progress=False,
        output_dir=str(tmp_path),
    )
    assert os.path.exists(tmp_path / "lifelong.json") and "plot" not in res["files"]
    assert not os.path.exists(tmp_path / "lifelong.png")
    assert any("matplotlib is not installed" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "lifelong.json").read_text())
    assert saved["metrics"]["ES"] == res["metrics"]["ES"]


def test_cli_names_the_record_that_is_too_long(tmp_path, capsys, monkeypatch):
    from ultraedit_fast.cli import commands as cli

    recs = json.loads(_zsre(tmp_path, 3).read_text())
    recs[2]["rephrase"] = "word " * 400  # beyond the tiny model's 128 positions
    data = tmp_path / "long.json"
    data.write_text(json.dumps(recs))
    model, _ = make_tiny("llama")
    monkeypatch.setattr(cli, "_load", lambda args: (model, ToyTokenizer()))
    assert cli.main(["eval", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "long.json: record 2 (rephrase)" in err[0], err


def test_bench_usage_errors_are_one_line(capsys):
    from ultraedit_fast.cli import main

    assert main(["bench", "--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bogus" in err[0], err


# ----------------------------------------------------------------------------- peak memory
def test_an_edit_leaves_the_process_peak_counters_alone(monkeypatch):
    import ultraedit_fast.utils.environment as E

    resets = []
    monkeypatch.setattr(E, "reset_peak_rss", lambda: resets.append(1) or True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(2))
    model, ed = _editor(0)
    rep = ed.edit(random_requests(8))
    assert not resets and rep.peak_memory_bytes is None and "peak" not in str(rep)
    ed.configure(measure_memory=True)  # opt in: the report then has the turn's peak
    rep = ed.edit(random_requests(8, seed=2))
    assert resets == [1] and rep.peak_memory_bytes > 0
