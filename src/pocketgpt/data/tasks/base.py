"""What every task shares: examples, fixed splits, answer parsing, renderings as chat messages.

A task is three things:
- a generator of examples, routed to fixed, disjoint train/validation/test splits;
- an exact verifier that reads the final answer out of a model's free text;
- renderings of an example as OpenAI-style chat messages, in the styles it supports:
  "direct" (just the answer), "cot" (steps, then "Answer: ..."), "tool" (tool calls, then the answer),
  "sentence" (the answer restating its subject), "check" (is this worked answer right? yes / no:
  the self-check of the reflection strategy).

A subclass writes `generate` and `check`, and `cot` / `tool` for the styles it supports.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

from ...errors import PocketError

SPLITS = ("train", "validation", "test")
STYLES = ("direct", "cot", "tool", "sentence", "check")
ANSWERING = ("direct", "cot", "tool", "sentence")  # renderings that end in the question's answer
SPLIT_SHARES = (("train", 0.6), ("validation", 0.15), ("test", 0.25))
UNLIMITED = {split: 10**9 for split in SPLITS}  # sizes for tasks bounded by their own problem space


@dataclass
class Example:
    question: str  # the user's question as text
    answer: str    # the canonical short answer (what a few-shot prompt shows after "A:")
    meta: dict = field(default_factory=dict)  # what the verifier needs (numbers, entity, tier...)


def split_of(key: str) -> str:
    """The split a problem belongs to, from a stable hash of its key.

    Hashing (not drawing) makes splits disjoint by construction, and a problem never moves to
    another split when the seed or the split sizes change.
    """
    u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    for split, share in SPLIT_SHARES:
        if u < share:
            return split
        u -= share
    return SPLITS[-1]


class Task:
    name = "task"
    styles: tuple[str, ...] = ("direct",)
    sizes = {"train": 1000, "validation": 200, "test": 300}
    unique_working = True  # one right way to work each example out (`cot`), so any other step is wrong
    # A direct answer's form (a regular expression): the `direct` strategy holds the reply to it by
    # constrained decoding, so that "direct" means answering at once even from a model trained to work
    # every answer out. None: a direct reply is free text.
    answer_pattern: str | None = None
    # The rendering SFT also draws from other worlds (tasks/practice.py), where only the context answers;
    # None: the task has no such practice.
    practice_style: str | None = None
    max_misses = 2000  # stop drawing after this many repeats in a row: the problem space is used up

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._splits: dict[str, list[Example]] | None = None

    # -- what a task implements -----------------------------------------------------------------

    def generate(self, rng: random.Random) -> Iterator[Example]:
        """Candidate examples, possibly forever, possibly with repeats."""
        raise NotImplementedError

    def check(self, example: Example, output: str) -> bool:
        """The verdict on a non-empty output; must not raise."""
        raise NotImplementedError

    def split_key(self, example: Example) -> str:
        """What identifies a problem, for splitting and de-duplication."""
        return example.question

    def answer_key(self, example: Example, output: str) -> str:
        """What self-consistency votes on: two replies agree when their keys are equal, so a key reads the
        reply as `check` does ("" for a reply that gives no answer: it does not vote). Here the final answer's
        words; a task whose answer is a number or an expression keys it exactly."""
        return answer_words(output)

    def trace_scores(self, example: Example, trace: list[dict], output: str) -> dict[str, float]:
        """Where a tool-using trajectory (ReAct's steps: {"action": {"name", "arguments"}, "observation"})
        and its answer `output` went right or wrong, each measure 0 or 1; none by default."""
        return {}

    def cot(self, example: Example) -> str:
        """The step-by-step assistant reply, ending in a line "Answer: ..."."""
        raise NotImplementedError

    def tool(self, example: Example) -> list[dict]:
        """The assistant/tool messages that solve the example with tools, ending in the answer."""
        raise NotImplementedError

    def sentence(self, example: Example) -> str:
        """The answer as a full sentence that restates the question's subject."""
        raise NotImplementedError

    # -- what every task gets -------------------------------------------------------------------

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise PocketError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
        if self._splits is None:
            self._splits = self._fill_splits()
        return list(self._splits[split])

    def _fill_splits(self) -> dict[str, list[Example]]:
        """Route generated examples to the split their key hashes to, until every split is full."""
        splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        seen, misses = set(), 0
        # Seeded by class, not name, so variants (factqa_head) phrase questions as the full task does.
        for example in self.generate(random.Random(f"{type(self).__name__}:{self.seed}")):
            key = self.split_key(example)
            if key in seen:
                misses += 1
                if misses > self.max_misses:
                    break
                continue
            seen.add(key)
            misses = 0
            split = split_of(key)
            if len(splits[split]) < self.sizes[split]:
                splits[split].append(example)
            if all(len(splits[s]) >= self.sizes[s] for s in SPLITS):
                break
        return splits

    def verify(self, example: Example, output: str) -> bool:
        """Exact verdict on a model's free-text output; malformed output is False, never an error."""
        if not isinstance(output, str) or not output.strip():
            return False
        return self.check(example, output)

    def scores(self, example: Example, output: str) -> dict[str, float]:
        """Finer measures than right/wrong where a task has them (a JSON answer's schema validity and
        share of right fields); none by default. A measure that does not apply to a reply (a bare
        answer has no working to read) is left out, and averages skip it."""
        return {}

    def sound_working(self, example: Example, output: str) -> bool:
        """Whether every step written before the final answer line is a step of the reference working.

        A right answer after a wrong step ("spell the word: r-e-f-c-e" for "tisdu") is a lucky guess,
        and a labeler who reads the whole reply counts it wrong. A reply with no steps passes.
        """
        if "cot" not in self.styles or not self.unique_working:
            return True
        steps = {_step(line) for line in self.cot(example).splitlines()}
        shown = [_step(line) for line in output.strip().splitlines()[:-1]]
        return all(step in steps for step in shown if step)

    def render(self, example: Example, style: str = "direct") -> list[dict]:
        """The example as OpenAI-style chat messages: the user's question, then the assistant side."""
        self.check_style(style)
        user = {"role": "user", "content": example.question}
        if style == "direct":
            return [user, assistant(example.answer)]
        if style == "cot":
            return [user, assistant(self.cot(example))]
        if style == "sentence":
            return [user, assistant(self.sentence(example))]
        if style == "check":
            return self.check_rendering(example)
        return [user, *self.tool(example)]

    def check_rendering(self, example: Example) -> list[dict]:
        """Half the time the reference working, half the time the working with one number changed;
        the assistant says whether it is right. The model learns to check a reply step by step."""
        rng = random.Random(f"{example.question}:check")
        reply = self.cot(example)
        if rng.random() < 0.5:
            reply = corrupt_number(reply, rng)
        right = reply == self.cot(example)
        return [{"role": "user", "content": check_prompt(example.question, reply)},
                assistant("yes" if right else "no")]

    def render_each(self, examples: list[Example], style: str | list[str]) -> list[list[dict]]:
        """Render every example; a list of styles takes turns (half worked out, half with a tool, ...)."""
        styles = style if isinstance(style, list) else [style]
        return [self.render(e, styles[i % len(styles)]) for i, e in enumerate(examples)]

    def check_style(self, style: str) -> None:
        if style not in self.styles:
            raise PocketError(f"task {self.name!r} has no style {style!r}; "
                             f"supported: {', '.join(self.styles)}")


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def truthfulness(task: "Task", example: Example, text: str) -> int:
    """The labelers' first question about a reply: 0 right (and soundly worked), 1 an honest refusal,
    2 wrong. The reward model's rubric and the arena's judge both rank by it."""
    if task.verify(example, text) and task.sound_working(example, text):
        return 0
    return 1 if is_refusal(text) else 2


def check_prompt(question: str, reply: str) -> str:
    """The self-check question: the reflection strategy asks it, the "check" rendering trains it."""
    return f"{question}\nProposed answer:\n{reply}\nIs the proposed answer right? Reply yes or no."


def corrupt_number(text: str, rng: random.Random) -> str:
    """The text with one of its numbers changed by a small amount (a plausible slip)."""
    found = list(NUMBER.finditer(text))
    if not found:
        return text + " 1"
    m = rng.choice(found)
    digits = [i for i, ch in enumerate(m[0]) if ch.isdigit()]
    i = rng.choice(digits)
    wrong = str((int(m[0][i]) + rng.randint(1, 9)) % 10)
    if i == 0 and wrong == "0" and len(digits) > 1:
        wrong = "1" if m[0][i] != "1" else "2"
    number = m[0][:i] + wrong + m[0][i + 1:]
    return text[:m.start()] + number + text[m.end():]

def export_jsonl(task: Task, split: str, style: str, path: str | os.PathLike) -> int:
    """Write `{"messages": [...]}` per example, atomically (temp file, then rename); returns the count."""
    from ...common import atomic_write_text  # here: the tasks import no torch, which common does

    task.check_style(style)
    examples = task.examples(split)
    atomic_write_text(path, "".join(json.dumps({"messages": task.render(example, style)}, ensure_ascii=False) + "\n"
                                    for example in examples))
    return len(examples)


# ---------------------------------------------------------------------------------------------
# Reading answers out of free text.

ANSWER_MARK = re.compile(r"(?:answer|答案)\s*[:：]", re.IGNORECASE)
EDGES = re.compile(r"^[\s*_`]+|[\s*_`.。!！,，;；]+$")  # markdown emphasis and trailing punctuation
NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")
THOUSANDS = re.compile(r"(?<=\d)[,\u202f\u2009](?=\d{3}(?!\d))")  # "1,234,000" and thin spaces
REFUSALS = ("don't know", "do not know", "dont know", "not sure", "no idea", "cannot answer",
            "can't answer", "unknown", "不知道", "不清楚", "不确定")


def final_answer(text: str) -> str:
    """The final answer in a reply: what follows the last "Answer:" on its line, else the last line.

    Whitespace, markdown emphasis and trailing punctuation are stripped.
    """
    marks = list(ANSWER_MARK.finditer(text))
    if marks:
        rest = text[marks[-1].end():].strip()
        line = rest.splitlines()[0] if rest else ""
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        line = lines[-1] if lines else ""
    return EDGES.sub("", line)


def numbers(text: str) -> list[Fraction]:
    """Every number in the text, in order, exactly: "1,234,000" -> 1234000, "−2.5" -> -5/2."""
    text = THOUSANDS.sub("", text.replace("\u2212", "-"))
    return [Fraction(m) for m in NUMBER.findall(text) if len(m) <= 60]  # no giant digit strings


def tool_steps(trace: list[dict], tool: str) -> list[tuple[dict, str]]:
    """(arguments, observation) of each call to `tool` in a trajectory (arguments the model did not write as
    a JSON object count as none)."""
    out = []
    for step in trace:
        action = step.get("action") or {}
        if action.get("name") == tool:
            arguments = action.get("arguments")
            out.append((arguments if isinstance(arguments, dict) else {}, str(step.get("observation", ""))))
    return out


def copies_calculator(trace: list[dict], output: str) -> dict[str, float]:
    """Whether the answer states the calculator's last result, the same number (a trajectory that never
    called it has nothing to copy, and no such measure)."""
    results = [observation for _, observation in tool_steps(trace, "calculator")]
    if not results:
        return {}
    result = last_number(results[-1])
    return {"answer_copies_calculator": float(bool(result) and last_number(output) == result)}


def answer_words(output: str) -> str:
    """A reply's final answer as lowercase words ("Answer: 1,234." -> "1234"): the default vote key."""
    return normalize(final_answer(output))


def last_number(output: str) -> str:
    """The last number of a reply's final answer, exactly ("Answer: -1,234." -> "-1234"; none: ""): the
    vote's key where `check` reads that number (words alone would make -5 and 5 the same answer)."""
    found = numbers(final_answer(output))
    return str(found[-1]) if found else ""


def normalize(text: str) -> str:
    """Lowercase words separated by single spaces, thousands separators removed, for matching."""
    text = THOUSANDS.sub("", text.lower().replace("\u2019", "'"))
    return " ".join(re.findall(r"[\w']+", text))


def _step(line: str) -> str:
    """A line of working, compared with single spaces and without thousands separators."""
    return " ".join(THOUSANDS.sub("", line).split())


def mentions(text: str, value: str) -> bool:
    """Whether `value` occurs in `text` as whole words (case, punctuation and "1,234" tolerant)."""
    value = normalize(value)
    return bool(value) and f" {value} " in f" {normalize(text)} "


def is_refusal(text: str) -> bool:
    """Whether the text declines to answer ("I don't know", "I'm not sure", "不知道"...)."""
    text = text.lower().replace("\u2019", "'")
    return any(phrase in text for phrase in REFUSALS)


def decimal_string(x: Fraction, places: int, strip: bool = False) -> str:
    """x rounded half away from zero to `places` decimals, exactly (no floats)."""
    scaled = int(abs(x) * 10**places + Fraction(1, 2))
    digits = str(scaled).rjust(places + 1, "0")
    whole, frac = (digits[:-places], digits[-places:]) if places else (digits, "")
    if strip:
        frac = frac.rstrip("0")
    sign = "-" if x < 0 and scaled else ""
    return sign + whole + (f".{frac}" if frac else "")
