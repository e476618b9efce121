"""The OpenAI-compatible API: existing clients (the `openai` package, agents, evaluation tools) talk
to a pocketgpt run as they would to OpenAI, vLLM or llama.cpp's server.

    GET  /v1/models                a run directory serves each stage as a model id (base, sft, ppo, grpo...)
    POST /v1/chat/completions      messages -> the chat template's prompt -> the engine; streaming (SSE),
                                   n, logprobs, logit_bias, presence and frequency penalties,
                                   response_format (constrained decoding), tools, guided_choice
                                   (vLLM's: one of given strings), guided_regex, guided_json,
                                   continue_final_message (vLLM's: go on from a prefilled reply)
    POST /v1/completions           plain text continuation, for base models
    POST /tokenize, /detokenize    the tokenizer, as vLLM exposes it (+ each token's text, for the page)
    GET  /health, /metrics         liveness; Prometheus text (running, waiting, tokens/s, time to first token)
    GET  /                         the chat page

Bad requests get a 4xx in OpenAI's error shape (serve/protocol.py), never a 5xx; a client that goes
away cancels its generation, which frees its cache rows at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoint import load_model
from ..common import PocketError, console
from ..engine import SamplingParams, TextStream
from ..evaluate.arena import Battle, VoteStore, leaderboard, unsettled
from ..stages import POLICIES, named_stages
from ..toolloop import parse_call
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Limits,
    TokenizeRequest,
    VoteRequest,
)
from .worker import ModelWorker

STATIC = Path(__file__).parent / "static"
SERVABLE = tuple(s.name for s in POLICIES)  # the reward model scores text: nothing to generate


def usage_of(prompt: list[int], seqs) -> dict:
    """OpenAI's usage; cached_tokens: the prompt tokens the prefix cache supplied (as vLLM reports them)."""
    done = sum(len(s.turn) for s in seqs)
    return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done,
            "prompt_tokens_details": {"cached_tokens": max(s.cached for s in seqs)}}


def load_workers(path: str | Path, device: str = "cpu", max_batch: int = 32, dtype: str = "float32",
                 prefill_dtype: str = "float32", compile: bool = False,
                 prefix_cache_mb: float = 0) -> dict[str, ModelWorker]:
    """A model directory serves one model (named after it); a run directory serves each of its stages.
    bfloat16 halves the memory the weights take and the bytes each decode step reads. prefill_dtype
    bfloat16 runs prompts through bf16 matmuls and decodes in `dtype`; compile compiles the decode step
    before the server starts (Engine); prefix_cache_mb keeps prompt beginnings' keys and values for reuse
    (prefix_cache.py)."""
    import torch

    path = Path(path)
    stages = [*SERVABLE, *named_stages(path)] if path.is_dir() else []  # named ones too (`sft --name`)
    dirs = [path] if (path / "config.json").exists() else [path / s for s in stages if (path / s / "config.json").exists()]
    if not dirs:
        raise PocketError(f"{path} holds no model to serve: expected config.json or one of {', '.join(SERVABLE)}")
    workers = {}
    for d in dirs:
        try:
            model, chat, cfg = load_model(d, device, dtype=getattr(torch, dtype), blocks=True, policy=True)
        except PocketError as e:
            if len(dirs) == 1:
                raise
            # One damaged stage of a run kept the others from being served: it is left out, and said.
            console.print(f"[yellow]not serving {d.name}: {e}[/]", highlight=False, soft_wrap=True)
            continue
        workers[d.name] = ModelWorker(d.name, model, chat, cfg, max_batch, prefill_dtype, compile, prefix_cache_mb)
    if not workers:
        raise PocketError(f"{path}: none of its stages ({', '.join(d.name for d in dirs)}) can be served (said above)")
    return workers


