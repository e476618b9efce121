"""Tree of Thoughts: the search's own logic on a scripted model, and its text formats."""

import re
from collections import Counter

import pytest
from conftest import ScriptedLM

from pocketgpt.data.tasks import get_task
from pocketgpt.data.tasks.game24 import (
    PROPOSED,
    can_reach_24,
    move_line,
    moves,
    propose_prompt,
    uses_and_makes_24,
    value_prompt,
)
from pocketgpt.reason.lm import Generation
from pocketgpt.reason.tot import Judgement, Node, Searcher, tree_of_thoughts


def table_of(prompt: str) -> list[int]:
    """The numbers a propose or value prompt shows."""
    if prompt.startswith("Input: "):
        return [int(x) for x in prompt.splitlines()[0][len("Input: "):].split()]
    return [int(x) for x in prompt[len("Evaluate if "):].split(" can reach")[0].split()]


def prompt_of(request) -> str:
    """The user's prompt of a request (before the reply so far, when the strategy writes part of it)."""
    return request.messages[-2 if request.continue_final else -1]["content"]


def opening(move) -> str:
    a, op, b, *_ = move
    return f"{a} {op} {b} "


def judged(state, request, judge) -> str:
    """A value reply by `judge`: written whole, or picked among what the request allows (a try at two
    numbers first, then the check and verdict `judge` gives)."""
    if request.choices is None:
        return "sure" if judge(state) else "impossible"
    verdicts = [c for c in request.choices if c.endswith(("sure", "impossible"))]
    if not verdicts:
        return request.choices[0]
    return next(c for c in verdicts if c.endswith("sure" if judge(state) else "impossible"))


def player(judge=can_reach_24, count=8):
    """A model that proposes up to `count` legal moves, good ones last (so the search must use the values),
    and values positions with `judge`. Asked to pick its next move, it takes the next of those it has not
    written, and writes nothing when none is left (the proposal ends)."""
    def reply(messages, request):
        prompt = prompt_of(request)
        state = table_of(prompt)
        if not prompt.startswith("Input: "):
            return [Generation(judged(state, request, judge), "stop") for _ in range(request.n)]
        listed = sorted(moves(state), key=lambda m: can_reach_24(m[4]))[-count:]
        if request.choices is None:
            return [Generation("\n".join(move_line(*m) for m in listed), "stop")]
        return [Generation(next((opening(m) for m in listed if opening(m) in request.choices), ""), "stop")]
    return reply


PUZZLES = [[4, 4, 6, 8], [1, 2, 3, 4], [2, 3, 5, 9], [1, 1, 4, 6]]


@pytest.mark.parametrize("search", ["bfs", "dfs"])
def test_search_with_good_values_solves_every_puzzle(search):
    lm = ScriptedLM(player())
    answers = tree_of_thoughts(lm, PUZZLES, search=search, beam=2)
    for puzzle, answer in zip(PUZZLES, answers):
        assert get_task("game24").verify(type("E", (), {"meta": {"numbers": puzzle}})(), answer.text), answer.text
        assert uses_and_makes_24(answer.text.split("Answer: ")[1], puzzle)


def test_values_are_asked_once_per_position_and_the_prompts_are_the_renderings():
    lm = ScriptedLM(player())
    tree_of_thoughts(lm, PUZZLES[:2] * 2, beam=3)  # the same puzzles twice: the cache answers the second
    votes = Counter(tuple(table_of(prompt_of(r))) for r in lm.requests
                    if prompt_of(r).startswith("Evaluate") and r.messages[-1]["content"] == "")
    assert votes and set(votes.values()) == {3}  # each position three votes, once
    task = get_task("game24")
    example = task.examples("train")[0]
    propose, value = task.render(example, "propose"), task.render(example, "value")
    assert propose[0]["content"] == propose_prompt(table_of(propose[0]["content"]))
    assert value[0]["content"] == value_prompt(table_of(value[0]["content"]))


