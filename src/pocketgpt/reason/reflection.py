"""Reflection: the model checks its own answer against the question and tries again when it finds
it wrong (a self-check without the task's verifier, as Reflexion and "ask it to check its work" do).

    round 0   a greedy chain-of-thought answer
    check     "<question> / Proposed answer: <reply> / Is the proposed answer right? Reply yes or no."
    round r   a "no" sends the question back for a fresh sample (temperature, its own seed), up to `rounds`

The first answer the model accepts is the answer; if it accepts none, the majority of its attempts.
The task's verifier never enters the loop: it only scores the final answer.
"""

from __future__ import annotations

from functools import partial

from ..data.tasks import Example, Task
from ..data.tasks.base import check_prompt
from ..data.tasks.prompts import chat_messages
from .lm import LM, Request
from .vote import Answer, vote


def accepts(text: str) -> bool:
    """Whether a check reply says yes (the first yes/no word it holds; neither counts as no)."""
    for word in text.lower().replace(",", " ").replace(".", " ").split():
        if word in ("yes", "no"):
            return word == "yes"
    return False


def reflection(lm: LM, task: Task, examples: list[Example], rounds: int = 2, shots: int = 0,
               temperature: float = 0.7, max_tokens: int = 256, seed: int = 0) -> list[Answer]:
    style = "cot" if "cot" in task.styles else "direct"
    attempts: list[list[str]] = [[] for _ in examples]
    traces: list[list[dict]] = [[] for _ in examples]
    answers: dict[int, Answer] = {}
    pending = list(range(len(examples)))
    for r in range(rounds + 1):
        temp = 0.0 if r == 0 else temperature
        requests = [Request(chat_messages(task, examples[i], shots, style), temperature=temp, max_tokens=max_tokens,
                            seed=None if temp == 0 else seed + 1000 * r + i) for i in pending]
        # A reply or a check the model cannot take (the check quotes the reply: it may outgrow the context) is
        # empty: a check that did not fit accepts nothing, and the question goes to the next round or the vote.
        replies = [gens[0].text if gens else "" for gens in lm.chat_each(requests)]
        checks = lm.chat_each([Request([{"role": "user", "content": check_prompt(examples[i].question, text)}],
                                       max_tokens=4) for i, text in zip(pending, replies)])
        still = []
        for i, text, verdict in zip(pending, replies, checks):
            said = verdict[0].text if verdict else ""
            ok = accepts(said)
            attempts[i].append(text)
            traces[i].append({"round": r, "reply": text, "check": said, "accepted": ok})
            if ok:
                answers[i] = Answer(text, attempts[i], {}, traces[i])
            else:
                still.append(i)
        pending = still
        if not pending:
            break
    for i in pending:
        answers[i] = vote(attempts[i], traces[i], partial(task.answer_key, examples[i]))
    return [answers[i] for i in range(len(examples))]
