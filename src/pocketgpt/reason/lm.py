"""The `LM` protocol: what reasoning strategies and evaluation need from a model, and nothing more.

    lm = LM.load("runs/speedrun/sft")                        # a local run, through our engine
    lm = LM.openai(base_url="http://127.0.0.1:8000/v1")      # any OpenAI-compatible server
    lm.chat([{"role": "user", "content": "9.11 or 9.9?"}], n=5, temperature=0.7)  # -> 5 Generations
    lm.chat_batch([...many conversations...])                # batched (local) or concurrent (server)
    lm.complete_batch(["Q: 2+2?\nA:"], stop=("\n",))        # a base model continues documents

A strategy written against this protocol runs unchanged on our checkpoints, on an imported model,
and on any server that speaks OpenAI's API (ours, vLLM, llama.cpp, a hosted one). Every call adds to
`lm.usage` (model calls, prompt and completion tokens), so each strategy reports its cost.
"""

from __future__ import annotations

import concurrent.futures
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ..common import PocketError

# Requests an OpenAI-compatible backend keeps in flight: as many as `pocketgpt serve` decodes together
# (`--max-batch`, 32), since fewer leave its rows idle. Tree of Thoughts (b=1) on 8 puzzles through
# SmolLM2 took 148-170 s with 8 in flight, 89-101 s with 32 and 88 s with 64 (the same answers).
CONCURRENCY = 32


@dataclass
class Generation:
    text: str  # the reply, or with tool calls the text before them (ReAct's "thought")
    finish_reason: str  # "stop" | "length" | "tool_calls"
    completion_tokens: int = 0
    tool_calls: list[dict] = field(default_factory=list)  # {"name", "arguments": dict} in order


@dataclass
class Usage:
    calls: int = 0  # requests to the model (a request for n samples is one call)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int, calls: int = 1) -> None:
        self.calls += calls
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens


@dataclass
class Request:
    """One chat request: the conversation and how to sample it."""
    messages: list[dict]
    n: int = 1
    temperature: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_schema: dict | None = None  # hold the output to this schema (constrained decoding)
    choices: tuple[str, ...] | None = None  # the reply is exactly one of these strings (vLLM's guided_choice)
    regex: str | None = None  # the reply matches this regular expression (vLLM's guided_regex)
    tools: list[dict] | None = None  # OpenAI function specs the model may call; a call ends the turn
    tool_choice: str = "auto"  # "required": the turn must be a call (held to the tools' schemas)
    # The last message is the assistant's reply so far, and the model goes on from its text (vLLM's
    # continue_final_message): a strategy writes part of the turn itself, such as a calculator's result.
    continue_final: bool = False


