"""Tree of Thoughts on the Game of 24 (Yao et al. 2023): search over partial solutions instead of
writing one left to right, with the model itself proposing moves and judging positions.

    propose  "Input: 4 4 6 8\nPossible next steps:" -> "4 + 8 = 12 (left: 4 6 12)\n..."  (one greedy call, or
             `proposals` samples whose moves are merged)
    value    "Evaluate if 4 6 12 can reach 24 (sure/likely/impossible)" -> votes of `value_samples`
             samples, weighted sure 20 / likely 1 / impossible 0.001 and summed, as in the paper

Breadth-first search keeps the `beam` best positions after each of the three moves; depth-first
search follows the best child first, drops positions valued below "likely" and backs up, within a
budget of expansions. Every puzzle of a batch searches at once: each round's proposals, and each
round's value questions, go to the model as one batch, and a position's value is asked once and
remembered (the paper's value cache).

Each proposed line is a claim, "a op b = c", and a small model slips in its arithmetic ("13 - 9 = 2",
"12 * 9 = 24"): of its first eight lines, one or two hold. By default (`arithmetic="calculator"`)
the model picks the two numbers and the operation and a calculator writes the result, as the
arithmetic task's tool rendering does; the model still chooses every move and values every
position. `"checked"` keeps the model's own arithmetic and drops a false claim, as a calculator
would show it; `"claimed"` takes every claim as written (an unchecked slip that lands on 24 looks
like a win to any judge). The matrix shows all three.

`oracle=True` replaces the model's values by the exact solver's verdict: an ablation that shows
how much better the search would be with a perfect judge, never the headline figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.tasks import get_task
from ..data.tasks.game24 import can_reach_24, compose, parse_proposals, parse_value, propose_prompt, value_prompt
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
        requests = [Request([*self.demos["propose"], {"role": "user", "content": propose_prompt(n.state)}],
                            n=self.proposals, temperature=self.temperature if sampled else 0.0,
                            seed=self.seed + i if sampled else None, max_tokens=self.max_tokens)
                    for i, n in enumerate(nodes)]
        replies = self.lm.chat_batch(requests) if requests else []
        return [[Node(left, (*node.lines, line))
                 for line, left in parse_proposals("\n".join(g.text for g in gens), node.state, self.arithmetic)]
                for node, gens in zip(nodes, replies)]

    def valued(self, nodes: list[Node]) -> list[Node]:
        """The nodes with their positions' values (asked once per position)."""
        new = sorted({n.state for n in nodes} - self.values.keys())
        if self.oracle:
            self.values.update({s: 20.0 if can_reach_24(s) else 0.001 for s in new})
        elif new:
            requests = [Request([*self.demos["value"], {"role": "user", "content": value_prompt(s)}],
                                n=self.value_samples,
                                temperature=self.temperature, max_tokens=48, seed=self.seed + i)
                        for i, s in enumerate(new)]
            for s, gens in zip(new, self.lm.chat_batch(requests)):
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
