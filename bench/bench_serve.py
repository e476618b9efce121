"""Serving under load: concurrent streaming clients against `pocketgpt serve` on localhost.

    python bench/bench_serve.py [--run RUN] [--clients 1,8,32,100] [--max-tokens 64] [--bf16]
    python bench/bench_serve.py --run RUN --llama-server PATH --gguf FILE   # llama.cpp's server beside ours

Every level serves the same requests (`--requests`, 64 by default, or one per client if there are more
clients), with that many clients at once: a client sends its next request when its reply has ended. Every
reply runs to max_tokens (`ignore_eos`, the extension vLLM and llama.cpp's server share), so both servers
and every level decode the same amount. Reported per level: requests/s, time to first token p50 / p99,
aggregate generated tokens/s, 5xx count, streams that did not end with [DONE], and the server's peak
memory; then the continuous-batching speed-up: aggregate tokens/s at N clients over 1 client (the same
requests served one at a time).

With --llama-server (a `llama-server` binary: ../shared/ANCHORS.md says how to build it) and --gguf
(the file RUN was imported from), each round of a level on our server is followed at once by the
same round on llama.cpp's server on that file (started with one slot per client, `-np N`, and the
same threads), and the median ratio of aggregate tokens/s is reported per level. `--rounds R` runs
each level R times and reports the median round: this machine's speed drifts by tens of percent
between minutes.

Without --run, a `small`-preset model (the speedrun's shape) with random weights is served: speed
depends on shapes, not on what the weights learned. Writes bench/out/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pocketgpt.common import provenance


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


class Connection:
    """One keep-alive HTTP/1.1 connection of a client, read by hand: the load generator shares the server's two
    cores, and httpx's pure-Python protocol stack cost 0.16-0.5 ms of CPU per streamed token here (this reader
    0.05-0.25), as much as the server's own work outside the model: the figures measured the client too."""

    def __init__(self, url: str):
        self.host, self.port = httpx.URL(url).host, httpx.URL(url).port
        self.reader = self.writer = None

    async def post(self, path: str, body: dict):
        """Send a request; yields the status, then each piece of the body as it arrives."""
        data = json.dumps(body).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data
        for fresh in (self.writer is None, True):  # a kept-alive connection the server has closed: once more anew
            if fresh:
                self.close()
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(request)
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                if fresh:
                    raise
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        yield int(lines[0].split()[1])
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                yield (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readline()  # the empty trailer
        else:
            yield await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def one_client(conn: Connection, model: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me a story about the number {seed}."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, pieces, done, buffer = None, 0, 0, False, b""
    response = conn.post("/v1/chat/completions", body)
    status = await anext(response)
    async for data in response:
        if status != 200:
            continue
        buffer += data
        *events, buffer = buffer.split(b"\n\n")  # server-sent events end with a blank line
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices") or []):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    # Usage counts tokens; without it (a server that does not send it), the streamed pieces do.
    return {"status": status, "ttft": ttft, "tokens": tokens or pieces, "complete": done}


async def level(url: str, model: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    """`requests` requests, `clients` at a time: a client sends its next request when its reply has ended.
    Every level serves the same requests (ids 0 to requests - 1), so its tokens/s over one client's is
    what concurrency buys on the same work."""
    todo = iter(range(requests))  # shared by the clients: each takes the next id (one event loop, no lock)
    results: list = []

    async def client_loop() -> None:
        conn = Connection(url)
        try:
            for i in todo:
                try:
                    results.append(await one_client(conn, model, max_tokens, i))
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    results.append(e)
                    conn.close()
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(clients))), timeout)
    wall = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, dict)]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(q):
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None

    return {"clients": clients, "requests": requests, "seconds": wall, "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": pct(0.5), "ttft_p99": pct(0.99),
            "errors_5xx": sum(1 for r in ok if r["status"] >= 500), "errors_other": len(results) - len(ok),
            "incomplete_streams": sum(1 for r in ok if not r["complete"])}


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {seconds:.0f} s")


def median_level(rounds: list[dict]) -> dict:
    """The round with the median aggregate tokens/s, with every round's figure beside it."""
    ordered = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds]}


def speedups(levels: list[dict]) -> dict[str, float]:
    """Aggregate tokens/s at each level over one client's: what continuous batching buys."""
    base = next((lv for lv in levels if lv["clients"] == 1), None)
    return {str(lv["clients"]): lv["tokens_per_s"] / base["tokens_per_s"] for lv in levels} if base else {}


