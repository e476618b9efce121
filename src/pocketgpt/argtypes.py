"""argparse types that refuse a bad value where it is parsed, with argparse's one-line usage error: the
commands (cli.py) and the lab's experiments share them."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable


def integer(minimum: int, maximum: int | None = None):
    """An integer in [minimum, maximum] (a batch of 0 rows would wait forever, `--n 0` would mean the whole
    split, `--steps -5` an untrained model)."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError reads "invalid integer value: 'x'"
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {value}")
        return value
    parse.__name__ = "integer"
    return parse


def non_negative(text: str) -> float:
    """A finite number >= 0 (temperatures, weight decays)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


non_negative.__name__ = "number"


def positive(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text}")
    return value


positive.__name__ = "number"


def fraction(text: str) -> float:
    """A share strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


fraction.__name__ = "number"


def names(known: Iterable[str]):
    """A comma-separated list of at least one of `known` (`--runs ,` ran nothing and overwrote a report
    with an empty one)."""
    known = tuple(known)

    def parse(text: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in known]
        if not chosen or unknown:
            what = f"unknown {', '.join(unknown)}" if unknown else "none given"
            raise argparse.ArgumentTypeError(f"{what}: choose from {', '.join(known)}")
        return chosen
    parse.__name__ = "list"
    return parse


def folder_name(taken: Iterable[str]):
    """The name of a new folder inside a run: letters, digits, "_", "-" or "." (not first), and not one of
    `taken` (`sft --name ""` wrote the model into the run folder itself, `--name rm` over the reward model,
    `--name ../x` outside the run)."""
    taken = tuple(taken)

    def parse(text: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", text):
            raise argparse.ArgumentTypeError(f"{text!r} is not a folder name (letters, digits, _ - .)")
        if text in taken:
            raise argparse.ArgumentTypeError(f"{text!r} is a folder of the run's own: {', '.join(taken)}")
        return text
    parse.__name__ = "name"
    return parse
