"""A plain-PyTorch port of the published UltraEdit algorithm: the oracle of the tests
and the baseline of the benchmarks.

Written from ``docs/algorithm.md`` for readability, not speed: weight gradients are on
(as in the published code), keys and value gradients are caught with hooks, the
lifelong normaliser is updated once per (mini-batch, module), and the shift is
the primal ``d_in x d_in`` solve ``Delta = (K^T K + I)^-1 K^T V``. The normaliser and
shift formulas are :mod:`ultraedit_fast.kernels.formulas`, which the default kernels share.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from typing_extensions import Unpack

import torch
import torch.nn.functional as F

from ..core.config import EditorConfig, EditorOptions
from ..core.signature import editor_signature, options_doc
from ..utils.environment import PeakMemory
from ..model.forward import input_device, preserved_model_state
from ..kernels.formulas import EPS, normalizer_merge, shift_values  # noqa: F401
from ..core.presets import resolve_edit_config
from ..core.report import EditReport
from ..model.requests import IGNORE, as_requests, context_length, make_minibatches
from ..model.targets import EditTarget, resolve_targets

__all__ = ["ReferenceEditor", "primal_shift", "normalizer_merge", "shift_values", "EPS"]


def primal_shift(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Delta = (K^T K + I)^-1 K^T V`` (``d_in x d_out``), solved as written."""
    k = k.float()
    eye = torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
    return torch.linalg.solve(k.t() @ k + eye, k.t() @ v)


class _ReferenceNormalizer:
    def __init__(self, d: int, device):
        self.n = 0
        self.mean = torch.zeros(d, device=device)
        self.acc = torch.zeros(d, device=device)
        self.std = torch.zeros(d, device=device)

    def update(self, x: torch.Tensor) -> None:
        self.n = normalizer_merge(self.mean, self.acc, self.std, self.n, x)


# ----------------------------------------------------------------------------- the editor
class ReferenceEditor:
    """The published algorithm, unoptimised. Same constructor (the options below) and
    ``edit`` as :class:`ultraedit_fast.UltraEditor`.

    Options:
    """

    name = "reference"

    def __init__(
        self,
        model,
        tokenizer,
        config: Optional[EditorConfig] = None,
        **overrides: Unpack[EditorOptions],
    ):
        cfg = EditorConfig.build(config, overrides, owner="ReferenceEditor", reference=True)
        resolved = resolve_edit_config(model, cfg.modules, cfg.lr)
        self.config = cfg.replace(
            modules=tuple(resolved.modules),
            lr=resolved.lr,
            null_space=None,
            whiten_values=False,
            preserve_edits=None,
        )
        self.model = model
        self.tokenizer = tokenizer
        self.module_names: List[str] = list(resolved.modules)
        self.lr = resolved.lr
        self.preset = resolved.preset
        self.batch_size = cfg.batch_size
        self.share_normalizer = cfg.share_normalizer
        self.measure_memory = cfg.measure_memory
        self.targets: Dict[str, EditTarget] = {
            t.name: t for t in resolve_targets(model, self.module_names)
        }
        self.modules = {n: t.module for n, t in self.targets.items()}
        self.normalizers: Dict[object, _ReferenceNormalizer] = {}
        self.turns = 0

    def describe(self) -> Dict[str, object]:
        """What a results file records of this editor."""
        return {
            "editor": "reference",
            "modules": list(self.module_names),
            "lr": float(self.lr),
            "preset": self.preset,
            "batch_size": self.batch_size,
            "backend": "reference",
            "tokens_per_pass": 0,
            "step": "paper",
            "regime": None,
        }

    def normalizer_key(self, name: str):
        return self.targets[name].shape if self.share_normalizer else name

    def _normalizer(self, name: str) -> _ReferenceNormalizer:
        key = self.normalizer_key(name)
        if key not in self.normalizers:
            d_in, d_out = self.targets[name].shape
            self.normalizers[key] = _ReferenceNormalizer(
                d_in + d_out, self.modules[name].weight.device
            )
        return self.normalizers[key]

    def edit(self, requests):
        requests = as_requests(requests)
        model = self.model
        device = input_device(model)
        batches = make_minibatches(self.tokenizer, requests, self.batch_size, context_length(model))
        t0 = time.perf_counter()
        peak = PeakMemory(device, self.measure_memory)
        keys, grads, n_tokens = self._capture(batches, device)
        with torch.no_grad():
            for name in self.module_names:
                k = torch.cat(keys[name])
                g = torch.cat(grads[name])
                norm = self._normalizer(name)
                v = shift_values(k, g, norm.mean, norm.std, self.lr)
                delta = primal_shift(k, v)
                w = self.modules[name].weight
                upd = delta if self.targets[name].transposed else delta.t()
                w.copy_((w.float() + upd).to(w.dtype))
        self.turns += 1
        total = time.perf_counter() - t0
        return EditReport(
            n_requests=len(requests),
            n_tokens=n_tokens,
            turn=self.turns,
            backend="reference",
            device=str(device),
            seconds={"total": total},
            total_seconds=total,
            peak_memory_bytes=peak.read(),
            peak_memory_kind=peak.kind,
            modules=list(self.module_names),
        )

    def _capture(self, batches, device):
        """Every mini-batch's forward and backward with weight gradients on, as published:
        ``(keys, output gradients, answer tokens)``; the normaliser takes each (mini-batch,
        module) block as it comes."""
        inputs: Dict[str, torch.Tensor] = {}
        outputs: Dict[str, torch.Tensor] = {}

        def save(name):
            def hook(module, args, output):
                inputs[name] = args[0]
                outputs[name] = output
                output.retain_grad()

            return hook

        handles = [m.register_forward_hook(save(n)) for n, m in self.modules.items()]
        keys: Dict[str, List[torch.Tensor]] = {n: [] for n in self.module_names}
        grads: Dict[str, List[torch.Tensor]] = {n: [] for n in self.module_names}
        n_tokens = 0
        with preserved_model_state(self.model):
            try:
                self.model.eval()
                for p in self.model.parameters():
                    p.requires_grad_(False)
                for m in self.modules.values():
                    m.weight.requires_grad_(True)
                with torch.enable_grad():
                    for batch in batches:
                        n_tokens += self._pass(batch.to(device), inputs, outputs, keys, grads)
            finally:
                for h in handles:
                    h.remove()
        return keys, grads, n_tokens

    def _pass(self, batch, inputs, outputs, keys, grads) -> int:
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.labels != IGNORE
        loss = F.cross_entropy(logits[mask].float(), batch.labels[mask])
        loss.backward()
        for name in self.module_names:
            k = inputs[name][mask].detach().float()
            g = outputs[name].grad[mask].float()
            keys[name].append(k)
            grads[name].append(g)
            self._normalizer(name).update(torch.cat([k, g], dim=1))
        for m in self.modules.values():
            m.weight.grad = None
        inputs.clear()
        outputs.clear()
        return int(mask.sum())


ReferenceEditor.__doc__ += "\n" + options_doc(reference=True) + "\n"
ReferenceEditor.__init__.__signature__ = editor_signature(reference=True)  # type: ignore[attr-defined]
