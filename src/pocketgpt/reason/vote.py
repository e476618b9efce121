"""What a strategy returns for one question, and the majority vote that self-consistency takes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..data.tasks.base import answer_words


@dataclass
class Answer:
    """A strategy's answer to one question: the text that is verified, and how it was reached."""
    text: str
    samples: list[str] = field(default_factory=list)  # every reply the answer was chosen from
    votes: dict[str, int] = field(default_factory=dict)  # answer key (Task.answer_key) -> samples that gave it
    trace: list[dict] = field(default_factory=list)  # the steps of a search or an agent, for reading
    scores: dict[str, float] = field(default_factory=dict)  # the strategy's own measures (retrieval recall)
    voted: bool = False  # the text won a majority vote over the samples (not, say, a retry the model accepted)


def majority(texts: list[str], key: Callable[[str], str] = answer_words) -> tuple[int, dict[str, int]]:
    """The sample whose answer most samples share, and the vote count of every answer.

    Answers are compared by their key (a task's `answer_key`: "Answer: 1,234." and "answer: 1234" agree).
    Samples with no answer (an empty key) do not vote; a tie goes to the answer given first; with no answer
    at all, sample 0."""
    answers = [key(t) for t in texts]
    votes = Counter(a for a in answers if a)
    if not votes:
        return 0, {}
    best = max(votes.values())
    winner = next(a for a in answers if a and votes[a] == best)
    return answers.index(winner), dict(votes)


def vote_curve(texts: list[str], correct: list[bool], key: Callable[[str], str] = answer_words) -> list[bool]:
    """Whether the vote over the first k samples is right, for k = 1 .. all of them (`correct`: each sample's
    own verdict). Averaged over questions it is the self-consistency paper's accuracy against the number of
    sampled paths, whose first point is one sample."""
    return [correct[majority(texts[:k], key)[0]] for k in range(1, len(texts) + 1)]


def vote(texts: list[str], trace: list[dict] | None = None, key: Callable[[str], str] = answer_words) -> Answer:
    """Self-consistency over replies: the majority answer, with all samples and the vote."""
    pick, votes = majority(texts, key)
    return Answer(texts[pick] if texts else "", texts, votes, trace or [], voted=True)
