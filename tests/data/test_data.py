"""Tests for ultraedit_fast.data.datasets: streaming dataset loaders."""

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from ultraedit_fast.data.datasets import (
    FORMATS,
    DataFormatError,
    Example,
    LoadStats,
    RequestReader,
    count_records,
    detect_format,
    iter_examples,
    load_requests,
)
from ultraedit_fast.data.jsonstream import iter_values as _iter_values
from ultraedit_fast.model.requests import EditRequest

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def real(rel):
    p = DATA / rel
    if not p.is_file():
        pytest.skip(f"real data file {p} is absent (shared data folder not available)")
    return p


def write_json(path, records, **kw):
    path.write_text(json.dumps(records, **kw), encoding="utf-8")
    return path


def write_jsonl(path, records, newline="\n", blank_lines=False):
    with open(path, "w", encoding="utf-8", newline="") as f:
        for r in records:
            f.write(json.dumps(r) + newline)
            if blank_lines:
                f.write("  " + newline)
    return path


# ----------------------------------------------------------------- real files


def test_zsre_mend_train_1k():
    p = real("zsre/zsre_mend_train-1k.json")
    raw = json.load(open(p, encoding="utf-8"))
    stats = LoadStats()
    exs = list(iter_examples(p, stats=stats))
    assert len(exs) == 1000 == len(raw) == count_records(p)
    assert stats.format == "zsre" and stats.yielded == 1000 and stats.skipped == 0
    r0, e0 = raw[0], exs[0]
    assert isinstance(e0, Example) and e0.index == 0 and e0.format == "zsre"
    assert e0.request == EditRequest(
        prompt=r0["src"],
        target=r0["answers"][0],
        rephrase=r0["rephrase"],
        locality_prompt=r0["loc"] + "?",
        locality_answer=r0["loc_ans"],
    )
    assert e0.request.locality_prompt.startswith("nq question: ")
    assert e0.request.locality_prompt.endswith("?")
    assert e0.extras["subject"] == r0["subject"] and e0.extras["answers"] == r0["answers"]
    for i in (1, 499, 999):
        assert exs[i].index == i
        assert exs[i].request.prompt == raw[i]["src"]
        assert exs[i].request.target == raw[i]["answers"][0]
        assert exs[i].request.locality_answer == raw[i]["loc_ans"]
    # same result with tiny chunks (elements straddle chunk boundaries, \r\n in the file)
    assert list(iter_examples(p, chunk_size=7)) == exs
    # counterfactual setting
    alt = list(load_requests(p, target="alt", limit=3))
    assert [r.target for r in alt] == [raw[i]["alt"] for i in range(3)]


def test_zsre_mend_eval_first10():
    p = real("zsre/zsre_mend_eval_first10.json")
    raw = json.load(open(p, encoding="utf-8"))
    reqs = list(load_requests(p, "zsre"))
    assert len(reqs) == 10
    for r, x in zip(reqs, raw):
        assert (r.prompt, r.target, r.rephrase) == (x["src"], x["answers"][0], x["rephrase"])
        assert (r.locality_prompt, r.locality_answer) == (x["loc"] + "?", x["loc_ans"])


def test_ultraedit_zsre_reconstructed():
    p = real("zsre/ultraedit_zsre_eval_first10_reconstructed.json")
    raw = json.load(open(p, encoding="utf-8"))
    assert detect_format(raw[0]) == "zsre_ultraedit"
    exs = list(iter_examples(p))
    assert len(exs) == 10 and all(e.format == "zsre_ultraedit" for e in exs)
    for e, x in zip(exs, raw):
        assert e.request == EditRequest(
            x["src"], x["ans"], x["rephrase"], x["loc"] + "?", x["loc_ans"]
        )
    assert [r.target for r in load_requests(p, target="alt")] == [x["alt"] for x in raw]


