"""MEMIT (Meng et al., ICLR 2023) and AlphaEdit (Fang et al., ICLR 2025) as lifelong
editors of this package, read against AlphaEdit's published code (which carries MEMIT).

Both spread a turn's edits over the MLP down-projections of several consecutive blocks:

1. **targets** (:mod:`.memit_targets`): for each request, ``z`` = the output of the last
   edited block at the key token that makes the model predict the target;
2. **spread**: for each edited layer ``l_i`` in order (``i = 0..L-1``), with the updates of
   the layers before it in place: the keys ``K`` (the down-projection's input at the key
   token, the mean of the bare prompt's and of the random-prefix contexts' mean, as
   published) and the residual ``R = (z - z_now) / (L - i)``, ``z_now`` being the last edited
   block's output with the updates so far; then a least-squares update of that layer
   (columns are keys: ``K`` is ``d_in x N``, ``R`` is ``d_out x N``):

   - MEMIT: ``Delta = R K^T (lambda C0 + K K^T)^-1``, ``C0`` the keys' second moment on
     general text, ``lambda = mom2_update_weight``;
   - AlphaEdit: ``Delta = R K^T P (K_p K_p^T P + K K^T P + l2 I)^-1``, ``P`` the projector
     onto the null space of ``C0`` (its eigenvectors of eigenvalue below
     ``nullspace_threshold``) and ``K_p K_p^T`` the lifelong cache of every earlier turn's
     keys (their keys after their turn). The published code solves
     ``(P (K K^T + K_p K_p^T) + l2 I) X = P K R^T``, the same ``Delta = X^T``. With ``U`` an
     orthonormal basis of the null space (``P = U U^T``) this equals
     ``Delta = R K_u^T (K_u K_u^T + U^T K_p K_p^T U + l2 I)^-1 U^T`` with ``K_u = U^T K``:
     an ``r x r`` solve (``r`` the null space's dimension), and ``Delta`` is exactly of the
     form ``X U^T``, so ``Delta k = 0`` for every ``k`` orthogonal to the null space.

3. **apply**: every layer's update is computed first (each applied by a hook on its
   down-projection's output while the later layers are computed, for this thread alone),
   then all are written at once under the model's weights lock; anything that raises
   before or while they are written leaves the weights as they were.

**The null space and the cache: how they are stored.** ``P`` is never formed: per layer the
editor keeps ``U`` (``d_in x r`` float32; float64 for a float64 model) and the cache
projected on it, ``U^T K_p K_p^T U`` (``r x r``, the same dtype): all the solve reads. For a ``d_in`` of 14,336 (a 7-8B model's
``down_proj``) the published dense ``P`` and ``cache_c`` are 822 MB each per layer in fp32
(4.1 GB each for 5 layers); here ``U`` is ``14336 r 4`` bytes and the cache ``r^2 4`` bytes, at
most the same 822 MB each (``r = d_in``) and proportionally less for a smaller null space;
the turn's transient is one ``r x r`` float64 system (at most 1.6 GB). MEMIT keeps ``C0``
(``d_in x d_in`` float32) per layer and solves a ``d_in x d_in`` float64 system.

**General text.** ``C0`` is the mean of ``k k^T`` over every token of ``general_text`` (a text
file; default the package's sample ``scoring/health_text.txt``, about 1,000 tokens;
benchmarks pass a larger corpus) cut into windows of ``cov_window`` tokens, each after the
tokenizer's BOS. Published: 100,000 Wikipedia texts. A sample with fewer tokens than
``d_in`` (the package's sample for SmolLM2-135M's 1,536-wide ``down_proj``) gives a singular
``C0``: its missing directions count as null space for AlphaEdit (well posed: ``l2 I``);
MEMIT's system is then singular, it writes only in the directions the sample never visits
and is ill-conditioned (it warns). Measured on SmolLM2-135M (fp32, CPU, two
CounterFact-style edits with subjects, layers 4..8): with 40 windows of the Lee corpus
(5,160 keys) MEMIT gave the targets p = 0.51 and 0.56 and AlphaEdit 0.74 and 0.76 (992-1,175
null directions of 1,536); with the package's sample MEMIT missed both, AlphaEdit again
gave 0.74 and 0.77.
It is computed once per editor, at the first turn (or :meth:`prepare`), for every edited
layer, with the unedited model (published: once, before the run).

**Lifelong.** Each :meth:`edit` call is one turn (one published ``apply_*_to_model`` call
on a batch of edits). MEMIT keeps nothing between turns but ``C0`` (sequential MEMIT, as
AlphaEdit's paper runs it); AlphaEdit accumulates its cache.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import fields, replace
from typing import Any, Dict, List, Mapping, Optional

import torch

from .._log import log
from ..core.report import EditReport
from ..model.forward import input_device
from ..model.requests import as_requests, check_fits, context_length
from ..parallel.concurrency import model_locks
from ..scoring.health import text_windows
from ..utils.environment import PeakMemory
from .memit_keys import (
    capture_keys,
    decoder_blocks,
    down_projection,
    key_second_moments,
    pending_updates,
    special_prefix,
    work_dtype,
)
from .memit_config import (
    AlphaEditConfig,
    MEMITConfig,
    changed_from_published,
    check_subjects,
    default_layers,
)
from .memit_targets import build_rows, context_texts, optimise_targets

__all__ = ["AlphaEditEditor", "MEMITEditor", "AlphaEditConfig", "MEMITConfig"]

PHASES = ("statistics", "targets", "keys", "solve", "apply")


class _MemitFamily:
    """What MEMIT and AlphaEdit share: the constructor, the turn, ``describe``."""

    name = "memit-family"
    _config_class = MEMITConfig

    def __init__(
        self,
        model,
        tokenizer,
        config: Optional[MEMITConfig] = None,
        *,
        subjects: Optional[Mapping[str, str]] = None,
        **overrides: Any,
    ):
        owner = type(self).__name__
        cls = self._config_class
        if config is None:
            config = cls()
        elif type(config) is not cls:
            raise TypeError(f"config: expected a {cls.__name__}, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{owner}: unknown options {unknown}; options are {sorted(known)}")
        requested = replace(config, **overrides)
        self.model, self.tokenizer = model, tokenizer
        self._blocks_name, self._blocks = decoder_blocks(model)
        layers = requested.layers or default_layers(len(self._blocks))
        if layers[-1] >= len(self._blocks):
            raise ValueError(
                f"layers: {layers!r} out of range: the model has {len(self._blocks)} blocks"
            )
        self._config = replace(requested, layers=layers)
        self._preset = (
            "user"
            if requested.layers is not None or changed_from_published(requested)
            else "published"
        )
        self._targets = {i: down_projection(model, self._blocks_name, i) for i in layers}
        self.subjects = check_subjects(subjects)
        self._windows, self.general_source = text_windows(
            tokenizer, self._config.general_text, self._config.cov_window, "general_text"
        )
        width = self._config.cov_window + len(special_prefix(tokenizer))
        max_length = context_length(model)
        if max_length is not None and width > max_length:
            raise ValueError(
                f"cov_window: {width} tokens a window (with the special tokens) exceed the "
                f"model's context of {max_length}; choose a smaller cov_window"
            )
        if self._config.cov_max_windows is not None:
            self._windows = self._windows[: self._config.cov_max_windows]
        self._contexts: Optional[List[str]] = None
        self.turns = 0

    @property
    def config(self) -> MEMITConfig:
        """The resolved configuration (``layers`` filled in)."""
        return self._config

    @property
    def modules(self) -> List[str]:
        return [t.name for t in self._targets.values()]

    def describe(self) -> Dict[str, Any]:
        """What a results file records of this editor."""
        cfg = self._config
        return {
            "editor": self.name,
            "modules": self.modules,
            "lr": cfg.v_lr,
            "preset": self._preset,
            "batch_size": cfg.batch_size,
            "backend": "torch",
            "tokens_per_pass": 0,
            "step": "paper",
            "regime": None,
            "layers": list(cfg.layers),
            "general_text": self.general_source,
            "subjects": len(self.subjects),
            "general_keys": getattr(self, "general_keys", None),
        }

    # ------------------------------------------------------------------------ statistics
    def prepare(self) -> None:
        """Sample the random-prefix contexts and compute the general-text statistics, if
        not done yet (the first turn does it otherwise)."""
        with model_locks(self.model).edit:
            if self._contexts is None:
                self._prepare()

    def _prepare(self) -> None:
        cfg = self._config
        contexts = context_texts(
            self.model, self.tokenizer, cfg.context_prefixes, cfg.context_tokens, cfg.seed
        )
        moments, n = key_second_moments(
            self.model,
            self._targets,
            self._blocks,
            self._windows,
            special_prefix(self.tokenizer),
            cfg.batch_size,
        )
        self._set_statistics(moments, n)
        self._contexts = contexts

    def _set_statistics(self, moments: Dict[int, torch.Tensor], n: int) -> None:
        raise NotImplementedError

    def _solve(self, layer: int, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``Delta`` (``d_out x d_in``, float32 or float64 as :func:`work_dtype`) from keys
        ``k`` (``d_in x N``) and residuals ``r`` (``d_out x N``), both float64 on the
        weight's device."""
        raise NotImplementedError

    def _after_spread(self, chunks, deltas, seconds) -> Any:
        return None

    def _commit(self, extra: Any) -> None:
        pass

    # ------------------------------------------------------------------------ the turn
    def edit(self, requests) -> EditReport:
        """One turn over ``requests`` (``EditRequest`` objects or dicts): all of the turn's
        layers are written, or none (``ValueError`` at the boundary for bad input)."""
        locks = model_locks(self.model)
        locks.weights.refuse_writer_inside_reading("edit")
        with locks.edit:
            return self._edit(requests)

    def _edit(self, requests) -> EditReport:
        requests = as_requests(requests)
        max_length = context_length(self.model)
        check_fits(self.tokenizer, requests, max_length)
        subjects = [self.subjects.get(r.prompt) for r in requests]
        cfg = self._config
        device = input_device(self.model)
        seconds = dict.fromkeys(PHASES, 0.0)
        peak = PeakMemory(device, cfg.measure_memory)
        t = time.perf_counter()
        self.prepare()
        seconds["statistics"] = time.perf_counter() - t
        bs = cfg.batch_size
        chunks = [
            build_rows(
                self.tokenizer,
                requests[s : s + bs],
                subjects[s : s + bs],
                self._contexts,
                max_length,
                s,
            )
            for s in range(0, len(requests), bs)
        ]
        t = time.perf_counter()
        z_block = self._blocks[cfg.layers[-1]]
        zs = torch.cat([optimise_targets(self.model, z_block, rows, cfg) for rows in chunks])
        seconds["targets"] = time.perf_counter() - t
        deltas = self._spread(chunks, zs, seconds)
        extra = self._after_spread(chunks, deltas, seconds)
        t = time.perf_counter()
        self._apply(deltas)
        self._commit(extra)
        self.turns += 1
        seconds["apply"] = time.perf_counter() - t
        return EditReport(
            n_requests=len(requests),
            n_tokens=sum(rows.n_tokens for rows in chunks),
            turn=self.turns,
            backend="torch",
            device=str(device),
            seconds=seconds,
            total_seconds=sum(seconds.values()),
            peak_memory_bytes=peak.read(),
            peak_memory_kind=peak.kind,
            modules=self.modules,
        )

    def _keys(self, chunks, layers, with_z: bool):
        """``(keys, z_now)``: per layer the turn's keys ``[N, d_in]`` (each the mean of the
        bare prompt's and of the contexts' mean, as published), and the last edited block's
        output at the bare prompts' key tokens ``[N, d]`` (``None`` without ``with_z``)."""
        targets = {i: self._targets[i] for i in layers}
        z_layer = self._config.layers[-1] if with_z else None
        keys: Dict[int, List[torch.Tensor]] = {i: [] for i in layers}
        zs = []
        for rows in chunks:
            m = rows.n_rewrite
            device = input_device(self.model)
            k, z = capture_keys(
                self.model,
                targets,
                self._blocks,
                rows.input_ids[:m].to(device),
                rows.attention_mask[:m].to(device),
                torch.arange(m),
                rows.lookup[:m],
                z_layer,
                torch.arange(rows.n),
            )
            for i in layers:
                bare = k[i][: rows.n]
                if rows.n_contexts:
                    ctx = k[i][rows.n :].view(rows.n, rows.n_contexts, -1).mean(1)
                    bare = (bare + ctx) / 2
                keys[i].append(bare)
            zs.append(z)
        return {i: torch.cat(v) for i, v in keys.items()}, (torch.cat(zs) if with_z else None)

    def _spread(self, chunks, zs, seconds) -> Dict[int, torch.Tensor]:
        """Every edited layer's update, in order, each computed with the ones before it
        applied (by hooks: no weight is written)."""
        layers = self._config.layers
        deltas: Dict[int, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            t = time.perf_counter()
            with pending_updates(self._targets, deltas):
                keys, z_now = self._keys(chunks, [layer], with_z=True)
            seconds["keys"] += time.perf_counter() - t
            t = time.perf_counter()
            w = self._targets[layer].weight
            resid = (zs.to(z_now.device) - z_now) / (len(layers) - i)
            k = keys[layer].to(w.device, torch.float64).t()
            deltas[layer] = self._solve(layer, k, resid.to(w.device, torch.float64).t())
            seconds["solve"] += time.perf_counter() - t
        return deltas

    def _apply(self, deltas: Dict[int, torch.Tensor]) -> None:
        """Write every layer's update, or none: ``ValueError`` for a non-finite update
        before any write; a write that raises restores the weights already written."""
        for layer, d in deltas.items():
            if not bool(torch.isfinite(d).all()):
                raise ValueError(
                    f"edit: the update of {self._targets[layer].name!r} is not finite; "
                    "the turn is refused and the model is unchanged"
                )
        with model_locks(self.model).weights.writing(), torch.no_grad():
            originals: Dict[int, torch.Tensor] = {}
            try:
                for layer, d in deltas.items():
                    w = self._targets[layer].weight
                    originals[layer] = w.detach().clone()
                    self._write(layer, d)
            except BaseException:
                for layer, w0 in originals.items():
                    self._targets[layer].weight.copy_(w0)
                raise

    def _write(self, layer: int, delta: torch.Tensor) -> None:
        target = self._targets[layer]
        w = target.weight
        upd = delta.t() if target.transposed else delta
        w.copy_((w.to(upd.dtype) + upd.to(w.device)).to(w.dtype))


class MEMITEditor(_MemitFamily):
    """MEMIT (module docstring): ``Delta = R K^T (lambda C0 + K K^T)^-1`` per layer, solved
    in float64 as published; nothing is kept between turns but ``C0``.

    ``MEMITEditor(model, tokenizer, config=None, *, subjects=None, **options)``: ``options``
    are :class:`MEMITConfig`'s fields; ``subjects`` maps a prompt to its subject (the key
    token is then the subject's last, else the prompt's last: :mod:`.memit_targets`).
    """

    name = "memit"
    _config_class = MEMITConfig

    def _set_statistics(self, moments, n) -> None:
        d_in = max(c.shape[0] for c in moments.values())
        if n < d_in:
            warnings.warn(
                f"general_text: {n} keys for a d_in of {d_in}: C0 is singular, and MEMIT's "
                "update is then ill-conditioned in the directions the sample never visits; "
                "pass a general_text of many more tokens than d_in",
                RuntimeWarning,
                stacklevel=2,
            )
        self.second_moments = moments
        self.general_keys = n

    def _solve(self, layer, k, r) -> torch.Tensor:
        c0 = self.second_moments[layer].to(k.device, torch.float64)
        adj = torch.linalg.solve(self._config.mom2_update_weight * c0 + k @ k.t(), k)
        return (r @ adj.t()).to(work_dtype(self._targets[layer].weight.dtype))

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "mom2_update_weight": self._config.mom2_update_weight}


