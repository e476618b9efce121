"""`pocketgpt chat RUN`: a conversation in the terminal, replies streamed as they are written.

Commands: /reset starts over, /system TEXT sets the system prompt, /temp T the temperature, /quit
leaves. The conversation is kept until /reset, and a reply that does not fit the context says so.
The assistant's tool calls are answered as in evaluation and RL (the calculator, and search over the
run's world): each call is shown, dimmed, with its result, and the reply goes on from there.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentTypeError

from rich.console import Console

from .argtypes import non_negative
from .checkpoint import load_model
from .common import pick_device, set_threads
from .data.tasks import default_world
from .data.tasks.tools import task_tools
from .engine import Engine, SamplingParams
from .toolloop import Transcript, describe_call, stream_with_tools

HELP = "/reset  /system TEXT  /temp T  /quit"


def chat_loop(args, read=input, out=sys.stdout) -> None:
    console = Console(stderr=True)
    set_threads(args.threads)
    model, chat, _ = load_model(args.model, pick_device(args.device), blocks=True, policy=True)
    # Each turn's prompt is the conversation so far: the prefix cache keeps it, so a turn prefills only
    # the new message instead of everything again.
    engine = Engine(model, chat.tokenizer, prefix_cache_mb=64)
    tools = task_tools(default_world())
    system, temperature = args.system, args.temperature
    messages: list[dict] = []
    console.print(f"chatting with {args.model} ({chat.name} template). {HELP}")
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            messages = []
            console.print("(new conversation)")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            console.print(f"(system prompt: {system!r})")
            continue
        if line.startswith("/temp"):
            try:  # the rule of --temperature; refused here: taken, -1 ended the session at the next message
                temperature = non_negative(line.split()[1])
            except (IndexError, ValueError, ArgumentTypeError):
                console.print("usage: /temp 0.7 (a number >= 0; 0 is greedy)")
            continue
        if line.startswith("/"):
            console.print(f"unknown command; {HELP}")
            continue
        messages.append({"role": "user", "content": line})
        prompt = chat.prompt(([{"role": "system", "content": system}] if system else []) + messages)
        room = model.cfg.max_seq_len - len(prompt)
        if room <= 0:
            messages.pop()
            console.print("(the conversation no longer fits the context: /reset to start over)")
            continue
        params = SamplingParams(max_tokens=min(args.max_tokens, room), temperature=temperature,
                                stop_tokens=chat.stop_ids)
        reply: list[str] = []
        transcript = Transcript()
        for item in stream_with_tools(engine, chat, prompt, params, tools, transcript=transcript):
            if isinstance(item, str):
                reply.append(item)
                out.write(item)
                out.flush()
                continue
            # A tool call: the conversation keeps it (and its result) as the OpenAI format does.
            call = {"type": "function", "function": {"name": item["name"],
                                                     "arguments": json.dumps(item["arguments"], ensure_ascii=False)}}
            messages += [{"role": "assistant", "content": "".join(reply), "tool_calls": [call]},
                         {"role": "tool", "content": item["result"]}]
            reply = []
            console.print(describe_call(item), style="dim", markup=False, highlight=False)
        out.write("\n")
        if transcript.finish_reason == "length":  # it was cut off without a word
            console.print(f"(cut short at {params.max_tokens} tokens: "
                          f"{'--max-tokens' if params.max_tokens == args.max_tokens else 'the context is full'})",
                          style="dim", highlight=False)
        messages.append({"role": "assistant", "content": "".join(reply)})
