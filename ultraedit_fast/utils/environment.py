"""What machine a result was measured on, and the process's memory: one copy of every probe.

- :func:`environment`: device, driver, library versions, date, CPU and load, for every
  results file (lifelong runs, benchmarks, evaluations).
- :func:`device_name`: a readable name of a device.
- :func:`current_rss`, :func:`peak_rss`, :func:`reset_peak_rss`: the process's resident
  memory (Linux ``/proc``; ``getrusage`` elsewhere).
- :func:`nvml`, :func:`nvml_handle`: NVML (``nvidia-ml-py``), when present.
- :class:`PeakMemory`: the peak memory of one turn, for :class:`~ultraedit_fast.core.report.EditReport`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import resource
import subprocess
from typing import Any, Dict, List, Optional

import torch

from .._version import __version__
from ..kernels import available_backends, extension_error, resolve_backend

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- versions
def package_version(mod: str) -> Optional[str]:
    """The installed version of distribution or module ``mod``, or ``None``."""
    try:
        from importlib import metadata

        return metadata.version(mod)
    except Exception:
        try:
            return getattr(__import__(mod), "__version__", None)
        except Exception:
            return None


def versions() -> Dict[str, Optional[str]]:
    return {
        "ultraedit_fast": __version__,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "numpy": package_version("numpy"),
        "nvidia-ml-py": package_version("nvidia-ml-py"),
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------- the machine
def _first_field(path: str, prefix: str) -> Optional[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return (
        _first_field("/proc/cpuinfo", "model name")
        or platform.processor()
        or platform.machine()
        or "cpu"
    )


def memory_total() -> Optional[int]:
    v = _first_field("/proc/meminfo", "MemTotal:")
    return int(v.split()[0]) * 1024 if v else None


def usable_cores() -> Optional[int]:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git(*args) -> Optional[str]:
    """``git <args>`` in the source checkout this package runs from, or ``None`` (an
    installed wheel has no checkout)."""
    if not os.path.isdir(os.path.join(_REPO_ROOT, ".git")):
        return None
    try:
        out = subprocess.run(
            ["git", "-C", _REPO_ROOT, *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def device_name(device) -> str:
    """A readable name of ``device``: the GPU's name, or the CPU model with its cores and
    torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except Exception:  # pragma: no cover - no driver
            return "cuda"
    n = torch.get_num_threads()
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs, {n} torch thread{'s' if n != 1 else ''})"


# ----------------------------------------------------------------------------- NVML
_NVML: Dict[str, Any] = {}


def nvml():
    """``(pynvml module, None)`` once NVML is initialised, else ``(None, reason)``."""
    if "mod" not in _NVML:
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            _NVML["mod"], _NVML["err"] = pynvml, None
        except Exception as e:  # not installed, no driver, no GPU
            _NVML["mod"], _NVML["err"] = None, f"NVML unavailable: {type(e).__name__}: {e}"
    return _NVML["mod"], _NVML["err"]


def nvml_handle(index: int):
    """The NVML handle of CUDA device ``index`` (matched by PCI bus id, which survives
    ``CUDA_VISIBLE_DEVICES`` renumbering), or ``None``."""
    pynvml, _ = nvml()
    if pynvml is None:
        return None
    try:
        p = torch.cuda.get_device_properties(index)
        bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
    except Exception:
        try:
            return pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return None


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _driver_from_smi() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except Exception:
        return None


# ----------------------------------------------------------------------------- the record
def environment(device) -> Dict[str, Any]:
    """Device, driver, library versions, date and machine load, for every results file.

    The main versions are also at the top level (``ultraedit_fast``, ``torch``,
    ``transformers``, ``python``) for readers of older result files."""
    device = torch.device(device)
    now = _dt.datetime.now(_dt.timezone.utc)
    vers = versions()
    dirty = git("status", "--porcelain", "--untracked-files=no")
    env: Dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d"),
        "datetime_utc": now.isoformat(timespec="seconds"),
        "device": str(device),
        "device_type": device.type,
        "device_name": device_name(device),
        **{k: vers[k] for k in ("ultraedit_fast", "torch", "transformers", "python")},
        "platform": platform.platform(),
        "versions": vers,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": usable_cores(),
            "torch_threads": torch.get_num_threads(),
            "memory_bytes": memory_total(),
            "loadavg_at_start": loadavg(),
        },
        "extension": extension_error() or "loaded",
    }
    try:
        env["backend"] = resolve_backend("auto", device).name
        env["backends_unavailable"] = {k: v for k, v in available_backends(device).items() if v}
    except Exception as e:
        env["backend"] = f"error: {e}"
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        env["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_bytes": p.total_memory,
            "multiprocessors": p.multi_processor_count,
        }
        pynvml, err = nvml()
        if pynvml is not None:
            h = nvml_handle(idx)
            env["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
            with contextlib.suppress(Exception):
                env["gpu"]["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3
            with contextlib.suppress(Exception):
                env["gpu"]["clocks_max_mhz"] = {
                    "sm": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                    "mem": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
                }
        else:
            env["nvml"] = err
            env["driver"] = _driver_from_smi()
    return env


def device_slug(env: Dict[str, Any]) -> str:
    """``cpu-2core`` or the GPU's name (``nvidia-h100-80gb-hbm3``), for file names."""
    if env["device_type"] == "cuda":
        name = env.get("gpu", {}).get("name", "cuda")
        return (
            "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
        )
    return f"cpu-{env['cpu']['usable_cores']}core"


# ----------------------------------------------------------------------------- memory
def _proc_status(key: str) -> Optional[int]:
    v = _first_field("/proc/self/status", key)
    return int(v.split()[0]) * 1024 if v else None


def current_rss() -> Optional[int]:
    """The process's resident memory now (bytes), or ``None`` off Linux."""
    return _proc_status("VmRSS:")


def peak_rss() -> int:
    """The process's peak resident memory (bytes): ``VmHWM``, else ``getrusage``."""
    v = _proc_status("VmHWM:")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs`` 5). Changes
    what every other reader of the peak sees: for benchmarks, which own their process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory from construction to ``read()``: CUDA peak allocated, or the
    process's peak RSS (reset through ``/proc/self/clear_refs`` where Linux allows it,
    otherwise the lifetime peak). Resetting changes what every other reader of those
    counters sees; with ``enabled=False`` nothing is reset and ``read()`` is ``None``."""

    def __init__(self, device, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled
        if not enabled:
            self.kind = "not_measured"
        elif self.device.type == "cuda":
            self.kind = "cuda_peak_allocated"
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.kind = "cpu_peak_rss" if reset_peak_rss() else "cpu_peak_rss_lifetime"

    def read(self) -> Optional[int]:
        if not self.enabled:
            return None
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss()
