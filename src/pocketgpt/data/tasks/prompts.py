"""How a task's questions become prompts: a few-shot "fake document" for base models, a conversation
(solved examples as earlier turns) for assistants. Evaluation, SFT's knowledge probe and the
reasoning strategies all ask the same way."""

from __future__ import annotations

import random

from .base import Example, Task

ZERO_SHOT_COT = "Let's think step by step."


def demos(task: Task, shots: int, seed: int = 0) -> list[Example]:
    """Solved examples for the prompt: always from the train split, so they never leak a test answer."""
    pool = task.examples("train")
    return random.Random(seed).sample(pool, min(shots, len(pool)))


def fewshot_text(task: Task, example: Example, shots: int) -> str:
    """A base model continues documents: Q/A pairs, then the question and an open "A:"."""
    lines = [f"Q: {d.question}\nA: {d.answer}\n\n" for d in demos(task, shots)]
    return "".join(lines) + f"Q: {example.question}\nA:"


def chat_messages(task: Task, example: Example, shots: int, style: str, think: bool = False) -> list[dict]:
    """Solved examples in `style` as earlier turns, then the question; `think` appends the zero-shot
    chain-of-thought cue ("Let's think step by step.")."""
    messages = []
    for d in demos(task, shots):
        messages += task.render(d, style)
    question = f"{example.question}\n{ZERO_SHOT_COT}" if think else example.question
    return messages + [{"role": "user", "content": question}]


PASSAGES_INSTRUCTION = "Answer from the passages. If they do not say, answer \"I don't know.\""


def passages_prompt(question: str, passages: list[tuple[str, str]]) -> str:
    """(chunk id, text) passages, then the question: how retrieval-augmented answering asks (rag/answer.py),
    and how SFT renders a fact question in the "rag" style."""
    body = "\n".join(f"[{cid}] {text}" for cid, text in passages)
    return f"Passages:\n{body}\n\n{PASSAGES_INSTRUCTION}\nQuestion: {question}"
