"""Battles between checkpoints: each answers the same held-out prompts, and every pair is judged.

    pocketgpt arena runs/speedrun/base runs/speedrun/sft runs/speedrun/ppo runs/speedrun/grpo

A base checkpoint is asked through a few-shot document, an assistant through the chat format, so
each is at its best. The judge is the tasks' exact verifier with the labelers' rubric (truthful,
then an honest "I don't know", then wrong; a cut-off reply loses to a finished one): the same
rubric the reward model learned. A judge model (any `LM`) can be asked instead; it sees both orders
(A/B and B/A), and a verdict that flips with the order counts as a tie (its position bias cancels).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data.tasks import Example, Task, get_task
from ..data.tasks.base import truthfulness
from ..data.tasks.prompts import chat_messages, fewshot_text
from ..reason.lm import LM, Request
from .arena import Battle

ARENA_TASKS = ("factqa_head", "factqa_tail", "factqa_unseen", "arithmetic", "compare_decimals", "multihop")


@dataclass
class Contestant:
    name: str
    lm: LM
    mode: str  # "fewshot" (a base model continues a document) or "chat"


def answers(c: Contestant, task: Task, examples: list[Example], max_tokens: int = 128) -> list[str]:
    if c.lm.context:  # a reply may take half the context at most: a 128-token model had no room for a prompt
        max_tokens = min(max_tokens, c.lm.context // 2)
    if c.mode == "fewshot":
        gens = c.lm.complete_batch([fewshot_text(task, e, 3) for e in examples], max_tokens=max_tokens,
                                   stop=("\n\n", "\nQ:"))
        return [g.text.strip() for g in gens]
    style = "cot" if "cot" in task.styles else "direct"
    replies = c.lm.chat_batch([Request(chat_messages(task, e, 0, style), max_tokens=max_tokens) for e in examples])
    return [gens[0].text.strip() for gens in replies]


def rubric_verdict(task: Task, example: Example, a: str, b: str) -> str:
    la, lb = truthfulness(task, example, a), truthfulness(task, example, b)
    if la == lb:
        return "both_bad" if la == 2 else "tie"
    return "a" if la < lb else "b"


JUDGE_PROMPT = ("Question: {q}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer is more correct and helpful? "
                "Reply with one word: A, B or tie.")


def judge_verdicts(judge: LM, pairs: list[tuple[str, str, str]]) -> list[str]:
    """(question, a, b) -> verdicts, each asked in both orders; disagreeing orders make a tie."""
    def ask(q: str, a: str, b: str) -> Request:
        return Request([{"role": "user", "content": JUDGE_PROMPT.format(q=q, a=a, b=b)}], max_tokens=4)

    def read(text: str) -> str:
        word = text.strip().split()[0].strip(".:,").lower() if text.strip() else ""
        return {"a": "a", "b": "b"}.get(word, "tie")

    forward = judge.chat_batch([ask(q, a, b) for q, a, b in pairs])
    backward = judge.chat_batch([ask(q, b, a) for q, a, b in pairs])
    out = []
    for f, r in zip(forward, backward):
        first, second = read(f[0].text), {"a": "b", "b": "a"}.get(read(r[0].text), "tie")
        out.append(first if first == second else "tie")
    return out


def play(contestants: list[Contestant], tasks: tuple[str, ...] = ARENA_TASKS, per_task: int = 30,
         seed: int = 0, judge: LM | None = None) -> tuple[list[Battle], list[dict]]:
    """Every pair of contestants on every prompt, sides drawn at random (seeded); the battles and a
    record of each (prompt, answers, verdict) for reading."""
    rng = random.Random(seed)
    battles, records = [], []
    for name in tasks:
        task = get_task(name)
        examples = task.examples("test")[:per_task]
        said = {c.name: answers(c, task, examples) for c in contestants}
        games = []
        for i, e in enumerate(examples):
            for x in range(len(contestants)):
                for y in range(x + 1, len(contestants)):
                    a, b = (contestants[x], contestants[y]) if rng.random() < 0.5 else (contestants[y], contestants[x])
                    games.append((e, a.name, b.name, said[a.name][i], said[b.name][i]))
        if judge is None:
            verdicts = [rubric_verdict(task, e, ta, tb) for e, _, _, ta, tb in games]
        else:
            verdicts = judge_verdicts(judge, [(e.question, ta, tb) for e, _, _, ta, tb in games])
        for (e, na, nb, ta, tb), v in zip(games, verdicts):
            battles.append(Battle(na, nb, v, len(ta), len(tb)))
            records.append({"task": name, "question": e.question, "model_a": na, "model_b": nb,
                            "answer_a": ta, "answer_b": tb, "winner": v})
    return battles, records
