"""Holes a hostile user found (one test per hole): edits of the output layer, one module under
two names, lone surrogates, requests that bypass their own checks, flags that must be
booleans, data files that are pipes, FIFOs, badly encoded or nested without end."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest


from conftest import ToyTokenizer, clone_model, make_tiny, random_requests
from ultraedit_fast import EditRequest, ReferenceEditor, UltraEditor
from ultraedit_fast.data.datasets import DataFormatError, load_requests
from ultraedit_fast.model.requests import as_requests

LR = 1e-3


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- the output layer
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gpt2", True)])
def test_the_output_layer_is_edited_as_the_reference_edits_it(arch, tied, one_thread):
    model, _ = make_tiny(arch)
    if tied and arch == "llama":
        model.lm_head.weight = model.model.embed_tokens.weight
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    ref_model = clone_model(model)
    if tied and arch == "llama":
        ref_model.lm_head.weight = ref_model.model.embed_tokens.weight
    w0 = model.lm_head.weight.detach().clone()
    fast = UltraEditor(model, ToyTokenizer(), modules=["lm_head"], lr=LR, batch_size=4)
    ref = ReferenceEditor(ref_model, ToyTokenizer(), modules=["lm_head"], lr=LR, batch_size=4)
    for turn in range(2):
        reqs = random_requests(9, seed=turn)
        fast.edit(reqs)
        ref.edit(reqs)
    shift_fast = model.lm_head.weight.detach() - w0
    shift_ref = ref_model.lm_head.weight.detach() - w0
    assert shift_ref.abs().max() > 0
    assert _rel(shift_fast, shift_ref) < 1e-4


# ----------------------------------------------------------------------------- aliases
def test_a_module_under_two_names_is_refused():
    model, _ = make_tiny("llama")
    model.alias = model.model.layers[1].mlp  # the same MLP reachable twice
    for cls in (UltraEditor, ReferenceEditor):
        with pytest.raises(
            ValueError,
            match=r"'model\.layers\.1\.mlp\.up_proj' and "
            r"'alias\.up_proj' are the same module",
        ):
            cls(
                model,
                ToyTokenizer(),
                modules=["model.layers.1.mlp.up_proj", "alias.up_proj"],
                lr=LR,
            )


# ----------------------------------------------------------------------------- requests
@pytest.mark.parametrize("field", ["prompt", "target", "rephrase", "locality_prompt"])
def test_lone_surrogates_are_refused_naming_the_request(field):
    good = {
        "prompt": "The capital of France is",
        "target": "Paris",
        "rephrase": "France's capital is",
        "locality_prompt": "Water boils at",
        "locality_answer": "100",
    }
    bad = dict(good, **{field: good[field] + "\ud800"})
    with pytest.raises(
        ValueError,
        match=rf"requests\[1\]: EditRequest\.{field}: contains a "
        "lone surrogate",
    ):
        as_requests([good, bad])
    with pytest.raises(ValueError, match="lone surrogate"):
        EditRequest(**bad)


def test_data_files_with_surrogate_escapes_name_the_record(tmp_path):
    p = tmp_path / "cf.json"
    rec = {
        "prompt": "The capital of France is",
        "target_new": "Rome",
        "subject": "France",
        "ground_truth": "Paris",
        "rephrase_prompt": "France's capital:",
        "locality_prompt": "Water boils at",
        "locality_ground_truth": "100",
    }
    bad = dict(rec, target_new="Ro\\ud800me")
    p.write_text(
        "[" + json.dumps(rec) + "," + json.dumps(bad).replace("\\\\ud800", "\\ud800") + "]"
    )
    with pytest.raises(DataFormatError, match=r"record 1: .*lone surrogate"):
        list(load_requests(p))
    assert len(list(load_requests(p, on_error="skip"))) == 1


def test_requests_that_skipped_their_own_checks_are_refused():
    class Unchecked(EditRequest):
        def __post_init__(self):  # skips the checks
            pass

    with pytest.raises(
        ValueError,
        match=r"requests\[0\]: EditRequest\.target: expected a "
        "non-empty string",
    ):
        as_requests([Unchecked("The capital of France is", "")])
    r = EditRequest("The capital of France is", "Paris")
    object.__setattr__(r, "target", "   ")
    with pytest.raises(ValueError, match=r"requests\[2\]: EditRequest\.target"):
        as_requests([EditRequest("a", "b"), EditRequest("c", "d"), r])
    object.__setattr__(r, "target", 7)
    with pytest.raises(TypeError, match=r"requests\[0\]: EditRequest\.target: expected str"):
        as_requests([r])
    model, modules = make_tiny("llama")
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR)
    with pytest.raises(TypeError, match=r"requests\[0\]"):
        ed.edit([r])
    assert ed.turns == 0


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flag", ["share_normalizer", "transactional"])
@pytest.mark.parametrize("value", ["no", "false", 0, 1, None, 1.0])
def test_flags_must_be_booleans(flag, value):
    model, modules = make_tiny("llama")
    with pytest.raises(TypeError, match=rf"{flag}: expected True or False, got"):
        UltraEditor(model, ToyTokenizer(), modules=modules, lr=LR, **{flag: value})
    if flag == "share_normalizer":
        with pytest.raises(TypeError, match=rf"{flag}: expected True or False"):
            ReferenceEditor(model, ToyTokenizer(), modules=modules, lr=LR, **{flag: value})


# ----------------------------------------------------------------------------- data files
_REC = {
    "prompt": "The capital of France is",
    "target_new": "Rome",
    "subject": "France",
    "ground_truth": "Paris",
    "rephrase_prompt": "France's capital:",
    "locality_prompt": "Water boils at",
    "locality_ground_truth": "100",
}


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_pipe_is_read_once(tmp_path, jsonl):
    text = "\n".join(json.dumps(_REC) for _ in range(3)) + "\n" if jsonl else json.dumps([_REC] * 3)
    r, w = os.pipe()

    def write():
        with os.fdopen(w, "w") as f:
            f.write(text)

    t = threading.Thread(target=write)
    t.start()
    try:
        reqs = list(load_requests(f"/proc/self/fd/{r}"))
    finally:
        t.join()
        os.close(r)
    assert len(reqs) == 3 and reqs[0].target == "Rome"


def test_a_fifo_nobody_writes_to_is_an_error_not_a_hang(tmp_path, monkeypatch):
    import ultraedit_fast.data.jsonstream as D

    monkeypatch.setattr(D, "_FIFO_WAIT_S", 0.5)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(DataFormatError, match="FIFO .* nothing wrote to"):
        list(load_requests(fifo))
    assert time.monotonic() - t0 < 5


def test_a_fifo_with_a_writer_is_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"open({str(fifo)!r}, 'w').write({json.dumps(json.dumps([_REC, _REC]))})",
        ]
    )
    try:
        reqs = list(load_requests(fifo))
    finally:
        writer.wait(timeout=30)
    assert len(reqs) == 2


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_a_utf8_error_names_its_byte_offset(tmp_path, chunk):
    good = json.dumps([_REC, dict(_REC, target_new="Zürich")], ensure_ascii=False).encode()
    at = good.index("Zürich".encode()) + 1  # the first byte of "ü"
    data = good[:at] + b"\xff" + good[at + 2 :]
    p = tmp_path / "bad.json"
    p.write_bytes(b"\xef\xbb\xbf" + data)  # with a byte-order mark: 3 bytes before
    with pytest.raises(DataFormatError, match=rf"not valid UTF-8 at byte {at + 3}\b"):
        list(load_requests(p, chunk_size=chunk))
    lines = (json.dumps(_REC) + "\n").encode() + data[data.index(b"{", 2) :] + b"\n"
    q = tmp_path / "bad.jsonl"
    q.write_bytes(lines)
    want = lines.index(b"\xff")
    with pytest.raises(DataFormatError, match=rf"not valid UTF-8 at byte {want}\b"):
        list(load_requests(q, chunk_size=chunk))


def test_deeply_nested_json_is_one_clear_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100000)
    with pytest.raises(DataFormatError, match=r"deep\.json: .*nested too deeply"):
        list(load_requests(p))
    with pytest.raises(DataFormatError, match="nested too deeply"):
        list(load_requests(p, on_error="skip"))  # an array cannot be resynchronised
    q = tmp_path / "deep.jsonl"
    q.write_text(json.dumps(_REC) + "\n" + "[" * 100000 + "\n" + json.dumps(_REC) + "\n")
    with pytest.raises(DataFormatError, match=r"record 1: line 2: nested too deeply"):
        list(load_requests(q))
    assert len(list(load_requests(q, on_error="skip"))) == 2


@pytest.mark.parametrize("command", ["run", "eval"])
def test_the_cli_reports_deep_json_in_one_line(tmp_path, capsys, command):
    from ultraedit_fast.cli import main

    p = tmp_path / "deep.json"
    p.write_text("[" * 100000)
    argv = [command, "--data", str(p)]
    argv += (
        ["--turns", "1", "--edits-per-turn", "1", "--output-dir", str(tmp_path / "o")]
        if command == "run"
        else []
    )
    for extra in ([], ["--skip-malformed"]):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "deep.json" in err[0] and "nested too deeply" in err[0], err