def test_counterfact_memit_preview():
    p = real("counterfact/counterfact_memit_preview7.json")
    raw = json.load(open(p, encoding="utf-8"))
    exs = list(iter_examples(p))
    assert len(exs) == 7 and exs[0].format == "counterfact"
    e0 = exs[0].request
    assert e0.prompt == "The mother tongue of Danielle Darrieux is"
    assert e0.target == "English" and e0.locality_answer == "French"
    for e, x in zip(exs, raw):
        rw = x["requested_rewrite"]
        assert e.request.prompt == rw["prompt"].format(rw["subject"])
        assert e.request.target == rw["target_new"]["str"]
        assert e.request.rephrase == x["paraphrase_prompts"][0]
        assert e.request.locality_prompt == x["neighborhood_prompts"][0]
        assert e.request.locality_answer == rw["target_true"]["str"]
        assert e.extras["paraphrase_prompts"] == x["paraphrase_prompts"]
        assert e.extras["case_id"] == x["case_id"]
    assert list(iter_examples(p, chunk_size=5)) == exs
    with pytest.raises(ValueError, match="alt"):
        list(load_requests(p, target="alt"))


# ----------------------------------------------------------------- synthetic formats

CF_FLAT = [
    {
        "prompt": "The capital of France is",
        "target_new": "Lyon",
        "subject": "France",
        "ground_truth": "Paris",
        "rephrase_prompt": "France's capital city is",
        "locality_prompt": "The capital of Spain is",
        "locality_ground_truth": "Madrid",
    },
    {
        "prompt": ["Danielle Darrieux speaks"],
        "target_new": ["English"],
        "subject": "Danielle Darrieux",
        "ground_truth": ["French"],
        "rephrase_prompt": ["The native language of Danielle Darrieux is", "other"],
        "locality_prompt": ["Léon Blum speaks"],
        "locality_ground_truth": ["French"],
    },
]

FEVER = [
    {
        "prompt": "Is the Eiffel Tower in Rome?",
        "equiv_prompt": ["Does Rome host the Eiffel Tower?"],
        "alt": "SUPPORTS",
        "unrel_prompt": "Is water wet?",
        "unrel_ans": "REFUTES",
    }
]

WIKIBIG_BASE = {
    "tag": "persistent",
    "subject": "Acme",
    "update": "Who is the CEO of Acme?",
    "rephrase": "Acme's chief executive is who?",
    "ans": "Jane Roe",
    "loc": "Who wrote Hamlet?",
    "loc_ans": "William Shakespeare",
}

UEB = [
    {
        "prompt": "The author of Dune is",
        "subject": "Dune",
        "rephrase_prompt": "Dune was written by",
        "ans": "Frank Herbert",
        "loc": "The capital of Japan is",
        "loc_ans": "Tokyo",
    }
]


def test_counterfact_flat(tmp_path):
    p = write_json(tmp_path / "cf.json", CF_FLAT)
    exs = list(iter_examples(p))
    assert [e.format for e in exs] == ["counterfact_flat"] * 2
    assert exs[0].request == EditRequest(
        "The capital of France is",
        "Lyon",
        "France's capital city is",
        "The capital of Spain is",
        "Madrid",
    )
    assert exs[1].request == EditRequest(
        "Danielle Darrieux speaks",
        "English",
        "The native language of Danielle Darrieux is",
        "Léon Blum speaks",
        "French",
    )
    assert exs[1].extras["rephrase_prompts"] == CF_FLAT[1]["rephrase_prompt"]
    assert exs[1].extras["ground_truth"] == "French"


def test_fever(tmp_path):
    p = write_json(tmp_path / "fever.json", FEVER)
    (e,) = list(iter_examples(p))
    assert e.format == "fever"
    assert e.request == EditRequest(
        "Is the Eiffel Tower in Rome?",
        "SUPPORTS",
        "Does Rome host the Eiffel Tower?",
        "Is water wet?",
        "REFUTES",
    )
    assert list(load_requests(p, target="alt")) == [e.request]


