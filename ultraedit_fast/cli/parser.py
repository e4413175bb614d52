"""The command line's parser: one sub-parser per command, the editor flags taken from
:class:`~ultraedit_fast.core.config.EditorConfig`'s declarations."""

from __future__ import annotations

import argparse

from ..core.cli_options import add_cli_options, cli_option_names
from ..core.options import cli_int_at_least

PROG = "ultraedit-fast"


class UsageError(Exception):
    """A mistake in the command line (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{self.prog}: error: {message}")


_positive_int = cli_int_at_least(1, "a positive integer")
_nonneg_int = cli_int_at_least(0, "an integer >= 0")


# ----------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Fast lifelong model editing (UltraEdit, "
        "arXiv 2505.14679) for Hugging Face causal language models.",
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _demo_parser(sub)
    _run_parser(sub)
    _eval_parser(sub)
    _export_parser(sub)
    sub.add_parser(
        "bench", help="benchmarks (ultraedit_fast.bench; arguments passed on)", add_help=False
    )
    return p


def _model_args(sp, with_backend=True) -> None:
    from ..model.loading import DEFAULT_MODEL

    sp.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'smollm2' (the embedded SmolLM2-135M-Instruct, default), a local "
        "Hugging Face directory, a .gguf file, or a hub id",
    )
    sp.add_argument(
        "--dtype",
        default=None,
        help="float32 (default) | bfloat16 | float16 (also fp32, bf16, fp16)",
    )
    sp.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    sp.add_argument(
        "--tp-plan",
        default=None,
        choices=("auto", "none"),
        help="auto: load the model tensor-parallel over the ranks (the "
        "default under torchrun with more than one rank); none: do not",
    )
    sp.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="split the model's layers over devices, pipeline style "
        "(transformers' device_map: auto, balanced, sequential)",
    )
    if with_backend:
        add_cli_options(sp, ["backend"])


def _data_args(sp) -> None:
    from ..data.datasets import FORMATS, TARGETS

    sp.add_argument("--data", required=True, help="JSON array or JSON Lines file")
    sp.add_argument(
        "--format",
        default="auto",
        choices=("auto",) + FORMATS,
        help="dataset format (default: detected from the first record)",
    )
    sp.add_argument(
        "--target",
        default="answers",
        choices=TARGETS,
        help="edit target: the dataset's answer, or 'alt' (counterfactual)",
    )
    sp.add_argument("--offset", type=_nonneg_int, default=0, help="skip this many records first")
    sp.add_argument(
        "--skip-malformed",
        action="store_true",
        help="skip malformed records (counted) instead of stopping",
    )
    sp.add_argument(
        "--eval-batch-size",
        type=_positive_int,
        default=32,
        help="sequences per forward pass when scoring (default 32; greedy decoding takes twice as many)",
    )


def _demo_parser(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="edit SmolLM2-135M-Instruct with 8 counterfactual facts and show its answers before and after",
        description="Load the embedded SmolLM2-135M-Instruct, edit it with 8 "
        "counterfactual facts in one turn with the defaults, and print its "
        "greedy answers and the scores before and after.",
    )
    _model_args(d)
    add_cli_options(d, ["modules", "lr"])


def _run_parser(sub) -> None:
    r = sub.add_parser(
        "run",
        help="lifelong editing: T turns x M edits from a dataset; writes lifelong.json and lifelong.png",
        description="Edit a model with T turns of M requests from a dataset, "
        "score it (ES/GS/LS/LS_unedited) and write lifelong.json and "
        "lifelong.png to --output-dir.",
    )
    _model_args(r)
    _data_args(r)
    r.add_argument("--turns", type=_positive_int, required=True)
    r.add_argument("--edits-per-turn", type=_positive_int, required=True)
    r.add_argument("--output-dir", required=True)
    # every editor option that declares a flag (the backend is among the model's)
    add_cli_options(r, [n for n in cli_option_names() if n != "backend"])
    r.add_argument(
        "--editor",
        default="fast",
        choices=("fast", "reference"),
        help="the fast editor (default) or the plain reference port",
    )
    r.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="also score every K turns (checkpoints)",
    )
    r.add_argument(
        "--eval-sample",
        type=_positive_int,
        default=None,
        metavar="N",
        help="checkpoints score the requests edited since the last one (at most "
        "N) and a fixed retention sample of N earlier ones, instead of "
        "everything edited so far; the final score covers every edit",
    )
    r.add_argument(
        "--no-generation",
        action="store_true",
        help="teacher-forced scores only (no greedy decoding)",
    )
    r.add_argument(
        "--full-passes",
        action="store_true",
        help="run every scoring pass from the bottom of the network (by default a "
        "sequence scored before runs from the lowest edited block up: the same scores up to "
        "rounding)",
    )
    r.add_argument(
        "--preheat",
        type=_nonneg_int,
        default=0,
        metavar="N",
        help="warm the lifelong normaliser on the N records that follow the run's "
        "(never edited) before the first turn (StableEdit's preheat; default 0)",
    )
    _health_args(r)
    _run_output_args(r)


def _run_output_args(r) -> None:
    r.add_argument(
        "--save-model",
        default=None,
        metavar="DIR",
        help="save the edited model and tokenizer there (save_pretrained)",
    )
    r.add_argument(
        "--save-editor",
        default=None,
        metavar="DIR",
        help="save the editor's lifelong state there (UltraEditor.load resumes it)",
    )
    r.add_argument(
        "--export-patch",
        default=None,
        metavar="DIR",
        help="write the edited modules' weights there, as a patch for the base "
        "model (ultraedit_fast.storage.apply_patch)",
    )
    r.add_argument(
        "--export-lora",
        default=None,
        metavar="DIR",
        help="write the edits there as a PEFT LoRA adapter",
    )
    r.add_argument(
        "--lora-rank",
        type=_positive_int,
        default=None,
        help="rank of --export-lora (default: exact)",
    )
    r.add_argument("--no-plot", action="store_true", help="do not draw lifelong.png")
    r.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="go on with the run interrupted in DIR (its --output-dir): alone, it takes that "
        "run's own arguments; the turns and scores already done are kept",
    )
    r.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (editing, scoring, model loading)",
    )


def _health_args(sp, base_model: bool = False) -> None:
    sp.add_argument(
        "--health-text",
        default=None,
        metavar="FILE",
        help="general text (UTF-8) on which to measure the model's health against the "
        "unedited model: perplexity ratio and next-token agreement (default: the package's "
        "own sample)",
    )
    if base_model:
        sp.add_argument(
            "--base-model",
            default=None,
            help="the unedited model: report the health figures of --model against it",
        )
    else:
        sp.add_argument("--no-health", action="store_true", help="do not measure the health")


def _eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="score a model on a dataset slice",
        description="Score a model (unedited, or one saved with run "
        "--save-model) on records of a dataset: ES, GS, LS (and WikiBigEdit "
        "personas / multi-hop where present).",
    )
    _model_args(e, with_backend=False)
    _data_args(e)
    e.add_argument("--limit", type=_nonneg_int, default=None, help="at most this many records")
    e.add_argument(
        "--no-generation",
        action="store_true",
        help="teacher-forced scores only (no greedy decoding)",
    )
    add_cli_options(e, ["chat_template"])
    _health_args(e, base_model=True)
    e.add_argument("--output", default=None, help="write the scores to this JSON file")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")


def _export_parser(sub) -> None:
    x = sub.add_parser(
        "export",
        help="export a saved editor's edits as a weight patch or a PEFT LoRA adapter",
        description="From an editor checkpoint (run --save-editor, or "
        "UltraEditor.save) and the edited model (run --save-model), write the "
        "edits as a weight patch (--patch) and/or a PEFT LoRA adapter (--lora).",
    )
    _model_args(x, with_backend=False)
    x.add_argument("--checkpoint", required=True, help="the editor's checkpoint directory")
    x.add_argument("--patch", default=None, metavar="DIR", help="write a weight patch there")
    x.add_argument("--lora", default=None, metavar="DIR", help="write a LoRA adapter there")
    x.add_argument(
        "--rank", type=_positive_int, default=None, help="rank of the LoRA adapter (default: exact)"
    )
    x.add_argument(
        "--base-model",
        default=None,
        help="the unedited model, for an exact LoRA when the checkpoint holds no undo log of every turn",
    )
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
