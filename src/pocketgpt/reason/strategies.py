"""Reasoning strategies from "State of GPT": give the model tokens to think, then vote.

    direct            the question alone (or after solved examples in the direct rendering)
    cot               worked examples as earlier turns, or zero-shot "Let's think step by step."
    self_consistency  k samples of the step-by-step answer at a temperature; the majority final answer wins

Each strategy works on any `LM` (a local run or an OpenAI-compatible server) and reports its cost:
model calls and tokens, next to its accuracy with a 95% interval.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from ..common import PocketError
from ..data.tasks import Example, Task
from ..data.tasks.base import final_answer, normalize
from ..data.tasks.prompts import chat_messages
from .lm import LM, Request, Usage

STRATEGIES = ("direct", "cot", "self_consistency")


@dataclass
class Answer:
    """A strategy's answer to one question: the text that is verified, and how it was reached."""
    text: str
    samples: list[str] = field(default_factory=list)
    votes: dict[str, int] = field(default_factory=dict)  # normalised final answer -> samples that gave it


def majority(texts: list[str]) -> tuple[int, dict[str, int]]:
    """The sample whose final answer most samples share, and the vote count of every answer.

    Answers are compared after normalisation ("Answer: 1,234." and "answer: 1234" agree). Samples with
    no answer do not vote; a tie goes to the answer given first; with no answer at all, sample 0."""
    answers = [normalize(final_answer(t)) for t in texts]
    votes = Counter(a for a in answers if a)
    if not votes:
        return 0, {}
    best = max(votes.values())
    winner = next(a for a in answers if a and votes[a] == best)
    return answers.index(winner), dict(votes)


def ask(lm: LM, task: Task, examples: list[Example], strategy: str, shots: int = 0, k: int = 5,
        temperature: float = 0.7, think: bool = False, max_tokens: int = 256, seed: int = 0) -> list[Answer]:
    """Answer every example with a strategy; the requests go to the model as one batch."""
    if strategy not in STRATEGIES:
        raise PocketError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    style = "direct" if strategy == "direct" else ("cot" if "cot" in task.styles else "direct")
    n, temp = (k, temperature) if strategy == "self_consistency" else (1, 0.0)
    requests = [Request(chat_messages(task, e, shots, style, think and strategy != "direct"), n=n, temperature=temp,
                        max_tokens=max_tokens, seed=seed + i if temp > 0 else None) for i, e in enumerate(examples)]
    answers = []
    for gens in lm.chat_batch(requests):
        texts = [g.text for g in gens]
        if strategy == "self_consistency":
            pick, votes = majority(texts)
            answers.append(Answer(texts[pick], texts, votes))
        else:
            answers.append(Answer(texts[0], texts))
    return answers


@dataclass
class StrategyResult:
    task: str
    strategy: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    calls: int
    prompt_tokens: int
    completion_tokens: int

    def line(self) -> str:
        return (f"{self.task:>18} {self.strategy:>16}  {self.accuracy:6.1%}  [{self.ci_low:.1%}, {self.ci_high:.1%}]  "
                f"n={self.n}  calls={self.calls}  tokens={self.prompt_tokens + self.completion_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_strategy(lm: LM, task: Task, strategy: str, split: str = "test", n: int | None = None,
                      **kwargs) -> tuple[StrategyResult, list[dict]]:
    """Accuracy of a strategy on a task's split, with its cost; and one row per example."""
    from ..evaluate.harness import wilson_interval

    examples = task.examples(split)[:n] if n else task.examples(split)
    before = Usage(**asdict(lm.usage))
    answers = ask(lm, task, examples, strategy, **kwargs)
    rows = [{"question": e.question, "answer": e.answer, "output": a.text, "correct": task.verify(e, a.text),
             "votes": a.votes} for e, a in zip(examples, answers)]
    correct = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(correct, len(rows))
    u = lm.usage
    return StrategyResult(task.name, strategy, len(rows), correct, correct / max(1, len(rows)), lo, hi,
                          u.calls - before.calls, u.prompt_tokens - before.prompt_tokens,
                          u.completion_tokens - before.completion_tokens), rows
