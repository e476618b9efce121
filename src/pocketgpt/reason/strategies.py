"""Reasoning strategies from "State of GPT": give the model tokens to think, sample and vote, let it
check itself, search, and act with tools. Each works on any `LM` (a local run or an
OpenAI-compatible server) and reports its cost (model calls and tokens) next to its accuracy.

    direct            the question alone (or after solved examples in the direct rendering), the reply
                      held to the task's answer form where it has one (an arithmetic result: digits)
    cot               worked examples as earlier turns, or zero-shot "Let's think step by step."; on the
                      Game of 24 the lines' results written by a calculator, as ToT's are (chain.py)
    self_consistency  k samples of the step-by-step answer at a temperature; the majority answer wins
    reflection        the model checks its answer and samples again when it says "no" (reflection.py)
    tot               Tree of Thoughts on the Game of 24: BFS with a beam, or DFS (tot.py)
    react             thought / tool call / observation, with self-consistency as the fallback (react.py);
                      `paths`: several sampled trajectories per question and a vote over their answers
    constrained       the answer held to the task's JSON schema by constrained decoding
    rag               passages retrieved from the world's encyclopedia, then the answer from them (rag/);
                      `quote`: the answer is one of their sentences, verbatim

    lm = LM.load("runs/speedrun/sft")
    result, rows = evaluate_strategy(lm, get_task("game24"), "tot", settings=Settings(beam=5), n=50)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial

from ..common import PocketError, wilson_interval
from ..data.tasks import Example, Task, default_world
from ..data.tasks.prompts import chat_messages
from ..data.tasks.tools import SPECS, task_tools
from ..data.world import statement
from .chain import calculator_chains
from .lm import LM, Request, Usage
from .react import react
from .reflection import reflection
from .tot import tree_of_thoughts
from .vote import Answer, majority, vote, vote_curve

__all__ = ["STRATEGIES", "Answer", "Settings", "StrategyResult", "ask", "check_suited", "evaluate_strategy", "majority"]


@dataclass
class Settings:
    """Every strategy's knobs; each strategy reads the ones it has."""
    shots: int = 0  # solved examples as earlier turns
    think: bool = False  # append "Let's think step by step." (zero-shot CoT)
    k: int = 5  # self-consistency samples (and ReAct's fallback)
    temperature: float = 0.7  # of sampled answers, votes and retries
    max_tokens: int = 256
    seed: int = 0
    beam: int = 5  # ToT breadth-first: positions kept per move
    search: str = "bfs"  # ToT: bfs or dfs
    value_samples: int = 3  # ToT: votes per position
    oracle: bool = False  # ToT ablation: the exact solver judges positions instead of the model
    # Game of 24: a move's result by "calculator" (ToT's proposals and CoT's lines), or the model's own,
    # "checked" (ToT drops a false claim) or "claimed" (taken as written; CoT's lines in one go)
    move_arithmetic: str = "calculator"
    proposals: int = 1  # ToT: proposals per position (more are sampled at `temperature`, their moves merged)
    max_expansions: int = 12  # ToT depth-first: proposals per puzzle
    rounds: int = 2  # reflection: retries after the first answer
    max_steps: int = 4  # ReAct: tool calls before the fallback
    paths: int = 1  # ReAct: trajectories per question, sampled and voted on when more than one
    tools: tuple[str, ...] = ("calculator", "search")  # ReAct's tools (python too, with root)
    retriever: str = "hybrid"  # rag: bm25, dense or hybrid
    passages: int = 2  # rag: retrieved chunks in the prompt
    quote: bool = False  # rag: the answer is one of the passages' sentences, verbatim (rag/answer.py)


def _sampled(lm: LM, task: Task, examples: list[Example], s: Settings, style: str, n: int,
             temperature: float, json_schema: bool = False) -> list[list[str]]:
    think = s.think and style != "direct"
    regex = task.answer_pattern if style == "direct" and not json_schema else None
    requests = [Request(chat_messages(task, e, s.shots, style, think), n=n, temperature=temperature,
                        max_tokens=s.max_tokens, seed=s.seed + i if temperature > 0 else None,
                        json_schema=e.meta["schema"] if json_schema else None, regex=regex)
                for i, e in enumerate(examples)]
    return [[g.text for g in gens] for gens in lm.chat_batch(requests)]


def _cot_style(task: Task) -> str:
    return "cot" if "cot" in task.styles else "direct"


