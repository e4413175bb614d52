"""A kernel cache that cannot be used (``ULTRAEDIT_FAST_CACHE`` a file, under a file, under a
missing directory of a file, an immutable directory) must not crash the editor: like any
other reason the kernels cannot be compiled, it falls back to the PyTorch kernels with the
warning that names the reason and the fix, and ``backend_info()`` says why.

The cases run in one child process in which the install-time extension is never loaded
(its check is patched to refuse it), so the kernels must be compiled for this torch: the
path that creates the cache directory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

CHILD = textwrap.dedent("""
    import json, logging, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import make_tiny, ToyTokenizer
    import ultraedit_fast as u
    from ultraedit_fast.kernels import extension

    extension._load_prebuilt = lambda: "forced: no install-time extension"
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))

    logging.getLogger("ultraedit_fast").addHandler(Keep())
    out = {}
    for name, path in json.loads(sys.argv[2]).items():
        import os
        os.environ["ULTRAEDIT_FAST_CACHE"] = path
        extension._STATE.clear()
        records.clear()
        model, modules = make_tiny("llama")
        try:
            ed = u.UltraEditor(model, ToyTokenizer(), modules=modules)
            res = {"backend": ed.backend, "info": u.backend_info("cpu"),
                   "error": extension.status()["error"]}
        except Exception as e:
            res = {"raised": f"{type(e).__name__}: {e}"}
        res["warnings"] = [m for lvl, m in records if lvl == "WARNING"]
        out[name] = res
    print("RESULT " + json.dumps(out))
""")


def _immutable(path):
    """``path`` made immutable with ``chattr +i`` (which stops even root), else None."""
    os.makedirs(path)
    try:
        r = subprocess.run(["chattr", "+i", path], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    try:
        os.mkdir(os.path.join(path, "probe"))
    except OSError:
        return path
    os.rmdir(os.path.join(path, "probe"))
    subprocess.run(["chattr", "-i", path], timeout=30)
    return None


def test_an_unusable_kernel_cache_falls_back_to_the_pytorch_kernels(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = {
        "is a file": str(a_file),
        "under a file": str(a_file / "cache"),
        "missing parent under a file": str(a_file / "missing" / "cache"),
    }
    frozen = _immutable(str(tmp_path / "immutable"))
    if frozen is not None:
        cases["immutable directory"] = frozen
    try:
        env = {k: v for k, v in os.environ.items() if k != "ULTRAEDIT_FAST_JIT"}
        env.pop("ULTRAEDIT_FAST_BACKEND", None)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, TESTS, json.dumps(cases)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    finally:
        if frozen is not None:
            subprocess.run(["chattr", "-i", frozen], timeout=30)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert set(out) == set(cases)
    for name, res in out.items():
        assert "raised" not in res, f"{name}: the editor raised {res['raised']}"
        assert res["backend"] == "torch", (name, res)
        assert "kernel cache" in res["error"] and cases[name] in res["error"], (name, res)
        assert "kernel cache" in res["info"], (name, res)
        warned = [w for w in res["warnings"] if "PyTorch default kernels" in w]
        assert len(warned) == 1, (name, res["warnings"])
        assert "kernel cache" in warned[0] and "ULTRAEDIT_FAST_CACHE" in warned[0], warned
    if frozen is None:
        pytest.skip("chattr +i is not available here: the immutable case did not run")


LOAD = textwrap.dedent("""
    import json, logging, os, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import make_tiny, ToyTokenizer
    import ultraedit_fast as u
    from ultraedit_fast.kernels import extension

    extension._load_prebuilt = lambda: "forced: no install-time extension"
    warnings = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelname == "WARNING":
                warnings.append(record.getMessage())

    logging.getLogger("ultraedit_fast").addHandler(Keep())
    model, modules = make_tiny("llama")
    ed = u.UltraEditor(model, ToyTokenizer(), modules=modules)
    print("RESULT " + json.dumps({"backend": ed.backend, "warnings": warnings}))
""")


def _load_in_child(cache):
    env = dict(os.environ, ULTRAEDIT_FAST_CACHE=str(cache), ULTRAEDIT_FAST_JIT="1")
    r = subprocess.run(
        [sys.executable, "-c", LOAD, TESTS], capture_output=True, text=True, env=env, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
def test_an_altered_cached_library_is_not_loaded(tmp_path):
    """The compiled library in the cache is loaded only with the sha256 recorded when it
    was compiled: a flipped byte falls back to the PyTorch kernels, naming the file."""
    first = _load_in_child(tmp_path)
    if first["backend"] != "cpp":
        pytest.skip(f"the kernels could not be compiled here: {first['warnings']}")
    (lib,) = [p for p in tmp_path.rglob("ultraedit_fast_kernels.so")]
    assert (lib.parent / "ultraedit_fast_kernels.so.sha256").exists()
    assert _load_in_child(tmp_path)["backend"] == "cpp"  # as built: loaded again
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0x01
    lib.write_bytes(bytes(data))
    after = _load_in_child(tmp_path)
    assert after["backend"] == "torch"
    assert any("cannot be trusted" in w and str(lib) in w for w in after["warnings"])