class AlphaEditEditor(_MemitFamily):
    """AlphaEdit (module docstring): MEMIT's targets and spread, each layer's update
    projected on the null space of the general-text keys and solved against the lifelong
    cache of earlier turns' keys.

    ``AlphaEditEditor(model, tokenizer, config=None, *, subjects=None, **options)``:
    ``options`` are :class:`AlphaEditConfig`'s fields. ``null_bases[layer]`` is ``U``
    (``d_in x r``), ``cache[layer]`` is ``U^T K_p K_p^T U`` and ``cached_keys`` the number of
    keys in it (per layer).
    """

    name = "alphaedit"
    _config_class = AlphaEditConfig

    def _set_statistics(self, moments, n) -> None:
        self.general_keys = n
        self.null_bases: Dict[int, torch.Tensor] = {}
        self.cache: Dict[int, torch.Tensor] = {}
        for layer, c0 in moments.items():
            evals, evecs = torch.linalg.eigh(c0.double())
            dtype = work_dtype(self._targets[layer].weight.dtype)
            basis = evecs[:, evals < self._config.nullspace_threshold].to(dtype).contiguous()
            self.null_bases[layer] = basis
            self.cache[layer] = basis.new_zeros(basis.shape[1], basis.shape[1])
            if basis.shape[1] == 0:
                log.warning(
                    "ultraedit_fast: alphaedit: %s has no null space under threshold %g: "
                    "its updates are zero",
                    self._targets[layer].name,
                    self._config.nullspace_threshold,
                )
        self.cached_keys = 0

    def _solve(self, layer, k, r) -> torch.Tensor:
        u = self.null_bases[layer].to(k.device, torch.float64)
        ku = u.t() @ k
        eye = torch.eye(u.shape[1], dtype=torch.float64, device=k.device)
        m = ku @ ku.t() + self.cache[layer].to(k.device, torch.float64) + self._config.l2 * eye
        x = torch.linalg.solve(m, ku)
        return ((r @ x.t()) @ u.t()).to(self.null_bases[layer].dtype)

    def _after_spread(self, chunks, deltas, seconds):
        """The turn's keys after its update, projected (``U^T K``): the cache's increment."""
        t = time.perf_counter()
        with pending_updates(self._targets, deltas):
            keys, _ = self._keys(chunks, list(self._config.layers), with_z=False)
        out = {}
        for layer, k in keys.items():
            u = self.null_bases[layer]
            ku = u.t().double() @ k.to(u.device, torch.float64).t()
            out[layer] = (ku @ ku.t()).to(u.dtype)
        seconds["keys"] += time.perf_counter() - t
        return out, len(next(iter(keys.values())))

    def _commit(self, extra) -> None:
        increments, n = extra
        for layer, inc in increments.items():
            self.cache[layer] = self.cache[layer] + inc
        self.cached_keys += n

    def describe(self) -> Dict[str, Any]:
        cfg = self._config
        nulls = None
        if self._contexts is not None:
            nulls = {self._targets[i].name: int(u.shape[1]) for i, u in self.null_bases.items()}
        return {
            **super().describe(),
            "nullspace_threshold": cfg.nullspace_threshold,
            "l2": cfg.l2,
            "null_dims": nulls,
            "cached_keys": getattr(self, "cached_keys", 0),
        }
