"""Practice worlds: conversations about other worlds, answered only from what the context holds."""

import json
import re

import pytest

from pocketgpt.common import PocketError
from pocketgpt.data.tasks import default_world, get_task
from pocketgpt.data.tasks.factqa import REFUSAL
from pocketgpt.data.tasks.practice import practice_conversations
from pocketgpt.data.tasks.tools import calculator


def test_reading_practice_is_about_other_worlds_and_answered_from_its_passages():
    task = get_task("factqa")
    convs = practice_conversations(task, 300)
    ours = {e.name for e in default_world().entities()}
    assert len(convs) == 300 and len({c[0]["content"] for c in convs}) == 300
    for user, answer in convs:
        question = user["content"].rsplit("Question: ", 1)[1]
        assert not any(name in question for name in ours)  # nothing the model memorised answers it
        said = answer["content"]
        assert said == REFUSAL or said in user["content"].split("\n\nAnswer from")[0]  # a passage's sentence
    assert 0.5 < sum(a["content"] != REFUSAL for _, a in convs) / 300 < 0.85  # the passage is there 2/3 of the time


def test_tool_practice_copies_the_questions_names_and_the_searched_populations():
    task = get_task("multihop")
    convs = practice_conversations(task, 200)
    ours = {e.name for e in default_world().entities()}
    assert len(convs) == 200 and len({c[0]["content"] for c in convs}) == 200
    for user, call_a, found_a, call_b, found_b, call_calc, result, answer in convs:
        a, b = re.fullmatch(r".* (?:of|in) (\w+) than (?:that of |in )(\w+)\?", user["content"]).groups()
        assert not {a, b} & ours
        queries = [json.loads(c["tool_calls"][0]["function"]["arguments"])["query"] for c in (call_a, call_b)]
        assert queries == [f"population of {a}", f"population of {b}"]  # the names, copied
        populations = [re.search(rf"The population of {n} is (\d+)\.", f["content"])[1] for n, f in ((a, found_a), (b, found_b))]
        expression = json.loads(call_calc["tool_calls"][0]["function"]["arguments"])["expression"]
        assert expression == "/".join(populations) and result["content"] == calculator(expression)
        assert abs(float(answer["content"]) - float(result["content"])) <= 0.05


def test_a_task_without_a_practice_rendering_is_refused():
    task = get_task("spell")
    with pytest.raises(PocketError, match="no practice rendering"):
        practice_conversations(task, 10)
