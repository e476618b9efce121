"""Game of 24: combine four numbers from 1..13 with + - * / and parentheses to make 24.

The Tree-of-Thoughts benchmark: a left-to-right sampler often paints itself into a corner, a search
over partial solutions ("13 - 9 = 4 (left: 4 4 6)") does not. Our solver is that search, done
exhaustively and exactly with Fractions (8 / (3 - 8/3) = 24 needs exact thirds).

    solve24([4, 7, 8, 8])   # '8*(4+7-8)'
    solve24([3, 3, 8, 8])   # '8/(3-8/3)'
    solve24([1, 1, 1, 1])   # None

Tree of Thoughts asks the model itself for two things, and the task renders both as SFT data:

    propose  "Input: 4 4 6 8\nPossible next steps:"  ->  "4 + 8 = 12 (left: 4 6 12)\n6 - 4 = 2 (left: 2 4 8)\n..."
    value    "Evaluate if 4 6 12 can reach 24 (sure/likely/impossible)"  ->  "sure"
             (two numbers: "6 + 4 = 10\n6 - 4 = 2\n6 * 4 = 24\nsure"; one: "15 is not 24\nimpossible")

The labels come from the exact solver; at inference the search (reason/tot.py) uses only the model's
own proposals and votes. Moves keep to whole non-negative numbers, as people play the game.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from ...errors import PocketError
from .base import UNLIMITED, Example, Task, assistant, final_answer
from .expr import SYMBOLS, parse

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


def answer_expression(output: str) -> str:
    """The longest arithmetic run in a reply's final answer ("(13-9)*(10-4) = 24" -> the left side)."""
    runs = EXPRESSION.findall(final_answer(output))
    return max(runs, key=len).strip() if runs else ""