def tool_call_messages(generation: Generation, results: list[str], step: int = 0) -> list[dict]:
    """The assistant turn that made `generation`'s calls and one tool message per result, in the
    OpenAI shape (ids tie each result to its call), ready to append to the conversation."""
    calls = [{"id": f"call_{step}_{i}", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
             for i, c in enumerate(generation.tool_calls)]
    return [{"role": "assistant", "content": generation.text or None, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": result}
              for call, result in zip(calls, results))]


class Refused(PocketError):
    """The model cannot take one request (its conversation outgrew the context, or the server answered 400),
    where the model itself is fine: a strategy may count that question unanswered and go on."""


class ReplyTooLong(Refused):
    """A server's 400 for a reply's max_tokens beyond what its context leaves after the prompt."""


class LM(ABC):
    """A model to talk to. Subclasses implement `chat_batch` and `complete_batch`."""

    name: str
    usage: Usage
    context: int | None = None  # the model's context in tokens, where known (a local model's)

    @abstractmethod
    def chat_batch(self, requests: list[Request]) -> list[list[Generation]]:
        """Each request's n generations, in request order; a request the model refuses fails the batch."""

    @abstractmethod
    def chat_each(self, requests: list[Request]) -> list[list[Generation]]:
        """chat_batch, where a request the model refuses (`Refused`) gets no generations ([]) and the others
        theirs: a strategy's own prompts (a self-check that quotes a long reply, a conversation grown by tool
        results) outgrow the context on some questions, and those questions go unanswered."""

    @abstractmethod
    def complete_batch(self, prompts: list[str], max_tokens: int = 64, temperature: float = 0.0,
                       stop: tuple[str, ...] = (), seed: int | None = None) -> list[Generation]:
        """Continue each text as a document (a base model's few-shot prompt): one generation per prompt."""

    def chat(self, messages: list[dict], **options) -> list[Generation]:
        """One conversation's generations; `options` are Request's fields (n, temperature, tools, ...)."""
        return self.chat_batch([Request(messages, **options)])[0]

    @staticmethod
    def load(path: str | Path, device: str = "auto", max_batch: int = 64, prefill_dtype: str = "float32",
             compile: bool = False, prefix_cache_mb: float = 2048) -> LocalLM:
        """`compile`: the engine's compiled decode step (several times faster decoding, after a one-off compile).
        `prefix_cache_mb`: prompt beginnings' keys and values kept for reuse (engine.py). Strategies send one
        conversation again and again, a little longer each time (a chain continues its own reply step by step,
        a proposal move by move): with the cache each request prefills only what is new."""
        return LocalLM(path, device, max_batch, prefill_dtype, compile, prefix_cache_mb)

    @staticmethod
    def openai(base_url: str, api_key: str = "none", model: str | None = None,
               concurrency: int = CONCURRENCY) -> OpenAILM:
        return OpenAILM(base_url, api_key, model, concurrency)


class LocalLM(LM):
    """A run or model directory, decoded by our continuous-batching engine: a batch of requests is one
    running batch, and n samples of a request share their prompt's prefill."""

    def __init__(self, path: str | Path, device: str = "auto", max_batch: int = 64, prefill_dtype: str = "float32",
                 compile: bool = False, prefix_cache_mb: float = 2048):
        from ..checkpoint import load_model, resolve_model_dir
        from ..common import pick_device
        from ..engine import Engine

        directory = resolve_model_dir(path)
        self.model, self.chat_template, self.config = load_model(directory, pick_device(device), blocks=True, policy=True)
        self.engine = Engine(self.model, self.chat_template.tokenizer, max_batch=max_batch, prefill_dtype=prefill_dtype,
                             compile=compile, prefix_cache_mb=prefix_cache_mb)
        self.name, self.usage = str(directory), Usage()
        self.context = self.model.cfg.max_seq_len
        self._constraints = None

    def _processor_factory(self, r: Request):
        """The request's constraint, as the server builds it: a forced tool call, a JSON schema, a choice or a
        regular expression."""
        forced = bool(r.tools) and r.tool_choice == "required"
        if r.json_schema is None and r.choices is None and r.regex is None and not forced:
            return None
        if self._constraints is None:
            from ..constrain import Constraints

            self._constraints = Constraints(self.chat_template, self.model.cfg.vocab_size)
        if forced:
            return self._constraints.tool_call([(t["function"]["name"], t["function"].get("parameters")
                                                 or {"type": "object"}) for t in r.tools]).processor
        if r.choices is not None:
            return self._constraints.choice(list(r.choices)).processor
        if r.regex is not None:
            return self._constraints.regex(r.regex).processor
        return self._constraints.json_schema(r.json_schema).processor

    def chat_batch(self, requests: list[Request]) -> list[list[Generation]]:
        return self._chat(requests, refuse=True)

    def chat_each(self, requests: list[Request]) -> list[list[Generation]]:
        return self._chat(requests, refuse=False)

    def _chat(self, requests: list[Request], refuse: bool) -> list[list[Generation]]:
        """One running batch of every request the model can take. All are checked before any is queued (a
        request refused after others were queued left those decoding for nobody), and a request's samples
        draw from its seed alone, whatever its place in the batch, as a server's do."""
        from ..engine import SamplingParams

        chat, context = self.chat_template, self.model.cfg.max_seq_len
        planned = []
        for i, r in enumerate(requests):
            if not r.messages:
                raise PocketError(f"request {i} has no messages")
            prompt = chat.prompt(r.messages, r.continue_final)
            if len(prompt) >= context:
                if refuse:
                    raise Refused(f"request {i}: the prompt has {len(prompt)} tokens; the context is {context}")
                planned.append(None)
                continue
            # No tools offered: the model may not call one (a tool-trained model otherwise would).
            opener = chat.tool_call_token
            params = SamplingParams(max_tokens=min(r.max_tokens, context - len(prompt)), temperature=r.temperature,
                                    n=r.n, seed=r.seed, stop_tokens=chat.stop_ids, stop_strings=r.stop,
                                    banned_tokens=(opener,) if not r.tools and opener is not None else ())
            planned.append((prompt, params, self.engine.sequences(prompt, params,
                                                                  processor_factory=self._processor_factory(r))))
        running = [s for plan in planned if plan is not None for s in plan[2]]
        self.engine.enqueue(running)
        for _ in self.engine.run(running):
            pass
        out = []
        for r, plan in zip(requests, planned):
            if plan is None:
                out.append([])
                continue
            prompt, params, seqs = plan
            gens = [self._generation(s, params, bool(r.tools)) for s in seqs]
            self.usage.add(len(prompt), sum(g.completion_tokens for g in gens))
            out.append(gens)
        return out

    def _generation(self, seq, params, tools: bool) -> Generation:
        """A finished sequence as a Generation; with tools, a turn that holds a call is split into the
        text before it and the call (as the server does it)."""
        from ..toolloop import parse_call

        found = self.chat_template.split_tool_call(seq.turn) if tools and seq.finish_reason == "stop" else None
        if found is not None:
            try:
                name, arguments = parse_call(found[1])
                return Generation(found[0], "tool_calls", len(seq.turn), [{"name": name, "arguments": arguments}])
            except ValueError:
                pass  # not a well-formed call: the turn is plain text, as a server would return it
        return Generation(self.engine.visible_text(seq.turn, params), seq.finish_reason or "length", len(seq.turn))


    def complete_batch(self, prompts: list[str], max_tokens: int = 64, temperature: float = 0.0,
                       stop: tuple[str, ...] = (), seed: int | None = None) -> list[Generation]:
        from ..engine import SamplingParams

        chat, context = self.chat_template, self.model.cfg.max_seq_len
        if max_tokens >= context:
            raise PocketError(f"max_tokens {max_tokens} leaves no room for a prompt in this model's context of {context}")
        ids = [chat.document(p) for p in prompts]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                stop_tokens=chat.document_stops, stop_strings=tuple(stop))
        # The oldest part of a long document gives way (a few-shot prompt's first examples).
        ids = [p[-(context - max_tokens):] for p in ids]
        out = [Generation(c.text, c.finish_reason or "length", len(c.tokens)) for c in self.engine.generate(ids, params)]
        self.usage.add(sum(map(len, ids)), sum(g.completion_tokens for g in out), calls=len(prompts))
        return out


