"""Generation-based scores, on cases whose answers are known: the matching rule, the n-gram
entropy, the drift, batched left-padded decoding against one prompt at a time, and a model
that is right under teacher forcing and wrong when it has to answer on its own."""

import math

import pytest
import torch

from conftest import ARCHS, ToyTokenizer, make_tiny, random_requests
from ultraedit_fast import EditRequest, UltraEditor, capture_baseline
from ultraedit_fast import evaluate
from ultraedit_fast.scoring import generation as G


# ----------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    "cont,answer,ok",
    [
        (" Paris, the capital.", "Paris", True),
        ("  PARIS!", "paris", True),
        (" Parisian food", "Paris", True),  # a plain prefix, as the rule says
        (" the city of Paris", "Paris", False),  # must start with it
        (" Leonardo  da\nVinci painted", "Leonardo da Vinci", True),
        (" J. R. R. Tolkien", "J.R.R. Tolkien", False),  # punctuation removed, spaces kept
        (" J.R.R. Tolkien wrote", "J.R.R Tolkien", True),
        (" München", "München", True),
        ("", "Rome", False),
    ],
)
def test_starts_with_answer(cont, answer, ok):
    assert G.starts_with_answer(cont, answer) is ok


def test_normalize_text():
    assert G.normalize_text("  Hello,\tWorld!! (x_y) ") == "hello world xy"
    assert G.normalize_text("Ünïcödé — dash") == "ünïcödé dash"


def test_ngram_entropy_known_values():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # (a b) x2, (b a) x1
    h3 = 1.0  # (a b a), (b a b)
    assert G.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert G.ngram_entropy("x x x x x x") == 0.0  # one repeated n-gram: no entropy
    assert G.ngram_entropy("one") == 0.0
    varied = "the quick brown fox jumps over the lazy dog near a river bank"
    assert G.ngram_entropy(varied) > G.ngram_entropy("the the the the the the the the")


def test_drift_known_values():
    base = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]), -1)
    assert G.drift(base, base) == {"drift_kl": pytest.approx(0.0, abs=1e-7), "drift_top1": 1.0}
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 3.0]]), -1)
    p = base[0].exp()
    kl0 = float((p * (base[0] - other[0])).sum())
    d = G.drift(base, other)
    assert d["drift_kl"] == pytest.approx(kl0 / 2) and d["drift_top1"] == 0.5
    with pytest.raises(ValueError, match="same prompts"):
        G.drift(base, other[:1])


# ----------------------------------------------------------------------------- decoding
def _one_at_a_time(model, prompts, budget):
    """Greedy decoding without a cache or padding: the whole sequence each step."""
    out = []
    for p, n in zip(prompts, budget):
        ids, new = list(p), []
        for _ in range(n):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            new.append(nxt)
            ids.append(nxt)
        out.append(new)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_left_padded_decoding_equals_one_at_a_time(arch, one_thread):
    model, _ = make_tiny(arch)
    tok = ToyTokenizer()
    prompts = [tok(r.prompt)["input_ids"] for r in random_requests(13, seed=4)]
    budget = [1 + (i * 3) % 6 for i in range(len(prompts))]
    batched = G.greedy_decode(model, tok, prompts, budget, batch_size=5, stop_at_eos=False)
    assert batched == _one_at_a_time(model, prompts, budget)
    assert [len(b) for b in batched] == budget


def test_decoding_stops_at_the_end_of_text(one_thread):
    model, _ = make_tiny("llama")
    tok = ToyTokenizer()
    prompts = [tok(r.prompt)["input_ids"] for r in random_requests(6, seed=8)]
    free = G.greedy_decode(model, tok, prompts, [6] * 6, stop_at_eos=False)
    first = free[0][0]
    tok.eos_token_id = first  # make the first sample's first token the end of text
    stopped = G.greedy_decode(model, tok, prompts, [6] * 6)
    for f, s in zip(free, stopped):
        k = f.index(first) if first in f else len(f)
        assert s == f[:k]


@pytest.mark.slow
def test_batched_decoding_on_smollm2(smollm2):
    model, tok = smollm2
    texts = [
        "The capital of France is",
        "Water boils at",
        "The author of Hamlet is",
        "Photosynthesis turns sunlight into",
        "The largest ocean on Earth is the",
    ]
    prompts = [tok(t)["input_ids"] for t in texts]
    budget = [4, 7, 5, 6, 3]
    assert G.greedy_decode(
        model, tok, prompts, budget, batch_size=5, stop_at_eos=False
    ) == _one_at_a_time(model, prompts, budget)
    (cont,) = G.continuations(model, tok, ["The capital of France is"], ["Paris"])
    assert G.starts_with_answer(cont, "Paris"), cont


