"""ReAct: the agent loop's own logic on a scripted model (its calls, observations, budget, fallback)."""

import pytest
from conftest import ScriptedLM

from pocketgpt.common import PocketError
from pocketgpt.data.tasks import get_task
from pocketgpt.data.tasks.tools import SPECS, calculator, task_tools
from pocketgpt.reason.lm import Generation
from pocketgpt.reason.react import react
from pocketgpt.toolloop import run_tool


def calls(*pairs):
    return [{"name": name, "arguments": args} for name, args in pairs]


def multihop_agent(messages, request):
    """Search A, search B, divide the populations read from the observations, answer."""
    task = get_task("multihop")
    example = next(e for e in task.examples("test") if e.question == messages[0]["content"])
    m = example.meta
    seen = [msg["content"] for msg in messages if msg["role"] == "tool"]
    if len(seen) == 0:
        return [Generation("I need the population of A.", "tool_calls", 0, calls(("search", {"query": f"population of {m['a']}"})))]
    if len(seen) == 1:
        return [Generation("", "tool_calls", 0, calls(("search", {"query": f"population of {m['b']}"})))]
    if len(seen) == 2:
        pops = [int(s.split("The population of ")[1].split(".")[0].split()[-1]) for s in seen]
        return [Generation("", "tool_calls", 0, calls(("calculator", {"expression": f"{pops[0]}/{pops[1]}"})))]
    return [Generation(f"Answer: {seen[-1]}", "stop")]