def test_a_proposal_is_picked_move_by_move_and_lists_no_table_twice():
    """With the calculator the model picks each move among those it may still write; moves to a table it
    has listed ("4 + 6" after "6 + 4") are not offered again, and the list stops at PROPOSED moves."""
    lm = ScriptedLM(lambda messages, r: [Generation(r.choices[-1], "stop")])
    [children] = Searcher(lm).children([Node((4, 4, 6, 8))])
    tables = [c.state for c in children]
    assert len(children) == PROPOSED and len(set(tables)) == PROPOSED
    assert all(r.continue_final and r.stop == ("=",) for r in lm.requests)
    offered = [set(r.choices) for r in lm.requests]
    assert all(later < earlier for earlier, later in zip(offered, offered[1:]))
    [few] = Searcher(lm).children([Node((4, 6))])  # a table of two numbers has fewer moves than PROPOSED
    assert {c.state for c in few} == {m[4] for m in moves((4, 6))}


@pytest.mark.parametrize("state, weight", [((4, 6), 20.0), ((5, 7), 0.001)])
def test_a_value_at_two_numbers_tries_moves_with_the_calculator_and_checks_each(state, weight):
    """The model tries moves in the order it likes and checks each result the calculator writes; here it
    checks honestly and gives up once it has tried every move."""
    def honest(messages, request):
        choices = request.choices
        if not any(c.endswith(("sure", "impossible")) for c in choices):
            return [Generation(choices[0], "stop")]
        result = int(re.search(r"= (\d+)$", messages[-1]["content"])[1])
        going_on = [c for c in choices if not c.endswith(("sure", "impossible"))]
        if result == 24:
            return [Generation(choices[0], "stop")]
        return [Generation(going_on[0] if going_on else choices[1], "stop")]

    vote = Judgement([{"role": "user", "content": value_prompt(state)}], state, None)
    lm = ScriptedLM(honest)
    while vote.weight is None:
        vote.advance(lm.chat_batch([vote.request(0.0)])[0][0].text)
    assert vote.weight == weight
    assert all(line.endswith(("24 = 24", "is not 24")) for line in vote.lines)
    if_sure = vote.lines[-1].endswith("= 24, 24 = 24")  # found: tries no further
    every_result = len(vote.lines) == len({m[4] for m in moves(state)})  # gave up after each result once
    assert (if_sure, every_result) == ((True, False) if weight > 1 else (False, True))
    assert lm.requests[-1].messages[-1]["content"] == "".join(line + "\n" for line in vote.lines[:-1]) + \
        vote.lines[-1].split(",")[0]  # the last try, awaiting its check


def test_a_backend_that_ignores_the_choices_still_values_by_what_it_wrote():
    lm = ScriptedLM(lambda messages, r: [Generation("I am sure", "stop")])
    searcher = Searcher(lm)
    assert [n.value for n in searcher.valued([Node((4, 6)), Node((1, 2, 3))])] == [60.0, 60.0]


def test_wrong_values_mislead_the_search_and_the_oracle_ablation_fixes_it():
    wrong = ScriptedLM(player(judge=lambda s: not can_reach_24(s)))
    answers = tree_of_thoughts(wrong, PUZZLES, beam=1)
    assert not any("Answer: " in a.text and uses_and_makes_24(a.text.split("Answer: ")[1], p)
                   for a, p in zip(answers, PUZZLES))
    oracle = tree_of_thoughts(ScriptedLM(player(judge=lambda s: not can_reach_24(s))), PUZZLES, beam=1, oracle=True)
    assert all(uses_and_makes_24(a.text.split("Answer: ")[1], p) for a, p in zip(oracle, PUZZLES))


def test_dfs_prunes_positions_valued_impossible_and_gives_up_empty():
    lm = ScriptedLM(player(judge=lambda s: False))
    answers = tree_of_thoughts(lm, PUZZLES[:1], search="dfs")
    proposals = [r for r in lm.requests if prompt_of(r).startswith("Input: ") and r.messages[-1]["content"] == ""]
    assert answers[0].text == "" and len(proposals) == 1  # every child pruned: no descent


