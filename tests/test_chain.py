"""A chain of thought on the Game of 24 with a calculator: its own logic on scripted models that pick
moves the way a model would, stopping at "=" as a backend does (the strategies also run on both real
backends: tests/test_strategies.py)."""

import re

from conftest import ScriptedLM

from pocketgpt.data.tasks import get_task
from pocketgpt.data.tasks.game24 import can_reach_24, move_openings, moves, parse_proposals, uses_and_makes_24
from pocketgpt.reason.chain import calculator_chains
from pocketgpt.reason.lm import Generation
from pocketgpt.reason.strategies import Settings, ask

TASK = get_task("game24")
EXAMPLES = TASK.examples("test")[:4]


def table(messages) -> list[int]:
    """The numbers on the table: the question's, or those the calculator's last line left."""
    left = re.findall(r"\(left: ([\d ]+)\)", messages[-1]["content"])
    if left:
        return [int(x) for x in left[-1].split()]
    return [int(x) for x in re.findall(r"\d+", messages[-2]["content"].split(" and ")[0])]


def good_mover(messages, request):
    """Writes a move that still reaches 24, up to its "=" (where decoding stops)."""
    a, op, b, *_ = next(m for m in moves(table(messages)) if can_reach_24(m[4]))
    return [Generation(f"{a} {op} {b} ", "stop")]


def test_the_calculator_writes_each_result_and_the_model_continues_its_own_reply():
    lm = ScriptedLM(good_mover)
    chains = calculator_chains(lm, TASK, EXAMPLES, n=1, temperature=0.0)
    for example, [text] in zip(EXAMPLES, chains):
        assert text.count("(left: ") == 3 and "(left: 24)" in text
        assert uses_and_makes_24(text.split("Answer: ")[1], example.meta["numbers"]), text
    assert len(lm.requests) == 3 * len(EXAMPLES)
    assert all(r.continue_final and r.stop == ("=",) and r.messages[-1]["role"] == "assistant" for r in lm.requests)
    # each move is held to those on the table: the first to the puzzle's
    assert [set(r.choices) for r in lm.requests[:len(EXAMPLES)]] == [set(move_openings(e.meta["numbers"]))
                                                                   for e in EXAMPLES]
    # the reply so far is the calculator's lines: the second move continues after the first line
    second = lm.requests[len(EXAMPLES)].messages[-1]["content"]
    assert second.endswith(")\n") and second.count("(left: ") == 1


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

    lm = ScriptedLM(stray)
    chains = calculator_chains(lm, TASK, EXAMPLES, n=1, temperature=0.0)
    assert [text.count("(left: ") for [text] in chains] == [1] * len(EXAMPLES)
    assert all(text.endswith("\n99 + 1") and not TASK.check(e, text) for e, [text] in zip(EXAMPLES, chains))
    assert len(lm.requests) == 2 * len(EXAMPLES)  # an ended chain asks no more


def test_self_consistency_samples_chains_with_their_own_seeds_and_votes():
    answers = ask(ScriptedLM(good_mover), TASK, EXAMPLES, "self_consistency", Settings(k=3))
    assert all(a.voted and len(a.samples) == 3 and sum(a.votes.values()) == 3 for a in answers)
    assert all(TASK.check(e, a.text) for e, a in zip(EXAMPLES, answers))
    lm = ScriptedLM(good_mover)
    ask(lm, TASK, EXAMPLES[:1], "self_consistency", Settings(k=3, seed=5))
    assert [r.seed for r in lm.requests[:3]] == [5, 6, 7] and all(r.temperature == 0.7 for r in lm.requests)


def test_the_models_own_arithmetic_writes_the_chain_in_one_go():
    lm = ScriptedLM(lambda messages, request: [Generation("4 + 8 = 13 (left: 13)\nAnswer: 4+8", "stop")])
    [answer] = ask(lm, TASK, EXAMPLES[:1], "cot", Settings(move_arithmetic="claimed"))
    assert answer.text == "4 + 8 = 13 (left: 13)\nAnswer: 4+8"
    assert len(lm.requests) == 1 and not lm.requests[0].continue_final
