"""ReAct (Yao et al. 2022): the model interleaves thoughts and actions, and reads each observation.

    Thought 1 / Action 1   the assistant's turn: text (its thought) and a tool call (search, calculator...)
    Observation 1          the tool's result, as a tool message
    ...                    until a turn without a call: that is the answer

The loop speaks OpenAI function calling through the `LM` protocol, so it runs unchanged against our
engine and any server. Every conversation of a batch advances one step per round (one batched model
call), up to `max_steps` actions. As in the paper, a question that runs out of steps (or of
context) without an answer backs off to self-consistency: k chain-of-thought samples and a vote.
Observations are cut to about `max_observation_chars`: their beginning (as the paper's search keeps the
first sentences) and their end (where a traceback says what went wrong).

With `paths` > 1 every question is worked along that many trajectories, sampled at `temperature`, and
their answers are voted on: self-consistency on top of acting. It pays where slips (a miscopied
operand, a wrong query) differ from path to path; a model whose slips repeat gains nothing
(DEVELOPERS.md measures both on arithmetic).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..common import PocketError
from ..data.tasks import Example, Task
from ..data.tasks.prompts import chat_messages
from ..toolloop import run_tool
from ..tools import clip
from .lm import LM, Request, tool_call_messages
from .vote import Answer, vote

Tool = Callable[..., str]


def react(lm: LM, task: Task, examples: list[Example], tools: dict[str, Tool], specs: list[dict],
          max_steps: int = 4, shots: int = 0, max_tokens: int = 96, max_observation_chars: int = 400,
          fallback_k: int = 5, temperature: float = 0.7, seed: int = 0, paths: int = 1) -> list[Answer]:
    """Answer each example by acting with tools; a trace of (thought, action, observation) per answer,
    or with `paths` > 1 one such trace per trajectory and the vote over their answers."""
    if paths < 1:
        raise PocketError(f"paths must be at least 1, not {paths}")
    if paths == 1:
        return _trajectories(lm, task, examples, tools, specs, max_steps, shots, max_tokens, max_observation_chars,
                             fallback_k, temperature, seed, sampled=False)
    walked = _trajectories(lm, task, [e for e in examples for _ in range(paths)], tools, specs, max_steps, shots,
                           max_tokens, max_observation_chars, fallback_k, temperature, seed, sampled=True)
    groups = [walked[start:start + paths] for start in range(0, len(walked), paths)]
    return [vote([a.text for a in mine], [{"path": p, "steps": a.trace} for p, a in enumerate(mine)],
                 partial(task.answer_key, e)) for e, mine in zip(examples, groups)]


def _trajectories(lm: LM, task: Task, examples: list[Example], tools: dict[str, Tool], specs: list[dict],
                  max_steps: int, shots: int, max_tokens: int, max_observation_chars: int, fallback_k: int,
                  temperature: float, seed: int, sampled: bool) -> list[Answer]:
    """One trajectory per example, all advancing together: greedy, or `sampled` at `temperature` with a
    seed of its own per trajectory and step (so the paths of one question part ways)."""
    style = "tool" if "tool" in task.styles else "direct"
    conversations = [chat_messages(task, e, shots, style) for e in examples]
    traces: list[list[dict]] = [[] for _ in examples]
    answers: dict[int, Answer] = {}
    active = list(range(len(examples)))
    for step in range(max_steps + 1):  # max_steps actions, then one last turn to answer
        if not active:
            break
        replies = lm.chat_each([Request(conversations[i], max_tokens=max_tokens, tools=specs,
                                    temperature=temperature if sampled else 0.0,
                                    seed=seed + step * len(examples) + i if sampled else None) for i in active])
        still = []
        for i, gens in zip(active, replies):
            g = gens[0] if gens else None
            if g is None or g.finish_reason == "length":
                continue  # out of context or tokens: the fallback answers
            if not g.tool_calls:
                answers[i] = Answer(g.text, [g.text], {}, traces[i])
                continue
            if step == max_steps:
                continue  # the budget is spent: the fallback answers
            results = [clip(run_tool(tools, c["name"], c["arguments"]), max_observation_chars) for c in g.tool_calls]
            traces[i] += [{"thought": g.text, "action": c, "observation": r} for c, r in zip(g.tool_calls, results)]
            conversations[i] = conversations[i] + tool_call_messages(g, results, step)
            still.append(i)
        active = still
    unanswered = [i for i in range(len(examples)) if i not in answers]
    if unanswered:
        cot = "cot" if "cot" in task.styles else "direct"
        requests = [Request(chat_messages(task, examples[i], 0, cot), n=fallback_k, temperature=temperature,
                            max_tokens=256, seed=seed + i) for i in unanswered]
        for i, gens in zip(unanswered, lm.chat_each(requests)):  # a question too long even so: no answer
            answers[i] = vote([g.text for g in gens], [*traces[i], {"fallback": "self_consistency"}],
                              partial(task.answer_key, examples[i]))
    for i, answer in answers.items():  # where the trajectory went wrong, beside whether its answer is right
        answer.scores = {**answer.scores, **task.trace_scores(examples[i], traces[i], answer.text)}
    return [answers[i] for i in range(len(examples))]
