"""Answering from retrieved passages: the context window as working memory.

    ask(lm, index, "When was Lisin founded?", k=3)               # -> RAGAnswer(text, cited chunk ids, hits)
    ask(lm, index, "When was Lisin founded?", k=3, quote=True)   # the answer is one sentence of the passages

The prompt (data/tasks/prompts.py: passages_prompt) numbers each passage by its chunk id and asks the
model to answer from them and to say "I don't know" when they do not hold the answer; SFT teaches
exactly this rendering (fact questions render "rag"), so our small models learn to read their context
instead of their memory.

Reading is two skills: finding the sentence that answers, and copying its words, names the model has
never seen included. A small model may have the first without the second (our `small` preset: it picks
the right sentence, then writes a name from memory). `quote` holds the reply to one of the passages'
sentences, verbatim (a choice constraint, vLLM's guided_choice): the model still chooses, token by
token, which sentence answers, but cannot misspell it, and the answer cites exactly the chunk it
quotes. The price: a quoting model never says "I don't know" (it answers from the best passage it got;
with no passage at all it does say so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..common import PocketError
from ..data.tasks.prompts import passages_prompt
from ..reason.lm import LM, Request
from .index import Hit, Index

NOT_FOUND = "I don't know."
# A sentence ends at . ! ? before whitespace (not inside "2.5"), at Chinese full stops, or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")


@dataclass
class RAGAnswer:
    text: str
    cited: list[str]  # the chunk ids the answer names ([id] marks) or quotes; none if it does neither
    hits: list[Hit]


def sentences(text: str) -> list[str]:
    """The sentences of a passage, in order, stripped: what a quoting answer may say."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def rag_request(question: str, hits: list[Hit], quote: bool = False, max_tokens: int = 128) -> Request:
    """The question after the retrieved passages; with `quote`, the reply is held to one of their sentences."""
    prompt = passages_prompt(question, [(h.chunk.id, h.chunk.text) for h in hits])
    if not quote:
        return Request([{"role": "user", "content": prompt}], max_tokens=max_tokens)
    # With nothing retrieved there is nothing to quote, and one thing left to say.
    choices = tuple(dict.fromkeys(s for h in hits for s in sentences(h.chunk.text))) or (NOT_FOUND,)
    longest = max(len(c.encode()) for c in choices)  # a token holds at least one byte: room for any choice
    return Request([{"role": "user", "content": prompt}], max_tokens=max(max_tokens, longest + 1), choices=choices)


def ask(lm: LM, index: Index, question: str, k: int = 3, retriever: str = "hybrid", max_tokens: int = 128,
        quote: bool = False) -> RAGAnswer:
    hits = index.search(question, k, retriever)
    [gen] = lm.chat_batch([rag_request(question, hits, quote, max_tokens)])[0]
    if quote and gen.finish_reason == "length":  # a fragment ("The") would pass for the quote
        raise PocketError(f"the passages leave {lm.name} no room to quote a whole sentence of them: ask with a "
                          "lower --k or an index of smaller chunks (--chunk-size)")
    text = gen.text.strip()
    shown = [h.chunk.id for h in hits]
    if quote:
        named = [h.chunk.id for h in hits if text in sentences(h.chunk.text)]
    else:
        named = [cid for cid in re.findall(r"\[([^\]]+)\]", text) if cid in shown]
    return RAGAnswer(text, named, hits)
