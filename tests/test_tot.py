"""Tree of Thoughts: the search's own logic on a scripted model, and its text formats."""

import pytest
from conftest import ScriptedLM

from pocketgpt.data.tasks import get_task
from pocketgpt.data.tasks.game24 import can_reach_24, move_line, moves, propose_prompt, uses_and_makes_24, value_prompt
from pocketgpt.reason.lm import Generation
from pocketgpt.reason.tot import Node, Searcher, tree_of_thoughts


def table_of(prompt: str) -> list[int]:
    """The numbers a propose or value prompt shows."""
    if prompt.startswith("Input: "):
        return [int(x) for x in prompt.splitlines()[0][len("Input: "):].split()]
    return [int(x) for x in prompt[len("Evaluate if "):].split(" can reach")[0].split()]


def player(judge=can_reach_24, count=8):
    """A model that proposes every legal move (up to `count`, good ones last, so the search must use the
    values) and values positions with `judge`, three times."""
    def reply(messages, request):
        prompt = messages[-1]["content"]
        state = table_of(prompt)
        if prompt.startswith("Input: "):
            listed = sorted(moves(state), key=lambda m: can_reach_24(m[4]))[-count:]
            return [Generation("\n".join(move_line(*m) for m in listed), "stop")]
        return [Generation("sure" if judge(state) else "impossible", "stop") for _ in range(request.n)]
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
    value_states = [tuple(table_of(r.messages[-1]["content"])) for r in lm.requests if r.n == 3]
    assert len(value_states) == len(set(value_states))
    task = get_task("game24")
    example = task.examples("train")[0]
    propose, value = task.render(example, "propose"), task.render(example, "value")
    assert propose[0]["content"] == propose_prompt(table_of(propose[0]["content"]))
    assert value[0]["content"] == value_prompt(table_of(value[0]["content"]))


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
    proposals = [r for r in lm.requests if r.messages[-1]["content"].startswith("Input: ")]
    assert answers[0].text == "" and len(proposals) == 1  # every child pruned: no descent


def test_unparseable_proposals_end_the_search_without_an_answer():
    lm = ScriptedLM(lambda messages, r: [Generation("I like turtles", "stop")] * r.n)
    assert [a.text for a in tree_of_thoughts(lm, PUZZLES[:2])] == ["", ""]


def sampling_proposer(messages, request):
    """Greedy, it proposes only a move that cannot reach 24; each sample proposes one of the two best moves
    (sample i the (i % 2)-th), so samples repeat each other."""
    prompt = messages[-1]["content"]
    state = table_of(prompt)
    if not prompt.startswith("Input: "):
        return [Generation("sure" if can_reach_24(state) else "impossible", "stop") for _ in range(request.n)]
    ranked = sorted(moves(state), key=lambda m: can_reach_24(m[4]), reverse=True)
    if request.temperature == 0:
        return [Generation(move_line(*ranked[-1]), "stop")]
    return [Generation(move_line(*ranked[i % 2]), "stop") for i in range(request.n)]


def test_several_proposals_are_sampled_and_their_moves_merged_once():
    lm = ScriptedLM(sampling_proposer)
    children = Searcher(lm, proposals=4).children([Node((4, 4, 6, 8))])[0]
    ranked = sorted(moves((4, 4, 6, 8)), key=lambda m: can_reach_24(m[4]), reverse=True)
    assert [c.lines[-1] for c in children] == [move_line(*ranked[0]), move_line(*ranked[1])]
    assert lm.requests[0].n == 4 and lm.requests[0].temperature == 0.7
    greedy = tree_of_thoughts(ScriptedLM(sampling_proposer), PUZZLES, beam=1)
    sampled = tree_of_thoughts(ScriptedLM(sampling_proposer), PUZZLES, beam=1, proposals=4)
    assert not any(uses_and_makes_24(a.text.split("Answer: ")[-1], p) for a, p in zip(greedy, PUZZLES))
    assert all(uses_and_makes_24(a.text.split("Answer: ")[-1], p) for a, p in zip(sampled, PUZZLES))


def test_unknown_search():
    with pytest.raises(ValueError, match="unknown search"):
        tree_of_thoughts(ScriptedLM(player()), PUZZLES[:1], search="astar")


def slipping_player(messages, request):
    """The player above, except that every move it proposes claims a result one too high: it picks
    the right numbers and operations and gets each sum wrong, as our small model often does."""
    prompt = messages[-1]["content"]
    if not prompt.startswith("Input: "):
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
