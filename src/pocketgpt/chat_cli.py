"""`pocketgpt chat RUN`: a conversation in the terminal, replies streamed as they are written.

Commands: /reset starts over, /system TEXT sets the system prompt, /temp T the temperature, /quit
leaves. The conversation is kept until /reset, and a reply that does not fit the context says so.
"""

from __future__ import annotations

import sys

from rich.console import Console

from .checkpoint import load_model
from .common import pick_device, set_threads
from .engine import Engine, SamplingParams

HELP = "/reset  /system TEXT  /temp T  /quit"


def chat_loop(args, read=input, out=sys.stdout) -> None:
    console = Console(stderr=True)
    set_threads(args.threads)
    model, chat, _ = load_model(args.model, pick_device(args.device))
    engine = Engine(model, chat.tokenizer)
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
            try:
                temperature = float(line.split()[1])
            except (IndexError, ValueError):
                console.print("usage: /temp 0.7")
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
        reply = []
        for piece in engine.stream(prompt, params):
            reply.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
