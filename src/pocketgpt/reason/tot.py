"""Tree of Thoughts on the Game of 24 (Yao et al. 2023): search over partial solutions instead of
writing one left to right, with the model itself proposing moves and judging positions.

    propose  "Input: 4 4 6 8\nPossible next steps:" -> "4 + 8 = 12 (left: 4 6 12)\n..."  (one greedy
             proposal, or `proposals` samples whose moves are merged)
    value    "Evaluate if 4 6 can reach 24 (sure/likely/impossible)" -> "6 + 4 = 10, 10 is not 24\n...\nsure",
             `value_samples` votes weighted sure 20 / likely 1 / impossible 0.001 and summed, as in the paper

Breadth-first search keeps the `beam` best positions after each of the three moves; depth-first
search follows the best child first, drops positions valued below "likely" and backs up, within a
budget of expansions. Every puzzle of a batch searches at once: each round's proposals, and each
round's value questions, go to the model as one batch, and a position's value is asked once and
remembered (the paper's value cache).

Each proposed line is a claim, "a op b = c", and a small model slips in its arithmetic ("13 - 9 = 2",
"12 * 9 = 24"); written freely, its list also repeats moves and names numbers that are not on the
table (of its first eight lines, three or four were moves). By default (`arithmetic="calculator"`)
the search gives the model the chain of thought's tools (chain.py): a proposal is written move by
move, the model picking each one among the moves on the table it has not listed (`Proposal`), the
calculator writing its result and the numbers left, up to PROPOSED moves; a value reply at two
numbers is written try by try, the model picking each try and, once the calculator has written its
result, saying whether that is 24 and trying on or giving its verdict (`Judgement`). The model still
chooses every move, every try and every verdict. `"checked"` keeps the model's own arithmetic and
free text and drops a false claim, as a calculator would show it; `"claimed"` takes every claim as
written (an unchecked slip that lands on 24 looks like a win to any judge).

`oracle=True` replaces the model's values by the exact solver's verdict: an ablation that shows
how much better the search would be with a perfect judge, never the headline figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.tasks import get_task
from ..data.tasks.game24 import (
    PROPOSED,
    can_reach_24,
    compose,
    move_openings,
    number_check,
    number_value,
    parse_proposals,
    parse_value,
    picked_move,
    propose_prompt,
    value_prompt,
)
from ..data.tasks.prompts import demos
from .lm import LM, Request
from .vote import Answer

MOVES = 3  # four numbers, three moves
PRUNE_BELOW = 1.0  # DFS drops positions whose votes sum below one "likely"


@dataclass(frozen=True)
class Node:
    state: tuple[int, ...]  # the numbers on the table
    lines: tuple[str, ...] = ()  # the moves that led here
    value: float = 0.0


@dataclass
class Proposal:
    """One proposal for a position, written move by move with a calculator: the model picks each move
    (held to the moves on the table it has not listed yet; decoding stops at "="), the calculator writes
    its result and the numbers left, until it lists PROPOSED moves or the table has no other."""
    messages: list[dict]  # the propose prompt (after any solved examples)
    state: tuple[int, ...]
    seed: int | None
    lines: list[str] = field(default_factory=list)
    stopped: bool = False  # the model wrote something that is not a move on the table

    def open_moves(self) -> list[str]:
        listed = {left for _, left in parse_proposals("\n".join(self.lines), self.state, "claimed")}
        return [opening for opening, (_, left) in move_openings(self.state).items() if left not in listed]

    def writing(self) -> bool:
        return not self.stopped and len(self.lines) < PROPOSED and bool(self.open_moves())

    def request(self, temperature: float) -> Request:
        so_far = "".join(line + "\n" for line in self.lines)
        return Request([*self.messages, {"role": "assistant", "content": so_far}], temperature=temperature,
                       seed=self.seed, max_tokens=24, stop=("=",), continue_final=True, choices=tuple(self.open_moves()))

    def advance(self, written: str) -> None:
        move = picked_move(written, self.state)
        if move is None:  # a backend that ignores the constraint wrote something else: the list ends there
            self.stopped = True
        else:
            self.lines.append(move[0])


@dataclass
class Judgement:
    """One vote on a position, the value step's reply (`value_reply`) written with a calculator: at two
    numbers the model tries moves (held to those on the table it has not tried), the calculator writes
    each result, and the model says whether it is 24 and tries on or gives its verdict; at one number it
    says whether that is 24; at three or four it gives the verdict alone. Every choice is the model's,
    held to the forms SFT taught."""
    messages: list[dict]  # the value prompt (after any solved examples)
    state: tuple[int, ...]
    seed: int | None
    lines: list[str] = field(default_factory=list)  # "6 + 4 = 10, 10 is not 24", one per move tried
    pending: tuple[str, int] | None = None  # the try the calculator just finished ("6 * 4 = 24") and its result
    tried: set[int] = field(default_factory=set)  # the results tried: a move whose result is here is not offered
    weight: float | None = None  # the verdict's weight (VALUE_WEIGHTS) once given

    def untried(self) -> list[str]:
        return [opening for opening, (_, left) in move_openings(self.state).items() if left[0] not in self.tried]

    def choices(self) -> tuple[str, ...]:
        """What the model may write next: the whole reply at one number; the first try at two, then after
        each try its check, followed by the next try or the verdict; the verdict alone at three or four."""
        if len(self.state) == 1:
            return tuple(number_value(self.state[0], sure) for sure in (True, False))
        if len(self.state) > 2:
            return "sure", "impossible"
        if self.pending is None:
            return tuple(self.untried())
        result = self.pending[1]
        no = number_check(result, False) + "\n"
        return (number_check(result, True) + "\nsure", no + "impossible", *(no + o for o in self.untried()))

    def request(self, temperature: float) -> Request:
        so_far = "".join(line + "\n" for line in self.lines) + (self.pending[0] if self.pending else "")
        choices = self.choices()
        longest = max(len(c.encode()) for c in choices)  # a token holds at least one byte
        return Request([*self.messages, {"role": "assistant", "content": so_far}], temperature=temperature,
                       seed=self.seed, max_tokens=longest + 1, continue_final=True, choices=choices)

    def advance(self, written: str) -> None:
        if self.pending is not None:
            check, _, written = written.partition("\n")
            self.lines.append(self.pending[0] + check)
            self.pending = None
        move = picked_move(written, self.state) if len(self.state) == 2 else None
        if move is not None:
            result = move[1][0]
            self.pending = f"{written.strip()} = {result}", result
            self.tried.add(result)
        else:  # a verdict (or, from a backend that ignores the constraint, whatever it names)
            self.weight = parse_value(written)


class Searcher:
    """The model's two roles, batched over many positions, with the value cache."""

    def __init__(self, lm: LM, value_samples: int = 3, temperature: float = 0.7, oracle: bool = False,
                 seed: int = 0, shots: int = 0, arithmetic: str = "calculator", max_tokens: int = 160,
                 proposals: int = 1):
        self.lm, self.value_samples, self.temperature = lm, value_samples, temperature
        self.oracle, self.seed, self.arithmetic, self.max_tokens = oracle, seed, arithmetic, max_tokens
        self.proposals = proposals
        self.values: dict[tuple[int, ...], float] = {}
        # Solved examples of each role as earlier turns, for a model not trained on them (the paper
        # prompts with 1 proposal example and 8 value examples).
        game = get_task("game24")
        self.demos = {role: [m for d in demos(game, shots) for m in game.render(d, role)]
                      for role in ("propose", "value")}

    def children(self, nodes: list[Node]) -> list[list[Node]]:
        """Each node's proposed moves, in the order the model listed them. With several proposals (sampled
        at the search's temperature, as the paper's proposer is) their moves are merged, each once."""
        sampled = self.proposals > 1
        drafts = [Proposal([*self.demos["propose"], {"role": "user", "content": propose_prompt(n.state)}], n.state,
                           self.seed + i * self.proposals + k if sampled else None)
                  for i, n in enumerate(nodes) for k in range(self.proposals)]
        temperature = self.temperature if sampled else 0.0
        if self.arithmetic == "calculator":
            while todo := [d for d in drafts if d.writing()]:
                for d, gens in zip(todo, self.lm.chat_each([d.request(temperature) for d in todo])):
                    d.advance(gens[0].text if gens else "")  # nothing, where it outgrew the context: the list ends
        else:
            requests = [Request(d.messages, temperature=temperature, seed=d.seed, max_tokens=self.max_tokens)
                        for d in drafts]
            for d, gens in zip(drafts, self.lm.chat_each(requests) if requests else []):
                d.lines = [line for line, _ in parse_proposals(gens[0].text, d.state, self.arithmetic)] if gens else []
        out = []
        for i, node in enumerate(nodes):
            mine = drafts[i * self.proposals:(i + 1) * self.proposals]
            text = "\n".join(line for d in mine for line in d.lines)
            out.append([Node(left, (*node.lines, line)) for line, left in parse_proposals(text, node.state, "claimed")])
        return out

    def valued(self, nodes: list[Node]) -> list[Node]:
        """The nodes with their positions' values (asked once per position)."""
        new = sorted({n.state for n in nodes} - self.values.keys())
        if self.oracle:
            self.values.update({s: 20.0 if can_reach_24(s) else 0.001 for s in new})
        elif new and self.arithmetic == "calculator":
            votes = [Judgement([*self.demos["value"], {"role": "user", "content": value_prompt(s)}], s,
                               self.seed + i * self.value_samples + k)
                     for i, s in enumerate(new) for k in range(self.value_samples)]
            while todo := [v for v in votes if v.weight is None]:
                for v, gens in zip(todo, self.lm.chat_each([v.request(self.temperature) for v in todo])):
                    v.advance(gens[0].text if gens else "")  # nothing: no verdict, the least weight
            for i, s in enumerate(new):
                self.values[s] = sum(v.weight for v in votes[i * self.value_samples:(i + 1) * self.value_samples])
        elif new:
            requests = [Request([*self.demos["value"], {"role": "user", "content": value_prompt(s)}],
                                n=self.value_samples,
                                temperature=self.temperature, max_tokens=48, seed=self.seed + i)
                        for i, s in enumerate(new)]
            for s, gens in zip(new, self.lm.chat_each(requests)):
                self.values[s] = sum(parse_value(g.text) for g in gens)
        return [Node(n.state, n.lines, self.values[n.state]) for n in nodes]


