"""For people coming from EasyEdit: its UltraEdit hparams and its ``batch_edit`` call, on this
package's editor, with metrics in EasyEdit's shape.

    from ultraedit_fast.integrations.easyedit import BaseEditor
    editor = BaseEditor.from_hparams("hparams/ULTRAEDIT/llama3-8b.yaml", model, tokenizer)
    metrics, edited_model, _ = editor.batch_edit(
        prompts=prompts, target_new=targets, rephrase_prompts=rephrases,
        locality_inputs={"neighborhood": {"prompt": loc_prompts, "ground_truth": loc_answers}},
        sequential_edit=True)
    metrics[0]["post"]["rewrite_acc"], metrics[0]["post"]["locality"]["neighborhood_acc"]

What maps from the hparams: :mod:`ultraedit_fast.core.hparams`. ``batch_edit``:

- requests are cut into turns of the hparams' ``batch_size`` edits (all in one turn without
  it); ``sequential_edit=True``: one lifelong editor over all turns, every request scored
  after the last one (a lifelong run); ``False``: each turn edits the original model and is
  scored right after it, and the weights are then put back (EasyEdit's non-sequential mode);
- per request, ``pre`` (before editing) and ``post`` hold ``rewrite_acc`` and
  ``rephrase_acc`` (teacher-forced token accuracy, a one-element list as EasyEdit has it),
  and ``locality[<key>_acc]``: the agreement, token by token, of the locality prompt's
  predictions at its ground-truth answer with the unedited model's (EasyEdit's locality);
  ``post`` also holds the generation-based ``rewrite_gen`` / ``rephrase_gen`` (0 or 1);
- returns ``(metrics, model, editor)`` (EasyEdit's third value is a copy of the original
  weights; here it is the :class:`~ultraedit_fast.UltraEditor`, whose undo log can put them
  back).

Where EasyEdit's port of UltraEdit differs from the paper (and this package follows the
paper): EasyEdit's ``token`` switch can take keys at other positions than the answer tokens
(this package refuses any value but ``ans``); ``max_length`` truncates long prompts (this
package refuses a request longer than the context instead of editing a truncated one).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..core import hparams as H
from ..core.config import EditorConfig
from ..editors.ultraedit import UltraEditor
from ..scoring.metrics import capture_predictions, evaluate
from ..model.requests import EditRequest, as_requests, check_fits, context_length, tokenize_pair
from ..utils.checks import check_bool, check_positive_int


def _listify(name, v, n) -> Optional[List[str]]:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    v = list(v)
    if len(v) != n:
        raise ValueError(f"{name}: expected {n} entries (one per prompt), got {len(v)}")
    return v


def _locality(locality_inputs, n: int) -> Dict[str, Dict[str, List[str]]]:
    """``locality_inputs`` checked: per key, ``n`` prompts and their ``n`` ground truths."""
    loc: Dict[str, Dict[str, List[str]]] = {}
    for key, entry in (locality_inputs or {}).items():
        if not isinstance(entry, Mapping) or "prompt" not in entry or "ground_truth" not in entry:
            raise ValueError(
                f"locality_inputs[{key!r}]: expected {{'prompt': [...], 'ground_truth': [...]}}"
            )
        loc[key] = {
            "prompt": _listify(f"locality_inputs[{key!r}]['prompt']", entry["prompt"], n),
            "ground_truth": _listify(
                f"locality_inputs[{key!r}]['ground_truth']", entry["ground_truth"], n
            ),
        }
    return loc


def _with_locality(requests: List[EditRequest], key, entry) -> List[EditRequest]:
    """The requests with one ``locality_inputs`` key's prompts and ground truths (checked,
    naming ``locality_inputs[key][i]``)."""
    return as_requests(
        [
            {"prompt": r.prompt, "target": r.target, "locality_prompt": p, "locality_answer": a}
            for r, p, a in zip(requests, entry["prompt"], entry["ground_truth"])
        ],
        argument=f"locality_inputs[{key!r}]",
    )


def _case_metrics(prompts, targets, pre, post) -> List[dict]:
    """EasyEdit's record per request: the rewrite asked for, its ``pre`` and ``post`` scores."""
    return [
        {
            "case_id": i,
            "requested_rewrite": {"prompt": prompts[i], "target_new": targets[i]},
            "pre": pre[i]["metrics"],
            "post": post[i]["metrics"],
        }
        for i in range(len(prompts))
    ]


