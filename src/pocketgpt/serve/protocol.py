"""The OpenAI request shapes, validated as vLLM and llama.cpp's server validate them.

Every rule that fails raises `APIError`, which the app turns into the OpenAI error shape

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_logprobs", "code": null}}

with a 4xx status. A value of the wrong JSON type is refused, not converted ("max_tokens": "10"), as
OpenAI refuses it. Unknown fields are accepted and ignored, as OpenAI's own clients send some (user,
metadata, ...) that change nothing here; a field another server takes that would change the reply and
this one does not implement (`UNSUPPORTED`) is refused with a 400 naming it, rather than ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or {401: "authentication_error", 404: "not_found_error", 503: "unavailable_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for; beyond these, a 4xx (or a 503 when the queue is full)."""
    max_messages: int = 500
    max_message_chars: int = 32_000
    max_total_chars: int = 100_000
    max_tokens: int = 4096
    max_n: int = 8
    max_top_logprobs: int = 20
    max_choices: int = 256  # guided_choice's strings
    max_logit_bias: int = 1024  # logit_bias's tokens
    max_queued: int = 256  # sequences waiting for a cache row, per model


# A stop string's length: a stream holds back any end of its text that may start one, checked at every token in
# the event loop that serves every client (4 stops of 100,000 characters stalled the server for 10 s).
MAX_STOP_CHARS = 1_000
MAX_TOOLS = 128

# Fields OpenAI's or vLLM's server takes that would change the reply, with the setting that changes nothing
# (null and empty values change nothing either): any other value is refused, since a request with min_p 0.1
# answered as if it had none would be a silent lie. The constraints are declared by chat completions' request
# and so are not among its unknown fields; the legacy completions endpoint takes none.
UNSUPPORTED: dict[str, Any] = {"best_of": 1, "suffix": None, "repetition_penalty": 1, "min_p": 0, "min_tokens": 0,
                               "use_beam_search": False, "guided_grammar": None, "guided_json": None,
                               "guided_regex": None, "guided_choice": None, "response_format": None,
                               "prediction": None, "logits_processors": None}


class Open(BaseModel):
    # strict: a value of the wrong JSON type is refused, as OpenAI refuses it ("max_tokens": "10" is a 400),
    # not converted; unknown fields are kept (model_extra), for the check of UNSUPPORTED ones
    model_config = ConfigDict(extra="allow", strict=True)


# JSON's "\ud800" escapes decode to a lone surrogate, which no tokenizer takes ("TextInputSequence must be str")
SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_at(value, path: tuple = ()) -> tuple | None:
    """Where in a request body a string holds a lone surrogate (a path of keys and indices), or None."""
    if isinstance(value, str):
        return path if SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = surrogate_at(key, (*path, key)) if isinstance(key, str) else None
        found = found or surrogate_at(item, (*path, key))
        if found is not None:
            return found
    return None


class Body(Open):
    """A whole request body: its text must be Unicode."""

    @model_validator(mode="before")
    @classmethod
    def unicode_only(cls, data):
        path = surrogate_at(data)
        if path is not None:
            param = ".".join(map(str, path)) or None
            raise APIError(400, f"{param or 'the body'}: not Unicode text (a lone surrogate, as JSON's \\ud800 "
                           "escape gives)", param)
        return data