def test_unparseable_proposals_end_the_search_without_an_answer():
    lm = ScriptedLM(lambda messages, r: [Generation("I like turtles", "stop")] * r.n)
    assert [a.text for a in tree_of_thoughts(lm, PUZZLES[:2])] == ["", ""]


def sampling_proposer(messages, request):
    """Greedy, it proposes only a move that cannot reach 24; each sample proposes one of the two best moves
    (the sample seeded i the (i % 2)-th), so samples repeat each other. One move each: then it writes nothing."""
    prompt = prompt_of(request)
    state = table_of(prompt)
    if not prompt.startswith("Input: "):
        return [Generation(judged(state, request, can_reach_24), "stop") for _ in range(request.n)]
    if messages[-1]["content"]:
        return [Generation("", "stop")]
    ranked = sorted(moves(state), key=lambda m: can_reach_24(m[4]), reverse=True)
    if request.temperature == 0:
        return [Generation(opening(ranked[-1]), "stop")]
    return [Generation(opening(ranked[request.seed % 2]), "stop")]


def test_several_proposals_are_sampled_and_their_moves_merged_once():
    lm = ScriptedLM(sampling_proposer)
    children = Searcher(lm, proposals=4).children([Node((4, 4, 6, 8))])[0]
    ranked = sorted(moves((4, 4, 6, 8)), key=lambda m: can_reach_24(m[4]), reverse=True)
    assert [c.lines[-1] for c in children] == [move_line(*ranked[0]), move_line(*ranked[1])]
    first = lm.requests[:4]  # the four proposals' first picks, each sampled with its own seed
    assert {r.temperature for r in first} == {0.7} and len({r.seed for r in first}) == 4
    greedy = tree_of_thoughts(ScriptedLM(sampling_proposer), PUZZLES, beam=1)
    sampled = tree_of_thoughts(ScriptedLM(sampling_proposer), PUZZLES, beam=1, proposals=4)
    assert not any(uses_and_makes_24(a.text.split("Answer: ")[-1], p) for a, p in zip(greedy, PUZZLES))
    assert all(uses_and_makes_24(a.text.split("Answer: ")[-1], p) for a, p in zip(sampled, PUZZLES))


def test_unknown_search():
    with pytest.raises(ValueError, match="unknown search"):
        tree_of_thoughts(ScriptedLM(player()), PUZZLES[:1], search="astar")


def slipping_player(messages, request):
    """The player above, except that every move it proposes in its own words claims a result one too high:
    it picks the right numbers and operations and gets each sum wrong, as our small model often does."""
    prompt = prompt_of(request)
    if not prompt.startswith("Input: ") or request.choices is not None:
        return player()(messages, request)
    listed = sorted(moves(table_of(prompt)), key=lambda m: can_reach_24(m[4]))[-8:]
    return [Generation("\n".join(f"{a} {op} {b} = {result + 1}" for a, op, b, result, _ in listed), "stop")]


# What becomes of false claims: the calculator writes the right results, and the model's choice of
# numbers and operations solves every puzzle; checked, no move survives and no path ends; taken as
# written, paths end at a claimed 24 whose expression does not make 24.
@pytest.mark.parametrize("arithmetic, answered, solved", [("calculator", True, True), ("checked", False, False),
                                                          ("claimed", True, False)])
def test_move_arithmetic_decides_what_becomes_of_a_false_claim(arithmetic, answered, solved):
    answers = tree_of_thoughts(ScriptedLM(slipping_player), PUZZLES, beam=2, arithmetic=arithmetic)
    assert [bool(a.text) for a in answers] == [answered] * len(PUZZLES)
    assert [uses_and_makes_24(a.text.split("Answer: ")[-1], p) for a, p in zip(answers, PUZZLES)] == [solved] * len(PUZZLES)
