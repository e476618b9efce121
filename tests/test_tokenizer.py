"""The tokenizer protocol: the same properties hold for every implementation (as minbpe tests its
variants): ours (rustbpe + tiktoken), a Hugging Face `tokenizers` BPE, and SmolLM2's real vocabulary."""

import json

import pytest
from conftest import CHATML_SPECIALS
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pocketgpt.common import PocketError
from pocketgpt.tokenizer import SPECIAL_TOKENS, BPETokenizer, HFTokenizer, Tokenizer

# Special strings of every family we know: none may turn into a special id through encode().
SMUGGLED = SPECIAL_TOKENS + CHATML_SPECIALS + ["<|begin_of_text|>", "<s>", "</s>"]


@pytest.fixture(scope="module", params=["ours", "hf", "smollm2"])
def any_tokenizer(request, tokenizer, hf_tokenizer) -> Tokenizer:
    if request.param == "ours":
        return tokenizer
    if request.param == "hf":
        return hf_tokenizer
    from conftest import smollm2_path

    from pocketgpt.interop.gguf import read_gguf

    return HFTokenizer.from_str(read_gguf(smollm2_path()).tokenizer_json)


def single_bytes(tok: Tokenizer) -> set[int]:
    """The bytes the vocabulary has a token for. Ours has all 256; a trained vocabulary may lack some
    (SmolLM2 lacks 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d and 0xf1-0xf2, the lead bytes of Unicode planes
    4-11), and text holding those bytes cannot be encoded by it at all."""
    specials = set(tok.special_ids.values())
    return {b[0] for i, b in enumerate(tok.token_bytes()) if len(b) == 1 and i not in specials}


def test_byte_coverage(tokenizer, hf_tokenizer):
    assert single_bytes(tokenizer) == set(range(256)) == single_bytes(hf_tokenizer)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_any_unicode(any_tokenizer, text):
    assume(set(text.encode()) <= single_bytes(any_tokenizer))
    ids = any_tokenizer.encode(text)
    assert any_tokenizer.decode(ids) == text
    assert any_tokenizer.decode_bytes(ids) == text.encode()


@pytest.mark.parametrize("text", ["你好，世界", "🙂🙃 👨‍👩‍👧", "def f(x):\n\treturn x  \n\n\n", "   \t \r\n  ", "a\u0000b",
                                  "1234567 + 9.11 < 9.9"])
def test_round_trip_examples(any_tokenizer, text):
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.one_of(st.sampled_from(SMUGGLED), st.text(max_size=8)), max_size=8))
def test_special_tokens_cannot_be_smuggled(any_tokenizer, parts):
    text = "".join(parts)
    assume(set(text.encode()) <= single_bytes(any_tokenizer))
    ids = any_tokenizer.encode(text)
    assert not set(ids) & set(any_tokenizer.special_ids.values())
    assert any_tokenizer.decode(ids) == text
    assert any_tokenizer.encode_batch([text, text]) == [ids, ids]


def test_token_bytes_and_byte_lengths(any_tokenizer):
    table = any_tokenizer.token_bytes()
    assert len(table) == any_tokenizer.vocab_size
    text = "hello world, 你好 🙂"
    ids = any_tokenizer.encode(text)
    assert b"".join(table[i] for i in ids) == text.encode()
    lengths = any_tokenizer.byte_lengths()
    assert sum(lengths[i] for i in ids) == len(text.encode())
    assert all(lengths[i] == 0 for i in any_tokenizer.special_ids.values())
    assert all(table[i] == s.encode() for s, i in any_tokenizer.special_ids.items())


def test_save_load_round_trip(any_tokenizer, tmp_path):
    any_tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)
    assert type(loaded) is type(any_tokenizer)
    assert loaded.fingerprint() == any_tokenizer.fingerprint()
    text = "Hello 世界 <|bos|> <|im_start|>"
    assert loaded.encode(text) == any_tokenizer.encode(text)
    assert loaded.special_ids == any_tokenizer.special_ids


def test_special_lookup(any_tokenizer):
    name, i = next(iter(any_tokenizer.special_ids.items()))
    assert any_tokenizer.special(name) == i
    with pytest.raises(PocketError, match="unknown special token"):
        any_tokenizer.special("<|no such token|>")


# ----------------------------------------------------------------------------- ours only


def test_learns_merges_and_sizes(tokenizer):
    assert tokenizer.vocab_size == 512
    assert len(tokenizer.encode("the return statement")) < len("the return statement")  # merges happened


def test_vocab_too_small():
    with pytest.raises(PocketError, match="too small"):
        BPETokenizer.train(["abc"], vocab_size=100)


def test_specials_may_sit_anywhere(hf_tokenizer):
    assert sorted(hf_tokenizer.special_ids.values()) == [0, 1, 2]  # first, not after the learned tokens


def test_load_errors(tmp_path):
    with pytest.raises(PocketError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(PocketError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(PocketError, match="unknown tokenizer format"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}, "added_tokens": []}))
    with pytest.raises(PocketError, match="not a valid Hugging Face tokenizer"):
        Tokenizer.load(tmp_path)