def test_an_agent_that_searches_and_computes_answers_multihop():
    task = get_task("multihop")
    examples = task.examples("test")[:3]
    lm = ScriptedLM(multihop_agent)
    answers = react(lm, task, examples, task_tools(task.world), [SPECS["search"], SPECS["calculator"]])
    for e, a in zip(examples, answers):
        assert task.verify(e, a.text)
        assert [step["action"]["name"] for step in a.trace] == ["search", "search", "calculator"]
        assert a.trace[0]["thought"] == "I need the population of A."
        assert str(e.meta["population_a"]) in a.trace[0]["observation"]
        # each hand-off measured, the last one the answer copying the calculator's result
        assert a.scores == {"searched_both": 1.0, "calculator_right": 1.0, "answer_copies_calculator": 1.0}
    # Each request carries the tool specs and the whole conversation so far (calls tied to results by id).
    last = lm.requests[-1]
    assert last.tools == [SPECS["search"], SPECS["calculator"]]
    tool_msgs = [m for m in last.messages if m["role"] == "tool"]
    call_ids = [c["id"] for m in last.messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    assert [m["tool_call_id"] for m in tool_msgs] == call_ids and len(call_ids) == 3


def test_tool_errors_are_observations_and_observations_are_cut():
    task = get_task("arithmetic")
    replies = iter([calls(("calculator", {"expression": "1/0"})), calls(("nope", {})),
                    calls(("traceback", {}))])

    def agent(messages, request):
        nxt = next(replies, None)
        return [Generation("", "tool_calls", 0, nxt) if nxt else Generation("Answer: 3", "stop")]

    tools = {"calculator": calculator, "traceback": lambda: "Traceback:" + " line" * 200 + "\nZeroDivisionError"}
    [answer] = react(ScriptedLM(agent), task, task.examples("test")[:1], tools, [SPECS["calculator"]],
                     max_observation_chars=50)
    observations = [s["observation"] for s in answer.trace]
    assert observations[0].startswith("error:") and observations[1].startswith("error: unknown tool 'nope")
    # a long one keeps its beginning and its end (the end of a traceback was dropped), and says what it left out
    full = run_tool(tools, "traceback", {})
    assert observations[2].startswith(full[:25]) and observations[2].endswith(" line\nZeroDivisionError")
    assert f"truncated {len(full) - 50} characters" in observations[2] and answer.text == "Answer: 3"


def test_out_of_steps_falls_back_to_self_consistency():
    task = get_task("arithmetic")
    example = task.examples("test")[0]

    def agent(messages, request):
        if request.tools:  # the agent never stops calling
            return [Generation("", "tool_calls", 0, calls(("calculator", {"expression": "1+1"})))]
        return [Generation(f"Answer: {example.answer}" if i < 2 else "Answer: 0", "stop") for i in range(request.n)]

    lm = ScriptedLM(agent)
    [answer] = react(lm, task, [example], {"calculator": calculator}, [SPECS["calculator"]], max_steps=2, fallback_k=3)
    assert len([s for s in answer.trace if "action" in s]) == 2 and answer.trace[-1] == {"fallback": "self_consistency"}
    assert task.verify(example, answer.text) and len(answer.samples) == 3
    assert lm.requests[-1].n == 3 and lm.requests[-1].temperature > 0


def test_several_sampled_paths_vote_a_slip_away():
    """Three trajectories per question, each with a seed of its own at every step; the one that miscopies
    an operand into its call is outvoted by the two that do not."""
    task = get_task("arithmetic")
    examples = [e for e in task.examples("test") if e.meta["kind"] == "column"][:2]

    def agent(messages, request):
        seen = [m["content"] for m in messages if m["role"] == "tool"]
        if seen:
            return [Generation(f"Answer: {seen[0]}", "stop")]
        m = next(e.meta for e in examples if e.question == messages[-1]["content"])
        a = m["a"] + 1 if request.seed % 3 == 0 else m["a"]  # every third trajectory slips
        return [Generation("", "tool_calls", 0, calls(("calculator", {"expression": f"{a} {m['op']} {m['b']}"})))]

    lm = ScriptedLM(agent)
    answers = react(lm, task, examples, {"calculator": calculator}, [SPECS["calculator"]], paths=3, seed=0)
    for e, a in zip(examples, answers):
        assert task.verify(e, a.text) and len(a.samples) == 3 and [p["path"] for p in a.trace] == [0, 1, 2]
        assert sorted(a.votes.values()) == [1, 2]  # the slip got one vote, the right answer two
    first_step = lm.requests[:6]
    assert all(r.temperature > 0 for r in first_step) and len({r.seed for r in lm.requests}) == len(lm.requests)
    with pytest.raises(PocketError, match="paths must be at least 1"):
        react(lm, task, examples, {"calculator": calculator}, [SPECS["calculator"]], paths=0)


def test_the_python_tool_runs_sandboxed_inside_the_loop():
    from pocketgpt.reason.strategies import Settings, ask

    task = get_task("arithmetic")
    example = task.examples("test")[0]

    def agent(messages, request):
        seen = [m["content"] for m in messages if m["role"] == "tool"]
        if not seen:
            return [Generation("", "tool_calls", 0, calls(("python", {"code": "import os; print(6 * 7, len(os.environ))"})))]
        return [Generation(f"Answer: {seen[0].split()[0]}", "stop")]

    [answer] = ask(ScriptedLM(agent), task, [example], "react", Settings(tools=("python",)))
    # 42, and the sandbox's four variables (PATH, HOME, TMPDIR, LANG): none of the caller's
    assert answer.trace[0]["observation"].strip() == "42 4" and answer.text == "Answer: 42"


def test_the_trace_says_where_a_trajectory_went_wrong():
    """A wrong place searched and a wrong division score 0 on their hand-offs; a sum worked out by hand
    scores "did not call the calculator", one the calculator gave scores right; an answer that states
    another number than the calculator's last result did not copy it."""
    multihop, arithmetic = get_task("multihop"), get_task("arithmetic")
    e = multihop.examples("test")[0]
    trace = [{"action": {"name": "search", "arguments": {"query": f"population of {e.meta['a']}"}}, "observation": ""},
             {"action": {"name": "search", "arguments": "not an object"}, "observation": ""},
             {"action": {"name": "calculator", "arguments": {"expression": "1/1"}}, "observation": "1"}]
    assert multihop.trace_scores(e, trace, "1") == {"searched_both": 0.0, "calculator_right": 0.0,
                                                    "answer_copies_calculator": 1.0}
    sum_ = arithmetic.examples("test")[0]
    assert arithmetic.trace_scores(sum_, [], "Answer: 12") == {"called_calculator": 0.0, "calculator_right": 0.0}
    result = str(sum_.meta["answer"])
    call = [{"action": {"name": "calculator", "arguments": {}}, "observation": result}]
    assert arithmetic.trace_scores(sum_, call, result) == {"called_calculator": 1.0, "calculator_right": 1.0,
                                                           "answer_copies_calculator": 1.0}
    # 3.987281 answered as 3.137281: one chunk of digits miscopied (DEVELOPERS.md)
    division = [{"action": {"name": "calculator", "arguments": {}}, "observation": "3.987281"}]
    assert arithmetic.trace_scores(sum_, division, "3.137281")["answer_copies_calculator"] == 0.0
    assert arithmetic.trace_scores(sum_, division, "Answer: 3.987281")["answer_copies_calculator"] == 1.0
    assert get_task("spell").trace_scores(sum_, call, result) == {}  # a task without tool steps measures none