# ----------------------------------------------------------------------------- known answers
class WordTokenizer:
    """Whitespace words <-> ids of a fixed vocabulary (0 pad, 1 unused, 2 end of text)."""

    pad_token_id = 0
    eos_token_id = 2

    def __init__(self, words):
        self.ids = {w: i + 3 for i, w in enumerate(words)}
        self.words = {i: w for w, i in self.ids.items()}

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [self.ids[w] for w in text.split()]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids, skip_special_tokens=False):
        return " " + " ".join(self.words[int(i)] for i in ids if int(i) >= 3)


class NextTokenModel(torch.nn.Module):
    """A model whose next token is a fixed function of the current one (``table``)."""

    def __init__(self, table, vocab):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.table = table
        self.vocab = vocab

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.full((*input_ids.shape, self.vocab), -10.0)
        for b in range(input_ids.shape[0]):
            for t in range(input_ids.shape[1]):
                logits[b, t, self.table.get(int(input_ids[b, t]), 2)] = 10.0

        class Out:
            pass

        out = Out()
        out.logits = logits
        out.past_key_values = None
        return out


def test_right_under_teacher_forcing_wrong_when_generating():
    words = ["Where", "is", "it?", "in", "the", "old", "town", "far", "away"]
    tok = WordTokenizer(words)
    i = tok.ids
    # after "it?" it says "far" (wrong); given the right prefix it continues the target
    wrong_start = {
        i["Where"]: i["is"],
        i["is"]: i["it?"],
        i["it?"]: i["far"],
        i["far"]: i["away"],
        i["in"]: i["the"],
        i["the"]: i["old"],
        i["old"]: i["town"],
    }
    req = [EditRequest("Where is it?", "in the old town")]
    model = NextTokenModel(wrong_start, len(words) + 3)
    m = evaluate(model, tok, req)
    assert m["ES"] == pytest.approx(0.75)  # 3 of 4 answer tokens, each given the truth
    assert m["ES_gen"] == 0.0  # on its own it answers "far away"
    right = {**wrong_start, i["it?"]: i["in"]}
    m = evaluate(NextTokenModel(right, len(words) + 3), tok, req)
    assert m["ES"] == 1.0 and m["ES_gen"] == 1.0


def test_locality_against_the_unedited_model(one_thread):
    model, modules = make_tiny("llama")
    tok = ToyTokenizer()
    reqs = random_requests(16, seed=2)
    base = capture_baseline(model, tok, reqs)
    m0 = evaluate(model, tok, reqs, base=base)
    assert m0["LS_unedited"] == 1.0 and m0["LS_gen_unedited"] == 1.0
    assert m0["drift_kl"] == pytest.approx(0.0, abs=1e-6) and m0["drift_top1"] == 1.0
    assert m0["fluency"] is not None and m0["fluency"] >= 0
    UltraEditor(model, tok, modules=modules, lr=3e-2, batch_size=4).edit(reqs)
    m1 = evaluate(model, tok, reqs, base=base)
    assert m1["LS_gen_unedited"] < 1.0 and m1["drift_kl"] > 0.0 and m1["drift_top1"] < 1.0
    assert evaluate(model, tok, reqs, generation=False).keys() == {
        "ES",
        "GS",
        "LS",
        "LS_unedited",
        "n",
    }
    rows = evaluate(model, tok, reqs, base=base, per_request=True)["per_request"]
    assert len(rows) == 16 and all("ES_gen" in r and "LS_gen_unedited" in r for r in rows)


def test_chat_template_prompts(one_thread):
    from ultraedit_fast.model.requests import prompt_ids, tokenize_pair

    class ChatTok(ToyTokenizer):
        chat_template = "{user}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert tokenize and add_generation_prompt
            return (
                [1, 7, 7]
                + self(messages[0]["content"], add_special_tokens=False)["input_ids"]
                + [8, 8]
            )

    tok = ChatTok()
    assert prompt_ids(tok, "ab", chat_template=True) == [1, 7, 7] + tok(
        "ab", add_special_tokens=False
    )["input_ids"] + [8, 8]
    t = tokenize_pair(tok, "ab", "c", chat_template=True)
    assert t.input_ids[:3] == [1, 7, 7] and t.labels[-1] == tok(" c", False)["input_ids"][-1]
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(ToyTokenizer(), "ab", chat_template=True)
    model, modules = make_tiny("llama")
    reqs = random_requests(6, seed=1)
    ed = UltraEditor(model, tok, modules=modules, lr=1e-3, chat_template=True)
    assert ed.edit(reqs).n_tokens > 0
    assert evaluate(model, tok, reqs, chat_template=True)["ES_gen"] is not None
