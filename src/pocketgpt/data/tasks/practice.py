"""Practice worlds: conversations about other seeds of the world, which nothing memorised answers.

A model fine-tuned only on its own world can answer a retrieval or tool-use conversation from memory
and learn nothing about reading. About a practice world, whose entities share no name with the
model's, the only way to the answer is the context: the passages, the search results, the
question's own names copied into a query. A task that has such a rendering names it as its
`practice_style` (fact QA: "rag"; multi-hop: "tool").
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from ...errors import PocketError
from ..world import generate_world
from .base import Task

PRACTICE_WORLDS = 10  # worlds the practice is drawn from (~2,500 fact questions)


def practice_conversations(task: Task, count: int, seed: int = 0) -> list[list[dict]]:
    """`count` conversations in `task`'s practice style about practice worlds, none naming an entity of
    the task's own world."""
    if task.practice_style is None:
        raise PocketError(f"task {task.name!r} has no practice rendering (practice worlds)")
    world = task.world
    ours = re.compile(r"\b(?:" + "|".join(re.escape(e.name) for e in world.entities()) + r")\b")
    convs = []
    for i in range(PRACTICE_WORLDS):
        practice = type(task)(generate_world(replace(world.config, seed=world.config.seed + 1000 + i)), seed=seed)
        for split in ("train", "validation", "test"):
            convs += [practice.render(e, task.practice_style) for e in practice.examples(split)
                      if not ours.search(e.question)]
    random.Random(f"practice:{seed}").shuffle(convs)
    if count > len(convs):
        raise PocketError(f"practice worlds: {count} conversations asked for, {len(convs)} available")
    return convs[:count]
