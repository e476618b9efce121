"""Exact arithmetic on untrusted text: a tokenizer and a recursive-descent parser over Fractions.

Model output is never `eval`-ed: only numbers, + - * / and parentheses are understood, anything
else (names, calls, `**`, `__import__('os')`) is a ValueError. The grammar:

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := "-" factor | "(" expression ")" | number
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

TOKEN = re.compile(r"\d+(?:\.\d+)?|[-+*/()]|\S")
SYMBOLS = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-", "x": "*", "X": "*"})
MAX_LENGTH = 500  # long enough for any sum we ask for, short enough to bound the work
MAX_DEPTH = 50    # nesting limit, so "((((...": is a ValueError rather than a RecursionError


@dataclass
class Parsed:
    value: Fraction
    numbers: list[Fraction]  # the literals in order of appearance (Game of 24 checks them)


def parse(text: str) -> Parsed:
    """Parse and evaluate an arithmetic expression exactly; ValueError if it is not one."""
    if len(text) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    return _Parser(text.translate(SYMBOLS)).parse()


def evaluate(text: str) -> Fraction:
    return parse(text).value


class _Parser:
    def __init__(self, text: str):
        self.tokens = TOKEN.findall(text)
        self.pos = 0
        self.depth = 0
        self.numbers: list[Fraction] = []

    def parse(self) -> Parsed:
        if not self.tokens:
            raise ValueError("empty expression")
        value = self.expression()
        if self.pos != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.pos]!r}")
        return Parsed(value, self.numbers)

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ValueError("unexpected end of expression")
        self.pos += 1
        return token

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value *= self.factor()
            else:
                divisor = self.factor()
                if divisor == 0:
                    raise ValueError("division by zero")
                value /= divisor
        return value

    def factor(self) -> Fraction:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ValueError("expression nested too deeply")
        token = self.take()
        if token == "-":
            value = -self.factor()
        elif token == "(":
            value = self.expression()
            if self.take() != ")":
                raise ValueError("missing ')'")
        elif token[0].isdigit():
            value = Fraction(token)
            self.numbers.append(value)
        else:
            raise ValueError(f"unexpected {token!r}")
        self.depth -= 1
        return value
