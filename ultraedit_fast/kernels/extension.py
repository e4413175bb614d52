"""The compiled kernels (C++ for the CPU, CUDA where there is one), for the torch at hand.

An extension that links torch's C++ library must be built against the very torch it runs on.
It is loaded on first use (when a backend is chosen), in this order:

1. the extension built at install time (``pip install --no-build-isolation``, which builds
   against the torch already installed), if the build stamp beside it names this torch;
2. otherwise (an isolated build, whose build environment has no torch and builds nothing; a
   wheel built against another torch; a torch upgraded since), the kernels are compiled once
   for this torch from the sources shipped in the package, and cached
   (``$ULTRAEDIT_FAST_CACHE``, default ``~/.cache/ultraedit_fast``), with one log line while
   it compiles;
3. if that cannot be done (no compiler, ``ULTRAEDIT_FAST_JIT=0``, a cache path that is a
   file, lies under one or cannot be written), a warning says why and how to fix it, and
   the package runs on its pure-PyTorch default kernels.

Nothing here imports the rest of the package.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import stat
import threading
from typing import Dict, Optional

import torch

from .._log import log

HERE = os.path.dirname(os.path.abspath(__file__))
STAMP = os.path.join(HERE, "_build_info.json")
PACKAGE = __name__.rsplit(".", 1)[0]  # ultraedit_fast.kernels
_STATE: Dict[str, Optional[str]] = {}
_LOCK = threading.Lock()


def torch_build() -> Dict[str, Optional[str]]:
    """What an extension must have been built against to load here."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda}


def sources_dir() -> Optional[str]:
    """The kernels' sources: shipped in the package (``kernels/csrc``), or the checkout's
    ``csrc/`` (an editable install)."""
    for d in (os.path.join(HERE, "csrc"), os.path.join(HERE, os.pardir, os.pardir, "csrc")):
        if os.path.isfile(os.path.join(d, "ultraedit_fast.cpp")):
            return os.path.abspath(d)
    return None


BAD_CACHE = "the kernel cache"


def _fix(err: Optional[str] = None) -> str:
    if err is not None and BAD_CACHE in err:
        return "set ULTRAEDIT_FAST_CACHE to a writable directory (or unset it for the default)"
    return (
        "install a C++ compiler (g++) and `pip install ninja`, or build at install time "
        "with `pip install --no-build-isolation .` against the installed torch"
    )


def _cache_dir(name: str):
    """``(build_dir, None)`` with the build directory created (and listable) under the
    cache, or ``(None, why not)``: a cache path that is a file, lies under a file, or sits
    in a directory that cannot be written is a fallback, never an exception."""
    cache = os.environ.get("ULTRAEDIT_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ultraedit_fast"
    )
    build_dir = os.path.join(cache, name)
    try:
        os.makedirs(build_dir, exist_ok=True)
        if not os.path.isdir(build_dir):
            raise NotADirectoryError(f"{build_dir} is not a directory")
        os.listdir(build_dir)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        return None, f"{BAD_CACHE} {cache!r} cannot be used ({type(e).__name__}: {e})"
    return build_dir, None


def _load_prebuilt() -> Optional[str]:
    """None when the install-time extension is loaded, else why it is not."""
    if importlib.util.find_spec(f"{PACKAGE}._C") is None:
        return "no extension was built at install time"
    try:
        with open(STAMP) as f:
            built = json.load(f)
    except (OSError, ValueError):
        return "the extension has no build stamp (built by an older version?)"
    here = torch_build()
    if {k: built.get(k) for k in here} != here:
        return (
            f"the extension was built for torch {built.get('torch')} (CUDA "
            f"{built.get('cuda')}), this is torch {here['torch']} (CUDA {here['cuda']})"
        )
    try:
        importlib.import_module(f"{PACKAGE}._C")  # registers the CPU/CUDA kernels
    except (ImportError, OSError) as e:
        return f"the extension failed to load: {e}"
    return None


def _cuda_ok() -> bool:
    from torch.utils import cpp_extension as ce

    nvcc = shutil.which("nvcc") or (
        os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None
    )
    return (
        torch.version.cuda is not None
        and torch.cuda.is_available()
        and nvcc is not None
        and os.path.exists(nvcc)
        and os.environ.get("ULTRAEDIT_FAST_SKIP_CUDA") != "1"
    )


