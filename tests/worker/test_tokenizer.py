"""Tokenizer tests against the real SmolLM2 GGUF, tiny hand-made GGUFs and Hugging Face folders.

Expected ids and prompt text come from the stack probe (notes/stack-probe.md, section 3), which
checked them against llama.cpp's tokenization rules and transformers' chat template.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from services.common.assets import smollm2_gguf_path
from services.worker.tokenizer import (
    ChatTemplateError,
    Tokenizer,
    UnsupportedTokenizerError,
)
from services.worker.tokenizer.gguf_vocab import build_backend, read_gguf_metadata

CAPITAL_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CAPITAL_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
CAPITAL_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
]

TRICKY_STRINGS = [
    "Hello, world!",
    "The year 2024 had 366 days.",
    "Ünïcödé — 日本語のテキスト 🚀🔥 naïve café",
    "e\u0301 a\u0308 n\u0303 (combining marks)",
    "👨‍👩‍👧 family, 🏳️‍🌈 flag, 👍🏽 skin tone",
    "한국어 텍스트, العربية, עברית, русский",
    "\ttabs\tand\nnewlines\r\n\n\n  trailing  ",
    "def f(x):\n    return x ** 2  # comment\n\nprint(f(3))\n",
    "x = 1\n  2\t3 \r\n4  5",  # whitespace right before digits: where transformers differs
    "<|im_start|>user\nhi<|im_end|>\n",
    "   ",
    "",
]

# Normal text only: transformers' GGUF tokenizer lacks the digit split (see module docstring).
TRANSFORMERS_ID_STRINGS = [
    "Hello, world!",
    "Ünïcödé — 日本語のテキスト 🚀🔥 naïve café",
    "def greet(name):\n    return f'Hello, {name}'\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
]

CONVERSATIONS = [
    CAPITAL_MESSAGES,
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 日本 🚀."},
    ],
]


def _random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "éüñçøßÆ日本語中文한국어абвгд\u0301\u0308\u200d",
        "🚀🔥😀👍🏽🎉",
    ]
    out = []
    for _ in range(count):
        length = rng.randint(1, 40)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return out


# ----- SmolLM2 from GGUF ---------------------------------------------------------------------


def test_chat_prompt_text_and_ids(smollm2_tokenizer: Tokenizer) -> None:
    prompt = smollm2_tokenizer.apply_chat_template(CAPITAL_MESSAGES)
    assert prompt == CAPITAL_PROMPT
    assert smollm2_tokenizer.encode(prompt) == CAPITAL_IDS


def test_special_tokens_and_metadata(smollm2_tokenizer: Tokenizer) -> None:
    tok = smollm2_tokenizer
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == frozenset({2})
    assert tok.vocab_size == 49152
    assert tok.special_token_ids == frozenset(range(17))  # the 17 CONTROL tokens
    assert tok.add_bos_token is False
    assert tok.encode("Hi") == tok.encode("Hi", add_special_tokens=False)
    assert tok.id_to_piece(1) == "<|im_start|>"
    assert tok.id_to_piece(198) == "Ċ"
    assert tok.token_bytes(198) == b"\n"
    assert tok.token_bytes(2) == b"<|im_end|>"


def test_digits_are_split_individually(smollm2_tokenizer: Tokenizer) -> None:
    tok = smollm2_tokenizer
    assert tok.encode("2024") == [34, 32, 34, 36]
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    # The vocab has no multi-digit tokens, so "2024" alone cannot tell whether the Digits
    # split ran. Whitespace before a digit can: with the split (llama.cpp's smollm rules) the
    # run of whitespace stays one piece; GPT-2's regex alone would leave "Ġ","Ġ","4".
    assert [tok.id_to_piece(i) for i in tok.encode("  4")] == ["ĠĠ", "4"]
    assert [tok.id_to_piece(i) for i in tok.encode("\r\n3")] == ["čĊ", "3"]


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_round_trip_tricky(smollm2_tokenizer: Tokenizer, text: str) -> None:
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text


def test_round_trip_random(smollm2_tokenizer: Tokenizer) -> None:
    failures = [
        s for s in _random_strings(300, seed=1234)
        if smollm2_tokenizer.decode(smollm2_tokenizer.encode(s)) != s
    ]
    assert failures == []


def test_decode_skip_special_tokens(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert smollm2_tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>"


def test_invalid_ids_are_rejected(smollm2_tokenizer: Tokenizer) -> None:
    for bad in (-1, 49152, 1.0):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            smollm2_tokenizer.token_bytes(bad)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        smollm2_tokenizer.id_to_piece(49152)
    with pytest.raises(TypeError):
        smollm2_tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_add_bos_token_prepends_once(smollm2_tokenizer: Tokenizer) -> None:
    tok = Tokenizer(smollm2_tokenizer.backend, bos_token_id=1, eos_token_ids=[2],
                    add_bos_token=True)
    plain = smollm2_tokenizer.encode("Hello")
    assert tok.encode("Hello") == [1, *plain]
    assert tok.encode("<|im_start|>Hello") == [1, *plain]
    assert tok.encode("Hello", add_special_tokens=False) == plain


# ----- chat template -------------------------------------------------------------------------


def test_chat_template_rejects_bad_messages(smollm2_tokenizer: Tokenizer) -> None:
    bad = [
        ([], "at least one message"),
        ("hello", "must be a list"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": 3}], r"\['content'\] must be a string, got int"),
        ([{"role": "", "content": "x"}], "'role'\\] is empty"),
        (["user: hi"], r"messages\[0\] must be a dict"),
    ]
    for messages, message in bad:
        with pytest.raises(ChatTemplateError, match=message):
            smollm2_tokenizer.apply_chat_template(messages)  # type: ignore[arg-type]


def test_template_raise_exception_and_variables(smollm2_tokenizer: Tokenizer) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}{{ bos_token }}{{ messages[0]['content'] | tojson }}{{ eos_token }}"
    )
    tok = Tokenizer(smollm2_tokenizer.backend, bos_token_id=1, eos_token_ids=[2],
                    chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "<a> & é"}]) == (
        '<|im_start|>"<a> & é"<|im_end|>'
    )
    with pytest.raises(ChatTemplateError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_no_chat_template_is_a_clear_error(smollm2_tokenizer: Tokenizer) -> None:
    tok = Tokenizer(smollm2_tokenizer.backend, bos_token_id=1, eos_token_ids=[2])
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CAPITAL_MESSAGES)


# ----- unsupported GGUF tokenizers -----------------------------------------------------------


def _write_tiny_gguf(path: Path, model: str, pre: str | None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab", "<s>", "<tag>"])
    writer.add_token_merges(["a b"])
    writer.add_token_types([1, 1, 1, 3, 4])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(3)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_file(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf_file(_write_tiny_gguf(tmp_path / "t.gguf", "gpt2", "gpt2"))
    assert tok.encode("abab<s>a<tag>") == [3, 2, 2, 3, 0, 4]
    assert tok.special_token_ids == frozenset({3})  # USER_DEFINED <tag> is not special
    assert tok.decode([3, 2, 4], skip_special_tokens=True) == "ab<tag>"
    assert tok.chat_template is None


@pytest.mark.parametrize(
    ("model", "pre", "named"),
    [("gpt2", "llama-bpe", "'llama-bpe'"), ("gpt2", None, "None"), ("llama", "default", "'llama'")],
)
def test_unsupported_tokenizer_names_the_value(
    tmp_path: Path, model: str, pre: str | None, named: str
) -> None:
    path = _write_tiny_gguf(tmp_path / "t.gguf", model, pre)
    with pytest.raises(UnsupportedTokenizerError, match=named) as info:
        Tokenizer.from_gguf_file(path)
    assert "supported:" in str(info.value)


def test_unsupported_pre_on_real_metadata(smollm2_gguf_reader: gguf.GGUFReader) -> None:
    meta = dataclasses.replace(read_gguf_metadata(smollm2_gguf_reader), pre="qwen2")
    with pytest.raises(UnsupportedTokenizerError, match="'qwen2'.*'smollm'"):
        build_backend(meta)


# ----- Hugging Face folder -------------------------------------------------------------------


def _write_hf_dir(folder: Path, tok: Tokenizer, **config: object) -> Path:
    folder.mkdir()
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_from_hf_dir_matches_gguf(smollm2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    folder = _write_hf_dir(
        tmp_path / "hf", smollm2_tokenizer, chat_template=smollm2_tokenizer.chat_template,
        bos_token={"content": "<|im_start|>"}, eos_token="<|im_end|>", add_bos_token=False,
    )
    hf = Tokenizer.from_hf_dir(folder)
    for text in [CAPITAL_PROMPT, *TRICKY_STRINGS]:
        assert hf.encode(text) == smollm2_tokenizer.encode(text)
    assert hf.apply_chat_template(CAPITAL_MESSAGES) == CAPITAL_PROMPT
    assert hf.eos_token_ids == frozenset({2})
    assert hf.bos_token_id == 1
    assert hf.vocab_size == 49152
    assert hf.special_token_ids == smollm2_tokenizer.special_token_ids
    assert [hf.token_bytes(i) for i in CAPITAL_IDS] == [
        smollm2_tokenizer.token_bytes(i) for i in CAPITAL_IDS
    ]


def test_from_hf_dir_optional_files(smollm2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    folder = _write_hf_dir(tmp_path / "hf", smollm2_tokenizer, chat_template="from config",
                           eos_token="<|im_end|>")
    (folder / "chat_template.jinja").write_text("{{ eos_token }}|{{ bos_token }}")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = Tokenizer.from_hf_dir(folder)
    assert hf.apply_chat_template(CAPITAL_MESSAGES) == "<|im_end|>|"  # .jinja wins; no BOS
    assert hf.eos_token_ids == frozenset({0, 2})
    assert hf.bos_token_id is None
    assert hf.add_bos_token is False  # not configured and no post-processor adds one


def test_from_hf_dir_rejects_non_byte_level(tmp_path: Path) -> None:
    backend = BackendTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tmp_path.joinpath("tokenizer.json").write_text(backend.to_str())
    with pytest.raises(ValueError, match="only byte-level BPE"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


# ----- against transformers (slow: its GGUF tokenizer loads in ~7 s) --------------------------


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system", "multi_turn"])
def test_chat_template_matches_transformers(
    smollm2_tokenizer: Tokenizer, hf_tokenizer, messages: list[dict[str, str]]
) -> None:
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    assert smollm2_tokenizer.apply_chat_template(messages) == expected
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=False)
    assert smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected


@pytest.mark.slow
@pytest.mark.parametrize("text", TRANSFORMERS_ID_STRINGS)
def test_ids_match_transformers(smollm2_tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    expected = hf_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.encode(text) == expected