class OpenAILM(LM):
    """Any OpenAI-compatible server, through the official `openai` client; a batch is sent as
    concurrent requests (the server batches them)."""

    def __init__(self, base_url: str, api_key: str = "none", model: str | None = None,
                 concurrency: int = CONCURRENCY):
        # httpx here, whole, before any worker thread: _room's first import of it, in one of 32 threads while
        # others handled their own refusals, let openai's client meet the module half loaded (AttributeError)
        import httpx  # noqa: F401
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=2, timeout=600)
        if model is None:
            try:
                models = [m.id for m in self.client.models.list().data]
            except (openai.APIConnectionError, openai.APIStatusError) as e:  # nothing there, or not an API
                raise PocketError(f"{base_url}: no OpenAI-compatible server answers there ({e})") from None
            if not models:
                raise PocketError(f"{base_url} serves no model")
            model = models[-1]
        self.model, self.concurrency = model, concurrency
        self.name, self.usage = f"{base_url} ({model})", Usage()

    def _send(self, endpoint, **request):
        """One API call, its usage counted; a request the server refuses (4xx: too long, say) becomes a
        PocketError the caller can handle."""
        import openai

        try:
            resp = endpoint(**request)
        except openai.BadRequestError as e:
            too_long = e.code == "context_length_exceeded" and e.param in ("max_tokens", "max_completion_tokens")
            raise (ReplyTooLong if too_long else Refused)(f"{self.name} refused a request: {e.message}") from None
        except openai.APIConnectionError as e:
            raise PocketError(f"{self.name}: the server stopped answering ({e})") from None
        except openai.APIStatusError as e:  # no such model, a wrong key, a server still busy after retries
            raise PocketError(f"{self.name}: {e.status_code} {e.message}") from None
        usage = resp.usage
        self.usage.add(usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
        return resp

    def _one(self, r: Request) -> list[Generation]:
        kwargs = {}
        if r.tools:
            kwargs["tools"], kwargs["tool_choice"] = r.tools, r.tool_choice
        if r.json_schema is not None:
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": r.json_schema}}
        # guided_choice, guided_regex and continue_final_message are not in OpenAI's API: vLLM's extensions,
        # which our server speaks too
        extra = {"guided_choice": list(r.choices) if r.choices is not None else None, "guided_regex": r.regex}
        if r.continue_final:
            extra.update(continue_final_message=True, add_generation_prompt=False)
        if any(v is not None for v in extra.values()):
            kwargs["extra_body"] = {k: v for k, v in extra.items() if v is not None}
        request = dict(model=self.model, messages=r.messages, n=r.n, temperature=r.temperature,
                       max_tokens=r.max_tokens, stop=list(r.stop) or None, seed=r.seed, **kwargs)
        try:
            resp = self._send(self.client.chat.completions.create, **request)
        except ReplyTooLong:
            # as the local model does, a reply gets what the context leaves after the prompt (a strategy asks
            # for 256 tokens whatever the model): the server's /tokenize tells it, where it has one
            room = self._room(r)
            if room is None or room < 1:
                raise
            resp = self._send(self.client.chat.completions.create, **{**request, "max_tokens": min(r.max_tokens, room)})
        choices = sorted(resp.choices, key=lambda c: c.index)
        usage = resp.usage
        per_choice = (usage.completion_tokens // max(1, len(choices))) if usage else 0
        return [Generation(c.message.content or "", c.finish_reason or "stop", per_choice, _calls(c.message))
                for c in choices]

    def _room(self, r: Request) -> int | None:
        """What the server's context leaves a reply after r's prompt, by its /tokenize (ours and vLLM's give the
        prompt's count and the context, max_model_len); None from a server that has none."""
        import httpx

        root = str(self.client.base_url).rstrip("/").removesuffix("/v1")
        try:
            resp = httpx.post(root + "/tokenize", json={"model": self.model, "messages": r.messages,
                                                        "add_generation_prompt": not r.continue_final},
                              headers={"Authorization": f"Bearer {self.client.api_key}"}, timeout=60)
            counted = resp.json()
            return int(counted["max_model_len"]) - int(counted["count"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def chat_batch(self, requests: list[Request]) -> list[list[Generation]]:
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests))

    def chat_each(self, requests: list[Request]) -> list[list[Generation]]:
        def one(r: Request) -> list[Generation]:
            try:
                return self._one(r)
            except Refused:  # this request alone: the others are answered (and counted) once
                return []

        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, requests))

    def complete_batch(self, prompts: list[str], max_tokens: int = 64, temperature: float = 0.0,
                       stop: tuple[str, ...] = (), seed: int | None = None) -> list[Generation]:
        def one(prompt: str) -> Generation:
            resp = self._send(self.client.completions.create, model=self.model, prompt=prompt,
                              max_tokens=max_tokens, temperature=temperature, stop=list(stop) or None, seed=seed)
            usage, c = resp.usage, resp.choices[0]
            return Generation(c.text, c.finish_reason or "stop", usage.completion_tokens if usage else 0)

        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, prompts))


def _calls(message) -> list[dict]:
    """A response message's tool calls as {"name", "arguments": dict}; arguments that are not a JSON
    object become {} (the tool then answers with an error the model can read)."""
    out = []
    for call in message.tool_calls or []:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except (json.JSONDecodeError, RecursionError):
            arguments = {}
        out.append({"name": call.function.name, "arguments": arguments if isinstance(arguments, dict) else {}})
    return out