def moves(state: Sequence[int]) -> list[tuple[int, str, int, int, tuple[int, ...]]]:
    """Every whole, non-negative move on a table of numbers: (a, op, b, result, the numbers left),
    larger operand first; a move that repeats another (same a, op, b) is listed once."""
    out, seen = [], set()
    for i, j in itertools.combinations(range(len(state)), 2):
        a, b = max(state[i], state[j]), min(state[i], state[j])
        rest = [v for k, v in enumerate(state) if k not in (i, j)]
        results = [("+", a + b), ("-", a - b), ("*", a * b)] + ([("/", a // b)] if b and a % b == 0 else [])
        for op, result in results:
            if (a, op, b) not in seen:
                seen.add((a, op, b))
                out.append((a, op, b, result, tuple(sorted(rest + [result]))))
    return out


def move_openings(state: Sequence[int]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every move the calculator takes on a table (parse_proposals), as a chain or a proposal writes it up
    to its "=" ("13 - 9 "), each once, with the line the calculator finishes it to and the numbers it
    leaves: the moves the model may pick (reason/chain.py, reason/tot.py)."""
    out = {}
    for i, j in itertools.permutations(range(len(state)), 2):
        for op in "+-*/":
            opening = f"{state[i]} {op} {state[j]} "
            if opening not in out and _calculated(state[i], op, state[j]) is not None:
                [out[opening]] = parse_proposals(f"{opening}= 0", state, "calculator")
    return out


PICKED = re.compile(r"^\s*(\d+)\s*([-+*/×÷])\s*(\d+)\s*$")  # "13 - 9 ": a move up to its "="


def picked_move(written: str, state: Sequence[int]) -> tuple[str, tuple[int, ...]] | None:
    """The move a model picked by writing it up to its "=" ("13 - 9 "), finished by the calculator: its
    line and the numbers it leaves; None when what it wrote is no such move on this table."""
    m = PICKED.match(written)
    moved = parse_proposals(f"{m[1]} {m[2]} {m[3]} = 0", state, "calculator") if m else []
    return moved[0] if moved else None


@lru_cache(maxsize=None)
def _reaches_with_moves(state: tuple[int, ...]) -> bool:
    if len(state) == 1:
        return state[0] == TARGET
    return any(_reaches_with_moves(left) for *_, left in moves(state))


def can_reach_24(state: Sequence[int]) -> bool:
    """Whether these numbers can still make 24 with whole-number moves (`moves`): the value step's label,
    so that "sure" means the search can get there (3 3 8 8 needs 8/3 and counts as impossible)."""
    return _reaches_with_moves(tuple(sorted(state)))


def show_state(state: Sequence[int]) -> str:
    return " ".join(map(str, sorted(state)))


def move_line(a: int, op: str, b: int, result: int, left: Sequence[int]) -> str:
    return f"{a} {op} {b} = {result} (left: {show_state(left)})"


SURE, IMPOSSIBLE = " sure", " impossible"  # a searching chain's verdict on the table a move leaves
BACK = "back to "  # a chain that finds no move left on a table takes back the move that made it


def verdict(table: Sequence[int], sure: bool) -> str:
    """What a searching chain writes after a move's "(left: ...)": " sure" or " impossible", and at a
    single number the value step's working first (" 48 is not 24, impossible", " 24 = 24, sure"), so
    that the verdict follows from reading the number rather than from where the line stands."""
    word = SURE if sure else IMPOSSIBLE
    if len(table) == 1:
        return f" {table[0]} {'=' if sure else 'is not'} {TARGET},{word}"
    return word


def search_chain(numbers: Sequence[int], rng: random.Random, misses: int = 4) -> list[str]:
    """A worked chain that searches, as a person plays: at each table it may try a move or two that can
    no longer reach 24, judges each "impossible" and takes it back (the next move is made on the same
    table), then makes one that can, judged "sure":

        13 + 9 = 22 (left: 4 6 22) impossible
        13 - 9 = 4 (left: 4 4 6) sure
        ...

    The verdicts are the value step's labels (`can_reach_24`), so the chain teaches the model to judge
    each table it makes and to back up, which is what Tree of Thoughts' search does around the model.
    Up to `misses` moves are taken back in all: up to half of them at the last table (where a wrong
    number must be read as not 24), the rest spread over the first two at random, so that how many came
    before tells little of the next verdict: the table does."""
    state, lines = tuple(sorted(numbers)), []
    tries = [0, 0, rng.randint(0, misses // 2)]
    for _ in range(rng.randint(0, misses - tries[2])):
        tries[rng.randrange(2)] += 1
    for count in tries:
        options = moves(state)
        good = [m for m in options if can_reach_24(m[4])]
        bad = [m for m in options if not can_reach_24(m[4])]
        for a, op, b, result, left in rng.sample(bad, min(len(bad), count)):
            lines.append(move_line(a, op, b, result, left) + verdict(left, False))
        a, op, b, result, state = rng.choice(good)
        lines.append(move_line(a, op, b, result, state) + verdict(state, True))
    return lines


def kept_moves(lines: Sequence[str]) -> list[str]:
    """The move lines a chain stands on: a move judged impossible is taken back, and a bare "back to"
    line (a table with no move left) takes back the move before it."""
    kept = []
    for line in lines:
        if line.startswith(BACK):
            kept = kept[:-1]
        elif PROPOSAL.match(line) and IMPOSSIBLE not in line:
            kept.append(line)
    return kept


PROPOSED = 8  # moves a proposal lists (fewer when the table has fewer): SFT's proposals and ToT's proposer


def propose_prompt(state: Sequence[int]) -> str:
    return f"Input: {show_state(state)}\nPossible next steps:"


def value_prompt(state: Sequence[int]) -> str:
    return f"Evaluate if {show_state(state)} can reach 24 (sure/likely/impossible)"


PROPOSAL = re.compile(r"^\s*(\d+)\s*([-+*/×÷])\s*(\d+)\s*=\s*(\d+)")
VALUE_WEIGHTS = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}  # the ToT paper's vote weights


# What becomes of the result a proposed move claims ("a op b = c"); see parse_proposals.
MOVE_ARITHMETIC = ("calculator", "checked", "claimed")


def parse_proposals(text: str, state: Sequence[int], arithmetic: str = "claimed") -> list[tuple[str, tuple[int, ...]]]:
    """The moves a proposal lists, as (its line, the numbers left), in order, without repeats. A line
    whose operands are not on the table is not a move and is skipped. The result it claims is:

    - "claimed": taken as written: a wrong sum is the model's mistake and stays in the state (the final
      verdict catches it);
    - "checked": dropped with its line when false ("12 + 3 = 24"), as a calculator would show;
    - "calculator": replaced by the exact one: the model picks the two numbers and the operation, the
      calculator does the sum, as in the arithmetic task's tool rendering (a move that does not give a
      whole, non-negative number is skipped)."""
    if arithmetic not in MOVE_ARITHMETIC:
        raise PocketError(f"unknown move arithmetic {arithmetic!r}; use one of {', '.join(MOVE_ARITHMETIC)}")
    out, seen = [], set()
    for line in text.splitlines():
        m = PROPOSAL.match(line)
        if not m:
            continue
        a, op, b, result = _move(m)
        if arithmetic == "calculator":
            result = _calculated(a, op, b)
            if result is None:
                continue
        elif arithmetic == "checked" and _exact(a, op, b) != result:
            continue
        left = list(state)
        if a not in left:
            continue
        left.remove(a)
        if b not in left:
            continue
        left.remove(b)
        new = tuple(sorted(left + [result]))
        if (a, op, b, result) not in seen:
            seen.add((a, op, b, result))
            out.append((move_line(a, op, b, result, new), new))
    return out


def value_reply(state: Sequence[int]) -> str:
    """The value step's reply, worked where it is short: one number is 24 or not; two numbers try
    their moves until one makes 24 (the paper's value prompt works so); three or four get the verdict."""
    if len(state) == 1:
        return number_value(state[0], state[0] == TARGET)
    verdict = "sure" if can_reach_24(state) else "impossible"
    if len(state) == 2:
        tries = []
        for a, op, b, result, _ in moves(state):
            tries.append(f"{a} {op} {b} = {result}{number_check(result)}")
            if result == TARGET:
                break
        return "\n".join([*tries, verdict])
    return verdict


def number_check(x: int, is_24: bool | None = None) -> str:
    """What a value reply writes after a try's result: ", 24 = 24" or ", 46 is not 24". Read next to the
    number, as the chain's verdict is, it carries the verdict the reply ends with (a 5.9M-parameter model
    that wrote bare tries said "impossible" after "8 * 3 = 24")."""
    return f", {x} = 24" if (x == TARGET if is_24 is None else is_24) else f", {x} is not 24"


def number_value(x: int, sure: bool) -> str:
    """The value step's reply at one number, worked: "24 = 24\nsure", or "46 is not 24\nimpossible"."""
    return f"{x} = 24\nsure" if sure else f"{x} is not 24\nimpossible"


def _move(line: re.Match) -> tuple[int, str, int, int]:
    """A matched move line (PROPOSAL) as (a, op, b, the result it states), × and ÷ read as * and /."""
    return int(line[1]), line[2].replace("×", "*").replace("÷", "/"), int(line[3]), int(line[4])


def _exact(a: int, op: str, b: int) -> Fraction | None:
    """a op b as an exact fraction (None: division by zero)."""
    if op == "/":
        return Fraction(a, b) if b else None
    return Fraction({"+": a + b, "-": a - b, "*": a * b}[op])


def _calculated(a: int, op: str, b: int) -> int | None:
    """a op b as the calculator of a move gives it: a whole, non-negative number (None: not a move)."""
    exact = _exact(a, op, b)
    return int(exact) if exact is not None and exact.denominator == 1 and exact >= 0 else None


def parse_value(text: str) -> float:
    """A value reply's weight: the last of sure / likely / impossible it names (0 if none)."""
    words = re.findall(r"sure|likely|impossible", text.lower())
    return VALUE_WEIGHTS[words[-1]] if words else 0.0


def compose(numbers: Sequence[int], lines: Sequence[str]) -> str | None:
    """The expression a path of move lines builds from the puzzle's numbers ("4 + 8 = 12", "12 * 2 = 24"
    -> "(4+8)*2"), or None when a line uses a number not on the table. Bookkeeping only: the
    expression is what the lines say, right or wrong, and the task's verifier judges it."""
    table = [(v, str(v)) for v in numbers]
    for line in lines:
        m = PROPOSAL.match(line)
        if not m:
            return None
        a, op, b, result = _move(m)
        picked = []
        for want in (a, b):
            k = next((k for k, (v, _) in enumerate(table) if v == want), None)
            if k is None:
                return None
            picked.append(table.pop(k)[1])
        table.append((result, f"({picked[0]}{op}{picked[1]})"))
    expr = table[0][1] if len(table) == 1 else None
    return expr[1:-1] if expr and expr.startswith("(") and expr.endswith(")") else expr


class Game24(Task):
    name = "game24"
    styles = ("direct", "cot", "propose", "value")
    sizes = UNLIMITED  # bounded: there are 1362 solvable puzzles
    unique_working = False  # a puzzle has many solutions; `check` verifies the one given
    answer_pattern = r"[0-9+\-*/() ]{1,40}"

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
        expression = answer_expression(output)
        return bool(expression) and uses_and_makes_24(expression, example.meta["numbers"])

    def answer_key(self, example: Example, output: str) -> str:
        """The expression as `check` reads it, without spaces: "(13 - 9) * (10 - 4)" and "(13-9)*(10-4)"
        agree, "13*9" and "13+9" do not (the words-only key would merge them)."""
        return "".join(answer_expression(output).translate(SYMBOLS).split())

    def cot(self, example: Example) -> str:
        """The search's chain (`search_chain`), drawn per puzzle and draw; a puzzle that needs a fraction
        (3 3 8 8) has no whole-number moves to search and shows the solver's path."""
        numbers = example.meta["numbers"]
        if not can_reach_24(numbers):
            return "\n".join([*example.meta["steps"], f"Answer: {example.answer}"])
        rng = random.Random(f"{example.question}:cot:{example.meta.get('draw', 0)}")
        lines = search_chain(numbers, rng)
        return "\n".join([*lines, f"Answer: {compose(numbers, kept_moves(lines))}"])

    def scores(self, example: Example, output: str) -> dict[str, float]:
        """Whether the first three moves a reply keeps ("13 - 9 = 4 ...", not those it takes back) make a
        whole game on the table (each takes two numbers that are there, the result as stated goes back; a
        reply without moves makes none), and the share of their results that are true: where a chain fails,
        in its choice of numbers or in its sums."""
        lines = [m for m in map(PROPOSAL.match, kept_moves(output.splitlines())) if m]
        if not lines:
            return {"three_moves_on_the_table": 0.0}
        table, legal = example.meta["numbers"], 0
        for m in lines[:3]:
            moved = parse_proposals(m.string, table, "claimed")  # [] when a number is not on the table
            if not moved:
                break
            table, legal = moved[0][1], legal + 1
        true = [_exact(a, op, b) == result for a, op, b, result in map(_move, lines)]
        return {"three_moves_on_the_table": float(legal == 3), "moves_true": sum(true) / len(true)}

    def render(self, example: Example, style: str = "direct") -> list[dict]:
        """propose and value: several exchanges about different positions of the puzzle in one
        conversation (more positions per puzzle; the first exchange is exactly what the search asks).
        A puzzle drawn again (meta "draw" > 0, sft.py's `redrawn`) visits other positions."""
        if style not in ("propose", "value"):
            return super().render(example, style)
        draw = example.meta.get("draw", 0)
        rng = random.Random(f"{example.question}:{style}" + (f":{draw}" if draw else ""))
        messages = []
        if style == "propose":
            for size in (4, rng.choice((3, 2))):
                state = self._visited_state(example, rng, size)
                messages += [{"role": "user", "content": propose_prompt(state)}, assistant(self.proposal(state, rng))]
        else:
            for size in rng.sample((4, 3, 3, 2, 2, 1), 4):
                state = self._visited_state(example, rng, size)
                messages += [{"role": "user", "content": value_prompt(state)}, assistant(value_reply(state))]
        return messages

    @staticmethod
    def _visited_state(example: Example, rng: random.Random, size: int) -> tuple[int, ...]:
        """A table of `size` numbers a search could stand at: moves into the puzzle, half the time on a
        path that still reaches 24 (so both labels are common), else random ones."""
        state = tuple(sorted(example.meta["numbers"]))
        for _ in range(4 - size):
            options = moves(state)
            good = [m for m in options if can_reach_24(m[4])]
            state = rng.choice(good if good and rng.random() < 0.5 else options)[4]
        return state

    @staticmethod
    def proposal(state: Sequence[int], rng: random.Random, count: int = PROPOSED) -> str:
        """Up to `count` distinct moves in random order, one that still reaches 24 among them if any does."""
        options = moves(state)
        rng.shuffle(options)
        good = next((m for m in options if can_reach_24(m[4])), None)
        chosen = options[:count]
        if good is not None and good not in chosen:
            chosen[rng.randrange(len(chosen))] = good
        return "\n".join(move_line(a, op, b, result, left) for a, op, b, result, left in chosen)
