"""The tokenizer protocol, and its two implementations: ours and Hugging Face's.

Text becomes integers losslessly. Everything in pocketgpt talks to a tokenizer through the small
protocol of `Tokenizer`: encode ordinary text (never a special token, whatever the text holds, so a
user cannot smuggle `<|assistant_start|>` or `<|im_start|>` into a prompt), decode to text or
bytes, the bytes of every id (grammar libraries need them), the vocabulary size, and special ids by
name. Which special tokens a model uses, and what they mean, only the chat template knows
(chat.py); specials may sit anywhere in the id space.

- `BPETokenizer` is ours: byte-level BPE trained in Rust (rustbpe), encoded by tiktoken. The text
  is split by the GPT-4 regex into chunks, each chunk is UTF-8 bytes, and learned merges glue
  frequent byte pairs into tokens. Our special tokens follow the learned ones.
- `HFTokenizer` wraps the Hugging Face `tokenizers` library: the tokenizer.json of an imported
  model (SmolLM2, Qwen2, Llama 3), or one built from a GGUF file's vocabulary and merges.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from .common import PocketError, atomic_write_json, atomic_write_text

# GPT-4's split pattern (cl100k): contractions, words, numbers of 1-3 digits, punctuation, spaces.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# The same with every digit on its own (as Llama 1 and 2 do): a small model then reads, copies and adds
# numbers digit by digit, the way column arithmetic is written, instead of learning ~1,000 number tokens.
DIGITS_SPLIT_PATTERN = GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
PATTERNS = {"gpt4": GPT4_SPLIT_PATTERN, "gpt4-digits": DIGITS_SPLIT_PATTERN}

# Our special tokens. Order is the id order after the learned tokens; new specials are taken from
# the reserved slots so that existing ids never move. Their meaning lives in chat.py.
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


class Tokenizer(ABC):
    """What every tokenizer offers. `special_ids` maps each special token's string to its id."""

    special_ids: dict[str, int]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Ids run from 0 to vocab_size - 1 (a model's embedding may have more rows, never fewer)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids. A special token's string in the text is encoded as plain text."""

    def encode_batch(self, texts: list[str], threads: int = 2) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self.token_bytes()
        return b"".join(table[i] for i in ids)

    @abstractmethod
    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for (a special token: its string's UTF-8), indexed by id."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash that changes when the vocabulary changes: checkpoints record it."""

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write one JSON file from which `Tokenizer.load` rebuilds this tokenizer."""

    def special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise PocketError(f"unknown special token {name!r}; known: {sorted(self.special_ids)}") from None

    @cached_property
    def visible_token_bytes(self) -> list[bytes]:
        """token_bytes with every special token's bytes empty: what a reply shows of it (vLLM's
        skip_special_tokens), so that text sent back never imitates a special token."""
        specials = set(self.special_ids.values())
        return [b"" if i in specials else b for i, b in enumerate(self.token_bytes())]

    def byte_lengths(self) -> list[int]:
        """Bytes per id, 0 for specials: turns a loss in nats/token into bits/byte."""
        specials = set(self.special_ids.values())
        return [0 if i in specials else len(b) for i, b in enumerate(self.token_bytes())]

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        """Either kind from its JSON file (or a directory holding tokenizer.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise PocketError(f"no tokenizer at {path} (train one with `pocketgpt tokenizer train`)")
        text = path.read_text(encoding="utf-8")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PocketError(f"{path}: not a valid tokenizer file ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            try:
                return BPETokenizer.from_json(obj)
            except (KeyError, TypeError, ValueError, binascii.Error) as e:  # a field missing, a bad pattern
                raise PocketError(f"{path}: not a valid tokenizer file ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict) and "model" in obj and "added_tokens" in obj:
            return HFTokenizer.from_str(text, str(path))
        raise PocketError(f"{path}: unknown tokenizer format {obj.get('format') if isinstance(obj, dict) else None!r}, "
                          f"expected {FORMAT!r} or a Hugging Face tokenizer.json")


class BPETokenizer(Tokenizer):
    """A trained BPE: `ranks` maps token bytes to ids 0..n-1; our specials follow."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = GPT4_SPLIT_PATTERN,
                 specials: list[str] | None = None):
        import tiktoken

        specials = specials or SPECIAL_TOKENS
        self.pattern = pattern
        self.ranks = ranks
        self.special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
        self.enc = tiktoken.Encoding(
            name="pocketgpt", pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_ids
        )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = GPT4_SPLIT_PATTERN) -> BPETokenizer:
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

    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_ids)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], threads: int = 2) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        table = [b""] * self.vocab_size
        for b, r in self.ranks.items():
            table[r] = b
        for s, i in self.special_ids.items():
            table[i] = s.encode()
        return table

    def token_bytes(self) -> list[bytes]:
        return self._token_bytes

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
    def from_json(cls, obj: dict) -> BPETokenizer:
        ranks = {base64.b64decode(s): r for r, s in enumerate(obj["ranks"])}
        return cls(ranks, obj["pattern"], obj["specials"])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.pattern.encode())
        for b, r in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            h.update(len(b).to_bytes(2, "little") + b)
        h.update("\0".join(self.special_ids).encode())
        return h.hexdigest()[:16]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters: the alphabet byte-level vocabularies
    (GPT-2, SmolLM2, Qwen2, Llama 3) write their tokens in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`, behind our protocol.

    `tokenizers` would split added special tokens out of any text it encodes; with
    `encode_special_tokens` on, their strings in the text are encoded as ordinary text instead.
    A trained byte-level vocabulary may lack a token for some bytes (SmolLM2 has none for a few
    control characters and for the lead bytes of Unicode planes 4-11): such bytes cannot be encoded
    by that model and are dropped, as transformers drops them.
    """

    def __init__(self, hf, source: str = "tokenizer.json"):
        self.hf = hf
        self.hf.encode_special_tokens = True
        self.source = source
        added = hf.get_added_tokens_decoder()
        self.special_ids = {t.content: i for i, t in added.items() if t.special}
        self._added = {i: t.content for i, t in added.items()}

    @classmethod
    def from_str(cls, text: str, source: str = "tokenizer.json") -> HFTokenizer:
        from tokenizers import Tokenizer as HF

        try:
            return cls(HF.from_str(text), source)
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise PocketError(f"{source}: not a valid Hugging Face tokenizer ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], threads: int = 2) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        """Byte-level vocabularies (GPT-2, SmolLM2, Qwen2, Llama 3) map printable characters back to
        bytes; SentencePiece-style ones (Llama 2, TinyLlama) write a space as '▁' and raw bytes as <0xAB>."""
        spec = json.loads(self.hf.to_str())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        alphabet = {c: b for b, c in bytes_to_unicode().items()}
        table = []
        for i in range(self.vocab_size):
            piece = self.hf.id_to_token(i)
            if piece is None:  # a hole in the id space
                table.append(b"")
            elif i in self._added:
                table.append(self._added[i].encode())
            elif byte_level:
                table.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece)
                             else piece.encode())
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("▁", " ").encode())
        return table

    def token_bytes(self) -> list[bytes]:
        return self._token_bytes

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.hf.to_str())

    def fingerprint(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]


