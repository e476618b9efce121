"""A chain of thought on the Game of 24 that plays by the rules, searches, and has a calculator.

The task's worked chain (`Game24.cot`) tries moves, judges the table each one leaves, and takes back
those it judges "impossible" before it keeps one judged "sure":

    13 + 9 = 22 (left: 4 6 22) impossible
    13 - 9 = 4 (left: 4 4 6) sure
    ...

Written in one go, each line's result is the model's own sum, and our small model's sums are mostly
false. Tree of Thoughts plays with a calculator (tot.py, `arithmetic="calculator"`), and the chain gets
the same tools, so that the two differ only in who runs the search: the model in its own text, or the
program around it. Each step of a chain is one request:

    the model writes   "13 - 9 "               (held to the moves on the table not yet taken back;
                                                decoding stops at "=")
    the calculator     "= 4 (left: 4 4 6)"     (the exact result and the numbers left)
    the model writes   " sure" or " impossible" (held to the two verdicts), and after "impossible"
                       its next move on the same table

The model continues its own reply each time (a prefilled assistant turn: `Request.continue_final`). A
table with no move left takes back the move that made it (a "back to" line). The chain ends with the
answer composed from the moves it kept once it keeps a move to a single number; a chain that runs out
of its `MAX_MOVES` or of moves answers "none", which does not vote in self-consistency. A backend that
ignores the constraints may write something else; then the chain ends with what the model wrote, which
the task's verifier judges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.tasks import Example, Task
from ..data.tasks.game24 import BACK, compose, kept_moves, move_openings, picked_move, show_state, verdict
from ..data.tasks.prompts import chat_messages
from .lm import LM, Request

# Move lines a chain may write, kept or taken back: as many as SFT's chains have (game24.search_chain: three
# kept, up to four taken back), which leaves room in the `small` model's 256-token context for the question,
# a "back to" line or two and the answer.
MAX_MOVES = 7


@dataclass
class Chain:
    messages: list[dict]  # the question (and worked examples) the chain answers
    numbers: list[int]
    seed: int | None
    lines: list[str] = field(default_factory=list)  # the finished lines
    path: list[tuple[int, ...]] = field(default_factory=list)  # the tables it stands on, the puzzle's first
    taken_back: list[set] = field(default_factory=list)  # per table on the path: the tables its moves led to
    move: tuple[str, tuple[int, ...]] | None = None  # the move line awaiting the model's verdict, and its table
    answered: bool = False
    ended: str | None = None  # what the model wrote where the chain stopped being moves

    def text(self) -> str:
        """The reply: the lines and the composed answer, or the model's own ending, or "Answer: none"."""
        if self.ended is not None:
            return "\n".join([*self.lines, self.ended])
        answer = compose(self.numbers, kept_moves(self.lines)) if self.answered else None
        return "\n".join([*self.lines, f"Answer: {answer or 'none'}"])

    def so_far(self) -> str:
        return "".join(line + "\n" for line in self.lines) + (self.move[0] if self.move else "")

    def running(self) -> bool:
        written = sum(not line.startswith(BACK) for line in self.lines)
        return (self.ended is None and not self.answered and bool(self.path)
                and (self.move is not None or written < MAX_MOVES))

    def open_moves(self) -> dict[str, tuple[int, ...]]:
        """The moves on the current table ("13 - 9 ") that do not lead where a move taken back led."""
        return {opening: table for opening, (_, table) in move_openings(self.path[-1]).items()
                if table not in self.taken_back[-1]}

    def back_up(self) -> None:
        """Off a table with no move left: take back the move that made it (at the puzzle's table: give up)."""
        while self.path and not self.open_moves():
            table = self.path.pop()
            self.taken_back.pop()
            if self.path:
                self.taken_back[-1].add(table)
                self.lines.append(BACK + show_state(self.path[-1]))

    def request(self, temperature: float) -> Request:
        messages = [*self.messages, {"role": "assistant", "content": self.so_far()}]
        if self.move:
            choices = verdict(self.move[1], True), verdict(self.move[1], False)
            longest = max(len(c.encode()) for c in choices)  # a token holds at least one byte: room for either
            return Request(messages, temperature=temperature, seed=self.seed, max_tokens=longest + 1,
                           continue_final=True, choices=choices)
        return Request(messages, temperature=temperature, seed=self.seed, max_tokens=24, stop=("=",),
                       continue_final=True, choices=tuple(self.open_moves()))

    def advance(self, written: str) -> None:
        """Take the model's move (the calculator finishes its line) or its verdict on the last one."""
        if self.move is None:
            self.move = picked_move(written, self.path[-1])
            if self.move is None:
                self.ended = written.strip()
            return
        (line, table), self.move = self.move, None
        if written.strip() == verdict(table, True).strip():
            self.lines.append(line + verdict(table, True))
            self.path.append(table)
            self.taken_back.append(set())
            self.answered = len(table) == 1
        elif written.strip() == verdict(table, False).strip():
            self.lines.append(line + verdict(table, False))
            self.taken_back[-1].add(table)
            self.back_up()
        else:
            self.lines.append(line)
            self.ended = written.strip()


def calculator_chains(lm: LM, task: Task, examples: list[Example], n: int, temperature: float, shots: int = 0,
                      think: bool = False, seed: int = 0) -> list[list[str]]:
    """`n` chains per example (greedy when `temperature` is 0), each move's result written by the calculator;
    every running chain of every example goes to the model as one batch per step."""
    chains = [[Chain(chat_messages(task, e, shots, "cot", think), e.meta["numbers"],
                     seed + i * n + j if temperature > 0 else None, path=[tuple(sorted(e.meta["numbers"]))],
                     taken_back=[set()])
               for j in range(n)] for i, e in enumerate(examples)]
    while running := [c for group in chains for c in group if c.running()]:
        for c, gens in zip(running, lm.chat_batch([c.request(temperature) for c in running])):
            c.advance(gens[0].text)
    return [[c.text() for c in group] for group in chains]
