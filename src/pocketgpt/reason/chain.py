"""A chain of thought on the Game of 24 that plays by the rules, whose arithmetic a calculator writes.

The task's worked chain is three move lines and the answer ("13 - 9 = 4 (left: 4 4 6)" ...). Written
in one go, each line's result is the model's own sum, and our small model's sums are mostly false,
so its chains fail whatever moves it picks. Tree of Thoughts plays with a calculator (tot.py,
`arithmetic="calculator"`): of the moves its proposer lists, those not on the table are skipped and
the calculator works out the rest. The chain gets the same two tools, so that the two differ only in
search against writing left to right:

    the model writes   "13 - 9 "              (held to the moves on the table; decoding stops at "=")
    the calculator     "= 4 (left: 4 4 6)\\n"  (the exact result and the numbers left)
    the model writes   "6 * 4 "  ...           (it continues its own reply: Request.continue_final)

The move is held to the table by constrained decoding (`Request.choices`, vLLM's guided_choice): the
chain's counterpart of skipping a proposal off the table is the model's most likely move that is on
it. After three moves the answer is composed from the lines (as Tree of Thoughts composes its path's).
A backend that ignores the constraint may still write something else; then the chain ends with what
the model wrote, which the task's verifier judges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..data.tasks import Example, Task
from ..data.tasks.game24 import compose, move_openings, parse_proposals
from ..data.tasks.prompts import chat_messages
from .lm import LM, Request

MOVES = 3  # four numbers, three moves
PICKED = re.compile(r"^\s*(\d+)\s*([-+*/×÷])\s*(\d+)\s*$")  # "13 - 9 ": a move up to its "="


@dataclass
class Chain:
    messages: list[dict]  # the question (and worked examples) the chain answers
    numbers: list[int]
    seed: int | None
    state: tuple[int, ...] = ()
    lines: list[str] = field(default_factory=list)
    ended: str | None = None  # what the model wrote where the chain stopped being moves

    def text(self) -> str:
        """The reply: the moves and the composed answer, or the moves and the model's own ending."""
        if self.ended is not None:
            return "\n".join([*self.lines, self.ended])
        return "\n".join([*self.lines, f"Answer: {compose(self.numbers, self.lines) or ''}"])


def calculator_chains(lm: LM, task: Task, examples: list[Example], n: int, temperature: float, shots: int = 0,
                      think: bool = False, seed: int = 0) -> list[list[str]]:
    """`n` chains per example (greedy when `temperature` is 0), each move's result written by the calculator;
    every unfinished chain of every example goes to the model as one batch per move."""
    chains = [[Chain(chat_messages(task, e, shots, "cot", think), e.meta["numbers"],
                     seed + i * n + j if temperature > 0 else None, tuple(sorted(e.meta["numbers"])))
               for j in range(n)] for i, e in enumerate(examples)]
    for _ in range(MOVES):
        running = [c for group in chains for c in group if c.ended is None]
        requests = [Request([*c.messages, {"role": "assistant", "content": _so_far(c)}], temperature=temperature,
                            seed=c.seed, max_tokens=24, stop=("=",), continue_final=True,
                            choices=tuple(move_openings(c.state))) for c in running]
        for c, gens in zip(running, lm.chat_batch(requests) if requests else []):
            _advance(c, gens[0].text)
    return [[c.text() for c in group] for group in chains]


def _so_far(chain: Chain) -> str:
    return "".join(line + "\n" for line in chain.lines)


def _advance(chain: Chain, written: str) -> None:
    """Take the model's next move and let the calculator finish its line, or end the chain."""
    m = PICKED.match(written)
    moved = parse_proposals(f"{m[1]} {m[2]} {m[3]} = 0", chain.state, "calculator") if m else []
    if not moved:
        chain.ended = written.strip()
        return
    line, chain.state = moved[0]
    chain.lines.append(line)
