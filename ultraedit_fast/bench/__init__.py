"""Benchmarks of UltraEdit: the fast editor beside the reference, with instrumentation.

    ultraedit-fast bench --device cpu --zsre zsre_mend_train-1k.json   # all CPU cases
    python -m ultraedit_fast.bench --device cuda --output-dir benchmarks/results
    python -m ultraedit_fast.bench --replot benchmarks/results/cpu-2core-2026-11-21.json

Cases (``--cases``; each runs :class:`~ultraedit_fast.UltraEditor` and
:class:`~ultraedit_fast.ReferenceEditor` in the same process, interleaved run by run so that
a machine shared with other work slows both alike):

``steps``
    The four steps of a turn at the real shapes of the paper's edited layers, with
    ``N = 400`` answer-token rows (100 zsRE edits give 290 to 370): lifelong normaliser
    update (10 mini-batch blocks), shift values, the solve (the reference's primal
    ``d_in x d_in`` :func:`~ultraedit_fast.editors.reference.primal_shift` against
    :class:`~ultraedit_fast.core.solve.ShiftSolver`'s dual ``N x N`` Cholesky), and the weight
    update (the reference adds a materialised ``Delta``; the fast path
    ``rank_update_``). A run that takes longer than ``slow_s`` is measured once.
``turn``
    One turn of 100 edits end to end, split by phase (``EditReport.seconds``), beside its
    *floor*: one forward and backward of the same mini-batches where the backward stops
    at the output of the lowest edited module (made a leaf that requires grad; no
    parameter requires grad), through the model's own full forward. The fast editor
    runs below it by computing less of the same passes (:mod:`ultraedit_fast.model.forward`:
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

The subpackage, one module per concern: :mod:`.settings` (constants, :class:`Settings`),
:mod:`.instrument` (measuring a call), :mod:`.workloads` (models and requests),
:mod:`.steps`, :mod:`.cases` and :mod:`.lifelong` (the cases), :mod:`.report` (the table),
:mod:`.plot` (the chart), :mod:`.cli` (the command line).
"""

from __future__ import annotations

from ..utils.environment import environment, loadavg  # noqa: F401
from .cases import (
    WeightKeeper,
    case_turn_and_memory,
    floor_pass,  # noqa: F401
    make_editors,
)
from .cli import build_parser, main, settings_from_args  # noqa: F401
from .instrument import (
    Impl,
    NvmlSampler,
    Series,
    cpu_alloc_peak,
    measure,  # noqa: F401
    quantile,
    run_interleaved,
    summarize,
    sync,
)
from .lifelong import case_lifelong, drift  # noqa: F401
from .plot import plot  # noqa: F401
from .report import format_table, headline, merge_results, table_rows  # noqa: F401
from .settings import (
    CASES,
    EDITS_PER_TURN,
    MEMORY_TARGET_BYTES,
    SCHEMA,  # noqa: F401
    STEP_TOKENS,
    Settings,
)
from .steps import STEP_OPS, STEP_SHAPES, case_steps, median_s, peak_of, step_callables  # noqa: F401
from .workloads import (
    ModelCase,
    ModelPool,
    SyntheticTokenizer,
    build_model,  # noqa: F401
    paper_configs,
    random_model,
    synthetic_requests,
    tie_layers_below_edited,
    zsre_requests,
)
from ..utils.display import GIB  # noqa: F401