def test_wikibigedit_personas_and_mhop(tmp_path):
    full = dict(
        WIKIBIG_BASE,
        personas=["As a pirate: who be Acme's captain?"],
        mhop="Where was the CEO of Acme born?",
        mhop_ans="Ohio",
    )
    nulls = dict(WIKIBIG_BASE, personas=None, mhop=None, mhop_ans=None)
    missing = dict(WIKIBIG_BASE)
    str_persona = dict(WIKIBIG_BASE, personas="In the voice of a child: who runs Acme?")
    p = write_json(tmp_path / "wbe.json", [full, nulls, missing, str_persona])
    exs = list(iter_examples(p))
    assert all(e.format == "wikibigedit" for e in exs)
    want = EditRequest(
        "Who is the CEO of Acme?",
        "Jane Roe",
        "Acme's chief executive is who?",
        "Who wrote Hamlet?",
        "William Shakespeare",
    )
    assert all(e.request == want for e in exs)
    assert exs[0].extras["personas"] == full["personas"]
    assert exs[0].extras["mhop"] == full["mhop"] and exs[0].extras["mhop_ans"] == "Ohio"
    for e in exs[1:3]:
        assert e.extras["personas"] == [] and e.extras["mhop"] is None
        assert e.extras["mhop_ans"] is None
    assert exs[3].extras["personas"] == [str_persona["personas"]]
    assert exs[0].extras["tag"] == "persistent"
    # a multi-hop question without its answer cannot be scored: malformed
    bad = write_json(tmp_path / "bad.json", [dict(WIKIBIG_BASE, mhop="Where?", mhop_ans=None)])
    with pytest.raises(DataFormatError, match=r"record 0: .*mhop"):
        list(load_requests(bad))
    with pytest.raises(ValueError, match="alt"):
        list(load_requests(p, target="alt"))


def test_ultraeditbench(tmp_path):
    p = write_json(tmp_path / "ueb.json", UEB)
    (e,) = list(iter_examples(p))
    assert e.format == "ultraeditbench" and e.extras["subject"] == "Dune"
    assert e.request == EditRequest(
        "The author of Dune is",
        "Frank Herbert",
        "Dune was written by",
        "The capital of Japan is",
        "Tokyo",
    )


@pytest.mark.parametrize("newline,blank", [("\n", False), ("\r\n", True)])
def test_jsonl_matches_array(tmp_path, newline, blank):
    for name, recs in (
        ("cf", CF_FLAT),
        ("fever", FEVER),
        ("ueb", UEB),
        ("wbe", [WIKIBIG_BASE] * 3),
    ):
        a = list(iter_examples(write_json(tmp_path / f"{name}.json", recs)))
        j = list(iter_examples(write_jsonl(tmp_path / f"{name}.jsonl", recs, newline, blank)))
        assert a == j
        assert count_records(tmp_path / f"{name}.jsonl") == len(recs)
    # detection is by content, not by extension
    p = write_jsonl(tmp_path / "looks_like_array.json", UEB * 2)
    assert len(list(load_requests(p))) == 2
    p = write_json(tmp_path / "looks_like_lines.jsonl", UEB * 2, indent=2)
    assert len(list(load_requests(p))) == 2


def test_utf8_bom(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(UEB).encode())
    assert len(list(load_requests(p))) == 1


# ----------------------------------------------------------------- detection and options