def now() -> int:
    return int(time.time())


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def drain(queue: asyncio.Queue) -> list:
    """Everything on the queue, waiting for the first item if it is empty."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def by_sequence(events: list) -> list[tuple[object, list]]:
    """(sequence, event) pairs grouped per sequence, in order of first arrival."""
    groups: dict[int, tuple[object, list]] = {}
    for seq, ev in events:
        groups.setdefault(seq.id, (seq, []))[1].append(ev)
    return list(groups.values())


class APIKeyCheck:
    """Requests to the API without `Authorization: Bearer <key>` get a 401. Plain ASGI: starlette's
    BaseHTTPMiddleware would relay every chunk of a streamed reply through a task and a stream of its own."""

    GUARDED = ("/v1/", "/tokenize", "/detokenize", "/arena/")

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.GUARDED) and \
                dict(scope["headers"]).get(b"authorization") != self.expected:
            reply = JSONResponse(APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                          code="invalid_api_key").body(), status_code=401)
            return await reply(scope, receive, send)
        await self.app(scope, receive, send)


# What pydantic adds to an error's location for the member of a union it tried ("str", "dict[str,any]",
# "function-after[...]"): not a field's name, so the param an error names leaves it out.
UNION_MEMBER = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\-]")


def field_path(loc) -> list[str]:
    """The request field a validation error's location names, as a list of parts (messages, 0, role)."""
    return [str(x) for x in loc if x != "body" and not (isinstance(x, str) and UNION_MEMBER.search(x))]


