"""Answering from retrieved passages: the context window as working memory.

    ask(lm, index, "When was Lisin founded?", k=3)   # -> RAGAnswer(text, cited chunk ids, hits)

The prompt (data/tasks/prompts.py: passages_prompt) numbers each passage by its chunk id and asks the
model to answer from them and to say "I don't know" when they do not hold the answer; SFT teaches
exactly this rendering (fact questions render "rag"), so our small models learn to read their context
instead of their memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.tasks.prompts import passages_prompt
from ..reason.lm import LM
from .index import Hit, Index


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
