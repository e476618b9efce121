"""Constrained output: JSON schemas, regular expressions, Lark grammars and a choice among given
strings, as logits processors.

At every step llguidance computes which tokens can continue a valid output (a bitmask over the
vocabulary, built from the bytes of every token: `Tokenizer.token_bytes`, so imported tokenizers
work too); the processor sets every other logit to -inf before sampling. Once the grammar is
complete only the end of the turn is allowed.

    constraint = Constraints(chat, vocab_size).json_schema({"type": "object", ...})
    engine.submit(prompt, params, processor_factory=constraint.processor)

Building llguidance's view of a tokenizer takes about a second, and compiling a grammar can take
longer than a decoding step: both are done once and cached (a compiled matcher is deep-copied for
each request).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from .chat import ChatTemplate
from .common import PocketError


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads: token bytes, specials, eos, and an encoder of bytes."""

    def __init__(self, chat: ChatTemplate, vocab_size: int):
        tok = chat.tokenizer
        table = tok.token_bytes()
        self.tokens = list(table) + [b""] * (vocab_size - len(table))  # the model may have spare rows
        self.special_token_ids = sorted(set(tok.special_ids.values()) | set(range(len(table), vocab_size)))
        self.eos_token_id = chat.stop_ids[0]
        self.bos_token_id = None
        self._encode = tok.encode

    def __call__(self, text: bytes) -> list[int]:
        return self._encode(text.decode("utf-8", errors="replace"))


class Constraints:
    """The grammars one model can be held to; `json_schema`, `json_object`, `regex` and `lark` give a
    `Constraint` whose `processor()` is a fresh logits processor for one sequence."""

    def __init__(self, chat: ChatTemplate, vocab_size: int):
        import llguidance
        import llguidance.torch  # noqa: F401  (bitmask helpers)

        self.chat, self.vocab_size = chat, vocab_size
        self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(chat, vocab_size)),
                                            n_vocab=vocab_size)
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    def _compile_uncached(self, grammar: str):
        import llguidance
        import llguidance.torch as llt

        matcher = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        # A grammar that admits no text at all ([^\x00-\U0010FFFF]) compiles, and fails at its first mask:
        # found here, it is a bad request, not an empty reply.
        probe = matcher.deep_copy()
        if not probe.is_error():
            llt.fill_next_token_bitmask(probe, llt.allocate_token_bitmask(1, self.vocab_size), 0)
        if probe.is_error():
            raise PocketError(f"invalid constraint: {probe.get_error()}")
        return matcher

    def grammar(self, grammar: str) -> Constraint:
        return Constraint(self._compile(grammar), self.vocab_size)

    def json_schema(self, schema: dict | str) -> Constraint:
        import llguidance

        try:
            schema = json.loads(schema) if isinstance(schema, str) else schema
            return self.grammar(llguidance.LLMatcher.grammar_from_json_schema(compact(schema)))
        except (ValueError, TypeError, RecursionError) as e:
            raise PocketError(f"invalid JSON schema: {e}") from None

    def json_object(self) -> Constraint:
        return self.json_schema({"type": "object"})

    def regex(self, pattern: str) -> Constraint:
        import llguidance

        return self.grammar(llguidance.LLMatcher.grammar_from_regex(pattern))

    def lark(self, grammar: str) -> Constraint:
        import llguidance

        return self.grammar(llguidance.LLMatcher.grammar_from_lark(grammar))

    def tool_call(self, tools: list[tuple[str, dict]]) -> Constraint:
        return self.lark(tool_call_grammar(self.chat, tools))

    def choice(self, options: list[str]) -> Constraint:
        """Exactly one of `options`, verbatim (vLLM's guided_choice): the model picks, token by token."""
        return self.lark(choice_grammar(options))


def compact(schema: dict) -> str:
    """The schema as llguidance reads it, asking for compact JSON (", " and ": ", no other whitespace):
    a free choice of whitespace is a place for a small model to wander off and never come back."""
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema is an object")
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return json.dumps({**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}}, sort_keys=True)


def tool_call_grammar(chat: ChatTemplate, tools: list[tuple[str, dict]]) -> str:
    """A Lark grammar for one tool call in the chat template's own markers: {"name": ..., "arguments": ...}
    with the arguments held to the function's JSON schema (tool_choice "required" or a named function)."""
    def marker(m: int | str) -> str:
        return f"<[{m}]>" if isinstance(m, int) else json.dumps(m)

    open_, close = (marker(m) for m in chat.tool_call_markers)
    rules = [f"start: {' | '.join(f'call{i}' for i in range(len(tools)))}"]
    for i, (name, schema) in enumerate(tools):
        head = json.dumps('{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ', ensure_ascii=False)
        rules.append(f'call{i}: {open_} {head} args{i} "}}" {close}')
        rules.append(f"args{i}: %json {compact(schema)}")
    return "\n".join(rules)


def choice_grammar(options: list[str]) -> str:
    """A Lark grammar whose only sentences are `options` (JSON string literals are Lark's too)."""
    if not options or not all(isinstance(o, str) and o for o in options):
        raise PocketError("a choice needs at least one option, and no option may be empty")
    return "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in dict.fromkeys(options))


class Constraint:
    """A compiled grammar; each `processor()` call starts a new output against it."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self.matcher.deep_copy(), self.vocab_size)


class GrammarProcessor:
    """A logits processor: feeds the tokens sampled so far to the matcher, masks what cannot follow."""

    def __init__(self, matcher, vocab_size: int):
        import llguidance.torch as llt

        self.matcher, self.consumed, self.vocab_size = matcher, 0, vocab_size
        self.bitmask = llt.allocate_token_bitmask(1, vocab_size)
        self._fill = llt.fill_next_token_bitmask

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in generated[self.consumed:]:
            self.matcher.consume_token(token)
        self.consumed = len(generated)
        if self.matcher.is_error():  # cannot happen for tokens it allowed; fail loudly rather than wander
            raise RuntimeError(f"constraint error: {self.matcher.get_error()}")
        self._fill(self.matcher, self.bitmask, 0)
        # One bit per token, little-endian within each 32-bit word (llguidance's layout); unpacking with
        # numpy avoids llguidance.torch's torch.compile'd kernel, which costs seconds on its first call.
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")[:logits.shape[-1]]
        allowed = torch.from_numpy(bits.astype(bool)).to(logits.device)  # masked_fill on CUDA/MPS wants it there
        return logits.float().masked_fill(~allowed, float("-inf"))
