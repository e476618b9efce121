"""A chain of thought on the Game of 24 that searches with a calculator: its own logic on scripted models
that pick moves and judge tables the way a model would, stopping at "=" as a backend does (the strategies also run on both real
backends: tests/test_strategies.py)."""

import re

from conftest import ScriptedLM

from pocketgpt.data.tasks import get_task
from pocketgpt.data.tasks.game24 import (
    BACK,
    IMPOSSIBLE,
    SURE,
    can_reach_24,
    kept_moves,
    move_openings,
    moves,
    parse_proposals,
    uses_and_makes_24,
)
from pocketgpt.reason.chain import MAX_MOVES, calculator_chains
from pocketgpt.reason.lm import Generation
from pocketgpt.reason.strategies import Settings, ask

TASK = get_task("game24")
EXAMPLES = TASK.examples("test")[:4]


def table(messages) -> list[int]:
    """The numbers on the table: the question's, or those the last move kept (or gone back to) left."""
    reply = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    state = [int(x) for x in re.findall(r"\d+", messages[-2]["content"].split(" and ")[0])]
    stack = [state]
    for line in reply.splitlines():
        if line.endswith(" sure"):
            stack.append([int(x) for x in re.search(r"\(left: ([\d ]+)\)", line)[1].split()])
        elif line.startswith("back to "):
            stack.pop()
    return stack[-1]


def asks_verdict(request) -> bool:
    return request.choices is not None and len(request.choices) == 2 and request.choices[0].endswith(SURE)


def last_table(messages) -> list[int]:
    """The numbers the move awaiting its verdict left."""
    return [int(x) for x in re.findall(r"\(left: ([\d ]+)\)", messages[-1]["content"])[-1].split()]


def verdict_or(move):
    """A model that judges the table its last move left as the solver does, and else moves by `move`."""
    def reply(messages, request):
        if asks_verdict(request):
            sure, impossible = request.choices
            return [Generation(sure if can_reach_24(last_table(messages)) else impossible, "stop")]
        return move(messages, request)
    return reply


def good_mover(messages, request):
    """Writes a move that still reaches 24, up to its "=" (where decoding stops)."""
    a, op, b, *_ = next(m for m in moves(table(messages)) if can_reach_24(m[4]))
    return [Generation(f"{a} {op} {b} ", "stop")]


def first_open_move(messages, request):
    """Writes the first move it may (the guided choice's first), good or bad."""
    return [Generation(request.choices[0], "stop")]


def test_the_calculator_writes_each_result_and_the_model_judges_it():
    lm = ScriptedLM(verdict_or(good_mover))
    chains = calculator_chains(lm, TASK, EXAMPLES, n=1, temperature=0.0)
    for example, [text] in zip(EXAMPLES, chains):
        assert text.count("(left: ") == 3 and text.count(" sure") == 3 and "(left: 24) 24 = 24, sure" in text
        assert uses_and_makes_24(text.split("Answer: ")[1], example.meta["numbers"]), text
    assert len(lm.requests) == 6 * len(EXAMPLES)  # a move and a verdict, three times
    assert all(r.continue_final and r.messages[-1]["role"] == "assistant" for r in lm.requests)
    assert all(r.stop == ("=",) for r in lm.requests[:len(EXAMPLES)])  # the first round: every chain's move
    # each move is held to those on the table: the first to the puzzle's
    assert [set(r.choices) for r in lm.requests[:len(EXAMPLES)]] == [set(move_openings(e.meta["numbers"]))
                                                                   for e in EXAMPLES]
    # the verdict comes after the calculator's line, held to the two words (worked at a single number)
    first_verdict = lm.requests[len(EXAMPLES)]
    assert first_verdict.choices == (SURE, IMPOSSIBLE) and first_verdict.messages[-1]["content"].endswith(")")
    last_verdict = lm.requests[5 * len(EXAMPLES)]
    number = last_table(last_verdict.messages)[0]
    assert last_verdict.choices == (f" {number} = 24, sure", f" {number} is not 24, impossible")


def opens_badly(example) -> bool:
    """Whether the first move a chain may make on the puzzle can no longer reach 24."""
    numbers = example.meta["numbers"]
    [(_, left)] = list(move_openings(numbers).values())[:1]
    return not can_reach_24(left)