def bfs(searcher: Searcher, puzzles: list[list[int]], beam: int) -> list[list[Node]]:
    """Breadth-first: after each move keep the `beam` best positions of every puzzle."""
    frontiers = [[Node(tuple(sorted(p)))] for p in puzzles]
    for _ in range(MOVES):
        flat = [(i, n) for i, f in enumerate(frontiers) for n in f]
        kids = searcher.children([n for _, n in flat])
        grown: list[list[Node]] = [[] for _ in puzzles]
        for (i, _), children in zip(flat, kids):
            grown[i] += children
        valued = searcher.valued([n for g in grown for n in g])
        frontiers, at = [], 0
        for g in grown:
            mine, at = valued[at:at + len(g)], at + len(g)
            frontiers.append(sorted(mine, key=lambda n: -n.value)[:beam])  # stable: ties keep the model's order
    return frontiers


def dfs(searcher: Searcher, puzzles: list[list[int]], max_expansions: int) -> list[list[Node]]:
    """Depth-first: expand the best child first, skip positions valued below "likely", back up; stop
    at the first finished position that keeps its value, or after `max_expansions` proposals."""
    stacks = [[Node(tuple(sorted(p)), (), 20.0)] for p in puzzles]
    found: list[list[Node]] = [[] for _ in puzzles]
    expansions = [0] * len(puzzles)
    while True:
        todo = []
        for i, stack in enumerate(stacks):
            while stack and not found[i] and expansions[i] < max_expansions:
                node = stack.pop()
                if len(node.state) == 1:
                    found[i] = [node]
                    break
                todo.append((i, node))
                expansions[i] += 1
                break
        if not todo:
            return found
        kids = searcher.children([n for _, n in todo])
        valued = searcher.valued([c for children in kids for c in children])
        at = 0
        for (i, _), children in zip(todo, kids):
            mine, at = valued[at:at + len(children)], at + len(children)
            keep = [c for c in mine if c.value >= PRUNE_BELOW]
            stacks[i] += sorted(keep, key=lambda n: n.value)  # the best ends on top