def create_app(workers: dict[str, ModelWorker], limits: Limits | None = None, api_key: str | None = None,
               votes: VoteStore | None = None) -> FastAPI:
    """The app; `votes` is where the arena tab's votes go (none: the arena endpoints answer 404)."""
    limits = limits or Limits()
    app = FastAPI(title="pocketgpt", docs_url=None, redoc_url=None)

    # ------------------------------------------------------------------ errors: always OpenAI's shape

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errors = e.errors() or [{}]
        if errors[0].get("type") == "json_invalid":  # its loc is a character offset, not a field
            error = errors[0].get("ctx", {}).get("error")
            return JSONResponse(APIError(400, "the body is not valid JSON" + (f" ({error})" if error else "")).body(),
                                status_code=400)
        # a value no member of a union takes fails once per member: the member that went deepest into it says
        # best what is wrong ([[1, "a"]] as a prompt: "prompt.0.1: not an integer", not "prompt: not a string")
        first = max(errors, key=lambda error: len(field_path(error.get("loc", []))))
        loc = field_path(first.get("loc", []))
        if not loc and first.get("type") == "missing":  # no body at all: "Field required", naming nothing
            return JSONResponse(APIError(400, "the request has no body: send a JSON object").body(), status_code=400)
        what = first.get("msg", "invalid")
        return JSONResponse(APIError(400, f"{'.'.join(loc) + ': ' if loc else ''}{what}",
                                     ".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(PocketError)
    async def bad_input(_, e: PocketError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    if api_key:
        app.add_middleware(APIKeyCheck, api_key=api_key)

    def worker_for(name: str) -> ModelWorker:
        if name not in workers:
            raise APIError(404, f"model {name!r} does not exist; served: {', '.join(workers)}", "model",
                           code="model_not_found")
        return workers[name]

    def admit(worker: ModelWorker, n: int) -> None:
        if worker.waiting + n > limits.max_queued:
            raise APIError(503, "the server is busy: too many requests are waiting; retry shortly",
                           headers={"Retry-After": "1"})

    def budget(worker: ModelWorker, prompt: list[int], asked: int | None, prompt_field: str = "messages",
               tokens_field: str = "max_tokens") -> int:
        """The tokens a reply may have; errors name the request's fields (`tokens_field`:
        max_completion_tokens when that is what the request set)."""
        context = worker.model.cfg.max_seq_len
        room = context - len(prompt)
        if room <= 0:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is {context}",
                           prompt_field, code="context_length_exceeded")
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"{tokens_field} must be at most {limits.max_tokens}", tokens_field)
        if asked is not None and asked > room:
            raise APIError(400, f"{tokens_field} {asked} + the prompt's {len(prompt)} tokens exceed the context "
                                f"of {context}", tokens_field, code="context_length_exceeded")
        return min(asked or limits.max_tokens, room)

    # ------------------------------------------------------------------ the small endpoints

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(workers)}

    def model_card(name: str) -> dict:
        w = workers[name]
        return {"id": name, "object": "model", "created": now(), "owned_by": "pocketgpt",
                "max_model_len": w.model.cfg.max_seq_len, "stage": w.meta.get("meta", {}).get("stage")}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in workers]}

    @app.get("/v1/models/{name}")
    async def model(name: str):  # the openai client's models.retrieve
        worker_for(name)  # a model not served: 404 in OpenAI's shape
        return model_card(name)

    @app.get("/metrics")
    async def metrics():
        lines = []
        for metric, kind, help_text, value in [
            ("requests_running", "gauge", "sequences in the running batch", lambda w: w.running),
            ("requests_waiting", "gauge", "sequences waiting for a cache row", lambda w: w.waiting),
            ("requests_total", "counter", "requests received", lambda w: w.stats.requests),
            ("generated_tokens_total", "counter", "tokens generated", lambda w: w.stats.tokens),
            ("tokens_per_second", "gauge", "tokens generated per second since start",
             lambda w: w.stats.tokens / max(1e-9, time.time() - w.stats.started)),
            ("prefix_cache_hit_rate", "gauge", "share of prompt tokens the prefix cache supplied",
             lambda w: (c.hit_tokens / max(1, c.lookup_tokens)) if (c := w.engine.prefix_cache) else 0.0),
        ]:
            lines += [f"# HELP pocketgpt_{metric} {help_text}", f"# TYPE pocketgpt_{metric} {kind}"]
            lines += [f'pocketgpt_{metric}{{model="{n}"}} {value(w)}' for n, w in workers.items()]
        lines += ["# HELP pocketgpt_time_to_first_token_seconds time to first token (last 1000 sequences)",
                  "# TYPE pocketgpt_time_to_first_token_seconds summary"]
        for n, w in workers.items():
            ttft = sorted(w.stats.ttft)
            for q in (0.5, 0.9, 0.99):
                v = ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else 0.0
                lines.append(f'pocketgpt_time_to_first_token_seconds{{model="{n}",quantile="{q}"}} {v}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ the arena tab's votes

    def vote_store() -> VoteStore:
        if votes is None:
            raise APIError(404, "this server keeps no arena votes (start it with --arena-db FILE)", code="not_found")
        return votes

    @app.post("/arena/votes")
    async def vote(req: VoteRequest):
        store = vote_store()
        for field, name in (("model_a", req.model_a), ("model_b", req.model_b)):
            if name not in workers:
                raise APIError(400, f"{field}: model {name!r} is not served here", field, code="model_not_found")
        if req.model_a == req.model_b:
            raise APIError(400, "a battle needs two different models", "model_b")
        if len(req.prompt) > limits.max_total_chars:
            raise APIError(400, f"the prompt has {len(req.prompt)} characters; at most {limits.max_total_chars}",
                           "prompt")
        battle = Battle(req.model_a, req.model_b, req.winner, req.length_a, req.length_b)
        vote_id = await asyncio.to_thread(store.add, battle, req.prompt)  # SQLite waits must not block the loop
        return {"id": vote_id}

    @app.get("/arena/leaderboard")
    async def arena_leaderboard():
        battles = await asyncio.to_thread(vote_store().battles)
        rows = await asyncio.to_thread(leaderboard, battles, 100, 0)
        return {"votes": len(battles), "rows": rows, "unsettled": unsettled(battles) if battles else None}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        w = worker_for(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either a prompt or messages to tokenize", "prompt")
        if req.messages is not None:
            chat_request = ChatCompletionRequest(model=req.model, messages=req.messages)
            chat_request.check(limits)  # the same limits as a chat request's
            msgs = chat_request.plain_messages()
            ids = w.chat.prompt(msgs) if req.add_generation_prompt else w.chat.render(msgs)[0]
        else:
            if len(req.prompt) > limits.max_total_chars:
                raise APIError(400, f"the prompt has {len(req.prompt)} characters; at most {limits.max_total_chars}",
                               "prompt")
            # as /v1/completions reads it (a document: <|bos|> first on our models), unless asked for the text alone
            ids = w.chat.document(req.prompt) if req.add_special_tokens else w.chat.tokenizer.encode(req.prompt)
        tok = w.chat.tokenizer
        return {"tokens": ids, "count": len(ids), "max_model_len": w.model.cfg.max_seq_len,
                "token_strs": [tok.token_bytes()[i].decode("utf-8", errors="replace") for i in ids],
                "special": [i in tok.special_ids.values() for i in ids]}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        w = worker_for(req.model)
        vocab = w.chat.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", "tokens")
        return {"prompt": w.chat.tokenizer.decode(req.tokens)}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            raise APIError(404, f"no such file: {name}")
        return FileResponse(path)

    # ------------------------------------------------------------------ generation

    async def collect(request: Request, seqs, events) -> bool:
        """Wait until every sequence is done, True; False if the client went away, which cancels them (looked at
        twice a second, whether tokens are coming or not: while they came, a client that had hung up was never
        noticed). Said by returning, not raising: uvicorn logged a traceback for every client that hung up."""
        looked = time.monotonic()
        try:
            while not all(s.done for s in seqs):
                try:
                    await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - looked >= 0.5:
                    looked = time.monotonic()
                    if await request.is_disconnected():
                        return False
            return True
        finally:
            for s in seqs:
                if not s.done:
                    s.cancel()

    def token_entry(w: ModelWorker, t: int, lp: float, top: list[tuple[int, float]] | None) -> dict:
        """One token in OpenAI's logprobs shape; `top` None: an entry inside another's top_logprobs."""
        table = w.chat.tokenizer.token_bytes()
        b = table[t] if t < len(table) else b""
        e = {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
        if top is not None:
            e["top_logprobs"] = [token_entry(w, a, v, None) for a, v in top]
        return e

    def logprob_entries(w: ModelWorker, seq, tokens: list[int]) -> list[dict]:
        return [token_entry(w, t, seq.logprobs[i], seq.top_logprobs[i]) for i, t in enumerate(tokens)]

    def content_tokens(w: ModelWorker, seq) -> list[int]:
        toks = seq.turn
        return toks[:-1] if toks and seq.finish_reason == "stop" and toks[-1] in seq.params.stop_tokens else toks

    def tool_call_of(w: ModelWorker, seq) -> tuple[str, list[dict]] | None:
        found = w.chat.split_tool_call(seq.turn) if seq.finish_reason == "stop" else None
        if found is None:
            return None
        before, call_text = found
        try:
            name, arguments = parse_call(call_text)
        except ValueError:
            return None  # not a well-formed call: the text stays content
        return before, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                         "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]

    def constrained(req: ChatCompletionRequest) -> bool:
        return bool(req.constraints())

    def tool_constraint(w: ModelWorker, tools):
        """A call to one of `tools`, its arguments held to the tool's schema (compiled once per set of tools)."""
        return w.constraints.tool_call([(t.function.name, t.function.parameters or {"type": "object"}) for t in tools])

    def processor_factory(w: ModelWorker, req: ChatCompletionRequest):
        """The constraint a `constrained` request asks for, compiled once per schema (llguidance), one
        processor per sample; one that does not compile is a 400 naming the field that asked for it."""
        fmt = req.response_format
        if req.forced_tool is not None:
            chosen = [t for t in req.tools if req.forced_tool in ("*", t.function.name)]
            field, build = "tools", lambda: tool_constraint(w, chosen)
        elif req.guided_choice is not None:
            field, build = "guided_choice", lambda: w.constraints.choice(req.guided_choice)
        elif req.guided_regex is not None:
            field, build = "guided_regex", lambda: w.constraints.regex(req.guided_regex)
        elif req.guided_json is not None:
            field, build = "guided_json", lambda: w.constraints.json_schema(req.guided_schema())
        elif fmt.type == "json_object":
            field, build = "response_format", w.constraints.json_object
        else:
            field, build = "response_format", lambda: w.constraints.json_schema(fmt.json_schema.schema_)
        return compiled(field, build).processor

    def compiled(field: str, build):
        try:
            return build()
        except PocketError as e:
            raise APIError(400, str(e), field) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        w = worker_for(req.model)
        req.check(limits)
        prompt = w.chat.prompt(req.plain_messages(), req.continue_final_message)
        max_tokens = budget(w, prompt, req.token_limit,
                            tokens_field="max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        k = (req.top_logprobs or 0) if req.logprobs else None
        use_tools = bool(req.tools) and req.tool_choice != "none"
        opener = w.chat.tool_call_token
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                n=req.n, seed=req.seed, stop_tokens=() if req.ignore_eos else w.chat.stop_ids,
                                stop_strings=req.stops(), logprobs=k, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty, logit_bias=req.biases(w.model.cfg.vocab_size),
                                # no tool on offer: the model may not open a call
                                banned_tokens=(opener,) if not use_tools and opener is not None else ())
        # llguidance builds off the event loop; a request without a constraint skips the hop to a thread
        factory = await asyncio.to_thread(processor_factory, w, req) if constrained(req) else None
        if req.tools and req.forced_tool is None:  # tools on offer, no call forced: their schemas are checked all the same
            await asyncio.to_thread(compiled, "tools", lambda: tool_constraint(w, req.tools))
        admit(w, req.n)
        seqs, events = w.submit(prompt, params, factory)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", now()

        def finish(seq, calls) -> str:
            return "tool_calls" if calls else seq.finish_reason

        if not req.stream:
            if not await collect(request, seqs, events):
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            choices = []
            for s in seqs:
                text = w.engine.visible_text(s.turn, params)
                found = tool_call_of(w, s) if use_tools else None
                message = {"role": "assistant", "content": text}
                if found:
                    message = {"role": "assistant", "content": found[0] or None, "tool_calls": found[1]}
                lp = {"content": logprob_entries(w, s, content_tokens(w, s))} if k is not None else None
                choices.append({"index": s.index, "message": message, "logprobs": lp,
                                "finish_reason": finish(s, found)})
            return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": choices, "usage": usage_of(prompt, seqs)}

        def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]})

        def token_logprobs(seq, events) -> dict | None:
            """The chunk's logprobs: one entry per sampled token of `events` (a stop token is not content)."""
            if k is None:
                return None
            content = []
            for ev in events:
                if ev.token < 0 or (ev.done and seq.finish_reason == "stop" and ev.token in params.stop_tokens):
                    continue
                content.append(token_entry(w, ev.token, ev.logprob, ev.top or []))
            return {"content": content} if content else None

        async def stream():
            streams = {s.index: TextStream(w.chat.tokenizer, params) for s in seqs}
            try:
                for s in seqs:
                    yield chunk(s.index, {"role": "assistant", "content": ""})
                finished = 0
                while finished < len(seqs):  # by events, not by s.done: a fast model finishes before we read
                    # What arrived since the last chunk goes out as one chunk per sample: a client that keeps
                    # up gets a chunk per token, and under load fewer, larger chunks leave the server's time
                    # to decoding instead of framing (vLLM's output collector merges the same way).
                    for seq, evs in by_sequence(await drain(events)):
                        done = evs[-1].done
                        finished += done
                        piece = "".join(streams[seq.index].push(ev) for ev in evs)
                        if use_tools:  # a call is only known when the turn ends: the turn is sent whole then
                            if done:
                                found = tool_call_of(w, seq)
                                text = w.engine.visible_text(seq.turn, params)
                                delta = ({"content": found[0] or None,
                                          "tool_calls": [{**c, "index": 0} for c in found[1]]}
                                         if found else {"content": text})
                                lp = ({"content": logprob_entries(w, seq, content_tokens(w, seq))}
                                      if k is not None else None)
                                yield chunk(seq.index, delta, finish(seq, found), lp)
                            continue
                        lp = token_logprobs(seq, evs)
                        if piece or lp:
                            yield chunk(seq.index, {"content": piece}, None, lp)
                        if done:
                            yield chunk(seq.index, {}, seq.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                               "choices": [], "usage": usage_of(prompt, seqs)})
                yield sse("[DONE]")
            finally:  # the client went away (or the stream ended): nothing keeps decoding for nobody
                for s in seqs:
                    if not s.done:
                        s.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        w = worker_for(req.model)
        req.check(limits)
        given = req.the_prompt()
        if isinstance(given, str):
            prompt = w.chat.document(given)
        else:
            prompt = list(given)
            if any(not 0 <= t < w.model.cfg.vocab_size for t in prompt):
                raise APIError(400, "prompt token ids out of range", "prompt")
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        max_tokens = budget(w, prompt, req.max_tokens, prompt_field="prompt")
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                n=req.n, seed=req.seed, stop_tokens=() if req.ignore_eos else w.chat.document_stops,
                                stop_strings=req.stops(), logprobs=req.logprobs,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                logit_bias=req.biases(w.model.cfg.vocab_size))
        admit(w, req.n)
        seqs, events = w.submit(prompt, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", now()
        offsets = {s.index: 0 for s in seqs}  # characters of each sample's logprob tokens streamed so far

        def legacy_logprobs(tokens: list[int], logprobs: list[float], tops: list, offset: int = 0) -> dict | None:
            """The completions endpoint's logprobs shape; `offset`: characters of the text before these tokens."""
            if req.logprobs is None:
                return None
            table = w.chat.tokenizer.token_bytes()
            strs = [table[t].decode("utf-8", errors="replace") for t in tokens]
            starts = [offset + sum(len(x) for x in strs[:i]) for i in range(len(strs))]
            return {"tokens": strs, "token_logprobs": logprobs,
                    "top_logprobs": [{table[a].decode("utf-8", errors="replace"): v for a, v in top or []}
                                     for top in tops], "text_offset": starts}

        def logprobs_of(seq, tokens):
            return legacy_logprobs(tokens, seq.logprobs[:len(tokens)], seq.top_logprobs[:len(tokens)])

        if not req.stream:
            if not await collect(request, seqs, events):
                return Response(status_code=499)
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": s.index, "text": w.engine.visible_text(s.turn, params),
                                 "logprobs": logprobs_of(s, content_tokens(w, s)), "finish_reason": s.finish_reason}
                                for s in seqs],
                    "usage": usage_of(prompt, seqs)}

        def streamed_logprobs(seq, evs) -> dict | None:
            """The chunk's logprobs: its sampled tokens (a stop token is not text), offset by what came before."""
            kept = [ev for ev in evs if ev.token >= 0 and not (
                ev.done and seq.finish_reason == "stop" and ev.token in params.stop_tokens)]
            lp = legacy_logprobs([ev.token for ev in kept], [ev.logprob for ev in kept], [ev.top for ev in kept],
                                 offsets[seq.index])
            if lp is not None:
                offsets[seq.index] += sum(map(len, lp["tokens"]))
            return lp

        async def stream():
            streams = {s.index: TextStream(w.chat.tokenizer, params) for s in seqs}
            try:
                finished = 0
                while finished < len(seqs):
                    for seq, evs in by_sequence(await drain(events)):  # as in chat: one chunk per sample
                        done = evs[-1].done
                        finished += done
                        piece = "".join(streams[seq.index].push(ev) for ev in evs)
                        lp = streamed_logprobs(seq, evs)
                        if piece or done or (lp and lp["tokens"]):
                            yield sse({"id": rid, "object": "text_completion", "created": created,
                                       "model": req.model,
                                       "choices": [{"index": seq.index, "text": piece, "logprobs": lp,
                                                    "finish_reason": seq.finish_reason if done else None}]})
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": req.model,
                               "choices": [], "usage": usage_of(prompt, seqs)})
                yield sse("[DONE]")
            finally:
                for s in seqs:
                    if not s.done:
                        s.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app
