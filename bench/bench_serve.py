"""Serving under load: concurrent streaming clients against `pocketgpt serve` on localhost.

    python bench/bench_serve.py [--run RUN] [--clients 1,8,32,100] [--max-tokens 64]

For each client count, that many clients each stream one chat completion at once (bounded: one
request per client, a time limit per run). Reported per level: requests/s, time to first token p50 / p99,
aggregate generated tokens/s, 5xx count, streams that did not end with [DONE], and the server's peak
memory; then the continuous-batching speed-up: aggregate tokens/s at N clients over 1 client.

Without --run, a `small`-preset model (the speedrun's shape) with random weights is served: speed
depends on shapes, not on what the weights learned; temperature 1 and a random model make replies
run to max_tokens, so every level decodes the same amount. Writes bench/out/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_random_run(root: Path) -> Path:
    import torch

    from pocketgpt.chat import PocketTemplate
    from pocketgpt.checkpoint import save_model
    from pocketgpt.data.sources import SourceSpec, read_documents
    from pocketgpt.model import GPT, preset
    from pocketgpt.tokenizer import BPETokenizer

    tok = BPETokenizer.train(read_documents(SourceSpec("docs", "docs"))[:300], 4096)
    torch.manual_seed(0)
    save_model(GPT(preset("small", vocab_size=tok.vocab_size)), root / "sft", PocketTemplate(tok), {"stage": "sft"})
    return root


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_client(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me a story about the number {seed}."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "ttft": None, "tokens": 0, "complete": False}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - t0
    return {"status": 200, "ttft": ttft, "tokens": tokens, "complete": done}


async def level(url: str, model: str, clients: int, max_tokens: int, timeout: float) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, model, max_tokens, i) for i in range(clients)),
                                       return_exceptions=True)
        wall = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, dict)]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(q):
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None

    return {"clients": clients, "seconds": wall, "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": pct(0.5), "ttft_p99": pct(0.99),
            "errors_5xx": sum(1 for r in ok if r["status"] >= 500), "errors_other": len(results) - len(ok),
            "incomplete_streams": sum(1 for r in ok if not r["complete"])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run or model directory to serve (default: a random small-preset model)")
    p.add_argument("--model", help="model id to request (default: the last one the server lists)")
    p.add_argument("--clients", default="1,8,32,100")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="serve bf16 weights")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one level may take")
    p.add_argument("--out", default="bench/out/serve.json")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else small_random_run(Path(tmp.name) / "run")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen([sys.executable, "-m", "pocketgpt.cli", "serve", str(run), "--port", str(port),
                               "--threads", str(args.threads), "--max-batch", str(args.max_batch),
                               *(["--bf16"] if args.bf16 else [])], env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        model = args.model or httpx.get(url + "/v1/models").json()["data"][-1]["id"]
        report = {"run": str(args.run or "random small preset"), "model": model, "threads": args.threads,
                  "dtype": "bfloat16" if args.bf16 else "float32",
                  "max_batch": args.max_batch, "max_tokens": args.max_tokens, "levels": []}
        for n in (int(x) for x in args.clients.split(",")):
            result = asyncio.run(level(url, model, n, args.max_tokens, args.timeout))
            result["server_peak_mb"] = peak_rss_mb(server.pid)
            report["levels"].append(result)
            print(json.dumps(result))
        base = next((lv for lv in report["levels"] if lv["clients"] == 1), None)
        if base:
            report["batching_speedup"] = {str(lv["clients"]): lv["tokens_per_s"] / base["tokens_per_s"]
                                          for lv in report["levels"]}
            print("continuous-batching speed-up over one client:", report["batching_speedup"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(timeout=10)
        tmp.cleanup()


if __name__ == "__main__":
    main()