def test_detect_format():
    mend = {
        "subject": "s",
        "src": "q",
        "pred": "p",
        "rephrase": "r",
        "alt": "a",
        "answers": ["x"],
        "loc": "nq question: l",
        "loc_ans": "la",
        "cond": "c",
    }
    ue = {
        "subject": "s",
        "src": "q",
        "rephrase": "r",
        "alt": "a",
        "ans": "x",
        "loc": "nq question: l",
        "loc_ans": "la",
    }
    cf = {"requested_rewrite": {}, "paraphrase_prompts": [], "neighborhood_prompts": []}
    assert detect_format(mend) == "zsre"
    assert detect_format(ue) == "zsre_ultraedit"
    assert detect_format(cf) == "counterfact"
    assert detect_format(CF_FLAT[0]) == "counterfact_flat"
    assert detect_format(FEVER[0]) == "fever"
    assert detect_format(WIKIBIG_BASE) == "wikibigedit"
    assert detect_format({k: v for k, v in WIKIBIG_BASE.items() if k != "tag"}) == "wikibigedit"
    assert detect_format(UEB[0]) == "ultraeditbench"
    with pytest.raises(ValueError, match="cannot detect") as ei:
        detect_format({"question": "q", "answer": "a"})
    for name in FORMATS:
        assert name in str(ei.value)
    with pytest.raises(ValueError):
        detect_format(["not", "a", "dict"])
    assert set(FORMATS) == {
        "zsre",
        "zsre_ultraedit",
        "counterfact",
        "counterfact_flat",
        "fever",
        "wikibigedit",
        "ultraeditbench",
    }


def test_alt_option(tmp_path):
    mend = {
        "subject": "s",
        "src": "Q?",
        "rephrase": "R?",
        "alt": "ALT",
        "answers": ["TRUE", "T2"],
        "loc": "nq question: l",
        "loc_ans": "la",
    }
    p = write_json(tmp_path / "m.json", [mend])
    assert next(load_requests(p)).target == "TRUE"
    assert next(load_requests(p, target="alt")).target == "ALT"
    with pytest.raises(ValueError, match="target"):
        load_requests(p, target="bogus")
    p2 = write_json(tmp_path / "u.json", UEB)
    with pytest.raises(ValueError, match="alt"):
        load_requests(p2, "ultraeditbench", target="alt")  # eager with an explicit format


def test_explicit_format_mismatch(tmp_path):
    p = write_json(tmp_path / "u.json", UEB)
    with pytest.raises(
        DataFormatError,
        match=r"u\.json: record 0: missing field 'answers' "
        r"\(format 'zsre'; the record looks like 'ultraeditbench'\)",
    ):
        list(load_requests(p, "zsre"))


