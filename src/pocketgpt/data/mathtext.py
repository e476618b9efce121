"""Worked arithmetic in prose: a pretraining source, and the step-by-step format tasks reuse.

A transformer spends the same compute on every token, so it cannot multiply 487 × 356 "in its
head" in one token; it can if the work is written out one small step per line, carries included.
Pretraining on such worked examples teaches the format; the arithmetic task's chain-of-thought
rendering uses the very same steps (`worked_steps`), so what the model saw in pretraining is what
it is asked to produce later.

    math_documents(3, seed=0)        # ['Xiao Ming has 25 books. A friend gives ...', ...]
    fact_documents(1, seed=0)        # ['Number facts.\n9 + 7 = 16\n12 × 3 = 36\n...']
    worked_steps(487, "×", 356)      # ['Multiply 487 by each digit ...', ..., 'So 487 × 356 = 173372.']
    word_problem(random.Random(0))   # WordProblem(question='小丽有18个橘子，送给同学5个。...', answer=13, ...)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPS = ("+", "-", "×")
PLACES = ("ones", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands", "millions",
          "ten millions", "hundred millions", "billions")


def apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "×": a * b}[op]


def _place(i: int) -> str:
    return PLACES[i] if i < len(PLACES) else f"10^{i} place"


def _digits(n: int) -> list[int]:
    """Digits of a non-negative integer, ones first (the order column arithmetic visits them)."""
    return [int(c) for c in reversed(str(n))]


# ---------------------------------------------------------------------------------------------
# Column arithmetic, one line per column.


def column_addition(numbers: list[int]) -> list[str]:
    """Add non-negative integers column by column, writing every carry."""
    columns = [_digits(n) for n in numbers]
    lines, carry = [], 0
    for i in range(max(len(c) for c in columns)):
        terms = [str(c[i]) for c in columns if i < len(c)] + ([f"{carry} (carry)"] if carry else [])
        total = sum(c[i] for c in columns if i < len(c)) + carry
        carry, digit = divmod(total, 10)
        sum_ = f"{' + '.join(terms)} = {total}" if len(terms) > 1 else terms[0]
        line = f"{_place(i).capitalize()}: {sum_}, write {digit}"
        lines.append(line + (f", carry {carry}." if carry else "."))
    if carry:
        lines.append(f"The last carry {carry} becomes the leading digit.")
    return lines


def column_subtraction(a: int, b: int) -> list[str]:
    """Subtract b from a (a >= b >= 0) column by column, writing every borrow."""
    top, bottom = _digits(a), _digits(b)
    lines, borrow = [], 0
    for i, digit in enumerate(top):
        below = bottom[i] if i < len(bottom) else 0
        value = digit - borrow
        start = f"{digit} - 1 (borrowed) = {value}" if borrow else f"{digit}"
        name = _place(i).capitalize()
        if value < below:
            lines.append(f"{name}: {start} is less than {below}, so borrow 1 from the {_place(i + 1)}: "
                         f"{value + 10} - {below} = {value + 10 - below}, write {value + 10 - below}.")
            borrow = 1
        else:
            prefix = f"{start}; " if borrow else ""
            lines.append(f"{name}: {prefix}{value} - {below} = {value - below}, write {value - below}.")
            borrow = 0
    return lines


def column_multiplication(a: int, b: int) -> list[str]:
    """Multiply a by each digit of b (carries written), then add the shifted partial products."""
    lines, partials = [], []
    a_digits = _digits(a)
    for i, d in enumerate(_digits(b)):
        steps, carry = [], 0
        for j, x in enumerate(a_digits):
            total = x * d + carry
            expr = f"{x} × {d}" + (f" + {carry}" if carry else "") + f" = {total}"
            carry, digit = divmod(total, 10)
            if j == len(a_digits) - 1:  # the leftmost column writes its whole total
                steps.append(f"{expr}, write {total}")
            else:
                steps.append(f"{expr}, write {digit}" + (f", carry {carry}" if carry else ""))
        partial = a * d * 10**i
        shift = f", shifted {i} place{'s' if i > 1 else ''}: {partial}" if i else ""
        lines.append(f"{a} × {d} ({_place(i)} digit of {b}): {'; '.join(steps)}. "
                     f"So {a} × {d} = {a * d}{shift}.")
        partials.append(partial)
    nonzero = [p for p in partials if p]
    if len(nonzero) > 1:
        lines.append(f"Add the partial products {' + '.join(map(str, nonzero))}:")
        lines += column_addition(nonzero)
    return lines


def worked_steps(a: int, op: str, b: int) -> list[str]:
    """A full worked solution of `a op b` for non-negative a, b; the last line states the result."""
    if op == "+":
        lines = [f"Add {a} and {b} column by column, starting from the ones."] + column_addition([a, b])
    elif op == "-" and a >= b:
        lines = [f"Subtract {b} from {a} column by column, starting from the ones."]
        lines += column_subtraction(a, b)
    elif op == "-":
        lines = [f"{a} is smaller than {b}, so compute {b} - {a} and make the result negative."]
        lines += column_subtraction(b, a) + [f"{b} - {a} = {b - a}, so the result is -{b - a}."]
    elif op == "×":
        # Multiply by the shorter number: fewer partial products to add.
        big, small = (a, b) if len(str(a)) >= len(str(b)) else (b, a)
        lines = [f"Multiply {big} by each digit of {small}, then add the partial products."]
        lines += column_multiplication(big, small)
    else:
        raise ValueError(f"unknown operator {op!r}; expected one of {OPS}")
    return lines + [f"So {a} {op} {b} = {apply(a, op, b)}."]


# ---------------------------------------------------------------------------------------------
# Word problems in English and Chinese.


@dataclass
class WordProblem:
    question: str
    a: int
    op: str
    b: int
    answer: int
    lang: str         # "en" or "zh"
    explanation: str  # one sentence that turns the story into the sum, e.g. "... 3 + 2 = 5."


EN_NAMES = ("Xiao Ming", "Anna", "Tom", "Li Hua", "Maria", "Sam")
EN_ITEMS = ("apples", "pencils", "books", "marbles", "cookies", "stickers")
ZH_NAMES = ("小明", "小红", "小华", "小丽", "小刚")
ZH_ITEMS = (("苹果", "个"), ("铅笔", "支"), ("书", "本"), ("糖", "颗"), ("橘子", "个"))
# Per operator: (question, explanation). Fields: n name, x item, m measure word, a, b, r result.
EN_TEMPLATES = {
    "+": ("{n} has {a} {x}. A friend gives {n} {b} more. How many {x} does {n} have now?",
          "{n} starts with {a} {x} and gets {b} more, so we add: {a} + {b} = {r}."),
    "-": ("{n} has {a} {x} and gives away {b}. How many {x} are left?",
          "{n} starts with {a} {x} and gives away {b}, so we subtract: {a} - {b} = {r}."),
    "×": ("{n} has {a} boxes with {b} {x} in each box. How many {x} are there in total?",
          "There are {a} boxes of {b} {x}, so we multiply: {a} × {b} = {r}."),
}
ZH_TEMPLATES = {
    "+": ("{n}有{a}{m}{x}，妈妈又给了{n}{b}{m}。{n}现在有几{m}{x}？",
          "{n}原来有{a}{m}{x}，又得到{b}{m}，所以用加法：{a} + {b} = {r}。"),
    "-": ("{n}有{a}{m}{x}，送给同学{b}{m}。{n}还剩几{m}{x}？",
          "{n}原来有{a}{m}{x}，送出{b}{m}，所以用减法：{a} - {b} = {r}。"),
    "×": ("{n}有{a}个盒子，每个盒子里有{b}{m}{x}。一共有多少{m}{x}？",
          "{a}个盒子，每盒{b}{m}，所以用乘法：{a} × {b} = {r}。"),
}


def word_problem(rng: random.Random, lang: str | None = None) -> WordProblem:
    """A one-step story problem with small numbers, in English or Chinese."""
    lang = lang or rng.choice(("en", "zh"))
    op = rng.choice(OPS)
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "×" else (rng.randint(3, 60), rng.randint(1, 40))
    if op == "-":
        a, b = max(a, b + 1), min(a, b)  # never give away more than you have
    r = apply(a, op, b)
    if lang == "en":
        question, explanation = EN_TEMPLATES[op]
        fields = {"n": rng.choice(EN_NAMES), "x": rng.choice(EN_ITEMS)}
    else:
        question, explanation = ZH_TEMPLATES[op]
        x, m = rng.choice(ZH_ITEMS)
        fields = {"n": rng.choice(ZH_NAMES), "x": x, "m": m}
    return WordProblem(question.format(a=a, b=b, **fields), a, op, b, r, lang,
                       explanation.format(a=a, b=b, r=r, **fields))


# ---------------------------------------------------------------------------------------------
# The pretraining source.

INTROS = ("Let us work out {p}.", "Worked example: {p}.", "How do we compute {p} by hand?",
          "Exercise: find {p}.", "Here is {p}, worked step by step.")


def random_operands(rng: random.Random, max_digits: int) -> tuple[int, int]:
    """Two operands of 1..max_digits digits each, at least one of them multi-digit."""
    while True:
        a, b = (rng.randint(0, 10 ** rng.randint(1, max_digits) - 1) for _ in range(2))
        if max(a, b) >= 10:
            return a, b


def calculator_drill(rng: random.Random, lines: int = 8) -> str:
    """Expressions typed into a calculator and its results read back, one per line.

    The operands are random, so nothing here can be memorised: the only way to predict the typed
    expression and the final result is to copy them from earlier in the line. This is the
    in-context copying that tool use needs (question -> call, result -> answer); a small model
    trained on a few million tokens does not learn it from prose alone.
    """
    out = [rng.choice(("Using a calculator:", "Calculator practice.", "Type each sum into the calculator."))]
    for _ in range(lines):
        op = rng.choice(OPS)
        a, b = random_operands(rng, 3)
        typed = f"{a}{'*' if op == '×' else op}{b}"
        r = apply(a, op, b)
        out.append(f"{a} {op} {b}: type {typed}, the calculator shows {r}, so {a} {op} {b} = {r}.")
    return "\n".join(out)


def math_documents(n: int, seed: int = 0) -> list[str]:
    """n documents of worked arithmetic: column + − × (2–5 digits), word problems (en/zh) and
    calculator drills."""
    rng = random.Random(f"mathtext:{seed}")
    docs = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            docs.append(calculator_drill(rng))
        elif kind < 0.45:
            p = word_problem(rng)
            answer = "Answer" if p.lang == "en" else "答案"
            sep = ": " if p.lang == "en" else "："
            docs.append(f"{p.question}\n{p.explanation}\n{answer}{sep}{p.answer}")
        else:
            op = rng.choice(OPS)
            a, b = random_operands(rng, 5 if op != "×" else 3)
            intro = rng.choice(INTROS).format(p=f"{a} {op} {b}")
            docs.append("\n".join([intro, *worked_steps(a, op, b)]))
    return docs


# ---------------------------------------------------------------------------------------------
# Number facts: the pretraining source of one-step sums and products.

FACT_HEADERS = ("Number facts.", "Sums and products to know by heart:", "Quick practice, one fact a line.",
                "口算练习：")


def number_facts(rng: random.Random, lines: int = 12) -> str:
    """A drill of one-step facts, one per line, each written larger operand first.

    Both places our model meets small-number arithmetic need facts that worked column arithmetic
    states too rarely to learn (DEVELOPERS.md measures both): a column step ("7 × 6 + 4 = 46",
    "8 + 9 + 1 = 18") and a Game of 24 move ("12 / 3 = 4", "8 * 3 = 24"), whose numbers run to 13
    on the table and to 24 after a move. A document writes × and ÷ as the arithmetic task does, or
    * and / as the Game of 24 does.
    """
    times, divide = rng.choice((("×", "÷"), ("*", "/")))
    out = [rng.choice(FACT_HEADERS)]
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.25:  # a column step: two digits and the carry
            x, y = rng.randint(0, 9), rng.randint(0, 9)
            if rng.random() < 0.5:
                out.append(f"{x} + {y} + 1 = {x + y + 1}")
            else:
                carry = rng.randint(1, 8)
                out.append(f"{x} {times} {y} + {carry} = {x * y + carry}")
            continue
        b = rng.randint(1, 13)
        a = rng.randint(1, 24 if kind < 0.5 else 13)
        a, b = max(a, b), min(a, b)
        op = rng.choice(("+", "-", "×", "÷"))
        if op == "÷":  # only exact quotients: a = b × q
            q = rng.randint(1, 13)
            out.append(f"{b * q} {divide} {b} = {q}")
        else:
            out.append(f"{a} {times if op == '×' else op} {b} = {apply(a, op, b)}")
    return "\n".join(out)


def fact_documents(n: int, seed: int = 0) -> list[str]:
    """n drills of number facts (`number_facts`)."""
    rng = random.Random(f"facts:{seed}")
    return [number_facts(rng) for _ in range(n)]
