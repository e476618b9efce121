"""Byte-level BPE: trained in Rust (rustbpe), encoded by tiktoken, with chat rendering and loss masks.

Text becomes integers losslessly: the text is split by the GPT-4 regex into chunks, each chunk is
UTF-8 bytes, and learned merges glue frequent byte pairs into tokens. After the learned tokens come
the special tokens; they never arise from `encode(text)`, whatever the text contains, so a user
cannot smuggle `<|assistant_start|>` into a prompt. Only the renderer places them.

A conversation is rendered as

    <|bos|><|system_start|>...<|system_end|><|user_start|>...<|user_end|>
    <|assistant_start|>...<|tool_call_start|>{json}<|tool_call_end|><|assistant_end|>
    <|tool_result_start|>...<|tool_result_end|><|assistant_start|>...<|assistant_end|>

and the loss mask is 1 exactly on the tokens the assistant writes (its content, its tool calls
and its closing <|assistant_end|>), 0 on everything the model only reads.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken

from .common import PocketError, atomic_write_json

# GPT-4's split pattern (cl100k): contractions, words, numbers of 1-3 digits, punctuation, spaces.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# The same with every digit on its own (as Llama 1 and 2 do): a small model then reads, copies and adds
# numbers digit by digit, the way column arithmetic is written, instead of learning ~1,000 number tokens.
DIGITS_SPLIT_PATTERN = GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
PATTERNS = {"gpt4": GPT4_SPLIT_PATTERN, "gpt4-digits": DIGITS_SPLIT_PATTERN}

# The registry of special tokens. Order is the id order after the learned tokens; new specials are
# taken from the reserved slots so that existing ids never move.
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; also the document separator when rows are packed
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|tool_call_start|>", "<|tool_call_end|>",
    "<|tool_result_start|>", "<|tool_result_end|>",
    "<|reward|>",  # the reward model reads its score here, appended after a completion
] + [f"<|reserved_{i}|>" for i in range(4)]

FORMAT = "pocketgpt-bpe-v1"
ROLES = ("system", "user", "assistant", "tool")


class Tokenizer:
    """A trained BPE: `ranks` maps token bytes to ids 0..n-1; specials follow."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = GPT4_SPLIT_PATTERN,
                 specials: list[str] | None = None):
        specials = specials or SPECIAL_TOKENS
        self.pattern = pattern
        self.ranks = ranks
        self.special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
        self.enc = tiktoken.Encoding(
            name="pocketgpt", pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self.bos_id = self.special_ids["<|bos|>"]

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = GPT4_SPLIT_PATTERN) -> Tokenizer:
        """Learn merges with rustbpe until the vocabulary (specials included) has `vocab_size` tokens."""
        import rustbpe

        n_learned = vocab_size - len(SPECIAL_TOKENS)
        if n_learned < 256:
            raise PocketError(f"vocab_size {vocab_size} is too small: need 256 byte tokens + "
                              f"{len(SPECIAL_TOKENS)} specials = {256 + len(SPECIAL_TOKENS)} at least")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), n_learned, pattern=pattern)
        # A small corpus can run out of pairs before reaching the size asked: the vocabulary is smaller.
        ranks = {bytes(b): r for b, r in trainer.get_mergeable_ranks()}
        return cls(ranks, pattern)

    # ------------------------------------------------------------------ encode / decode

    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_ids)

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids. Special-token strings in the text are encoded as plain text."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], threads: int = 2) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise PocketError(f"unknown special token {name!r}; known: {sorted(self.special_ids)}") from None

    def token_bytes(self) -> list[int]:
        """UTF-8 length of every token (0 for specials): turns a loss in nats/token into bits/byte."""
        lengths = [0] * self.vocab_size
        for b, r in self.ranks.items():
            lengths[r] = len(b)
        return lengths

    # ------------------------------------------------------------------ chat

    def render_conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """OpenAI-style messages -> (ids, mask); mask[i] is 1 where ids[i] is written by the assistant."""
        ids, mask = [self.bos_id], [0]

        def add(tokens: list[int], trained: int) -> None:
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        sp = self.special_ids
        for i, msg in enumerate(messages):
            role = msg.get("role")
            if role not in ROLES:
                raise PocketError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
            content = msg.get("content") or ""
            if not isinstance(content, str):
                raise PocketError(f"message {i}: content must be a string, got {type(content).__name__}")
            if role == "assistant":
                add([sp["<|assistant_start|>"]], 0)
                add(self.encode(content), 1)
                for call in msg.get("tool_calls") or []:
                    add([sp["<|tool_call_start|>"]], 1)
                    add(self.encode(tool_call_text(call)), 1)
                    add([sp["<|tool_call_end|>"]], 1)
                add([sp["<|assistant_end|>"]], 1)
            elif role == "tool":
                add([sp["<|tool_result_start|>"]] + self.encode(content) + [sp["<|tool_result_end|>"]], 0)
            else:
                add([sp[f"<|{role}_start|>"]] + self.encode(content) + [sp[f"<|{role}_end|>"]], 0)
        return ids, mask

    def render_for_completion(self, messages: list[dict]) -> list[int]:
        """The prompt for the assistant's next turn: the conversation so far + <|assistant_start|>."""
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation(messages)
        return ids + [self.special_ids["<|assistant_start|>"]]

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> None:
        """One JSON file holds everything needed to load: pattern, merges (by rank), specials."""
        by_rank = sorted(self.ranks.items(), key=lambda kv: kv[1])
        atomic_write_json(path, {
            "format": FORMAT,
            "pattern": self.pattern,
            "specials": list(self.special_ids),
            "ranks": [base64.b64encode(b).decode("ascii") for b, _ in by_rank],
        })

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise PocketError(f"no tokenizer at {path} (train one with `pocketgpt tokenizer train`)")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PocketError(f"{path}: not a valid tokenizer file ({e.msg} at line {e.lineno})") from None
        if obj.get("format") != FORMAT:
            raise PocketError(f"{path}: unknown tokenizer format {obj.get('format')!r}, expected {FORMAT!r}")
        ranks = {base64.b64decode(s): r for r, s in enumerate(obj["ranks"])}
        return cls(ranks, obj["pattern"], obj["specials"])

    def fingerprint(self) -> str:
        """A short hash that changes when the vocabulary changes: checkpoints record it."""
        import hashlib

        h = hashlib.sha256(self.pattern.encode())
        for b, r in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            h.update(len(b).to_bytes(2, "little") + b)
        h.update("\0".join(self.special_ids).encode())
        return h.hexdigest()[:16]


def tool_call_text(call: dict) -> str:
    """An OpenAI tool call rendered as the JSON the model writes: {"name": ..., "arguments": {...}}."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise PocketError(f"tool call arguments are not valid JSON: {args!r}") from None
    return json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)


def iter_texts_with_limit(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Stop a (possibly huge) text stream after `max_chars` characters: tokenizer training needs a sample."""
    seen = 0
    for t in texts:
        if seen >= max_chars:
            return
        t = t[: max_chars - seen]
        seen += len(t)
        yield t
