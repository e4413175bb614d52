"""Every artefact the package reads back (checkpoint, weight patch, LoRA adapter) is validated
the same way before anything is built or written: the tensors' bytes against their recorded
sha256 hashes, the manifest against its schema, regular files only, and a bad artefact leaves
the model bit for bit as it was."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ToyTokenizer, clone_model, make_tiny, random_requests
from ultraedit_fast import UltraEditor
from ultraedit_fast.storage import apply_patch, checkpoint, load_lora
from ultraedit_fast.storage.export import BASE_FILE, weight_sha256

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread", "quiet_checkpoints")

ADAPTER = "adapter_model.safetensors"
PATCH_TENSORS = "patch.safetensors"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An edited tiny llama, its unedited base, and its checkpoint, patch and LoRA adapter."""
    root = tmp_path_factory.mktemp("artefacts")
    model, modules = make_tiny("llama")
    base = clone_model(model)
    ed = UltraEditor(model, ToyTokenizer(), modules=modules, lr=3e-2, batch_size=4, undo=True)
    for t in range(2):
        ed.edit(random_requests(6, seed=t))
    ed.save(root / "checkpoint")
    ed.export_patch(root / "patch")
    ed.export_lora(root / "lora")
    return {"model": model, "base": base, "root": root}


def _copy(made, what, tmp_path) -> Path:
    d = tmp_path / what
    shutil.copytree(made["root"] / what, d)
    return d


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()  # no adapter layers were added either
    for k, v in before.items():
        a = after[k].detach().contiguous().reshape(-1).view(torch.uint8)
        assert after[k].dtype == v.dtype and torch.equal(a, v.reshape(-1).view(torch.uint8)), k


def _loader(made, what):
    """The reader of an artefact kind: ``(load(path), the model it writes into)``."""
    if what == "checkpoint":
        model = made["model"]
        return (lambda d: UltraEditor.load(d, model, ToyTokenizer())), model
    fresh = clone_model(made["base"])
    return (lambda d: (apply_patch if what == "patch" else load_lora)(fresh, d)), fresh


def _json(path, change):
    body = json.loads(Path(path).read_text())
    change(body)
    Path(path).write_text(json.dumps(body))


