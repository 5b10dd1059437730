"""IncrementalDetokenizer tests on SmolLM2's byte-level BPE vocabulary."""

from __future__ import annotations

import random

import pytest

from services.worker.tokenizer import IncrementalDetokenizer, Tokenizer

STREAM_STRINGS = [
    "The capital of France is Paris.",
    "Ünïcödé — 日本語のテキスト 🚀🔥 naïve café",
    "e\u0301 a\u0308 n\u0303 combining",
    "👨‍👩‍👧 family, 👍🏽 thumbs, 한국어, العربية",
    "code:\n\tprint('héllo')\r\n  42\n",
]


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", STREAM_STRINGS)
def test_stream_equals_full_decode(smollm2_tokenizer: Tokenizer, text: str) -> None:
    ids = smollm2_tokenizer.encode(text)
    deltas = _stream(smollm2_tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids) == text


def test_emoji_is_held_back_until_complete(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("🚀")
    # The 4-byte emoji is 3 byte-level tokens: F0 9F | 9A | 80.
    assert [smollm2_tokenizer.token_bytes(i) for i in ids] == [b"\xf0\x9f", b"\x9a", b"\x80"]
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    assert detok.push(ids[0]) == ""
    assert detok.has_pending_bytes
    assert detok.push(ids[1]) == ""
    assert detok.push(ids[2]) == "🚀"
    assert not detok.has_pending_bytes
    assert detok.flush() == ""


def test_cjk_deltas_release_each_character_once_complete(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("日本語")
    deltas = _stream(smollm2_tokenizer, ids)
    # Tokens: E6 97 | A5 | E6 9C AC | E8 | AA | 9E, then the empty flush.
    assert deltas == ["", "日", "本", "", "", "語", ""]


def test_truncated_character_flushes_as_replacement(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("a🚀")[:-1]  # drop the emoji's last byte token
    deltas = _stream(smollm2_tokenizer, ids)
    assert deltas == ["a", "", "", "\ufffd"]
    assert "".join(deltas) == smollm2_tokenizer.decode(ids)


def test_skip_special_tokens(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("<|im_start|>assistant\nParis 🚀<|im_end|>")
    kept = _stream(smollm2_tokenizer, ids)
    skipped = _stream(smollm2_tokenizer, ids, skip_special_tokens=True)
    assert "".join(kept) == "<|im_start|>assistant\nParis 🚀<|im_end|>"
    assert "".join(skipped) == "assistant\nParis 🚀"
    assert skipped[0] == "" and skipped[-2] == ""  # the special tokens themselves emit nothing
    assert kept[-2] == "<|im_end|>"


def test_random_ids_match_decode_including_invalid_utf8(smollm2_tokenizer: Tokenizer) -> None:
    """Random ids (biased to lone non-ASCII bytes, so many sequences are invalid UTF-8): the
    stream must reproduce `decode`'s U+FFFD placement exactly, with and without specials."""
    tok = smollm2_tokenizer
    byte_ids = [i for i in range(tok.vocab_size)
                if len(tok.token_bytes(i)) <= 2 and tok.token_bytes(i)[0] >= 0x80]
    specials = sorted(tok.special_token_ids)
    assert len(byte_ids) > 128
    rng = random.Random(7)
    mismatches = []
    for _ in range(300):
        ids = [
            rng.choice(byte_ids) if r < 0.6 else rng.choice(specials) if r < 0.7
            else rng.randrange(tok.vocab_size)
            for r in (rng.random() for _ in range(rng.randint(1, 24)))
        ]
        for skip in (False, True):
            if "".join(_stream(tok, ids, skip)) != tok.decode(ids, skip_special_tokens=skip):
                mismatches.append((ids, skip))
    assert mismatches == []


def test_push_after_flush_and_bad_ids(smollm2_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    assert detok.text == ""
    with pytest.raises(ValueError, match="not in the vocabulary"):
        detok.push(smollm2_tokenizer.vocab_size)
    assert detok.push(smollm2_tokenizer.encode("Hi")[0]) == "Hi"
    assert detok.flush() == ""
    assert detok.flush() == ""
    assert detok.text == "Hi"
    with pytest.raises(RuntimeError, match="after flush"):
        detok.push(0)
