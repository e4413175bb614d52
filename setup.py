"""Build of ultraedit_fast's compiled kernels.

An extension that links torch must be built against the torch it runs on, so:

* ``pip install --no-build-isolation [-e] .`` (torch importable while building) builds
  ``ultraedit_fast.kernels._C`` against the installed torch, and stamps it with that torch's
  version: a ``CUDAExtension`` (C++ CPU + CUDA kernels) when torch is a CUDA build and
  ``nvcc`` is found, a ``CppExtension`` (C++ CPU kernels, OpenMP) otherwise;
* ``pip install .`` (an isolated build environment, which has no torch) builds no extension
  and ships the kernels' sources in the package: the kernels are compiled for the installed
  torch the first time a backend is chosen, and cached
  (``ultraedit_fast/kernels/extension.py``). The same happens when a wheel meets a torch it
  was not built for.

Environment switches:

``ULTRAEDIT_FAST_SKIP_CUDA=1``      build the CPU extension only
``ULTRAEDIT_FAST_SKIP_EXT=1``       build no extension (pure PyTorch package)
``ULTRAEDIT_FAST_CUDA_ARCHS``       e.g. ``"8.0;9.0"`` (default ``8.0;9.0``; sets TORCH_CUDA_ARCH_LIST)
``MAX_JOBS``                        parallel compile jobs (torch's cpp_extension honours it)
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

STAMP = "_build_info.json"

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[ultraedit_fast build] {msg}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("ULTRAEDIT_FAST_SKIP_EXT") == "1":
        _say("ULTRAEDIT_FAST_SKIP_EXT=1: building no extension; the package runs on plain PyTorch")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        _say("torch is not importable in the build environment (an isolated build): no "
             "extension now; the kernels are compiled for the installed torch on first use. "
             "To build them now: `pip install --no-build-isolation .`")
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # Headers (csrc/checks.h: the argument checks both kernel files share): a change
    # rebuilds the extension, and an sdist carries them.
    headers = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    if not cpp_sources:
        _say("no C++ sources in csrc/: building no extension")
        return [], {}

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No -std flag: torch's BuildExtension adds the standard its headers need
    # (c++17 for older torch, c++20 for torch >= 2.10).
    # -fno-trapping-math (as torch's own build): lets GCC if-convert the selects
    # of the branch-free fp16 conversions, so those loops vectorise too.
    cxx_flags = ["-O3", "-fno-trapping-math", "-DPy_LIMITED_API=0x03090000"] + openmp
    link_flags = openmp

    want_cuda = os.environ.get("ULTRAEDIT_FAST_SKIP_CUDA") != "1"
    nvcc = shutil.which("nvcc") or (
        os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None)
    torch_cuda = torch.version.cuda is not None
    if want_cuda and cuda_sources and torch_cuda and nvcc and os.path.exists(nvcc):
        archs = os.environ.get("ULTRAEDIT_FAST_CUDA_ARCHS", "8.0;9.0")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        _say(f"building C++ CPU + CUDA kernels (torch CUDA {torch.version.cuda}, "
             f"archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = ce.CUDAExtension(
            "ultraedit_fast.kernels._C",
            cpp_sources + cuda_sources,
            depends=headers,
            extra_compile_args={"cxx": cxx_flags + ["-DULTRAEDIT_WITH_CUDA"],
                                # no --use_fast_math: it would turn the kernels'
                                # divisions/sqrt into approximations and flush
                                # denormals; they are memory-bound anyway.
                                "nvcc": ["-O3", "-DULTRAEDIT_WITH_CUDA"]},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        if not want_cuda:
            why = "ULTRAEDIT_FAST_SKIP_CUDA=1"
        elif not cuda_sources:
            why = "no CUDA sources"
        elif not torch_cuda:
            why = f"torch {torch.__version__} is a CPU build"
        else:
            why = "nvcc was not found (set CUDA_HOME)"
        _say(f"CUDA kernels SKIPPED ({why}); building the C++ CPU kernels (OpenMP) only")
        ext = ce.CppExtension(
            "ultraedit_fast.kernels._C",
            cpp_sources,
            depends=headers,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return [ext], {"build_ext": ce.BuildExtension}


class BuildPyWithSources(build_py):
    """Ship the kernels' sources (``csrc/``) inside the package (``kernels/csrc``), so that an
    installed package can compile them for the torch it meets."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "ultraedit_fast", "kernels", "csrc")
        for src in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True):
            if os.path.isfile(src) and src.endswith((".cpp", ".cu", ".h", ".cuh")):
                out = os.path.join(dest, os.path.relpath(src, os.path.join(ROOT, "csrc")))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copyfile(src, out)


def _stamping(base):
    """``build_ext`` that records, beside the built extension, the torch it was built
    against (checked before the extension is loaded)."""

    class BuildExtStamped(base):
        def run(self):
            super().run()
            import json
            import torch
            info = {"torch": torch.__version__, "cuda": torch.version.cuda}
            dirs = {os.path.join(self.build_lib, "ultraedit_fast", "kernels")}
            if self.inplace:
                dirs.add(os.path.join(ROOT, "ultraedit_fast", "kernels"))
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, STAMP), "w") as f:
                    json.dump(info, f)
            _say(f"built for torch {info['torch']} (CUDA {info['cuda']})")

    return BuildExtStamped


ext_modules, cmdclass = _extensions()
if "build_ext" in cmdclass:
    cmdclass["build_ext"] = _stamping(cmdclass["build_ext"])
cmdclass["build_py"] = BuildPyWithSources

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