@contextlib.contextmanager
def server_process(command: list[str], url: str, seconds: float, env: dict | None = None):
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc, seconds)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ours_command(run: Path, port: int, args) -> list[str]:
    return [sys.executable, "-m", "pocketgpt.cli", "serve", str(run), "--port", str(port),
            "--threads", str(args.threads), "--max-batch", str(args.max_batch),
            "--compile" if args.compile else "--no-compile", *(["--bf16"] if args.bf16 else [])]


def llama_command(port: int, clients: int, args) -> list[str]:
    """llama.cpp's server on the same file: one slot per client, 512 tokens a slot, the same threads."""
    return [args.llama_server, "-m", args.gguf, "--port", str(port), "-t", str(args.threads),
            "-np", str(clients), "-c", str(512 * clients)]


def measure(run: Path, clients: list[int], args) -> dict:
    """Every level, `rounds` times; with llama-server, each of our rounds is followed at once by its
    round on the same level, so that a drift of the machine's speed touches both sides alike."""
    ours: dict[int, list] = {n: [] for n in clients}
    theirs: dict[int, list] = {n: [] for n in clients}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with server_process(ours_command(run, port, args), url, args.start_timeout, env) as proc:
        model = args.model or httpx.get(url + "/v1/models").json()["data"][-1]["id"]
        for n in clients:
            for _ in range(args.rounds):
                result = asyncio.run(level(url, model, n, max(n, args.requests), args.max_tokens, args.timeout))
                ours[n].append({**result, "server_peak_mb": peak_rss_mb(proc.pid)})
                print("ours", json.dumps(ours[n][-1]))
                if args.llama_server:
                    their_port = free_port()
                    their_url = f"http://127.0.0.1:{their_port}"
                    with server_process(llama_command(their_port, n, args), their_url, args.start_timeout) as lp:
                        result = asyncio.run(level(their_url, "gguf", n, max(n, args.requests), args.max_tokens,
                                                   args.timeout))
                        theirs[n].append({**result, "server_peak_mb": peak_rss_mb(lp.pid)})
                    print("llama-server", json.dumps(theirs[n][-1]))
    report = {"ours": {"model": model, "levels": [median_level(ours[n]) for n in clients]}}
    report["ours"]["batching_speedup"] = speedups(report["ours"]["levels"])
    if args.llama_server:
        report["llama_server"] = {"binary": args.llama_server, "gguf": args.gguf,
                                  "levels": [median_level(theirs[n]) for n in clients]}
        report["ours_over_llama_server"] = {
            str(n): statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours[n], theirs[n]))
            for n in clients}
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run or model directory to serve (default: a random small-preset model)")
    p.add_argument("--model", help="model id to request (default: the last one the server lists)")
    p.add_argument("--clients", default="1,8,32,100")
    p.add_argument("--requests", type=int, default=64,
                   help="requests per level (at least one per client); every level serves the same ones")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="serve bf16 weights")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="serve with the compiled decode step (the server's default)")
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary, run beside ours")
    p.add_argument("--gguf", metavar="FILE", help="the GGUF file for llama-server (the one RUN was imported from)")
    p.add_argument("--rounds", type=int, default=1, help="times each level runs (the median is reported)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one level may take")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--out", default="bench/out/serve.json")
    args = p.parse_args()
    if bool(args.llama_server) != bool(args.gguf):
        p.error("--llama-server and --gguf go together")
    clients = [int(x) for x in args.clients.split(",")]
    tmp = tempfile.TemporaryDirectory()
    try:
        run = Path(args.run) if args.run else small_random_run(Path(tmp.name) / "run")
        report = {"run": str(args.run or "random small preset"), "threads": args.threads,
                  "dtype": "bfloat16" if args.bf16 else "float32", "compiled": args.compile, "rounds": args.rounds,
                  "max_batch": args.max_batch, "max_tokens": args.max_tokens, **measure(run, clients, args)}
        print("continuous-batching speed-up over one client:", report["ours"]["batching_speedup"])
        if args.llama_server:
            print("ours / llama-server, aggregate tokens/s (median over rounds):", report["ours_over_llama_server"])
        report["measured"] = provenance()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    main()