# ----------------------------------------------------------------------------- 1. adapters
def _header(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, 8 + n


def _flip_bit(path, tensor, element, bit):
    """Flip bit ``bit`` of element ``element`` of an fp32 tensor, in the file's bytes."""
    header, start = _header(path)
    assert header[tensor]["dtype"] == "F32"
    at = start + header[tensor]["data_offsets"][0] + 4 * element + bit // 8
    raw = bytearray(Path(path).read_bytes())
    raw[at] ^= 1 << (bit % 8)
    Path(path).write_bytes(bytes(raw))


@pytest.mark.parametrize("which,element", [(0, 0), (-1, -1)])  # first/last tensor and element
@pytest.mark.parametrize("bit", [30, 23, 0])  # exponent bits, the lowest mantissa bit
def test_a_tampered_adapter_tensor_is_refused(made, tmp_path, which, element, bit):
    d = _copy(made, "lora", tmp_path)
    names = sorted(_header(d / ADAPTER)[0])
    name = names[which]
    n = load_file(d / ADAPTER)[name].numel()
    _flip_bit(d / ADAPTER, name, element % n, bit)
    load, model = _loader(made, "lora")
    before = _state(model)
    with pytest.raises(ValueError) as info:
        load(d)
    msg = str(info.value)
    assert ADAPTER in msg and name in msg, msg
    _assert_unchanged(model, before)


def _rewrite_adapter(d, fault):
    """Change the adapter's tensors as ``fault`` says; returns the tensor it names."""
    tensors = load_file(d / ADAPTER)
    name = sorted(tensors)[1]
    if fault == "dropped":
        del tensors[name]
    elif fault == "added":
        name = name.replace("lora_A", "lora_C")
        tensors[name] = torch.zeros(2, 2)
    elif fault == "reshaped":
        tensors[name] = tensors[name].reshape(-1).contiguous()
    elif fault == "dtype":
        tensors[name] = tensors[name].double()
    save_file(tensors, d / ADAPTER, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("fault", ["dropped", "added", "reshaped", "dtype"])
def test_adapter_tensors_other_than_recorded_are_refused(made, tmp_path, fault):
    d = _copy(made, "lora", tmp_path)
    name = _rewrite_adapter(d, fault)
    load, model = _loader(made, "lora")
    before = _state(model)
    with pytest.raises(ValueError) as info:
        load(d)
    msg = str(info.value)
    assert ADAPTER in msg and name in msg, msg
    _assert_unchanged(model, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_adapter_is_refused_even_when_its_hash_matches(made, tmp_path, value):
    d = _copy(made, "lora", tmp_path)
    tensors = load_file(d / ADAPTER)
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[3] = value
    save_file(tensors, d / ADAPTER, metadata={"format": "pt"})
    _json(
        d / BASE_FILE,
        lambda b: b["adapter_weights_sha256"].update({name: weight_sha256(tensors[name])}),
    )
    load, model = _loader(made, "lora")
    before = _state(model)
    with pytest.raises(ValueError) as info:
        load(d)
    msg = str(info.value)
    assert ADAPTER in msg and name in msg and "finite" in msg, msg
    _assert_unchanged(model, before)


def _alter_base(d, fault):
    if fault == "missing":
        os.unlink(d / BASE_FILE)
    elif fault == "hash altered":
        _json(
            d / BASE_FILE,
            lambda b: b["adapter_weights_sha256"].update(
                dict.fromkeys(list(b["adapter_weights_sha256"])[:1], "0" * 64)
            ),
        )
    elif fault == "hashes dropped":  # as an adapter of an older release
        _json(d / BASE_FILE, lambda b: b.pop("adapter_weights_sha256"))
    elif fault == "hash of another tensor":
        _json(
            d / BASE_FILE,
            lambda b: b["adapter_weights_sha256"].update({"x.lora_A.weight": "0" * 64}),
        )


@pytest.mark.parametrize(
    "fault", ["missing", "hash altered", "hashes dropped", "hash of another tensor"]
)
def test_an_adapter_whose_base_file_is_missing_or_altered_is_refused(made, tmp_path, fault):
    d = _copy(made, "lora", tmp_path)
    _alter_base(d, fault)
    load, model = _loader(made, "lora")
    before = _state(model)
    with pytest.raises(ValueError) as info:
        load(d)
    assert BASE_FILE in str(info.value) or ADAPTER in str(info.value), str(info.value)
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------- 2. patches
def _alter_patch(d, fault, which):
    """Alter the patch as ``fault`` says, re-hashing what it changes (a careful forger);
    returns the module it names."""
    tensors = load_file(d / PATCH_TENSORS)
    body = json.loads((d / "patch.json").read_text())
    names = list(body["base"]["weights_sha256"])
    name = names[which]
    hashes = body["edited_weights_sha256"]
    if fault in ("tensor and hash dropped", "tensor dropped"):
        del tensors[name]
    if fault in ("tensor and hash dropped", "hash dropped"):
        del hashes[name]
    if fault == "shape":
        tensors[name] = tensors[name][:-1].contiguous()
    elif fault == "dtype":
        tensors[name] = tensors[name].double()
    elif fault == "bytes":
        tensors[name].view(-1)[0] += 1.0
    elif fault == "extra tensor":
        name = "model.layers.0.mlp.up_proj"
        tensors[name] = torch.zeros(72, 40)
    if fault in ("shape", "dtype", "extra tensor"):
        hashes[name] = weight_sha256(tensors[name])
    save_file(tensors, d / PATCH_TENSORS, metadata={"format": "ultraedit_fast.patch"})
    (d / "patch.json").write_text(json.dumps(body))
    return name


@pytest.mark.parametrize(
    "fault",
    [
        "tensor and hash dropped",
        "tensor dropped",
        "hash dropped",
        "shape",
        "dtype",
        "bytes",
        "extra tensor",
    ],
)
@pytest.mark.parametrize("which", [-1, 2])  # the last module, one in the middle
def test_a_bad_patch_writes_nothing(made, tmp_path, fault, which):
    d = _copy(made, "patch", tmp_path)
    name = _alter_patch(d, fault, which)
    load, model = _loader(made, "patch")
    before = _state(model)
    with pytest.raises(ValueError) as info:
        load(d)
    msg = str(info.value)
    assert "patch." in msg and name in msg, msg
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------- 3. files
FILES = [
    ("checkpoint", "manifest.json"),
    ("checkpoint", "state-"),
    ("patch", "patch.json"),
    ("patch", PATCH_TENSORS),
    ("lora", BASE_FILE),
    ("lora", ADAPTER),
    ("lora", "adapter_config.json"),
]


def _replace(d, prefix, kind) -> Path:
    f = next(p for p in d.iterdir() if p.name.startswith(prefix))
    f.unlink()
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "directory":
        f.mkdir()
    else:
        os.symlink("/dev/null", f)
    return f


def _load_with_watchdog(load, fifo, seconds=30):
    """``(load()'s exception or None, seconds taken)``. A read blocked on the FIFO ``fifo``
    (a C extension may block holding the GIL, so no thread of ours could end it) is released
    after ``seconds`` by another process that keeps opening it as a writer: a regression then
    fails the test instead of hanging it."""
    watchdog = None
    if fifo is not None:
        script = f'sleep {seconds}; while :; do exec 3<>"$1"; exec 3>&-; sleep 0.2; done'
        watchdog = subprocess.Popen(["sh", "-c", script, "sh", str(fifo)])
    start = time.monotonic()
    try:
        load()
        err = None
    except Exception as e:  # noqa: BLE001 - handed to the test
        err = e
    finally:
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
    return err, time.monotonic() - start


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
@pytest.mark.parametrize("what,prefix", FILES)
def test_only_regular_files_are_read(made, tmp_path, what, prefix, kind):
    d = _copy(made, what, tmp_path)
    f = _replace(d, prefix, kind)
    load, model = _loader(made, what)
    before = _state(model)
    err, seconds = _load_with_watchdog(lambda: load(d), f if kind == "fifo" else None)
    assert seconds < 30, f"the load blocked on {f} until released ({err!r})"
    assert isinstance(err, ValueError), repr(err)
    msg = str(err)
    assert f.name in msg and "regular file" in msg, msg
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------- 4. manifests
def _resign(path, change):
    m = Path(path) / "manifest.json"
    body = json.loads(m.read_text())
    body.pop("manifest_sha256")
    change(body)
    body["manifest_sha256"] = hashlib.sha256(checkpoint._canonical(body)).hexdigest()
    m.write_text(json.dumps(body))


def _pop(field):
    def change(body):
        *parents, last = field.split(".")
        for p in parents:
            body = body[p]
        body.pop(last)

    return change


def _set(field, value):
    def change(body):
        *parents, last = field.split(".")
        for p in parents:
            body = body[p]
        body[last] = value

    return change


_VERSIONS = [True, False, -5, 0, 2, "1", 1.0, None]
MANIFEST_CASES = (
    [("checkpoint", "format_version", _set("format_version", v)) for v in _VERSIONS]
    + [("patch", "format_version", _set("format_version", v)) for v in _VERSIONS]
    + [("lora", "format_version", _set("format_version", v)) for v in _VERSIONS]
    + [("lora", "format_version", _pop("format_version"))]
    + [
        ("checkpoint", "fingerprint", _pop("fingerprint")),
        ("checkpoint", "weights_sample_sha256", _pop("weights_sample_sha256")),
        ("checkpoint", "weights_sample_sha256", _set("weights_sample_sha256", 5)),
        ("patch", "base", _pop("base")),
        ("patch", "base", _set("base", "a model")),
        ("patch", "base.fingerprint", _pop("base.fingerprint")),
        ("patch", "base.fingerprint", _set("base.fingerprint", "a model")),
        ("patch", "base.fingerprint", _set("base.fingerprint.parameters", {"x": 1})),
        ("patch", "base.weights_sha256", _pop("base.weights_sha256")),
        ("patch", "base.weights_sha256", _set("base.weights_sha256", ["x"])),
        ("patch", "edited_weights_sha256", _pop("edited_weights_sha256")),
        ("patch", "edited_weights_sha256", _set("edited_weights_sha256", {"x": 5})),
        ("patch", "turns", _set("turns", -1)),
        ("patch", "config", _set("config", [1])),
        ("lora", "fingerprint", _pop("fingerprint")),
        ("lora", "fingerprint", _set("fingerprint", [])),
        ("lora", "fingerprint", _set("fingerprint.modules", "all")),
        ("lora", "weights_sha256", _pop("weights_sha256")),
        ("lora", "weights_sha256", _set("weights_sha256", {"m": "not a hash"})),
        ("lora", "adapter_weights_sha256", _set("adapter_weights_sha256", None)),
    ]
)
MANIFEST_FILE = {"checkpoint": "manifest.json", "patch": "patch.json", "lora": BASE_FILE}


@pytest.mark.parametrize(
    "what,field,change",
    MANIFEST_CASES,
    ids=[f"{w}-{f}-{i}" for i, (w, f, _) in enumerate(MANIFEST_CASES)],
)
def test_every_manifest_is_schema_checked(made, tmp_path, what, field, change):
    d = _copy(made, what, tmp_path)
    if what == "checkpoint":
        _resign(d, change)
    else:
        _json(d / MANIFEST_FILE[what], change)
    load, model = _loader(made, what)
    before = _state(model)
    with pytest.raises(ValueError) as info:
        load(d)
    msg = str(info.value)
    assert MANIFEST_FILE[what] in msg and f"'{field}'" in msg, msg
    _assert_unchanged(model, before)