def tree_of_thoughts(lm: LM, puzzles: list[list[int]], search: str = "bfs", beam: int = 5,
                     value_samples: int = 3, temperature: float = 0.7, oracle: bool = False, seed: int = 0,
                     max_expansions: int = 12, shots: int = 0, arithmetic: str = "calculator",
                     proposals: int = 1) -> list[Answer]:
    """Solve each puzzle by search; the answer is the best finished path, written as its moves and
    "Answer: <expression>" (the expression composed from the moves, for the task's verifier)."""
    searcher = Searcher(lm, value_samples, temperature, oracle, seed, shots, arithmetic, proposals=proposals)
    if search == "bfs":
        ends = bfs(searcher, puzzles, beam)
    elif search == "dfs":
        ends = dfs(searcher, puzzles, max_expansions)
    else:
        raise ValueError(f"unknown search {search!r}; use bfs or dfs")
    answers = []
    for puzzle, nodes in zip(puzzles, ends):
        finished = [n for n in nodes if len(n.state) == 1]
        trace = [{"moves": list(n.lines), "value": n.value} for n in nodes]
        if not finished:
            answers.append(Answer("", [], {}, trace))
            continue
        best = finished[0]
        expression = compose(puzzle, best.lines) or ""
        answers.append(Answer("\n".join([*best.lines, f"Answer: {expression}"]), [], {}, trace))
    return answers
