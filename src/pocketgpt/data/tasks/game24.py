"""Game of 24: combine four numbers from 1..13 with + - * / and parentheses to make 24.

The Tree-of-Thoughts benchmark: a left-to-right sampler often paints itself into a corner, a search
over partial solutions ("13 - 9 = 4 (left: 4 4 6)") does not. Our solver is that search, done
exhaustively and exactly with Fractions (8 / (3 - 8/3) = 24 needs exact thirds).

    solve24([4, 7, 8, 8])   # '8*(4+7-8)'
    solve24([3, 3, 8, 8])   # '8/(3-8/3)'
    solve24([1, 1, 1, 1])   # None
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from .base import UNLIMITED, Example, Task, final_answer
from .expr import parse

TARGET = 24
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
ATOM = 3


@dataclass(frozen=True)
class Item:
    """A number on the table, with the expression that made it."""
    value: Fraction
    expr: str
    precedence: int = ATOM


def _combinations(x: Item, y: Item) -> Iterator[tuple[Item, Item, str, Fraction]]:
    """Every (left, right, op, result) two numbers can make; subtraction and division both ways."""
    yield x, y, "+", x.value + y.value
    yield x, y, "*", x.value * y.value
    for a, b in ((x, y), (y, x)):
        yield a, b, "-", a.value - b.value
        if b.value:
            yield a, b, "/", a.value / b.value


def _join(a: Item, op: str, b: Item, value: Fraction) -> Item:
    """a op b with only the parentheses precedence needs ("(13-9)*(10-4)", not "((13-9)*(10-4))")."""
    p = PRECEDENCE[op]
    left = f"({a.expr})" if a.precedence < p else a.expr
    right = f"({b.expr})" if b.precedence < p or (b.precedence == p and op in "-/") else b.expr
    return Item(value, f"{left}{op}{right}", p)


@lru_cache(maxsize=None)
def _reaches_target(values: tuple[Fraction, ...]) -> bool:
    """Can these numbers (sorted) make 24? Cached: many puzzles share the same sub-positions."""
    if len(values) == 1:
        return values[0] == TARGET
    for i, j in itertools.combinations(range(len(values)), 2):
        rest = [v for k, v in enumerate(values) if k not in (i, j)]
        for *_, result in _combinations(Item(values[i], ""), Item(values[j], "")):
            if _reaches_target(tuple(sorted(rest + [result]))):
                return True
    return False


def solve24_steps(numbers: Sequence[int]) -> tuple[list[str], str] | None:
    """The search's path, as ToT-style steps ("13 - 9 = 4 (left: 4 4 6)"), and the expression."""
    items = [Item(Fraction(n), str(n)) for n in numbers]
    if not _reaches_target(tuple(sorted(i.value for i in items))):
        return None
    steps = []
    while len(items) > 1:
        for i, j in itertools.combinations(range(len(items)), 2):
            rest = [item for k, item in enumerate(items) if k not in (i, j)]
            move = next(((a, b, op, r) for a, b, op, r in _combinations(items[i], items[j])
                         if _reaches_target(tuple(sorted([x.value for x in rest] + [r])))), None)
            if move:
                a, b, op, result = move
                items = rest + [_join(a, op, b, result)]
                left = " ".join(_show(x.value) for x in sorted(items, key=lambda x: x.value))
                steps.append(f"{_show(a.value)} {op} {_show(b.value)} = {_show(result)} (left: {left})")
                break
    return steps, items[0].expr


def solve24(numbers: Sequence[int]) -> str | None:
    """An expression using each number once that equals 24 exactly, or None if there is none."""
    solution = solve24_steps(numbers)
    return solution[1] if solution else None


def _show(x: Fraction) -> str:
    return str(x) if x.denominator == 1 else f"({x})"


def uses_and_makes_24(expression: str, numbers: Sequence[int]) -> bool:
    """Whether the expression uses exactly these numbers (as a multiset) and equals 24 exactly."""
    try:
        parsed = parse(expression)
    except ValueError:
        return False
    return sorted(parsed.numbers) == sorted(Fraction(n) for n in numbers) and parsed.value == TARGET


EXPRESSION = re.compile(r"[\d\s+\-*/×÷−().]*\d[\d\s+\-*/×÷−().]*")


class Game24(Task):
    name = "game24"
    styles = ("direct", "cot")
    sizes = UNLIMITED  # bounded: there are 1362 solvable puzzles
    unique_working = False  # a puzzle has many solutions; `check` verifies the one given

    def generate(self, rng: random.Random) -> Iterator[Example]:
        puzzles = list(itertools.combinations_with_replacement(range(1, 14), 4))
        rng.shuffle(puzzles)
        for puzzle in puzzles:
            solution = solve24_steps(puzzle)
            if solution:
                steps, expression = solution
                question = (f"Use the numbers {', '.join(map(str, puzzle))} and +, -, *, / with parentheses "
                            f"to make 24. Use each number exactly once.")
                yield Example(question, expression, {"numbers": list(puzzle), "steps": steps})

    def check(self, example: Example, output: str) -> bool:
        """The longest arithmetic run in the final answer ("(13-9)*(10-4) = 24" -> the left side)."""
        runs = EXPRESSION.findall(final_answer(output))
        return bool(runs) and uses_and_makes_24(max(runs, key=len), example.meta["numbers"])

    def cot(self, example: Example) -> str:
        return "\n".join([*example.meta["steps"], f"Answer: {example.answer}"])