def test_offset_and_limit(tmp_path):
    recs = [dict(UEB[0], ans=f"answer {i}") for i in range(10)]
    p = write_json(tmp_path / "u.json", recs)
    got = list(iter_examples(p, offset=3, limit=4))
    assert [e.index for e in got] == [3, 4, 5, 6]
    assert [e.request.target for e in got] == [f"answer {i}" for i in range(3, 7)]
    assert list(load_requests(p, limit=0)) == []
    assert list(load_requests(p, offset=10)) == []
    assert len(list(load_requests(p, offset=8, limit=100))) == 2
    # offset skips records without validating them
    recs[0] = {"garbage": True}
    p = write_json(tmp_path / "g.json", recs)
    assert len(list(load_requests(p, offset=1))) == 9
    for bad in ({"limit": -1}, {"offset": -2}, {"offset": 1.5}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            load_requests(p, **bad)


def test_reader_object(tmp_path):
    recs = [UEB[0], {"prompt": "x"}, UEB[0], 42, dict(UEB[0], ans="")]
    p = write_json(tmp_path / "r.json", recs)
    reader = RequestReader(p, on_error="skip")
    assert len(list(reader)) == 2
    assert reader.skipped == 3 and [i for i, _ in reader.errors] == [1, 3, 4]
    assert reader.stats.records == 5 and reader.stats.yielded == 2
    assert reader.stats.format == "ultraeditbench"
    exs = list(reader.examples())  # re-iterable, stats reset per pass
    assert [e.index for e in exs] == [0, 2] and reader.skipped == 3


# ----------------------------------------------------------------- errors


def test_missing_file_and_bad_names(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_requests(missing)  # eager, before iteration
    with pytest.raises(FileNotFoundError, match="nope.json"):
        count_records(missing)
    p = write_json(tmp_path / "u.json", UEB)
    with pytest.raises(ValueError) as ei:
        load_requests(p, "zsre_mend")
    for name in FORMATS:
        assert name in str(ei.value)
    with pytest.raises(ValueError, match="on_error"):
        load_requests(p, on_error="ignore")


MALFORMED = [
    ({k: v for k, v in UEB[0].items() if k != "ans"}, "missing field 'ans'"),
    (dict(UEB[0], loc_ans=None), "'loc_ans': expected a string, got null"),
    (dict(UEB[0], prompt=""), "'prompt': empty string"),
    (dict(UEB[0], rephrase_prompt=3), "'rephrase_prompt': expected a string, got int"),
    ({"what": "ever"}, "missing field 'prompt'"),
    ("just a string", "expected a JSON object"),
]


@pytest.mark.parametrize("bad,msg", MALFORMED)
def test_malformed_record_raises_naming_file_and_index(tmp_path, bad, msg):
    recs = [UEB[0], UEB[0], bad, UEB[0]]
    p = write_json(tmp_path / "data_file.json", recs)
    it = load_requests(p)
    assert next(it) == next(load_requests(p))
    with pytest.raises(DataFormatError) as ei:
        list(it)
    text = str(ei.value)
    assert str(p) in text and "record 2" in text and msg in text, text
    assert ei.value.index == 2 and ei.value.path == str(p)
    assert isinstance(ei.value, ValueError)
    # the same in JSON Lines
    pl = write_jsonl(tmp_path / "data_file.jsonl", recs)
    with pytest.raises(DataFormatError, match=r"data_file\.jsonl: record 2: "):
        list(load_requests(pl))


def test_undetectable_first_record(tmp_path):
    p = write_json(tmp_path / "odd.json", [{"question": "q", "answer": "a"}, UEB[0]])
    with pytest.raises(DataFormatError, match=r"odd\.json: record 0: cannot detect"):
        list(load_requests(p))
    stats = LoadStats()
    assert len(list(load_requests(p, on_error="skip", stats=stats))) == 1
    assert stats.skipped == 1 and stats.format == "ultraeditbench"


def test_malformed_counterfact_and_zsre(tmp_path):
    cf = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of is",
            "subject": "X",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["p"],
        "neighborhood_prompts": ["n"],
    }
    p = write_json(tmp_path / "cf.json", [cf])
    with pytest.raises(DataFormatError, match=r"record 0: .*placeholder"):
        list(load_requests(p))
    cf2 = json.loads(json.dumps(cf))
    cf2["requested_rewrite"]["prompt"] = "{} speaks"
    cf2["paraphrase_prompts"] = []
    p = write_json(tmp_path / "cf2.json", [cf2])
    with pytest.raises(DataFormatError, match=r"'paraphrase_prompts': empty list"):
        list(load_requests(p))
    cf2["paraphrase_prompts"] = ["p"]
    del cf2["requested_rewrite"]["target_new"]["str"]
    p = write_json(tmp_path / "cf3.json", [cf2])
    with pytest.raises(DataFormatError, match=r"requested_rewrite\.target_new\.str"):
        list(load_requests(p))
    z = {"src": "Q", "rephrase": "R", "alt": "A", "answers": [], "loc": "L", "loc_ans": "LA"}
    p = write_json(tmp_path / "z.json", [z])
    with pytest.raises(DataFormatError, match=r"'answers': empty list"):
        list(load_requests(p))


def test_skip_and_count(tmp_path):
    recs = [UEB[0]] + [bad for bad, _ in MALFORMED] + [UEB[0]]
    p = write_json(tmp_path / "mixed.json", recs)
    stats = LoadStats()
    got = list(load_requests(p, on_error="skip", stats=stats))
    assert len(got) == 2
    assert stats.skipped == len(MALFORMED) == len(stats.errors)
    assert [i for i, _ in stats.errors] == list(range(1, len(MALFORMED) + 1))
    for (_, msg), (_, expected) in zip(stats.errors, MALFORMED):
        assert str(p) in msg and expected in msg
    # skip mode also skips invalid JSON Lines lines
    pl = tmp_path / "mixed.jsonl"
    pl.write_text(
        json.dumps(UEB[0]) + '\n{"prompt": oops}\n' + json.dumps(UEB[0]) + "\n" + '{"prompt": "tru',
        encoding="utf-8",
    )
    reader = RequestReader(pl, on_error="skip")
    assert len(list(reader)) == 2 and reader.skipped == 2
    assert "line 2" in reader.errors[0][1] and "truncated" in reader.errors[1][1]
    with pytest.raises(DataFormatError, match=r"mixed\.jsonl: record 1: line 2: invalid JSON"):
        list(load_requests(pl))


def test_truncated_array(tmp_path):
    text = json.dumps(UEB * 5, indent=1)
    first_end = text.index("}") + 1
    for cut in (1, 10, first_end - 1, first_end, first_end + 1, first_end + 3, len(text) - 1):
        p = tmp_path / f"trunc{cut}.json"
        p.write_text(text[:cut], encoding="utf-8")
        for chunk in (7, 1 << 20):
            with pytest.raises(DataFormatError) as ei:
                list(load_requests(p, chunk_size=chunk))
            msg = str(ei.value)
            assert str(p) in msg and "byte" in msg and "truncated" in msg, msg
        with pytest.raises(DataFormatError):
            count_records(p)


@pytest.mark.parametrize(
    "text,where",
    [
        ('[{"a": 1}, {"a": 2,}]', "record 1"),
        ('[{"a": 1} {"a": 2}]', "record 0"),
        ('[{"a": 1},]', "trailing comma"),
        ('[{"a": 1}] x', "after the closing"),
        ('[{"a": tru}]', "record 0"),
        ('[{"a": "b\x01"}]', "Invalid control character"),
        ("   \n", "no JSON data"),
        ("hello", "expected a JSON array"),
    ],
)
def test_invalid_json(tmp_path, text, where):
    p = tmp_path / "bad.json"
    p.write_text(text, encoding="utf-8")
    for chunk in (3, 1 << 20):
        with pytest.raises(DataFormatError) as ei:
            list(load_requests(p, "ultraeditbench", chunk_size=chunk, on_error="skip"))
        assert str(p) in str(ei.value) and where in str(ei.value), str(ei.value)


def test_truncated_at_every_byte(tmp_path):
    rec = dict(
        UEB[0],
        ans="Herbert “Frank” \\ é",
        case_id=12345,
        flag=True,
        other=None,
        neg=-1.5e3,
        lst=[False, 0],
    )
    text = json.dumps([rec, rec], ensure_ascii=False, indent=1)
    p = tmp_path / "cut.json"
    for cut in range(1, len(text)):
        p.write_text(text[:cut], encoding="utf-8")
        for chunk in (3, 1 << 20):
            with pytest.raises(DataFormatError) as ei:
                list(load_requests(p, chunk_size=chunk))
            msg = str(ei.value)
            assert str(p) in msg and "truncated" in msg, (cut, chunk, msg)
    p.write_text(text, encoding="utf-8")
    assert len(list(load_requests(p, chunk_size=3))) == 2


def test_invalid_json_byte_offset(tmp_path):
    good = json.dumps(dict(UEB[0], ans="Frank Herbert — 作者 🚀"), ensure_ascii=False)
    text = "[" + good + ", " + good + ', {"prompt": nope}]'
    p = tmp_path / "off.json"
    p.write_text(text, encoding="utf-8")
    for chunk in (5, 1 << 20):
        with pytest.raises(DataFormatError) as ei:
            list(load_requests(p, chunk_size=chunk))
        want = text.encode("utf-8").index(b"nope")
        assert ei.value.offset == want and f"byte {want}" in str(ei.value)
        assert ei.value.index == 2


TRICKY = [
    dict(UEB[0], prompt='He said "hi" and then ] } [ { , : \\ left', ans="naïve café ☕"),
    dict(UEB[0], prompt="Emoji 🚀🧪 and CJK 日本語 in the prompt", ans='quote " bracket ]'),
    dict(UEB[0], prompt="Escapes \t tab \n newline \u2028 sep", ans='\\"}],'),
    dict(UEB[0], prompt="Number-ish 12345 true false null", ans='[1, 2, {"x": 3}]'),
]


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_chunk_boundary_stress(tmp_path, ensure_ascii):
    recs = TRICKY * 3
    p = tmp_path / "tricky.json"
    p.write_text(json.dumps(recs, ensure_ascii=ensure_ascii, indent=None), encoding="utf-8")
    want = [
        EditRequest(r["prompt"], r["ans"], r["rephrase_prompt"], r["loc"], r["loc_ans"])
        for r in recs
    ]
    for chunk in list(range(1, 14)) + [31, 64, 1 << 20]:
        assert list(load_requests(p, chunk_size=chunk)) == want, chunk
        assert count_records(p, chunk_size=chunk) == len(recs)


def test_scanner_values_and_numbers_at_chunk_ends(tmp_path):
    # non-object elements, numbers and literals that can end exactly at a chunk end
    values = [
        12345,
        -0.5e-7,
        True,
        False,
        None,
        "a]b",
        [1, [2, [3]]],
        {"k": [1.25, "\\"]},
        1e300,
        0,
        "é" * 9,
        987654321987654321,
    ]
    p = tmp_path / "vals.json"
    for sep in (",", " ,\n "):
        p.write_text(
            "[" + sep.join(json.dumps(v, ensure_ascii=False) for v in values) + "]",
            encoding="utf-8",
        )
        for chunk in range(1, 12):
            assert list(_iter_values(str(p), chunk)) == values, (sep, chunk)
    p.write_text("[]", encoding="utf-8")
    assert count_records(p) == 0 and list(load_requests(p)) == []


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    _json = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
        max_leaves=12,
    )

    @settings(max_examples=150, deadline=None)
    @given(
        values=st.lists(_json, max_size=6),
        chunk=st.integers(1, 40),
        ensure_ascii=st.booleans(),
        indent=st.sampled_from([None, 0, 2]),
    )
    def test_scanner_property(tmp_path_factory, values, chunk, ensure_ascii, indent):
        p = tmp_path_factory.mktemp("prop") / "v.json"
        p.write_text(json.dumps(values, ensure_ascii=ensure_ascii, indent=indent), encoding="utf-8")
        assert list(_iter_values(str(p), chunk)) == values
