"""Instrumentation: time, CPU time, memory and NVML samples of a call, and interleaved
runs of several implementations of the same work."""

from __future__ import annotations

import gc
import math
import json
import os
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..utils.environment import current_rss, nvml, nvml_handle, peak_rss, reset_peak_rss


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
    mem = sorted(
        (
            e
            for e in events
            if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
        ),
        key=lambda e: e["ts"],
    )
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
        self.handle = nvml_handle(device_index) if pynvml is not None else None
        self.reason = (
            err
            if pynvml is None
            else (None if self.handle is not None else "no NVML handle for the device")
        )
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


def measure(
    fn: Callable[[], Any], device, nvml_sampling: bool = True, track_alloc: bool = False
) -> Tuple[Any, Dict]:
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
        sampler = NvmlSampler(
            device.index if device.index is not None else torch.cuda.current_device()
        ).start()
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


def times_summary(times: Sequence[float]) -> Dict[str, Any]:
    return {
        "median": quantile(times, 0.5),
        "q20": quantile(times, 0.2),
        "q80": quantile(times, 0.8),
        "min": min(times),
        "max": max(times),
        "mean": sum(times) / len(times),
        "all": list(times),
        "runs": len(times),
    }


def summarize(runs: List[Dict[str, Any]], seconds: Optional[List[float]] = None) -> Dict:
    """Aggregate the metrics of several runs of one thing: times as median and 20/80%
    quantiles, peaks as maxima, NVML means as means of the runs' means."""
    if not runs:
        return {"runs": 0}
    seconds = seconds if seconds is not None else [r["wall_s"] for r in runs]
    out: Dict[str, Any] = {
        "seconds": times_summary(seconds),
        "wall_s": times_summary([r["wall_s"] for r in runs]),
        "cpu_s_median": quantile([r["cpu_s"] for r in runs], 0.5),
        "cpu_util_median": quantile([r["cpu_util"] or 0 for r in runs], 0.5),
    }
    for k in (
        "peak_rss_bytes",
        "peak_rss_increase_bytes",
        "cuda_peak_allocated_bytes",
        "cuda_peak_reserved_bytes",
        "cpu_peak_alloc_increase_bytes",
    ):
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


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@dataclass
class _Schedule:
    """How :func:`run_interleaved` measures: runs per implementation, the limits that cut
    them short, and what :func:`measure` records."""

    device: torch.device
    repeats: int
    slow_s: float
    impl_budget_s: float
    nvml_sampling: bool
    deadline: Optional[float]
    track_alloc: bool

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


class _Interleaving:
    """The series of each implementation, filled run by run, and the measured seconds each
    has spent so far (against ``impl_budget_s``)."""

    def __init__(self, impls: Dict[str, Impl], sched: _Schedule):
        self.impls = impls
        self.sched = sched
        self.out = {name: Series() for name in impls}
        self.spent = dict.fromkeys(impls, 0.0)

    def run_once(self, name: str) -> None:
        impl, ser, sched = self.impls[name], self.out[name], self.sched
        try:
            value, m = measure(impl.fn, sched.device, sched.nvml_sampling, sched.track_alloc)
        except Exception as e:  # noqa: BLE001 - recorded, the others go on
            ser.error = (
                f"out of memory: {e}"
                if is_oom(e)
                else f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            )
            if sched.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            return
        secs = impl.seconds_of(value) if impl.seconds_of is not None else None
        secs = m["wall_s"] if secs is None else secs
        ser.runs.append(m)
        ser.seconds.append(secs)
        if impl.keep:
            ser.values.append(value)
        self.spent[name] += m["wall_s"]
        if impl.after is not None:
            impl.after(value)

    def warm_up(self) -> None:
        """One run of each; discarded unless it took more than ``slow_s`` (and the
        implementation is not marked ``always_warm_up``)."""
        slow_s = self.sched.slow_s
        for name in self.impls:
            if self.sched.past_deadline():
                self.out[name].error = "skipped: time budget spent before its first run"
                continue
            self.run_once(name)
            ser = self.out[name]
            if ser.runs and (ser.runs[-1]["wall_s"] <= slow_s or self.impls[name].always_warm_up):
                ser.runs.pop(), ser.seconds.pop()
                if ser.values:
                    ser.values.pop()
                self.spent[name] = 0.0
            elif ser.runs:
                ser.notes.append(
                    f"first run took {ser.runs[-1]['wall_s']:.1f} s > {slow_s} s: "
                    "kept as a measurement (no separate warm-up)"
                )

    def wants_another(self, name: str) -> bool:
        ser = self.out[name]
        if ser.error or len(ser.runs) >= self.sched.repeats:
            return False
        return not (
            ser.runs and (self.spent[name] > self.sched.impl_budget_s or self.sched.past_deadline())
        )

    def measured_rounds(self) -> None:
        """Rounds of one run of each implementation that still wants one, until none does."""
        for _ in range(self.sched.repeats):
            progressed = False
            for name in self.impls:
                if self.wants_another(name):
                    self.run_once(name)
                    progressed = True
            if not progressed:
                break

    def note_short_series(self) -> None:
        repeats = self.sched.repeats
        for ser in self.out.values():
            if not ser.error and len(ser.runs) < repeats:
                ser.notes.append(f"{len(ser.runs)} of {repeats} runs (time budget)")


def run_interleaved(
    impls: Dict[str, Impl],
    device,
    *,
    repeats: int,
    warmup: bool = True,
    slow_s: float = 10.0,
    impl_budget_s: float = 120.0,
    nvml_sampling: bool = True,
    deadline: Optional[float] = None,
    track_alloc: bool = False,
) -> Dict[str, Series]:
    """Time several implementations of the same work, alternating them run by run.

    The first run of each is a warm-up (one-time costs: kernel compilation, allocator
    growth) and is discarded, unless it took more than ``slow_s``: then it is kept as a
    measurement. Each implementation then gets up to ``repeats`` measured runs in all,
    fewer once its measured time passes ``impl_budget_s`` or ``deadline``
    (``time.monotonic()``) passes; it always gets at least one. An exception (a CUDA
    out-of-memory, say) ends that implementation's runs and is recorded."""
    sched = _Schedule(
        device=torch.device(device),
        repeats=repeats,
        slow_s=slow_s,
        impl_budget_s=impl_budget_s,
        nvml_sampling=nvml_sampling,
        deadline=deadline,
        track_alloc=track_alloc,
    )
    runs = _Interleaving(impls, sched)
    if warmup:
        runs.warm_up()
    runs.measured_rounds()
    runs.note_short_series()
    return runs.out
