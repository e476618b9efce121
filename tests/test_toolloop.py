import json

import pytest
import torch

from pocketgpt.data.tasks.tools import calculator, use_calculator
from pocketgpt.engine import Engine, SamplingParams
from pocketgpt.toolloop import generate_with_tools, parse_call, run_tool, stream_with_tools

TOOLS = {"calculator": calculator}


class Script:
    """A logits processor that makes the (untrained) model write given turns, one per round.
    The model and the engine are real; only the choice of tokens is forced."""

    def __init__(self, turns: list[list[int]]):
        self.turns, self.round = turns, -1

    def __call__(self, generated, logits):
        if not generated:
            self.round += 1
        turn = self.turns[self.round]
        forced = torch.full_like(logits, float("-inf"))
        forced[turn[len(generated)]] = 0.0
        return forced


def call_turn(chat, expression: str) -> list[int]:
    sp = chat.tokenizer.special_ids
    text = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    return [sp["<|tool_call_start|>"], *chat.tokenizer.encode(text), sp["<|tool_call_end|>"], sp["<|assistant_end|>"]]


def test_a_call_is_executed_and_the_model_goes_on(tiny_model, tokenizer, chat):
    sp = tokenizer.special_ids
    prompt = chat.prompt([{"role": "user", "content": "What is 123 * 45?"}])
    answer = [*tokenizer.encode("It is 5535."), sp["<|assistant_end|>"]]
    params = SamplingParams(max_tokens=64, temperature=0)
    out = generate_with_tools(Engine(tiny_model, tokenizer), chat, [prompt], params, TOOLS,
                              processors=[Script([call_turn(chat, "123*45"), answer])])[0]
    assert out.calls == [{"name": "calculator", "arguments": {"expression": "123*45"}, "result": "5535"}]
    assert out.text == "It is 5535." and out.finish_reason == "stop"
    # The whole exchange is exactly what the chat template renders for the same conversation,
    # and only the tokens the runtime wrote (the result block) are not actions.
    conversation = [{"role": "user", "content": "What is 123 * 45?"}, *use_calculator("123*45"),
                    {"role": "assistant", "content": "It is 5535."}]
    rendered, trained = chat.render(conversation)
    assert prompt + out.tokens == rendered
    injected = [i for i, m in enumerate(out.action_mask) if m == 0]
    result_block = tokenizer.encode("5535")
    assert [out.tokens[i] for i in injected] == [sp["<|tool_result_start|>"], *result_block,
                                                 sp["<|tool_result_end|>"], sp["<|assistant_start|>"]]
    assert out.action_mask == trained[len(prompt):]


def test_streaming_shows_the_text_around_a_call_but_not_the_call(tiny_model, tokenizer, chat):
    sp = tokenizer.special_ids
    prompt = chat.prompt([{"role": "user", "content": "What is 123 * 45?"}])
    first = [*tokenizer.encode("Let me compute."), *call_turn(chat, "123*45")]
    answer = [*tokenizer.encode("It is 5535."), sp["<|assistant_end|>"]]
    items = list(stream_with_tools(Engine(tiny_model, tokenizer), chat, prompt,
                                   SamplingParams(max_tokens=64, temperature=0), TOOLS,
                                   processors=[Script([first, answer])]))
    calls = [i for i, item in enumerate(items) if isinstance(item, dict)]
    assert len(calls) == 1
    assert items[calls[0]] == {"name": "calculator", "arguments": {"expression": "123*45"}, "result": "5535"}
    assert "".join(items[:calls[0]]) == "Let me compute."
    assert "".join(items[calls[0] + 1:]) == "It is 5535."


def test_calls_stop_at_the_limit(tiny_model, tokenizer, chat):
    prompt = chat.prompt([{"role": "user", "content": "Loop forever"}])
    turns = [call_turn(chat, "1+1")] * 2
    out = generate_with_tools(Engine(tiny_model, tokenizer), chat, [prompt], SamplingParams(max_tokens=64, temperature=0),
                              TOOLS, max_calls=1, processors=[Script(turns)])[0]
    assert len(out.calls) == 1 and out.finish_reason == "tool_limit"


def test_without_a_call_it_is_plain_generation(tiny_model, tokenizer, chat):
    engine = Engine(tiny_model, tokenizer)
    prompt = chat.prompt([{"role": "user", "content": "Hello"}])
    # Seeded samples that end at the turn's end like the loop's do, and can never open a call.
    params = SamplingParams(max_tokens=12, temperature=0.8, n=3, seed=1, stop_tokens=tuple(chat.stop_ids),
                            banned_tokens=(chat.tool_call_token,))
    plain = engine.generate([prompt], params)
    looped = generate_with_tools(engine, chat, [prompt], params, TOOLS)
    assert len(looped) == 3 and len({tuple(p.tokens) for p in plain}) > 1  # three different samples
    for p, t in zip(plain, looped):
        assert t.tokens == p.tokens and t.text == p.text and t.finish_reason == p.finish_reason
        assert t.action_mask == [1] * len(p.tokens) and not t.calls


def test_bad_calls_become_error_results_the_model_can_read():
    assert parse_call('{"name": "calculator", "arguments": {"expression": "2+2"}}') == (
        "calculator", {"expression": "2+2"})
    for bad, why in (("not json", "not valid JSON"), ('["calculator"]', "a tool call is"),
                     ('{"name": "calculator", "arguments": 3}', "must be a JSON object"),
                     ("[" * 100_000, "nests too deeply")):  # a RecursionError: a 500 from the server
        with pytest.raises(ValueError, match=why):
            parse_call(bad)
    assert run_tool(TOOLS, "python", {}).startswith("error: unknown tool 'python'")
    assert run_tool(TOOLS, "calculator", {"expr": "1"}).startswith("error:")
    assert run_tool(TOOLS, "calculator", {"expression": "1/0"}).startswith("error")


def test_a_long_result_is_cut_to_leave_room_for_the_answer(tiny_model, tokenizer, chat):
    prompt = chat.prompt([{"role": "user", "content": "Tell me everything"}])
    tools = {"calculator": lambda expression: "word " * 10_000}
    sp = tokenizer.special_ids
    turns = [call_turn(chat, "1+1"), [*tokenizer.encode("ok"), sp["<|assistant_end|>"]]]
    out = generate_with_tools(Engine(tiny_model, tokenizer), chat, [prompt], SamplingParams(max_tokens=64, temperature=0),
                              tools, processors=[Script(turns)])[0]
    assert len(prompt) + len(out.tokens) <= tiny_model.cfg.max_seq_len
    assert out.text == "ok" and out.finish_reason == "stop"


def test_more_conversations_than_rows_all_finish(tiny_model, tokenizer, chat):
    """Finished conversations give their row to waiting ones (the loop keeps rows for tool results):
    ten prompts on a two-row engine all get their answers, the same as on an engine with room for all."""
    prompts = [chat.prompt([{"role": "user", "content": f"Hello {i}"}]) for i in range(10)]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, stop_tokens=tuple(chat.stop_ids),
                            banned_tokens=(chat.tool_call_token,))
    done = []
    narrow = generate_with_tools(Engine(tiny_model, tokenizer, max_batch=2), chat, prompts, params, TOOLS,
                                 on_done=lambda: done.append(1))
    wide = generate_with_tools(Engine(tiny_model, tokenizer, max_batch=16), chat, prompts, params, TOOLS)
    assert len(done) == 10
    assert [t.tokens for t in narrow] == [t.tokens for t in wide]
    assert all(t.tokens for t in narrow)
