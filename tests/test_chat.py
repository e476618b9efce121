"""Chat templates: rendering, loss masks, prompts, stops and tool delimiters, for every template."""

import pytest
from conftest import CHATML_SPECIALS
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketgpt.chat import ChatTemplate
from pocketgpt.common import PocketError
from pocketgpt.tokenizer import SPECIAL_TOKENS

SMUGGLED = SPECIAL_TOKENS + CHATML_SPECIALS


@pytest.fixture(scope="module", params=["ours", "chatml"])
def any_chat(request, chat, hf_chat) -> ChatTemplate:
    return chat if request.param == "ours" else hf_chat


def end_of_turn(c: ChatTemplate) -> str:
    return c.tokenizer.decode([c.stop_ids[0]])


def trained_text(c: ChatTemplate, ids, mask) -> str:
    return c.tokenizer.decode_bytes([i for i, m in zip(ids, mask) if m]).decode()


def specials_of(c: ChatTemplate, ids) -> list[int]:
    return [i for i in ids if i in c.tokenizer.special_ids.values()]


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(st.sampled_from(SMUGGLED), st.text(max_size=8)), max_size=6))
def test_user_text_never_becomes_structure(any_chat, parts):
    text = "".join(parts)
    ids, _ = any_chat.render([{"role": "user", "content": text}, {"role": "assistant", "content": text}])
    plain, _ = any_chat.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}])
    assert specials_of(any_chat, ids) == specials_of(any_chat, plain)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), min_size=1, max_size=3))
def test_loss_mask_is_exactly_what_the_assistant_writes(any_chat, turns):
    # ChatML's "assistant\n" header and the content are one text to the tokenizer: a token that
    # straddles the two (a newline merged with leading whitespace) is the prompt's. Hence lstrip.
    turns = [(user, assistant.lstrip()) for user, assistant in turns]
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    ids, mask = any_chat.render(messages)
    assert len(ids) == len(mask)
    assert trained_text(any_chat, ids, mask) == "".join(a + end_of_turn(any_chat) for _, a in turns)


def test_prompt_is_the_conversation_then_the_assistant_header(any_chat):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = any_chat.prompt(messages)
    rendered, _ = any_chat.render(messages + [{"role": "assistant", "content": "hello"}])
    assert prompt == rendered[:len(prompt)]
    assert prompt[-len(any_chat.assistant_header):] == any_chat.assistant_header
    # the reply the model writes after the prompt is exactly what the renderer trains
    assert rendered[len(prompt):len(prompt) + len(any_chat.reply("hello"))] == any_chat.reply("hello")
    # a trailing reply is a finished turn (it was dropped: the model never saw what it had said)
    answered = messages + [{"role": "assistant", "content": "hello"}]
    assert any_chat.prompt(answered) == any_chat.render(answered)[0] + any_chat.assistant_header


def test_a_continued_reply_is_the_prompt_then_the_reply_so_far(any_chat):
    """continue_final: the model goes on from a prefilled reply, exactly as if it had written it itself;
    the reply's text is ordinary text, and only a reply's text can be continued."""
    messages = [{"role": "user", "content": "hi"}]
    so_far = "Hello <|assistant_end|><|im_end|> the"
    continued = any_chat.prompt(messages + [{"role": "assistant", "content": so_far}], continue_final=True)
    assert continued == any_chat.prompt(messages) + any_chat.tokenizer.encode(so_far)
    assert specials_of(any_chat, continued) == specials_of(any_chat, any_chat.prompt(messages))
    with pytest.raises(PocketError, match="last message"):
        any_chat.prompt(messages, continue_final=True)
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]}
    with pytest.raises(PocketError, match="tool calls"):
        any_chat.prompt(messages + [call], continue_final=True)


def test_tool_calls_are_trained_tool_results_are_not(any_chat):
    call = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*34"}'}}
    messages = [{"role": "user", "content": "what is 12*34?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "calculator", "content": "408"},
                {"role": "assistant", "content": "It is 408."}]
    ids, mask = any_chat.render(messages)
    trained = trained_text(any_chat, ids, mask)
    assert '{"name": "calculator", "arguments": {"expression": "12*34"}}' in trained
    assert "408" not in trained.replace("It is 408.", "")
    assert trained.endswith("It is 408." + end_of_turn(any_chat))
    # The calling turn, as sampled, is recognised as a call, and the runtime's result block plus the
    # next header are exactly what the renderer puts between the call and the answer.
    prompt = any_chat.prompt(messages[:1])
    after_prompt = ids[len(prompt):]
    end = after_prompt.index(any_chat.stop_ids[0]) + 1
    assert any_chat.split_tool_call(after_prompt[:end]) == ("", '{"name": "calculator", "arguments": '
                                                                '{"expression": "12*34"}}')
    before, after = any_chat.tool_result_delimiters
    result = any_chat.tokenizer.decode(after_prompt[end:end + len(before) + 8 + len(after)])
    assert "408" in result
    assert after_prompt[end:end + len(before)] == before


def test_a_turn_without_a_call_is_not_a_call(any_chat):
    assert any_chat.split_tool_call(any_chat.reply("The answer is 4.")) is None


def test_bad_messages(any_chat):
    with pytest.raises(PocketError, match="unknown role"):
        any_chat.render([{"role": "wizard", "content": "x"}])
    with pytest.raises(PocketError, match="content must be a string"):
        any_chat.render([{"role": "user", "content": 3}])


def test_spec_round_trip(any_chat):
    again = ChatTemplate.from_spec(any_chat.tokenizer, any_chat.spec())
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert again.render(messages) == any_chat.render(messages)
    assert again.stop_ids == any_chat.stop_ids and again.document_stops == any_chat.document_stops
    with pytest.raises(PocketError, match="unknown chat template"):
        ChatTemplate.from_spec(any_chat.tokenizer, {"name": "alpaca"})


def test_documents_for_base_models(any_chat):
    docs = any_chat.documents(["one", "two"])
    assert docs[0] == any_chat.document("one") + any_chat.document_end
    assert any_chat.pad_id in any_chat.document_start + any_chat.document_end + list(any_chat.document_stops)


# ----------------------------------------------------------------------------- ours: the exact format


def test_ours_renders_the_documented_format(chat):
    tok = chat.tokenizer
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, mask = chat.render(messages)
    assert tok.decode(ids) == ("<|bos|><|system_start|>be brief<|system_end|><|user_start|>2+2?<|user_end|>"
                               "<|assistant_start|>4<|assistant_end|>")
    assert trained_text(chat, ids, mask) == "4<|assistant_end|>"
    assert chat.prompt(messages[:2])[-1] == tok.special("<|assistant_start|>")
    assert chat.reward_suffix == [tok.special("<|reward|>")]
    assert chat.document("x")[0] == tok.special("<|bos|>")


def test_chatml_renders_the_documented_format(hf_chat):
    tok = hf_chat.tokenizer
    ids, mask = hf_chat.render([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    assert tok.decode(ids) == ("<|im_start|>system\nYou are a test assistant.<|im_end|>\n"
                               "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    assert hf_chat.reward_suffix == [] and hf_chat.stop_ids[0] == tok.special("<|im_end|>")
