import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketgpt.common import PocketError
from pocketgpt.tokenizer import SPECIAL_TOKENS, Tokenizer


def test_learns_merges_and_sizes(tokenizer):
    assert tokenizer.vocab_size == 512
    assert len(tokenizer.encode("the return statement")) < len("the return statement")  # merges happened


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ["你好，世界", "🙂🙃 👨‍👩‍👧", "def f(x):\n\treturn x  \n\n\n", "   \t \r\n  ", "a\u0000b"])
def test_round_trip_examples(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=8)), max_size=8))
def test_special_tokens_cannot_be_smuggled(tokenizer, parts):
    text = "".join(parts)
    ids = tokenizer.encode(text)
    assert not set(ids) & set(tokenizer.special_ids.values())
    assert tokenizer.decode(ids) == text
    ids, _ = tokenizer.render_conversation([{"role": "user", "content": text}])
    specials = [i for i in ids if i in tokenizer.special_ids.values()]
    assert specials == [tokenizer.bos_id, tokenizer.special("<|user_start|>"), tokenizer.special("<|user_end|>")]


def _assistant_text(tokenizer, ids, mask):
    return tokenizer.decode_bytes([i for i, m in zip(ids, mask) if m]).decode()


def test_loss_mask_covers_exactly_assistant_tokens(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3? <|assistant_start|>"},
        {"role": "assistant", "content": "6, of course"},
    ]
    ids, mask = tokenizer.render_conversation(messages)
    assert len(ids) == len(mask)
    end = tokenizer.special("<|assistant_end|>")
    assert _assistant_text(tokenizer, ids, mask) == "4<|assistant_end|>6, of course<|assistant_end|>"
    assert [i for i, m in zip(ids, mask) if m and i == end] == [end, end]
    # every masked-in token lies between an <|assistant_start|> and its <|assistant_end|>
    inside = False
    for i, m in zip(ids, mask):
        if i == tokenizer.special("<|assistant_start|>"):
            inside = True
        assert m == (1 if inside and i != tokenizer.special("<|assistant_start|>") else 0)
        if i == end:
            inside = False


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), min_size=1, max_size=4))
def test_loss_mask_multi_turn_property(tokenizer, turns):
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    ids, mask = tokenizer.render_conversation(messages)
    expected = "".join(a + "<|assistant_end|>" for _, a in turns)
    assert _assistant_text(tokenizer, ids, mask) == expected
    assert sum(mask) == sum(len(tokenizer.encode(a)) + 1 for _, a in turns)


def test_tool_calls_are_trained_tool_results_are_not(tokenizer):
    messages = [
        {"role": "user", "content": "what is 12*34?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*34"}'}}]},
        {"role": "tool", "name": "calculator", "content": "408"},
        {"role": "assistant", "content": "408"},
    ]
    ids, mask = tokenizer.render_conversation(messages)
    trained = _assistant_text(tokenizer, ids, mask)
    assert trained == ('<|tool_call_start|>{"name": "calculator", "arguments": {"expression": "12*34"}}'
                       "<|tool_call_end|><|assistant_end|>408<|assistant_end|>")
    assert "<|tool_result_start|>408<|tool_result_end|>" in tokenizer.decode(ids)


def test_render_for_completion_ends_with_assistant_start(tokenizer):
    ids = tokenizer.render_for_completion([{"role": "user", "content": "hi"}])
    assert ids[-1] == tokenizer.special("<|assistant_start|>")


def test_bad_messages(tokenizer):
    with pytest.raises(PocketError, match="unknown role"):
        tokenizer.render_conversation([{"role": "wizard", "content": "x"}])
    with pytest.raises(PocketError, match="content must be a string"):
        tokenizer.render_conversation([{"role": "user", "content": 3}])


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    text = "Hello 世界 <|bos|>"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.special_ids == tokenizer.special_ids


def test_load_errors(tmp_path):
    with pytest.raises(PocketError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(PocketError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(PocketError, match="unknown tokenizer format"):
        Tokenizer.load(tmp_path)


def test_vocab_too_small():
    with pytest.raises(PocketError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_token_bytes(tokenizer):
    lengths = tokenizer.token_bytes()
    ids = tokenizer.encode("hello world, 你好")
    assert sum(lengths[i] for i in ids) == len("hello world, 你好".encode())
    assert lengths[tokenizer.bos_id] == 0
