"""Generation with tools: the model writes a call, the runtime answers it, the model goes on.

Our chat template (see chat.py) renders one tool use as

    <|assistant_start|><|tool_call_start|>{"name": "calculator", "arguments": {...}}<|tool_call_end|><|assistant_end|>
    <|tool_result_start|>5535<|tool_result_end|>
    <|assistant_start|>The answer is 5535.<|assistant_end|>

(ChatML writes <tool_call>...</tool_call> and a <tool_response> turn instead; the template knows.)
Decoding stops at the end of the assistant's turn; when that turn holds a call, the runtime appends
the result and a new assistant header, and decoding continues from the whole conversation so far.
Tokens the runtime wrote are not the model's actions: `Transcript.action_mask` marks which tokens
were sampled, so RL trains on those only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .chat import ChatTemplate
from .engine import Engine, LogitsProcessor, SamplingParams, TextStream

# A tool takes the call's arguments and returns text; errors are text too (the model sees them).
Tool = Callable[..., str]
ANSWER_ROOM = 32  # tokens of context kept free for the answer after a tool's result


@dataclass
class Transcript:
    tokens: list[int] = field(default_factory=list)  # everything after the prompt
    action_mask: list[int] = field(default_factory=list)  # 1 where the model sampled the token
    text: str = ""  # the final assistant turn (the answer)
    finish_reason: str = "length"
    calls: list[dict] = field(default_factory=list)  # {"name", "arguments", "result"} in order
    prompt_index: int = 0


def parse_call(text: str) -> tuple[str, dict]:
    """'{"name": ..., "arguments": {...}}' -> (name, arguments); ValueError says what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the tool call is not valid JSON ({e.msg})") from None
    except RecursionError:  # brackets nested thousands deep: the server answered 500, the loop crashed
        raise ValueError("the tool call nests too deeply") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError('a tool call is {"name": ..., "arguments": {...}}')
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return obj["name"], args


def run_tool(tools: dict[str, Tool], name: str, arguments: dict) -> str:
    if name not in tools:
        return f"error: unknown tool {name!r}; available: {', '.join(sorted(tools))}"
    try:
        return str(tools[name](**arguments))
    except Exception as e:  # wrong arguments, or a tool that failed: the model reads why
        return f"error: {e}"


def generate_with_tools(engine: Engine, chat: ChatTemplate, prompts: list[list[int]], params: SamplingParams,
                        tools: dict[str, Tool], max_calls: int = 3,
                        processors: list[LogitsProcessor] = (), first_index: int = 0,
                        on_done: Callable[[], None] | None = None) -> list[Transcript]:
    """Like Engine.generate, but tool calls are executed; row = prompt_index * n + sample.

    Every conversation decodes to the end of its turn; a turn that holds a tool call gets the result
    appended to its live cache (`Engine.extend`) and decodes on, while the others keep going. After
    `max_calls` calls a conversation gets no more results and ends with finish_reason "tool_limit".
    max_tokens applies to each turn.

    `first_index`: where these prompts start in a larger batch. With a seed, prompt i samples from
    the random streams of request first_index + i, so a prompt gets the same answers whichever
    chunk or process decodes it (RL under torchrun matches one process). `on_done` is called as each
    conversation ends (a progress bar).
    """
    params = replace(params, stop_tokens=(*params.stop_tokens, *chat.stop_ids))
    before_result, after_result = chat.tool_result_delimiters
    seqs = [s for i, p in enumerate(prompts)
            for s in engine.submit(p, params, processors, keep=True, prompt_index=first_index + i)]
    out = [Transcript(prompt_index=s.prompt_index - first_index) for s in seqs]
    try:
        for seq, ev in engine.run(seqs):  # run() goes on while any of them, extended ones included, is unfinished
            if ev.done:
                t = out[seq.index - first_index * params.n]
                _turn_ended(engine, chat, seq, t, tools, max_calls, before_result, after_result)
                if seq.done:  # no tool result was appended: the conversation is over
                    engine.release(seq)  # its row goes to a waiting prompt (rows are kept for results)
                    if on_done:
                        on_done()
    finally:
        for seq in seqs:
            engine.release(seq)
    for seq, t in zip(seqs, out):
        t.tokens, t.action_mask = seq.tokens, seq.sampled
    return out


def describe_call(call: dict, limit: int = 160) -> str:
    """A call as a person reads it: name(arguments) -> result, a long result cut at `limit` characters."""
    result = call["result"] if len(call["result"]) <= limit else call["result"][:limit] + "..."
    return f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}) -> {result}"


def stream_with_tools(engine: Engine, chat: ChatTemplate, prompt: list[int], params: SamplingParams,
                      tools: dict[str, Tool], max_calls: int = 3,
                      processors: list[LogitsProcessor] = (), transcript: Transcript | None = None
                      ) -> Iterator[str | dict]:
    """One reply as it is written, its tool calls answered on the way (the terminal chat): text pieces
    (str), and for each call {"name", "arguments", "result"} once the result is in the live cache.
    The call's own text is not shown: the display stops at the tool-call opener as at a stop string.
    `transcript`, when given, holds the whole reply at the end (its finish reason: a reply cut short)."""
    params = replace(params, n=1, stop_tokens=(*params.stop_tokens, *chat.stop_ids))
    before_result, after_result = chat.tool_result_delimiters
    opener = chat.tool_call_markers[0]
    # a special token is no text to stop the display at (the reply's text leaves specials out): its id is
    hide_from = opener if isinstance(opener, int) else None
    shown = params if hide_from is not None else replace(params, stop_strings=(*params.stop_strings, opener.strip()))
    (seq,) = engine.submit(prompt, params, processors, keep=True)
    t = transcript if transcript is not None else Transcript()
    text = TextStream(engine.tokenizer, shown, hide_from)
    try:
        for _, ev in engine.run([seq]):
            piece = text.push(ev)
            if piece:
                yield piece
            if ev.done:
                calls = len(t.calls)
                _turn_ended(engine, chat, seq, t, tools, max_calls, before_result, after_result)
                if len(t.calls) > calls:
                    yield t.calls[-1]
                    text = TextStream(engine.tokenizer, shown, hide_from)  # the next turn
    finally:
        engine.release(seq)


def _turn_ended(engine: Engine, chat: ChatTemplate, seq, t: Transcript, tools, max_calls: int,
                before_result: list[int], after_result: list[int]) -> None:
    """A turn finished: answer its tool call (the sequence goes on) or record the answer."""
    t.finish_reason = seq.finish_reason
    call = chat.split_tool_call(seq.turn) if seq.finish_reason == "stop" else None
    if call is None:
        t.text = engine.visible_text(seq.turn, seq.params)
        return
    before_call, call_text = call
    if len(t.calls) == max_calls:
        t.text, t.finish_reason = before_call, "tool_limit"
        return
    try:
        name, arguments = parse_call(call_text)
        result = run_tool(tools, name, arguments)
    except ValueError as e:
        name, arguments, result = "", {}, f"error: {e}"
    t.calls.append({"name": name, "arguments": arguments, "result": result})
    # A long result (a search hit) is cut so the conversation keeps room for an answer.
    room = (engine.model.cfg.max_seq_len - len(seq.prompt) - len(seq.tokens)
            - len(before_result) - len(after_result) - ANSWER_ROOM)
    if room <= 0:
        t.finish_reason = "length"
        return
    engine.extend(seq, [*before_result, *engine.tokenizer.encode(result)[:room], *after_result])
