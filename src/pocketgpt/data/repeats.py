"""Repeat drills: text that says again what it said a few lines before, and rows of random tokens repeated.

Answering from a passage, typing a question's names into a search, reading a number's digits off the
question: each copies a token from the context by finding where it stood before and taking what came
after it. Transformers learn this with "induction heads" (Olsson et al. 2022), which natural text
forms only after tens of millions of tokens (~32M at our batch, the README's estimate; the speedrun
reads 6.1M). These drills make the repetition dense: every line below repeats something random seen
a moment earlier, so nothing but looking back can predict it.

    repeat_documents(1, seed=0)   # ['Ticket 6281-4048-7802 belongs to Lankir.\nLankir shows ticket 6281-...']

The words are invented (the world's own names left out, so an unseen entity stays unseen) and the
numbers random. None of the formats is the copying probe's ("List: ... Again: ..."): the probe
measures whether the skill carries over to a format never seen.

In text, the drills alone did not make the head form within the speedrun (DEVELOPERS.md). The purest
form of the task does, with smeared keys, in ~200 steps: rows of one random token segment repeated to
fill the row (`repeated_token_rows`), the lab's induction experiment and pretraining's copy warm-up.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from ..errors import PocketError
from .world import make_names


def _echo(rng: random.Random, words: list[str]) -> str:
    seq = " ".join(rng.sample(words, rng.randint(3, 7)))
    return f"Say after me: {seq}.\n{seq.capitalize()}."


def _lookup(rng: random.Random, words: list[str]) -> str:
    """Associative recall: pairs, then some of them asked for in another order."""
    keys = [w.capitalize() for w in rng.sample(words, rng.randint(3, 6))]
    lockers = {k: rng.randint(1, 99) for k in keys}
    shown = ", ".join(f"{k} {v}" for k, v in lockers.items())
    asked = rng.sample(keys, rng.randint(2, len(keys)))
    return f"Lockers: {shown}.\n" + " ".join(f"{k} has locker {lockers[k]}." for k in asked)


def _roll_call(rng: random.Random, words: list[str]) -> str:
    names = [w.capitalize() for w in rng.sample(words, rng.randint(4, 9))]
    return f"Seating order: {', '.join(names)}.\nChecked in, in order: {', '.join(names)}."


def _ticket(rng: random.Random, words: list[str]) -> str:
    code = "-".join(str(rng.randint(0, 9999)).zfill(rng.choice((2, 3, 4))) for _ in range(rng.randint(2, 4)))
    holder = rng.choice(words).capitalize()
    return f"Ticket {code} belongs to {holder}.\n{holder} shows ticket {code} at the gate."


def _story(rng: random.Random, words: list[str]) -> str:
    a, b, thing = rng.sample(words, 3)
    a, b = a.capitalize(), b.capitalize()
    return f"{a} gave {b} a {thing} for the journey.\nLater {b} thanked {a} for the {thing}."


FORMATS: tuple[Callable[[random.Random, list[str]], str], ...] = (_echo, _lookup, _roll_call, _ticket, _story)


def repeat_documents(n: int = 3000, episodes: int = 4, seed: int = 0) -> list[str]:
    """n documents of `episodes` drills each, the formats mixed, a fresh draw of words for each."""
    from .tasks import default_world

    rng = random.Random(f"repeats:{seed}")
    words = [w.lower() for w in make_names(rng, 4000, reserved=frozenset(default_world().words()))]
    return ["\n\n".join(rng.choice(FORMATS)(rng, words) for _ in range(episodes)) for _ in range(n)]


def repeated_token_rows(rows: int, seq_len: int, tokens: torch.Tensor, min_segment: int, max_segment: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of `rows` rows: one segment of min_segment..max_segment ids drawn from `tokens` each,
    repeated to fill seq_len + 1 ids. Targets are -1 (ignored) inside the first copy, where nothing predicts
    them; after it, each is the id one segment back, which only looking back can predict."""
    if not 2 <= min_segment <= max_segment < seq_len:
        raise PocketError(f"segments must be 2 <= min ({min_segment}) <= max ({max_segment}) < seq_len ({seq_len})")
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(rows, seq_len + 1, dtype=torch.long)
    targets = torch.full((rows, seq_len), -1, dtype=torch.long)
    for r in range(rows):
        n = int(torch.randint(min_segment, max_segment + 1, (1,), generator=g))
        segment = tokens[torch.randint(len(tokens), (n,), generator=g)]
        ids[r] = segment.repeat(seq_len // n + 1)[:seq_len + 1]
        targets[r, n - 1:] = ids[r, n:]
    return ids[:, :-1], targets
