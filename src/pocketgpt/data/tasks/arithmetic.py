"""Arithmetic: multi-digit + − × and one-step word problems in English and Chinese.

The Swiss-cheese case for tokens-to-think: a model that must answer 487 × 356 in one go usually
fails, the same model writing out the column steps (`mathtext.worked_steps`) usually succeeds,
and with a calculator it cannot fail.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ...errors import PocketError
from ..mathtext import OPS, apply, random_operands, word_problem, worked_steps
from .base import Example, Task, assistant, final_answer, numbers
from .tools import use_calculator

QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}.")


class Arithmetic(Task):
    name = "arithmetic"
    styles = ("direct", "cot", "tool", "check")
    answer_pattern = r"-?[0-9]{1,12}"

    def __init__(self, seed: int = 0, digits: int = 3, word_fraction: float = 0.25):
        if digits < 2:
            raise PocketError("digits must be >= 2 (the task is multi-digit arithmetic)")
        super().__init__(seed)
        self.digits = digits
        self.word_fraction = word_fraction

    def generate(self, rng: random.Random) -> Iterator[Example]:
        while True:
            if rng.random() < self.word_fraction:
                p = word_problem(rng)
                meta = {"a": p.a, "op": p.op, "b": p.b, "answer": p.answer, "kind": "word",
                        "lang": p.lang, "explanation": p.explanation}
                yield Example(p.question, str(p.answer), meta)
            else:
                op = rng.choice(OPS)
                a, b = random_operands(rng, self.digits)
                question = rng.choice(QUESTIONS).format(a=a, op=op, b=b)
                meta = {"a": a, "op": op, "b": b, "answer": apply(a, op, b), "kind": "column", "lang": "en"}
                yield Example(question, str(meta["answer"]), meta)

    def split_key(self, example: Example) -> str:
        # Two phrasings of the same sum are the same problem; a story is its own problem.
        m = example.meta
        return f"{m['a']} {m['op']} {m['b']}" if m["kind"] == "column" else example.question

    def check(self, example: Example, output: str) -> bool:
        found = numbers(final_answer(output))
        return bool(found) and found[-1] == example.meta["answer"]

    def cot(self, example: Example) -> str:
        m = example.meta
        if m["kind"] == "word":
            mark = "Answer: " if m["lang"] == "en" else "答案："
            return f"{m['explanation']}\n{mark}{m['answer']}"
        return "\n".join([*worked_steps(m["a"], m["op"], m["b"]), f"Answer: {m['answer']}"])

    def tool(self, example: Example) -> list[dict]:
        # The call repeats the sum as the question writes it ("872 - 65", × included): the same
        # tokens, so the model copies rather than transliterates, the easiest thing for a small model.
        m = example.meta
        return [*use_calculator(f"{m['a']} {m['op']} {m['b']}"), assistant(example.answer)]