def test_a_move_judged_impossible_is_taken_back_and_not_tried_again():
    examples = [e for e in TASK.examples("test") if opens_badly(e)][:4]
    lm = ScriptedLM(verdict_or(first_open_move))
    chains = calculator_chains(lm, TASK, examples, n=1, temperature=0.0)
    for example, [text] in zip(examples, chains):
        lines = text.splitlines()
        tried = [line for line in lines if line.endswith(IMPOSSIBLE)]
        assert tried and len(set(tried)) == len(tried)  # each move taken back once
        assert all(not can_reach_24([int(x) for x in re.search(r"\(left: ([\d ]+)\)", t)[1].split()]) for t in tried)
        kept = kept_moves(lines)
        assert all(line.endswith(SURE) for line in kept)
        # exactly one of: a path found within the budget, or out of moves with no answer (which does not vote)
        found = len(kept) == 3 and uses_and_makes_24(text.split("Answer: ")[1], example.meta["numbers"])
        gave_up = (text.endswith("Answer: none") and TASK.answer_key(example, text) == ""
                   and sum(line.endswith((SURE, IMPOSSIBLE)) for line in lines) == MAX_MOVES)
        assert found != gave_up, text
    # a move taken back is not offered again on the same table
    first, second = lm.requests[0], lm.requests[2 * len(examples)]
    assert set(second.choices) < set(first.choices) and first.choices[0] not in second.choices


def test_a_table_with_no_move_left_takes_back_the_move_that_made_it():
    """A model that keeps every move ("sure") but a last one, so that no move is left at two numbers."""
    def reply(messages, request):
        if asks_verdict(request):
            sure, impossible = request.choices
            return [Generation(impossible if len(last_table(messages)) == 1 else sure, "stop")]
        return [Generation(request.choices[0], "stop")]

    [[text]] = calculator_chains(ScriptedLM(reply), TASK, EXAMPLES[:1], n=1, temperature=0.0)
    lines = text.splitlines()
    back = next(i for i, line in enumerate(lines) if line.startswith(BACK))
    first, second, *last_moves = lines[:back]
    two = sorted(int(x) for x in re.search(r"\(left: ([\d ]+)\)", second)[1].split())
    # every last move the two numbers have (one per result) was tried and taken back ...
    assert len(last_moves) == len({m[4] for m in moves(two)}) and all(m.endswith(IMPOSSIBLE) for m in last_moves)
    # ... and the chain went back to the table before them
    assert lines[back] == BACK + re.search(r"\(left: ([\d ]+)\)", first)[1]
    assert kept_moves(lines[:back + 1]) == [first] and text.endswith("Answer: none")


def test_the_moves_a_chain_may_pick_are_every_move_the_calculator_takes():
    for table in ([4, 4, 6, 13], [1, 2, 3, 4], [6, 6], [12, 0]):
        every = {f"{a} {op} {b} " for i, a in enumerate(table) for j, b in enumerate(table) if i != j
                 for op in "+-*/" if parse_proposals(f"{a} {op} {b} = 0", table, "calculator")}
        assert set(move_openings(table)) == every and len(move_openings(table)) == len(every)


def test_a_move_off_the_table_ends_the_chain_with_the_models_own_words():
    """(A backend that ignores the guided choice: a server other than ours.)"""
    def stray(messages, request):  # a good first move, then a number that is not on the table
        if "(left: " in messages[-1]["content"]:
            return [Generation("99 + 1 ", "stop")]
        return good_mover(messages, request)

    lm = ScriptedLM(verdict_or(stray))
    chains = calculator_chains(lm, TASK, EXAMPLES, n=1, temperature=0.0)
    assert [text.count("(left: ") for [text] in chains] == [1] * len(EXAMPLES)
    assert all(text.endswith(" sure\n99 + 1") and not TASK.check(e, text) for e, [text] in zip(EXAMPLES, chains))
    assert len(lm.requests) == 3 * len(EXAMPLES)  # an ended chain asks no more


def test_self_consistency_samples_chains_with_their_own_seeds_and_votes():
    answers = ask(ScriptedLM(verdict_or(good_mover)), TASK, EXAMPLES, "self_consistency", Settings(k=3))
    assert all(a.voted and len(a.samples) == 3 and sum(a.votes.values()) == 3 for a in answers)
    assert all(TASK.check(e, a.text) for e, a in zip(EXAMPLES, answers))
    lm = ScriptedLM(verdict_or(good_mover))
    ask(lm, TASK, EXAMPLES[:1], "self_consistency", Settings(k=3, seed=5))
    assert [r.seed for r in lm.requests[:3]] == [5, 6, 7] and all(r.temperature == 0.7 for r in lm.requests)


def test_the_models_own_arithmetic_writes_the_chain_in_one_go():
    lm = ScriptedLM(lambda messages, request: [Generation("4 + 8 = 13 (left: 13)\nAnswer: 4+8", "stop")])
    [answer] = ask(lm, TASK, EXAMPLES[:1], "cot", Settings(move_arithmetic="claimed"))
    assert answer.text == "4 + 8 = 13 (left: 13)\nAnswer: 4+8"
    assert len(lm.requests) == 1 and not lm.requests[0].continue_final