class FunctionDef(Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(Open):
    include_usage: bool = False


class JSONSchemaFormat(Open):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class Message(Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingFields(Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's and llama.cpp's extension for benchmarks: go on past the end-of-turn token up to max_tokens.
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> -100 to 100

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS:,} characters", "stop")
        return tuple(stops)

    def biases(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """logit_bias as the engine takes it: (token, bias) pairs, each checked."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            # ASCII digits, and few: "²".isdigit() is true and int() refuses it, as it refuses 5,000 digits
            if not (key.isascii() and key.isdigit() and len(key) <= 9 and int(key) < vocab_size):
                raise APIError(400, f"logit_bias keys are token ids from 0 to {vocab_size - 1}, not {key!r}",
                               "logit_bias")
            if not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias values are from -100 to 100, not {bias} (token {key})", "logit_bias")
            pairs.append((int(key), bias))
        return tuple(pairs)

    def check_common(self, limits: Limits) -> None:
        for name, neutral in UNSUPPORTED.items():
            if (self.model_extra or {}).get(name) not in (None, neutral, {}, [], ""):
                raise APIError(400, f"{name} is not supported by this server", name)
        if len(self.logit_bias or {}) > limits.max_logit_bias:
            raise APIError(400, f"logit_bias takes at most {limits.max_logit_bias} tokens", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        if self.n > limits.max_n:
            raise APIError(400, f"n must be at most {limits.max_n}", "n")


class ChatCompletionRequest(SamplingFields):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM's extension: the reply is exactly one of these strings (quoting a passage, a label, yes/no)
    guided_choice: list[str] | None = None
    guided_regex: str | None = None  # vLLM's too: the reply matches this regular expression
    guided_json: dict[str, Any] | str | None = None  # vLLM's too: the reply is JSON that this schema admits
    # vLLM's too: the last message is the reply so far, and the model goes on from it (a prefilled reply)
    continue_final_message: bool = False
    add_generation_prompt: bool = True  # vLLM's: must be false with continue_final_message

    def check(self, limits: Limits) -> None:
        self.check_common(limits)
        if not self.messages:
            raise APIError(400, "messages must not be empty", "messages")
        if len(self.messages) > limits.max_messages:
            raise APIError(400, f"at most {limits.max_messages} messages per request", "messages")
        total = 0
        for i, m in enumerate(self.messages):
            size = len(self.text_of(m, i))
            if size > limits.max_message_chars:
                raise APIError(400, f"message {i} has {size} characters; at most {limits.max_message_chars}",
                               f"messages[{i}].content")
            total += size
        if total > limits.max_total_chars:
            raise APIError(400, f"the messages hold {total} characters; at most {limits.max_total_chars}", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs")
        if (self.top_logprobs or 0) > limits.max_top_logprobs:
            raise APIError(400, f"top_logprobs must be at most {limits.max_top_logprobs}", "top_logprobs")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
            raise APIError(400, "response_format json_schema needs json_schema.schema", "response_format")
        if self.tools is not None and not self.tools:
            raise APIError(400, "tools must not be empty (leave it out instead)", "tools")
        if self.tools is not None and len(self.tools) > MAX_TOOLS:  # 3,000 of them answered llguidance's Rust panic
            raise APIError(400, f"at most {MAX_TOOLS} tools a request, as OpenAI's API takes; this one has "
                           f"{len(self.tools)}", "tools")
        if self.tool_choice is not None:
            if not self.tools:
                raise APIError(400, "tool_choice needs tools", "tool_choice")
            if isinstance(self.tool_choice, str) and self.tool_choice not in ("none", "auto", "required"):
                raise APIError(400, "tool_choice is none, auto, required or a named function", "tool_choice")
            if isinstance(self.tool_choice, dict):
                function = self.tool_choice.get("function")
                name = function.get("name") if isinstance(function, dict) else None
                if not isinstance(name, str):  # {"function": "f"} was an AttributeError, a 500
                    raise APIError(400, 'a named tool_choice is {"type": "function", "function": {"name": "..."}}',
                                   "tool_choice")
                if name not in {t.function.name for t in self.tools}:
                    raise APIError(400, f"tool_choice names a tool that is not given: {name!r}", "tool_choice")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise APIError(400, "continue_final_message needs add_generation_prompt to be false (a reply "
                               "is either continued or started)", "add_generation_prompt")
            last = self.messages[-1]
            if last.role != "assistant" or last.tool_calls:
                raise APIError(400, "continue_final_message needs the last message to be the assistant's "
                               "reply so far (text, no tool calls)", "messages")
        elif not self.add_generation_prompt:
            raise APIError(400, "add_generation_prompt false is only supported with continue_final_message",
                           "add_generation_prompt")
        if self.guided_choice is not None:
            if not self.guided_choice or not all(self.guided_choice):
                raise APIError(400, "guided_choice takes a non-empty list of non-empty strings", "guided_choice")
            if len(self.guided_choice) > limits.max_choices:
                raise APIError(400, f"guided_choice takes at most {limits.max_choices} strings", "guided_choice")
            if sum(map(len, self.guided_choice)) > limits.max_total_chars:
                raise APIError(400, f"guided_choice holds more than {limits.max_total_chars} characters", "guided_choice")
        if self.guided_regex is not None and (not self.guided_regex or len(self.guided_regex) > limits.max_message_chars):
            raise APIError(400, f"guided_regex takes a pattern of 1 to {limits.max_message_chars} characters",
                           "guided_regex")
        if self.guided_json is not None:
            self.guided_schema()
        constraints = self.constraints()
        if len(constraints) > 1:
            raise APIError(400, f"{constraints[1]} cannot be combined with {constraints[0]}: a reply takes one "
                           "constraint", constraints[1])

    def constraints(self) -> list[str]:
        """The fields that constrain this request's reply (a forced tool call is one too)."""
        fmt = self.response_format
        return [name for name, on in (("response_format", fmt is not None and fmt.type != "text"),
                                      ("tool_choice", self.forced_tool is not None),
                                      ("guided_choice", self.guided_choice is not None),
                                      ("guided_regex", self.guided_regex is not None),
                                      ("guided_json", self.guided_json is not None)) if on]

    def guided_schema(self) -> dict[str, Any]:
        """guided_json's schema (vLLM takes it as an object or as a JSON string)."""
        schema = self.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise APIError(400, f"guided_json is not JSON: {e.msg} at character {e.pos}", "guided_json") from None
            except RecursionError:
                raise APIError(400, "guided_json nests too deeply", "guided_json") from None
        if not isinstance(schema, dict):
            raise APIError(400, "guided_json must be a JSON schema (an object)", "guided_json")
        return schema

    @staticmethod
    def text_of(m: Message, i: int) -> str:
        """A message's text: a string, or the text parts of a list (images and audio are refused)."""
        if m.content is None or isinstance(m.content, str):
            return m.content or ""
        parts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"message {i}: only text content parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)

    def plain_messages(self) -> list[dict]:
        """The conversation as chat.py renders it (developer counts as system, as OpenAI defines it)."""
        out = []
        for i, m in enumerate(self.messages):
            msg = {"role": "system" if m.role == "developer" else m.role, "content": self.text_of(m, i)}
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            out.append(msg)
        return out

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def forced_tool(self) -> str | None:
        """The function a call must be made to (a named tool_choice, or required with one tool)."""
        if isinstance(self.tool_choice, dict):
            return self.tool_choice["function"]["name"]
        if self.tool_choice == "required":
            return self.tools[0].function.name if len(self.tools) == 1 else "*"
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]  # OpenAI's forms; the lists must hold one prompt
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False

    def check(self, limits: Limits) -> None:
        self.check_common(limits)
        text = self.the_prompt()
        if (self.logprobs or 0) > limits.max_top_logprobs:
            raise APIError(400, f"logprobs must be at most {limits.max_top_logprobs}", "logprobs")
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if isinstance(text, str) and len(text) > limits.max_total_chars:
            raise APIError(400, f"the prompt has {len(text)} characters; at most {limits.max_total_chars}", "prompt")

    def the_prompt(self) -> str | list[int]:
        """The request's one prompt, text or token ids; OpenAI's batch forms (a list of strings, a list of token
        lists) are taken with one prompt in them, as the reply's one choice per sample answers one prompt."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise APIError(400, f"one prompt per request, and this one holds {len(self.prompt)} (send a string, "
                               "token ids, or a list of one of them)", "prompt")
            return self.prompt[0]
        return self.prompt


class TokenizeRequest(Body):
    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # a prompt's: what a completion's prompt starts with (vLLM's default)


class DetokenizeRequest(Body):
    model: str
    tokens: list[int]


class VoteRequest(Body):
    """A vote cast in the chat page's arena tab."""
    model_a: str
    model_b: str
    winner: Literal["a", "b", "tie", "both_bad"]
    prompt: str = ""
    length_a: int = Field(default=0, ge=0)
    length_b: int = Field(default=0, ge=0)
