"""Time to first token through a conversation: what the prefix cache buys.

    python bench/bench_conversation.py --run RUN [--turns 8] [--rounds 3]
    python bench/bench_conversation.py --run RUN --llama-server PATH --gguf FILE   # llama.cpp's server beside ours

A chat client resends the whole conversation every turn, so without a prefix cache each turn prefills
everything said so far, and the time to the first token grows with the conversation. The same greedy
conversation (a system prompt, then `--turns` user messages, each reply added to the next request) is
held with `pocketgpt serve` as it starts by default (prefix cache on), with `--prefix-cache 0`, and, with
--llama-server, with llama.cpp's server on the GGUF file RUN was imported from (its `cache_prompt`, on by
default, reuses the slot's previous prompt). Reported per turn: the prompt's tokens as each server counted
them, the median time to first token over `--rounds` conversations, and the tokens the cache supplied
(`cached_tokens`). Writes bench/out/conversation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
from bench_serve import free_port, server_process

from pocketgpt.common import provenance

SYSTEM = ("You are a patient tutor. You explain numbers to a curious child in short, friendly sentences, "
          "you give one example for every idea, and you never use words a child would not know.")


def turn(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: time to first token, the reply, and the usage the server reported."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, text, usage = time.perf_counter(), None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                if c.get("delta", {}).get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(c["delta"]["content"])
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": ttft, "reply": "".join(text), "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens")}


def conversation(url: str, model: str, turns: int, max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"Tell me something new about the number {i + 2}."})
        result = turn(url, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": result["reply"]})
        out.append(result)
    return out


def measure(name: str, command: list[str], url: str, model: str | None, args, env: dict) -> dict:
    rounds = []
    with server_process(command, url, args.start_timeout, env):
        model = model or httpx.get(url + "/v1/models").json()["data"][-1]["id"]
        conversation(url, model, 1, 4)  # warm up: the first request pays for lazy set-up
        for _ in range(args.rounds):
            rounds.append(conversation(url, model, args.turns, args.max_tokens))
            print(name, json.dumps([round(t["ttft"], 3) for t in rounds[-1]]))
    per_turn = [{"prompt_tokens": rounds[0][i]["prompt_tokens"], "cached_tokens": rounds[-1][i]["cached_tokens"],
                 "ttft": statistics.median(r[i]["ttft"] for r in rounds)} for i in range(args.turns)]
    return {"turns": per_turn, "ttft_total": sum(t["ttft"] for t in per_turn)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run or model directory to serve")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per reply")
    p.add_argument("--rounds", type=int, default=3, help="conversations per server (the median turn is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary, run beside ours")
    p.add_argument("--gguf", metavar="FILE", help="the GGUF file for llama-server (the one RUN was imported from)")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--out", default="bench/out/conversation.json")
    args = p.parse_args()
    if bool(args.llama_server) != bool(args.gguf):
        p.error("--llama-server and --gguf go together")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ours = [sys.executable, "-m", "pocketgpt.cli", "serve", args.run, "--port", str(port), "--threads", str(args.threads)]
    report = {"run": args.run, "turns": args.turns, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "prefix_cache": measure("prefix cache", ours, url, None, args, env),
              "no_prefix_cache": measure("no prefix cache", [*ours, "--prefix-cache", "0"], url, None, args, env)}
    if args.llama_server:
        command = [args.llama_server, "-m", args.gguf, "--port", str(port), "-t", str(args.threads), "-np", "1",
                   "-c", "4096"]
        report["llama_server"] = measure("llama-server", command, url, "gguf", args, env)
    last = args.turns - 1
    for name in ("prefix_cache", "no_prefix_cache", "llama_server"):
        if name in report:
            t = report[name]["turns"][last]
            print(f"{name:>16}: last turn {t['prompt_tokens']} prompt tokens, time to first token {t['ttft']:.3f} s, "
                  f"all turns {report[name]['ttft_total']:.2f} s")
    report["measured"] = provenance()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
