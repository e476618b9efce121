"""Answering from retrieved passages: the context window as working memory.

    passages_prompt(question, hits)    # "Passages:\n[Lisin#0] Lisin is a city ...\n\nQuestion: ...\n..."
    ask(lm, index, "When was Lisin founded?", k=3)   # -> RAGAnswer(text, cited chunk ids, hits)

The prompt numbers each passage by its chunk id and asks the model to answer from them and to say
"I don't know" when they do not hold the answer; SFT teaches exactly this rendering (data/tasks
renders "rag"), so our small models learn to read their context instead of their memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..reason.lm import LM
from .index import Hit, Index

INSTRUCTION = "Answer from the passages. If they do not say, answer \"I don't know.\""


def passages_prompt(question: str, passages: list[tuple[str, str]]) -> str:
    """(chunk id, text) passages, then the question."""
    body = "\n".join(f"[{cid}] {text}" for cid, text in passages)
    return f"Passages:\n{body}\n\n{INSTRUCTION}\nQuestion: {question}"


@dataclass
class RAGAnswer:
    text: str
    cited: list[str]  # the chunk ids the answer names, in order ([id] marks), else every passage shown
    hits: list[Hit]


def ask(lm: LM, index: Index, question: str, k: int = 3, retriever: str = "hybrid", max_tokens: int = 128) -> RAGAnswer:
    hits = index.search(question, k, retriever)
    prompt = passages_prompt(question, [(h.chunk.id, h.chunk.text) for h in hits])
    [gen] = lm.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens)
    shown = [h.chunk.id for h in hits]
    named = [cid for cid in re.findall(r"\[([^\]]+)\]", gen.text) if cid in shown]
    return RAGAnswer(gen.text.strip(), named or shown, hits)
