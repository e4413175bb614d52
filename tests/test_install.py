"""Every install path, in fresh virtual environments: from the checkout with build isolation
(the default) and without, from the sdist, and a built wheel installed elsewhere, including
a wheel that meets a torch it was not built for. Each installed package must import from
outside the tree, report the compiled backend, and match the default kernels.

The venvs borrow torch and the other dependencies from the running interpreter (a ``.pth``
file), so nothing large is downloaded; pip builds in isolation with setuptools and wheel from
the package index. Compiled kernels go to a cache shared by the test's venvs."""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.install, pytest.mark.slow]

CHECK = textwrap.dedent("""
    import json, sys, torch
    import ultraedit_fast as u
    from ultraedit_fast.kernels import backends, ops, extension
    info = u.backend_info("cpu")
    be = backends.resolve_backend("cpp", "cpu")
    g = torch.Generator().manual_seed(0)
    ks = [torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)]
    gs = [torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)]
    st = [torch.zeros(11) for _ in range(3)]
    ref = [torch.zeros(11) for _ in range(3)]
    be.normalizer_update_(*st, ks, gs, 0)
    ops.normalizer_update_default(*ref, ks, gs, 0)
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(st, ref))
    print(json.dumps({"file": u.__file__, "info": info, "same": same,
                      "source": extension.source(), "status": extension.status()}))
""")


def _venv(path):
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    py = os.path.join(path, "bin", "python")
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    with open(os.path.join(purelib, "borrowed.pth"), "w") as f:  # torch & co, not copied
        f.write(here + "\n")
    return py


def _pip(py, *args, env=None, timeout=1200):
    out = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out


def _check(py, cwd, env):
    out = subprocess.run(
        [py, "-c", CHECK], cwd=cwd, capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert not res["file"].startswith(ROOT + os.sep), res  # imported from the install
    assert "backend 'cpp' on cpu" in res["info"], res
    assert res["same"], res
    return res, out.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kernel-cache")
    e = dict(
        os.environ,
        ULTRAEDIT_FAST_CACHE=str(cache),
        PIP_NO_INPUT="1",
        ULTRAEDIT_FAST_SKIP_CUDA="1",
        MAX_JOBS="2",
    )
    e.pop("PYTHONPATH", None)
    return e


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The checkout without its build outputs (an in-place .so would shadow the build)."""
    dst = tmp_path_factory.mktemp("src") / "ultraedit_fast"
    shutil.copytree(
        ROOT,
        dst,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "build",
            "*.egg-info",
            "*.so",
            "_build_info.json",
            "__pycache__",
            ".pytest_cache",
            "results",
            "out",
        ),
    )
    return str(dst)


def test_isolated_install_compiles_for_the_installed_torch(tmp_path, env, source_copy):
    py = _venv(tmp_path / "v")
    _pip(py, source_copy, env=env)  # build isolation: no torch while building
    res, err = _check(py, tmp_path, env)
    assert res["source"] == "compiled for this torch"
    assert "no extension was built at install time" in res["status"]["prebuilt"]
    assert "compiling the C++ kernels" in err  # the one log line of the first use


def test_install_without_isolation_builds_against_the_installed_torch(tmp_path, env, source_copy):
    py = _venv(tmp_path / "v")
    _pip(py, "setuptools>=77", "wheel", env=env)  # a build without isolation uses these
    _pip(py, "--no-build-isolation", source_copy, env=env)
    res, err = _check(py, tmp_path, env)
    assert res["source"] == "install" and "compiling" not in err


def test_sdist_holds_every_source_and_installs(tmp_path, env, source_copy):
    out = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), source_copy],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,) = glob.glob(str(tmp_path / "dist" / "*.tar.gz"))
    import tarfile

    names = tarfile.open(sdist).getnames()
    for needed in (
        "csrc/ultraedit_fast.cpp",
        "csrc/cuda/ultraedit_fast_cuda.cu",
        "csrc/checks.h",
        "tests/conftest.py",
        "LICENSE",
        "ultraedit_fast/kernels/triton_kernels.py",
        "ultraedit_fast/py.typed",
    ):
        assert any(n.endswith(needed) for n in names), needed
    py = _venv(tmp_path / "v")
    _pip(py, sdist, env=env)
    _check(py, tmp_path, env)


def test_a_wheel_installed_elsewhere_and_one_meeting_another_torch(tmp_path, env, source_copy):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheels"),
            source_copy,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "wheels" / "*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("kernels/_build_info.json") for n in names)
    assert any("kernels/csrc/" in n for n in names)  # the sources travel with it
    py = _venv(tmp_path / "v")
    _pip(py, wheel, env=env)
    res, _ = _check(py, tmp_path, env)
    assert res["source"] == "install"
    # the same wheel where torch is another version: the stamp says so, the extension
    # is not loaded, the kernels are compiled for this torch
    stamp = subprocess.run(
        [py, "-c", "import ultraedit_fast.kernels.extension as e; print(e.STAMP)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    ).stdout.strip()
    with open(stamp, "w") as f:
        f.write('{"torch": "0.0.1", "cuda": null}')
    res, err = _check(py, tmp_path, env)
    assert res["source"] == "compiled for this torch"
    assert "built for torch 0.0.1" in res["status"]["prebuilt"]