def direct(lm: LM, task: Task, examples: list[Example], s: Settings) -> list[Answer]:
    return [Answer(t[0], t) for t in _sampled(lm, task, examples, s, "direct", 1, 0.0)]


def _chains(lm: LM, task: Task, examples: list[Example], s: Settings, n: int, temperature: float) -> list[list[str]]:
    """Worked replies; on the Game of 24 each move's result written by the calculator, as Tree of Thoughts
    has it (chain.py), unless `move_arithmetic` leaves the arithmetic to the model."""
    if task.name == "game24" and s.move_arithmetic == "calculator":
        return calculator_chains(lm, task, examples, n, temperature, s.shots, s.think, s.seed)
    return _sampled(lm, task, examples, s, _cot_style(task), n, temperature)


def cot(lm: LM, task: Task, examples: list[Example], s: Settings) -> list[Answer]:
    return [Answer(t[0], t) for t in _chains(lm, task, examples, s, 1, 0.0)]


def self_consistency(lm: LM, task: Task, examples: list[Example], s: Settings) -> list[Answer]:
    samples = _chains(lm, task, examples, s, s.k, s.temperature)
    return [vote(t, key=partial(task.answer_key, e)) for e, t in zip(examples, samples)]


def reflect(lm: LM, task: Task, examples: list[Example], s: Settings) -> list[Answer]:
    return reflection(lm, task, examples, s.rounds, s.shots, s.temperature, s.max_tokens, s.seed)


def tot(lm: LM, task: Task, examples: list[Example], s: Settings) -> list[Answer]:
    return tree_of_thoughts(lm, [e.meta["numbers"] for e in examples], s.search, s.beam, s.value_samples,
                            s.temperature, s.oracle, s.seed, s.max_expansions, s.shots,
                            s.move_arithmetic, s.proposals)


def act(lm: LM, task: Task, examples: list[Example], s: Settings) -> list[Answer]:
    available = {**task_tools(getattr(task, "world", None) or default_world())}
    specs = dict(SPECS)
    if "python" in s.tools:
        from ..tools.python import SPEC, python_tool

        available["python"], specs["python"] = python_tool, SPEC
    unknown = [t for t in s.tools if t not in available]
    if unknown:
        raise PocketError(f"unknown tool {unknown[0]!r}; available: {', '.join(sorted({*available, 'python'}))}")
    return react(lm, task, examples, {t: available[t] for t in s.tools}, [specs[t] for t in s.tools],
                 s.max_steps, s.shots, fallback_k=s.k, temperature=s.temperature, seed=s.seed, paths=s.paths)


def constrained(lm: LM, task: Task, examples: list[Example], s: Settings) -> list[Answer]:
    return [Answer(t[0], t) for t in _sampled(lm, task, examples, s, "direct", 1, 0.0, json_schema=True)]


def rag(lm: LM, task: Task, examples: list[Example], s: Settings) -> list[Answer]:
    """Retrieve passages from the world's encyclopedia and answer from them (rag/), in the model's own
    words or, with `quote`, by quoting one of their sentences; the gold passage's recall (the passage
    that states the fact) is scored beside the answer."""
    from ..rag.answer import rag_request
    from ..rag.world import world_index

    index = world_index()
    hits = [index.search(e.question, s.passages, s.retriever) for e in examples]
    requests = [rag_request(e.question, found, s.quote, max_tokens=64) for e, found in zip(examples, hits)]
    answers = []
    for e, found, gens in zip(examples, hits, lm.chat_batch(requests)):
        stated = statement(task.world.fact(e.meta["entity"], e.meta["attribute"]))  # the gold passage's text
        gold = any(stated in h.chunk.text for h in found)
        answers.append(Answer(gens[0].text, [gens[0].text], {}, [{"passages": [h.chunk.id for h in found]}],
                              {f"recall@{s.passages}": float(gold)}))
    return answers


STRATEGIES: dict[str, Callable[[LM, Task, list[Example], Settings], list[Answer]]] = {
    "direct": direct, "cot": cot, "self_consistency": self_consistency, "reflection": reflect,
    "tot": tot, "react": act, "constrained": constrained, "rag": rag,
}


# What a strategy needs of a task's questions, and what it says of a task without it.
NEEDS: dict[str, tuple[Callable[[Task, Example], bool], str]] = {
    "tot": (lambda task, e: task.name == "game24", "tot searches Game of 24 positions; task {!r} has no propose/value steps"),
    "constrained": (lambda task, e: "schema" in e.meta, "task {!r} has no JSON schema to hold its answers to"),
    "rag": (lambda task, e: "entity" in e.meta and "value" in e.meta,
            "rag answers questions about the world's entities; task {!r} has none"),
}