def _build_here(why: str) -> Optional[str]:
    """Compile the kernels for this torch (cached); None when loaded, else why not."""
    src = sources_dir()
    if src is None:
        return f"{why}, and the kernels' sources are not in the package"
    from torch.utils import cpp_extension as ce

    cpp = [os.path.join(src, "ultraedit_fast.cpp")]
    cu = [os.path.join(src, "cuda", "ultraedit_fast_cuda.cu")]
    with_cuda = _cuda_ok() and os.path.exists(cu[0])
    files = cpp + (cu if with_cuda else []) + [os.path.join(src, "checks.h")]
    h = hashlib.sha256(json.dumps([torch_build(), with_cuda]).encode())
    for p in files:
        if os.path.exists(p):
            with open(p, "rb") as f:
                h.update(f.read())
    build_dir, bad = _cache_dir(f"kernels-{h.hexdigest()[:16]}")
    if build_dir is None:
        return f"{why}; {bad}"
    flags = ["-O3", "-fno-trapping-math", "-fopenmp"]
    if with_cuda:
        flags.append("-DULTRAEDIT_WITH_CUDA")
    altered = _check_cached_library(build_dir)
    if altered is not None:
        return f"{why}; {altered}"
    built_before = any(f.endswith(".so") for f in os.listdir(build_dir))
    if not built_before:
        log.warning(
            "ultraedit_fast: %s; compiling the C++%s kernels for torch %s once "
            "(once per torch version and sources), cached in %s",
            why,
            " and CUDA" if with_cuda else "",
            torch.__version__,
            build_dir,
        )
    else:
        log.info(
            "ultraedit_fast: %s; using the kernels compiled for torch %s in %s",
            why,
            torch.__version__,
            build_dir,
        )
    try:
        ce.load(
            name="ultraedit_fast_kernels",
            sources=cpp + (cu if with_cuda else []),
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3", "-DULTRAEDIT_WITH_CUDA"],
            with_cuda=with_cuda,
            build_directory=build_dir,
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure falls back, with the reason
        first = str(e).strip().splitlines()
        return f"{why}; compiling the kernels for this torch failed ({first[0] if first else e})"
    _record_cached_library(build_dir)
    return None


LIBRARY = "ultraedit_fast_kernels.so"
LIBRARY_HASH = LIBRARY + ".sha256"


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_cached_library(build_dir: str) -> Optional[str]:
    """A cached library is loaded only as it was built: a regular file whose sha256 is the
    one recorded beside it when it was compiled here; else why not (the package then runs
    on its PyTorch kernels, and deleting the directory makes it compile again)."""
    lib, rec = os.path.join(build_dir, LIBRARY), os.path.join(build_dir, LIBRARY_HASH)
    if not os.path.lexists(lib) or not os.path.exists(rec):
        return None  # nothing cached yet, or cached before hashes were recorded
    try:
        if os.path.islink(lib) or not stat.S_ISREG(os.stat(lib).st_mode):
            raise ValueError("it is not a regular file")
        with open(rec) as f:
            want = f.read().strip()
        if _file_sha256(lib) != want:
            raise ValueError("its sha256 is not the one recorded when it was compiled")
    except (OSError, ValueError) as e:
        return (
            f"{BAD_CACHE} holds a compiled library {lib!r} that cannot be trusted ({e}); "
            f"delete {build_dir!r} to compile it again"
        )
    return None


def _record_cached_library(build_dir: str) -> None:
    lib = os.path.join(build_dir, LIBRARY)
    if not os.path.isfile(lib):
        return
    tmp = os.path.join(build_dir, f".{LIBRARY_HASH}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(_file_sha256(lib) + "\n")
        os.replace(tmp, os.path.join(build_dir, LIBRARY_HASH))
    except OSError:  # a cache we cannot write into still serves this process
        pass


def ensure() -> Optional[str]:
    """Load the compiled kernels if they can be had (once per process); returns ``None``
    when they are loaded, else why they are not (and the package runs on the defaults)."""
    with _LOCK:
        if "error" in _STATE:
            return _STATE["error"]
        err = _load_prebuilt()
        source = "install"
        _STATE["prebuilt"] = err  # why the install-time extension was not used, if not
        if err is not None:
            if os.environ.get("ULTRAEDIT_FAST_JIT", "1") == "0":
                err = f"{err}; ULTRAEDIT_FAST_JIT=0: not compiling them"
            else:
                err = _build_here(err)
                source = "compiled for this torch"
        _STATE["error"] = err
        _STATE["source"] = None if err else source
        if err is not None:
            log.warning(
                "ultraedit_fast: the compiled kernels are not available (%s); running "
                "on the PyTorch default kernels. To fix: %s",
                err,
                _fix(err),
            )
        else:
            log.info("ultraedit_fast: compiled kernels loaded (%s)", source)
        return err


def source() -> Optional[str]:
    """Where the loaded kernels came from (``install`` / ``compiled for this torch``)."""
    ensure()
    return _STATE.get("source")


def status() -> Dict[str, Optional[str]]:
    """``{"source", "error", "prebuilt"}``: where the kernels came from, why they are not
    loaded (``None``: they are), and why the install-time extension was not used."""
    ensure()
    return {k: _STATE.get(k) for k in ("source", "error", "prebuilt")}
