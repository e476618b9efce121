"""Chat templates: the one place that knows a model's conversation format and its special tokens.

A template turns OpenAI-style messages into token ids and a loss mask (1 exactly on what the
assistant writes: its content, its tool calls and its end-of-turn token), builds the prompt for the
next assistant turn, and knows how the model stops, how it calls a tool and where a reward model
reads its score. It also knows how a plain document starts and ends, for base models. Nothing
outside this module looks a special token up by name.

Two formats:

ours (`PocketTemplate`, the models pocketgpt trains):

    <|bos|><|system_start|>...<|system_end|><|user_start|>...<|user_end|>
    <|assistant_start|>...<|tool_call_start|>{json}<|tool_call_end|><|assistant_end|>
    <|tool_result_start|>...<|tool_result_end|><|assistant_start|>...<|assistant_end|>

ChatML (`ChatMLTemplate`: SmolLM2, Qwen2), with tool calls the way Qwen2.5 and Hermes write them:

    <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n
    <|im_start|>assistant\n...<tool_call>\n{json}\n</tool_call><|im_end|>\n
    <|im_start|>user\n<tool_response>\n...\n</tool_response><|im_end|>\n<|im_start|>assistant\n...<|im_end|>\n

A template is stored in a model directory's config.json as a small JSON spec (`spec()`), and
rebuilt from it with `ChatTemplate.from_spec`; a directory from before templates existed is ours.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod

from .common import PocketError
from .tokenizer import SPECIAL_TOKENS, Tokenizer

ROLES = ("system", "user", "assistant", "tool")


def tool_call_text(call: dict) -> str:
    """An OpenAI tool call rendered as the JSON the model writes: {"name": ..., "arguments": {...}}.
    Arguments given as a JSON string (OpenAI's form) are written as they are, after checking that they are
    an object: a model's own call comes back as it wrote it, and an exported Jinja template, which cannot
    parse JSON, renders the same ids."""
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise PocketError(f"a tool call needs the function's name as a string, got {name!r:.60}")
    if isinstance(args, str) and not args.strip():
        args = {}
    if isinstance(args, str):
        try:
            parsed = json.loads(args, parse_constant=_not_json)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            raise PocketError(f"tool call arguments are not valid JSON: {args!r:.80}") from None
        if not isinstance(parsed, dict):
            raise PocketError(f"tool call arguments must be a JSON object, got {args!r:.80}")
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + args + "}"
    if not isinstance(args, dict):
        raise PocketError(f"tool call arguments must be an object (or a JSON string of one), got {args!r:.80}")
    try:
        return json.dumps({"name": name, "arguments": args}, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PocketError(f"tool call arguments are not JSON: {e}") from None


def _not_json(constant: str):
    """NaN and Infinity, which Python's json reads and JSON does not have."""
    raise ValueError(constant)


def check_messages(messages: list[dict]) -> None:
    """Each message a {"role", "content"} the templates render: one error naming the first that is not.
    An assistant message may carry OpenAI's fine-tuning `weight`: 0 leaves it out of the loss."""
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PocketError(f"message {i}: expected an object with a role and content, got {msg!r:.60}")
        if msg.get("role") not in ROLES:
            raise PocketError(f"message {i}: unknown role {msg.get('role')!r}; expected one of {ROLES}")
        if not isinstance(msg.get("content", ""), str | None):  # 0 was read as empty
            raise PocketError(f"message {i}: content must be a string, got {type(msg['content']).__name__}")
        if "weight" in msg and (msg["role"] != "assistant" or msg["weight"] not in (0, 1)
                                or isinstance(msg["weight"], bool)):
            raise PocketError(f"message {i}: weight is 0 or 1, on an assistant message (0: not trained on), "
                              f"got {msg['weight']!r:.20} on a {msg['role']} message")
        calls = msg.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):  # an AttributeError later
            raise PocketError(f"message {i}: tool_calls must be a list of objects, got {calls!r:.60}")
        for call in calls:
            try:
                tool_call_text(call)  # arguments that are not JSON: said here, where the message is known
            except PocketError as e:
                raise PocketError(f"message {i}: {e}") from None


