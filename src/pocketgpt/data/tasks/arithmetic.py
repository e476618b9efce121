"""Arithmetic: multi-digit + − × and one-step word problems in English and Chinese.

The Swiss-cheese case for tokens-to-think: a model that must answer 487 × 356 in one go usually
fails; one that has learnt to write out the column steps (`mathtext.worked_steps`) can succeed; with
a calculator it cannot fail. `scores` reads a worked reply back to say where it failed: reading the
operands' digits into the columns, or the digit sums themselves (our 5.9M model fails at both).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from ...errors import PocketError
from ..mathtext import OPS, PLACES, apply, random_operands, word_problem, worked_steps
from .base import Example, Task, assistant, copies_calculator, final_answer, last_number, numbers, tool_steps
from .expr import evaluate
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

    def answer_key(self, example: Example, output: str) -> str:
        return last_number(output)

    def trace_scores(self, example: Example, trace: list[dict], output: str) -> dict[str, float]:
        """Whether the model reached for the calculator at all (offered it, the speedrun's SFT model worked
        over half the sums out by hand instead), whether a call gave the result, and whether the answer
        copies it (14 of a GRPO model's 32 misses miscopied it: DEVELOPERS.md)."""
        results = [observation for _, observation in tool_steps(trace, "calculator")]
        right = any(numbers(r) == [example.meta["answer"]] for r in results)
        return {"called_calculator": float(bool(results)), "calculator_right": float(right),
                **copies_calculator(trace, output)}

    def scores(self, example: Example, output: str) -> dict[str, float]:
        """For a worked reply: the share of its column lines that read the operands' digits right,
        and the share of the sums it states that are true (each only where the reply has some)."""
        out = {}
        read, columns = columns_read(output, self.cot(example))
        if columns:
            out["columns_read_right"] = read / columns
        right, steps = true_steps(output)
        if steps:
            out["steps_true"] = right / steps
        return out

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


PLACE_LINE = re.compile(r"^(%s): " % "|".join(p.capitalize() for p in PLACES))
BORROWED = re.compile(r" - 1 \(borrowed\) = -?\d+; -?\d+")  # "6 - 1 (borrowed) = 5; 5 - 2" -> "6 - 2"
CARRIED = re.compile(r" \+ \d+ \(carry\)")
EQUATION = re.compile(r"(?<![\d.])(\d+(?: [-+×] \d+)+) = (-?\d+)(?!\d|\.\d)")
LABELS = re.compile(r" \((?:carry|borrowed)\)")  # "1 + 1 (carry) = 2" states the sum 1 + 1 = 2


def _column_reading(line: str) -> str:
    """What a column line reads from the numbers being worked on: the line up to its first result,
    without the carry or borrow (those follow from earlier columns, not from reading)."""
    line = CARRIED.sub("", BORROWED.sub("", line))
    return re.split(r" = |,", line, maxsplit=1)[0]


def _column_lines(text: str) -> list[tuple[str, str]]:
    """(place, what it reads) for each column line, the place numbered by occurrence: a
    multiplication adds its partial products column by column after working them out."""
    seen: dict[str, int] = {}
    out = []
    for line in text.splitlines():
        m = PLACE_LINE.match(line.strip())
        if m:
            seen[m.group(1)] = seen.get(m.group(1), 0) + 1
            out.append((f"{m.group(1)}#{seen[m.group(1)]}", _column_reading(line.strip())))
    return out


def columns_read(reply: str, reference: str) -> tuple[int, int]:
    """Of a reply's column lines ("Tens: 8 + 9 = 17, ..."), how many read the same digits as the
    reference working's line for that column; a column the reference does not have reads wrong.

    Reading a column means finding one digit of each operand earlier in the context, by its place:
    in-context retrieval, which a small model without induction heads does not do. Our 5.9M model
    fails here, and a tokenizer that gives every digit its own token does not fix it (DEVELOPERS.md:
    "Why chain of thought barely helps our model's arithmetic")."""
    want = dict(_column_lines(reference))
    lines = _column_lines(reply)
    return sum(want.get(place) == reading for place, reading in lines), len(lines)


def true_steps(reply: str) -> tuple[int, int]:
    """Of the sums a working states ("8 + 9 + 1 = 18", "7 × 6 + 4 = 46"), how many are true. The
    conclusion ("So ...") and the answer line are not steps."""
    right = total = 0
    for line in reply.splitlines():
        line = line.strip()
        if line.startswith(("So ", "Answer", "答案")):
            continue
        for expression, stated in EQUATION.findall(LABELS.sub("", line)):
            total += 1
            right += _true(expression, stated)
    return right, total


def _true(expression: str, stated: str) -> bool:
    try:
        return evaluate(expression) == int(stated)
    except ValueError:  # longer than the parser takes: model output is graded, never an error
        return False
