"""Swiss-cheese probes: easy for people, famously hard for token-based models.

- compare_decimals: "Which is larger, 9.11 or 9.9?" (tokens "11" > "9" mislead);
- count_letter:     "How many r's are in strawberry?" (a model sees tokens, not letters);
- spell:            "Spell the word strawberry letter by letter." -> "s-t-r-a-w-b-e-r-r-y".

Their chain-of-thought renderings make the hidden steps explicit: align the decimals digit by
digit; spell the word, then count. Spelling a word the model never saw spelled needs the letters of
each of its tokens; `spelling_documents` is a pretraining source of spelled words that teaches them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from fractions import Fraction

from ..world import make_names
from .base import Example, Task, final_answer, last_number, numbers

# Real words, many with doubled letters (where counting goes wrong).
WORDS = tuple("""
strawberry banana mississippi raspberry bookkeeper committee balloon coffee letter apple necessary
occurrence parallel assessment success address possession tomorrow different pepper cherry butterfly
elephant giraffe hippopotamus penguin kangaroo umbrella accommodate embarrass millennium questionnaire
bubble puzzle giggle mirror carrot squirrel pizza jazz buzz blizzard grammar summer dinner hammer
rabbit kitten mammal cinnamon broccoli spaghetti vacuum llama arrow barrel cassette ferry
football goalkeeper horror immediate irregular karaoke lollipop marshmallow moonlight needle noodle
opossum peppermint referee scissors settee teepee tennis toffee typewriter volleyball waterfall yellow
zucchini alphabet computer language keyboard mountain library elevator calendar chocolate
dictionary envelope festival guitar hospital internet journey kitchen lemonade magazine notebook
orchestra pyramid question rainbow sandwich telephone universe vegetable window xylophone yesterday
airport bicycle candle dolphin engine forest garden harbor island jungle lantern meadow ocean
pencil quarter river silver thunder valley whistle anniversary possibility reassessment
""".split())


def _word(rng: random.Random) -> str:
    """A real word, or an invented one (so the space of problems never runs out)."""
    return rng.choice(WORDS) if rng.random() < 0.6 else make_names(rng, 1)[0].lower()


def spelled(word: str) -> str:
    """The canonical spelling format: lowercase letters joined by hyphens."""
    return "-".join(word.lower())


def evaluated_words() -> set[str]:
    """The words that spell and count_letter ask about in their validation and test splits."""
    return {e.meta["word"] for task in (Spell(), CountLetter()) for split in ("validation", "test")
            for e in task.examples(split)}


def spelling_documents(n: int = 3000, words_per_doc: int = 8, seed: int = 0) -> Iterator[str]:
    """Pretraining drills, a word per line: "The word dolphin is spelled d-o-l-p-h-i-n." Half the words
    are English (from Python's own documentation), half invented like the world's names. None is a word
    the spelling tasks evaluate on, nor one of the world's names (an unseen entity stays unseen). Seeing
    many words spelled that share a token is how the model learns that token's letters, and so how to
    spell words it has never seen spelled."""
    from pydoc_data.topics import topics

    from . import default_world

    held_out = evaluated_words() | default_world().words()
    english = sorted({w for text in topics.values() for w in re.findall(r"\b[a-z]{3,12}\b", text)} - held_out)
    rng = random.Random(seed)
    invented = [w for w in (name.lower() for name in make_names(rng, n * words_per_doc // 2)) if w not in held_out]
    for _ in range(n):
        words = [rng.choice(english) if rng.random() < 0.5 else rng.choice(invented) for _ in range(words_per_doc)]
        yield "\n".join(f"The word {w} is spelled {spelled(w)}." for w in words)


# ---------------------------------------------------------------------------------------------


DECIMAL_PLACES = ("Tenths", "Hundredths")


def _pad(decimal: str, places: int) -> str:
    """9.9 -> 9.90: the same number, now aligned digit by digit with 9.11."""
    whole, frac = decimal.split(".")
    return f"{whole}.{frac.ljust(places, '0')}"


class CompareDecimals(Task):
    """Two decimals with the same whole part and different lengths: 9.11 vs 9.9."""

    name = "compare_decimals"
    styles = ("direct", "cot", "check")
    QUESTIONS = ("Which is larger, {x} or {y}?", "Which number is bigger: {x} or {y}?",
                 "Which is greater, {x} or {y}?")

    def generate(self, rng: random.Random) -> Iterator[Example]:
        while True:
            whole = rng.randint(0, 20)
            short = f"{whole}.{rng.randint(1, 9)}"
            long = f"{whole}.{rng.choice([d for d in range(1, 100) if d % 10]):02d}"
            x, y = (short, long) if rng.random() < 0.5 else (long, short)
            larger = max(x, y, key=Fraction)
            question = rng.choice(self.QUESTIONS).format(x=x, y=y)
            yield Example(question, larger, {"x": x, "y": y, "larger": larger})

    def split_key(self, example: Example) -> str:
        return " ".join(sorted((example.meta["x"], example.meta["y"])))

    def check(self, example: Example, output: str) -> bool:
        """The final answer must name the larger number and not the smaller one."""
        return self._named(example, output) == {example.meta["larger"]}

    def answer_key(self, example: Example, output: str) -> str:
        """The candidates the answer names ("9.9 is larger" and "Answer: 9.90" agree)."""
        return " ".join(sorted(self._named(example, output)))

    @staticmethod
    def _named(example: Example, output: str) -> set[str]:
        """Which of the two numbers (as the question writes them) the final answer names."""
        said = numbers(final_answer(output))
        return {v for v in (example.meta["x"], example.meta["y"]) if Fraction(v) in said}

    def cot(self, example: Example) -> str:
        x, y, larger = example.meta["x"], example.meta["y"], example.meta["larger"]
        places = max(len(x.split(".")[1]), len(y.split(".")[1]))
        px, py = _pad(x, places), _pad(y, places)
        (whole, fx), (_, fy) = px.split("."), py.split(".")
        lines = [f"Write both numbers with {places} decimal places: {px} and {py}.",
                 f"The whole parts are equal ({whole}), so compare the decimals digit by digit."]
        for place, dx, dy in zip(DECIMAL_PLACES, fx, fy):
            if dx != dy:
                winner = px if dx > dy else py
                lines.append(f"{place}: {dx} {'>' if dx > dy else '<'} {dy}, so {winner} is larger.")
                break
            lines.append(f"{place}: {dx} = {dy}.")
        lines.append(f"Answer: {larger}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


class CountLetter(Task):
    name = "count_letter"
    styles = ("direct", "cot")
    QUESTIONS = ("How many {l}'s are in {w}?", "How many times does the letter {l} appear in {w}?",
                 "Count the letter {l} in the word {w}.")

    def generate(self, rng: random.Random) -> Iterator[Example]:
        while True:
            word = _word(rng)
            # Mostly letters the word has; sometimes one it lacks (the answer 0 is a trap too).
            letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            count = word.count(letter)
            question = rng.choice(self.QUESTIONS).format(l=letter, w=word)
            yield Example(question, str(count), {"word": word, "letter": letter, "count": count})

    def split_key(self, example: Example) -> str:
        return f"{example.meta['word']}|{example.meta['letter']}"

    def check(self, example: Example, output: str) -> bool:
        found = numbers(final_answer(output))
        return bool(found) and found[-1] == example.meta["count"]

    def answer_key(self, example: Example, output: str) -> str:
        return last_number(output)

    def cot(self, example: Example) -> str:
        word, letter, count = example.meta["word"], example.meta["letter"], example.meta["count"]
        positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
        lines = [f"Spell the word: {spelled(word)}."]
        if positions:
            plural = "s" if count > 1 else ""
            lines.append(f"The letter {letter} is at position{plural} {', '.join(positions)}.")
        else:
            lines.append(f"The letter {letter} does not appear.")
        lines.append(f"Answer: {count}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


class Spell(Task):
    name = "spell"
    styles = ("direct", "cot")
    QUESTIONS = ("Spell the word {w} letter by letter.", "How do you spell {w}, one letter at a time?")

    def generate(self, rng: random.Random) -> Iterator[Example]:
        while True:
            word = _word(rng)
            yield Example(rng.choice(self.QUESTIONS).format(w=word), spelled(word), {"word": word})

    def split_key(self, example: Example) -> str:
        return example.meta["word"]

    def check(self, example: Example, output: str) -> bool:
        """Lenient on separators and case ("S-T-R", "s t r", "s, t, r"); every letter on its own."""
        letters = re.findall(r"[^\W\d_]+", final_answer(output))
        return all(len(x) == 1 for x in letters) and "".join(letters).lower() == example.meta["word"]

    def cot(self, example: Example) -> str:
        word = example.meta["word"]
        numbered = ", ".join(f"{i + 1}. {c}" for i, c in enumerate(word))
        return f"The word {word} has {len(word)} letters: {numbered}.\nAnswer: {spelled(word)}"