else:  # pragma: no cover

    def test_scanner_property():
        pytest.skip("hypothesis is not installed")


# ----------------------------------------------------------------- streaming memory


def test_streaming_memory_is_flat(tmp_path):
    n = 200_000
    p = tmp_path / "ultraeditbench_like.json"
    pad = "lorem ipsum dolor sit amet " * 2
    with open(p, "w", encoding="utf-8") as f:  # written incrementally
        f.write("[\n")
        for i in range(n):
            rec = {
                "prompt": f"Record {i}: the headquarters of company {i} are located in",
                "subject": f"company {i}",
                "rephrase_prompt": f"Company {i} ({pad}) has its headquarters in",
                "ans": f"City {i % 977}",
                "loc": f"nq question: who wrote the novel number {i} in the series",
                "loc_ans": f"Author {i % 131}",
            }
            f.write(("" if i == 0 else ",\n") + json.dumps(rec))
        f.write("\n]\n")
    size = os.path.getsize(p)
    assert size > 40e6, size
    bound = 10 * 2**20
    # the bound must be able to fail: loading all records costs several times the bound
    assert size > 4 * bound

    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        count = 0
        last = None
        for r in load_requests(p):
            count += 1
            last = r
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    assert count == n
    assert last.target == f"City {(n - 1) % 977}"
    assert peak < bound, f"peak traced memory {peak / 2**20:.1f} MiB while streaming"
    assert elapsed < 60, elapsed
