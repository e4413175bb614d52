"""What the command line's commands share: checking the model, device and data arguments
before the slow load, loading the model (tensor-parallel or split over devices when asked),
and the one-line summary of a set of scores."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from ..utils.display import pct


def _check_device(device: Optional[str]):
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def _check_model_spec(spec: str) -> None:
    from ..model.loading import DEFAULT_MODEL

    if spec == DEFAULT_MODEL:
        return
    from ..model.loading import _looks_like_path

    # a path (absolute, ./, ../, ~, or a .gguf file) must exist; "org/name" is a hub id,
    # which load_model hands to the hub (offline, from its cache)
    if spec.endswith(".gguf") or _looks_like_path(spec) or os.path.isdir(spec):
        if not os.path.exists(os.path.expanduser(spec)):
            raise FileNotFoundError(f"model: {spec!r} does not exist")


def _load(args):
    """Validate the cheap arguments, then load the model (slow)."""
    from ..model.loading import load_model, parse_dtype

    dtype = parse_dtype(args.dtype)
    device = _check_device(args.device)
    _check_model_spec(args.model)
    if getattr(args, "no_progress", False):  # transformers' (and gguf's) loading bars too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tp_plan = _tp_plan(args)
    t0 = time.perf_counter()
    model, tok = load_model(
        args.model,
        dtype=dtype,
        device=device,
        tp_plan=tp_plan,
        device_map=getattr(args, "device_map", None),
    )
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None):
        tok.pad_token = tok.eos_token
    print(
        f"model {args.model} loaded in {time.perf_counter() - t0:.1f} s "
        + (f"(tensor-parallel over {_world()} ranks) " if tp_plan else "")
        + ("(layers split over devices) " if getattr(args, "device_map", None) else "")
        + f"({type(model).__name__}, {str(next(model.parameters()).dtype)[6:]}, "
        f"{next(model.parameters()).device})",
        file=sys.stderr if _is_rank0() else sys.stdout,
    )
    return model, tok


def _is_rank0() -> bool:
    from ..parallel.distributed import launched_ranks

    return launched_ranks()[0] == 0


def _world() -> int:
    from ..parallel.distributed import launched_ranks

    return launched_ranks()[1]


def _tp_plan(args) -> Optional[str]:
    """``"auto"`` under ``torchrun`` with several ranks (unless ``--tp-plan none``)."""
    from ..parallel.distributed import launched_ranks

    plan = getattr(args, "tp_plan", None)
    if plan == "none":
        return None
    _, world = launched_ranks()
    if plan is None and world > 1 and getattr(args, "device_map", None) is None:
        plan = "auto"
    if plan == "auto" and world == 1:
        raise ValueError(
            "--tp-plan auto: needs several ranks; launch with torchrun --nproc_per_node N"
        )
    return plan


def _check_tensor_parallel_outputs(args) -> None:
    """What a tensor-parallel run cannot write, refused before the slow load."""
    if _tp_plan(args) is None:
        return
    for flag in ("save_model", "export_patch", "export_lora"):
        if getattr(args, flag, None):
            raise ValueError(
                f"--{flag.replace('_', '-')}: not under tensor parallelism (each "
                "rank holds a shard); use --save-editor (one checkpoint per "
                "rank) and export from a single-process load of the model"
            )


def _check_lengths(args, model, tok, examples) -> None:
    """Every record's prompts fit the model's context (a ``ValueError`` naming the file and
    the record otherwise), checked before the first turn."""
    from ..model.requests import context_length, tokenize_pair

    limit = context_length(model)
    chat = bool(getattr(args, "chat_template", None))
    for ex in examples:
        r = ex.request
        for field, prompt, answer in (
            ("prompt", r.prompt, r.target),
            ("rephrase", r.rephrase, r.target),
            ("locality_prompt", r.locality_prompt, r.locality_answer),
        ):
            if prompt is not None:
                tokenize_pair(
                    tok,
                    prompt,
                    answer,
                    limit,
                    chat_template=chat,
                    where=f"{args.data}: record {ex.index} ({field})",
                )


def _model_name(spec: str, model) -> str:
    from ..model.loading import DEFAULT_MODEL

    if spec == DEFAULT_MODEL:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(spec.rstrip("/")) or spec


def _reader(args, limit):
    from ..data.datasets import RequestReader

    return RequestReader(
        args.data,
        args.format,
        target=args.target,
        limit=limit,
        offset=args.offset,
        on_error="skip" if args.skip_malformed else "raise",
    )


def _pct(x) -> str:
    return pct(x, 5)


def _metrics_line(m) -> str:
    """Teacher-forced and generation-based scores side by side (%, 'gen' in brackets)."""

    def pair(key):
        gen = m.get(
            key.replace("LS_unedited", "LS_gen_unedited") if key == "LS_unedited" else f"{key}_gen"
        )
        return f"{key} {_pct(m.get(key))}" + (f" [gen {_pct(gen)}]" if gen is not None else "")

    keys = ["ES", "GS", "LS"] + (["LS_unedited"] if "LS_unedited" in m else [])
    out = "  ".join(pair(k) for k in keys)
    if m.get("personas") is not None:
        out += f"  personas {_pct(m['personas'])}"
    if m.get("mhop") is not None:
        out += f"  multi-hop {_pct(m['mhop'])}"
    if m.get("drift_kl") is not None:
        out += f"  drift KL {m['drift_kl']:.3f} (top-1 kept {_pct(m['drift_top1'])})"
    if m.get("fluency") is not None:
        out += f"  fluency {m['fluency']:.2f}"
    if m.get("health_ppl_ratio") is not None:
        out += (
            f"  health: perplexity x{m['health_ppl_ratio']:.3f}, next token kept "
            f"{_pct(m['health_top1'])}, unrelated answers kept {_pct(m['health_unrelated_kept'])}"
        )
    return out + f"  (n={m['n']}, %)"


def _check_output_file(path: str, what: str) -> None:
    """A results file can be written at ``path``: its directory is made (or is there) and
    writable, and ``path`` is not a directory or a dangling link; ``ValueError`` naming
    ``what`` otherwise."""
    from ..utils.files import check_output_dir

    if os.path.isdir(path):
        raise ValueError(f"{what}: {path!r} is a directory; name a file")
    if os.path.lexists(path) and not os.path.exists(path):
        raise ValueError(f"{what}: {path!r} is a symbolic link that leads nowhere")
    check_output_dir(os.path.dirname(os.path.abspath(path)), what)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{what}: {path!r} cannot be written")
