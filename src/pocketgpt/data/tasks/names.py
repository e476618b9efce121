"""Generation with many right answers: invent names like the ones given.

"Here are some names of places in this world: Dorin, Velmo, Tasrel. Invent five more names like
these." Any five new pronounceable names are right, so the task measures diversity rather than
accuracy: the seeds note that base models stay more diverse than RLHF models ("more Pokémon
names"); compare `distinct_ratio` over many samples of each.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from ..world import RESERVED_WORDS, World, make_names
from .base import Example, Task

COUNT = 5
NAME = re.compile(r"\b[A-Z][a-z]{2,14}\b")
# Capitalised words a reply may contain that are not names ("Sure! Here are five: ...").
FILLER = frozenset("sure here the and answer okay ok some new name names these those they also more "
                   "five places place world invented like".split())


def name_like(word: str) -> bool:
    """Pronounceable: has a vowel and never four consonants in a row."""
    lower = word.lower()
    return bool(re.search(r"[aeiouy]", lower)) and not re.search(r"[^aeiouy]{4}", lower)


def extract_names(text: str, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Capitalised, pronounceable words in the text, minus filler and `exclude` (lowercase)."""
    return [w for w in NAME.findall(text)
            if name_like(w) and w.lower() not in FILLER and w.lower() not in exclude]


def distinct_ratio(outputs: list[str]) -> float:
    """Distinct names over all names across outputs (1.0: never repeats itself; 0.0: no names)."""
    names = [n.lower() for output in outputs for n in extract_names(output)]
    return len(set(names)) / len(names) if names else 0.0


class Names(Task):
    name = "names"

    def __init__(self, world: World, seed: int = 0):
        super().__init__(seed)
        self.world = world

    def generate(self, rng: random.Random) -> Iterator[Example]:
        places = [e.name for e in self.world.entities() if e.kind in ("country", "city") and e.tier == "head"]
        taken = RESERVED_WORDS | {w.lower() for e in self.world.entities() for w in e.name.split()}
        while len(places) >= 3:
            given = rng.sample(places, rng.randint(3, min(5, len(places))))
            question = (f"Here are some names of places in this world: {', '.join(given)}. "
                        f"Invent five more names like these.")
            invented = make_names(rng, COUNT, taken)
            yield Example(question, ", ".join(invented), {"given": given, "count": COUNT})

    def check(self, example: Example, output: str) -> bool:
        """At least five distinct name-like words that are not in the prompt."""
        return len(self._new_names(example, output)) >= example.meta["count"]

    def answer_key(self, example: Example, output: str) -> str:
        """The names as `check` reads them (lowercased words made "zunvel, fenthus", no names, and
        "Zunvel, Fenthus" the same vote)."""
        return " ".join(sorted(self._new_names(example, output)))

    def _new_names(self, example: Example, output: str) -> set[str]:
        prompt_words = frozenset(w.lower() for w in re.findall(r"\w+", example.question))
        return {n.lower() for n in extract_names(output, prompt_words)}