class ChatTemplate(ABC):
    """The conversation format of one model, over its tokenizer."""

    name: str

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ documents (base models)

    @property
    @abstractmethod
    def document_start(self) -> list[int]:
        """Ids before a document's text (a base model's prompt starts with them)."""

    @property
    @abstractmethod
    def document_end(self) -> list[int]:
        """Ids after a document's text when documents are packed into training rows."""

    @property
    @abstractmethod
    def document_stops(self) -> tuple[int, ...]:
        """A base model that writes one of these has finished the document."""

    @property
    def pad_id(self) -> int:
        """Any id will do for padding (padding is masked); a document boundary is the natural one."""
        return (self.document_start + self.document_end + list(self.document_stops))[0]

    def document(self, text: str) -> list[int]:
        """A prompt for a base model: the document so far."""
        return self.document_start + self.tokenizer.encode(text)

    def documents(self, texts: list[str], threads: int = 2) -> list[list[int]]:
        """Whole documents, as they are packed for pretraining."""
        return [self.document_start + ids + self.document_end
                for ids in self.tokenizer.encode_batch(texts, threads=threads)]

    # ------------------------------------------------------------------ conversations

    @abstractmethod
    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """OpenAI-style messages -> (ids, mask); mask[i] is 1 where ids[i] is written by the assistant."""

    def prompt(self, messages: list[dict], continue_final: bool = False) -> list[int]:
        """The prompt for the assistant's next turn, after every message (a trailing assistant message is a
        finished turn, as OpenAI and vLLM take it). With `continue_final` the trailing assistant message is
        the turn so far, which the model continues (vLLM's continue_final_message; a prefilled reply): its
        text goes in as ordinary text, unclosed."""
        ends_with_reply = bool(messages) and messages[-1].get("role") == "assistant"
        if continue_final and not ends_with_reply:
            raise PocketError("continue_final needs the last message to be the assistant's reply so far")
        if continue_final and messages[-1].get("tool_calls"):
            raise PocketError("continue_final continues a reply's text; the last message holds tool calls")
        head = self.render(messages[:-1] if continue_final else messages)[0] + self.assistant_header
        return head + self.tokenizer.encode(messages[-1].get("content") or "") if continue_final else head

    @property
    @abstractmethod
    def assistant_header(self) -> list[int]:
        """What opens an assistant turn (the end of every prompt)."""

    @property
    @abstractmethod
    def stop_ids(self) -> tuple[int, ...]:
        """Decoding an assistant turn stops at any of these (the end of turn comes first)."""

    def reply(self, text: str) -> list[int]:
        """An assistant turn's content as the model would write it, end of turn included."""
        return self.tokenizer.encode(text) + [self.stop_ids[0]]

    @property
    @abstractmethod
    def reward_suffix(self) -> list[int]:
        """Appended after a finished reply; a reward model reads its score at the last position."""

    # ------------------------------------------------------------------ tools

    @abstractmethod
    def split_tool_call(self, tokens: list[int]) -> tuple[str, str] | None:
        """A finished assistant turn that calls a tool -> (the text before the call, the call's JSON text)."""

    @property
    def tool_call_token(self) -> int | None:
        """The special token that opens a tool call, or None where calls are written as text (ChatML):
        banning it keeps a model from calling tools that a request does not offer."""
        opener = self.tool_call_markers[0]
        return opener if isinstance(opener, int) else None

    @property
    @abstractmethod
    def tool_call_markers(self) -> tuple[int | str, int | str]:
        """What opens and closes a tool call the model writes: a special token's id or a text."""

    @property
    @abstractmethod
    def tool_result_delimiters(self) -> tuple[list[int], list[int]]:
        """The ids around a tool's result after the calling turn: (before the result, after it up to
        and including the next assistant header)."""

    # ------------------------------------------------------------------ storage

    @abstractmethod
    def spec(self) -> dict:
        """What config.json stores to rebuild this template."""

    @staticmethod
    def from_spec(tokenizer: Tokenizer, spec: dict | None) -> ChatTemplate:
        spec = spec or {"name": "pocketgpt"}
        kind = spec.get("name")
        if kind == "pocketgpt":
            return PocketTemplate(tokenizer)
        if kind == "chatml":
            return ChatMLTemplate(tokenizer, spec.get("default_system"), spec.get("bos"), spec.get("eos"))
        raise PocketError(f"unknown chat template {kind!r}; known: pocketgpt, chatml")

    # ------------------------------------------------------------------ helpers for subclasses

    def _encode_split(self, head: str, body: str) -> tuple[list[int], list[int]]:
        """encode(head + body) cut where `body` begins: the two parts tokenize exactly as the whole
        text does (as a Jinja template renders it), and a token straddling the cut counts as head."""
        ids = self.tokenizer.encode(head + body)
        table, cut, n = self.tokenizer.token_bytes(), len(head.encode()), 0
        for k, i in enumerate(ids):
            if n >= cut:
                return ids[:k], ids[k:]
            n += len(table[i])
        return ids, []