class BaseEditor:
    """EasyEdit's ``BaseEditor`` for UltraEdit: ``from_hparams`` then ``batch_edit``."""

    def __init__(
        self, model, tokenizer, options: Mapping[str, Any], edits_per_turn: Optional[int] = None
    ):
        if model is None or tokenizer is None:
            raise TypeError(
                "model, tokenizer: pass the loaded model and its tokenizer "
                "(ultraedit_fast.model.loading.load_model loads them)"
            )
        if not isinstance(options, Mapping):
            raise TypeError(
                f"options: expected a mapping of UltraEditor options, got {type(options).__name__}"
            )
        EditorConfig.build(None, options, owner="BaseEditor")  # every option checked, now
        self.model = model
        self.tokenizer = tokenizer
        self.options = dict(options)
        self.edits_per_turn = check_positive_int("edits_per_turn", edits_per_turn, allow_none=True)

    @classmethod
    def from_hparams(cls, hparams, model, tokenizer) -> "BaseEditor":
        options, settings = H.to_options(hparams)
        return cls(model, tokenizer, options, settings["edits_per_turn"])

    def batch_edit(
        self,
        prompts: Sequence[str],
        target_new: Sequence[str],
        ground_truth: Optional[Sequence[str]] = None,
        rephrase_prompts: Optional[Sequence[str]] = None,
        locality_inputs: Optional[Mapping[str, Mapping[str, Sequence[str]]]] = None,
        sequential_edit: bool = False,
        **unused,
    ):
        """Edit ``prompts`` -> ``target_new`` and score them, as EasyEdit's ``batch_edit``
        does (see the module docstring). ``ground_truth`` is accepted and not used (the
        paper's scores do not read it)."""
        if unused:
            raise TypeError(
                f"batch_edit() got arguments this adapter does not take: {sorted(unused)}"
            )
        check_bool("sequential_edit", sequential_edit)
        if prompts is None or isinstance(prompts, str) or not hasattr(prompts, "__len__"):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        prompts = _listify("prompts", prompts, len(prompts))
        n = len(prompts)
        targets = _listify("target_new", target_new, n)
        rephrases = _listify("rephrase_prompts", rephrase_prompts, n)
        _listify("ground_truth", ground_truth, n)
        loc = _locality(locality_inputs, n)
        requests = as_requests(
            [
                {"prompt": p, "target": t, "rephrase": rephrases[i] if rephrases else None}
                for i, (p, t) in enumerate(zip(prompts, targets))
            ],
            argument="prompts",
        )
        self._check_fit(requests, loc)  # nothing is edited when any text is too long
        per_turn = self.edits_per_turn or n
        turns = [list(range(s, min(n, s + per_turn))) for s in range(0, n, per_turn)]
        pre = self._scores(requests, loc, base=None, generation=False)
        editor, post = self._edit_and_score(requests, loc, turns, pre, sequential_edit)
        return _case_metrics(prompts, targets, pre, post), self.model, editor

    def _check_fit(self, requests: List[EditRequest], loc) -> None:
        """Every prompt (with its target), rephrase and locality prompt (with its ground
        truth) fits the model's context: checked before the first turn, not in the middle."""
        limit = context_length(self.model)
        chat = bool(self.options.get("chat_template", False))
        for i, r in enumerate(requests):
            tokenize_pair(
                self.tokenizer, r.prompt, r.target, limit, where=f"prompts[{i}]", chat_template=chat
            )
        check_fits(self.tokenizer, requests, limit, chat, argument="prompts")
        for key, entry in loc.items():
            check_fits(
                self.tokenizer,
                _with_locality(requests, key, entry),
                limit,
                chat,
                argument=f"locality_inputs[{key!r}]",
            )

    def _edit_and_score(self, requests, loc, turns, pre, sequential_edit: bool):
        """Edit the turns (lists of request indices) with one editor and score the edited
        model: every request after the last turn (``sequential_edit``), or each turn's right
        after it, its edits then rolled back. Returns the editor and the ``post`` scores."""
        options = dict(self.options)
        if not sequential_edit:  # each turn from the original model: undo puts it back
            options["undo"] = True
        editor = UltraEditor(self.model, self.tokenizer, **options)
        post: List[Optional[dict]] = [None] * len(requests)
        for idx in turns:
            editor.edit([requests[i] for i in idx])
            if not sequential_edit:
                scored = self._scores(
                    [requests[i] for i in idx],
                    {k: {f: [v[f][i] for i in idx] for f in v} for k, v in loc.items()},
                    base=pre,
                    subset=idx,
                )
                for j, i in enumerate(idx):
                    post[i] = scored[j]
                editor.rollback(editor.undo_turns)
        if sequential_edit:
            post = self._scores(requests, loc, base=pre)
        return editor, post

    def _scores(self, requests, loc, base, generation=True, subset=None) -> List[dict]:
        """Per request: ``{"metrics": {...}, "loc_pred": {key: predictions}}``."""
        m = evaluate(self.model, self.tokenizer, requests, generation=generation, per_request=True)[
            "per_request"
        ]
        out = []
        for i, row in enumerate(m):
            metrics = {"rewrite_acc": [row["ES"]]}
            if "GS" in row:
                metrics["rephrase_acc"] = [row["GS"]]
            if generation:
                metrics["rewrite_gen"] = row.get("ES_gen")
                if "GS_gen" in row:
                    metrics["rephrase_gen"] = row["GS_gen"]
            out.append({"metrics": metrics, "loc_pred": {}})
        for key, entry in loc.items():
            reqs = _with_locality(requests, key, entry)
            preds = capture_predictions(self.model, self.tokenizer, reqs)
            for j, pr in enumerate(preds):
                out[j]["loc_pred"][key] = pr
                if base is not None:
                    ref = base[subset[j] if subset is not None else j]["loc_pred"][key]
                    agree = sum(a == b for a, b in zip(pr, ref)) / len(ref)
                    out[j]["metrics"].setdefault("locality", {})[f"{key}_acc"] = [agree]
        return out