def check_suited(strategy: str, task: Task, examples: list[Example]) -> None:
    """A PocketError if `strategy` is unknown or cannot answer these questions of `task`: a command checks
    every task this way before the first one runs."""
    if strategy not in STRATEGIES:
        raise PocketError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    suits, why = NEEDS.get(strategy, (lambda task, e: True, ""))
    if not all(suits(task, e) for e in examples):
        raise PocketError(why.format(task.name))


def ask(lm: LM, task: Task, examples: list[Example], strategy: str, settings: Settings | None = None) -> list[Answer]:
    """Answer every example with a strategy; requests go to the model in batches."""
    check_suited(strategy, task, examples)
    return STRATEGIES[strategy](lm, task, examples, settings or Settings())


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
    scores: dict[str, float] = field(default_factory=dict)  # the task's finer measures, averaged where they apply
    label: str = ""  # the matrix row's name ("tot b=5"), when it differs from the strategy
    # Where every answer is a vote over k samples: the accuracy of one sample (the mean over the k), and of
    # the vote over the first 1, 2, ..., k samples (the self-consistency paper's curve).
    one_sample: float | None = None
    vote_curve: list[float] = field(default_factory=list)

    def line(self) -> str:
        extra = "".join(f"  {k}={v:.1%}" for k, v in self.scores.items())
        if self.one_sample is not None:
            extra += f"  one sample={self.one_sample:.1%}"
        return (f"{self.task:>18} {self.label or self.strategy:>18}  {self.accuracy:6.1%}  "
                f"[{self.ci_low:.1%}, {self.ci_high:.1%}]  n={self.n}  calls={self.calls}  "
                f"tokens={self.prompt_tokens + self.completion_tokens}{extra}")

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_strategy(lm: LM, task: Task, strategy: str, split: str = "test", n: int | None = None,
                      settings: Settings | None = None, label: str = "") -> tuple[StrategyResult, list[dict]]:
    """Accuracy of a strategy on a task's split, with its cost; and one row per example."""
    examples = task.examples(split)[:n] if n else task.examples(split)
    before = Usage(**asdict(lm.usage))
    answers = ask(lm, task, examples, strategy, settings)
    rows = [{"question": e.question, "answer": e.answer, "output": a.text, "correct": task.verify(e, a.text),
             "scores": {**task.scores(e, a.text), **a.scores}, "votes": a.votes, "trace": a.trace,
             **_sample_verdicts(task, e, a)}
            for e, a in zip(examples, answers)]
    correct = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(correct, len(rows))
    # A measure averages over the replies it applies to (a direct answer has no working to read).
    names = dict.fromkeys(k for r in rows for k in r["scores"])
    scores = {k: sum(r["scores"][k] for r in rows if k in r["scores"]) / sum(k in r["scores"] for r in rows)
              for k in names}
    u = lm.usage
    result = StrategyResult(task.name, strategy, len(rows), correct, correct / max(1, len(rows)), lo, hi,
                            u.calls - before.calls, u.prompt_tokens - before.prompt_tokens,
                            u.completion_tokens - before.completion_tokens, scores, label)
    voted = [len(r.get("samples_correct", [])) for r in rows]
    if voted and voted[0] > 1 and len(set(voted)) == 1:  # every answer a vote over the same number of samples
        result = replace(result, one_sample=sum(one_sample(r) for r in rows) / len(rows),
                         vote_curve=[sum(r["vote_by_k"][k] for r in rows) / len(rows)
                                     for k in range(len(rows[0]["vote_by_k"]))])
    return result, rows


def one_sample(row: dict) -> float:
    """The chance that one of a voted question's samples, drawn alone, is right."""
    return sum(row["samples_correct"]) / len(row["samples_correct"])


def _sample_verdicts(task: Task, example: Example, answer: Answer) -> dict:
    """For an answer voted over several samples: each sample's verdict, and the vote's over the first k."""
    if not answer.voted or len(answer.samples) < 2:
        return {}
    correct = [bool(task.verify(example, t)) for t in answer.samples]
    return {"samples_correct": correct, "vote_by_k": vote_curve(answer.samples, correct, partial(task.answer_key, example))}