class PocketTemplate(ChatTemplate):
    """Our format: every role boundary is a special token; one <|bos|> per conversation."""

    name = "pocketgpt"
    SPECIALS = tuple(t for t in SPECIAL_TOKENS if not t.startswith("<|reserved_"))  # the ones it uses

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        sp = tokenizer.special
        self.bos = sp("<|bos|>")
        self.role_ids = {r: (sp(f"<|{r}_start|>"), sp(f"<|{r}_end|>")) for r in ("system", "user", "assistant")}
        self.role_ids["tool"] = (sp("<|tool_result_start|>"), sp("<|tool_result_end|>"))
        self.call = (sp("<|tool_call_start|>"), sp("<|tool_call_end|>"))
        self.reward = sp("<|reward|>")

    document_start = property(lambda self: [self.bos])
    document_end = property(lambda self: [])
    document_stops = property(lambda self: (self.bos,))
    assistant_header = property(lambda self: [self.role_ids["assistant"][0]])
    stop_ids = property(lambda self: (self.role_ids["assistant"][1], self.bos))
    reward_suffix = property(lambda self: [self.reward])

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        check_messages(messages)
        ids, mask = [self.bos], [0]

        def add(tokens: list[int], trained: int) -> None:
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        enc = self.tokenizer.encode
        for msg in messages:
            start, end = self.role_ids[msg["role"]]
            content = msg.get("content") or ""
            if msg["role"] == "assistant":
                trained = msg.get("weight", 1)
                add([start], 0)
                add(enc(content), trained)
                for call in msg.get("tool_calls") or []:
                    add([self.call[0], *enc(tool_call_text(call)), self.call[1]], trained)
                add([end], trained)
            else:
                add([start, *enc(content), end], 0)
        return ids, mask

    def split_tool_call(self, tokens: list[int]) -> tuple[str, str] | None:
        start, end = self.call
        if start not in tokens or end not in tokens:
            return None
        a, b = tokens.index(start), tokens.index(end)
        return self.tokenizer.decode(tokens[:a]), self.tokenizer.decode(tokens[a + 1:b])

    tool_call_markers = property(lambda self: self.call)

    @property
    def tool_result_delimiters(self) -> tuple[list[int], list[int]]:
        start, end = self.role_ids["tool"]
        return [start], [end, *self.assistant_header]

    def spec(self) -> dict:
        return {"name": self.name}


class ChatMLTemplate(ChatTemplate):
    """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n. Role names and newlines are ordinary text.

    `default_system` is the system message the model's own template inserts when a conversation has
    none (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
    """

    name = "chatml"
    CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"

    def __init__(self, tokenizer: Tokenizer, default_system: str | None = None, bos: str | None = None,
                 eos: str | None = None):
        super().__init__(tokenizer)
        self.default_system = default_system
        self.im_start, self.im_end = tokenizer.special("<|im_start|>"), tokenizer.special("<|im_end|>")
        # A document ends with the tokenizer's end-of-text token; some tokenizers name their
        # end-of-turn token (<|im_end|>) as eos, so <|endoftext|> is preferred when it exists.
        specials = tokenizer.special_ids
        self.bos_name, self.eos_name = bos, eos
        self.bos = specials[bos] if bos else None
        end_name = "<|endoftext|>" if "<|endoftext|>" in specials else eos
        if end_name is None:
            raise PocketError("a ChatML tokenizer needs an end-of-text token (<|endoftext|> or an eos)")
        self.doc_end = tokenizer.special(end_name)

    document_start = property(lambda self: [self.bos] if self.bos is not None else [])
    document_end = property(lambda self: [self.doc_end])
    document_stops = property(lambda self: (self.doc_end, self.im_end))
    stop_ids = property(lambda self: (self.im_end, self.doc_end))
    reward_suffix = property(lambda self: [])  # read at the reply's <|im_end|>

    @property
    def assistant_header(self) -> list[int]:
        return [self.im_start, *self.tokenizer.encode("assistant\n")]

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        check_messages(messages)
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        ids: list[int] = []
        mask: list[int] = []
        newline = self.tokenizer.encode("\n")
        for msg in messages:
            role, content = msg["role"], msg.get("content") or ""
            if role == "assistant":
                calls = [self.CALL_OPEN + tool_call_text(c) + self.CALL_CLOSE for c in msg.get("tool_calls") or []]
                body = "\n".join(([content] if content else []) + calls)
                head_ids, body_ids = self._encode_split("assistant\n", body)
                ids += [self.im_start, *head_ids, *body_ids, self.im_end, *newline]
                mask += [0] * (1 + len(head_ids)) + [msg.get("weight", 1)] * (len(body_ids) + 1) + [0] * len(newline)
                continue
            if role == "tool":
                role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
            part = [self.im_start, *self.tokenizer.encode(f"{role}\n{content}"), self.im_end, *newline]
            ids += part
            mask += [0] * len(part)
        return ids, mask

    def split_tool_call(self, tokens: list[int]) -> tuple[str, str] | None:
        text = self.tokenizer.decode([t for t in tokens if t not in self.stop_ids])
        m = re.search(re.escape(self.CALL_OPEN.strip()) + r"\s*(.*?)\s*" + re.escape(self.CALL_CLOSE.strip()),
                      text, re.S)
        if not m:
            return None
        return text[:m.start()].rstrip("\n"), m.group(1)

    tool_call_markers = property(lambda self: (self.CALL_OPEN, self.CALL_CLOSE))

    @property
    def tool_result_delimiters(self) -> tuple[list[int], list[int]]:
        enc = self.tokenizer.encode
        return ([*enc("\n"), self.im_start, *enc("user\n<tool_response>\n")],
                [*enc("\n</tool_response>"), self.im_end, *enc("\n"), *self.assistant_header])

    def spec(self) -> dict:
        return {"name": self.name, "default_system": self.default_system, "bos": self.bos_name, "eos": self.eos_name}
