"""The dataset formats, and how a record of each becomes an ``EditRequest``: the format
detected from a record's keys (:func:`detect_format`), and one converter per format that
checks the fields it uses and maps them (:func:`convert`).

``target="answers"`` (default) uses the dataset's own edit target; ``target="alt"``
uses the ``alt`` field (the counterfactual setting) and is only valid for formats
that have one (``zsre``, ``zsre_ultraedit``, ``fever``).

=================  ==========================================================================
format             mapping
=================  ==========================================================================
zsre               MEND zsRE (``subject, src, pred, rephrase, alt, answers[], loc, loc_ans,
                   cond``): prompt=``src``; target=``answers[0]`` (or ``alt``);
                   rephrase=``rephrase``; locality_prompt=``loc + "?"`` (the ``nq question: ``
                   prefix is kept as in the data and a ``?`` is always appended, as the
                   UltraEdit reference does); locality_answer=``loc_ans``.
zsre_ultraedit     zsRE as the UltraEdit reference stores it (``src, rephrase, alt, ans, loc,
                   loc_ans, subject``): the same as ``zsre`` with target=``ans`` (or ``alt``).
counterfact        MEMIT/ROME CounterFact: prompt=``requested_rewrite.prompt`` with its single
                   ``{}`` replaced by ``requested_rewrite.subject``;
                   target=``requested_rewrite.target_new.str``;
                   rephrase=``paraphrase_prompts[0]``;
                   locality_prompt=``neighborhood_prompts[0]``;
                   locality_answer=``requested_rewrite.target_true.str``.
counterfact_flat   EasyEdit flat CounterFact (``prompt, target_new, subject, ground_truth,
                   rephrase_prompt, locality_prompt, locality_ground_truth``): taken as is;
                   any of these that is a list contributes its first element.
fever              MEND/MALMEN FEVER (``prompt, equiv_prompt[], alt, unrel_prompt,
                   unrel_ans``): target=``alt``; rephrase=``equiv_prompt[0]``;
                   locality=``unrel_prompt`` / ``unrel_ans``.
wikibigedit        WikiBigEdit (``tag, subject, update, rephrase, personas, ans, loc, loc_ans,
                   mhop, mhop_ans``): prompt=``update``; target=``ans``;
                   rephrase=``rephrase``; locality=``loc`` / ``loc_ans`` (as is).
                   ``personas``, ``mhop``, ``mhop_ans`` go into :attr:`Example.extras`.
ultraeditbench     UltraEditBench (``prompt, subject, rephrase_prompt, ans, loc, loc_ans``):
                   target=``ans``; rephrase=``rephrase_prompt``; locality=``loc`` /
                   ``loc_ans`` (as is).
=================  ==========================================================================

Every field that the mapping uses is required and must be a non-empty string (or, where a
list is expected, a non-empty list of non-empty strings).  Values are not stripped or
otherwise rewritten beyond what the table says.  ``Example.extras`` keeps the remaining
useful fields (subject, all paraphrases, personas, multi-hop question, ...).

A malformed record raises :class:`BadRecord` (what is wrong with it); the reader adds the
file, the record index and the format, and raises or skips it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from ..model.requests import EditRequest

FORMATS: Tuple[str, ...] = (
    "zsre",
    "zsre_ultraedit",
    "counterfact",
    "counterfact_flat",
    "fever",
    "wikibigedit",
    "ultraeditbench",
)
FORMATS_WITH_ALT = ("zsre", "zsre_ultraedit", "fever")


class BadRecord(Exception):
    """What is wrong with a record (the reader names the file and the record)."""


def type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


# --------------------------------------------------------------------------- checked fields
def _get(rec: Dict[str, Any], key: str, name: str) -> Any:
    if key not in rec:
        raise BadRecord(f"missing field {name!r}")
    return rec[key]


def _check_str(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise BadRecord(f"field {name!r}: expected a string, got {type_name(v)}")
    if not v.strip():
        raise BadRecord(f"field {name!r}: empty string")
    return v


def _str(rec: Dict[str, Any], key: str, name: Optional[str] = None) -> str:
    name = name or key
    return _check_str(_get(rec, key, name), name)


def _str_list(
    rec: Dict[str, Any], key: str, name: Optional[str] = None, *, allow_str: bool = False
) -> List[str]:
    """A non-empty list of non-empty strings (a bare string too when ``allow_str``)."""
    name = name or key
    v = _get(rec, key, name)
    if allow_str and isinstance(v, str):
        return [_check_str(v, name)]
    if not isinstance(v, list):
        kind = "a string or a list of strings" if allow_str else "a list of strings"
        raise BadRecord(f"field {name!r}: expected {kind}, got {type_name(v)}")
    if not v:
        raise BadRecord(f"field {name!r}: empty list")
    return [_check_str(x, f"{name}[{i}]") for i, x in enumerate(v)]


def _dict(rec: Dict[str, Any], key: str, name: Optional[str] = None) -> Dict[str, Any]:
    name = name or key
    v = _get(rec, key, name)
    if not isinstance(v, dict):
        raise BadRecord(f"field {name!r}: expected an object, got {type_name(v)}")
    return v


def _opt_str(rec: Dict[str, Any], key: str) -> Optional[str]:
    """Optional string: missing, null or blank -> None."""
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise BadRecord(f"field {key!r}: expected a string or null, got {type_name(v)}")
    return v if v.strip() else None


def _opt_str_list(rec: Dict[str, Any], key: str) -> List[str]:
    """Optional list of strings (a bare string is one element): missing or null -> []."""
    v = rec.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    if not isinstance(v, list):
        raise BadRecord(f"field {key!r}: expected a list of strings or null, got {type_name(v)}")
    return [_check_str(x, f"{key}[{i}]") for i, x in enumerate(v)]


def _target(rec: Dict[str, Any], target: str, default_key: str) -> str:
    return _str(rec, "alt") if target == "alt" else _str(rec, default_key)


# --------------------------------------------------------------------------- one per format
_Converted = Tuple[Dict[str, Any], Dict[str, Any]]  # (EditRequest kwargs, extras)


def _conv_zsre(rec: Dict[str, Any], target: str) -> _Converted:
    answers = _str_list(rec, "answers")
    tgt = _str(rec, "alt") if target == "alt" else answers[0]
    kw = dict(
        prompt=_str(rec, "src"),
        target=tgt,
        rephrase=_str(rec, "rephrase"),
        locality_prompt=_str(rec, "loc") + "?",
        locality_answer=_str(rec, "loc_ans"),
    )
    extras = {
        "subject": _opt_str(rec, "subject"),
        "answers": answers,
        "alt": _opt_str(rec, "alt"),
        "pred": _opt_str(rec, "pred"),
    }
    return kw, extras


def _conv_zsre_ultraedit(rec: Dict[str, Any], target: str) -> _Converted:
    kw = dict(
        prompt=_str(rec, "src"),
        target=_target(rec, target, "ans"),
        rephrase=_str(rec, "rephrase"),
        locality_prompt=_str(rec, "loc") + "?",
        locality_answer=_str(rec, "loc_ans"),
    )
    extras = {
        "subject": _opt_str(rec, "subject"),
        "ans": _opt_str(rec, "ans"),
        "alt": _opt_str(rec, "alt"),
    }
    return kw, extras


def _conv_counterfact(rec: Dict[str, Any], target: str) -> _Converted:
    rw = _dict(rec, "requested_rewrite")
    template = _str(rw, "prompt", "requested_rewrite.prompt")
    subject = _str(rw, "subject", "requested_rewrite.subject")
    n = template.count("{}")
    if n != 1:
        raise BadRecord(
            f"field 'requested_rewrite.prompt': expected exactly one '{{}}' "
            f"placeholder, found {n} in {template!r}"
        )
    new = _str(
        _dict(rw, "target_new", "requested_rewrite.target_new"),
        "str",
        "requested_rewrite.target_new.str",
    )
    true = _str(
        _dict(rw, "target_true", "requested_rewrite.target_true"),
        "str",
        "requested_rewrite.target_true.str",
    )
    para = _str_list(rec, "paraphrase_prompts")
    neigh = _str_list(rec, "neighborhood_prompts")
    kw = dict(
        prompt=template.replace("{}", subject),
        target=new,
        rephrase=para[0],
        locality_prompt=neigh[0],
        locality_answer=true,
    )
    extras = {
        "subject": subject,
        "case_id": rec.get("case_id"),
        "relation_id": rw.get("relation_id"),
        "target_true": true,
        "paraphrase_prompts": para,
        "neighborhood_prompts": neigh,
    }
    return kw, extras


def _conv_counterfact_flat(rec: Dict[str, Any], target: str) -> _Converted:
    para = _str_list(rec, "rephrase_prompt", allow_str=True)
    loc = _str_list(rec, "locality_prompt", allow_str=True)
    loc_ans = _str_list(rec, "locality_ground_truth", allow_str=True)
    kw = dict(
        prompt=_str_list(rec, "prompt", allow_str=True)[0],
        target=_str_list(rec, "target_new", allow_str=True)[0],
        rephrase=para[0],
        locality_prompt=loc[0],
        locality_answer=loc_ans[0],
    )
    gt = rec.get("ground_truth")
    if isinstance(gt, list):
        gt = gt[0] if gt else None
    extras = {
        "subject": _opt_str(rec, "subject"),
        "ground_truth": gt if isinstance(gt, str) else None,
        "rephrase_prompts": para,
        "locality_prompts": loc,
        "locality_ground_truths": loc_ans,
    }
    return kw, extras


def _conv_fever(rec: Dict[str, Any], target: str) -> _Converted:
    equiv = _str_list(rec, "equiv_prompt", allow_str=True)
    kw = dict(
        prompt=_str(rec, "prompt"),
        target=_str(rec, "alt"),
        rephrase=equiv[0],
        locality_prompt=_str(rec, "unrel_prompt"),
        locality_answer=_str(rec, "unrel_ans"),
    )
    return kw, {"equiv_prompts": equiv}


def _conv_wikibigedit(rec: Dict[str, Any], target: str) -> _Converted:
    kw = dict(
        prompt=_str(rec, "update"),
        target=_str(rec, "ans"),
        rephrase=_str(rec, "rephrase"),
        locality_prompt=_str(rec, "loc"),
        locality_answer=_str(rec, "loc_ans"),
    )
    mhop, mhop_ans = _opt_str(rec, "mhop"), _opt_str(rec, "mhop_ans")
    if (mhop is None) != (mhop_ans is None):
        have, lack = ("mhop", "mhop_ans") if mhop is not None else ("mhop_ans", "mhop")
        raise BadRecord(f"field {have!r} is given but {lack!r} is missing, null or empty")
    extras = {
        "tag": rec.get("tag"),
        "subject": _opt_str(rec, "subject"),
        "personas": _opt_str_list(rec, "personas"),
        "mhop": mhop,
        "mhop_ans": mhop_ans,
    }
    return kw, extras


def _conv_ultraeditbench(rec: Dict[str, Any], target: str) -> _Converted:
    kw = dict(
        prompt=_str(rec, "prompt"),
        target=_str(rec, "ans"),
        rephrase=_str(rec, "rephrase_prompt"),
        locality_prompt=_str(rec, "loc"),
        locality_answer=_str(rec, "loc_ans"),
    )
    return kw, {"subject": _opt_str(rec, "subject")}


_CONVERTERS: Dict[str, Callable[[Dict[str, Any], str], _Converted]] = {
    "zsre": _conv_zsre,
    "zsre_ultraedit": _conv_zsre_ultraedit,
    "counterfact": _conv_counterfact,
    "counterfact_flat": _conv_counterfact_flat,
    "fever": _conv_fever,
    "wikibigedit": _conv_wikibigedit,
    "ultraeditbench": _conv_ultraeditbench,
}
assert tuple(_CONVERTERS) == FORMATS


# --------------------------------------------------------------------------- detect, convert
def detect_format(record: Dict[str, Any]) -> str:
    """The dataset format of ``record`` (one of :data:`FORMATS`), from its keys:

    ``requested_rewrite`` -> counterfact; ``update`` or ``tag`` -> wikibigedit;
    ``prompt`` + ``rephrase_prompt`` + ``ans`` -> ultraeditbench; ``prompt`` +
    ``target_new`` -> counterfact_flat; ``prompt`` + ``equiv_prompt`` -> fever;
    ``src`` + ``answers`` -> zsre; ``src`` + ``ans`` -> zsre_ultraedit.
    Raises ``ValueError`` when none applies."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type_name(record)}")
    k = record.keys()
    if "requested_rewrite" in k:
        return "counterfact"
    if "update" in k or "tag" in k:
        return "wikibigedit"
    if "prompt" in k:
        if "rephrase_prompt" in k and "ans" in k:
            return "ultraeditbench"
        if "target_new" in k:
            return "counterfact_flat"
        if "equiv_prompt" in k:
            return "fever"
    if "src" in k:
        if "answers" in k:
            return "zsre"
        if "ans" in k:
            return "zsre_ultraedit"
    raise ValueError(
        f"cannot detect the dataset format from the keys {sorted(k)}; known formats: {', '.join(FORMATS)}"
    )


def convert(record: Any, fmt: str, target: str) -> Tuple[EditRequest, Dict[str, Any]]:
    """The ``EditRequest`` of ``record`` read as the format ``fmt``, and its extras;
    :class:`BadRecord` when it is malformed."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type_name(record)}")
    kw, extras = _CONVERTERS[fmt](record, target)
    try:
        request = EditRequest(**kw)
    except (TypeError, ValueError) as e:  # pragma: no cover - fields are checked above
        raise BadRecord(str(e)) from None
    return request, extras


def check_target_for(fmt: str, target: str) -> None:
    """``ValueError`` when ``target="alt"`` is asked of a format without an ``alt`` field."""
    if target == "alt" and fmt not in FORMATS_WITH_ALT:
        raise ValueError(
            f"target='alt' is not available for the {fmt!r} format "
            f"(formats with an 'alt' field: {', '.join(FORMATS_WITH_ALT)})"
        )
