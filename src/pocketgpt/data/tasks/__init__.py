"""The task suite: each task generates examples, verifies answers exactly, and renders chat data.

    task = get_task("arithmetic", seed=0)
    example = task.examples("test")[0]
    task.render(example, "cot")         # [{"role": "user", ...}, {"role": "assistant", ...}]
    task.verify(example, "Answer: 42")  # True or False, never an exception
    export_jsonl(task, "train", "cot", "runs/sft/arithmetic.jsonl")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple
from functools import lru_cache

from ...errors import PocketError
from ..world import World, WorldConfig, generate_world
from .arithmetic import Arithmetic
from .base import SPLITS, STYLES, Example, Task, export_jsonl
from .factqa import FactQA
from .game24 import Game24, solve24
from .multihop import MultiHop
from .names import Names, distinct_ratio
from .structured import Structured
from .swiss_cheese import CompareDecimals, CountLetter, Spell

# The world that tasks use when none is given: the default one, or the run's (`use_world`), so that every
# stage and task of a run with another world seed asks about the world its model was trained on.
_active_world = WorldConfig()


def use_world(config: WorldConfig) -> None:
    """Make `config` the world of this process's tasks (the CLI does it for the run it is given)."""
    global _active_world
    config.validate()
    _active_world = config


def default_world() -> World:
    """The active world (`WorldConfig()`'s unless `use_world` chose another), generated once per config."""
    key = astuple(_active_world)
    if key not in _worlds:
        _worlds[key] = generate_world(_active_world)
    return _worlds[key]


_worlds: dict[tuple, World] = {}


def _plain(cls: type[Task]) -> Callable[[int, World | None], Task]:
    return lambda seed, world: cls(seed=seed)


def _worldly(cls: type[Task], **kwargs) -> Callable[[int, World | None], Task]:
    return lambda seed, world: cls(world or default_world(), seed=seed, **kwargs)


# name -> factory(seed, world)
TASKS: dict[str, Callable[[int, World | None], Task]] = {
    "factqa": _worldly(FactQA),
    "factqa_head": _worldly(FactQA, tier="head"),
    "factqa_tail": _worldly(FactQA, tier="tail"),
    "factqa_unseen": _worldly(FactQA, tier="unseen"),
    "arithmetic": _plain(Arithmetic),
    "compare_decimals": _plain(CompareDecimals),
    "count_letter": _plain(CountLetter),
    "spell": _plain(Spell),
    "game24": _plain(Game24),
    "multihop": _worldly(MultiHop),
    "structured": _worldly(Structured),
    "names": _worldly(Names),
}


def get_task(name: str, seed: int = 0, world: World | None = None) -> Task:
    """A task by name; tasks about the world use `world`, or the default world if None."""
    if name not in TASKS:
        raise PocketError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    if world is None:
        return _task_of_active_world(name, seed, astuple(_active_world))
    return TASKS[name](seed, world)


@lru_cache(maxsize=None)
def _task_of_active_world(name: str, seed: int, world_key: tuple) -> Task:
    """Tasks are immutable once built; building some (Game of 24's splits) takes seconds, so build once
    (per active world: `world_key` makes another world's task a new one)."""
    return TASKS[name](seed, default_world())


__all__ = ["TASKS", "SPLITS", "STYLES", "Example", "Task", "get_task", "export_jsonl", "default_world", "use_world",
           "solve24", "distinct_ratio", "Arithmetic", "CompareDecimals", "CountLetter", "Spell", "Game24",
           "FactQA", "MultiHop", "Structured", "Names"]
